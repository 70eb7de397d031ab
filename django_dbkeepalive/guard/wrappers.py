"""The Django wrappers: where the guard meets Django's code.

- ``CursorWrapper.execute``, ``executemany`` and ``callproc`` (a new cursor, a reused
  cursor, the ORM), and ``close`` (Django has none);
- ``set_autocommit`` (entering ``transaction.atomic()`` sends ``SET autocommit=0`` before
  any cursor exists), ``commit``, ``rollback`` and ``connect`` of the database wrapper.

Each calls through the method it replaced, which may itself be another library's
wrapper (Sentry, OpenTelemetry, the debug toolbar patch the same methods): whichever
installs first, both see every call. A wrapper the guard has no state for is only
passed through. (Django's ``execute_wrappers`` hook was measured too: its
``functools.partial`` and extra frame per statement cost about twice the guard's whole
hot path, so the guard does not use it; it still applies, inside.)
Must never import: a concrete family, or anything above the guard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db.backends import utils as backend_utils

from . import connect as connecting
from . import transactions
from .failures import failed, statement_failed
from .families import classify
from .rules import before, cursor_owner, mark_lost, ours
from .state import ATTRIBUTE, OFF, now, state_of

__all__ = ["BACKEND_WRAPS", "CLASS_PATCHES", "is_djangos_own"]

Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


def _execute_failed(
    db: Any, cursor: Any, exc: BaseException, original: Any, sql: Any, params: Any, many: bool
) -> Any:
    # Kept out of the wrappers: a closure over their arguments there would turn them
    # into cell variables, which costs ~1,000 instructions on every statement.
    def run() -> Any:
        return original(cursor, sql, params)

    return statement_failed(db, cursor, exc, run, (sql, params, many))


def _check_odd(db: Any, cursor: Any, sql: Any) -> Any:
    """The hot path's exceptions, out of its way: a wrapper with no state (opened while
    the guard was not installed) is passed through; SQL that is no string (psycopg's
    ``sql.Composed`` has no ``[0]``) is checked as any other statement."""
    state = getattr(db, ATTRIBUTE, None)
    if state is None:
        return OFF
    if isinstance(sql, (str, bytes)):
        raise
    before(db, cursor)
    return state


def is_djangos_own(method: Any) -> bool:
    """Whether ``method`` is Django's own ``CursorWrapper.execute`` (by its code object:
    a wrapper made with ``functools.wraps``, as Sentry's, copies its name, not its code)."""
    code = getattr(method, "__code__", None)
    return (
        code is not None
        and code.co_name == "execute"
        and code.co_filename == getattr(backend_utils, "__file__", None)
        and hasattr(backend_utils.CursorWrapper, "_execute_with_wrappers")
    )


def _wrap_execute(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hot path of every statement: one clock read and one comparison, plus a
    ``poll(0)`` of the socket before a statement that could not be run again (one that
    does not start with ``S``: never sent on a session the server has closed). SQL that
    is no string (psycopg's ``sql.Composed`` has no ``[0]``) is peeked at in the
    ``except``, which costs nothing until it runs (Python 3.11+).

    It calls through ``original``, whatever it is (another library's wrapper, such as
    Sentry's, installed before the guard). When ``original`` is Django's own method, its
    one-line body (``_execute_with_wrappers``, so ``execute_wrappers`` still apply) is
    run here instead of called: the same effect, one Python frame less per statement
    (measured under callgrind: about a third of the guard's cost). The two bodies below
    differ only in that line, chosen once (a test per statement costs ~150 instructions).
    """
    if is_djangos_own(original):

        def execute(self: Any, sql: Any, params: Any = None, _now: Any = now) -> Any:
            db = self.db
            try:
                if _now() > (state := db._dbkeepalive).due or (
                    (poll := state.poll) is not None and sql and sql[0] != "S" and poll(0)
                ):
                    before(db, self)
            except (TypeError, AttributeError):
                state = _check_odd(db, self, sql)
            try:
                return self._execute_with_wrappers(sql, params, many=False, executor=self._execute)
            except BaseException as exc:
                if state is OFF:
                    raise
                return _execute_failed(db, self, exc, original, sql, params, False)

    else:

        def execute(self: Any, sql: Any, params: Any = None, _now: Any = now) -> Any:
            db = self.db
            try:
                if _now() > (state := db._dbkeepalive).due or (
                    (poll := state.poll) is not None and sql and sql[0] != "S" and poll(0)
                ):
                    before(db, self)
            except (TypeError, AttributeError):
                state = _check_odd(db, self, sql)
            try:
                return original(self, sql, params)
            except BaseException as exc:
                if state is OFF:
                    raise
                return _execute_failed(db, self, exc, original, sql, params, False)

    return execute


def _wrap_executemany(original: Callable[..., Any]) -> Callable[..., Any]:
    def executemany(self: Any, sql: Any, param_list: Any, _now: Any = now) -> Any:
        db = self.db
        state = getattr(db, ATTRIBUTE, OFF)
        if _now() > state.due or ((poll := state.poll) is not None and poll(0)):
            before(db, self)
        try:
            return original(self, sql, param_list)
        except BaseException as exc:
            if state is OFF:
                raise
            return _execute_failed(db, self, exc, original, sql, param_list, True)

    return executemany


def _wrap_callproc(original: Callable[..., Any]) -> Callable[..., Any]:
    def callproc(self: Any, procname: Any, params: Any = None, kparams: Any = None) -> Any:
        db = self.db
        state = state_of(db)
        if state is None:
            return original(self, procname, params, kparams)
        if now() > state.due or ((poll := state.poll) is not None and poll(0)):
            before(db, self)
        try:
            return original(self, procname, params, kparams)
        except BaseException as exc:
            return failed(db, self, exc, None)  # a procedure may write: never re-run

    return callproc


def _wrap_set_autocommit(original: Callable[..., Any]) -> Callable[..., Any]:
    def set_autocommit(
        self: Any, autocommit: bool, force_begin_transaction_with_broken_autocommit: bool = False
    ) -> Any:
        if state_of(self) is None:
            return original(self, autocommit, force_begin_transaction_with_broken_autocommit)
        return transactions.set_autocommit(
            self, original, autocommit, force_begin_transaction_with_broken_autocommit
        )

    return set_autocommit


def _wrap_commit(original: Callable[..., Any]) -> Callable[..., Any]:
    def commit(self: Any) -> Any:
        state = state_of(self)
        if state is None:
            return original(self)
        transactions.before_commit(self, state)
        try:
            result = original(self)
        except Exception as exc:
            transactions.commit_failed(self, exc)
        transactions.transaction_ended(self, self._dbkeepalive)
        return result

    return commit


def _wrap_rollback(original: Callable[..., Any]) -> Callable[..., Any]:
    def rollback(self: Any) -> Any:
        state = state_of(self)
        if state is None:
            return original(self)
        transactions.rolling_back(self, state)
        try:
            result = original(self)
        except Exception as exc:
            transactions.rollback_failed(self, exc)
            result = None
        transactions.transaction_ended(self, self._dbkeepalive)
        return result

    return rollback


def _wrap_connect(original: Callable[..., Any]) -> Callable[..., Any]:
    def connect(self: Any) -> Any:
        if not ACTIVE[0]:
            return original(self)  # uninstalled while another library wraps this one
        return connecting.connect(self, original)

    return connect


def _wrap_create_cursor(original: Callable[..., Any]) -> Callable[..., Any]:
    """A backend whose driver's ``cursor()`` asks the server first (a round trip) fails
    there, before any statement, on a connection the server closed: nothing was sent,
    so outside a transaction the guard replaces the connection and makes the cursor on
    the new one; inside one, the transaction is lost (``ConnectionLostInTransaction``)."""

    def create_cursor(self: Any, name: Any = None) -> Any:
        state = state_of(self)
        # The statement's own check, before the driver's round trip: a connection idle
        # past its limit, or closed by the server, is replaced first.
        if (
            state is not None
            and ours(self, state)
            and state.on
            and (now() > state.due or ((poll := state.poll) is not None and poll(0)))
        ):
            before(self)
            if self.connection is None:
                self.ensure_connection()
        try:
            return original(self, name)
        except Exception as exc:
            state = state_of(self)
            if state is None or not state.on or not ours(self, state):
                raise
            return failed(self, None, exc, lambda: original(self, name))

    return create_cursor


#: The methods a family may ask to be wrapped on its own backends' classes
#: (:meth:`~.families.base.Family.guarded_methods`), by name.
BACKEND_WRAPS: dict[str, Wrap] = {"create_cursor": _wrap_create_cursor}

#: Whether the guard is installed: ``[True]`` between install() and uninstall().
ACTIVE = [False]
#: Whether it is installed by patching Django's classes (``DBKEEPALIVE["PATCH"]``).
PATCHED = [False]


def cursor_close(self: Any) -> Any:
    """``CursorWrapper.close()`` (Django has none: the driver's is reached through
    ``__getattr__``, outside Django's error wrapper). A cursor whose connection the guard
    replaced while it was open (an ORM ``iterator()`` whose loop body waited, then
    wrote) would otherwise raise the driver's raw 2006 from mysqlclient's close, after
    all the work succeeded: closing a cursor of a dead connection has nothing to save."""
    inner = self.cursor
    db = self.db
    owner = cursor_owner(self, db)
    try:
        return inner.close()
    except Exception as exc:
        state = state_of(db)
        found = classify(exc)
        if found is None and owner is None and isinstance(exc, ReferenceError):
            return None  # the driver cursor's connection (a weak proxy) no longer exists
        if found is None or state is None:
            raise
        if owner is not None and owner is db.connection and ours(db, state):
            if not state.on:
                raise  # the connection in use died, and nothing of ours handles it
            mark_lost(db, found)  # the next statement reconnects (or raises in a tx)
        return None


#: ``(class path, method name, wrap)``: the methods the guard replaces on Django's
#: classes, ``wrap(original)`` making the replacement.
CLASS_PATCHES: tuple[tuple[str, str, Wrap], ...] = (
    ("django.db.backends.utils.CursorWrapper", "execute", _wrap_execute),
    ("django.db.backends.utils.CursorWrapper", "executemany", _wrap_executemany),
    ("django.db.backends.utils.CursorWrapper", "callproc", _wrap_callproc),
    ("django.db.backends.base.base.BaseDatabaseWrapper", "set_autocommit", _wrap_set_autocommit),
    ("django.db.backends.base.base.BaseDatabaseWrapper", "commit", _wrap_commit),
    ("django.db.backends.base.base.BaseDatabaseWrapper", "rollback", _wrap_rollback),
    ("django.db.backends.base.base.BaseDatabaseWrapper", "connect", _wrap_connect),
)
