"""Recording and asserting the guard's recycles (``connection_recycled``) in tests.

Owns: :func:`record_recycles`, :func:`assert_recycles`, :class:`RecycleLog`, the
warnings of the toolkit, and refusing to run without the guard.
Must never import: :mod:`.faults`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Collection, Iterable, Iterator
from typing import Any, NamedTuple

from django.core.exceptions import ImproperlyConfigured

from .. import guard
from ..fresh import _aliases
from ..signals import REASONS, connection_recycled


class TestingWarning(UserWarning):
    """Base class of the warnings of :mod:`django_dbkeepalive.testing`."""


class TransactionLostWarning(TestingWarning):
    """:func:`kill_connection` was called inside a transaction: the transaction is lost
    (and in a ``TestCase``, so is the class-level one the later tests rely on)."""


class ExpireInTransactionWarning(TestingWarning):
    """:func:`expire_connection` was called inside a transaction, where a connection
    idle past its limit but within the server's ``wait_timeout`` changes nothing."""


def _require_guard(helper: str) -> None:
    """Raise before doing anything when the guard is not installed in this process."""
    from django.apps import apps

    if not apps.is_installed("django_dbkeepalive"):
        why = "'django_dbkeepalive' is not in INSTALLED_APPS"
    elif not guard.is_installed():
        why = "the guard was removed from this process (guard.uninstall())"
    else:
        return
    raise ImproperlyConfigured(
        f"django-dbkeepalive: {helper}() needs the connection guard, but {why}. Add "
        "'django_dbkeepalive' to INSTALLED_APPS in the settings your tests run with."
    )


class Recycle(NamedTuple):
    """One ``connection_recycled`` signal: the alias, the reason and the idle seconds."""

    alias: str
    reason: str
    idle: float


class RecycleLog(list[Recycle]):
    """The recycles seen so far (a list of :class:`Recycle`, in the order they were sent,
    from every thread)."""

    def __init__(self, recycles: Iterable[Recycle] = ()) -> None:
        super().__init__(recycles)
        # The recycles of the aliases a `using` filter left out (for messages only).
        self._left_out: list[Recycle] = []

    @property
    def reasons(self) -> list[str]:
        """The reasons, in order: ``["idle", "disconnected"]``."""
        return [r.reason for r in self]

    def of(self, alias: str) -> RecycleLog:
        """Only the recycles of ``alias``."""
        return RecycleLog(r for r in self if r.alias == alias)


@contextlib.contextmanager
def record_recycles(using: str | Collection[str] | None = None) -> Iterator[RecycleLog]:
    """Collect the guard's recycles (of ``using``: an alias, several, or all) while the
    block runs, from every thread. An unknown alias raises ``ConnectionDoesNotExist``.

    Example::

        with record_recycles("default") as log:
            run_job()
        assert log.reasons == ["idle"]
    """
    _require_guard("record_recycles")
    aliases = _alias_set(using)
    log = RecycleLog()
    lock = threading.Lock()

    def receiver(sender: Any, reason: str, idle: float, **kwargs: Any) -> None:
        recycle = Recycle(str(sender), reason, float(idle))
        with lock:
            if aliases is None or sender in aliases:
                log.append(recycle)
            else:
                log._left_out.append(recycle)

    connection_recycled.connect(receiver, weak=False, dispatch_uid=("dbkeepalive", id(log)))
    try:
        yield log
    finally:
        connection_recycled.disconnect(dispatch_uid=("dbkeepalive", id(log)))


@contextlib.contextmanager
def assert_recycles(
    count: int | None = None,
    reasons: Collection[str] | None = None,
    using: str | Collection[str] | None = None,
) -> Iterator[RecycleLog]:
    """Assert what the guard recycled while the block ran.

    ``count``: how many recycles (``None``: at least one when ``reasons`` is also
    ``None``, otherwise not checked). ``reasons``: a list, compared in order with the
    reasons seen (``["disconnected", "idle"]``), or a set, that every recycle's reason is
    one of; each must be one of :data:`django_dbkeepalive.signals.REASONS` (a bare
    string is refused: write ``["idle"]``). ``using``: count only these aliases (an
    unknown alias raises ``ConnectionDoesNotExist``). Nothing is asserted when the block
    raises. Yields the :class:`RecycleLog`.

    Example::

        with assert_recycles(1, reasons=["idle"], using="default"):
            Item.objects.count()
        with assert_recycles(0):  # the hot path: nothing recycled
            Item.objects.count()
    """
    if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
        raise TypeError(f"django-dbkeepalive: count must be an int or None, not {count!r}")
    if count is not None and count < 0:
        raise ValueError(f"django-dbkeepalive: count must be 0 or more, not {count}")
    _require_guard("assert_recycles")
    expected = _checked_reasons(reasons)
    with record_recycles(using) as log:
        yield log
    seen = _listed(log) or "none"
    where = "" if using is None else f" of {sorted(_alias_set(using) or ())}"
    if log._left_out:
        seen += f" (not counted, other aliases: {_listed(log._left_out)})"
    if count is not None:
        assert len(log) == count, f"expected {count} recycle(s){where}, saw {len(log)}: {seen}"
    elif expected is None:
        assert log, f"expected at least one recycle{where}, saw {seen}"
    if isinstance(expected, frozenset):
        odd = [r for r in log.reasons if r not in expected]
        assert not odd, f"expected only reasons {sorted(expected)}{where}, saw {seen}"
    elif expected is not None:
        assert log.reasons == expected, f"expected recycles {expected}{where}, saw {seen}"


def _checked_reasons(reasons: Collection[str] | None) -> list[str] | frozenset[str] | None:
    """``reasons`` as a list (in order) or a frozenset (any order), validated."""
    if reasons is None:
        return None
    if isinstance(reasons, (str, bytes)):
        raise TypeError(
            f"django-dbkeepalive: reasons must be a list (compared in order) or a set of "
            f"reasons, not the string {reasons!r}: write reasons=[{reasons!r}]."
        )
    checked = frozenset(reasons) if isinstance(reasons, (set, frozenset)) else list(reasons)
    unknown = [r for r in checked if r not in REASONS]
    if unknown:
        raise ValueError(
            f"django-dbkeepalive: unknown recycle reason(s) {', '.join(map(repr, unknown))}; "
            f"the reasons are {', '.join(map(repr, REASONS))}."
        )
    return checked


def _listed(recycles: Iterable[Recycle]) -> str:
    return ", ".join(f"{r.alias}:{r.reason} (idle {r.idle:.1f}s)" for r in recycles)


def _alias_set(using: str | Collection[str] | None) -> set[str] | None:
    """The aliases of ``using`` (None: all); an unknown one raises ConnectionDoesNotExist."""
    if using is None:
        return None
    return set(_aliases(using))
