"""A private redis-server for the Celery tests and benchmark (own port and directory).

Never the system's Redis: ``RedisServer`` starts ``redis-server`` on a free port of
127.0.0.1, without persistence, in a throw-away directory, and removes it on ``close()``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .servers import PrivateServer, _die_with_parent, _free_port

START_TIMEOUT = 15.0


class RedisServer(PrivateServer):
    STOP_TIMEOUT = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: run `make deps` (apt: redis-server)")
        self.tmpdir = Path(tempfile.mkdtemp(prefix="dbkeepalive-redis-"))
        for attempt in range(3):
            self.port = _free_port()
            options = {
                "port": str(self.port),
                "bind": "127.0.0.1",
                "save": "",  # no persistence
                "appendonly": "no",
                "dir": str(self.tmpdir),
                "logfile": str(self.tmpdir / "redis.log"),
                "daemonize": "no",
            }
            args = [item for key, value in options.items() for item in (f"--{key}", value)]
            self.process = subprocess.Popen(
                [binary, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
            if self._wait_ready():
                return
            self.stop()
            if attempt == 2:
                raise RuntimeError(f"redis-server did not start:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False  # exited: the port was taken, most likely
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def log_tail(self, lines: int = 20) -> str:
        if self.tmpdir is None or not (self.tmpdir / "redis.log").exists():
            return "(no log)"
        return "\n".join((self.tmpdir / "redis.log").read_text().splitlines()[-lines:])
