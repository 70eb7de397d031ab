"""The guard as methods of a database backend, for projects that forbid patching.

Owns: :class:`GuardedWrapperMixin`, a mixin for a backend's ``DatabaseWrapper`` whose
methods (``connect``, ``set_autocommit``, ``commit``, ``rollback``, the cursors'
``execute``, ``executemany``, ``callproc`` and ``close``) apply the same rules as the
patched ones of :mod:`.wrappers`, by overriding instead of replacing, and always calling
``super()`` (so another library's patch of Django's classes still sees every call).
While the guard is also installed by patching (the default, ``DBKEEPALIVE["PATCH"]``),
the patched methods do the work and these only pass through: nothing runs twice.
Must never import: anything above the guard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.db.backends.utils import CursorDebugWrapper, CursorWrapper

from . import connect as connecting
from . import transactions
from .failures import failed, statement_failed
from .families import family_of
from .rules import before
from .state import OFF, now, state_of
from .wrappers import ACTIVE, PATCHED, cursor_close

__all__ = ["GuardedCursorMixin", "GuardedWrapperMixin"]

if TYPE_CHECKING:  # what the mixins are mixed into
    from django.db.backends.base.base import BaseDatabaseWrapper as _WrapperBase

    _CursorBase = CursorWrapper
else:
    _WrapperBase = _CursorBase = object


def _off(db: Any) -> Any:
    """The state to guard ``db`` with here: ``OFF`` when the patches do it (or the guard
    is not installed, or does not know ``db``)."""
    if PATCHED[0] or not ACTIVE[0]:
        return OFF
    return state_of(db) or OFF


class GuardedCursorMixin(_CursorBase):
    """``execute``, ``executemany``, ``callproc`` and ``close`` of a guarded cursor."""

    def _statement(self, name: str, sql: Any, params: Any, many: bool) -> Any:
        db = self.db
        state = _off(db)
        peek = many or not isinstance(sql, str) or sql[:1] != "S"
        if state is not OFF and (
            now() > state.due or ((poll := state.poll) is not None and peek and poll(0))
        ):
            before(db, self)
        method = getattr(super(), name)
        try:
            return method(sql, params)
        except BaseException as exc:
            if state is OFF:
                raise
            return statement_failed(db, self, exc, lambda: method(sql, params), (sql, params, many))

    def execute(self, sql: Any, params: Any = None) -> Any:
        return self._statement("execute", sql, params, False)

    def executemany(self, sql: Any, param_list: Any) -> Any:
        return self._statement("executemany", sql, param_list, True)

    def callproc(self, procname: Any, params: Any = None, kparams: Any = None) -> Any:
        db = self.db
        state = _off(db)
        if state is not OFF and (
            now() > state.due or ((poll := state.poll) is not None and poll(0))
        ):
            before(db, self)
        try:
            return super().callproc(procname, params, kparams)
        except BaseException as exc:
            if state is OFF:
                raise
            return failed(db, self, exc, None)  # a procedure may write: never re-run

    #: Django's ``CursorWrapper`` has no ``close()`` (the driver's is reached through
    #: ``__getattr__``); with patching, the guard adds this same function to it.
    close = cursor_close


class GuardedCursorWrapper(GuardedCursorMixin, CursorWrapper):
    """Django's ``CursorWrapper``, guarded."""


class GuardedCursorDebugWrapper(GuardedCursorMixin, CursorDebugWrapper):
    """Django's ``CursorDebugWrapper`` (``DEBUG``, ``assertNumQueries``), guarded."""


class GuardedWrapperMixin(_WrapperBase):
    """Put first in the bases of a backend's ``DatabaseWrapper``.

    Example::

        from django.db.backends.mysql import base

        class DatabaseWrapper(GuardedWrapperMixin, base.DatabaseWrapper):
            pass
    """

    #: Recognised by the checks and the diagnose command as guarded without patching.
    dbkeepalive_native = True

    def make_cursor(self, cursor: Any) -> Any:
        return GuardedCursorWrapper(cursor, self)

    def make_debug_cursor(self, cursor: Any) -> Any:
        return GuardedCursorDebugWrapper(cursor, self)

    def connect(self) -> Any:
        if PATCHED[0] or not ACTIVE[0]:
            return super().connect()
        return connecting.connect(self, lambda db: super().connect())

    def is_usable(self) -> bool:
        if PATCHED[0] or not ACTIVE[0]:
            return bool(super().is_usable())
        return family_of(self).is_usable(
            self, lambda: bool(super(GuardedWrapperMixin, self).is_usable())
        )

    def get_connection_params(self) -> Any:
        params = super().get_connection_params()
        if PATCHED[0] or not ACTIVE[0]:
            return params
        return family_of(self).connection_params(self, params)

    def set_autocommit(
        self, autocommit: bool, force_begin_transaction_with_broken_autocommit: bool = False
    ) -> Any:
        if _off(self) is OFF:
            return super().set_autocommit(
                autocommit, force_begin_transaction_with_broken_autocommit
            )
        return transactions.set_autocommit(
            self,
            lambda db, value, force: super().set_autocommit(value, force),
            autocommit,
            force_begin_transaction_with_broken_autocommit,
        )

    def commit(self) -> Any:
        state = _off(self)
        if state is OFF:
            return super().commit()
        transactions.before_commit(self, state)
        try:
            result = super().commit()
        except Exception as exc:
            transactions.commit_failed(self, exc)
        transactions.transaction_ended(self, state_of(self) or state)
        return result

    def rollback(self) -> Any:
        state = _off(self)
        if state is OFF:
            return super().rollback()
        transactions.rolling_back(self, state)
        try:
            result = super().rollback()
        except Exception as exc:
            transactions.rollback_failed(self, exc)
            result = None
        transactions.transaction_ended(self, state_of(self) or state)
        return result
