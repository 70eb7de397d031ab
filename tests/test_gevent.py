"""The guard under ``gevent.monkey.patch_all()`` (gunicorn's gevent worker): ``select``,
``socket``, ``threading`` and ``time`` are gevent's, Django's per-thread connections are
per greenlet. One run of tests/gevent_probe.py per session (a fresh process: patch_all
must come before any other import), against the session's server, with the session's
driver: many greenlets idle past ``wait_timeout`` and are KILLed, the main one forks,
a ticker greenlet measures how long the hub was ever kept from running. Each test runs
once under gevent and once under ``eventlet.monkey_patch()`` (gunicorn's eventlet worker).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .conftest import wait_for

pytest.importorskip("gevent")


def _old_driver() -> bool:
    # Found by the "minimum" matrix environment: with PyMySQL 1.1.0 and mysqlclient
    # 1.4.3, a greenlet's write right after a KILL the guard saw still raises 2013 (not
    # yet understood); PyMySQL >= 1.2 and mysqlclient >= 2.2 pass. docs/integrations/gevent.md
    from django_dbkeepalive.guard.families.base import installed_version

    driver = os.environ.get("DBK_DRIVER", "mysqlclient")
    if driver == "pymysql":
        return installed_version("PyMySQL") < (1, 2)
    return driver == "mysqlclient" and installed_version("mysqlclient") < (2, 2)


pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("DBK_DRIVER", "mysqlclient") not in ("mysqlclient", "pymysql"),
        reason="PyMySQL (cooperative under gevent) and mysqlclient (blocks the hub)",
    ),
    pytest.mark.skipif(
        _old_driver(),
        reason="gevent: PyMySQL < 1.2 and mysqlclient < 2.2 fail a write right after a "
        "KILL (known, docs/integrations/gevent.md)",
    ),
]
ROOT = Path(__file__).resolve().parent.parent
GREENLETS = 20
#: The longest the hub may go without running the ticker (every 10 ms) while the guard
#: works with PyMySQL. Generous for a loaded machine; a blocking wait would exceed it
#: (the probe's idle limit is 3 s, its control SLEEP 2 s).
HUB_BOUND = 1.0


@functools.cache
def _probe(server: Any, green: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "DBK_APP": "1",
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "DBK_GREEN": green,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.gevent_probe"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=30)[1][-3000:]
        victims = json.loads(line)["kill"]
        # While every greenlet idles holding its connection: KILL them all, and wait
        # until the server has closed them.
        killed = time.monotonic()
        for ident in victims:
            if ident is not None:
                server.kill(ident)
        gone = wait_for(lambda: not set(victims) & {p["id"] for p in server.processlist()})
        proc.stdin.write("killed\n")
        proc.stdin.flush()
        kill_seconds = round(time.monotonic() - killed, 3)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result.update(victims=victims, gone=gone, kill_seconds=kill_seconds)
    return result


@pytest.fixture(params=["gevent", "eventlet"])
def probe(request: Any, server: Any, raw: Any) -> dict[str, Any]:
    """The probe's JSON (one run per session and green library), with the rows it wrote
    (``rows``: key -> connection id, read by the test over its own connection)."""
    green = request.param
    if green == "eventlet" and importlib.util.find_spec("eventlet") is None:
        # (Not imported here: eventlet warns at every fork of a process that imported it.)
        pytest.skip("eventlet is not installed")
    result = _probe(server, green)
    if "rows" not in result:
        written = raw("SELECT `key`, value FROM testapp_item")
        result["counts"] = Counter(key for key, _ in written)
        result["rows"] = {key: int(value) for key, value in written}
    return result


def greenlets(probe: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = probe["greenlets"]
    assert len(found) == GREENLETS
    assert [g.get("error") for g in found] == [None] * GREENLETS
    return found


def test_the_probe_runs_with_gevent_patched_select_socket_and_threading(probe):
    assert probe["patched"] is True
    if probe["green"] == "gevent":
        assert probe["poll"] == "gevent.select.poll"  # the guard's peek goes through gevent
    else:  # eventlet deletes select.poll: the guard peeks with the original one
        assert probe["poll"] is None


def test_each_greenlet_has_its_own_django_connection_and_server_session(probe):
    found = greenlets(probe)
    assert len({g["wrapper"] for g in found}) == GREENLETS
    assert len({g["first"] for g in found}) == GREENLETS


def test_every_greenlet_write_after_an_idle_period_succeeds_once(probe):
    found = greenlets(probe)
    for n, g in enumerate(found):
        assert g["idle"] != g["first"]  # a new session: the old one had expired
        assert probe["rows"][f"g{n}-first"] == g["first"]
        assert probe["rows"][f"g{n}-after-idle"] == g["idle"]
    assert set(probe["counts"].values()) == {1}  # no duplicate


def test_the_guard_replaces_each_idle_greenlet_connection_before_its_write(probe):
    short, long = probe["idle"]
    assert probe["limit"] < short < probe["wait"] < long
    for n, g in enumerate(greenlets(probe)):
        # Replaced before the write was sent (in the greenlet that used it), never an
        # error nor a re-run: idle past the guard's limit (even greenlets), or closed by
        # the server's wait_timeout, which the gevent socket peek saw (odd ones).
        reason = "disconnected" if n % 2 else "idle"
        assert g["recycled"][:3] == ["first", ["default", reason], "idle"]


def test_every_greenlet_write_after_a_kill_succeeds_once(probe):
    found = greenlets(probe)
    assert probe["gone"], "the KILLed sessions did not close"
    assert probe["victims"] == [g["idle"] for g in found]
    for n, g in enumerate(found):
        assert g["kill"] not in probe["victims"]
        assert probe["rows"][f"g{n}-after-kill"] == g["kill"]
    assert sum(key.startswith("g") for key in probe["rows"]) == 3 * GREENLETS
    assert set(probe["counts"].values()) == {1}


def test_the_guard_sees_each_kill_through_the_gevent_socket_peek(probe):
    for g in greenlets(probe):
        # The KILL came well within the idle limit: the peek found the closed socket.
        assert g["recycled"][3:] == [["default", "disconnected"], "kill"], (
            f"KILL round trip {probe['kill_seconds']} s, idle limit {probe['limit']} s"
        )


def test_a_child_forked_by_gevent_uses_its_own_connection_and_the_parents_survive(probe):
    fork = probe["fork"]
    assert fork["child_exit"] == 0  # the child wrote on a connection of its own
    assert fork["after"] == fork["parent"]  # the parent's session, untouched
    assert probe["rows"]["child"] not in (fork["parent"], None)
    assert probe["rows"]["main-after"] == fork["parent"]
    # The greenlets' connections the child inherited were not closed by it either.
    assert fork["greenlets_alive"] == GREENLETS, f"{fork['seconds']} s after the KILL writes"


def test_the_guard_never_blocks_the_gevent_hub_with_pymysql(probe, driver):
    if driver == "mysqlclient":
        # mysqlclient's C calls block the hub by design (a SELECT SLEEP keeps every
        # greenlet waiting): only correctness is promised, asserted above.
        assert probe["sleep_gap"] >= probe["sleep"] * 0.9
        pytest.skip("mysqlclient blocks the gevent hub by design")
    # The control: with PyMySQL even a 2 s statement lets the hub run.
    assert probe["sleep_gap"] < HUB_BOUND
    # 20 greenlets connecting, idling past the limit, KILLed, a fork: never a block.
    assert probe["max_gap"] < HUB_BOUND, probe["max_gap"]
