"""What a lost connection is, as data: :class:`Disconnect`.

Owns: the record of one loss (its code, its kind, whether the statement can have run)
and the few losses the guard itself declares (a fork, an interrupted statement). Which
driver error is a loss is decided by :func:`django_dbkeepalive.guard.families.classify`,
from the database families' tables.
Must never import: Django, the rules, the wrappers or any database family.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FORK", "UNKNOWN_STATE", "Disconnect"]


@dataclass(frozen=True)
class Disconnect:
    """Why a connection is gone: ``code``, ``kind`` and whether the statement ran.

    ``not_sent`` is true when the statement provably never reached the server, so it is
    safe to run it again on a new connection whatever it was; ``retryable`` is false when
    running it again would fail the same way (a statement over ``max_allowed_packet``).
    """

    code: int
    kind: str
    not_sent: bool
    retryable: bool
    #: PostgreSQL's SQLSTATE (``"57P01"`` ...), when the driver gave one.
    sqlstate: str | None = None
    #: The connection itself still works (a node that refused a statement): it is
    #: closed properly, so the server rolls its transaction back at once.
    alive: bool = False

    @property
    def label(self) -> str:
        """The error's code for a log line: the SQLSTATE, or the MySQL error code."""
        if self.sqlstate:
            return self.sqlstate
        return str(self.code) if self.code > 0 else "(no code)"


#: A connection inherited from the parent process, in a forked child.
FORK = Disconnect(0, "fork", not_sent=True, retryable=True)
#: A statement interrupted in flight (Ctrl-C): the protocol state is unknown.
UNKNOWN_STATE = Disconnect(0, "interrupted", not_sent=False, retryable=False)
