"""A private PostgreSQL server for the test suite (own data directory, port and socket).

Like :mod:`tests.mariadb`: tests terminate backends, restart the server and change its
settings, so they never share one. ``PostgresServer`` runs ``initdb`` in a throw-away
directory, starts ``postgres`` on a free port of 127.0.0.1 and removes everything again
on ``close()``. Authentication is ``trust`` (the superuser ``postgres``, no password):
the server listens on 127.0.0.1 and a socket in its private directory only.

PostgreSQL refuses to run as root: under root the server runs as the ``postgres`` system
user (created by the Debian package), else as a system user ``dbk_pg`` made on first use.

The admin side (``query()`` and the helpers built on it) uses psycopg 3, or psycopg2
when psycopg is blocked (``DBK_PG_DRIVER=psycopg2``: ``sys.modules["psycopg"] = None``,
see ``tests/conftest.py``) or not installed; always its own short-lived connection.

Run ``python tests/postgres.py`` to get a private server for manual experiments.
"""

from __future__ import annotations

import contextlib
import glob
import grp
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from .servers import PrivateServer, _die_with_parent, _free_port, make_certificate
except ImportError:  # run as a script: python tests/postgres.py
    from servers import (  # type: ignore[no-redef]
        PrivateServer,
        _die_with_parent,
        _free_port,
        make_certificate,
    )

START_TIMEOUT = 30.0
TERMINATE_TIMEOUT = 10.0
# Our own admin connections carry this application_name; backends() leaves them out.
ADMIN_APPLICATION_NAME = "dbk_pg_admin"
# The system user the server runs as when the tests run as root and there is no postgres user.
FALLBACK_USER = "dbk_pg"
DRIVER_ENV = "DBK_PG_DRIVER"
DRIVERS = ("psycopg", "psycopg2")
INSTALL_HINT = "install postgresql: run `make deps` as root or `sudo apt-get install -y postgresql`"

# Small and fast: no durability beyond a clean shutdown. Settings given here on the
# command line beat postgresql.auto.conf, so set_system() cannot change these.
SERVER_SETTINGS = (
    "listen_addresses=127.0.0.1",
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=200",
    "log_connections=on",
)

_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries (or both Python drivers) are not installed."""


def requested_driver() -> str:
    """``DBK_PG_DRIVER`` (``psycopg``, the default, or ``psycopg2``)."""
    name = os.environ.get(DRIVER_ENV) or "psycopg"
    if name not in DRIVERS:
        raise ValueError(f"{DRIVER_ENV} must be 'psycopg' or 'psycopg2', not {name!r}")
    return name


def _admin_driver() -> Any:
    """The driver module for admin connections: psycopg unless it is blocked, unwanted
    or missing, then psycopg2."""
    psycopg3_ok = sys.modules.get("psycopg", False) is not None  # None: blocked
    order = ["psycopg", "psycopg2"] if psycopg3_ok else ["psycopg2"]
    if requested_driver() == "psycopg2":
        order = ["psycopg2"]
    for name in order:
        try:
            return __import__(name)
        except ImportError:
            continue
    raise PostgresUnavailable(
        f"no PostgreSQL driver ({' or '.join(order)}) importable:"
        " run `.venv/bin/pip install -e '.[test]'`"
    )


def find_binaries() -> tuple[str, str]:
    """``(initdb, postgres)``: from PATH, else the highest ``/usr/lib/postgresql/*/bin``."""
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres:
        return initdb, postgres

    def version(bindir: str) -> tuple[int, ...]:
        name = Path(bindir).parent.name
        return tuple(int(part) for part in re.findall(r"\d+", name)) or (0,)

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        initdb, postgres = os.path.join(bindir, "initdb"), os.path.join(bindir, "postgres")
        if os.access(initdb, os.X_OK) and os.access(postgres, os.X_OK):
            return initdb, postgres
    raise PostgresUnavailable(
        f"PostgreSQL server binaries (initdb, postgres) not found on PATH nor in"
        f" /usr/lib/postgresql/*/bin: {INSTALL_HINT}"
    )


def _server_account() -> pwd.struct_passwd | None:
    """The account to run the server as: None (ourselves) unless we are root."""
    if os.getuid() != 0:
        return None
    for name in ("postgres", FALLBACK_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    res = subprocess.run(
        ["useradd", "--system", "--no-create-home", FALLBACK_USER],
        check=False,
        capture_output=True,
        text=True,
    )
    try:  # exit code 9: another session created it just now
        return pwd.getpwnam(FALLBACK_USER)
    except KeyError:
        raise RuntimeError(
            f"PostgreSQL refuses to run as root and there is no postgres user; creating"
            f" {FALLBACK_USER} failed (exit {res.returncode}): {res.stderr.strip()}"
        ) from None


def _traversable(path: Path, account: pwd.struct_passwd) -> bool:
    """Whether ``account`` can reach ``path`` (execute permission on it and its parents)."""
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if account.pw_name in g.gr_mem}
    for part in [path, *path.parents]:
        st = part.stat()
        if st.st_uid == account.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


class PostgresServer(PrivateServer):
    """A PostgreSQL server the tests control; see the module docstring."""

    STOP_SIGNAL = signal.SIGINT  # fast shutdown

    def __init__(self) -> None:
        super().__init__()
        self.host = "127.0.0.1"
        self.port = 0
        self.user = "postgres"
        self.password = ""  # trust authentication
        # Bumped by restart(), so fixtures know to drop stale connections.
        self.restarts = 0
        self.startup_seconds = 0.0  # of the last start (initdb not included)
        self.initdb_seconds = 0.0
        self._binaries: tuple[str, str] | None = None
        self._account: pwd.struct_passwd | None = None
        self._initialized = False
        self.ssl = False  # TLS available (sslmode=require works)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the server (running initdb on first use) and wait until it answers."""
        if self.running:
            return
        if not self._initialized:
            self._initialize()
            return
        self._spawn()
        self._wait_ready()

    def restart(self) -> None:
        """Fast shutdown and start again on the same port and data directory."""
        self.stop()
        self.restarts += 1
        self.start()

    def _removed(self) -> None:
        self._initialized = False

    @property
    def socket_dir(self) -> str | None:
        return None if self.tmpdir is None else str(self.tmpdir)

    # -- SQL helpers -----------------------------------------------------------

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> Any:
        """A new admin connection (autocommit), psycopg's or psycopg2's; caller closes it."""
        driver = _admin_driver()
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": dbname,
            "connect_timeout": 5,
            "application_name": ADMIN_APPLICATION_NAME,
            **kwargs,
        }
        if driver.__name__ == "psycopg":
            return driver.connect(autocommit=True, **params)
        conn = driver.connect(**params)
        conn.autocommit = True
        return conn

    def query(self, sql: str, args: Any = None, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement on a new, short-lived admin connection (autocommit)."""
        conn = self.connect(dbname)
        try:
            cur = conn.cursor()
            try:
                cur.execute(sql, args)
                if cur.description is None:  # no result set (ALTER, SET, ...)
                    return []
                return [tuple(row) for row in cur.fetchall()]
            finally:
                cur.close()
        finally:
            conn.close()

    def backends(self, application_name: str | None = None) -> list[int]:
        """Pids of the client backends (not our admin connections), optionally of one
        ``application_name``."""
        sql = (
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND pid <> pg_backend_pid() AND application_name <> %s"
        )
        args: list[Any] = [ADMIN_APPLICATION_NAME]
        if application_name is not None:
            sql += " AND application_name = %s"
            args.append(application_name)
        return [row[0] for row in self.query(sql + " ORDER BY pid", args)]

    def terminate(self, pid: int) -> bool:
        """``pg_terminate_backend(pid)`` and wait until that backend is gone from
        pg_stat_activity; returns what pg_terminate_backend returned."""
        [(sent,)] = self.query("SELECT pg_terminate_backend(%s)", (int(pid),))
        deadline = time.monotonic() + TERMINATE_TIMEOUT
        while self.query("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (int(pid),)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"backend {pid} still there {TERMINATE_TIMEOUT:.0f}s after")
            time.sleep(0.01)
        return bool(sent)

    def set_system(self, name: str, value: Any) -> None:
        """``ALTER SYSTEM SET name = value`` and reload; returns once new connections get it.

        Running sessions pick it up too, at their next command. Settings passed on the
        server's command line (SERVER_SETTINGS) cannot be changed this way.
        """
        self._alter_system(f"ALTER SYSTEM SET {self._setting(name)} = {_literal(value)}")

    def reset_system(self, name: str) -> None:
        """``ALTER SYSTEM RESET name`` and reload (undoes ``set_system``)."""
        self._alter_system(f"ALTER SYSTEM RESET {self._setting(name)}")

    def show(self, name: str) -> str:
        """``SHOW name`` on a new connection."""
        return str(self.query(f"SHOW {self._setting(name)}")[0][0])

    def log_tail(self, lines: int = 30) -> str:
        if self.tmpdir is None or not (self.tmpdir / "postgres.log").exists():
            return "(no server log)"
        text = (self.tmpdir / "postgres.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- internals -------------------------------------------------------------

    @staticmethod
    def _setting(name: str) -> str:
        if not _SETTING_NAME.match(name):
            raise ValueError(f"not a setting name: {name!r}")
        return name

    def _alter_system(self, statement: str) -> None:
        # Reloading is asynchronous: wait until a new backend (forked by the postmaster
        # after it re-read the files) reports a newer configuration load time.
        [(before,)] = self.query("SELECT pg_conf_load_time()")
        self.query(statement)
        self.query("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while self.query("SELECT pg_conf_load_time()")[0][0] <= before:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server did not reload its configuration:\n{self.log_tail()}"
                )
            time.sleep(0.01)

    def _initialize(self) -> None:
        self._binaries = find_binaries()
        _admin_driver()  # fail before initdb when there is no driver
        self._account = _server_account()
        base = Path(tempfile.gettempdir())
        if self._account is not None and not _traversable(base, self._account):
            base = Path("/tmp")  # 1777 on every Linux
            if not _traversable(base, self._account):
                raise RuntimeError(
                    f"{self._account.pw_name} cannot reach {base}: set TMPDIR to a"
                    " directory every user can traverse"
                )
        self.tmpdir = Path(tempfile.mkdtemp(prefix="dbkeepalive-pg-", dir=base))
        if self._account is not None:
            os.chown(self.tmpdir, self._account.pw_uid, self._account.pw_gid)
        started = time.monotonic()
        self._run_tool(self._create_data_command())
        self.initdb_seconds = time.monotonic() - started
        self._make_certificate()
        # The port is only free until someone else binds it: retry with a new one.
        for attempt in range(3):
            self.port = _free_port()
            self._spawn()
            try:
                self._wait_ready()
                break
            except RuntimeError:
                if attempt == 2 or "Address already in use" not in self.log_tail():
                    raise
                self.stop()
        self._initialized = True

    def _create_data_command(self) -> list[str]:
        assert self.tmpdir is not None and self._binaries is not None
        return [
            self._binaries[0],
            "-D",
            str(self.tmpdir / "data"),
            "-U",
            self.user,
            "--auth=trust",  # initdb's pg_hba.conf then trusts local replication too
            "-E",
            "UTF8",
            "--locale=C",  # whatever the environment's locale: English messages, no surprises
            "--no-sync",
        ]

    def _run_tool(self, command: list[str]) -> None:
        """Run a PostgreSQL tool as the server's account; raise with its output."""
        res = subprocess.run(
            command,
            check=False,
            capture_output=True,
            text=True,
            cwd=self.tmpdir,  # our cwd may be unreadable to the server's user
            env=self._env(),
            **self._as_account(),
        )
        if res.returncode != 0:
            name = Path(command[0]).name
            raise RuntimeError(
                f"{name} failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}"
            )

    def _make_certificate(self) -> None:
        """TLS for the tests that ask for it (``sslmode=require``; ``pg_alias`` uses
        ``sslmode=disable``)."""
        assert self.tmpdir is not None
        self.ssl = make_certificate(self.tmpdir / "data", self._account) is not None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", HOME=str(self.tmpdir))
        return env

    def _as_account(self) -> dict[str, Any]:
        if self._account is None:
            return {}
        return {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}

    def _spawn(self) -> None:
        assert self.tmpdir is not None and self._binaries is not None
        cmd = [self._binaries[1], "-D", str(self.tmpdir / "data"), "-p", str(self.port)]
        cmd += ["-k", str(self.tmpdir)]
        for setting in SERVER_SETTINGS:
            cmd += ["-c", setting]
        if self.ssl:
            cmd += ["-c", "ssl=on"]  # server.crt and server.key in the data directory
        with open(self.tmpdir / "postgres.log", "ab") as log:
            self.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.tmpdir,
                env=self._env(),
                start_new_session=True,  # Ctrl-C in pytest must not kill it before teardown
                # Only a prctl() call, safe enough between fork and exec. Popen applies
                # user=/group= before it (a change of uid clears the setting), and Linux
                # signals when the *thread* that started the server exits: start it
                # from the main thread.
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                **self._as_account(),
            )

    def _wait_ready(self) -> None:
        started = time.monotonic()
        deadline = started + START_TIMEOUT
        driver = _admin_driver()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"postgres exited with {code}:\n{self.log_tail()}")
            try:
                self.connect().close()
                self.startup_seconds = time.monotonic() - started
                return
            except (
                driver.OperationalError
            ) as exc:  # refused, or "the database system is starting up"
                last = exc
                time.sleep(0.05)
        raise RuntimeError(
            f"postgres on port {self.port} did not answer within {START_TIMEOUT:.0f}s"
            f" ({last}):\n{self.log_tail()}"
        )

    def __repr__(self) -> str:
        return f"<PostgresServer {self.host}:{self.port} running={self.running}>"


class PostgresStandby(PostgresServer):
    """A hot standby of ``primary`` on its own port and data directory: a copy taken
    with ``pg_basebackup -R``, then streaming replication from the primary. Read-only
    (writes fail with SQLSTATE 25006) until :meth:`promote`."""

    def __init__(self, primary: PostgresServer) -> None:
        super().__init__()
        self.primary = primary

    def _create_data_command(self) -> list[str]:
        assert self.tmpdir is not None and self._binaries is not None
        # Beside the real initdb (PATH may hold only links to initdb and postgres).
        basebackup = str(Path(os.path.realpath(self._binaries[0])).with_name("pg_basebackup"))
        return [
            basebackup,
            "-h",
            self.primary.host,
            "-p",
            str(self.primary.port),
            "-U",
            self.primary.user,
            "-D",
            str(self.tmpdir / "data"),
            "-R",  # standby.signal and primary_conninfo
            "-X",
            "stream",
            "--no-sync",
        ]

    def _make_certificate(self) -> None:
        self.ssl = False  # the copy's certificate is the primary's: not needed here

    def in_recovery(self) -> bool:
        return bool(self.query("SELECT pg_is_in_recovery()")[0][0])

    def wait_replayed(self, timeout: float = 10.0) -> None:
        """Wait until this standby has replayed everything the primary wrote so far."""
        [(target,)] = self.primary.query("SELECT pg_current_wal_lsn()::text")
        deadline = time.monotonic() + timeout
        sql = "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn"
        while not self.query(sql, (target,))[0][0]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the standby did not replay {target} in {timeout:.0f}s")
            time.sleep(0.02)

    def promote(self) -> None:
        """``pg_promote()``: the standby becomes a primary (waits until it is)."""
        self.query("SELECT pg_promote(true, 10)")


def _literal(value: Any) -> str:
    """A SQL literal for ALTER SYSTEM (which takes no bind parameters)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    # Background jobs start with SIGINT ignored; kill/Ctrl-C must both clean up.
    signal.signal(signal.SIGINT, _exit_on_signal)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    srv = PostgresServer()
    try:
        srv.start()
        print(f"psql -h {srv.host} -p {srv.port} -U {srv.user} postgres")
        print(f"# socket dir {srv.socket_dir}, log {srv.tmpdir}/postgres.log")
        print(f"# initdb {srv.initdb_seconds:.2f}s, startup {srv.startup_seconds:.2f}s")
        print("# Ctrl-C or kill stops it", flush=True)
        signal.pause()
    finally:
        srv.close()
