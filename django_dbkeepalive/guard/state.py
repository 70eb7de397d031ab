"""The guard's bookkeeping for one connection: a :class:`ConnectionState` per driver
connection, attached to Django's ``DatabaseWrapper`` as one attribute.

Owns: the fields the rules read and write, what carries over from a wrapper's previous
connection to its next one, and how a state is found from a wrapper (:func:`state_of`).
Data only. Must never import: the rules, the wrappers or the database families.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..conf import AliasSettings
    from .causes import Cause
    from .disconnects import Disconnect
    from .families.base import Driver, Family

__all__ = ["ATTRIBUTE", "INF", "OFF", "ConnectionState", "Session", "now", "state_of"]

INF = float("inf")
#: The clock of every idle time: monotonic, one C call.
now = time.monotonic
#: The one attribute the guard sets on a ``DatabaseWrapper``.
ATTRIBUTE = "_dbkeepalive"


@dataclass(frozen=True)
class Session:
    """Who a server session was, so that anything sent later on its behalf (a ``KILL``)
    provably reaches that very session and never a stranger's: its thread id (unique
    only within one server instance's lifetime), the server instance (MariaDB's
    ``server_uid``, MySQL's ``server_uuid``: ``server_id`` is not unique, most servers
    leave it at 1), the client's own TCP address (``None`` over a Unix socket) and when
    it opened (monotonic clock)."""

    thread_id: int
    instance: str | None
    local: tuple[str, int] | None
    opened: float


@dataclass(slots=True, eq=False)
class ConnectionState:
    """Everything the guard knows about one driver connection of one wrapper.

    Made when the connection opens (``connection_created``), or earlier, without a
    connection, when a scope guards a wrapper that has not connected yet. The fields
    marked *carried* move to the state of the wrapper's next connection.
    """

    #: The family of the database (MySQL/MariaDB, PostgreSQL, another).
    family: Family
    #: The adapter of the driver the backend uses.
    driver: Driver
    #: The alias's settings, resolved when the connection opened.
    cfg: AliasSettings | None
    #: The driver connection this state belongs to; ``None`` once the guard dropped it.
    conn: Any = None
    #: Why the guard cannot protect it (a driver it does not know, or too old): never on.
    unguarded: str | None = None
    #: Guarded: ``AUTO_GUARD``, or a scope (:attr:`forced`) that guards it anyway.
    on: bool = False
    #: The hot path takes the slow path once the clock passes this.
    due: float = INF
    #: ``poll(0)`` of the socket while guarded: peeked before statements not re-run.
    poll: Callable[[int], list[tuple[int, int]]] | None = None
    #: The same, made once per connection, whether guarded or not.
    poller: Callable[[int], list[tuple[int, int]]] | None = None
    #: When the slow path last saw a statement start on it.
    last: float = 0.0
    #: ``(fd, inode)`` of its socket, so that a reused descriptor is never touched.
    sock: tuple[int, int] | None = None
    #: The server's idle timeout for this session (``None``: not known yet; ``INF``: none).
    wait: float | None = None
    #: The server's idle timeout inside a transaction, where it differs (PostgreSQL).
    tx_wait: float | None = None
    #: The idle limit: ``wait`` minus the margin.
    limit: float | None = None
    #: The server's ``max_allowed_packet`` for this session (MySQL; ``None``: not read).
    max_packet: int | None = None
    #: The server session behind it, when the family records one (MySQL).
    session: Session | None = None
    #: Why the connection is known to be dead, once it is.
    lost: Disconnect | None = None
    #: COMMIT or ROLLBACK ended the transaction and no statement ran since.
    ended: bool = False
    #: Seconds the kernel's idle count is shifted by at the next check (testing only).
    idle_shift: float = 0.0
    #: *Carried*: scopes (middleware, ``fresh_connection``) that guard it although
    #: ``AUTO_GUARD`` is off.
    forced: int = 0
    #: *Carried*: the connection was lost in a transaction run by hand (autocommit off):
    #: the next one opens with autocommit off too.
    manual: bool = False
    #: *Carried*: ``(idle, limit)`` of the longest idle past the limit, for reports.
    over: tuple[float, float] | None = None
    #: Why the wrapper's last connection was lost (until the next one opens).
    why: Cause | None = None
    #: *Carried*: a lost session the server may still hold open, to end from the next one.
    zombie: Session | None = None
    #: *Carried*: connect at once, without riding through an outage (a diagnostic
    #: connection, which reports an unreachable server instead of waiting for it).
    no_connect_retry: bool = False

    def successor(
        self, family: Family, driver: Driver, cfg: AliasSettings | None, conn: Any
    ) -> ConnectionState:
        """The state of the wrapper's next connection, with the carried fields."""
        return ConnectionState(
            family,
            driver,
            cfg,
            conn,
            forced=self.forced,
            manual=self.manual,
            over=self.over,
            zombie=self.zombie,
            no_connect_retry=self.no_connect_retry,
        )


class _Off:
    """The state the hot path assumes for a wrapper the guard does not know (opened
    while it was not installed): never due, never peeked. The hot path finds out from
    the ``AttributeError`` (measured under callgrind: a class default of that name on
    Django's ``BaseDatabaseWrapper`` costs ~600 instructions on every statement)."""

    __slots__ = ()
    on = False
    due = INF
    poll = None


#: See :class:`_Off`.
OFF: Any = _Off()


def state_of(db: Any) -> ConnectionState | None:
    """The guard's state of a ``DatabaseWrapper``, or ``None`` when it has none."""
    state = getattr(db, ATTRIBUTE, None)
    return None if state is None or state is OFF else state
