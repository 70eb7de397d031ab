"""``make bench``'s load benchmark: real application servers under faults, with
django-dbkeepalive and with plain Django, both drivers, on a private MariaDB.

Each variant is one :func:`benchmarks.load.run` (KILL every app connection twice, a quiet
period past ``wait_timeout``, a server restart, under load from 8 client threads), in
the order driver x server x mode, so the modes of one server run back to back (the app
first with the first driver, last with the second). Prints a table ("steady req/s": the
first phase, before any fault) and writes ``benchmarks/results/load.json``.

    python benchmarks/load_bench.py [--long] [--servers sync,gthread,gevent,uvicorn,daphne,uwsgi]
        [--modes app,persistent,max_age_0] [--drivers mysqlclient,pymysql] [--phase S]

Short mode (the default, about 3 minutes): 1.2 s of load per phase (about 12 s a
variant), every mode for gunicorn gthread, the app alone for the other servers.
``--long``: 4 s phases (about 25 s a variant), every server in every mode (about 13
minutes: the figures of docs/app-servers.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.appservers import SERVERS, missing  # noqa: E402
from benchmarks.load import MODES, Result, Scenario, run  # noqa: E402
from tests.mariadb import MariaDBServer  # noqa: E402

MODE_NAMES = {
    "app": "with the app",
    "persistent": "plain, CONN_MAX_AGE=None",
    "max_age_0": "plain, CONN_MAX_AGE=0",
}
SERVER_NAMES = {
    "sync": "gunicorn sync",
    "gthread": "gunicorn gthread",
    "gevent": "gunicorn gevent",
    "uvicorn": "uvicorn (ASGI)",
    "daphne": "daphne (ASGI)",
    "uwsgi": "uWSGI",
}


def variants(args: argparse.Namespace) -> list[Scenario]:
    servers = args.servers.split(",") if args.servers else list(SERVERS)
    modes = args.modes.split(",") if args.modes else list(MODES)
    phase = args.phase or (4.0 if args.long else 1.2)
    found = []
    for n, driver in enumerate(args.drivers.split(",")):
        for server in servers:
            why = missing(server)
            if why is not None:
                print(f"skipped {server}: {why}", flush=True)
                continue
            # The app first for one driver, last for the other: no mode always warms up.
            for mode in modes if n % 2 == 0 else modes[::-1]:
                short_skip = not args.long and not args.modes and server != "gthread"
                if short_skip and mode != "app":
                    continue
                found.append(Scenario(server, mode, driver, clients=args.clients, phase=phase))
    return found


def row(result: Result) -> list[str]:
    s = result.scenario
    failures = ", ".join(f"{n} {kind}" for kind, n in result.failures.items()) or "none"
    return [
        s.driver,
        SERVER_NAMES[s.server],
        MODE_NAMES[s.mode],
        f"{result.ok}/{result.requests}",
        f"{result.failed} ({result.in_flight} in flight)",
        str(result.applied_anyway),
        str(result.duplicates),
        str(result.missing),
        f"{result.p50_ms:.1f} / {result.p99_ms:.0f}",
        f"{result.rps:.0f}",
        f"{result.rps_steady:.0f}",
        str(result.connects),
        failures,
    ]


HEADER = [
    "driver",
    "server",
    "mode",
    "ok/requests",
    "failed",
    "applied anyway",
    "dup",
    "missing",
    "p50/p99 ms",
    "req/s",
    "steady req/s",
    "connects",
    "failures (kind cause)",
]


def table(rows: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(HEADER, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--long", action="store_true")
    parser.add_argument("--servers", default="")
    parser.add_argument("--modes", default="")
    parser.add_argument("--drivers", default="mysqlclient,pymysql")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--phase", type=float, default=0.0)
    parser.add_argument("--markdown", action="store_true", help="the table in Markdown")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "load.json")
    args = parser.parse_args()
    todo = variants(args)
    server = MariaDBServer()
    server.start()
    results: list[Result] = []
    try:
        for n, scenario in enumerate(todo, 1):
            print(
                f"[{n}/{len(todo)}] {scenario.driver} {SERVER_NAMES[scenario.server]}, "
                f"{MODE_NAMES[scenario.mode]}",
                flush=True,
            )
            results.append(run(server, scenario))
    finally:
        server.close()
    print()
    print(table([row(r) for r in results], args.markdown))
    bad = [r for r in results if r.scenario.mode == "app" and (r.unexpected or r.duplicates)]
    bad += [r for r in results if r.missing]
    for r in bad:
        s = r.scenario
        print(f"\nNOT AS EXPECTED: {s.driver} {s.server} {s.mode}: {r.unexpected[:5]}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    shown = args.json.resolve()
    print(f"\nwritten: {shown}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
