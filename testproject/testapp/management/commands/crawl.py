"""``manage.py crawl``: the shape of a crawler script, writes with long pauses between."""

from __future__ import annotations

import time
from argparse import ArgumentParser
from typing import Any

from django_dbkeepalive import BaseKeepaliveCommand
from testproject.testapp.tasks import write_item


class Command(BaseKeepaliveCommand):
    help = "Write --count items named PREFIX0, PREFIX1, ..., pausing --pause seconds between."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--count", type=int, default=3, help="how many items to write")
        parser.add_argument(
            "--pause", type=float, default=0.0, help="seconds to wait between two writes"
        )
        parser.add_argument("--prefix", default="crawl-", help="key prefix of the items")

    def handle(self, *args: Any, count: int, pause: float, prefix: str, **options: Any) -> None:
        for n in range(count):
            if n:
                time.sleep(pause)  # fetching the next page: no database work
            self.keepalive()
            key = f"{prefix}{n}"
            # The item's value is the server's id of the connection that wrote it.
            thread_id = write_item(key)
            self.stdout.write(f"wrote {key} on connection {thread_id}")
            self.stdout.flush()
