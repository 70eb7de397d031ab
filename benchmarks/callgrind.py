"""Client instructions per query under valgrind's callgrind: plain Django vs the app.

Instruction counts are repeatable (a wall-clock ratio hides a CPU cost behind the round
trip). Each mode runs in its own process twice, with N1 and N2 queries; the difference
divided by N2 - N1 is the cost of one query with start-up cancelled out.

    python benchmarks/callgrind.py [--cases select1,insert1,orm_get] [--drivers ...] [--wrapper]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.server import start  # noqa: E402

N1, N2 = 500, 4500
REPEATS = 3
# "app" measures the hot path alone (the slow path never due); "slow" runs the slow path
# before every statement (PEEK_AFTER = 0) to price one visit. At native speed a busy
# connection visits it at most once per PEEK_AFTER (0.1 s): under valgrind, 50x slower,
# it would be visited 50x more often per query, so it is priced separately.
MODES = {
    "plain": ("plain", "{}"),
    "app": ("app", '{"PEEK_AFTER": 100000}'),
    "slow": ("app", '{"PEEK_AFTER": 0, "PING_AFTER": null}'),
}
COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def _callgrind(env: dict[str, str], script: str, *args: str) -> int:
    """Instructions of one run of ``benchmarks/<script> args`` under callgrind."""
    # No address-space randomisation: identical runs then execute identical code paths.
    prefix = ["setarch", platform.machine(), "-R"] if shutil.which("setarch") else []
    result = subprocess.run(
        [
            *prefix,
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            str(HERE / script),
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    match = COLLECTED.search(result.stderr)
    if not match:
        raise SystemExit(f"no instruction count from valgrind:\n{result.stderr[-2000:]}")
    return int(match.group(1))


def instructions(env: dict[str, str], mode: str, driver: str, case: str, n: int) -> int:
    app_mode, bench_settings = MODES[mode]
    env = {**env, "DBK_BENCH_SETTINGS": bench_settings, "DBK_BENCH_NO_GC": "1"}
    return _callgrind(env, "workload.py", app_mode, driver, case, str(n))


def wrapper_instructions(env: dict[str, str], mode: str, sql: str, n: int) -> int:
    """Instructions of a run of benchmarks/wrapper.py (no driver, no server)."""
    return _callgrind(env, "wrapper.py", mode, str(n), sql)


def wrapper_rows() -> list[dict[str, object]]:
    """The guard's hot path alone, per execute(): a read, and a write (peeked at)."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(HERE.parent)}
    low, high = 2_000, 22_000
    rows = []
    for label, sql in (("read", "SELECT 1"), ("write", "INSERT INTO t VALUES (1)")):
        cost = {}
        for mode in ("plain", "app"):
            small = min(wrapper_instructions(env, mode, sql, low) for _ in range(2))
            large = min(wrapper_instructions(env, mode, sql, high) for _ in range(2))
            cost[mode] = (large - small) / (high - low)
        row = {
            "case": f"wrapper_{label}",
            "plain_instructions": round(cost["plain"]),
            "app_instructions": round(cost["app"]),
            "overhead_instructions": round(cost["app"] - cost["plain"]),
        }
        rows.append(row)
        print(
            f"{'no driver':12} {label:10} plain {cost['plain']:9.0f}  app {cost['app']:9.0f}  "
            f"{cost['app'] - cost['plain']:+6.0f} instr/execute (the guard's hot path alone)",
            flush=True,
        )
    return rows


def per_query(env: dict[str, str], mode: str, driver: str, case: str) -> float:
    """(min I(N2) - min I(N1)) / (N2 - N1), minimum over REPEATS runs of each.

    A run now and then pays a one-off cost (a dict or buffer resize somewhere) of a few
    million instructions; such costs only ever add, so the minimum of each is the run
    without them, and the slope between the two is the cost of one query."""
    low = min(instructions(env, mode, driver, case, N1) for _ in range(REPEATS))
    high = min(instructions(env, mode, driver, case, N2) for _ in range(REPEATS))
    return (high - low) / (N2 - N1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", default="select1,insert1,orm_get")
    parser.add_argument("--drivers", default="mysqlclient,pymysql")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "callgrind.json")
    parser.add_argument(
        "--wrapper", action="store_true", help="also the hot path alone, with no driver"
    )
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    rows: list[dict[str, object]] = wrapper_rows() if args.wrapper else []
    server, env = start()
    try:
        for driver in args.drivers.split(","):
            module = {"connector": "mysql.connector", "pymysql": "pymysql"}.get(driver, "MySQLdb")
            if importlib.util.find_spec(module) is None:
                print(f"{driver:12} skipped: {module} is not installed", flush=True)
                continue
            for case in args.cases.split(","):
                plain = per_query(env, "plain", driver, case)
                app = per_query(env, "app", driver, case)
                slow = per_query(env, "slow", driver, case) if case == "select1" else None
                row = {
                    "driver": driver,
                    "case": case,
                    "plain_instructions": round(plain),
                    "app_instructions": round(app),
                    "overhead_instructions": round(app - plain),
                    "overhead_percent": round((app - plain) / plain * 100, 2),
                    "slow_path_instructions": None if slow is None else round(slow - app),
                }
                rows.append(row)
                extra = "" if slow is None else f"  slow path {slow - app:7.0f} instr/visit"
                print(
                    f"{driver:12} {case:10} plain {plain:9.0f}  app {app:9.0f}  "
                    f"{app - plain:+6.0f} instr/query ({row['overhead_percent']:+.2f}%){extra}",
                    flush=True,
                )
    finally:
        server.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
