"""Real application servers serving the load app (:mod:`benchmarks.loadapp`) as
subprocesses: their command lines, start (until they answer), stop, and whether each is
installed.

=========== ================================================================
``sync``    gunicorn, ``-k sync``, 4 workers (one request at a time each, no
            keep-alive: a TCP connection per request)
``gthread`` gunicorn, ``-k gthread``, 2 workers x 4 threads
``gevent``  gunicorn, ``-k gevent``, 2 workers (greenlets: one per client)
``uvicorn`` uvicorn, 2 workers, the ASGI app (async views, the async ORM)
``daphne``  daphne (Twisted), one process, the ASGI app like uvicorn
``uwsgi``   uWSGI, master + 2 processes x 4 threads, ``--http11-socket``
=========== ================================================================

Every server but gunicorn's sync worker keeps idle HTTP connections open for 30 s, so
clients of a short run never race a keep-alive timeout.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import _die_with_parent, _free_port  # noqa: E402

SERVERS = ("sync", "gthread", "gevent", "uvicorn", "daphne", "uwsgi")
#: Each server's paths for a write and a read (the ASGI servers: the async views).
PATHS = {"uvicorn": ("/aw", "/ar"), "daphne": ("/aw", "/ar")}
DEFAULT_PATHS = ("/w", "/r")
START_TIMEOUT = 60.0
WORKERS = 2
THREADS = 4


def uwsgi_binary() -> str | None:
    """uWSGI next to this interpreter (``pip install uwsgi`` builds it there), or on PATH."""
    here = Path(sys.executable).parent / "uwsgi"
    return str(here) if here.exists() else shutil.which("uwsgi")


def missing(kind: str) -> str | None:
    """Why ``kind`` cannot run here, or ``None`` when it can."""
    needs = {
        "sync": ["gunicorn"],
        "gthread": ["gunicorn"],
        "gevent": ["gunicorn", "gevent"],
        "uvicorn": ["uvicorn"],
        "daphne": ["daphne"],
        "uwsgi": [],
    }[kind]
    for module in needs:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[test]')"
    if kind == "uwsgi" and uwsgi_binary() is None:
        return "uwsgi is not installed (pip install uwsgi: needs a C compiler and Python.h)"
    return None


def command(kind: str, port: int) -> list[str]:
    bind = f"127.0.0.1:{port}"
    if kind in ("sync", "gthread", "gevent"):
        cmd = [sys.executable, "-m", "gunicorn", "testproject.wsgi:application", "-b", bind]
        cmd += ["--keep-alive", "30", "--timeout", "60"]
        cmd += ["--graceful-timeout", "5", "--log-level", "warning"]
        if kind == "sync":
            return [*cmd, "-k", "sync", "-w", str(WORKERS * 2)]
        cmd += ["-w", str(WORKERS)]
        if kind == "gthread":
            return [*cmd, "-k", "gthread", "--threads", str(THREADS)]
        return [*cmd, "-k", "gevent", "--worker-connections", "200"]
    if kind == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", "testproject.asgi:application"),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", str(WORKERS)),
            *("--lifespan", "off", "--timeout-keep-alive", "30", "--no-access-log"),
            *("--log-level", "warning"),
        ]
    if kind == "daphne":
        # One process (daphne has no workers option); Twisted keeps idle HTTP/1.1
        # connections open far longer than a run.
        return [
            *(sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)),
            *("-v", "0", "testproject.asgi:application"),
        ]
    if kind == "uwsgi":
        binary = uwsgi_binary()
        assert binary is not None
        return [
            *(binary, "--http11-socket", bind, "--module", "testproject.wsgi:application"),
            *("--virtualenv", sys.prefix, "--chdir", str(ROOT), "--master"),
            *("--processes", str(WORKERS), "--threads", str(THREADS), "--enable-threads"),
            *("--need-app", "--die-on-term", "--disable-logging", "--socket-timeout", "30"),
        ]
    raise ValueError(f"unknown server {kind!r}: one of {', '.join(SERVERS)}")


class AppServer:
    """One application server process (its own process group) on a free port; its
    output goes to ``log``."""

    def __init__(self, kind: str, env: dict[str, str], log: Path) -> None:
        self.kind = kind
        self.env = env
        self.log = log
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> AppServer:
        """Start it (from the thread that will live longest: PR_SET_PDEATHSIG) and wait
        until a read answers HTTP 200."""
        self.port = _free_port()
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command(self.kind, self.port),
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + START_TIMEOUT
        read = PATHS.get(self.kind, DEFAULT_PATHS)[1]
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                try:
                    conn.request("GET", f"{read}?key=ready")
                    if conn.getresponse().status == 200:
                        return self
                finally:
                    conn.close()
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"{self.kind} did not answer in {START_TIMEOUT:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Graceful stop (SIGTERM; uWSGI: ``--die-on-term``), then SIGKILL of its group."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        # Workers left behind by a master that died: the group is this server's own.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(5)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"
