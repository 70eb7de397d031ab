"""Start the private MariaDB for a benchmark run and create the schema."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.mariadb import MariaDBServer  # noqa: E402


def start() -> tuple[MariaDBServer, dict[str, str]]:
    server = MariaDBServer()
    server.start()
    server.query("CREATE DATABASE IF NOT EXISTS bench CHARACTER SET utf8mb4")
    env = {
        **os.environ,
        "DBK_DB_HOST": server.host,
        "DBK_DB_PORT": str(server.port),
        "DBK_DB_USER": server.user,
        "DBK_DB_PASSWORD": server.password,
        "DBK_DB_NAME": "bench",
        "PYTHONHASHSEED": "0",
        "PYTHONPATH": str(ROOT),
    }
    subprocess.run(
        [sys.executable, str(ROOT / "testproject" / "manage.py"), "migrate", "-v0"],
        env=env,
        check=True,
    )
    return server, env
