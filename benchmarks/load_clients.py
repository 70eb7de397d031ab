"""The clients of a load run (:mod:`benchmarks.load`): threads sending requests over
keep-alive HTTP connections (``http.client``), each recorded with its kind, key, times,
HTTP status and the cause of a failure (from the load app's JSON 500 body, or
``http:<exception>`` when the HTTP exchange itself failed).

A client writes a new, unique key (``f"{run_id}-{client}-{n}"``) with probability
``write_share``, otherwise reads its last key; it waits ``think`` seconds between two
requests, and ``BACKOFF`` more after a failure. ``pause()`` returns once every client is
idle with its HTTP connection closed (so no keep-alive timeout can close it under a
request), ``resume()`` lets them go on.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from dataclasses import dataclass

#: A client waits this long after a failed request (as clients back off).
BACKOFF = 0.1
clock = time.perf_counter


@dataclass(slots=True)
class Request:
    kind: str
    key: str
    start: float
    end: float
    status: int
    cause: str = ""  # empty when the request succeeded


class Clients:
    """``n`` client threads; ``pause()`` until every client is idle (its HTTP
    connection closed), ``resume()``, ``finish()``."""

    def __init__(
        self,
        port: int,
        paths: tuple[str, str],
        run_id: str,
        n: int,
        write_share: float,
        think: float,
    ) -> None:
        self.port = port
        self.write_path, self.read_path = paths
        self.run_id = run_id
        self.write_share = write_share
        self.think = think
        self.records: list[list[Request]] = [[] for _ in range(n)]
        self.running = threading.Event()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.paused = 0
        self.threads = [
            threading.Thread(target=self._client, args=(i,), name=f"load-client-{i}", daemon=True)
            for i in range(n)
        ]

    def start(self) -> None:
        self.running.set()
        for thread in self.threads:
            thread.start()

    def pause(self, timeout: float = 120.0) -> None:
        self.running.clear()
        deadline = time.monotonic() + timeout
        while self.paused < len(self.threads) and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.paused < len(self.threads):
            raise RuntimeError("the clients did not go quiet: a request hangs")

    def resume(self) -> None:
        self.running.set()

    def finish(self) -> list[Request]:
        self.stop.set()
        self.running.set()
        for thread in self.threads:
            thread.join(120)
        return [request for records in self.records for request in records]

    def _client(self, i: int) -> None:
        rng = random.Random(i)
        records = self.records[i]
        conn: http.client.HTTPConnection | None = None
        last = f"{self.run_id}-{i}-none"
        n = 0
        while not self.stop.is_set():
            if not self.running.is_set():
                if conn is not None:
                    conn.close()
                    conn = None
                with self.lock:
                    self.paused += 1
                self.running.wait()
                with self.lock:
                    self.paused -= 1
                continue
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            if rng.random() < self.write_share:
                kind, key = "write", f"{self.run_id}-{i}-{n}"
                n += 1
            else:
                kind, key = "read", last
            path = self.write_path if kind == "write" else self.read_path
            start = clock()
            try:
                conn.request("GET", f"{path}?key={key}")
                response = conn.getresponse()
                body = response.read()
                status = response.status
                cause = "" if status == 200 else _cause(status, body)
            except (OSError, http.client.HTTPException) as exc:
                status, cause = 0, f"http:{type(exc).__name__}"
                conn.close()
                conn = None
            records.append(Request(kind, key, start, clock(), status, cause))
            if kind == "write":
                last = key
            pause = self.think + (BACKOFF if cause else 0.0)
            if pause:
                self.stop.wait(pause)
        if conn is not None:
            conn.close()


def _cause(status: int, body: bytes) -> str:
    try:
        data = json.loads(body)
        return str(data["cause"])
    except (ValueError, KeyError, TypeError):
        return f"http:{status}"
