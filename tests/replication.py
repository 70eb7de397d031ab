"""Two private MariaDB servers with real GTID replication (primary -> replica), and a
failover done the way operators do it, for the topology tests (issue 14).

Why it exists: a connection can be alive and still point at the wrong node. After a
failover the old primary is ``read_only`` and keeps every persistent connection open; the
application user (no ``SUPER``/``READ_ONLY ADMIN``, as in production) gets 1290 on each
write there, while the endpoint (the fault proxy, or HAProxy) already sends new
connections to the promoted replica.

- :class:`MariaDBNode` is :class:`~tests.mariadb.MariaDBServer` with extra ``mariadbd``
  options (binary log, ``server_id``, wsrep ...), always private, plus the application
  user and database every topology test shares;
- :class:`ReplicatedPair` starts two of them, replicates, and fails over.

Run ``python -m tests.replication`` to time a start and a failover.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pymysql

from .mariadb import ENV_VAR, MariaDBServer
from .proxy import FaultProxy

APP_DATABASE = "app"
APP_USER = "app"
#: What an application needs on its own database, and nothing global: no SUPER, no
#: READ_ONLY ADMIN (MariaDB 10.11: only READ_ONLY ADMIN, which ALL PRIVILEGES ON *.*
#: includes, lets a user write while read_only=1), no CONNECTION ADMIN.
APP_PRIVILEGES = (
    "SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, INDEX, ALTER, REFERENCES,"
    " CREATE TEMPORARY TABLES, LOCK TABLES"
)
#: The user HAProxy's ``option mysql-check`` logs in as: no password, no privilege.
CHECK_USER = "haproxy_check"
REPL_USER = "repl"
#: How long failover() and wait_caught_up() wait for the replica.
CATCH_UP_TIMEOUT = 30.0


@contextlib.contextmanager
def _private_only() -> Iterator[None]:
    """MariaDBServer() turns external when DBKEEPALIVE_TEST_SERVER is set; a topology is
    always private (it needs several servers it can reconfigure and stop)."""
    saved = os.environ.pop(ENV_VAR, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[ENV_VAR] = saved


class MariaDBNode(MariaDBServer):
    """A private :class:`MariaDBServer` started with ``options`` appended to its command
    line (``--skip-log-bin`` is left out when they turn the binary log on).

    ``app_password`` (shared by every node of a topology, so a connection that lands on
    any of them logs in) is the password of :data:`APP_USER`; ``setup_app()`` creates that
    user, its database and :data:`CHECK_USER`.
    """

    def __init__(
        self,
        options: Sequence[str] = (),
        *,
        name: str = "node",
        app_password: str | None = None,
    ) -> None:
        with _private_only():
            super().__init__()
        self.name = name
        self.options = list(options)
        self.app_user = APP_USER
        self.app_password = app_password or secrets.token_urlsafe(16)
        self.app_database = APP_DATABASE

    # -- connections -------------------------------------------------------------

    def connect(self, driver: str = "pymysql", **kwargs: Any) -> Any:
        """A new TCP connection as the application user to the application database
        (autocommit), with ``driver`` ``"pymysql"`` or ``"mysqlclient"``."""
        return connect_app(self.host, self.port, self.app_password, driver=driver, **kwargs)

    def admin(self) -> Any:
        """A new root connection over the unix socket (the caller closes it)."""
        return self._admin_connect()

    def quick_query(self, sql: str, timeout: float = 1.0) -> list[tuple[Any, ...]]:
        """One statement as root over the unix socket with short timeouts: for health
        checks, which must answer "down" rather than hang on a stuck server."""
        conn = pymysql.connect(
            unix_socket=self.socket,
            user=self.admin_user,
            password=self.root_password,
            connect_timeout=timeout,
            read_timeout=timeout,
            write_timeout=timeout,
            autocommit=True,
        )
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return list(cur.fetchall() or ())
        finally:
            conn.close()

    def status(self, name: str) -> str | None:
        """``SHOW GLOBAL STATUS LIKE name`` (None when the server has no such variable)."""
        rows = self.query("SHOW GLOBAL STATUS LIKE %s", (name,))
        return str(rows[0][1]) if rows else None

    # -- setup -------------------------------------------------------------------

    def setup_app(self, *, log: bool = True) -> None:
        """Create the application database, :data:`APP_USER` (``APP_PRIVILEGES`` on it
        only) and :data:`CHECK_USER`; ``log=False`` keeps it out of the binary log (each
        node creates its own, and no GTID of it is ever replicated)."""
        conn = self._admin_connect()
        try:
            with conn.cursor() as cur:
                if not log:
                    cur.execute("SET SESSION sql_log_bin = 0")
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{self.app_database}`")
                for host in ("%", "localhost"):
                    cur.execute(
                        "CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s",
                        (self.app_user, host, self.app_password),
                    )
                    cur.execute(
                        f"GRANT {APP_PRIVILEGES} ON `{self.app_database}`.* TO %s@%s",
                        (self.app_user, host),
                    )
                    cur.execute("CREATE USER IF NOT EXISTS %s@%s", (CHECK_USER, host))
        finally:
            conn.close()

    # -- internals -------------------------------------------------------------

    def extra_options(self) -> list[str]:
        return list(self.options)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} 127.0.0.1:{self.port} running={self.running}>"


def connect_app(
    host: str, port: int, password: str, *, driver: str = "pymysql", **kwargs: Any
) -> Any:
    """A new autocommit connection as :data:`APP_USER` to :data:`APP_DATABASE`, through
    ``driver`` (``"pymysql"`` or ``"mysqlclient"``: the real MySQLdb, never PyMySQL's
    shim, so an error seen here is what that driver raises)."""
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "user": APP_USER,
        "password": password,
        "database": APP_DATABASE,
        "connect_timeout": 5,
        "charset": "utf8mb4",
    }
    options.update(kwargs)
    if driver == "pymysql":
        options.setdefault("read_timeout", 30)
        options.setdefault("write_timeout", 30)
        conn = pymysql.connect(**options)
    elif driver == "mysqlclient":
        mysqldb = real_mysqldb()
        options["passwd"] = options.pop("password")
        options["db"] = options.pop("database")
        conn = mysqldb.connect(**options)
    else:
        raise ValueError(f"driver must be 'pymysql' or 'mysqlclient', not {driver!r}")
    conn.autocommit(True)
    return conn


def real_mysqldb() -> Any:
    """mysqlclient's ``MySQLdb``; raises ImportError when PyMySQL's
    ``install_as_MySQLdb()`` stands in for it (DBK_DRIVER=pymysql)."""
    import MySQLdb

    if getattr(MySQLdb, "__name__", "") != "MySQLdb" or not hasattr(MySQLdb, "_mysql"):
        raise ImportError("MySQLdb is PyMySQL's shim here, not mysqlclient")
    return MySQLdb


def error_of(exc: BaseException) -> tuple[int, str]:
    """(code, message) of a driver error (both drivers put them in ``args``)."""
    args = getattr(exc, "args", ())
    if len(args) >= 2 and isinstance(args[0], int):
        return int(args[0]), str(args[1])
    return -1, repr(exc)


def run_sql(conn: Any, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of either driver; its rows."""
    cur = conn.cursor()
    try:
        cur.execute(sql, args)
        return list(cur.fetchall() or ())
    finally:
        cur.close()


def try_sql(conn: Any, sql: str, args: Any = None) -> tuple[int, str] | None:
    """Run one statement; ``None`` when it worked, else the error's (code, message)."""
    try:
        run_sql(conn, sql, args)
    except Exception as exc:  # both drivers' errors: code and message are what we want
        return error_of(exc)
    return None


class ReplicatedPair:
    """A primary and a replica (private :class:`MariaDBNode`) with GTID replication, an
    endpoint in front, and :meth:`failover` done the way operators do it.

    ``same_server_id``: both servers run with ``server_id = 1`` (what most installations
    leave it at). MariaDB's replica then refuses the primary's events ("master and slave
    have equal MariaDB server ids") unless it runs with ``--replicate-same-server-id``,
    which cannot be combined with ``--log-slave-updates`` (mariadbd aborts at start): so
    both nodes get ``--replicate-same-server-id`` and no ``log_slave_updates``, and
    :meth:`rejoin` is not available. Otherwise server ids are 1 and 2 and both log the
    replicated events, as a replica that may be promoted should.

    ``endpoint``: ``"proxy"`` (a :class:`~tests.proxy.FaultProxy`: new flows go to the
    primary, open flows stay where they are), ``"haproxy"`` (an
    :class:`~tests.haproxy.HAProxy` with both servers), ``"both"`` or ``"none"``.
    ``haproxy_follow``: ``"admin"`` (failover puts the old primary in MAINT and the new one
    READY through the admin socket) or ``"agent"`` (a :class:`~tests.haproxy.HealthAgent`
    per server says ``up`` only while ``read_only`` is 0: HAProxy follows the promotion by
    itself, and between the demotion and the promotion no server is UP).
    ``haproxy_options`` go to :class:`~tests.haproxy.HAProxy` (``timeout_client`` ...).

    The application connects as :data:`APP_USER` (``app_password``, the same on both) to
    ``host``/``port`` (the endpoint: the proxy when there is one, else HAProxy, else the
    primary itself).
    """

    def __init__(
        self,
        *,
        same_server_id: bool = False,
        endpoint: str = "proxy",
        haproxy_follow: str = "admin",
        haproxy_options: dict[str, Any] | None = None,
    ) -> None:
        if endpoint not in ("proxy", "haproxy", "both", "none"):
            raise ValueError(f"endpoint must be proxy, haproxy, both or none, not {endpoint!r}")
        if haproxy_follow not in ("admin", "agent"):
            raise ValueError(f"haproxy_follow must be admin or agent, not {haproxy_follow!r}")
        self.same_server_id = same_server_id
        self.endpoint = endpoint
        self.haproxy_follow = haproxy_follow
        self.haproxy_options = dict(haproxy_options or {})
        self.app_password = secrets.token_urlsafe(16)
        self.repl_password = secrets.token_urlsafe(16)
        self.nodes = [
            MariaDBNode(self._options(i), name=f"db{i}", app_password=self.app_password)
            for i in (1, 2)
        ]
        self.primary, self.replica = self.nodes
        self.proxy: FaultProxy | None = None
        self.haproxy: Any = None  # tests.haproxy.HAProxy (imported lazily: optional)
        self.agents: list[Any] = []
        self.failovers = 0
        #: Seconds the last start() and failover() took.
        self.start_seconds = 0.0
        self.failover_seconds = 0.0

    def _options(self, server_id: int) -> list[str]:
        options = [
            "--log-bin=mysql-bin",
            "--relay-log=relay-bin",
            "--binlog-format=ROW",
            f"--server-id={1 if self.same_server_id else server_id}",
            "--gtid-strict-mode=1",
            "--master-retry-count=0",  # a replica keeps trying (every MASTER_CONNECT_RETRY)
        ]
        if self.same_server_id:
            options.append("--replicate-same-server-id")
        else:
            options.append("--log-slave-updates=ON")
        return options

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> ReplicatedPair:
        """Both servers, replication, the application database and users (created on
        the primary and replicated), the replica ``read_only``, then the endpoint.
        Everything is closed again if any step fails (``with`` runs no __exit__ then)."""
        begin = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - begin
        return self

    def _start(self) -> None:
        for node in self.nodes:
            # Bootstrapped without the binary log (MariaDBServer's users stay out of
            # it), then restarted with it: both start from an empty GTID state, so the
            # replica replays only what follows. (RESET MASTER instead: 0.9 s each.)
            options, node.options = node.options, []
            node.start()
            node.options = options
            node.restart()
        primary, replica = self.primary, self.replica
        for host in ("%", "localhost"):
            primary.query(
                "CREATE USER %s@%s IDENTIFIED BY %s", (REPL_USER, host, self.repl_password)
            )
            primary.query("GRANT REPLICATION SLAVE ON *.* TO %s@%s", (REPL_USER, host))
        replica.query("SET GLOBAL gtid_slave_pos = ''")
        self._replicate(replica, primary)
        primary.setup_app()
        replica.set_global("read_only", 1)
        self.wait_caught_up()
        if self.endpoint in ("proxy", "both"):
            self.proxy = FaultProxy(primary.port).start()
        if self.endpoint in ("haproxy", "both"):
            self._start_haproxy()

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None
        if self.haproxy is not None:
            self.haproxy.close()
            self.haproxy = None
        for agent in self.agents:
            agent.close()
        self.agents = []
        for node in self.nodes:
            node.close()

    def __enter__(self) -> ReplicatedPair:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- endpoint --------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        """Where the application connects: the proxy, else HAProxy, else the primary."""
        if self.proxy is not None:
            return self.proxy.port
        if self.haproxy is not None:
            return int(self.haproxy.port)
        return self.primary.port

    def connect(self, driver: str = "pymysql", **kwargs: Any) -> Any:
        """A new application connection through the endpoint."""
        return connect_app(self.host, self.port, self.app_password, driver=driver, **kwargs)

    def node_on_port(self, port: int) -> MariaDBNode:
        """The node whose ``@@port`` this is (what a connection reports it reached)."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    # -- replication -----------------------------------------------------------

    def wait_caught_up(self, timeout: float = CATCH_UP_TIMEOUT) -> float:
        """Wait until the replica has applied everything the primary has binlogged
        (``MASTER_GTID_WAIT``); returns the seconds it took."""
        start = time.monotonic()
        position = self.primary.get_global("gtid_binlog_pos")
        result = self.replica.query("SELECT MASTER_GTID_WAIT(%s, %s)", (position, timeout))
        if result[0][0] != 0:
            raise TimeoutError(
                f"{self.replica.name} did not reach GTID {position} within {timeout}s:"
                f" {self.replica_status()}"
            )
        return time.monotonic() - start

    def replica_status(self) -> dict[str, Any]:
        """``SHOW SLAVE STATUS`` of the replica (empty once it was promoted)."""
        conn = self.replica.admin()
        try:
            with conn.cursor(pymysql.cursors.DictCursor) as cur:
                cur.execute("SHOW SLAVE STATUS")
                row = cur.fetchone()
            return dict(row or {})
        finally:
            conn.close()

    def failover(self, *, kill_sessions: bool = False, timeout: float = CATCH_UP_TIMEOUT) -> float:
        """Promote the replica, as operators (and Orchestrator/MHA) do; returns the
        seconds it took. Roles swap: ``primary`` is the promoted node afterwards.

        1. the old primary ``SET GLOBAL read_only = 1`` (its application sessions stay
           open unless ``kill_sessions``: the point is that persistent connections stay
           on the demoted node and get 1290 for their writes);
        2. the replica applies everything up to the old primary's GTID position;
        3. ``STOP SLAVE``, ``RESET SLAVE ALL``, ``SET GLOBAL read_only = 0`` on it;
        4. the endpoint moves: the proxy sends new flows to it (open flows stay), HAProxy
           puts the old primary in MAINT and the new one READY (or, with agents, sees the
           change by itself), and this waits until HAProxy routes to the new one.
        """
        begin = time.monotonic()
        old, new = self.primary, self.replica
        old.set_global("read_only", 1)
        if kill_sessions:
            for session in old.processlist(user=APP_USER):
                with contextlib.suppress(pymysql.MySQLError):
                    old.kill(session["id"])  # it may have ended meanwhile
        self.wait_caught_up(timeout)
        new.query("STOP SLAVE")
        new.query("RESET SLAVE ALL")
        new.set_global("read_only", 0)
        self.primary, self.replica = new, old
        if self.proxy is not None:
            self.proxy.retarget(new.port)
        if self.haproxy is not None:
            if self.haproxy_follow == "admin":
                self.haproxy.set_server_state(new.name, "ready")
                self.haproxy.set_server_state(old.name, "maint")
            else:
                self.haproxy.wait_server_state(old.name, "DOWN", timeout)
            self.haproxy.wait_server_state(new.name, "UP", timeout)
        self.failovers += 1
        self.failover_seconds = time.monotonic() - begin
        return self.failover_seconds

    def rejoin(self) -> None:
        """Make the demoted node (``replica`` after a failover) replicate from the new
        primary, so another failover can go back. Not with ``same_server_id`` (its
        primary's binary log does not hold the events it replicated)."""
        if self.same_server_id:
            raise RuntimeError("rejoin() needs log_slave_updates, impossible with one server_id")
        node = self.replica
        node.query("SET GLOBAL gtid_slave_pos = @@GLOBAL.gtid_binlog_pos")
        self._replicate(node, self.primary)
        self.wait_caught_up()

    def _replicate(self, replica: MariaDBNode, primary: MariaDBNode) -> None:
        replica.query(
            "CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = %s,"
            " MASTER_USER = %s, MASTER_PASSWORD = %s, MASTER_USE_GTID = slave_pos,"
            " MASTER_CONNECT_RETRY = 1",
            (primary.port, REPL_USER, self.repl_password),
        )
        replica.query("START SLAVE")

    def _start_haproxy(self) -> None:
        from .haproxy import Backend, HAProxy, HealthAgent

        backends = []
        for node in self.nodes:
            agent = None
            if self.haproxy_follow == "agent":
                agent = HealthAgent(_writable_check(node), node.name).start()
                self.agents.append(agent)
            backends.append(
                Backend(
                    node.name,
                    node.port,
                    agent=agent,
                    disabled=self.haproxy_follow == "admin" and node is not self.primary,
                )
            )
        self.haproxy = HAProxy(backends, **self.haproxy_options).start()
        self.haproxy.wait_server_state(self.primary.name, "UP")
        if self.haproxy_follow == "agent":
            self.haproxy.wait_server_state(self.replica.name, "DOWN")


def _writable_check(node: MariaDBNode) -> Any:
    """A HealthAgent predicate: up while ``node`` accepts writes (``read_only`` 0)."""

    def check() -> bool | str:
        read_only = node.quick_query("SELECT @@GLOBAL.read_only")[0][0]
        return True if int(read_only) == 0 else "down#read_only"

    return check


if __name__ == "__main__":
    with ReplicatedPair(endpoint="both") as pair:
        print(f"start {pair.start_seconds:.2f}s: {pair.nodes}, endpoint 127.0.0.1:{pair.port}")
        pair.failover()
        print(f"failover {pair.failover_seconds:.2f}s; primary now {pair.primary}")
