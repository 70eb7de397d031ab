"""The connection guard: checks a connection before its first network operation after idle.

Installed once per process by :func:`install` (called from ``AppConfig.ready()``), it
wraps the few places where Django talks to the server on an open connection:

- ``CursorWrapper.execute/executemany/callproc`` (a new cursor, a reused cursor, the ORM);
- ``BaseDatabaseWrapper.set_autocommit`` (entering ``transaction.atomic()`` sends
  ``SET autocommit=0`` before any cursor exists);
- ``BaseDatabaseWrapper.commit/rollback``.

The hot path (a statement right after another) is one clock read and one comparison
before, and one clock read after. Everything else happens in :func:`_before` (after an
idle period) and :func:`_failed` (after an error). Per-connection state lives in
``_dbk_*`` attributes of Django's ``DatabaseWrapper``; the class defaults make an
untouched or unguarded wrapper skip the guard.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

from django.core.signals import setting_changed
from django.db import connections
from django.db import utils as db_utils
from django.db.backends import utils as backend_utils
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created

from .conf import AliasSettings, conf
from .errors import (
    Cause,
    ConnectionLostInTransaction,
    Disconnect,
    add_note,
    classify,
    explain,
    is_read,
    is_retryable_read,
    network_evidence,
    tls_failure,
)
from .signals import connection_recycled

logger = logging.getLogger("django_dbkeepalive")

INF = float("inf")
_now = time.monotonic
_FORK = Disconnect(0, "fork", not_sent=True, retryable=True)
_UNKNOWN_STATE = Disconnect(0, "interrupted", not_sent=False, retryable=False)
#: Unanswered TCP keepalive probes after which the kernel closes the connection.
KEEPALIVE_PROBES = 3

# Defaults on every DatabaseWrapper: an unguarded wrapper never takes the slow path.
_CLASS_DEFAULTS: dict[str, Any] = {
    "_dbk_on": False,  # guarded (AUTO_GUARD, or an enable() scope)
    "_dbk_due": INF,  # the hot path takes the slow path once the clock passes this
    "_dbk_last": 0.0,  # when the slow path last saw a statement start on it
    "_dbk_conn": None,  # the driver connection the state below belongs to
    "_dbk_ino": None,  # (fd, inode) of its socket, to never touch a reused fd
    "_dbk_poller": None,  # poll(0) of that socket: a bound select.poll().poll
    "_dbk_poll": None,  # the same while guarded: peeked before statements not re-run
    "_dbk_cfg": None,  # AliasSettings
    "_dbk_wait": None,  # the session's effective wait_timeout (None: not known yet)
    "_dbk_tx_wait": None,  # PostgreSQL's idle_in_transaction_session_timeout, if set
    "_dbk_limit": None,  # idle limit = wait - margin
    "_dbk_lost": None,  # a Disconnect once the connection is known to be dead
    "_dbk_forced": 0,  # scopes (middleware...) that guard it although AUTO_GUARD=False
    "_dbk_manual": False,  # reopen with autocommit off (lost in a manual transaction)
    "_dbk_over": None,  # (idle, limit) of the longest idle past the limit, for reports
    "_dbk_map": None,  # the server's max_allowed_packet for this session (None: not read)
    "_dbk_why": None,  # the Cause of the last connection the guard found lost
    "_dbk_ended": False,  # COMMIT/ROLLBACK ended the transaction, no statement since
    "_dbk_session": None,  # (thread id, server_id, opened at) of the current session
    "_dbk_zombie": None,  # the same of a lost session the server may still keep open
}

# Vendors whose server closes idle sessions and whose socket the guard can watch.
_SERVER_VENDORS = ("mysql", "postgresql")

_installed = False
_install_lock = threading.Lock()
_originals: dict[str, Callable[..., Any]] = {}
# Every wrapper with an open connection, in every thread, so a forked child can detach
# sockets it inherited from threads it no longer has.
_open_wrappers: weakref.WeakSet[Any] = weakref.WeakSet()
# Driver connections a forked child inherited from other threads. They are kept alive
# (their sockets already point at /dev/null) because freeing one could wait forever on a
# lock that a thread of the parent held at fork time.
_inherited: list[Any] = []


# --------------------------------------------------------------------------- sockets


def _fileno(conn: Any) -> int | None:
    """The driver connection's socket descriptor, or ``None`` when it has none."""
    try:
        if hasattr(conn, "_sock"):  # PyMySQL: _sock is None once it closed itself
            sock = conn._sock
            return None if sock is None else int(sock.fileno())
        fileno = getattr(conn, "fileno", None)
        return None if fileno is None else int(fileno())
    except Exception:
        return None


def _socket_id(conn: Any) -> tuple[int, int] | None:
    fd = _fileno(conn)
    if fd is None or fd < 0:
        return None
    try:
        return fd, os.fstat(fd).st_ino
    except OSError:
        return None


def _verified_fd(db: Any) -> int | None:
    """The socket's fd, only if it is still the socket recorded when it opened.

    A driver that closed its socket by itself may have let the number be reused by an
    unrelated file; this makes sure the guard never touches that one.
    """
    known = db._dbk_ino
    if known is None:
        return None
    fd, ino = known
    # Socket inode numbers are unique among open sockets, so a matching inode proves
    # the number still names our socket. (No driver call: mysqlclient's fileno() takes a
    # per-connection lock that another thread may hold, and in a forked child forever.)
    try:
        if os.fstat(fd).st_ino != ino:
            return None
    except OSError:
        return None
    return int(fd)


def _peek(db: Any) -> bool | None:
    """``True`` when the socket is readable with no statement in flight (closed by the
    server, or an unsolicited error packet such as 4031), ``False`` when quiet,
    ``None`` when it cannot be told. Costs one ``poll()``; never blocks."""
    fd = _verified_fd(db)
    if fd is None:
        return None
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _detach_socket(db: Any, *, fork: bool = False) -> None:
    """Make the connection's socket unusable in this process only.

    The descriptor is pointed at ``/dev/null``: whatever the driver does next (its
    ``COM_QUIT`` on close, a ``shutdown()``) goes nowhere, so a dead or silently dropped
    peer is never waited on, and a socket shared with a parent process is left intact.

    A PostgreSQL connection is then closed by its driver too (its goodbye goes to
    ``/dev/null``), so that a connection pool (Django's ``OPTIONS["pool"]``) sees it
    closed and discards it instead of handing it out again. Not in a forked child
    (``fork``), where another thread of the parent may have held its lock.
    """
    fd = _verified_fd(db)
    _forget_socket(db)
    if fd is None:
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)
    if not fork and db.vendor == "postgresql" and db.connection is not None:
        with contextlib.suppress(Exception):
            db.connection.close()


def _forget_socket(db: Any) -> None:
    db._dbk_ino = None
    db._dbk_poller = None
    db._dbk_poll = None


def _poller(fd: int) -> Callable[[int], list[tuple[int, int]]]:
    """``poll(0)`` of one socket: readable (or no longer open) while no statement is in
    flight means the server closed the session. The object is made once per
    connection, so a peek on the hot path is one C call and one ``poll()`` syscall."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return poller.poll


# ------------------------------------------------------------------- driver helpers


def _is_pymysql(conn: Any) -> bool:
    return type(conn).__module__.startswith("pymysql")


@contextlib.contextmanager
def _socket_for(fd: int) -> Iterator[socket.socket]:
    """A Python socket object on a duplicate of ``fd``, for getsockopt/setsockopt/peek.

    The duplicate shares the driver's open file description: creating a socket object
    sets ``O_NONBLOCK`` on it when ``socket.setdefaulttimeout()`` was called, which
    would change the driver's socket too, so its file status flags are restored."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    sock = socket.socket(fileno=os.dup(fd))
    try:
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            if fcntl.fcntl(fd, fcntl.F_GETFL) != flags:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _kernel_idle(db: Any) -> float | None:
    """Seconds since the server last sent data on this TCP connection (Linux TCP_INFO's
    ``tcpi_last_data_recv``), or ``None`` when the socket is not TCP or it is unknown."""
    fd = _verified_fd(db)
    if fd is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        with _socket_for(fd) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return None
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    if len(info) < 56:
        return None
    # struct tcp_info: 8 bytes of u8 fields, then u32s; tcpi_last_data_recv is the 12th.
    last_data_recv_ms: int = struct.unpack_from("=I", info, 52)[0]
    return last_data_recv_ms / 1000.0


def _peek_why(db: Any) -> str:
    """What made an idle connection's socket readable, without consuming anything
    the driver could need: ``"eof"`` (the server closed it: KILL, shutdown),
    ``"reset"`` (an RST: MariaDB's wait_timeout close, or the network), ``"dead_peer"``
    (the kernel gave up on unanswered TCP keepalive probes), ``"error:CODE"``
    (an unsolicited MySQL error packet, e.g. 4031), ``"sqlstate:STATE"`` (PostgreSQL's
    FATAL error before it closed, e.g. 57P05), ``"message"`` (PostgreSQL sent something
    else unasked: a LISTEN notification, the session is alive) or ``"unknown"``. One
    ``recv(MSG_PEEK)``, only called once the socket is readable while idle."""
    fd = _verified_fd(db)
    if fd is None:
        return "unknown"
    postgres = db.vendor == "postgresql"
    try:
        with _socket_for(fd) as sock:
            try:
                head = sock.recv(512 if postgres else 7, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except ConnectionResetError:
                return "reset"
            except TimeoutError:  # ETIMEDOUT: TCP keepalive probes went unanswered
                return "dead_peer"
            except OSError:
                return "unknown"
    except OSError:
        return "unknown"
    if not head:
        return "eof"
    if postgres:
        state = _pg_error_state(head)
        # Another message (a LISTEN notification, a notice) is no sign of a close.
        return "message" if state is None else f"sqlstate:{state}"
    if len(head) >= 7 and head[4] == 0xFF:  # 3-byte length, sequence, 0xFF, code
        return f"error:{int.from_bytes(head[5:7], 'little')}"
    return "unknown"


def _pg_error_state(data: bytes) -> str | None:
    """The SQLSTATE of a PostgreSQL ErrorResponse message at the start of ``data``:
    ``E``, a 4-byte length, then fields of a type byte and a NUL-terminated string;
    ``C`` is the code."""
    if len(data) < 6 or data[0:1] != b"E":
        return None
    pos = 5
    while pos < len(data) and data[pos] != 0:
        end = data.find(b"\0", pos + 1)
        if end < 0:
            return None
        if data[pos : pos + 1] == b"C":
            return data[pos + 1 : end].decode("ascii", "replace")
        pos = end + 1
    return None


def _set_keepalive(db: Any, idle: int) -> None:
    """Turn on TCP keepalive on the connection's socket: probes after ``idle`` seconds
    without traffic, every ``max(1, idle // 3)`` seconds, 3 unanswered ones close it."""
    fd = _verified_fd(db)
    if fd is None:
        return
    try:
        with _socket_for(fd) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (
                ("TCP_KEEPIDLE", idle),
                ("TCP_KEEPINTVL", max(1, idle // 3)),
                ("TCP_KEEPCNT", KEEPALIVE_PROBES),
            ):
                if hasattr(socket, name):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except (OSError, ValueError, TypeError, OverflowError) as exc:
        # Settings validation bounds the value; a kernel may still refuse it.
        logger.warning("dbkeepalive: could not enable TCP keepalive on %r (%s)", db.alias, exc)


def _ping(conn: Any) -> None:
    if _is_pymysql(conn):
        conn.ping(reconnect=False)  # older PyMySQL reconnects silently by default
    else:
        conn.ping()


def _read_wait_timeout(conn: Any) -> float:
    return _read_server_limits(conn)[0]


def _read_server_limits(conn: Any) -> tuple[float, int | None]:
    """The session's ``wait_timeout`` and ``max_allowed_packet``, in one round trip."""
    wait, packet, _server_id = _read_session(conn)
    return wait, packet


def _read_session(conn: Any) -> tuple[float, int | None, int | None]:
    """``wait_timeout``, ``max_allowed_packet`` and the server's ``server_id``."""
    cursor = conn.cursor()
    try:
        cursor.execute(
            "SELECT @@SESSION.wait_timeout, @@SESSION.max_allowed_packet, @@GLOBAL.server_id"
        )
        row = cursor.fetchone()
    finally:
        cursor.close()
    return (
        float(row[0]),
        None if row[1] is None else int(row[1]),
        None if row[2] is None else int(row[2]),
    )


def _read_max_allowed_packet(db: Any) -> int | None:
    """The server's ``max_allowed_packet``: known, or read on a new connection (outside a
    transaction only: the next statement would open one anyway). ``None`` if unknown."""
    if db._dbk_map is not None:
        return int(db._dbk_map)
    if _in_transaction(db):
        return None
    try:
        db.ensure_connection()
        cursor = db.connection.cursor()
        try:
            cursor.execute("SELECT @@SESSION.max_allowed_packet")
            row = cursor.fetchone()
        finally:
            cursor.close()
    except Exception:  # the server is gone too: the sizes stay unknown
        with contextlib.suppress(Exception):
            close_connection(db)
        return None
    db._dbk_map = int(row[0])
    return int(row[0])


def _read_timeout(db: Any) -> float | None:
    """The client read_timeout this connection was opened with, if any (seconds)."""
    options = db.settings_dict.get("OPTIONS") or {}
    value = options.get("read_timeout")
    if value is None and db._dbk_cfg is not None and db._dbk_cfg.client_timeouts:
        value = db._dbk_cfg.client_timeouts.get("read_timeout")
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _limit_for(wait: float, cfg: AliasSettings) -> float:
    # A margin as large as the timeout itself would leave no usable window: keep half.
    return wait - min(cfg.margin, wait / 2)


# ------------------------------------------------------------------ per-connection


def _guarded(db: Any) -> bool:
    return bool(db._dbk_on)


def _arm(db: Any) -> None:
    cfg = db._dbk_cfg
    on = (
        cfg is not None
        and db.connection is not None
        and db.connection is db._dbk_conn
        and (cfg.auto_guard or db._dbk_forced > 0)
    )
    db._dbk_on = on
    db._dbk_due = db._dbk_last + cfg.peek_after if on else INF
    db._dbk_poll = db._dbk_poller if on else None


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    db = connection
    cfg = conf.for_alias(db.alias)
    now = _now()
    db._dbk_cfg = cfg
    db._dbk_conn = db.connection
    db._dbk_ino = _socket_id(db.connection) if db.vendor in _SERVER_VENDORS else None
    db._dbk_poller = None if db._dbk_ino is None else _poller(db._dbk_ino[0])
    db._dbk_last = now
    db._dbk_lost = None
    db._dbk_why = None
    db._dbk_map = None
    db._dbk_wait = cfg.wait_timeout
    db._dbk_limit = None if cfg.wait_timeout is None else _limit_for(cfg.wait_timeout, cfg)
    db._dbk_tx_wait = None
    db._dbk_session = None
    _open_wrappers.add(db)
    _arm(db)
    if cfg.tcp_keepalive and db._dbk_ino is not None:
        _set_keepalive(db, cfg.tcp_keepalive)
    if db._dbk_on and db._dbk_limit is None:
        if db.vendor == "mysql":
            _learn_limits(db)
        elif db.vendor == "postgresql":
            _learn_pg_limits(db)
    if db._dbk_manual:
        # The connection was lost in a transaction the code manages by hand; reopen it
        # in the same mode so later statements are not silently autocommitted.
        db._dbk_manual = False
        db.set_autocommit(False)


def _learn_limits(db: Any) -> None:
    """Read the session's ``wait_timeout`` (and ``max_allowed_packet``) as the connection
    opens, one round trip, so the idle limit is known before the first pause: after it,
    a flow a NAT or firewall dropped silently would not answer the question, and a
    server-side close could not be told from a KILL. A disconnect here propagates (the
    connection died while being set up: ``connect()`` handles that)."""
    try:
        db._dbk_wait, db._dbk_map, server_id = _read_session(db.connection)
    except Exception as exc:
        if classify(exc) is not None:
            raise
        _no_limits(db, exc)
        server_id = None
    db._dbk_limit = _limit_for(db._dbk_wait, db._dbk_cfg)
    with contextlib.suppress(Exception):
        db._dbk_session = (int(db.connection.thread_id()), server_id, _now())
    zombie = db._dbk_zombie
    if zombie is not None:
        db._dbk_zombie = None
        _end_zombie(db, zombie, server_id)


def _read_pg_timeouts(conn: Any) -> tuple[float | None, float | None]:
    """PostgreSQL's ``idle_session_timeout`` (14+) and
    ``idle_in_transaction_session_timeout`` for this session, in seconds (``None``: off
    or unknown to this server)."""
    cursor = conn.cursor()
    try:
        cursor.execute(
            "SELECT (SELECT setting FROM pg_settings WHERE name = 'idle_session_timeout'), "
            "(SELECT setting FROM pg_settings "
            "WHERE name = 'idle_in_transaction_session_timeout')"
        )
        row = cursor.fetchone()
    finally:
        cursor.close()
    # pg_settings gives both in milliseconds; 0 turns the timeout off.
    found = [None if v is None or int(v) <= 0 else int(v) / 1000.0 for v in row]
    return found[0], found[1]


# The idle timeouts read per PostgreSQL driver connection, for pooled ones.
_pg_timeouts: weakref.WeakKeyDictionary[Any, tuple[float, float | None]] = (
    weakref.WeakKeyDictionary()
)


def _learn_pg_limits(db: Any) -> None:
    """Read PostgreSQL's idle timeouts as the connection opens (one round trip), like
    :func:`_learn_limits` for MySQL. With none set the server never closes an idle
    session itself; the peek still sees a session it terminated."""
    conn = db.connection
    known = _pg_timeouts.get(conn)
    if known is not None:
        # A connection from Django's pool (OPTIONS["pool"]): connect() runs, and this
        # signal is sent, at every checkout; the session is the same.
        db._dbk_wait, db._dbk_tx_wait = known
        db._dbk_limit = _limit_for(db._dbk_wait, db._dbk_cfg)
        return
    try:
        session, in_tx = _read_pg_timeouts(conn)
    except Exception as exc:
        if classify(exc) is not None:
            raise
        logger.warning(
            "dbkeepalive: could not read idle_session_timeout on %r (%s); set "
            "DBKEEPALIVE['WAIT_TIMEOUT'] to give the guard an idle limit",
            db.alias,
            type(exc).__name__,
        )
        session, in_tx = None, None
    finally:
        if not db.autocommit:
            # Without autocommit the read opened a transaction: end it, as new.
            with contextlib.suppress(Exception):
                conn.rollback()
    db._dbk_wait = INF if session is None else session
    db._dbk_tx_wait = in_tx
    db._dbk_limit = _limit_for(db._dbk_wait, db._dbk_cfg)
    with contextlib.suppress(TypeError):  # a driver connection that takes no weak ref
        _pg_timeouts[conn] = (db._dbk_wait, in_tx)


def _timeout_setting(db: Any, in_tx: bool = False) -> str:
    """The name of the server's idle timeout, for messages."""
    if db.vendor == "postgresql":
        return "idle_in_transaction_session_timeout" if in_tx else "idle_session_timeout"
    return "wait_timeout"


# A lost session the server may still hold open: the network went silent (a read
# timeout, a flow a NAT or firewall dropped, keepalive probes unanswered), so the server
# saw no close. Its transaction keeps its row locks until the server's wait_timeout
# (8 hours by default), and other statements wait on them.
_ZOMBIE_KINDS = ("timeout", "dead_peer")


def _end_zombie(db: Any, zombie: tuple[int, int | None, float], server_id: int | None) -> None:
    """KILL the previous session of this wrapper from its new connection, when it is
    provably the same server instance (same ``server_id``, up since before that session
    opened): a thread id is only unique within one server's lifetime."""
    thread_id, old_server_id, opened = zombie
    if server_id is None or old_server_id != server_id:
        return
    try:
        cursor = db.connection.cursor()
        try:
            cursor.execute(
                "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS "
                "WHERE VARIABLE_NAME = 'UPTIME'"
            )
            row = cursor.fetchone()
            # Uptime is whole seconds, rounded down: up at least as long as the old
            # session has existed proves no restart since it opened.
            if row is None or float(row[0]) < _now() - opened + 0.1:
                logger.debug(
                    "dbkeepalive: previous session %d not killed: the server restarted since",
                    thread_id,
                )
                return  # restarted since: that id may be someone else's now
            cursor.execute(f"KILL {int(thread_id):d}")
        finally:
            cursor.close()
    except Exception as exc:
        if classify(exc) is not None:
            raise  # the new connection is lost too: connect() handles that
        # 1094: it is gone already; 1095: not ours to kill. Nothing to do either way.
        logger.debug("dbkeepalive: previous session %d not killed (%s)", thread_id, exc)
        return
    logger.info(
        "dbkeepalive: killed the %r connection's previous session %d, which the server "
        "still held after the network went silent (its transaction's locks are released)",
        db.alias,
        thread_id,
    )


def _no_limits(db: Any, exc: BaseException) -> None:
    # A proxy that cannot answer it: rely on the peek and the ping alone.
    logger.warning(
        "dbkeepalive: could not read wait_timeout on %r (%s); set "
        "DBKEEPALIVE['WAIT_TIMEOUT'] to give the guard an idle limit",
        db.alias,
        type(exc).__name__,
    )
    db._dbk_wait = INF


def _on_setting_changed(setting: str, **kwargs: Any) -> None:
    if setting != "DBKEEPALIVE":
        return
    db: Any
    for db in connections.all(initialized_only=True):
        if db.connection is not None and db.connection is db._dbk_conn:
            cfg = conf.for_alias(db.alias)
            db._dbk_cfg = cfg
            if cfg.wait_timeout is not None:
                db._dbk_wait = cfg.wait_timeout
            db._dbk_limit = None if db._dbk_wait is None else _limit_for(db._dbk_wait, cfg)
            _arm(db)


def _in_transaction(db: Any) -> bool:
    return bool(db.in_atomic_block or not db.autocommit)


def _recycled(db: Any, reason: str, idle: float, cause: Cause | None = None) -> None:
    if not 0.0 <= idle < INF:
        idle = 0.0  # no idle period (a statement was in flight)
    logger.info(
        "dbkeepalive: recycled the %r connection (reason: %s, idle %.1fs%s)",
        db.alias,
        reason,
        idle,
        "" if cause is None else f"; {cause.what}",
    )
    connection_recycled.send(sender=db.alias, reason=reason, idle=idle)


def _discard(
    db: Any, reason: str, idle: float, *, graceful: bool = False, cause: Cause | None = None
) -> None:
    """Close the connection outside a transaction; the next statement reconnects."""
    if not graceful:
        _detach_socket(db)
    if not db.autocommit and not db.in_atomic_block:
        db._dbk_manual = True
    with contextlib.suppress(Exception):  # the driver's close of a dead link
        db.close()
    if not db.in_atomic_block:
        db.connection = None
    db._dbk_conn = None
    _forget_socket(db)
    db._dbk_lost = None
    db._dbk_due = -INF  # a cursor still bound to the old connection takes the slow path
    db._dbk_why = cause if cause is not None else db._dbk_why
    _open_wrappers.discard(db)
    _recycled(db, reason, idle, cause)


def _mark_lost(db: Any, disconnect: Disconnect, cause: Cause | None = None) -> None:
    _detach_socket(db)  # later operations fail at once instead of hanging
    db._dbk_lost = disconnect
    db._dbk_why = cause if cause is not None else explain(disconnect.kind)
    db._dbk_due = -INF
    if db._dbk_why.kind in _ZOMBIE_KINDS and db._dbk_session is not None:
        db._dbk_zombie = db._dbk_session  # the next connection ends it


def _idle_text(idle: float) -> str:
    if idle == -INF:
        return "it broke while a statement was in flight"
    if idle == INF:
        return "idle time unknown"
    return f"idle {idle:.1f}s"


def _lost_in_transaction(
    db: Any,
    cause: Cause,
    idle: float,
    exc: BaseException | None = None,
    *,
    commit_unknown: bool = False,
) -> ConnectionLostInTransaction:
    limit = db._dbk_limit
    wait = db._dbk_wait
    if db.vendor == "postgresql":
        tx_wait = db._dbk_tx_wait
        limits = (
            f"the server's idle_in_transaction_session_timeout is {tx_wait:g}s"
            if tx_wait is not None
            else "the server's idle_in_transaction_session_timeout is off"
        )
    elif limit is not None and wait is not None and wait < INF:
        limits = f"the guard's idle limit is {limit:.1f}s, the server's wait_timeout {wait:g}s"
    else:
        limits = "the server's wait_timeout is not known yet"
    if cause.kind == "fork":
        # The parent process still holds the session and its transaction: it may well
        # commit it. Redoing the work here would write it twice.
        return ConnectionLostInTransaction(
            f"The database connection {db.alias!r} was inherited from the parent process "
            "inside a transaction: this process was forked inside transaction.atomic(). "
            "The transaction belongs to the parent, which can still commit it, so this "
            "process must not redo that work; its own statements cannot join the "
            "transaction. django-dbkeepalive never reconnects inside a transaction: leave "
            "the atomic block here (this process then gets its own connection). "
            f"{cause.advice}",
            alias=db.alias,
            idle=idle,
            limit=db._dbk_limit,
            cause=cause.kind,
        )
    if commit_unknown:
        outcome = (
            "The COMMIT was sent but its reply was lost, so whether the transaction was "
            "saved is UNKNOWN: check the data before running the work again."
        )
    else:
        outcome = (
            "The server rolled the transaction back, so nothing this transaction wrote was saved."
        )
    advice = cause.advice
    if cause.kind == "idle_timeout":
        advice += " Keep slow work (API calls, building files) outside transaction.atomic()."
    message = (
        f"The database connection {db.alias!r} was lost inside a transaction: "
        f"{cause.what} ({_idle_text(idle)}; {limits}). {outcome} django-dbkeepalive never "
        "reconnects inside a transaction: leave the atomic block (the connection works "
        f"again after it) and run the whole unit of work again. {advice}"
    )
    code = None
    if exc is not None:
        found = classify(exc)
        code = found.code if found is not None and found.code > 0 else None
    return ConnectionLostInTransaction(
        message, alias=db.alias, idle=idle, limit=limit, code=code, cause=cause.kind
    )


def _driver_cursor(cursor: Any) -> Any:
    inner = cursor.cursor
    return getattr(inner, "cursor", inner)  # Django's MySQL backend wraps the driver's


def _orphan(cursor: Any) -> None:
    """Unbind a driver cursor from its dead connection, so closing it later is a no-op
    (both drivers' ``close()`` would otherwise talk to the closed connection and raise
    a raw driver error from the caller's cleanup code)."""
    with contextlib.suppress(Exception):
        _driver_cursor(cursor).connection = None


def _rebind(cursor: Any, db: Any) -> None:
    """Point a cursor object created before a reconnect at the new connection."""
    if getattr(_driver_cursor(cursor), "connection", None) is db.connection:
        return
    _orphan(cursor)
    cursor.cursor = db.create_cursor()


def _before(db: Any, cursor: Any = None, *, force: bool = False) -> None:
    """The slow path, taken at most every ``PEEK_AFTER`` seconds of activity and before
    the first operation after an idle period, or at once when the connection is lost.

    ``idle`` below counts from the last time this path ran, so it is an upper bound
    (off by at most ``PEEK_AFTER`` plus the last statement's duration). The cheap peek
    does not care; decisions near the limit are refined in :func:`_check_mysql` with the
    kernel's count of how long the server has been silent."""
    if cursor is not None:
        db._dbk_ended = False  # a statement after COMMIT/ROLLBACK: new transaction work
    guarded = force or _guarded(db)
    conn = db.connection
    if conn is None:
        if cursor is not None and guarded:
            db.ensure_connection()
            _rebind(cursor, db)
        return
    if conn is not db._dbk_conn or not guarded:
        return  # being opened right now (connect() runs set_autocommit), or not ours
    now = _now()
    idle = now - db._dbk_last
    in_tx = _in_transaction(db)
    lost = db._dbk_lost
    if lost is not None:
        if in_tx:
            raise _lost_in_transaction(db, db._dbk_why or explain(lost.kind), idle)
        _discard(db, "fork" if lost is _FORK else "disconnected", idle)
    elif db.vendor == "mysql":
        _check_mysql(db, idle, in_tx)
    elif db.vendor == "postgresql":
        _check_postgres(db, idle, in_tx)
    elif not in_tx and _obsolete(db, now):
        _discard(db, "max_age", idle, graceful=True)
    if (
        not force  # a check between units of work starts no statement: idle goes on
        and db.connection is not None
        and db.connection is db._dbk_conn
        and db._dbk_lost is None
    ):
        db._dbk_last = now
        db._dbk_due = now + db._dbk_cfg.peek_after if _guarded(db) else INF
    if cursor is not None and db.vendor in _SERVER_VENDORS:
        db.ensure_connection()
        _rebind(cursor, db)


def _obsolete(db: Any, now: float) -> bool:
    # CONN_MAX_AGE = 0 means "per request" (Django closes it at the request's end), not
    # "close before every statement".
    return bool(
        db.settings_dict.get("CONN_MAX_AGE") and db.close_at is not None and now >= db.close_at
    )


# A server-side close after a pause this long is worth reporting even before the
# guard has learnt the server's wait_timeout (a KILL right after a statement is not).
_NOTABLE_IDLE = 1.0


def _note_idle(db: Any, idle: float, limit: float) -> None:
    over = db._dbk_over
    if over is None or idle > over[0]:
        db._dbk_over = (idle, limit)


def _check_mysql(db: Any, idle: float, in_tx: bool) -> None:
    cfg: AliasSettings = db._dbk_cfg
    if not in_tx and _obsolete(db, _now()):
        _discard(db, "max_age", idle, graceful=True)
        return
    readable = _peek(db)
    limit: float | None = db._dbk_limit
    ping_after = cfg.ping_after
    kernel = None
    if readable or limit is None or idle > limit or (ping_after is not None and idle > ping_after):
        # `idle` counts from the last visit here, so it may include a long statement's own
        # duration; the kernel knows how long the server has been silent (TCP only).
        kernel = _kernel_idle(db)
        if kernel is not None:
            idle = min(idle, kernel)
    if readable:
        # EOF or an unsolicited error packet: the server closed or killed the session.
        if idle > (limit if limit is not None else _NOTABLE_IDLE):
            _note_idle(db, idle, limit if limit is not None else INF)
        cause = _closed_while_idle(db, idle)
        if in_tx:
            _mark_lost(db, Disconnect(2006, "gone", not_sent=True, retryable=True), cause)
            raise _lost_in_transaction(db, cause, idle)
        _discard(db, "disconnected", idle, cause=cause)
        return
    pinged = False
    if limit is None:
        # Opened while nothing guarded it (AUTO_GUARD off, outside any scope): learn the
        # limit now, on a session that just answered the peek.
        try:
            db._dbk_wait, db._dbk_map = _read_server_limits(db.connection)
        except Exception as exc:
            if classify(exc) is not None:
                _ping_failed(db, idle, in_tx, exc)
                return
            _no_limits(db, exc)
        limit = db._dbk_limit = _limit_for(db._dbk_wait, cfg)
        pinged = True
    if idle > limit and kernel is None and not pinged:
        # No TCP (a local socket, where nothing drops a flow silently): ask the server
        # rather than drop a session that a long statement may have kept busy.
        try:
            _ping(db.connection)
        except Exception as exc:
            _ping_failed(db, idle, in_tx, exc)
        return
    if idle > limit:
        _note_idle(db, idle, limit)
        if in_tx:
            if idle >= db._dbk_wait:
                # The server has closed it, or a network device dropped it silently:
                # either way the transaction is gone; do not wait on the socket.
                cause = explain("idle_timeout", idle=idle, wait=db._dbk_wait)
                _mark_lost(db, Disconnect(2013, "idle_timeout", False, True), cause)
                raise _lost_in_transaction(db, cause, idle)
            return  # still inside wait_timeout: the session is alive, go on
        _discard(db, "idle", idle)
        return
    if not pinged and ping_after is not None and idle > ping_after:
        try:
            _ping(db.connection)
        except Exception as exc:
            _ping_failed(db, idle, in_tx, exc)


def _check_postgres(db: Any, idle: float, in_tx: bool) -> None:
    """PostgreSQL: the peek, ``CONN_MAX_AGE``, and the server's idle timeouts
    (``idle_session_timeout`` outside a transaction, ``idle_in_transaction_session_timeout``
    inside one). No ping: the peek sees every session the server ended (it sends a FATAL
    error, then closes), and TCP_KEEPALIVE covers a flow the network dropped."""
    if not in_tx and _obsolete(db, _now()):
        _discard(db, "max_age", idle, graceful=True)
        return
    readable = _peek(db) and not _only_a_message(db)
    limit: float | None = db._dbk_limit
    if limit is None and db._dbk_wait is None and not in_tx and not readable:
        # Opened while nothing guarded it: learn the limits now (outside a transaction
        # only: inside one the read would be part of it).
        try:
            _learn_pg_limits(db)
        except Exception as exc:
            _ping_failed(db, idle, in_tx, exc)
            return
        limit = db._dbk_limit
    tx_wait: float | None = db._dbk_tx_wait
    watch = tx_wait if in_tx else limit
    if not readable and watch is not None and idle > watch:
        # How long the server has been silent, not this path. (Not once it is readable:
        # its FATAL error before closing is data, and would reset that count.)
        kernel = _kernel_idle(db)
        if kernel is not None:
            idle = min(idle, kernel)
    if readable:
        if limit is not None and idle > limit:
            _note_idle(db, idle, limit)
        cause = _closed_while_idle(db, idle)
        if in_tx:
            _mark_lost(db, Disconnect(-1, "gone", not_sent=True, retryable=True), cause)
            raise _lost_in_transaction(db, cause, idle)
        _discard(db, "disconnected", idle, cause=cause)
        return
    if in_tx:
        if tx_wait is not None and idle >= tx_wait:
            # The server ends the session now, if it has not already: do not send on it.
            cause = explain(
                "idle_timeout", idle=idle, wait=tx_wait, setting=_timeout_setting(db, True)
            )
            _mark_lost(db, Disconnect(-1, "idle_timeout", False, True), cause)
            raise _lost_in_transaction(db, cause, idle)
        return
    if limit is not None and idle > limit:
        _note_idle(db, idle, limit)
        _discard(db, "idle", idle)


def _only_a_message(db: Any) -> bool:
    """A readable PostgreSQL socket that holds a message for the driver (a LISTEN
    notification), not a close: the session is fine."""
    if db.vendor != "postgresql" or _peek_why(db) != "message":
        return False
    if not _pg_tls(db.connection):
        return True  # plain protocol, and not an error: a notification, a notice
    # Over TLS the bytes are records that only the driver can read: let it read them
    # (it keeps notifications for the code), then see whether the session is still open.
    return _pg_read_input(db.connection) and not _peek(db)


def _pg_tls(conn: Any) -> bool:
    try:
        pgconn = getattr(conn, "pgconn", None)  # psycopg 3
        info = pgconn if pgconn is not None else conn.info  # psycopg2
        return bool(info.ssl_in_use)
    except Exception:
        return False


def _pg_read_input(conn: Any) -> bool:
    """Let the driver read what the server sent unasked; ``False`` once that shows the
    session closed."""
    try:
        pgconn = getattr(conn, "pgconn", None)
        if pgconn is not None:  # psycopg 3: buffers it; notifications stay queued
            pgconn.consume_input()
            pgconn.is_busy()  # parses what was read
        else:  # psycopg2: notifications go to conn.notifies
            conn.poll()
    except Exception:
        return False
    return not conn.closed


def _closed_while_idle(db: Any, idle: float) -> Cause:
    """Why an idle connection's socket turned readable (see :func:`_peek_why`)."""
    why = _peek_why(db)
    wait = db._dbk_wait
    setting = _timeout_setting(db)
    codes = {1927: "killed", 3169: "killed", 1053: "shutdown", 4031: "idle_timeout"}
    if why.startswith("error:"):
        kind = codes.get(int(why[6:]), "gone")
    elif why.startswith("sqlstate:"):
        state = why[9:]
        kind = {"57P01": "terminated", "57P02": "shutdown", "57P05": "idle_timeout"}.get(
            state, "gone"
        )
        if state == "25P03":
            kind, wait = "idle_timeout", db._dbk_tx_wait
            setting = _timeout_setting(db, True)
    elif wait is not None and idle >= wait:
        kind = "idle_timeout"
    else:
        kind = {"eof": "closed", "reset": "reset", "dead_peer": "dead_peer"}.get(why, "gone")
    return explain(kind, idle=idle, wait=wait, setting=setting)


def _ping_failed(db: Any, idle: float, in_tx: bool, exc: BaseException) -> None:
    found = classify(exc) or Disconnect(2013, "lost", False, True)
    cause = _failure_cause(db, found, exc, pymysql=_is_pymysql(db.connection))
    if in_tx:
        _mark_lost(db, Disconnect(2013, "lost", False, True), cause)
        raise _lost_in_transaction(db, cause, idle, exc) from exc
    _discard(db, "ping_failed", idle, cause=cause)


def _failure_cause(db: Any, found: Disconnect, exc: BaseException, *, pymysql: bool) -> Cause:
    """Why a statement (or ping) failed with a disconnect, as far as can be told."""
    kind = found.kind
    if kind in ("lost", "network", "gone", "closed"):
        evidence = network_evidence(exc)
        read_timeout = _read_timeout(db)
        # libmariadb says the same for a timeout as for a close, and closes the socket;
        # the time since the slow path last ran (at most PEEK_AFTER before the statement
        # started) tells a read that waited out read_timeout.
        if (
            evidence is None
            and not pymysql
            and kind == "lost"
            and read_timeout
            and _now() - db._dbk_last >= read_timeout * 0.95
        ):
            evidence = "timeout"
        if evidence is not None:
            return explain(evidence, read_timeout=read_timeout)
    if found.sqlstate == "25P03":
        return explain(kind, wait=db._dbk_tx_wait, setting=_timeout_setting(db, True))
    return explain(kind, wait=db._dbk_wait, setting=_timeout_setting(db))


def _statement_size(statement: tuple[Any, Any, bool] | None) -> int | None:
    """At least how many bytes the statement took on the wire (SQL plus the parameters'
    text; escaping only adds to it), or ``None``. Only sizes, never the values."""
    if statement is None:
        return None
    sql, params, many = statement
    try:
        size = len(sql.encode("utf-8") if isinstance(sql, str) else sql)
        rows = params if many else [params]
        if not isinstance(rows, (list, tuple)):
            return None  # an iterator the driver has consumed
        for row in rows:
            if row is None:
                continue
            values = row.values() if isinstance(row, Mapping) else row
            for value in values:
                if isinstance(value, (bytes, bytearray, memoryview)):
                    size += len(value)
                else:
                    size += len(str(value).encode("utf-8"))
        return size - (2 * sql.count("%s") if isinstance(sql, str) else 0)
    except Exception:
        return None


# The smallest max_allowed_packet a server accepts: a shorter statement always fits.
_MIN_MAX_ALLOWED_PACKET = 1024


def _too_large(
    db: Any, found: Disconnect, size: int | None, known_map: int | None
) -> tuple[int | None, int | None] | None:
    """``(size, max_allowed_packet)`` when the statement was refused for its size.

    PyMySQL gets 1153 from the server; mysqlclient on libmariadb reports the server's
    close as 2006, so there the statement's size is compared with the server's limit,
    read on the new connection if the guard had not read it yet."""
    if found.kind == "too_large":
        return size, known_map if known_map is not None else _read_max_allowed_packet(db)
    # 2006 only: the send failed because the server had closed the connection. (A
    # timeout or an outage is never 2006 on send, so this never waits on a dead network.)
    if size is None or size < _MIN_MAX_ALLOWED_PACKET or found.code != 2006:
        return None
    limit = known_map if known_map is not None else _read_max_allowed_packet(db)
    if limit is not None and size > limit:
        return size, limit
    return None


def _too_large_cause(size: int | None, limit: int | None) -> Cause:
    sizes = f"{size:,} bytes or more" if size is not None else "size not known"
    limit_text = f"{limit:,} bytes" if limit is not None else "not known here"
    return Cause(
        "too_large",
        f"the statement ({sizes}) is larger than the server's max_allowed_packet "
        f"({limit_text}). This is not a lost connection: the server refused the statement "
        "for its size (it was not applied) and then closed the connection",
        "Raise max_allowed_packet on the server (SET GLOBAL max_allowed_packet = ..., and "
        "in its configuration file), or send smaller statements (bulk_create(..., "
        "batch_size=...), smaller blobs).",
    )


def _failed(
    db: Any,
    cursor: Any,
    exc: BaseException,
    retry: Callable[[], Any] | None,
    statement: tuple[Any, Any, bool] | None = None,
) -> Any:
    """A statement failed. Re-raise, raise ``ConnectionLostInTransaction``, or re-run it.

    ``retry`` re-runs the statement; it is given only when running it again could not
    write anything twice. ``statement`` is ``(sql, params, many)`` when known, for the
    message only. Called inside the ``except`` block of the wrapper.
    """
    if not _guarded(db) or db.connection is None or db.connection is not db._dbk_conn:
        raise exc  # not ours, or being set up right now (connect() handles that)
    if not isinstance(exc, Exception):
        # Interrupted mid-statement (Ctrl-C): the protocol state is unknown.
        if db.vendor == "mysql":
            _mark_lost(db, _UNKNOWN_STATE)
        raise exc
    found = classify(exc)
    if found is None:
        raise exc
    idle = -INF  # the statement was in flight: there was no idle period to report
    if cursor is not None:
        _orphan(cursor)
    cause = _failure_cause(db, found, exc, pymysql=_is_pymysql(db.connection))
    size = _statement_size(statement)
    known_map = db._dbk_map
    if _in_transaction(db):
        if found.kind == "too_large" or (
            size is not None and known_map is not None and size > known_map
        ):
            cause = _too_large_cause(size, known_map)
        _mark_lost(db, found, cause)
        raise _lost_in_transaction(db, cause, idle, exc) from exc
    _mark_lost(db, found, cause)
    _discard(db, "disconnected", idle, cause=cause)
    too_large = _too_large(db, found, size, known_map)
    if too_large is not None:
        _note(exc, db, _too_large_cause(*too_large), rerun="never")
        raise exc
    if retry is None or not found.retryable:
        sql = statement[0] if statement is not None else None
        _note(exc, db, cause, rerun="read" if is_read(sql) else "unknown")
        raise exc
    try:
        db.ensure_connection()
    except Exception as again:
        _note(again, db, cause, rerun="reconnect_failed")
        raise
    if cursor is not None:
        _rebind(cursor, db)
    logger.info(
        "dbkeepalive: re-running a statement on a new %r connection after error %s (%s)",
        db.alias,
        found.label,
        cause.what,
    )
    try:
        result = retry()
    except Exception as again:
        again_found = classify(again)
        if again_found is not None:
            again_cause = _failure_cause(db, again_found, again, pymysql=_is_pymysql(db.connection))
            _mark_lost(db, again_found, again_cause)
            _discard(db, "disconnected", 0.0, cause=again_cause)
            _note(again, db, again_cause, rerun="failed_again", first=cause)
        raise
    return result


def _note(
    exc: BaseException, db: Any, cause: Cause, *, rerun: str, first: Cause | None = None
) -> None:
    """Add what happened and what to do to a driver error that reaches the caller."""
    alias = db.alias
    if cause.kind == "too_large":
        text = (
            f"django-dbkeepalive: database {alias!r}: {cause.what}. It was not sent again "
            f"(it would fail the same way). {cause.advice} The next statement uses a new "
            "connection."
        )
    elif rerun == "reconnect_failed":
        text = (
            f"django-dbkeepalive: the connection to database {alias!r} was lost "
            f"({cause.what}), and connecting again to re-run the statement failed. It "
            f"was not applied. {explain('unreachable').advice}"
        )
    elif rerun == "failed_again" and first is not None:
        text = (
            f"django-dbkeepalive: the connection to database {alias!r} was lost "
            f"({first.what}); the statement was run again once on a new connection, "
            f"which was lost too: {cause.what}. {cause.advice}"
        )
    elif rerun == "read":
        text = (
            f"django-dbkeepalive: the connection to database {alias!r} was lost while "
            f"this statement was in flight: {cause.what}. This read was not run again: "
            "RETRY_READS is off, or its result depends on the lost session "
            f"(LAST_INSERT_ID(), user variables, locks). {cause.advice} The next "
            "statement uses a new connection."
        )
    else:
        text = (
            f"django-dbkeepalive: the connection to database {alias!r} was lost while "
            f"this statement was in flight: {cause.what}. It was not run again, because "
            "the server may have applied it: check whether it took effect before "
            f"retrying it. {cause.advice} The next statement uses a new connection."
        )
    add_note(exc, text)


# -------------------------------------------------------------------- the wrappers


def _retry_for(db: Any, exc: BaseException, sql: Any, read_ok: bool) -> bool:
    """Whether a failed statement may run again: never in a transaction; always when it
    provably never reached the server; a session-independent read when allowed."""
    if _in_transaction(db):
        return False
    found = classify(exc)
    if found is None:
        return False
    if found.not_sent:
        return True
    cfg = db._dbk_cfg
    return read_ok and cfg is not None and cfg.retry_reads and is_retryable_read(sql)


# The hot path below reads the clock once, compares, and stores the time the statement
# started. Measured under callgrind, every extra clock read or Python frame here costs
# about 0.5% of a whole `SELECT 1`; so the original body is inlined where Django has
# `_execute_with_wrappers` (all supported versions), and the idle time is corrected in
# the slow path with the kernel's own count (TCP_INFO) when a long statement inflates it.
_INLINE = hasattr(backend_utils.CursorWrapper, "_execute_with_wrappers")


def _execute_failed(
    db: Any, cursor: Any, exc: BaseException, original: Any, sql: Any, params: Any, many: bool
) -> Any:
    # Kept out of the wrappers: a closure over their arguments there would turn them
    # into cell variables, which costs ~1,000 instructions on every statement.
    retry = None
    # An iterator of parameter rows was consumed by the first attempt: never re-run it.
    rerunnable = not many or isinstance(params, (list, tuple))
    if rerunnable and _retry_for(db, exc, sql, read_ok=not many):

        def retry() -> Any:
            return original(cursor, sql, params)

    return _failed(db, cursor, exc, retry, (sql, params, many))


def _wrap_execute(original: Callable[..., Any]) -> Callable[..., Any]:
    # Two bodies, chosen once: a test of _INLINE on every statement costs ~150
    # instructions. `sql and sql[0]` tells a SELECT/SHOW (re-run if the link broke)
    # from a statement that may not be re-run, which is never sent on a session the
    # server has closed: ~60 instructions cheaper than `sql[:1]`. It is evaluated only
    # on a connection with a socket to poll (MySQL, PostgreSQL); SQL that is not a
    # string (psycopg's sql.Composed has no [0]) is peeked at in the `except`, which
    # costs nothing until it runs (Python 3.11+).
    if _INLINE:

        def execute(self: Any, sql: Any, params: Any = None, _now: Any = _now) -> Any:
            db = self.db
            try:
                if _now() > db._dbk_due or (
                    (poll := db._dbk_poll) is not None and sql and sql[0] != "S" and poll(0)
                ):
                    _before(db, self)
            except TypeError:
                if isinstance(sql, (str, bytes)):
                    raise
                _before(db, self)  # SQL that is no string (psycopg's sql.Composed): peek
            try:
                return self._execute_with_wrappers(sql, params, many=False, executor=self._execute)
            except BaseException as exc:
                return _execute_failed(db, self, exc, original, sql, params, False)

    else:

        def execute(self: Any, sql: Any, params: Any = None, _now: Any = _now) -> Any:
            db = self.db
            try:
                if _now() > db._dbk_due or (
                    (poll := db._dbk_poll) is not None and sql and sql[0] != "S" and poll(0)
                ):
                    _before(db, self)
            except TypeError:
                if isinstance(sql, (str, bytes)):
                    raise
                _before(db, self)  # SQL that is no string (psycopg's sql.Composed): peek
            try:
                return original(self, sql, params)
            except BaseException as exc:
                return _execute_failed(db, self, exc, original, sql, params, False)

    execute.__wrapped__ = original  # type: ignore[attr-defined]
    execute.__doc__ = original.__doc__
    return execute


def _wrap_executemany(original: Callable[..., Any]) -> Callable[..., Any]:
    def executemany(self: Any, sql: Any, param_list: Any, _now: Any = _now) -> Any:
        db = self.db
        if _now() > db._dbk_due or ((poll := db._dbk_poll) is not None and poll(0)):
            _before(db, self)
        try:
            return original(self, sql, param_list)
        except BaseException as exc:
            return _execute_failed(db, self, exc, original, sql, param_list, True)

    executemany.__wrapped__ = original  # type: ignore[attr-defined]
    return executemany


def _wrap_callproc(original: Callable[..., Any]) -> Callable[..., Any]:
    def callproc(self: Any, procname: Any, params: Any = None, kparams: Any = None) -> Any:
        db = self.db
        if _now() > db._dbk_due or ((poll := db._dbk_poll) is not None and poll(0)):
            _before(db, self)
        try:
            return original(self, procname, params, kparams)
        except BaseException as exc:
            return _failed(db, self, exc, None)  # a procedure may write: never re-run

    callproc.__wrapped__ = original  # type: ignore[attr-defined]
    return callproc


def _set_autocommit_failed(
    db: Any, exc: BaseException, original: Any, autocommit: bool, force: bool, entering: bool
) -> Any:
    retry = None
    found = classify(exc)
    if entering and found is not None and found.retryable:
        # "SET autocommit=0" on a lost connection: nothing was written yet.
        def retry() -> Any:
            return original(db, autocommit, force)

    return _failed(db, None, exc, retry)


def _leaving_manual(db: Any) -> bool:
    """Whether ``set_autocommit(True)`` now ends a manual-mode stretch on a connection of
    ours (the end of an atomic block, after its COMMIT or ROLLBACK, or the code's own)."""
    return bool(
        not db.in_atomic_block
        and not db.autocommit
        and db.connection is not None
        and db.connection is db._dbk_conn
        and _guarded(db)
    )


def _left_lost(db: Any, found: Disconnect, exc: BaseException | None, ended: bool) -> None:
    """The connection is lost as the code leaves manual mode. Replace it, in autocommit
    mode (never leave it lost with autocommit off: every later statement would raise).
    ``ended``: COMMIT or ROLLBACK ended the transaction and nothing ran since, so nothing
    is lost and this is quiet; otherwise work since then was rolled back: raise."""
    cause = (
        _failure_cause(db, found, exc, pymysql=_is_pymysql(db.connection))
        if exc is not None
        else (db._dbk_why or explain(found.kind))
    )
    error = None if ended else _lost_in_transaction(db, cause, -INF, exc)
    _mark_lost(db, found, cause)
    _discard(db, "disconnected", -INF, cause=cause)
    db._dbk_manual = False
    if error is not None:
        if exc is not None:
            raise error from exc
        raise error


def _replace_if_lost(db: Any, ended: bool) -> bool:
    """Before ``set_autocommit(True)`` ends manual mode: replace a connection the server
    closed (or known lost), see :func:`_left_lost`. ``True`` when it was replaced."""
    lost = db._dbk_lost
    if lost is None:
        try:
            if ended:  # the transaction is over: a peek is all it takes
                poll = db._dbk_poll
                if poll is None or not poll(0) or _only_a_message(db):
                    return False
                lost = Disconnect(2006, "gone", not_sent=True, retryable=True)
                db._dbk_why = _closed_while_idle(db, _now() - db._dbk_last)
            else:
                _before(db)
                return False
        except ConnectionLostInTransaction:
            lost = db._dbk_lost or Disconnect(2013, "lost", False, True)
    _left_lost(db, lost, None, ended)
    return True


def _leave_manual(db: Any, original: Any, force: bool, ended: bool) -> Any:
    """``set_autocommit(True)`` that ends manual mode (the end of an atomic block, after
    its COMMIT or ROLLBACK, or the code's own call), never leaving a lost connection
    behind with autocommit off. After COMMIT/ROLLBACK (``ended``), a lost connection is
    replaced quietly and the transaction's on_commit hooks, which Django drops with the
    old connection, still run: the work was committed."""
    hooks = list(db.run_on_commit) if ended else []
    if not _replace_if_lost(db, ended):
        db._dbk_due = db._dbk_last + db._dbk_cfg.peek_after  # the hot path again
        try:
            return original(db, True, force)
        except Exception as exc:
            found = classify(exc)
            if found is None or not _leaving_manual(db):
                raise
            _left_lost(db, found, exc, ended)  # raises unless the transaction had ended
    try:
        original(db, True, force)  # reconnects, in autocommit mode
    except Exception as again:
        if classify(again) is None:
            raise
        # The server is unreachable now. An error here would read as a failed atomic
        # block and get committed work run again: leave the connection closed (the next
        # statement reports the outage itself).
        db.autocommit = True
    db.run_commit_hooks_on_set_autocommit_on = False
    if hooks:
        db.run_on_commit = hooks
        db.run_and_clear_commit_hooks()
    return None


def _wrap_set_autocommit(original: Callable[..., Any]) -> Callable[..., Any]:
    def set_autocommit(
        self: Any, autocommit: bool, force_begin_transaction_with_broken_autocommit: bool = False
    ) -> Any:
        if autocommit and self._dbk_manual and self.connection is self._dbk_conn:
            # Back to autocommit (the end of an atomic block, or the code's own call):
            # a connection lost in the manual transaction must not reopen in manual
            # mode, even if this call fails to reconnect. (Django's connect() calls
            # this too, on a connection not ours yet: that one is left alone.)
            self._dbk_manual = False
        ended = self._dbk_ended
        self._dbk_ended = False
        if autocommit and _leaving_manual(self):
            return _leave_manual(
                self, original, force_begin_transaction_with_broken_autocommit, ended
            )
        if _now() > self._dbk_due:
            _before(self)
        entering = not autocommit and not _in_transaction(self)
        try:
            return original(self, autocommit, force_begin_transaction_with_broken_autocommit)
        except BaseException as exc:
            return _set_autocommit_failed(
                self,
                exc,
                original,
                autocommit,
                force_begin_transaction_with_broken_autocommit,
                entering,
            )

    set_autocommit.__wrapped__ = original  # type: ignore[attr-defined]
    return set_autocommit


def _transaction_ended(db: Any) -> None:
    """COMMIT or ROLLBACK returned: nothing of that transaction can be lost any more.
    Until the next statement (which takes the slow path once to clear the mark), leaving
    manual mode on a connection the server has closed just replaces it, quietly: at the
    end of an atomic block a lost ``SET autocommit=1`` must not look like a lost
    transaction, or the code would run the committed work again."""
    if db._dbk_on and db.connection is not None and not db.in_atomic_block:
        db._dbk_ended = True
        db._dbk_due = -INF


def _wrap_commit(original: Callable[..., Any]) -> Callable[..., Any]:
    def commit(self: Any) -> Any:
        # Peeked every time: a COMMIT on a session the server closed would leave its
        # outcome unknown, while before sending it the transaction is known rolled back.
        if _now() > self._dbk_due or ((poll := self._dbk_poll) is not None and poll(0)):
            _before(self)
        try:
            result = original(self)
        except Exception as exc:
            found = classify(exc)
            if found is None or not _guarded(self) or self.connection is None:
                raise
            cause = _failure_cause(self, found, exc, pymysql=_is_pymysql(self.connection))
            _mark_lost(self, found, cause)
            raise _lost_in_transaction(
                self, cause, -INF, exc, commit_unknown=not found.not_sent
            ) from exc
        _transaction_ended(self)
        return result

    commit.__wrapped__ = original  # type: ignore[attr-defined]
    return commit


def _wrap_rollback(original: Callable[..., Any]) -> Callable[..., Any]:
    def rollback(self: Any) -> Any:
        if self._dbk_lost is not None and not self.in_atomic_block and _guarded(self):
            # The server rolled back when the connection died: drop it, don't wait on it.
            _discard(self, "disconnected", 0.0)
        elif _now() > self._dbk_due and not self.in_atomic_block:
            try:
                _before(self)
            except ConnectionLostInTransaction:
                _discard(self, "disconnected", 0.0)
        result = original(self)
        _transaction_ended(self)
        return result

    rollback.__wrapped__ = original  # type: ignore[attr-defined]
    return rollback


def _cursor_close(self: Any) -> Any:
    """``CursorWrapper.close()`` (Django has none: the driver's is reached through
    ``__getattr__``, outside Django's error wrapper). A cursor whose connection the guard
    replaced while it was open (an ORM ``iterator()`` whose loop body waited, then
    wrote) would otherwise raise the driver's raw 2006 from mysqlclient's close, after
    all the work succeeded: closing a cursor of a dead connection has nothing to save."""
    inner = self.cursor
    owner = getattr(getattr(inner, "cursor", inner), "connection", None)
    try:
        return inner.close()
    except Exception as exc:
        found = classify(exc)
        db = self.db
        if found is None:
            raise
        if owner is not None and owner is db.connection and db.connection is db._dbk_conn:
            if not _guarded(db):
                raise  # the connection in use died, and nothing of ours handles it
            _mark_lost(db, found)  # the next statement reconnects (or raises in a tx)
        return None


def _safe_is_usable(original: Callable[..., Any]) -> Callable[..., Any]:
    def is_usable(self: Any) -> bool:
        if self.connection is not None and _is_pymysql(self.connection):
            try:
                self.connection.ping(reconnect=False)
            except Exception:
                return False
            return True
        return bool(original(self))

    is_usable.__wrapped__ = original  # type: ignore[attr-defined]
    return is_usable


def _wrap_get_connection_params(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_connection_params(self: Any) -> Any:
        params = original(self)
        timeouts = conf.for_alias(self.alias).client_timeouts
        # An option file (read_default_file) may set them: the user's choice wins.
        if timeouts and "read_default_file" not in params:
            for name, value in timeouts.items():
                params.setdefault(name, value)  # OPTIONS are already in params
        return params

    get_connection_params.__wrapped__ = original  # type: ignore[attr-defined]
    return get_connection_params


_DJANGO_ERROR_NAMES = (
    "DataError",
    "OperationalError",
    "IntegrityError",
    "InternalError",
    "ProgrammingError",
    "NotSupportedError",
    "DatabaseError",
    "InterfaceError",
    "Error",
)


def _drop_half_open(db: Any) -> None:
    """Forget a connection whose setup failed (Django sets ``db.connection`` before it
    sends ``SET autocommit`` and its session setup): left in place, every later
    statement of this thread would use the dead session, and outside requests nothing
    repairs it (measured in the soak run: an APScheduler thread failed every run)."""
    conn = db.connection
    db.connection = None
    with contextlib.suppress(Exception):
        conn.close()


def _connect_error(db: Any, exc: Exception, found: Disconnect, *, twice: bool) -> Exception | None:
    """``exc`` as the Django error the caller will see, with a note; ``None`` when it
    is not one the guard can convert. ``twice``: the setup was lost on a second try."""
    if isinstance(exc, db_utils.Error):
        error: Exception = exc  # raised by Django's own error wrapper during setup
    else:
        # Django's wrapper around connect() would replace the driver's exception by a
        # new one (dropping a note): convert it here as Django would.
        for name in _DJANGO_ERROR_NAMES:
            driver_type = getattr(db.Database, name, None)
            if driver_type is not None and isinstance(exc, driver_type):
                error = getattr(db_utils, name)(*exc.args)
                break
        else:
            return None
    db.errors_occurred = True
    previous = db._dbk_why
    before = "" if previous is None else f" Its previous connection was lost: {previous.what}."
    if found.kind == "unreachable" and tls_failure(exc):
        add_note(
            error,
            f"django-dbkeepalive: could not connect to database {db.alias!r}: the TLS "
            "handshake failed. The server answered, so this is a certificate or TLS "
            "setting problem (OPTIONS['ssl'], the server's certificate), not an outage: "
            "retrying will not help. Nothing was sent.",
        )
    elif found.kind == "unreachable":
        unreachable = explain("unreachable")
        add_note(
            error,
            f"django-dbkeepalive: could not connect to database {db.alias!r}: "
            f"{unreachable.what}.{before} Nothing was sent. {unreachable.advice}",
        )
    elif not twice:
        # Not tried again: it took too long, so the server (or something in front of
        # it) accepted the connection but did not answer.
        add_note(
            error,
            f"django-dbkeepalive: a new connection to database {db.alias!r} was accepted "
            "but the server did not complete the login in time (a server that is "
            "overloaded, starting, or stalled; a proxy or load balancer with no healthy "
            f"server behind it).{before} Nothing was sent. Check the server; the "
            "client's connect_timeout and read_timeout bound this wait.",
        )
    else:
        cause = _failure_cause(db, found, exc, pymysql=False)
        add_note(
            error,
            f"django-dbkeepalive: a new connection to database {db.alias!r} was lost twice "
            "while it was being opened and set up, before any statement of yours was sent: "
            f"{cause.what} (behind a proxy or load balancer, a server that is down or "
            f"restarting looks like this too).{before} Nothing was sent. {_RETRY_LATER}",
        )
    return error


_RETRY_LATER = "Retry in a moment; the next statement connects again by itself."
# A session lost this soon after connecting was closed by the server (a KILL, a reset):
# connecting again is worth it. One lost later timed out waiting for the server, and
# another try would only wait as long again.
_SETUP_RETRY_WITHIN = 1.0


def _raise_connect_error(db: Any, exc: Exception, found: Disconnect, *, twice: bool) -> NoReturn:
    error = _connect_error(db, exc, found, twice=twice)
    if error is None or error is exc:
        raise exc
    raise error.with_traceback(exc.__traceback__) from exc


def _wrap_connect(original: Callable[..., Any]) -> Callable[..., Any]:
    def connect(self: Any) -> Any:
        started = _now()
        try:
            return original(self)
        except Exception as exc:
            if self.connection is not None:
                _drop_half_open(self)
            found = classify(exc)
            if self.vendor != "mysql" or found is None:
                raise
            if (
                found.kind == "unreachable"
                or network_evidence(exc) == "timeout"
                or _now() - started >= _SETUP_RETRY_WITHIN
            ):
                _raise_connect_error(self, exc, found, twice=False)
            logger.info(
                "dbkeepalive: a new %r connection was lost while being set up (error %s); "
                "connecting again (nothing of the caller's was sent)",
                self.alias,
                found.code,
            )
        # The server accepted the connection, then the session died during the login or
        # Django's setup statements (a KILL, a reset): nothing of the caller's was sent,
        # so connecting once more is safe.
        try:
            return original(self)
        except Exception as exc:
            if self.connection is not None:
                _drop_half_open(self)
            found = classify(exc)
            if self.vendor != "mysql" or found is None:
                raise
            _raise_connect_error(self, exc, found, twice=True)

    connect.__wrapped__ = original  # type: ignore[attr-defined]
    return connect


# ------------------------------------------------------------- explicit checks


def check_idle(db: Any) -> None:
    """Close ``db``'s connection if it is dead, idle past its limit or obsolete (outside a
    transaction only), whether or not the automatic guard is on. Used at the edges of a
    unit of work; costs a round trip only when a ping is due."""
    if db.connection is None or _in_transaction(db):
        return
    _before(db, force=True)


def enable(db: Any) -> None:
    """Guard ``db`` even when ``AUTO_GUARD`` is off, until the matching :func:`disable`."""
    db._dbk_forced += 1
    _arm(db)


def disable(db: Any) -> None:
    """End one :func:`enable` scope."""
    db._dbk_forced = max(0, db._dbk_forced - 1)
    _arm(db)


def take_idle_report(db: Any) -> tuple[float, float] | None:
    """``(idle, limit)`` of the longest idle past the limit since the last call, or None.

    ``limit`` is ``inf`` when the server closed the connection before the guard had read
    its ``wait_timeout``."""
    report: tuple[float, float] | None = db._dbk_over
    db._dbk_over = None
    return report


def close_connection(db: Any) -> None:
    """Close ``db``'s connection; a dead one without waiting on its socket."""
    if db.connection is None:
        return
    if db._dbk_lost is not None or _peek(db):
        _detach_socket(db)
    try:
        db.close()
    except Exception:  # closing a dead link: nothing to save
        if not db.in_atomic_block:
            db.connection = None


def notify_closed(db: Any, reason: str) -> None:
    """Report a connection that Django's own checks closed on the guard's behalf."""
    idle = _now() - db._dbk_last if db._dbk_last not in (INF, -INF) else 0.0
    _recycled(db, reason, idle)


# ------------------------------------------------------------------------- fork


def _after_fork_in_child() -> None:
    """Drop every connection inherited from the parent without touching its socket."""
    if not _installed:
        return
    me = threading.get_ident()
    for db in list(_open_wrappers):
        try:
            conn = db.connection
            if conn is None:
                continue
            _detach_socket(db, fork=True)
            if db.in_atomic_block and getattr(db, "_thread_ident", None) == me:
                # Forked inside a transaction: the child cannot continue it.
                _mark_lost(db, _FORK)
                db._dbk_on = True
                continue
            db.connection = None
            db._dbk_conn = None
            db._dbk_due = -INF
            _open_wrappers.discard(db)
            if getattr(db, "_thread_ident", None) == me:
                with contextlib.suppress(Exception):
                    conn.close()  # its socket is /dev/null now: frees the descriptor only
                connection_recycled.send(sender=db.alias, reason="fork", idle=0.0)
            else:
                _inherited.append(conn)
        except Exception:  # never break the child over a connection it won't use
            logger.debug("dbkeepalive: could not detach a connection after fork", exc_info=True)


# ---------------------------------------------------------------------- install


_PATCHES: list[tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = [
    (backend_utils.CursorWrapper, "execute", _wrap_execute),
    (backend_utils.CursorWrapper, "executemany", _wrap_executemany),
    (backend_utils.CursorWrapper, "callproc", _wrap_callproc),
    (BaseDatabaseWrapper, "set_autocommit", _wrap_set_autocommit),
    (BaseDatabaseWrapper, "commit", _wrap_commit),
    (BaseDatabaseWrapper, "rollback", _wrap_rollback),
    (BaseDatabaseWrapper, "connect", _wrap_connect),
]
# Patched on the MySQL backend's DatabaseWrapper, when it can be imported.
_MYSQL_PATCHES: list[tuple[str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = [
    ("is_usable", _safe_is_usable),
    ("get_connection_params", _wrap_get_connection_params),
]


def install() -> None:
    """Install the guard in this process (idempotent). Called by the app's ``ready()``."""
    global _installed
    with _install_lock:
        if _installed:
            return
        for name, value in _CLASS_DEFAULTS.items():
            setattr(BaseDatabaseWrapper, name, value)
        for cls, name, wrap in _PATCHES:
            original = cls.__dict__[name]
            _originals[f"{cls.__name__}.{name}"] = original
            setattr(cls, name, wrap(original))
        if "close" not in backend_utils.CursorWrapper.__dict__:
            backend_utils.CursorWrapper.close = _cursor_close  # type: ignore[attr-defined]
        try:
            from django.db.backends.mysql.base import DatabaseWrapper as MySQLWrapper
        except Exception:  # no MySQL driver installed: nothing of MySQL to guard
            pass
        else:
            for name, wrap in _MYSQL_PATCHES:
                original = MySQLWrapper.__dict__[name]
                _originals[f"mysql.{name}"] = original
                setattr(MySQLWrapper, name, wrap(original))
        connection_created.connect(_on_connection_created, dispatch_uid="dbkeepalive-guard")
        setting_changed.connect(_on_setting_changed, dispatch_uid="dbkeepalive-settings")
        _installed = True
        # Existing connections (opened before the app was ready) get their state now.
        for db in connections.all(initialized_only=True):
            if db.connection is not None:
                _on_connection_created(type(db), db)


def uninstall() -> None:
    """Remove the guard (for tests and benchmarks that compare with plain Django)."""
    global _installed
    with _install_lock:
        if not _installed:
            return
        for cls, name, _wrap in _PATCHES:
            setattr(cls, name, _originals.pop(f"{cls.__name__}.{name}"))
        if backend_utils.CursorWrapper.__dict__.get("close") is _cursor_close:
            del backend_utils.CursorWrapper.close  # type: ignore[attr-defined]
        for name, _wrap in _MYSQL_PATCHES:
            original = _originals.pop(f"mysql.{name}", None)
            if original is not None:
                from django.db.backends.mysql.base import DatabaseWrapper as MySQLWrapper

                setattr(MySQLWrapper, name, original)
        connection_created.disconnect(dispatch_uid="dbkeepalive-guard")
        setting_changed.disconnect(dispatch_uid="dbkeepalive-settings")
        for name in _CLASS_DEFAULTS:
            if name in BaseDatabaseWrapper.__dict__:
                delattr(BaseDatabaseWrapper, name)
        _installed = False


def is_installed() -> bool:
    """Whether the guard is installed in this process."""
    return _installed


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
