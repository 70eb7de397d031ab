"""Why a connection was lost, in words: the kinds of loss, what happened, what to do.

Owns: :class:`Cause` and :func:`explain` (every sentence the guard says about a loss),
reading what a driver's exception tells about the network (:func:`network_evidence`,
:func:`tls_failure`) and attaching notes to exceptions (:func:`add_note`).
Must never import: Django, the rules, the wrappers or any database family.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Cause", "add_note", "explain", "network_evidence", "tls_failure"]


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
    "read_only": (
        "Point the alias's HOST at the primary through something that follows failovers "
        "(a virtual IP, a DNS name, a proxy): the guard reconnects through it."
    ),
    "not_ready": (
        "Connect through a proxy or load balancer that routes around a node that is not "
        "ready (HAProxy with a check of wsrep_ready): the guard reconnects through it."
    ),
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
    plus ``"closed"``, ``"reset"``, ``"timeout"`` and ``"hot_standby"``, PostgreSQL's
    ``"read_only"``), with what is known: the idle time before the loss, the server's
    idle timeout ``wait`` (named ``setting``: PostgreSQL's is ``idle_session_timeout``),
    the client's ``read_timeout``.

    Example::

        explain("killed").what  # 'the server killed the session (KILL ...)'
    """
    if kind == "hot_standby":  # PostgreSQL's read-only node: a "read_only" cause
        return Cause(
            "read_only",
            "the server refused the statement before running it because it is a hot "
            "standby (a replica: the endpoint still points at it after a failover)",
            _ADVICE["read_only"],
        )
    idle_s = idle if idle is not None and 0 < idle < float("inf") else None
    wait_s = wait if wait is not None and 0 < wait < float("inf") else None
    if kind in ("reset", "gone", "lost") and idle_s is not None and wait_s is not None:
        if idle_s >= wait_s:
            kind = "idle_timeout"  # MariaDB resets a connection it closes for inactivity
        elif kind == "gone":
            return Cause(
                kind,
                "the server had already closed the connection: it was killed (KILL), the "
                "server restarted, or the network reset it (not for inactivity: idle "
                f"{_seconds(idle_s)}, under the server's {setting} of {wait_s:g}s)",
                _ADVICE["closed"] + " " + _ADVICE["reset"],
            )
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
        "read_only": (
            "the server refused the statement before running it because it is read-only "
            "(a failover has made it a replica, or an administrator set read_only)"
        ),
        "not_ready": (
            "the node refused the statement before running it: it is not ready for "
            "application use (a Galera node outside the primary component)"
        ),
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
    if not hasattr(exc, "add_note"):  # pragma: no cover - Python 3.10 (tox), not make test's
        notes = getattr(exc, "__notes__", None)
        if not isinstance(notes, list):
            notes = []
        notes.append(text)
        exc.__notes__ = notes  # type: ignore[attr-defined,unused-ignore]
        return
    exc.add_note(text)
