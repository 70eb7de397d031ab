"""What counts as a lost connection, and the error raised when one is lost in a transaction.

:func:`classify` is the one place that decides "is this a disconnect" for every driver:
it looks at the MySQL error code (never at the text: libmariadb says "Server has gone
away" where libmysqlclient and PyMySQL say "MySQL server has gone away"), at PostgreSQL's
SQLSTATE (psycopg and psycopg2), at the driver's exception class, and down the
``__cause__`` chain that Django's error wrapper builds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.db import OperationalError

__all__ = [
    "Cause",
    "ConnectionLostInTransaction",
    "Disconnect",
    "add_note",
    "classify",
    "explain",
    "is_disconnect",
    "is_read",
    "is_retryable_read",
]

# Codes whose statement cannot have been executed: the client failed to send it, the
# connection was already closed on this side, or the server told us it had closed the
# session before reading it.
_NOT_SENT = {
    0: "closed",  # InterfaceError(0, ''): the driver's connection is already closed
    2002: "unreachable",  # CR_CONNECTION_ERROR (socket)
    2003: "unreachable",  # CR_CONN_HOST_ERROR
    2006: "gone",  # CR_SERVER_GONE_ERROR: the write failed or the link is closed
    3032: "offline",  # ER_SERVER_OFFLINE_MODE
    4031: "idle_timeout",  # ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8.0.24+)
}
# Codes after which the connection is dead but the statement may have run.
_AMBIGUOUS = {
    1053: "shutdown",  # ER_SERVER_SHUTDOWN
    1152: "aborted",  # ER_ABORTING_CONNECTION
    1158: "network",  # ER_NET_READ_ERROR
    1159: "network",  # ER_NET_READ_INTERRUPTED (net_read_timeout)
    1160: "network",  # ER_NET_ERROR_ON_WRITE
    1161: "network",  # ER_NET_WRITE_INTERRUPTED (net_write_timeout)
    1184: "aborted",  # ER_NEW_ABORTING_CONNECTION
    1927: "killed",  # ER_CONNECTION_KILLED (MariaDB)
    2013: "lost",  # CR_SERVER_LOST
    2055: "lost",  # CR_SERVER_LOST_EXTENDED
    3169: "killed",  # ER_SESSION_WAS_KILLED (MySQL 8)
}
# The server closes the connection after a packet over max_allowed_packet. The statement
# did not run, but running it again would fail the same way.
_TOO_LARGE = {1153: "too_large", 2020: "too_large"}

#: Every error code treated as a lost connection.
DISCONNECT_CODES = frozenset({*_NOT_SENT, *_AMBIGUOUS, *_TOO_LARGE} - {0})


@dataclass(frozen=True)
class Disconnect:
    """Why a connection is gone: ``code``, ``kind`` and whether the statement ran.

    ``not_sent`` is true when the statement provably never reached the server, so it is
    safe to run it again on a new connection whatever it was.
    """

    code: int
    kind: str
    not_sent: bool
    retryable: bool
    #: PostgreSQL's SQLSTATE (``"57P01"`` ...), when the driver gave one.
    sqlstate: str | None = None

    @property
    def label(self) -> str:
        """The error's code for a log line: the SQLSTATE, or the MySQL error code."""
        if self.sqlstate:
            return self.sqlstate
        return str(self.code) if self.code > 0 else "(no code)"


def _code_of(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    return None


# PostgreSQL SQLSTATEs that end the session. The server sends them as FATAL errors, then
# closes the connection.
_PG_NOT_SENT = {
    "57P05": "idle_timeout",  # idle_session_timeout: sent while idle, before the statement
    "25P03": "idle_timeout",  # idle_in_transaction_session_timeout: likewise
    "57P03": "unreachable",  # cannot_connect_now (the server is starting or stopping)
    "08001": "unreachable",  # sqlclient_unable_to_establish_sqlconnection
    "08004": "unreachable",  # sqlserver_rejected_establishment_of_sqlconnection
    "08003": "closed",  # connection_does_not_exist
}
_PG_AMBIGUOUS = {
    "57P01": "terminated",  # admin_shutdown: pg_terminate_backend(), or a fast shutdown
    "57P02": "shutdown",  # crash_shutdown: another backend crashed
    "08000": "lost",  # connection_exception
    "08006": "lost",  # connection_failure
    "08007": "lost",  # transaction_resolution_unknown
}


def _classify_pg(exc: BaseException) -> Disconnect | None:
    """A psycopg (3) or psycopg2 error: by SQLSTATE; without one, by class (the drivers
    raise ``OperationalError`` with no SQLSTATE only for connection failures, and
    psycopg2 ``InterfaceError`` for a connection already closed)."""
    state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    if isinstance(state, str) and state:
        if state in _PG_NOT_SENT:
            return Disconnect(-1, _PG_NOT_SENT[state], True, True, sqlstate=state)
        if state in _PG_AMBIGUOUS or state.startswith("08"):
            kind = _PG_AMBIGUOUS.get(state, "lost")
            return Disconnect(-1, kind, False, True, sqlstate=state)
        return None
    # The class itself, not its bases: a subclass names one SQLSTATE (psycopg2's
    # SerializationFailure is an OperationalError too), which is not a lost session.
    name = type(exc).__name__
    if name == "InterfaceError":
        return Disconnect(0, "closed", not_sent=True, retryable=True)
    if name in ("OperationalError", "ConnectionTimeout"):
        return Disconnect(-1, "lost", not_sent=False, retryable=True)
    return None


def classify(exc: BaseException) -> Disconnect | None:
    """Return a :class:`Disconnect` when ``exc`` means the connection is lost.

    Example::

        try:
            cursor.execute("SELECT 1")
        except Exception as exc:
            if classify(exc):
                ...  # the connection is gone; reconnect before the next statement
    """
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 6:
        seen += 1
        code = _code_of(current)
        name = type(current).__name__
        if code == 0 and name == "InterfaceError":
            return Disconnect(0, "closed", not_sent=True, retryable=True)
        if code in _NOT_SENT and code != 0:
            return Disconnect(code, _NOT_SENT[code], not_sent=True, retryable=True)
        if code in _AMBIGUOUS:
            return Disconnect(code, _AMBIGUOUS[code], not_sent=False, retryable=True)
        if code in _TOO_LARGE:
            return Disconnect(code, _TOO_LARGE[code], not_sent=True, retryable=False)
        if isinstance(current, ConnectionError):
            # A socket error that a driver let through unwrapped.
            return Disconnect(-1, "network", not_sent=False, retryable=True)
        if type(current).__module__.startswith("psycopg"):  # psycopg, psycopg2
            return _classify_pg(current)
        current = current.__cause__
    return None


def network_evidence(exc: BaseException) -> str | None:
    """``"timeout"`` or ``"reset"`` when the exception, or the socket error a driver
    raised it from, says which (PyMySQL keeps it in ``__context__`` and in its text;
    mysqlclient on libmariadb says neither, see :func:`explain`). Only refines the
    wording of a message: whether it is a disconnect is :func:`classify`'s business."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        seen += 1
        if isinstance(current, TimeoutError):
            return "timeout"
        if isinstance(current, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return "reset"
        args: tuple[object, ...] = getattr(current, "args", ())
        text = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        lowered = text.lower()
        if "timed out" in lowered:
            return "timeout"
        if "reset by peer" in lowered or "broken pipe" in lowered:
            return "reset"
        current = current.__cause__ or current.__context__
    return None


def tls_failure(exc: BaseException) -> bool:
    """``True`` when connecting failed in the TLS handshake (a certificate or TLS
    setting), which drivers report like an unreachable server (PyMySQL: 2003)."""
    import ssl

    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        seen += 1
        if isinstance(current, ssl.SSLError):
            return True
        args: tuple[object, ...] = getattr(current, "args", ())
        text = " ".join(a for a in args if isinstance(a, str))
        if "SSL" in text or "TLS" in text or "certificate" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


@dataclass(frozen=True)
class Cause:
    """Why a connection was lost, in words for a message: ``kind`` (stable, e.g.
    ``"killed"``), ``what`` happened (a clause) and ``advice`` (what to do)."""

    kind: str
    what: str
    advice: str


_RETRY_LATER = "Retry once the server is back; the next statement reconnects by itself."
_ADVICE = {
    "killed": (
        "If that was not intended, find out what kills connections (an administrator, "
        "a query killer such as pt-kill, a proxy or a failover tool)."
    ),
    "terminated": (
        "If that was not intended, find out what terminates sessions (an administrator, "
        "a job calling pg_terminate_backend(), a failover tool) or whether the server "
        "restarted."
    ),
    "closed": (
        "If that was not intended, check the server's error log for a restart and find "
        "out what kills connections."
    ),
    "shutdown": _RETRY_LATER,
    "unreachable": _RETRY_LATER,
    "offline": _RETRY_LATER,
    "reset": (
        "Check what sits between the application and the server (proxy, load balancer, "
        "firewall, NAT) and its idle timeouts; TCP_KEEPALIVE keeps idle flows alive."
    ),
    "timeout": (
        "If the statement is slow, raise the client's read_timeout above its duration; "
        "otherwise check the server's load and the network path (a firewall or NAT that "
        "drops idle flows: set TCP_KEEPALIVE)."
    ),
    "lost": "Check the server's error log and the network path if it happens again.",
    "gone": "Check the server's error log and the network path if it happens again.",
    "network": "Check the network path between the application and the server.",
    "dead_peer": "Check the network path between the application and the server.",
    "aborted": "Check the server's error log (aborted connections).",
    "interrupted": "Open a new connection (the next statement outside a transaction does).",
    "fork": "Open transactions in the process that uses them; fork outside atomic blocks.",
}


def _seconds(value: float) -> str:
    return f"{value:.1f}s" if value < 10 else f"{value:.0f}s"


def explain(
    kind: str,
    *,
    idle: float | None = None,
    wait: float | None = None,
    read_timeout: float | None = None,
    setting: str = "wait_timeout",
) -> Cause:
    """The words for a :class:`Cause` of ``kind`` (the kinds of :class:`Disconnect`,
    plus ``"closed"``, ``"reset"`` and ``"timeout"``), with what is known: the idle time
    before the loss, the server's idle timeout ``wait`` (named ``setting``: PostgreSQL's
    is ``idle_session_timeout``), the client's ``read_timeout``.

    Example::

        explain("killed").what  # 'the server killed the session (KILL ...)'
    """
    idle_s = idle if idle is not None and 0 < idle < float("inf") else None
    wait_s = wait if wait is not None and 0 < wait < float("inf") else None
    if kind == "reset" and idle_s is not None and wait_s is not None and idle_s >= wait_s:
        kind = "idle_timeout"  # MariaDB resets a connection it closes for inactivity
    if kind == "idle_timeout":
        if idle_s is not None and wait_s is not None:
            what = (
                f"the server closed it after it sat idle {_seconds(idle_s)}, longer than "
                f"the server's {setting} ({wait_s:g}s)"
            )
        else:
            what = f"the server closed it for inactivity (its {setting})"
        return Cause(
            kind,
            what,
            "Keep idle periods (slow work between two statements) shorter than the "
            f"server's {setting}, or raise {setting}.",
        )
    what = {
        "killed": "the server killed the session (KILL)",
        "terminated": ("the server terminated the session (pg_terminate_backend(), or a shutdown)"),
        "closed": (
            "the server closed the session while it was idle: it was killed (KILL), or "
            "the server shut down or restarted"
        ),
        "shutdown": "the server is shutting down or restarting",
        "unreachable": "the server cannot be reached: it is down or restarting, or the network is",
        "offline": "the server is in offline mode",
        "reset": (
            "the network connection was reset (by the server's host, a proxy, a load "
            "balancer or a firewall)"
        ),
        "timeout": (
            "no reply within the client's read_timeout"
            + (f" ({read_timeout:g}s)" if read_timeout else "")
            + ": the statement ran longer than that, the server stalled, or the network "
            "dropped the connection silently"
        ),
        "lost": ("the server closed it (KILL, a restart or a crash) or the network reset it"),
        "gone": (
            "the server had already closed the connection (idle past its wait_timeout, "
            "KILL, a restart, or a network reset)"
        ),
        "network": "a network error between the client and the server",
        "dead_peer": (
            "the network path to the server is dead: TCP keepalive probes went unanswered"
        ),
        "aborted": "the server aborted the connection",
        "interrupted": (
            "a statement was interrupted (e.g. Ctrl-C) while in flight, so the "
            "connection's protocol state is unknown"
        ),
        "fork": "the process was forked inside the transaction; the child cannot continue it",
    }.get(kind, f"the connection was lost ({kind})")
    advice = _ADVICE.get(kind, _ADVICE["lost"])
    if kind == "reset" and idle_s is not None and idle_s >= 1 and wait_s is None:
        # Before the guard has read wait_timeout, a reset after a pause may be either.
        what = (
            f"the connection was reset after it sat idle {_seconds(idle_s)}: by the server "
            "if its wait_timeout is shorter than that (MariaDB resets connections it "
            "closes for inactivity), otherwise by a proxy, load balancer or firewall"
        )
        advice = "Keep idle periods shorter than the server's wait_timeout (or raise it). " + advice
    return Cause(kind, what, advice)


def add_note(exc: BaseException, text: str) -> None:
    """Attach ``text`` to ``exc`` as a note (PEP 678): tracebacks show it under the error.

    On Python 3.10, which has no ``add_note()``, the note is stored in ``__notes__`` the
    same way (for code and tests that read it), but tracebacks there do not print it.
    """
    if hasattr(exc, "add_note"):
        exc.add_note(text)
        return
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
    notes.append(text)
    exc.__notes__ = notes  # type: ignore[attr-defined,unused-ignore]


def is_disconnect(exc: BaseException) -> bool:
    """``True`` when ``exc`` (or its ``__cause__``) means the connection is lost."""
    return classify(exc) is not None


_LEADING_NOISE = r"(?:\s+|/\*.*?\*/|--[^\n]*(?:\n|$)|#[^\n]*(?:\n|$)|\()*"
_READ_START = re.compile(
    _LEADING_NOISE + r"(SELECT|SHOW|DESCRIBE|DESC|EXPLAIN|WITH|VALUES|TABLE|CHECKSUM)\b",
    re.IGNORECASE | re.DOTALL,
)
# A read that changes something, or whose answer depends on the session it runs in,
# would give a different (wrong) answer on a new connection. (Locking reads, FOR UPDATE
# and LOCK IN SHARE MODE, are not among them: a read is only ever re-run outside a
# transaction, where the server releases their locks as soon as they return.)
_NOT_IDEMPOTENT = re.compile(
    r"\b(INTO|INSERT|UPDATE|DELETE|REPLACE"
    r"|GET_LOCK|RELEASE_LOCK|RELEASE_ALL_LOCKS|IS_USED_LOCK|IS_FREE_LOCK"
    r"|LAST_INSERT_ID|FOUND_ROWS|ROW_COUNT|CONNECTION_ID|NEXTVAL|SETVAL|LASTVAL"
    r"|NEXT\s+VALUE|PREVIOUS\s+VALUE)\b|@[A-Za-z_`'\"]",
    re.IGNORECASE,
)
_LOCKING_CLAUSE = re.compile(
    r"\bFOR\s+(?:UPDATE|SHARE)\b|\bLOCK\s+IN\s+SHARE\s+MODE\b", re.IGNORECASE
)


_WRITES = re.compile(r"\b(INSERT|UPDATE|DELETE|REPLACE|MERGE|INTO)\b", re.IGNORECASE)


def is_read(sql: object) -> bool:
    """``True`` for a statement that starts like a read (``SELECT``, ``SHOW`` ...) and
    writes nothing (not ``WITH ... INSERT``, not ``SELECT ... INTO``)."""
    if isinstance(sql, bytes):
        sql = sql.decode("utf-8", "replace")
    return (
        isinstance(sql, str)
        and bool(_READ_START.match(sql))
        and not _WRITES.search(_LOCKING_CLAUSE.sub(" ", sql))
    )


def is_retryable_read(sql: object) -> bool:
    """``True`` for a statement that only reads and whose answer is session-independent,
    so that running it again on a new connection, outside a transaction, gives the same
    answer.

    Example::

        is_retryable_read("SELECT * FROM app_item WHERE id = %s")  # True
        is_retryable_read("SELECT LAST_INSERT_ID()")  # False: depends on the session
    """
    if isinstance(sql, bytes):
        sql = sql.decode("utf-8", "replace")
    if not isinstance(sql, str):
        return False
    return bool(_READ_START.match(sql)) and not _NOT_IDEMPOTENT.search(
        _LOCKING_CLAUSE.sub(" ", sql)
    )


class ConnectionLostInTransaction(OperationalError):
    """The connection was lost (or idled out) inside a transaction.

    The server has rolled the transaction back, so nothing the block wrote since it
    began is saved. The guard never reconnects inside a transaction, because the rest
    of the block would then silently run outside it. Leave the atomic block (the
    connection works again after it) and run the whole unit of work again.

    Example::

        from django.db import transaction
        from django_dbkeepalive import ConnectionLostInTransaction

        try:
            with transaction.atomic():
                order.save()
                slow_call()  # longer than the server's wait_timeout
                order.lines.create(...)
        except ConnectionLostInTransaction:
            ...  # nothing was committed: retry the whole block, or report it
    """

    def __init__(
        self,
        message: str,
        *,
        alias: str = "default",
        idle: float | None = None,
        limit: float | None = None,
        code: int | None = None,
        cause: str | None = None,
    ) -> None:
        super().__init__(code if code is not None else 2013, message)
        self.alias = alias
        self.idle = idle
        self.limit = limit
        #: What happened, as a :class:`Cause` kind (``"killed"``, ``"idle_timeout"``,
        #: ``"timeout"``, ``"too_large"`` ...), or ``None`` when it is not known.
        self.cause = cause
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        # Picklable with its keyword-only arguments (Celery stores a task's exception in
        # the result backend; multiprocessing sends it to the parent).
        return (
            _rebuild_lost_in_transaction,
            (self.message, self.alias, self.idle, self.limit, self.args[0], self.cause),
            self.__dict__,
        )


def _rebuild_lost_in_transaction(
    message: str,
    alias: str,
    idle: float | None,
    limit: float | None,
    code: int | None,
    cause: str | None,
) -> ConnectionLostInTransaction:
    return ConnectionLostInTransaction(
        message, alias=alias, idle=idle, limit=limit, code=code, cause=cause
    )
