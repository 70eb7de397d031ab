"""``make bench``: django-dbkeepalive against plain Django, in one run, on a private server.

Alternating rounds; each (mode, case) runs in its own process. Prints a table and writes
``benchmarks/results/latest.json``; then runs ``recovery.py`` (recovery after a KILL, a
restart, N threads at once: ``benchmarks/results/recovery.json``), the Celery count and
the instruction counts, and last the load benchmark on real application servers
(``load_bench.py``: gunicorn, uvicorn, uWSGI under KILLs, an idle expiry and a restart;
short, about 2.5 minutes; ``--load-long`` for every server in every mode). Modes:
``plain`` (Django alone), ``app`` (with django-dbkeepalive), ``health`` (plain Django
with ``CONN_HEALTH_CHECKS=True``).

    python benchmarks/run.py [--rounds 5] [--drivers mysqlclient,pymysql] [--no-callgrind]
        [--no-load | --load-long]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.server import start  # noqa: E402

CASES = {"select1": 3000, "orm_get": 2000, "orm_insert": 1000, "request": 500}
MODES = ("plain", "app", "health")


def run_one(env: dict[str, str], mode: str, driver: str, case: str, n: int) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, str(HERE / "workload.py"), mode, driver, case, str(n)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    data: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def machine() -> dict[str, object]:
    import django

    try:
        server = subprocess.run(
            ["mariadbd", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        server = "unknown"
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "django": django.__version__,
        "server": server,
        "kernel": platform.release(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--drivers", default="mysqlclient,pymysql")
    parser.add_argument("--no-callgrind", action="store_true")
    parser.add_argument("--no-load", action="store_true", help="skip load_bench.py")
    parser.add_argument("--load-long", action="store_true", help="load_bench.py --long")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "latest.json")
    args = parser.parse_args()
    drivers = args.drivers.split(",")

    server, env = start()
    report: dict[str, object] = {"machine": machine(), "when": time.strftime("%Y-%m-%d")}
    try:
        samples: dict[tuple[str, str, str], list[float]] = {}
        for round_no in range(args.rounds):
            order = MODES if round_no % 2 == 0 else tuple(reversed(MODES))
            print(f"round {round_no + 1}/{args.rounds}", flush=True)
            for driver in drivers:
                for case, n in CASES.items():
                    for mode in order:
                        data = run_one(env, mode, driver, case, n)
                        samples.setdefault((driver, case, mode), []).append(
                            float(data["median_us"])  # type: ignore[arg-type]
                        )
        rows = []
        for driver in drivers:
            for case in CASES:
                med = {m: statistics.median(samples[(driver, case, m)]) for m in MODES}
                rows.append(
                    {
                        "driver": driver,
                        "case": case,
                        **{f"{m}_us": round(med[m], 1) for m in MODES},
                        "app_ratio": round(med["app"] / med["plain"], 3),
                        "health_ratio": round(med["health"] / med["plain"], 3),
                    }
                )
        report["per_query"] = rows

        recovery = []
        for driver in drivers:
            for mode in ("plain", "app"):
                data = run_one(env, mode, driver, "recovery", 20)
                recovery.append(
                    {
                        "driver": driver,
                        "mode": mode,
                        "failed_of_20": data["failed"],
                        "max_connects": data.get("max_connects_per_recovery"),
                        "median_us": None
                        if data["median_us"] is None
                        else round(float(data["median_us"]), 1),  # type: ignore[arg-type]
                    }
                )
        report["recovery"] = recovery

        memory = []
        for driver in drivers:
            for mode in ("plain", "app"):
                data = run_one(env, mode, driver, "memory", 100_000)
                memory.append(
                    {
                        "driver": driver,
                        "mode": mode,
                        "bytes_per_query": round(float(data["bytes_per_query"]), 4),  # type: ignore[arg-type]
                    }
                )
        report["memory"] = memory
    finally:
        server.close()

    print()
    print(
        f"{'driver':12} {'case':11} {'plain µs':>9} {'app µs':>9} {'ratio':>6} "
        f"{'health µs':>10} {'ratio':>6}"
    )
    for row in report["per_query"]:  # type: ignore[attr-defined]
        print(
            f"{row['driver']:12} {row['case']:11} {row['plain_us']:9.1f} {row['app_us']:9.1f} "
            f"{row['app_ratio']:6.3f} {row['health_us']:10.1f} {row['health_ratio']:6.3f}"
        )
    print()
    print("first query after a server-side KILL (20 tries):")
    for row in report["recovery"]:  # type: ignore[attr-defined]
        outcome = (
            f"{row['failed_of_20']}/20 failed"
            if row["failed_of_20"]
            else f"all succeeded, median {row['median_us']:.0f} µs, "
            f"at most {row['max_connects']} reconnect(s) each"
        )
        print(f"  {row['driver']:12} {row['mode']:6} {outcome}")
    print()
    print("memory growth over 100,000 queries (tracemalloc):")
    for row in report["memory"]:  # type: ignore[attr-defined]
        print(f"  {row['driver']:12} {row['mode']:6} {row['bytes_per_query']:+.4f} bytes/query")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    shown = args.json.resolve()
    print(f"\nwritten: {shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown}")

    print("\nrecovery: KILL, restart, N threads at once (benchmarks/recovery.py):", flush=True)
    # Connector/Python too, when installed (recovery.py skips a driver that is not).
    every = args.drivers if "connector" in drivers else f"{args.drivers},connector"
    subprocess.run([sys.executable, str(HERE / "recovery.py"), "--drivers", every], check=True)

    print("\nconnects per 1,000 Celery tasks (prefork worker, 2 processes):", flush=True)
    subprocess.run(
        [sys.executable, str(HERE / "celery_connects.py"), "--tasks", "1000"], check=True
    )

    if not args.no_callgrind:
        if shutil.which("valgrind"):
            print("\nclient instructions per query (callgrind):", flush=True)
            subprocess.run(
                [
                    sys.executable,
                    str(HERE / "callgrind.py"),
                    "--wrapper",
                    "--drivers",
                    every,
                ],
                check=True,
            )
        else:
            print(
                "\nvalgrind not installed: skipping instruction counts (apt-get install valgrind)"
            )

    if not args.no_load:
        print("\nreal application servers under faults (benchmarks/load_bench.py):", flush=True)
        load = [sys.executable, str(HERE / "load_bench.py"), "--drivers", args.drivers]
        subprocess.run([*load, *(["--long"] if args.load_long else [])], check=True)


if __name__ == "__main__":
    main()
