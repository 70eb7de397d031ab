"""``manage.py shell`` sessions left idle past wait_timeout, then used again."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from .conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

Raw = Callable[..., list[tuple[Any, ...]]]

MANAGE = Path(__file__).resolve().parent.parent / "testproject" / "manage.py"
PROMPT = ">>> "


class Shell:
    """``manage.py shell -i python`` on pipes: send lines, read output up to a prompt."""

    def __init__(self, driver: str, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(MANAGE), "shell", "-i", "python", "--no-startup"],
            env={**os.environ, "DBK_DRIVER": driver, "PYTHONUNBUFFERED": "1", **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=0,
        )
        self._chunks: queue.Queue[str] = queue.Queue()
        self._stderr: list[str] = []  # tracebacks and log lines
        assert self.proc.stdout is not None and self.proc.stderr is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()
        threading.Thread(target=self._collect, args=(self.proc.stderr,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        while chunk := stream.read(1):
            self._chunks.put(chunk)

    def _collect(self, stream: IO[str]) -> None:
        for line in stream:
            self._stderr.append(line)

    def stderr(self, containing: str, timeout: float = 5) -> str:
        """Everything written to stderr, once it contains ``containing`` (or after
        ``timeout``: stderr and stdout are separate pipes, read by separate threads)."""
        wait_for(lambda: containing in "".join(self._stderr), timeout=timeout)
        return "".join(self._stderr)

    def read_until_prompt(self, timeout: float = 20) -> str:
        """Output up to the next ``>>>`` prompt (exclusive)."""
        deadline = time.monotonic() + timeout
        seen = ""
        while not seen.endswith(PROMPT):
            try:
                seen += self._chunks.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no prompt within {timeout}s; output so far:\n{seen}"
                ) from None
        return seen[: -len(PROMPT)]

    def run(self, line: str) -> str:
        """Send one line of Python; return what it printed."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.read_until_prompt()

    def close(self) -> int:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # EOF ends the interactive interpreter
        try:
            return self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def shell(driver: str) -> Any:
    shells: list[Shell] = []

    def start(**env: str) -> Shell:
        started = Shell(driver, **env)
        shells.append(started)
        # Nothing may be sent before the first prompt: Django's shell runs stdin as a
        # script (and exits) when it finds input already waiting at startup.
        started.read_until_prompt()
        return started

    yield start
    for started in shells:
        started.close()


def keys(raw: Raw) -> list[str]:
    return [row[0] for row in raw("SELECT `key` FROM testapp_item ORDER BY id")]


def test_a_shell_left_idle_past_wait_timeout_works_again(set_wait_timeout, raw, shell):
    set_wait_timeout(2)  # GLOBAL: the shell's new connection gets it
    session = shell()
    assert session.run("from testproject.testapp.models import Item") == ""
    assert session.run('Item.objects.create(key="a") and None') == ""
    assert session.run("print(Item.objects.count())") == "1\n"
    time.sleep(3)  # the user went for coffee; the server closed the session
    assert session.run('Item.objects.create(key="b") and None') == ""
    assert session.run("print(Item.objects.count())") == "2\n"
    recycled = "recycled the 'default' connection (reason: disconnected"
    assert recycled in session.stderr(recycled)
    assert "Traceback" not in session.stderr("")
    assert session.close() == 0
    assert keys(raw) == ["a", "b"]


def test_without_the_app_the_idle_shell_gets_server_gone_away(set_wait_timeout, raw, shell):
    # The control: the same session with plain Django (testproject without the app).
    set_wait_timeout(2)
    session = shell(DBK_APP="0")
    session.run("from testproject.testapp.models import Item")
    assert session.run('Item.objects.create(key="a") and None') == ""
    time.sleep(3)
    assert session.run('Item.objects.create(key="b") and None') == ""
    errors = session.stderr("OperationalError")
    assert "OperationalError: (2006" in errors or "OperationalError: (2013" in errors
    session.close()
    assert keys(raw) == ["a"]
