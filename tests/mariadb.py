"""A private MariaDB server for the test suite (own datadir, port and socket).

Tests need to kill, restart and reconfigure the server, so they never share one:
``MariaDBServer`` initialises a throw-away data directory, starts ``mariadbd`` on a
free port and removes everything again on ``close()``.

Set ``DBKEEPALIVE_TEST_SERVER=user:password@host:port`` to run against an existing
server instead (the user needs ALL PRIVILEGES, including SUPER/CONNECTION ADMIN for
``SET GLOBAL`` and ``KILL``). Tests that restart or crash the server are then skipped.

Run ``python tests/mariadb.py`` to get a private server for manual experiments.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pymysql  # the admin side always uses PyMySQL itself, never the MySQLdb shim

try:
    from .servers import PrivateServer, _die_with_parent, _free_port, make_certificate, system_env
except ImportError:  # run as a script: python tests/mariadb.py
    from servers import (  # type: ignore[no-redef]
        PrivateServer,
        _die_with_parent,
        _free_port,
        make_certificate,
        system_env,
    )

ENV_VAR = "DBKEEPALIVE_TEST_SERVER"
START_TIMEOUT = 30.0

# Small and fast: tests need seconds-long startups and no durability beyond a
# clean shutdown or a killed server process (the OS keeps the page cache).
SERVER_OPTIONS = (
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=8M",
    "--innodb-log-buffer-size=2M",
    "--innodb-data-file-path=ibdata1:12M:autoextend",
    "--innodb-flush-log-at-trx-commit=2",
    "--innodb-doublewrite=0",
    "--innodb-fast-shutdown=1",
    "--performance-schema=OFF",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_unicode_ci",
    "--max-connections=500",
)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _which(name: str) -> str:
    # /usr/sbin is often not on a non-root user's PATH, but mariadbd lives there.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    found = shutil.which(name, path=path)
    if found is None:
        raise RuntimeError(f"{name} not found: run `make deps` (needs MariaDB server binaries)")
    return found


def parse_server_url(value: str) -> tuple[str, str, str, int]:
    """``user:password@host:port`` -> (user, password, host, port); the password may
    hold ``@``/``:``."""
    creds, sep, hostport = value.rpartition("@")
    if not sep or not creds:
        raise ValueError(f"{ENV_VAR} must look like user:password@host:port, got {value!r}")
    user, _, password = creds.partition(":")
    host, _, port = hostport.partition(":")
    return user, password, host or "127.0.0.1", int(port or 3306)


class MariaDBServer(PrivateServer):
    """A MariaDB server the tests control; see the module docstring."""

    def __init__(self, external: str | None = None) -> None:
        if external is None:
            external = os.environ.get(ENV_VAR) or None
        super().__init__()
        self.external = external is not None
        self.socket: str | None = None
        # Bumped by restart() and crash(), so fixtures know to drop stale connections.
        self.restarts = 0
        self._initialized = False
        #: The server's self-signed certificate once set_tls(True) made one.
        self.ssl_cert: Path | None = None
        self.tls = False
        self._os_user = pwd.getpwuid(os.getuid()).pw_name
        # Connections counts our own admin connections too; we subtract them.
        self._admin_connects = 0
        if external is not None:
            self.user, self.password, self.host, self.port = parse_server_url(external)
            self.admin_user, self.root_password = self.user, self.password
            # No users are created on an external server: the reader alias shares the user.
            self.reader_user, self.reader_password = self.user, self.password
        else:
            self.user = "dbk"
            self.password = secrets.token_urlsafe(16)
            # A second, read-only user for the "reader" alias (tests of several aliases).
            self.reader_user = "dbk_reader"
            self.reader_password = secrets.token_urlsafe(16)
            self.host, self.port = "127.0.0.1", 0
            self.admin_user, self.root_password = "root", secrets.token_urlsafe(16)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the server (initialising the datadir on first use) and wait until it answers."""
        if self.external:
            self._wait_ready()
            return
        if self.running:
            return
        if not self._initialized:
            self._initialize()
            return
        self._spawn()
        self._wait_ready()

    def set_tls(self, enabled: bool) -> bool:
        """Restart the server with TLS on or off; ``False`` when it cannot be turned on
        (no ``openssl``). Off by default: PyMySQL 1.2 prefers TLS whenever the server
        offers it, and the fault proxy places its faults by counting plain packets."""
        self._need_private("set_tls()")
        if enabled and self.ssl_cert is None:
            assert self.tmpdir is not None
            self.ssl_cert = make_certificate(self.tmpdir)
            if self.ssl_cert is None:
                return False
        if enabled != self.tls:
            self.tls = enabled
            self.restart()
        return True

    def restart(self) -> None:
        """Clean shutdown and start again on the same port and datadir."""
        self._need_private("restart()")
        self.stop()
        self.restarts += 1
        self.start()

    def crash(self) -> None:
        """SIGKILL the server, as a crash or an OOM kill would; ``start_again()`` brings it back."""
        self._need_private("crash()")
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        self.restarts += 1

    def start_again(self) -> None:
        """Start after ``crash()`` or ``stop()``: same port, same data."""
        self._need_private("start_again()")
        self.start()

    @property
    def running(self) -> bool:
        return True if self.external else super().running

    # -- SQL helpers -----------------------------------------------------------

    def query(self, sql: str, args: Any = None, db: str | None = None) -> list[tuple[Any, ...]]:
        """Run one statement on a new, short-lived admin connection (autocommit)."""
        conn = self._admin_connect(db=db)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return list(cur.fetchall() or ())
        finally:
            conn.close()

    def set_global(self, name: str, value: Any) -> None:
        if not _IDENT.match(name):
            raise ValueError(f"not a variable name: {name!r}")
        self.query(f"SET GLOBAL {name} = %s", (value,))

    def get_global(self, name: str) -> Any:
        if not _IDENT.match(name):
            raise ValueError(f"not a variable name: {name!r}")
        return self.query(f"SELECT @@GLOBAL.{name}")[0][0]

    def kill(self, thread_id: int, *, gone_ok: bool = False) -> bool:
        """``KILL`` a connection; the client finds out on its next read or write.
        ``gone_ok``: a connection that ended meanwhile (1094 "Unknown thread id", a race
        with a client closing it) is no error; returns whether it was killed."""
        try:
            self.query("KILL %s", (int(thread_id),))
        except Exception as exc:
            if gone_ok and exc.args and exc.args[0] == 1094:
                return False
            raise
        return True

    def connections_total(self) -> int:
        """Connection attempts since server start, not counting this object's admin connections."""
        rows = self.query("SHOW GLOBAL STATUS LIKE 'Connections'")
        return int(rows[0][1]) - self._admin_connects

    def threads_connected(self) -> int:
        """Open client connections, not counting the admin connection asking."""
        rows = self.query("SHOW GLOBAL STATUS LIKE 'Threads_connected'")
        return int(rows[0][1]) - 1

    def processlist(self, user: str | None = None) -> list[dict[str, Any]]:
        """Client threads (dicts with lowercase keys: id, user, host, db, command, time,
        state, info)."""
        sql = (
            "SELECT ID, USER, HOST, DB, COMMAND, TIME, STATE, INFO"
            " FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()"
            " AND COMMAND <> 'Daemon'"
        )
        args: Sequence[Any] = ()
        if user is not None:
            sql += " AND USER = %s"
            args = (user,)
        keys = ("id", "user", "host", "db", "command", "time", "state", "info")
        return [dict(zip(keys, row, strict=True)) for row in self.query(sql + " ORDER BY ID", args)]

    def error_log_tail(self, lines: int = 30) -> str:
        if self.tmpdir is None or not (self.tmpdir / "error.log").exists():
            return "(no error log)"
        text = (self.tmpdir / "error.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- internals -------------------------------------------------------------

    def _need_private(self, what: str) -> None:
        if self.external:
            import pytest

            pytest.skip(f"{what} needs the private server: unset {ENV_VAR}")

    def _admin_connect(self, db: str | None = None, password: str | None = None) -> Any:
        # Private: root over the unix socket (root@localhost does not match TCP
        # from 127.0.0.1 under --skip-name-resolve). External: the given user over TCP.
        kwargs: dict[str, Any] = {
            "user": self.admin_user,
            "password": self.root_password if password is None else password,
            "database": db,
            "autocommit": True,
            "connect_timeout": 5,
            "read_timeout": 60,
            "write_timeout": 60,
            "charset": "utf8mb4",
        }
        if self.socket is not None:
            kwargs["unix_socket"] = self.socket
        else:
            kwargs.update(host=self.host, port=self.port)
        conn = pymysql.connect(**kwargs)
        self._admin_connects += 1
        return conn

    def _initialize(self) -> None:
        self.tmpdir = Path(tempfile.mkdtemp(prefix="dbkeepalive-mariadb-"))
        self.socket = str(self.tmpdir / "mysqld.sock")
        # Temporary tables in a directory of its own: two servers bootstrapping at once
        # in /tmp (make test runs both drivers' sessions together) were seen to fail
        # with "Could not remove temporary table ... Unknown table 'mysql.tmp_proxies_priv'".
        (self.tmpdir / "tmp").mkdir()
        install = [
            _which("mariadb-install-db"),
            "--no-defaults",
            f"--datadir={self.tmpdir / 'data'}",
            f"--tmpdir={self.tmpdir / 'tmp'}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            f"--user={self._os_user}",
            *SERVER_OPTIONS,
        ]
        res = subprocess.run(install, check=False, capture_output=True, text=True, env=system_env())
        if res.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{res.stdout}\n{res.stderr}")
        # The port is only free until someone else binds it: retry with a new one.
        for attempt in range(3):
            self.port = _free_port()
            self._spawn()
            try:
                self._wait_ready(password="")
                break
            except RuntimeError:
                if attempt == 2 or "Address already in use" not in self.error_log_tail():
                    raise
                self.stop()
        self._initialized = True
        self._admin_connects = 0
        self._create_users()

    def _create_users(self) -> None:
        conn = self._admin_connect(password="")
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "ALTER USER 'root'@'localhost' IDENTIFIED BY %s",
                    (self.root_password,),
                )
                for host in ("%", "localhost"):
                    cur.execute(
                        "CREATE USER %s@%s IDENTIFIED BY %s",
                        (self.user, host, self.password),
                    )
                    cur.execute("GRANT ALL PRIVILEGES ON *.* TO %s@%s", (self.user, host))
                    cur.execute(
                        "CREATE USER %s@%s IDENTIFIED BY %s",
                        (self.reader_user, host, self.reader_password),
                    )
                    cur.execute("GRANT SELECT ON *.* TO %s@%s", (self.reader_user, host))
                # The database testproject's settings name by default (tests use test_dbkeepalive).
                cur.execute("CREATE DATABASE IF NOT EXISTS dbkeepalive")
        finally:
            conn.close()

    def extra_options(self) -> list[str]:
        """Options appended to the server's command line (subclasses: replication,
        Galera). ``--skip-log-bin`` is left out when they turn the binary log on."""
        return []

    def _spawn(self) -> None:
        assert self.tmpdir is not None
        extra = self.extra_options()
        cmd = [
            _which("mariadbd"),
            "--no-defaults",  # never read /etc/mysql: the system server's config is not ours
            f"--datadir={self.tmpdir / 'data'}",
            f"--tmpdir={self.tmpdir / 'tmp'}",
            f"--port={self.port}",
            f"--socket={self.socket}",
            f"--pid-file={self.tmpdir / 'mysqld.pid'}",
            "--bind-address=127.0.0.1",
            f"--user={self._os_user}",  # mariadbd refuses to run as root without --user=root
            "--skip-name-resolve",
            f"--log-error={self.tmpdir / 'error.log'}",
            *SERVER_OPTIONS,
        ]
        if not any(option.startswith("--log-bin") for option in extra):
            cmd.append("--skip-log-bin")
        cmd += extra
        if self.tls and self.ssl_cert is not None:
            cmd += [f"--ssl-cert={self.ssl_cert}", f"--ssl-key={self.ssl_cert.with_suffix('.key')}"]
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in pytest must not kill it before teardown
            env=system_env(),
            # Only a prctl() call, safe enough between fork and exec.
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def _wait_ready(self, password: str | None = None) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.external and (self.process is None or self.process.poll() is not None):
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"mariadbd exited with {code}:\n{self.error_log_tail()}")
            try:
                self._admin_connect(password=password).close()
                return
            # Not pymysql.err.OperationalError: after install_as_MySQLdb() Django's
            # `from MySQLdb.converters import ...` re-imports pymysql.err as MySQLdb.err
            # and rebinds the pymysql.err attribute to that copy, whose classes
            # PyMySQL never raises. The top-level names stay the real ones.
            except pymysql.OperationalError as exc:
                if exc.args and exc.args[0] == 1045:  # access denied: waiting won't help
                    raise
                last = exc
                time.sleep(0.05)
        where = "external server" if self.external else f"mariadbd on port {self.port}"
        raise RuntimeError(
            f"{where} did not answer within {START_TIMEOUT:.0f}s ({last}):\n{self.error_log_tail()}"
        )

    def __repr__(self) -> str:
        kind = "external" if self.external else "private"
        return f"<MariaDBServer {kind} {self.host}:{self.port} running={self.running}>"


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    # Background jobs start with SIGINT ignored; kill/Ctrl-C must both clean up.
    signal.signal(signal.SIGINT, _exit_on_signal)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    srv = MariaDBServer()
    try:
        srv.start()
        print(
            f"export DBK_DB_HOST={srv.host} DBK_DB_PORT={srv.port} "
            f"DBK_DB_USER={srv.user} DBK_DB_PASSWORD={srv.password}"
        )
        print(f"# root password {srv.root_password}, socket {srv.socket}")
        print("# Ctrl-C or kill stops it", flush=True)
        signal.pause()
    finally:
        srv.close()
