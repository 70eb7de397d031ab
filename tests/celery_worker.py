"""A real ``celery worker`` process for ``testproject.celery`` and a client to send it tasks.

Used by tests/test_celery.py and benchmarks/celery_connects.py. The worker runs the test
project's settings with the environment it is given (DBK_DB_*, DBK_DRIVER) plus:

- ``DBK_CELERY_BROKER``: the broker and result backend (a private redis-server);
- ``DBK_CELERY_INTEGRATION``: ``0`` leaves out ``django_dbkeepalive.contrib.celery``;
- ``DBK_CELERY_DB_REUSE_MAX``: Celery's ``CELERY_DB_REUSE_MAX``;
- ``DBK_CELERY_PARENT_HOLDS``: ``1`` makes the worker's main process hold a connection
  from ``worker_ready`` to ``worker_shutdown`` (rows ``parent-start``/``parent-end``);
- ``DBK_CELERY_USING``, ``DBK_CELERY_INSTALL_AT``, ``DBK_CELERY_AUTO_GUARD``, ``DBK_APP``:
  see testproject/celery.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0
TASK = "dbk.write"  # testproject.celery.write


class CeleryWorker:
    def __init__(
        self,
        broker: str,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.broker = broker
        self.pool = pool
        self.concurrency = concurrency
        self.env = {**(env if env is not None else os.environ), "DBK_CELERY_BROKER": broker}
        self.args = list(args)
        self.name = f"dbk-{uuid.uuid4().hex[:8]}@localhost"
        self.process: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkstemp(prefix="dbkeepalive-celery-", suffix=".log")[1])

    def start(self) -> CeleryWorker:
        cmd = [
            sys.executable, "-m", "celery", "-A", "testproject.celery:app", "worker",
            "-P", self.pool, "-c", str(self.concurrency), "-n", self.name, "-l", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            *self.args,
        ]  # fmt: skip
        with open(self._log, "wb") as log:
            self.process = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env={**self.env, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() reaches the children
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while " ready." not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the celery worker did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self._log.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int | None:
        """Warm shutdown (SIGTERM: running tasks finish, ``worker_shutdown`` runs);
        SIGKILL to the whole process group after ``timeout``. Returns the exit code."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        try:  # children left behind by a crash
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None
        return proc.returncode

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._log.unlink(missing_ok=True)


class Client:
    """Sends the test project's tasks to the broker and collects their results."""

    def __init__(self, broker: str) -> None:
        from celery import Celery

        # No fix-ups: this process is a producer, not a Django worker.
        self.app = Celery("dbk-client", broker=broker, backend=broker, fixups=[])
        self.app.conf.broker_connection_retry_on_startup = True

    def write(self, keys: Sequence[str], timeout: float = 60.0) -> list[tuple[int, int, int]]:
        """Run ``write(key)`` for each key; return each task's (pid, thread, connection
        id), in order. Raises the first task error."""
        results = [self.app.send_task(TASK, args=[key]) for key in keys]
        out: list[tuple[int, int, int]] = []
        for result in results:
            value: Any = result.get(timeout=timeout)
            out.append((int(value[0]), int(value[1]), int(value[2])))
            result.forget()
        return out

    def call(self, name: str, *args: Any, timeout: float = 60.0) -> tuple[int, int, int]:
        """Run the task ``name``, which returns (pid, thread, connection id); return that.
        Raises the task's error."""
        result = self.app.send_task(name, args=list(args))
        try:
            value: Any = result.get(timeout=timeout)
        finally:
            result.forget()
        return int(value[0]), int(value[1]), int(value[2])

    def close(self) -> None:
        self.app.close()
