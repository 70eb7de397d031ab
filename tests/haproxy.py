"""A private HAProxy (the distribution's ``haproxy``) in front of private MariaDB
servers, for the topology tests (issue 14).

Why: production clusters are reached through a load balancer whose target moves
(failover) and that routes around a node that is not ready (Galera); it also closes
idle client flows on its own clock (``timeout client``), shorter than the backend's
``wait_timeout``. ``HAProxy`` runs the real binary on a free 127.0.0.1 port with a
generated ``mode tcp`` config: one frontend, one backend of N servers, fast health
checks, and the admin socket (``stats socket ... level admin``) so a test can put a
server in MAINT/DRAIN, change its weight and read the servers' states.

Health checks: ``check="mysql"`` is ``option mysql-check user haproxy_check`` (a login
and a QUIT: it says the server accepts connections, nothing about its role);
``check="tcp"`` a plain connect. A server given an ``agent`` (a :class:`HealthAgent`:
a tiny TCP agent in this process answering ``up``/``down`` from a predicate, e.g.
``wsrep_ready`` on a Galera node or ``read_only`` on a replica) also gets HAProxy's
``agent-check``: the agent's ``down`` marks it DOWN however the regular check goes.

Run ``python -m tests.haproxy PORT [PORT ...]`` for a manual experiment.
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .servers import PrivateServer, _die_with_parent, _free_port

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
BACKEND = "db"
#: Check timing: fast enough that a failover test waits a second, not ten.
CHECK_INTER = 0.25


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class HealthAgent:
    """An HAProxy agent (``agent-check``) on a free port of 127.0.0.1, served by a thread.

    Each time HAProxy connects, ``predicate()`` decides the answer: ``True`` -> ``up``,
    ``False`` -> ``down``, or a string sent as is (``"drain"``, ``"50%"``, ``"down#why"``:
    a blank is put before the ``#``, without which HAProxy 2.6 ignores the answer). A
    predicate that raises answers ``down #<the error>`` (a node that cannot say it is
    ready is not). ``answers`` counts the words sent, for the tests.
    """

    def __init__(self, predicate: Callable[[], bool | str], name: str = "agent") -> None:
        self.predicate = predicate
        self.name = name
        self.port = 0
        self.answers: dict[str, int] = {}
        self.last_answer = ""
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> HealthAgent:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, 0))
        listener.listen(16)
        listener.settimeout(0.2)  # so close() is noticed without a wake-up socket
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, name=f"agent-{self.name}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> HealthAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def answer(self) -> str:
        """What the agent says now (also what HAProxy gets on its next check)."""
        try:
            verdict = self.predicate()
        except Exception as exc:  # any failure to tell: not ready
            text = " ".join(str(exc).split())[:80].replace("#", " ")
            return f"down #{type(exc).__name__}: {text}"
        if verdict is True:
            return "up"
        if verdict is False:
            return "down"
        # HAProxy 2.6 reads "down#why" as one unknown word ("agent reports an error",
        # no state change): the description needs a blank before its '#'.
        word, sep, description = str(verdict).partition("#")
        return f"{word.strip()} #{description.strip()}" if sep else word.strip()

    def _serve(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            # One check at a time is plenty (one HAProxy, one server per agent); the
            # predicate's own timeouts bound how long a check takes.
            with conn:
                word = self.answer()
                key = word.split("#")[0].strip()
                with self._lock:
                    self.answers[key] = self.answers.get(key, 0) + 1
                    self.last_answer = word
                with contextlib.suppress(OSError):
                    conn.sendall(word.encode() + b"\n")


@dataclass
class Backend:
    """One ``server`` line: ``name`` (what the admin socket calls it), its port on
    127.0.0.1, an optional :class:`HealthAgent`, ``backup`` (used only when no active
    server is UP), ``disabled`` (starts in MAINT) and ``weight``."""

    name: str
    port: int
    agent: HealthAgent | None = None
    backup: bool = False
    disabled: bool = False
    weight: int = 1


class HAProxy(PrivateServer):
    """See the module docstring. ``port`` is the frontend's port once started;
    ``servers`` the backend's :class:`Backend` entries (names must be unique)."""

    STOP_TIMEOUT = 5.0

    def __init__(
        self,
        servers: Sequence[Backend],
        *,
        timeout_client: float = 30.0,
        timeout_server: float = 30.0,
        timeout_connect: float = 2.0,
        check: str = "mysql",
        check_user: str = "haproxy_check",
        inter: float = CHECK_INTER,
        fall: int = 1,
        rise: int = 1,
        balance: str = "roundrobin",
        shutdown_sessions_on_down: bool = False,
    ) -> None:
        super().__init__()
        if check not in ("mysql", "tcp", "none"):
            raise ValueError(f"check must be 'mysql', 'tcp' or 'none', not {check!r}")
        names = [s.name for s in servers]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"server names must be unique and not empty: {names}")
        self.servers = list(servers)
        self.timeout_client = timeout_client
        self.timeout_server = timeout_server
        self.timeout_connect = timeout_connect
        self.check = check
        self.check_user = check_user
        self.inter = inter
        self.fall = fall
        self.rise = rise
        self.balance = balance
        self.shutdown_sessions_on_down = shutdown_sessions_on_down
        self.port = 0
        self.host = HOST

    # -- lifecycle -------------------------------------------------------------

    @property
    def admin_socket(self) -> Path:
        assert self.tmpdir is not None, "not started"
        return self.tmpdir / "admin.sock"

    def start(self) -> HAProxy:
        """Start haproxy and wait until its admin socket answers and every server that
        is not disabled has had its first check (so the state a test reads is real)."""
        if self.running:
            return self
        binary = shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin:/usr/bin:/bin")
        if binary is None:
            raise RuntimeError("haproxy not found: run `make deps` (apt: haproxy)")
        if self.tmpdir is None:
            self.tmpdir = Path(tempfile.mkdtemp(prefix="dbkeepalive-haproxy-"))
        for attempt in range(3):
            self.port = _free_port()
            config = self.tmpdir / "haproxy.cfg"
            config.write_text(self.config())
            check = subprocess.run(
                [binary, "-c", "-q", "-f", str(config)], capture_output=True, text=True
            )
            if check.returncode != 0:
                raise RuntimeError(f"haproxy rejects the config:\n{check.stderr}\n{self.config()}")
            log = (self.tmpdir / "haproxy.log").open("ab")
            self.process = subprocess.Popen(
                [binary, "-db", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
            log.close()
            try:
                self._wait_ready()
                return self
            except RuntimeError:
                self.stop()
                if attempt == 2 or "Address already in use" not in self.log_tail():
                    raise
        return self

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def config(self) -> str:
        """The generated configuration (``mode tcp``)."""
        assert self.tmpdir is not None
        lines = [
            "global",
            "    maxconn 4000",
            f"    stats socket {self.admin_socket} mode 600 level admin",
            "    stats timeout 10s",
            "",
            "defaults",
            "    mode tcp",
            f"    timeout connect {_ms(self.timeout_connect)}",
            f"    timeout client {_ms(self.timeout_client)}",
            f"    timeout server {_ms(self.timeout_server)}",
            f"    timeout check {_ms(max(self.inter, 0.5))}",
            # A connect that fails goes to another server once (what users configure).
            "    retries 1",
            "    option redispatch",
            "",
            "frontend fe",
            f"    bind {HOST}:{self.port}",
            f"    default_backend {BACKEND}",
            "",
            f"backend {BACKEND}",
            f"    balance {self.balance}",
        ]
        if self.check == "mysql":
            lines.append(f"    option mysql-check user {self.check_user} post-41")
        default = f"    default-server inter {_ms(self.inter)} fall {self.fall} rise {self.rise}"
        if self.shutdown_sessions_on_down:
            default += " on-marked-down shutdown-sessions"
        lines.append(default)
        for server in self.servers:
            line = f"    server {server.name} {HOST}:{server.port} weight {server.weight}"
            if self.check != "none":
                line += " check"
            if server.agent is not None:
                line += (
                    f" agent-check agent-addr {HOST} agent-port {server.agent.port}"
                    f" agent-inter {_ms(self.inter)}"
                )
            if server.backup:
                line += " backup"
            if server.disabled:
                line += " disabled"
            lines.append(line)
        return "\n".join(lines) + "\n"

    def log_tail(self, lines: int = 30) -> str:
        if self.tmpdir is None or not (self.tmpdir / "haproxy.log").exists():
            return "(no log)"
        text = (self.tmpdir / "haproxy.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- runtime API -----------------------------------------------------------

    def command(self, line: str, timeout: float = 5.0) -> str:
        """One command on the admin socket (management.txt), its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.admin_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers: name -> the CSV row (``status``,
        ``scur`` current sessions, ``stot`` total, ``check_status``, ...)."""
        text = self.command("show stat")
        if not text.startswith("# "):
            raise RuntimeError(f"haproxy: unexpected answer to show stat: {text[:200]!r}")
        rows = csv.DictReader(io.StringIO(text[2:]))
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == BACKEND and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    def server_states(self) -> dict[str, str]:
        """Name -> ``status`` as the stats page says it: ``UP``, ``DOWN``, ``MAINT``,
        ``DRAIN``, ``no check``, or a transition such as ``UP 1/2``."""
        return {name: row["status"] for name, row in self.stats().items()}

    def states(self) -> dict[str, str]:
        """Name -> the first word of its status: ``UP``, ``DOWN``, ``MAINT``, ``DRAIN``
        (``DOWN (agent)`` -> ``DOWN``; a transition ``UP 1/2`` -> ``UP``)."""
        return {name: (status.split() or [""])[0] for name, status in self.server_states().items()}

    def server_state(self, name: str) -> str:
        return self.server_states()[name]

    def wait_server_state(self, name: str, state: str, timeout: float = 5.0) -> float:
        """Wait until server ``name``'s status is ``state`` (its first word: ``UP``,
        ``DOWN``, ``MAINT``, ``DRAIN``); returns the seconds it took. Raises
        TimeoutError with the states seen."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            status = self.server_state(name)
            if status.split()[0] == state and (state != "UP" or status == "UP"):
                return time.monotonic() - start
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"haproxy server {name} is {status!r}, not {state!r} after {timeout}s"
                    f" ({self.server_states()})"
                )
            time.sleep(0.02)

    def set_server_state(self, name: str, state: str) -> None:
        """The server's administrative state: ``ready``, ``drain`` or ``maint``."""
        if state not in ("ready", "drain", "maint"):
            raise ValueError(f"state must be ready, drain or maint, not {state!r}")
        self._expect_empty(f"set server {BACKEND}/{name} state {state}")

    def set_weight(self, name: str, weight: int) -> None:
        self._expect_empty(f"set server {BACKEND}/{name} weight {int(weight)}")

    def shutdown_sessions(self, name: str) -> None:
        """Close every flow HAProxy has open to server ``name`` (clients see a reset)."""
        self._expect_empty(f"shutdown sessions server {BACKEND}/{name}")

    def sessions(self, name: str) -> int:
        """Flows open to server ``name`` right now."""
        return int(self.stats()[name]["scur"] or 0)

    def total_sessions(self, name: str) -> int:
        """Flows ever sent to server ``name``."""
        return int(self.stats()[name]["stot"] or 0)

    # -- internals -------------------------------------------------------------

    def _expect_empty(self, line: str) -> None:
        answer = self.command(line).strip()
        if answer:
            raise RuntimeError(f"haproxy: {line!r} -> {answer!r}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"haproxy exited with {code}:\n{self.log_tail()}")
            try:
                # The admin socket answers once the frontend is bound.
                rows = self.stats()
                if self.check == "none" or all(
                    row["check_status"] not in ("", "INI") or row["status"] == "MAINT"
                    for row in rows.values()
                ):
                    return
            except (OSError, RuntimeError) as exc:
                last = exc
            time.sleep(0.02)
        raise RuntimeError(f"haproxy did not get ready within {START_TIMEOUT}s ({last})")

    def __repr__(self) -> str:
        return f"<HAProxy 127.0.0.1:{self.port} running={self.running}>"


if __name__ == "__main__":
    ports = [int(p) for p in sys.argv[1:]]
    with HAProxy([Backend(f"s{i}", p) for i, p in enumerate(ports, 1)], check="tcp") as hap:
        print(f"127.0.0.1:{hap.port}; admin socket {hap.admin_socket}", flush=True)
        print(hap.server_states(), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while hap.running:
                time.sleep(1)
