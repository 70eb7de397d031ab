"""PyMySQL's "preferred" TLS context, built once per process and reused by every connect.

PyMySQL 1.2 prefers TLS when a connection is given no ssl option: every ``Connection()``
then calls ``Connection._create_ssl_ctx({})``, which builds a new
``ssl.create_default_context()`` (the system CA bundle loaded, tens of milliseconds of
CPU holding the GIL) only to set ``verify_mode = CERT_NONE`` and ``check_hostname =
False``, whether or not the server offers TLS. Every reconnect the guard makes paid it.

Owns: that context, built by PyMySQL itself (a ``Connection(defer_connect=True)`` with no
option, never connected: the very object PyMySQL would have built, with its verify mode,
hostname check, flags and options), once per process (built again in a forked child),
under a lock; and the one substitution: while :func:`arm` holds it for the next connect
of this thread (or task), PyMySQL's ``_create_ssl_ctx`` returns it when, and only when,
it is asked for the preferred mode's context (an empty ``dict``). Any other call
(explicit ssl options, an option file's ``ssl-*`` keys) runs PyMySQL's own code, and
``ssl_disabled`` never reaches it. Nothing else of PyMySQL's handshake changes: a server
that offers TLS gets TLS, one that does not is still spoken to in plain.
Must never import: the rules, the wrappers, the MySQL family module, or PyMySQL at
import time (only :func:`arm`, called for a PyMySQL connection, loads it).
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from typing import Any

__all__ = ["SSL_OPTIONS", "arm", "preferred_context", "wants_preferred"]

logger = logging.getLogger("django_dbkeepalive")

#: PyMySQL's ``connect()`` arguments about TLS: an alias that sets any of them (even to
#: ``None`` or ``False``: ``"ssl_disabled": False`` is the documented opt-out) is left
#: exactly as the user configured it.
SSL_OPTIONS = frozenset(
    {
        "ssl",
        "ssl_ca",
        "ssl_cert",
        "ssl_disabled",
        "ssl_key",
        "ssl_key_password",
        "ssl_verify_cert",
        "ssl_verify_identity",
    }
)

#: The context the next ``_create_ssl_ctx`` call of this thread or task may return.
_ARMED: contextvars.ContextVar[Any] = contextvars.ContextVar("dbkeepalive_tls", default=None)
#: ``[pid, lock, context]``: the process the context was built in (a forked child builds
#: its own, with a lock of its own: the parent's may have been held at the fork).
_CACHE: list[Any] = [None, threading.Lock(), None]
#: Marks PyMySQL's method once replaced, and holds the original.
_MARK = "_dbkeepalive_original"
#: PyMySQL has no preferred mode (1.1: no TLS without options) or looks different.
_UNSUPPORTED = object()


def wants_preferred(params: dict[str, Any]) -> bool:
    """Whether PyMySQL would connect ``params`` in its preferred mode as far as the
    alias says (no TLS option at all). An option file may still add ``ssl-*`` keys:
    PyMySQL then asks for another context, and the substitution does not apply."""
    return SSL_OPTIONS.isdisjoint(params)


def preferred_context() -> Any:
    """This process's copy of the context PyMySQL builds for a connection without TLS
    options, or ``None`` when the installed PyMySQL builds none (no preferred mode)."""
    pid = os.getpid()
    cache = _CACHE
    if cache[0] != pid:
        cache[:] = [pid, threading.Lock(), None]
    context = cache[2]
    if context is None:
        with cache[1]:
            context = cache[2]
            if context is None:
                context = cache[2] = _build()
    return None if context is _UNSUPPORTED else context


def _build() -> Any:
    """PyMySQL's own preferred-mode context, from a connection object that never
    connects; its method is replaced the first time (idempotent)."""
    try:
        from pymysql import connections

        cls = connections.Connection
        if not callable(getattr(cls, "_create_ssl_ctx", None)):  # pragma: no cover - < 1.2
            return _UNSUPPORTED
        probe = cls(defer_connect=True)
        context = getattr(probe, "ctx", None)
        preferred = probe.ssl is True and getattr(probe, "_ssl_required", True) is False
    except Exception:  # pragma: no cover - a PyMySQL that does not look like 1.2: leave it alone
        logger.debug("dbkeepalive: PyMySQL's TLS context is not cached", exc_info=True)
        return _UNSUPPORTED
    if context is None or not preferred:  # pragma: no cover - PyMySQL < 1.2
        return _UNSUPPORTED
    _replace(cls)
    return context


def _replace(cls: Any) -> None:
    original = cls.__dict__.get("_create_ssl_ctx")
    if original is None or getattr(original, _MARK, None) is not None:
        return

    def _create_ssl_ctx(self: Any, sslp: Any) -> Any:
        context = _ARMED.get()
        if context is not None:
            _ARMED.set(None)  # for this connect only
            if type(sslp) is dict and not sslp:  # the preferred mode's call, exactly
                return context
        return original(self, sslp)

    setattr(_create_ssl_ctx, _MARK, original)
    _create_ssl_ctx.__doc__ = original.__doc__
    cls._create_ssl_ctx = _create_ssl_ctx


def arm(params: dict[str, Any]) -> None:
    """The next PyMySQL connect of this thread (or task) reuses the process's preferred
    context, when ``params`` give no TLS option. Called at connect time only."""
    if wants_preferred(params):
        context = preferred_context()
        if context is not None:
            _ARMED.set(context)
