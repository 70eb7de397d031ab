"""The interface between the guard's rules and one family of databases.

A :class:`Family` says, for one vendor (MySQL/MariaDB, PostgreSQL...): which driver
error is a lost connection, what the server's idle limits are (read when a connection
opens), what a socket that turned readable while idle means, how to ping, and how to end
a session the server may still hold after the network went silent. A :class:`Driver`
is the thin adapter for one driver of a family (its socket, its ping). The rules in
:mod:`~django_dbkeepalive.guard.rules` use nothing else, so a vendor or a driver is
added here without touching them. This base class is also the family of every vendor
the guard knows nothing about: no socket, no server limits, only ``CONN_MAX_AGE``.
Must never import: the rules, the wrappers or a concrete family.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import re
from collections.abc import Callable
from typing import Any

from ..causes import Cause, explain
from ..disconnects import Disconnect
from ..state import ConnectionState

__all__ = ["Driver", "Family", "Statement", "limit_for"]

logger = logging.getLogger("django_dbkeepalive")

#: ``(sql, params, many)`` of a statement, when the rules know it.
Statement = tuple[Any, Any, bool]


class Driver:
    """One driver of a family: how to reach its socket and ping its connections.

    ``modules`` are the names of the DB-API modules it is known by (what the backend's
    ``Database`` attribute is called, never the connection's class: instrumentation
    such as OpenTelemetry wraps connections in proxy objects).
    """

    name = "unknown"
    modules: tuple[str, ...] = ()
    #: The distribution that installs it, for its version.
    distribution: str | None = None
    #: A read that waited out the client's read_timeout is reported like a server close.
    timeouts_look_like_closes = False
    #: The oldest release the guard supports (of :attr:`distribution`); ``()``: any.
    minimum_version: tuple[int, ...] = ()
    #: ``False`` for a family's stand-in for a driver module it does not know.
    known = True

    def unsupported(self, module: Any) -> str | None:
        """Why the guard cannot protect this driver's connections (``None``: it can)."""
        if not self.known:
            name = getattr(module, "__name__", None) or "no DB-API module"
            return f"its driver module ({name}) is not one the guard knows"
        if self.minimum_version and self.distribution:
            version = installed_version(self.distribution)
            if version and version < self.minimum_version:
                have, need = (".".join(map(str, v)) for v in (version, self.minimum_version))
                return f"{self.name} {have} is older than {need}, the oldest the guard supports"
        return None

    def fileno(self, conn: Any) -> int | None:
        """The connection's socket descriptor, or ``None`` (no round trip, no lock)."""
        try:
            fileno = getattr(conn, "fileno", None)
            return None if fileno is None else int(fileno())
        except Exception:
            return None

    def ping(self, conn: Any) -> None:
        """Ask the server whether the session is alive; raises if it is not. Never
        reconnects by itself (that would skip Django's session setup)."""
        conn.ping()

    def confirm_autocommit(self, conn: Any) -> None:
        """After ``SET autocommit`` returned: raise the driver's lost-connection error
        if the driver may have ignored one (it matters: ``SET autocommit=1`` commits)."""

    def thread_id(self, conn: Any) -> int | None:  # pragma: no cover - every MySQL driver's own
        """The server's id of the session (MySQL's thread id), or ``None``."""
        return None

    def server_version(self, conn: Any) -> str:
        """The server's version string from the handshake (no round trip), or ``""``."""
        try:
            return str(conn.get_server_info())
        except Exception:
            return ""

    def cursor_owner(self, cursor: Any) -> Any:
        """The connection a driver cursor belongs to (``None``: none, or unknown)."""
        return getattr(cursor, "connection", None)

    def orphan_cursor(self, cursor: Any) -> None:
        """Unbind a driver cursor from its connection: its ``close()`` then does nothing."""
        cursor.connection = None

    def reading(self, conn: Any) -> bool:
        """Whether the driver has not read a result to its end yet (an unbuffered
        cursor): the server's rows are then expected on the idle socket."""
        return False

    def accepts_option(self, name: str) -> bool:
        """Whether its ``connect()`` accepts the client option ``name`` (a timeout that
        ``CLIENT_TIMEOUTS`` would add)."""
        return True

    def connection_params(self, params: dict[str, Any], alias: str) -> dict[str, Any]:
        """The keyword arguments Django passes to the driver's ``connect()``, adjusted."""
        return params

    def client_library(self, module: Any) -> str | None:
        """The C client library it is built on, for the diagnose command."""
        return None


class UnknownDriver(Driver):
    """A family's stand-in for a driver module it does not know: not guarded."""

    known = False


@functools.cache
def installed_version(distribution: str) -> tuple[int, ...]:
    """The leading numbers of an installed distribution's version (``()``: unknown)."""
    try:
        text = importlib.metadata.version(distribution)
    except Exception:
        return ()
    found = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(n) for n in found.group().split(".")) if found else ()


class Family:
    """The family of databases the guard knows nothing about: only ``CONN_MAX_AGE``."""

    #: Django's ``vendor`` of the backends of this family (``None``: any other).
    vendor: str | None = None
    #: What the diagnose command and messages call it.
    title = "other"
    drivers: tuple[Driver, ...] = ()
    fallback_driver = Driver()
    #: The server setting after which it closes an idle session, for messages.
    timeout_setting = "wait_timeout"
    #: The one that applies inside a transaction.
    tx_timeout_setting = "wait_timeout"
    #: The guard watches the socket: the peek, the kernel's idle count, keepalive.
    watches_socket = False
    #: Pings a connection idle past ``PING_AFTER``, or over a local socket past its limit.
    can_ping = False
    #: How many bytes of an unsolicited message tell what it is.
    peek_size = 0
    #: The code of a connection found closed before anything was sent on it.
    gone_code = -1

    # ------------------------------------------------------------------ drivers

    def driver_for(self, module: Any) -> Driver:
        """The adapter of the backend's DB-API module (``db.Database``)."""
        name = str(getattr(module, "__name__", "") or "")
        for driver in self.drivers:
            if name in driver.modules or name.split(".")[0] in driver.modules:
                return driver
        return self.fallback_driver

    def unguarded(self, db: Any) -> str | None:
        """Why the guard cannot protect ``db``'s connections, or ``None``: a backend of
        this family whose driver it does not know, or one older than it supports."""
        if not self.drivers:
            return None  # another vendor: only CONN_MAX_AGE, said by check I001
        module = getattr(db, "Database", None)
        return self.driver_for(module).unsupported(module)

    # ---------------------------------------------------------------- errors

    # Excluded from coverage below: defaults of the interface that both families
    # override and that the rules never ask of another vendor's (no socket, no ping, no
    # refusal, never lost).

    def classify(self, exc: BaseException) -> Disconnect | None:  # pragma: no cover
        """A :class:`Disconnect` when this one exception (not its causes) of a driver
        of this family means the connection is lost, else ``None``."""
        return None

    def classify_chain(self, exc: BaseException) -> Disconnect | None:
        """:func:`~django_dbkeepalive.guard.families.classify`: the one predicate, over
        the exception and its causes, for every family."""
        from . import classify

        return classify(exc)

    def failure_cause(self, state: ConnectionState, found: Disconnect) -> Cause:
        """Why a statement failed with ``found``, when nothing more precise is known."""
        return explain(found.kind, wait=state.wait, setting=self.timeout_setting)

    # --------------------------------------------------------- server limits

    def opened(self, db: Any, state: ConnectionState) -> None:
        """A guarded connection just opened: read the server's idle limits (one round
        trip at most). A lost connection raises; any other failure is logged and leaves
        the limits unknown."""

    def limits_unreadable(self, db: Any, exc: BaseException) -> None:
        """Reading the limits failed, not for a lost connection (a proxy that cannot
        answer it): the guard relies on the peek (and the ping) alone."""
        if self.classify_chain(exc) is not None:
            raise exc
        logger.warning(
            "dbkeepalive: could not read %s on %r (%s); set DBKEEPALIVE['WAIT_TIMEOUT'] "
            "to give the guard an idle limit",
            self.timeout_setting,
            db.alias,
            type(exc).__name__,
        )

    def may_learn_late(self, state: ConnectionState, in_transaction: bool) -> bool:
        """Whether limits still unknown (the connection opened while nothing guarded
        it) may be read now, before the next statement."""
        return False

    def learn_late(self, db: Any, state: ConnectionState) -> None:
        """Read them now; only a lost connection raises."""

    def tx_timeout(self, state: ConnectionState) -> float | None:
        """The idle time after which the server ends a session inside a transaction."""
        return None

    def limits_text(self, state: ConnectionState) -> str:  # pragma: no cover
        """The limits that apply, for the message of a transaction lost to idling."""
        return "the server's idle timeout is not known"

    # ------------------------------------------------------- the idle socket

    def readable_cause(  # pragma: no cover
        self, db: Any, state: ConnectionState
    ) -> tuple[str, bytes] | None:
        """Why the idle socket is readable: ``(what, head)`` as
        :func:`~django_dbkeepalive.guard.sockets.peek_head` says, or ``None`` when it
        only holds a message for the driver and the session is alive."""
        return None

    def closed_cause(self, state: ConnectionState, what: str, head: bytes, idle: float) -> Cause:
        """The words for a session the server closed while it was idle."""
        wait = state.wait
        if wait is not None and what != "data" and idle >= wait:
            kind = "idle_timeout"
        else:
            kind = {"eof": "closed", "reset": "reset", "dead_peer": "dead_peer"}.get(what, "gone")
        return explain(kind, idle=idle, wait=wait, setting=self.timeout_setting)

    # ------------------------------------------------------------ the server

    def ping(self, db: Any, state: ConnectionState) -> None:
        """Ask the server whether the session is alive; raises if it is not."""

    def refusal(self, db: Any, state: ConnectionState, exc: BaseException) -> Cause | None:
        """When ``exc`` is the server refusing a statement before running it because of
        what this node is now (read-only after a failover, a cluster node not ready),
        why (kind ``"read_only"`` or ``"not_ready"``); else ``None``. May ask the server
        (one round trip, on that error only)."""
        return None

    def node_state(self, db: Any) -> str:  # pragma: no cover
        """What the node of ``db``'s connection says about its role, for a message."""
        return ""

    def end_zombie(self, db: Any, state: ConnectionState) -> None:
        """End, from a new connection, a lost session the server may still hold open."""

    def size_refusal(
        self,
        db: Any,
        state: ConnectionState,
        found: Disconnect,
        statement: Statement | None,
        in_transaction: bool,
        read_limit: Callable[[], int | None] | None = None,
    ) -> Cause | None:
        """When the server refused the statement for its size, why (else ``None``).
        ``read_limit`` reads the server's limit on a new connection, if it is needed."""
        return None

    def dropped(self, db: Any, *, fork: bool) -> None:
        """The guard detached the connection's socket, or is closing a live connection
        to a node that refused a statement: anything else to let go of (so that no
        pool hands the connection out again)."""

    # ------------------------------------------------------ backend methods

    def is_usable(self, db: Any, original: Callable[[], bool]) -> bool:
        """The backend's ``is_usable()``; ``original`` is Django's."""
        return original()

    def connection_params(self, db: Any, params: dict[str, Any]) -> dict[str, Any]:
        """What the backend passes to the driver's ``connect()``, adjusted."""
        return self.driver_for(getattr(db, "Database", None)).connection_params(params, db.alias)

    def backend_patches(self) -> list[tuple[type, str, Any]]:
        """``(class, method name, wrap)`` pairs the guard installs on this family's
        backend classes: ``wrap(original)`` returns the replacement."""
        return []

    def guarded_methods(self) -> list[tuple[type, str]]:
        """``(class, method name)`` pairs of this family's backend classes that the
        guard wraps with its own vendor-neutral wrapper of that name (``create_cursor``:
        a driver whose ``cursor()`` makes a round trip)."""
        return []


def limit_for(wait: float, margin: float) -> float:
    """The guard's idle limit for a server idle timeout ``wait``: ``wait - margin``,
    but never less than half of ``wait`` (a margin as large as the timeout itself would
    leave no usable window)."""
    return wait - min(margin, wait / 2)
