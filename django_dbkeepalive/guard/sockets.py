"""Socket primitives: look at a driver's socket without disturbing the driver.

Owns: finding a connection's descriptor and proving it is still the same socket, the
non-blocking peek, what a readable socket holds (without consuming it), the kernel's
count of how long the peer has been silent (TCP_INFO), TCP keepalive, and detaching a
socket (pointing its descriptor at ``/dev/null``) so a dead or shared one is never
waited on. Works on descriptors and a :class:`~.state.ConnectionState` only.
Must never import: Django, the rules, the wrappers or any database family.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any

from .state import ConnectionState

__all__ = [
    "KEEPALIVE_PROBES",
    "detach",
    "forget",
    "kernel_idle",
    "local_address",
    "make_poller",
    "peek",
    "peek_head",
    "set_keepalive",
    "socket_family",
    "socket_id",
    "verified_fd",
]

logger = logging.getLogger("django_dbkeepalive")

#: Unanswered TCP keepalive probes after which the kernel closes the connection.
KEEPALIVE_PROBES = 3

Poll = Callable[[int], list[tuple[int, int]]]


def socket_id(fd: int | None) -> tuple[int, int] | None:
    """``(fd, inode)`` of an open descriptor, or ``None``."""
    if fd is None or fd < 0:
        return None
    try:
        return fd, os.fstat(fd).st_ino
    except OSError:
        return None


def verified_fd(state: ConnectionState) -> int | None:
    """The socket's fd, only if it is still the socket recorded when it opened.

    A driver that closed its socket by itself may have let the number be reused by an
    unrelated file; this makes sure the guard never touches that one.
    """
    known = state.sock
    if known is None:
        return None
    fd, ino = known
    # Socket inode numbers are unique among open sockets, so a matching inode proves
    # the number still names our socket. (No driver call: mysqlclient's fileno() takes a
    # per-connection lock that another thread may hold, and in a forked child forever.)
    try:
        if os.fstat(fd).st_ino != ino:
            return None
    except OSError:
        return None
    return int(fd)


def make_poller(fd: int) -> Poll | None:
    """``poll(0)`` of one socket: readable (or no longer open) while no statement is in
    flight means the server closed the session. The object is made once per
    connection, so a peek on the hot path is one C call and one ``poll()`` syscall.
    ``None`` where the platform has no ``poll()``."""
    module: Any = select
    if not hasattr(module, "poll"):
        # eventlet's monkey patching deletes select.poll; its pristine copy of the
        # module keeps it. A poll(0) never blocks, so it is safe under any event hub.
        patcher = sys.modules.get("eventlet.patcher")
        module = None if patcher is None else patcher.original("select")
        if not hasattr(module, "poll"):  # pragma: no cover - a platform without poll()
            return None
    poller = module.poll()
    poller.register(fd, module.POLLIN | module.POLLPRI)
    return poller.poll  # type: ignore[no-any-return]


def peek(state: ConnectionState) -> bool | None:
    """``True`` when the socket is readable with no statement in flight (closed by the
    server, or an unsolicited packet), ``False`` when quiet, ``None`` when it cannot be
    told. Costs one ``poll()``; never blocks."""
    fd = verified_fd(state)
    if fd is None:
        return None
    poll = make_poller(fd)
    if poll is None:  # pragma: no cover - a platform without poll()
        return None
    try:
        return bool(poll(0))
    except (OSError, ValueError):  # pragma: no cover - poll() of a verified open socket
        return True


def forget(state: ConnectionState) -> None:
    """The state no longer refers to a socket (closed, detached or replaced)."""
    state.sock = None
    state.poller = None
    state.poll = None


def detach(state: ConnectionState) -> bool:
    """Make the connection's socket unusable in this process only; ``True`` if it was.

    The descriptor is pointed at ``/dev/null``: whatever the driver does next (its
    goodbye on close, a ``shutdown()``) goes nowhere, so a dead or silently dropped peer
    is never waited on, and a socket shared with a parent process is left intact.
    """
    fd = verified_fd(state)
    forget(state)
    if fd is None:
        return False
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)
    return True


@contextlib.contextmanager
def _socket_for(fd: int) -> Iterator[socket.socket]:
    """A Python socket object on a duplicate of ``fd``, for getsockopt/setsockopt/peek.

    The duplicate shares the driver's open file description: creating a socket object
    sets ``O_NONBLOCK`` on it when ``socket.setdefaulttimeout()`` was called, which
    would change the driver's socket too, so its file status flags are restored."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    sock = socket.socket(fileno=os.dup(fd))
    try:
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            if fcntl.fcntl(fd, fcntl.F_GETFL) != flags:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def socket_family(state: ConnectionState) -> int | None:
    """``socket.AF_INET``, ``AF_INET6``, ``AF_UNIX`` ... of the connection's socket."""
    fd = verified_fd(state)
    if fd is None:
        return None
    try:
        with _socket_for(fd) as sock:
            return int(sock.family)
    except OSError:
        return None


def local_address(state: ConnectionState) -> tuple[str, int] | None:
    """``(ip, port)`` of the connection's own end, for a TCP socket (else ``None``): what
    the server shows as the client's address when nothing sits in between."""
    fd = verified_fd(state)
    if fd is None:
        return None
    try:
        with _socket_for(fd) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return None
            address = sock.getsockname()
    except OSError:
        return None
    return str(address[0]), int(address[1])


def kernel_idle(state: ConnectionState) -> float | None:
    """Seconds since the server last sent data on this TCP connection (Linux TCP_INFO's
    ``tcpi_last_data_recv``), or ``None`` when the socket is not TCP or it is unknown.
    The state's :attr:`~.state.ConnectionState.idle_shift` is added once (testing)."""
    fd = verified_fd(state)
    if fd is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        with _socket_for(fd) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return None
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:  # pragma: no cover - TCP_INFO of an open TCP socket (Linux)
        return None
    if len(info) < 56:  # pragma: no cover - a kernel older than 2.6.x
        return None
    # struct tcp_info: 8 bytes of u8 fields, then u32s; tcpi_last_data_recv is the 12th.
    last_data_recv_ms: int = struct.unpack_from("=I", info, 52)[0]
    shift, state.idle_shift = state.idle_shift, 0.0
    return last_data_recv_ms / 1000.0 + shift


def peek_head(state: ConnectionState, size: int) -> tuple[str, bytes]:
    """What made an idle connection's socket readable, without consuming anything the
    driver could need: ``("eof", b"")`` (the server closed it), ``("reset", b"")`` (an
    RST), ``("dead_peer", b"")`` (the kernel gave up on unanswered TCP keepalive probes),
    ``("data", head)`` (up to ``size`` bytes the server sent unasked) or
    ``("unknown", b"")``. One ``recv(MSG_PEEK)``, only once the socket is readable."""
    fd = verified_fd(state)
    if fd is None:
        return "unknown", b""
    try:
        with _socket_for(fd) as sock:
            try:
                head = sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except ConnectionResetError:
                return "reset", b""
            # ETIMEDOUT: TCP keepalive probes went unanswered. Needs packets lost on the
            # path, which no userspace fault proxy on loopback can make.
            except TimeoutError:  # pragma: no cover
                return "dead_peer", b""
            except OSError:  # pragma: no cover - another socket error of a peek
                return "unknown", b""
    except OSError:  # pragma: no cover - dup() of a verified open socket
        return "unknown", b""
    return ("data", head) if head else ("eof", b"")


def set_keepalive(state: ConnectionState, idle: int, alias: str) -> None:
    """Turn on TCP keepalive on the connection's socket: probes after ``idle`` seconds
    without traffic, every ``max(1, idle // 3)`` seconds, 3 unanswered ones close it."""
    fd = verified_fd(state)
    if fd is None:
        return
    try:
        with _socket_for(fd) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (
                ("TCP_KEEPIDLE", idle),
                ("TCP_KEEPINTVL", max(1, idle // 3)),
                ("TCP_KEEPCNT", KEEPALIVE_PROBES),
            ):
                if hasattr(socket, name):  # pragma: no branch - Linux has all three
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except (OSError, ValueError, TypeError, OverflowError) as exc:  # pragma: no cover
        # Settings validation bounds the value; a kernel may still refuse it.
        logger.warning("dbkeepalive: could not enable TCP keepalive on %r (%s)", alias, exc)
