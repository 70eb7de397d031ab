"""Opening a connection: the guard's state for it, and connecting again through a short
outage.

Owns: what happens when Django opens a connection (``connection_created``: a new
:class:`~.state.ConnectionState`, the server's limits read once, TCP keepalive), and the
``connect()`` wrapper's rules: a connect that cannot reach the server, or whose session
died while its login or Django's setup statements ran, is tried again with a bounded
backoff (nothing of the caller's was sent); an error that reaches the caller says what
happened.
Must never import: a concrete family, the wrappers, or anything above the guard.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, NoReturn

from ..conf import conf
from . import fork, sockets
from .causes import network_evidence, tls_failure
from .disconnects import Disconnect
from .families import classify, driver_of, family_of
from .families.base import limit_for
from .messages import connect_error
from .rules import failure_cause
from .state import ATTRIBUTE, INF, ConnectionState, now, state_of

__all__ = ["connect", "connection_opened", "state_for"]

logger = logging.getLogger("django_dbkeepalive")

# A session lost this soon after connecting was closed by the server (a KILL, a reset):
# connecting again is worth it. One lost later timed out waiting for the server, and
# another try would only wait as long again.
SETUP_RETRY_WITHIN = 1.0
#: The backoff between connects while the server cannot be reached: doubling, capped.
FIRST_DELAY = 0.05
MAX_DELAY = 1.0


#: Every wrapper the guard has given a state, in every thread (to remove it again).
KNOWN: weakref.WeakSet[Any] = weakref.WeakSet()


def state_for(db: Any) -> ConnectionState:
    """``db``'s state, made (without a connection) if it has none yet."""
    state = state_of(db)
    if state is None:
        family = family_of(db)
        state = ConnectionState(family, driver_of(db, family), None)
        setattr(db, ATTRIBUTE, state)
        KNOWN.add(db)
    return state


def arm(db: Any, state: ConnectionState) -> None:
    """Whether the guard is on for the connection, and the hot path's thresholds."""
    cfg = state.cfg
    on = (
        cfg is not None
        and db.connection is not None
        and db.connection is state.conn
        and (cfg.auto_guard or state.forced > 0)
        and state.unguarded is None
    )
    state.on = on
    state.due = state.last + cfg.peek_after if on and cfg is not None else INF
    state.poll = state.poller if on else None


def connection_opened(db: Any) -> None:
    """Django opened a connection (``connection_created``): a new state for it, the
    server's limits read once, TCP keepalive."""
    previous = state_for(db)
    cfg = conf.for_alias(db.alias)
    family = family_of(db)
    state = previous.successor(family, driver_of(db, family), cfg, db.connection)
    state.unguarded = family.unguarded(db)
    setattr(db, ATTRIBUTE, state)
    KNOWN.add(db)
    state.last = now()
    if family.watches_socket:
        state.sock = sockets.socket_id(state.driver.fileno(db.connection))
        state.poller = None if state.sock is None else sockets.make_poller(state.sock[0])
    state.wait = cfg.wait_timeout
    if cfg.wait_timeout is not None:
        state.limit = limit_for(cfg.wait_timeout, cfg.margin)
    fork.track(db)
    arm(db, state)
    if cfg.tcp_keepalive and state.sock is not None:
        sockets.set_keepalive(state, cfg.tcp_keepalive, db.alias)
    if state.on and state.limit is None:
        family.opened(db, state)
    if state.manual:
        # The connection was lost in a transaction the code manages by hand; reopen it
        # in the same mode so later statements are not silently autocommitted.
        state.manual = False
        db.set_autocommit(False)


def _drop_half_open(db: Any) -> None:
    """Forget a connection whose setup failed (Django sets ``db.connection`` before it
    sends ``SET autocommit`` and its session setup): left in place, every later
    statement of this thread would use the dead session, and outside requests nothing
    repairs it (measured in the soak run: an APScheduler thread failed every run)."""
    conn = db.connection
    db.connection = None
    with contextlib.suppress(Exception):  # closing a session that died while being set up
        conn.close()


def _raise(db: Any, exc: Exception, found: Disconnect, *, attempts: int, waited: float) -> NoReturn:
    state = state_for(db)
    cause = failure_cause(db, state, found, exc)
    error = connect_error(db, exc, found, state.why, cause, attempts=attempts, waited=waited)
    if error is None or error is exc:
        raise exc
    raise error.with_traceback(exc.__traceback__) from exc


def _transient(found: Disconnect, exc: Exception, seconds: float) -> str | None:
    """Why a failed connect may be tried again (nothing was sent either way):
    ``"unreachable"`` (refused, or the server is starting or stopping), ``"setup"`` (the
    server accepted it, then the session died at once: a KILL, a reset, a restart);
    ``None`` when it would fail the same way (TLS, credentials) or waited out a timeout,
    which another try would only wait again."""
    if tls_failure(exc):
        return None
    if found.kind == "unreachable":
        return "unreachable"
    if (
        found.kind in ("lost", "gone", "closed", "network")
        and seconds < SETUP_RETRY_WITHIN
        and network_evidence(exc) != "timeout"
    ):
        return "setup"
    return None


def connect(db: Any, original: Callable[[Any], Any]) -> Any:
    """``connect()``, ridden through a short outage: a connect that cannot reach the
    server, or whose session died while Django set it up, is tried again (at once the
    first time a setup is lost, then with a backoff from 50 ms to 1 s) until
    ``RETRY_CONNECT_FOR`` seconds after the first failure; never inside an atomic block.
    The error that reaches the caller has a note saying what happened."""
    no_retry = db.in_atomic_block or state_for(db).no_connect_retry
    window = 0.0 if no_retry else conf.for_alias(db.alias).retry_connect_for
    first_failure: float | None = None
    delay = FIRST_DELAY
    attempts = 0
    setup_retried = False
    while True:
        attempts += 1
        started = now()
        try:
            result = original(db)
        except Exception as exc:
            if db.connection is not None:
                _drop_half_open(db)
            found = classify(exc)
            if found is None:
                raise
            first_failure = first_failure or started
            why = _transient(found, exc, now() - started)
            if why == "setup" and not setup_retried:
                setup_retried = True
                logger.info(
                    "dbkeepalive: a new %r connection was lost while being set up (error "
                    "%s); connecting again (nothing of the caller's was sent)",
                    db.alias,
                    found.code,
                )
                continue
            remaining = first_failure + window - now()
            if why is None or remaining <= 0:
                _raise(db, exc, found, attempts=attempts, waited=now() - first_failure)
            if attempts == 1 + setup_retried:
                logger.info(
                    "dbkeepalive: cannot connect to %r (error %s: %s); trying again for up to %gs",
                    db.alias,
                    found.code,
                    "the server cannot be reached" if why == "unreachable" else "lost at login",
                    window,
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, MAX_DELAY)
            continue
        if first_failure is not None:
            logger.info(
                "dbkeepalive: connected to %r after %d attempts in %.2fs",
                db.alias,
                attempts,
                now() - first_failure,
            )
        return result
