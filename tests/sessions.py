"""``make test``: the pytest sessions of the suite, run side by side, under coverage.

One session per MySQL driver runs the whole suite (each starts its own private servers:
the sessions mostly wait on sleeps and the network, so two at once take about half the
wall time); one more per driver runs the guard's core tests with the guarded ENGINE and
``DBKEEPALIVE["PATCH"] = False`` (``DBK_BACKEND=engine``). Every session runs under
coverage.py (branch coverage, subprocesses included); the data of all of them is
combined at the end and reported for the package.

    python -m tests.sessions [--jobs 2] [--drivers mysqlclient,pymysql,connector] [-- PYTEST_ARGS]

``connector`` (MySQL Connector/Python) and ``connector-cext`` (its C extension, where it
loads) run the guard's core only (:data:`CORE_TESTS`).

``--jobs 1`` runs them one after the other with live output. Exit status 1 when a session
failed (or the combined coverage is below the ``fail_under`` of setup.cfg).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The PostgreSQL driver each MySQL driver's session takes (both are tested).
PG_DRIVER = {"mysqlclient": "psycopg", "pymysql": "psycopg2"}
#: The guard's core, run again with the guarded ENGINE and nothing patched.
ENGINE_TESTS = ("tests/test_guard.py", "tests/test_fork.py", "tests/test_faults.py")
#: Drivers whose session runs only the guard's core (not the whole suite), through their
#: own Django backend: MySQL Connector/Python (``ENGINE = "mysql.connector.django"``),
#: pure Python, and its C extension (``connector-cext``, where it loads). About 2 minutes
#: each on 2 cores.
CORE_ONLY = {"connector", "connector-cext"}
CORE_TESTS = (
    "tests/test_guard.py",
    "tests/test_faults.py",
    "tests/test_errors.py",
    "tests/test_fork.py",
    "tests/test_threads.py",
    "tests/test_infra.py",
    "tests/test_connector.py",
    "tests/test_messages.py",
)


@dataclass
class Session:
    name: str
    env: dict[str, str]
    args: list[str]
    log: Path = field(default_factory=lambda: Path(os.devnull))
    returncode: int | None = None
    seconds: float = 0.0


def sessions(drivers: list[str], pytest_args: list[str]) -> list[Session]:
    found = []
    for driver in drivers:
        if driver in CORE_ONLY:
            args = pytest_args or list(CORE_TESTS)
            env = {"DBK_DRIVER": driver}
            if driver == "connector-cext":
                preload = cext_preload()
                if preload is None:
                    print("connector-cext: skipped, Connector/Python's C extension does not load")
                    continue
                env.update(preload)
            found.append(Session(f"{driver}/core", env, args))
            continue
        env = {
            "DBK_DRIVER": driver,
            "DBK_PG_DRIVER": PG_DRIVER.get(driver, "psycopg"),
            "DBK_REQUIRE_POSTGRES": "1",
        }
        found.append(Session(f"{driver}/{env['DBK_PG_DRIVER']}", env, pytest_args))
    if not pytest_args:  # a selection of tests given by hand runs once per driver only
        for driver in (d for d in drivers if d not in CORE_ONLY):
            env = {"DBK_DRIVER": driver, "DBK_BACKEND": "engine"}
            found.append(Session(f"{driver}/engine", env, list(ENGINE_TESTS)))
    return found


def cext_preload() -> dict[str, str] | None:
    """The environment in which Connector/Python's C extension loads next to Django:
    ``{}`` as it is, ``{"LD_PRELOAD": ...}`` with the OpenSSL it bundles (on Debian 12
    the system's OpenSSL 3.0 is older than the one it was built for, and Django imports
    ``ssl`` first), or ``None`` when it does not load at all."""
    probe = "import ssl, mysql.connector as m; raise SystemExit(not m.HAVE_CEXT)"
    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if subprocess.run([sys.executable, "-c", probe], env=base, check=False).returncode == 0:
        return {}
    try:
        import mysql.connector
    except ImportError:
        return None
    vendor = Path(mysql.connector.__file__).parent.parent / "vendor"
    libs = [vendor / "libssl.so.3", vendor / "libcrypto.so.3"]
    if not all(lib.exists() for lib in libs):
        return None
    env = {"LD_PRELOAD": ":".join(str(lib) for lib in libs)}
    done = subprocess.run([sys.executable, "-c", probe], env={**base, **env}, check=False)
    return env if done.returncode == 0 else None


def run(session: Session, data_dir: Path, live: bool) -> None:
    env = {**os.environ, **session.env, "COVERAGE_FILE": str(data_dir / ".coverage")}
    command = [sys.executable, "-m", "coverage", "run", "-m", "pytest", *session.args]
    started = time.monotonic()
    if live:
        print(f"=== {session.name} ===", flush=True)
        session.returncode = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
    else:
        with session.log.open("w") as log:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=log, check=False)
        session.returncode = done.returncode
    session.seconds = time.monotonic() - started


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else "(no output)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--drivers", default="mysqlclient,pymysql,connector,connector-cext")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()
    todo = sessions(args.drivers.split(","), args.pytest_args)
    live = args.jobs == 1
    data_dir = Path(tempfile.mkdtemp(prefix="dbkeepalive-coverage-"))
    logs = Path(tempfile.mkdtemp(prefix="dbkeepalive-logs-"))
    for session in todo:
        session.log = logs / f"{session.name.replace('/', '-')}.log"
    try:
        if not live:
            names = ", ".join(s.name for s in todo)
            print(f"running {len(todo)} sessions, {args.jobs} at a time: {names}", flush=True)
        queue = list(todo)
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    session = queue.pop(0)
                run(session, data_dir, live)

        threads = [threading.Thread(target=worker) for _ in range(max(1, args.jobs))]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            elapsed = int(time.monotonic() - started)
            if not live and elapsed % 30 == 0:
                print(f"  ... {elapsed} s", flush=True)
        status = 0
        summary = []
        for session in todo:
            if not live:
                print(f"=== {session.name} ===")
                print(session.log.read_text(errors="replace"), end="")
            ok = session.returncode == 0
            status |= not ok
            result = "ok" if ok else f"FAILED (exit {session.returncode})"
            line = last_line(session.log) if not live else ""
            summary.append(f"{session.name}: {result} in {session.seconds:.0f} s: {line}")
        status |= coverage_report(data_dir)
        print("\n".join(summary))
        return status
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


def coverage_report(data_dir: Path) -> int:
    """Combine the sessions' coverage data and report it; non-zero below fail_under."""
    env = {**os.environ, "COVERAGE_FILE": str(data_dir / ".coverage")}
    coverage = [sys.executable, "-m", "coverage"]
    subprocess.run([*coverage, "combine", "-q", str(data_dir)], cwd=ROOT, env=env, check=False)
    print("=== coverage of django_dbkeepalive (branches; every session combined) ===")
    done = subprocess.run([*coverage, "report"], cwd=ROOT, env=env, check=False)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
