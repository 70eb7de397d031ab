"""A fault-injection TCP proxy for the tests (127.0.0.1 only, a free port, one thread).

``FaultProxy(target_port)`` forwards every flow (one client connection plus its own
connection to the server) unchanged until a test asks for a fault:

- :meth:`FaultProxy.reset_all` — every open flow is reset: both of its sockets are closed
  with ``SO_LINGER`` 0, so the client and the server each get an RST;
- :meth:`FaultProxy.cut_after_next_client_write` — a one-shot: the next chunk a client
  sends is forwarded to the server; the server's reply is never forwarded, and once the
  server has answered (so an autocommit write has committed), both sides are reset.
  The client sees a lost connection (2013) for a statement the server ran;
- :meth:`FaultProxy.blackhole` — the open flows stop forwarding in both directions and
  are never closed (what a NAT or firewall that dropped its state does); bytes that
  arrive on them are counted and discarded. New flows still work;
- :meth:`FaultProxy.set_latency` — every chunk is delayed by this many seconds.

All sockets are non-blocking and served by one ``selectors`` loop in a daemon thread;
controls run inside that loop (the calling thread waits for them), so a fault applies to
a consistent set of flows. Run ``python -m tests.proxy PORT`` for manual experiments.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
_CHUNK = 65536
_LINGER_RST = struct.pack("ii", 1, 0)
# How long a cut flow waits for the server's reply before resetting anyway.
_CUT_REPLY_TIMEOUT = 5.0


def _rst(sock: socket.socket | None) -> None:
    """Close ``sock`` so the peer gets a TCP RST rather than a FIN."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    with contextlib.suppress(OSError):
        sock.close()


@dataclass(eq=False)
class Flow:
    """One proxied client connection and the proxy's connection to the server for it."""

    id: int
    client: socket.socket
    upstream: socket.socket
    mode: str = "pass"  # "pass", "blackhole", "cut" (reply withheld), "closed"
    opened: float = field(default_factory=time.monotonic)
    # Chunks waiting to be written: (not before, data).
    to_server: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    to_client: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    bytes_up: int = 0  # client -> server, forwarded
    bytes_down: int = 0  # server -> client, forwarded
    dropped_up: int = 0  # client -> server, discarded (blackhole, cut)
    dropped_down: int = 0  # server -> client, discarded (blackhole, cut)
    cut_chunk_left: int = 0  # bytes of the cut chunk still to be written to the server
    cut_sent_at: float | None = None  # when the cut chunk was fully written
    client_eof: bool = False
    upstream_eof: bool = False
    how_closed: str = ""

    @property
    def open(self) -> bool:
        return self.mode != "closed"


class FaultProxy:
    """See the module docstring. ``port`` is the proxy's own port once started."""

    def __init__(self, target_port: int, target_host: str = HOST) -> None:
        if target_host not in (HOST, "localhost"):
            raise ValueError("the fault proxy only forwards to 127.0.0.1")
        self.target = (HOST, int(target_port))
        self.port = 0
        self.latency = 0.0
        self.flows: list[Flow] = []  # every flow ever accepted, in order
        self._live: dict[Flow, None] = {}  # the open ones (ordered set)
        self.cuts = 0  # cut faults completed (both sides reset)
        self.refused = 0  # clients reset because the server could not be reached
        self._ids = itertools.count(1)
        self._cut_armed = False
        self._cut_skip = 0
        self._cut_again = (0, 0)  # (cuts left to arm after this one, their skip)
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], list[Any], threading.Event]]
        self._commands = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cut_done = threading.Condition()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, 0))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._wake_r.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ, ("accept", None))
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop and close every socket (open flows with an RST)."""
        if self._thread is None:
            return
        with contextlib.suppress(TimeoutError):
            self._call(self._stop)
        self._thread.join(5)
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- controls

    def reset_all(self) -> int:
        """Reset every open flow (RST to both sides); returns how many."""
        return int(self._call(self._reset_all))

    def cut_after_next_client_write(self, skip: int = 0, times: int = 1) -> None:
        """Arm the one-shot cut described in the module docstring. ``skip``: forward
        this many client chunks first (``skip=1`` on a new flow passes the handshake's
        login packet and cuts the client's first statement). ``times``: arm it again
        (with the same ``skip``) after each cut, this many cuts in all."""

        def arm() -> None:
            self._cut_armed = True
            self._cut_skip = skip
            self._cut_again = (times - 1, skip)

        self._call(arm)

    def disarm(self) -> None:
        """Cancel an armed cut that has not happened yet."""
        self._call(lambda: setattr(self, "_cut_armed", False))

    def wait_cut(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until ``count`` cuts in total have completed."""
        with self._cut_done:
            return self._cut_done.wait_for(lambda: self.cuts >= count, timeout)

    def blackhole(self) -> int:
        """Blackhole every open flow; returns how many. New flows are not affected."""
        return int(self._call(self._blackhole_all))

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk from now on by ``seconds`` (in both directions)."""
        self._call(lambda: setattr(self, "latency", max(0.0, float(seconds))))

    def retarget(self, target_port: int) -> None:
        """Send new flows to the server on ``target_port`` (of 127.0.0.1) from now on;
        open flows stay on the server they reached, as with a moved virtual IP or DNS
        name (what a failover does to persistent connections)."""
        target = (HOST, int(target_port))
        self._call(lambda: setattr(self, "target", target))

    def open_flows(self) -> list[Flow]:
        return list(self._call(lambda: list(self._live)))

    def flows_in(self, mode: str) -> list[Flow]:
        return list(self._call(lambda: [f for f in self.flows if f.mode == mode]))

    def stats(self) -> dict[str, int]:
        def collect() -> dict[str, int]:
            modes = collections.Counter(f.mode for f in self.flows)
            return {
                "flows": len(self.flows),
                "open": len(self._live),
                "blackholed": modes["blackhole"],
                "cuts": self.cuts,
                "refused": self.refused,
            }

        return dict(self._call(collect))

    # ---------------------------------------------------------------- internals

    def _call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        if self._thread is None:
            raise RuntimeError("the proxy is not running")
        if threading.current_thread() is self._thread:
            return fn()
        box: list[Any] = []
        done = threading.Event()
        self._commands.put((fn, box, done))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if not done.wait(timeout):
            raise TimeoutError("the fault proxy did not answer")
        if box and isinstance(box[0], BaseException):
            raise box[0]
        return box[0] if box else None

    def _stop(self) -> None:
        self._stopping = True
        for flow in list(self._live):
            self._close_flow(flow, "proxy stopped", rst=True)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                self._selector.unregister(self._listener)
            self._listener.close()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._loop_once()
        finally:
            for sock in (self._wake_r, self._wake_w):
                sock.close()
            self._selector.close()

    def _loop_once(self) -> None:
        timeout = self._next_timeout()
        for key, events in self._selector.select(timeout):
            kind, flow = key.data
            if kind == "accept":
                self._accept()
            elif kind == "wake":
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            elif flow.open:
                if events & selectors.EVENT_READ:
                    self._read(flow, key.fileobj is flow.client)
                if flow.open and events & selectors.EVENT_WRITE:
                    self._flush(flow)
        while True:
            try:
                fn, box, done = self._commands.get_nowait()
            except queue.Empty:
                break
            try:
                box.append(fn())
            except BaseException as exc:  # handed to the caller
                box.append(exc)
            done.set()
        now = time.monotonic()
        for flow in list(self._live):
            if flow.open:
                self._flush(flow)
            if (
                flow.mode == "cut"
                and flow.cut_sent_at is not None
                and now - flow.cut_sent_at > _CUT_REPLY_TIMEOUT
            ):
                self._finish_cut(flow)

    def _next_timeout(self) -> float:
        timeout = 0.2
        now = time.monotonic()
        for flow in self._live:
            for pending in (flow.to_server, flow.to_client):
                if pending:
                    timeout = min(timeout, max(0.0, pending[0][0] - now))
            if flow.mode == "cut":
                timeout = min(timeout, 0.05)
        return timeout

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _addr = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=2.0)
        except OSError:
            self.refused += 1
            _rst(client)  # what a client sees when the server is down behind a proxy
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flow = Flow(next(self._ids), client, upstream)
        self.flows.append(flow)
        self._live[flow] = None
        self._selector.register(client, selectors.EVENT_READ, ("flow", flow))
        self._selector.register(upstream, selectors.EVENT_READ, ("flow", flow))

    def _read(self, flow: Flow, from_client: bool) -> None:
        sock = flow.client if from_client else flow.upstream
        try:
            data = sock.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            if flow.mode == "blackhole":
                self._stop_reading(flow, sock)
            else:  # a reset on one side: reset the other too
                self._close_flow(flow, "peer reset", rst=True)
            return
        if not data:
            if from_client:
                flow.client_eof = True
            else:
                flow.upstream_eof = True
            if flow.mode == "blackhole":
                self._stop_reading(flow, sock)  # a blackhole forwards no FIN either
            elif flow.mode == "cut" and not from_client:
                self._finish_cut(flow)
            else:
                self._stop_reading(flow, sock)
                self._flush(flow)  # deliver what is pending, then close both
                if not flow.to_server and not flow.to_client:
                    self._close_flow(flow, "eof", rst=False)
            return
        if flow.mode == "blackhole":
            if from_client:
                flow.dropped_up += len(data)
            else:
                flow.dropped_down += len(data)
            return
        if flow.mode == "cut":
            if from_client:
                flow.dropped_up += len(data)
            else:
                flow.dropped_down += len(data)
                if flow.cut_sent_at is not None:
                    self._finish_cut(flow)  # the server answered: it has run it
            return
        due = time.monotonic() + self.latency
        if from_client:
            if self._cut_armed and self._cut_skip > 0:
                self._cut_skip -= 1
            elif self._cut_armed:
                again, skip = self._cut_again
                self._cut_armed = again > 0
                self._cut_skip = skip
                self._cut_again = (again - 1, skip)
                flow.mode = "cut"
                flow.cut_chunk_left = len(data)
                flow.to_client.clear()  # nothing more reaches the client
            flow.to_server.append((due, data))
        else:
            flow.to_client.append((due, data))
        self._flush(flow)

    def _flush(self, flow: Flow) -> None:
        if flow.mode == "blackhole" or not flow.open:
            return
        now = time.monotonic()
        for pending, sock, up in (
            (flow.to_server, flow.upstream, True),
            (flow.to_client, flow.client, False),
        ):
            if flow.mode == "cut" and not up:
                pending.clear()
                continue
            while pending and pending[0][0] <= now:
                due, data = pending[0]
                try:
                    sent = sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._close_flow(flow, "peer reset", rst=True)
                    return
                if up:
                    flow.bytes_up += sent
                    if flow.mode == "cut" and flow.cut_chunk_left > 0:
                        flow.cut_chunk_left -= sent
                        if flow.cut_chunk_left <= 0:
                            flow.cut_sent_at = time.monotonic()
                else:
                    flow.bytes_down += sent
                if sent < len(data):
                    pending[0] = (due, data[sent:])
                    break
                pending.popleft()
        self._update_interest(flow)
        if (
            flow.mode == "pass"
            and (flow.client_eof or flow.upstream_eof)
            and not flow.to_server
            and not flow.to_client
        ):
            self._close_flow(flow, "eof", rst=False)

    def _update_interest(self, flow: Flow) -> None:
        for sock, pending, eof in (
            (flow.client, flow.to_client, flow.client_eof),
            (flow.upstream, flow.to_server, flow.upstream_eof),
        ):
            events = 0 if eof else selectors.EVENT_READ
            if pending:
                events |= selectors.EVENT_WRITE
            try:
                key = self._selector.get_key(sock)
            except (KeyError, ValueError):
                key = None
            if key is None:
                if events:
                    self._selector.register(sock, events, ("flow", flow))
            elif not events:
                self._selector.unregister(sock)
            elif key.events != events:
                self._selector.modify(sock, events, ("flow", flow))

    def _stop_reading(self, flow: Flow, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        if sock is flow.client:
            flow.client_eof = True
        else:
            flow.upstream_eof = True

    def _finish_cut(self, flow: Flow) -> None:
        self._close_flow(flow, "cut", rst=True)
        with self._cut_done:
            self.cuts += 1
            self._cut_done.notify_all()

    def _reset_all(self) -> int:
        live = list(self._live)
        for flow in live:
            self._close_flow(flow, "reset", rst=True)
        return len(live)

    def _blackhole_all(self) -> int:
        count = 0
        for flow in self._live:
            if flow.mode == "pass":
                flow.mode = "blackhole"
                flow.to_server.clear()
                flow.to_client.clear()
                count += 1
        return count

    def _close_flow(self, flow: Flow, how: str, *, rst: bool) -> None:
        if not flow.open:
            return
        if flow.mode == "cut" and how != "cut":
            with self._cut_done:
                self.cuts += 1  # a cut flow that ended otherwise still counts as cut
                self._cut_done.notify_all()
        flow.mode = "closed"
        flow.how_closed = how
        self._live.pop(flow, None)
        flow.to_server.clear()
        flow.to_client.clear()
        for sock in (flow.client, flow.upstream):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            if rst:
                _rst(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()


if __name__ == "__main__":
    import sys

    with FaultProxy(int(sys.argv[1])) as proxy:
        print(
            f"127.0.0.1:{proxy.port} -> 127.0.0.1:{sys.argv[1]}; commands: reset, cut, "
            "blackhole, latency SECONDS, stats, quit",
            flush=True,
        )
        for line in sys.stdin:
            word, *rest = line.split()
            if word == "quit":
                break
            if word == "reset":
                print(proxy.reset_all())
            elif word == "cut":
                proxy.cut_after_next_client_write()
            elif word == "blackhole":
                print(proxy.blackhole())
            elif word == "latency":
                proxy.set_latency(float(rest[0]))
            print(proxy.stats(), flush=True)
