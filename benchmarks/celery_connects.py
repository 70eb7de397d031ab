"""Connects per 1,000 Celery tasks: Celery's Django fix-up alone vs contrib.celery.

Starts a private MariaDB and a private redis-server, then for each mode runs a real
``celery worker`` (testproject/celery.py) and sends it N tasks that each write a row,
counting the server's new connections (``SHOW GLOBAL STATUS LIKE 'Connections'``) while
the tasks run. Both modes have the app installed (the guard); only
``django_dbkeepalive.contrib.celery.install(app)`` differs.

    python benchmarks/celery_connects.py [--tasks 1000] [--pool prefork] [--concurrency 2]
        [--driver mysqlclient] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.server import start  # noqa: E402
from tests.celery_worker import CeleryWorker, Client  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

MODES = {"celery": "0", "integration": "1"}  # DBK_CELERY_INTEGRATION
BATCH = 100


def run(args: argparse.Namespace) -> dict[str, object]:
    server, env = start()
    redis = RedisServer()
    client = None
    try:
        redis.start()
        client = Client(redis.url)
        env = {**env, "DBK_DRIVER": args.driver}
        results: dict[str, object] = {
            "tasks": args.tasks,
            "pool": args.pool,
            "concurrency": args.concurrency,
            "driver": args.driver,
        }
        for mode, flag in MODES.items():
            worker = CeleryWorker(
                redis.url,
                pool=args.pool,
                concurrency=args.concurrency,
                env={**env, "DBK_CELERY_INTEGRATION": flag},
            )
            try:
                worker.start()
                client.write([f"{mode}-warmup"])  # the worker's first connection is not counted
                before = server.connections_total()
                started = time.monotonic()
                for first in range(0, args.tasks, BATCH):
                    keys = [f"{mode}-{n}" for n in range(first, min(first + BATCH, args.tasks))]
                    client.write(keys)
                seconds = time.monotonic() - started
                connects = server.connections_total() - before
            finally:
                worker.close()
            results[mode] = {
                "connects": connects,
                "per_1000_tasks": round(connects * 1000 / args.tasks, 1),
                "seconds": round(seconds, 2),
            }
        server.query("DROP DATABASE IF EXISTS bench")
        return results
    finally:
        if client is not None:
            client.close()
        redis.close()
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--pool", default="prefork", choices=["prefork", "threads", "solo"])
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--driver", default="mysqlclient", choices=["mysqlclient", "pymysql"])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results = run(args)
    if args.json:
        print(json.dumps(results))
        return
    plain, ours = results["celery"], results["integration"]
    assert isinstance(plain, dict) and isinstance(ours, dict)
    print(
        f"Celery worker ({args.pool} -c {args.concurrency}, {args.driver}), "
        f"{args.tasks} tasks each writing a row:"
    )
    for label, data in (
        ("Celery's Django fix-up alone:", plain),
        ("with django_dbkeepalive.contrib.celery:", ours),
    ):
        print(
            f"  {label:<40} {data['per_1000_tasks']:>7} connects per 1,000 tasks "
            f"(tasks sent in batches of {BATCH}: {data['seconds']} s)"
        )
    saved = plain["per_1000_tasks"] - ours["per_1000_tasks"]
    print(f"  {'connects saved per 1,000 tasks:':<40} {saved:>7.1f}")


if __name__ == "__main__":
    main()
