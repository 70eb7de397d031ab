"""The failover soak's ledger and report: what every operation did, per failover.

:mod:`soak.failover` owns the topology, the writers and the failovers; this module owns
the figures. Every read and write is recorded as an :class:`Op` (who, when it started and
ended, the keys it wrote, the error that reached the caller or ``None``); every failover
as a :class:`Failover` (when the old primary became ``read_only``, when the endpoint had
moved). :func:`windows` cuts the run at each failover and :func:`print_report` prints, per
failover, the writes and reads that failed (by error type and code), the time from
``read_only`` to the first acknowledged write and to the moment every writer had written
again, then the duplicates and acknowledged-but-missing rows found on each node.
"""

from __future__ import annotations

import collections
import json
import statistics
import threading
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Op:
    """One read or write as its caller saw it (``error`` is ``None`` when it worked)."""

    who: str
    write: bool
    keys: tuple[str, ...]
    start: float
    end: float
    error: str | None
    #: The first django-dbkeepalive note on the error (shown for unexpected failures).
    note: str = ""


@dataclass(frozen=True)
class Failover:
    """One failover: ``read_only_at`` is when ``SET GLOBAL read_only = 1`` returned on the
    old primary, ``moved_at`` when the replica was promoted and the endpoint moved."""

    number: int
    old: str
    new: str
    read_only_at: float
    moved_at: float
    rejoin_seconds: float


@dataclass
class Window:
    """What happened between one failover's ``read_only`` and the next one's."""

    failover: Failover
    end: float
    writes: int = 0
    failed_writes: collections.Counter[str] = field(default_factory=collections.Counter)
    failed_reads: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Failed writes that started once the endpoint had moved, by ``writer: error``.
    failed_after_move: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Those of them outside a transaction (the guard re-runs those: worth a look).
    unexpected: list[Op] = field(default_factory=list)
    #: Seconds from read_only to the first acknowledged write (None: none in the window).
    first_write: float | None = None
    #: Seconds from read_only until every writer had an acknowledged write again.
    all_writers: float | None = None

    @property
    def moved(self) -> float:
        return self.failover.moved_at - self.failover.read_only_at


class Ledger:
    """Thread-safe list of :class:`Op`, plus the error of each failed web request."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: list[Op] = []
        self.web_errors: dict[str, str] = {}

    def add(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op)

    def keys(self, acknowledged: bool) -> set[str]:
        with self.lock:
            return {
                key
                for op in self.ops
                if op.write and (op.error is None or not acknowledged)
                for key in op.keys
            }


def kind_of(exc: BaseException) -> str:
    """``Type(code) cause``: the exception's class, its driver error code (both drivers
    put it in ``args[0]``; Connector/Python in ``errno``) and the guard's ``cause``."""
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    if code is None:
        code = getattr(exc, "errno", None)
    kind = f"{type(exc).__name__}({code})" if code is not None else type(exc).__name__
    cause = getattr(exc, "cause", None)
    return f"{kind} {cause}" if cause else kind


def windows(ops: list[Op], failovers: list[Failover], stopped: float) -> list[Window]:
    """One :class:`Window` per failover, from its ``read_only`` up to the next
    failover's (or the end of the run): the operations that failed in it, and those
    that succeeded having begun in it."""
    result = []
    writers = sorted({op.who for op in ops if op.write})
    for i, failover in enumerate(failovers):
        end = failovers[i + 1].read_only_at if i + 1 < len(failovers) else stopped
        window = Window(failover, end)
        first_ok: dict[str, float] = {}
        for op in ops:
            # A failure counts where it was seen (an atomic block begun just before
            # read_only fails after it); a success only when it began after read_only.
            if not failover.read_only_at <= (op.start if op.error is None else op.end) < end:
                continue
            if not op.write:
                if op.error is not None:
                    window.failed_reads[op.error] += 1
                continue
            window.writes += 1
            if op.error is not None:
                window.failed_writes[op.error] += 1
                if op.start >= failover.moved_at:
                    window.failed_after_move[f"{op.who}: {op.error}"] += 1
                    if "InTransaction" not in op.error and op.who.startswith("busy"):
                        window.unexpected.append(op)
            elif op.who not in first_ok or op.end < first_ok[op.who]:
                first_ok[op.who] = op.end
        if first_ok:
            window.first_write = min(first_ok.values()) - failover.read_only_at
        if first_ok and all(w in first_ok for w in writers):
            window.all_writers = max(first_ok.values()) - failover.read_only_at
        result.append(window)
    return result


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:.2f} s"


def _spread(values: list[float | None]) -> str:
    """``median m, max x`` over the failovers that had a value; ``none in k of n``."""
    known = [v for v in values if v is not None]
    text = f"median {statistics.median(known):.2f} s, max {max(known):.2f} s" if known else ""
    never = len(values) - len(known)
    if never:
        text += ("; " if text else "") + f"none in {never} of {len(values)} failovers"
    return text


def _counts(counter: collections.Counter[str]) -> str:
    return ", ".join(f"{kind} x{n}" for kind, n in counter.most_common()) or "-"


@dataclass
class Verdict:
    """Rows read back from one node: keys written twice, acknowledged keys not there."""

    node: str
    rows: int
    duplicates: list[str]
    missing: list[str]
    strays: list[str]


def verdict(node: str, found: dict[str, int], ledger: Ledger) -> Verdict:
    acked, attempted = ledger.keys(True), ledger.keys(False)
    return Verdict(
        node,
        sum(found.values()),
        sorted(k for k, n in found.items() if n > 1),
        sorted(acked - set(found)),
        sorted(set(found) - attempted),
    )


def print_report(
    title: str,
    ledger: Ledger,
    failovers: list[Failover],
    stopped: float,
    started: float,
    verdicts: list[Verdict],
    recycles: dict[str, int] | None,
    json_path: str | None = None,
) -> bool:
    """Print the figures; write them to ``json_path`` too; True when the run failed
    (a duplicate, an acknowledged row missing or a row never attempted, on any node)."""
    ops = list(ledger.ops)
    cut = windows(ops, failovers, stopped)
    first = failovers[0].read_only_at if failovers else stopped
    before = collections.Counter(op.error for op in ops if op.end < first and op.error)
    writes = [op for op in ops if op.write]
    print(f"\n{title}, ran {stopped - started:.0f} s")
    print(
        f"writes attempted {len(writes)}, acknowledged "
        f"{sum(1 for op in writes if op.error is None)}; reads "
        f"{sum(1 for op in ops if not op.write)}; errors before the first failover: "
        f"{_counts(before)}"
    )
    for w in cut:
        f = w.failover
        print(
            f"failover {f.number} {f.old}->{f.new}: endpoint moved {_seconds(w.moved)}, "
            f"first write {_seconds(w.first_write)}, every writer "
            f"{_seconds(w.all_writers)}; writes failed {sum(w.failed_writes.values())}/"
            f"{w.writes} ({_counts(w.failed_writes)}); after the endpoint moved: "
            f"{_counts(w.failed_after_move)}; reads failed "
            f"{sum(w.failed_reads.values())}; rejoin {f.rejoin_seconds:.2f} s"
        )
    for w in cut if recycles is not None else ():  # plain Django: expected
        for op in w.unexpected[:3]:
            t0 = w.failover.read_only_at
            print(
                f"  failover {w.failover.number}: {op.who} started {op.start - t0:+.3f} s, "
                f"ended {op.end - t0:+.3f} s after read_only (endpoint moved "
                f"{w.moved:+.3f} s): {op.error}; {op.note[:400]}"
            )
    failed_per = [sum(w.failed_writes.values()) for w in cut]
    kinds: collections.Counter[str] = collections.Counter()
    for w in cut:
        kinds.update(w.failed_writes)
    if cut:
        print(
            f"writes failed per failover: median {statistics.median(failed_per):g}, "
            f"max {max(failed_per)}, total {sum(failed_per)} ({_counts(kinds)})"
        )
        print(f"time to the first acknowledged write: {_spread([w.first_write for w in cut])}")
        print(f"time until every writer wrote again: {_spread([w.all_writers for w in cut])}")
    if recycles is not None:
        print("recycles: " + (", ".join(f"{k} {v}" for k, v in sorted(recycles.items())) or "-"))
    failed = False
    for v in verdicts:
        print(
            f"{v.node}: {v.rows} rows; duplicates {len(v.duplicates)} {v.duplicates[:5] or ''}"
            f"; acknowledged but missing {len(v.missing)} {v.missing[:5] or ''}"
            + (f"; never attempted {len(v.strays)} {v.strays[:5]}" if v.strays else "")
        )
        failed = failed or bool(v.duplicates or v.missing or v.strays)
    print("verdict: " + ("FAILED" if failed else "OK (no duplicate, no acknowledged row missing)"))
    if json_path:
        figures: dict[str, Any] = {
            "title": title,
            "seconds": stopped - started,
            "failovers": [
                {
                    **asdict(w.failover),
                    "moved": w.moved,
                    "first_write": w.first_write,
                    "all_writers": w.all_writers,
                    "writes": w.writes,
                    "failed_writes": dict(w.failed_writes),
                    "failed_reads": dict(w.failed_reads),
                    "failed_after_move": dict(w.failed_after_move),
                }
                for w in cut
            ],
            "errors_before_first_failover": dict(before),
            "recycles": recycles,
            "verdicts": [asdict(v) for v in verdicts],
            "failed": failed,
        }
        with open(json_path, "a", encoding="utf-8") as out:
            out.write(json.dumps(figures) + "\n")
    return failed
