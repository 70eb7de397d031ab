"""``manage.py dbkeepalive``: table, JSON, exit status, --probe, and never a password."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections
from django.test import override_settings

from django_dbkeepalive import guard
from django_dbkeepalive.checks import TAG
from django_dbkeepalive.conf import conf
from django_dbkeepalive.diagnose import SCHEMA_VERSION, diagnose

from .test_checks import down_alias, extra_alias, other_vendor_alias

# The command looks at every alias, the reader included.
pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "reader"])

SQLITE = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:", "OPTIONS": {}}


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.out)

    @property
    def text(self) -> str:
        return self.out + self.err


def run(*args: str) -> Result:
    """``manage.py dbkeepalive *args``: exit status and output (no colours)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("dbkeepalive", *args, stdout=out, stderr=err, no_color=True)
    except SystemExit as exc:
        code = int(exc.code or 0)
    else:
        code = 0
    return Result(code, out.getvalue(), err.getvalue())


def rows(table: str, alias: str = "default") -> dict[str, str]:
    """The ``label  value`` rows of one alias's block in the table."""
    block = table.split(f"Database {alias!r} (", 1)[1].split("\n\n", 1)[0]
    found = {}
    for line in block.splitlines()[1:]:
        match = re.match(r"^  (\S[^ ]*(?: \S+)*?)  +(.*)$", line)
        if match and not line.startswith("  ("):
            found[match.group(1)] = match.group(2)
    return found


@pytest.fixture
def default_settings() -> dict[str, Any]:
    return connections["default"].settings_dict


@pytest.fixture
def no_password_anywhere(server) -> Iterator[list[str]]:
    """Collect every output of the test; fail if one holds the server's password."""
    seen: list[str] = []
    yield seen
    for text in seen:
        assert server.password not in text


# ------------------------------------------------------------------------ table


def test_table_shows_server_client_django_and_guard_values(driver, server):
    result = run()
    assert result.code == 0, result.text
    wait = int(server.get_global("wait_timeout"))
    assert f"Database 'default' (django.db.backends.mysql, 127.0.0.1:{server.port}" in result.out
    assert f"user '{server.user}'" in result.out
    row = rows(result.out)
    assert row["driver"].startswith("mysqlclient 2." if driver == "mysqlclient" else "PyMySQL 1.")
    if driver == "mysqlclient":
        assert "(client library " in row["driver"]
    assert row["server"].startswith("MariaDB 10.")
    assert row["wait_timeout"] == f"{wait} s (session), {wait} s (global)"
    assert row["interactive_timeout"] == f"{server.get_global('interactive_timeout')} s"
    assert row["net_read_timeout"] == f"{server.get_global('net_read_timeout')} s"
    assert row["net_write_timeout"] == f"{server.get_global('net_write_timeout')} s"
    assert row["max_allowed_packet"] == "16 MiB (16777216 bytes)"
    assert row["client connect_timeout"] == "5 s"
    assert row["client read_timeout"] == row["client write_timeout"] == "30 s"
    assert row["CONN_MAX_AGE"] == "0 (closed at the end of each request)"
    assert row["CONN_HEALTH_CHECKS"] == "False"
    assert row["guard"] == "on (AUTO_GUARD)"
    assert row["guard idle limit"] == (
        f"{wait - 5} s (wait_timeout {wait} s from the server - margin 5 s)"
    )
    assert row["guard ping"] == "after 60 s idle"
    assert row["guard peek"] == "after 0.1 s idle"
    assert row["verdict"] == "ok"
    assert "probe" not in row
    assert result.out.rstrip().endswith("Everything looks fine.")


def test_table_shows_missing_client_timeouts_with_the_drivers_default(
    default_settings, monkeypatch, driver
):
    monkeypatch.setitem(default_settings, "OPTIONS", {"charset": "utf8mb4"})
    row = rows(run().out)
    assert row["client read_timeout"] == "not set (no timeout)"
    assert row["client connect_timeout"] == (
        "not set (PyMySQL default: 10 s)" if driver == "pymysql" else "not set (no timeout)"
    )


def test_unknown_database_is_a_clear_command_error():
    with pytest.raises(CommandError) as caught:
        run("--database", "nope")
    message = str(caught.value)
    assert "Unknown database alias 'nope'" in message
    assert "Configured aliases: default, reader." in message


def test_database_option_is_repeatable_and_limits_the_aliases(server):
    with extra_alias("second"):
        both = run("--json", "--database", "second", "--database", "default").json
        one = run("--json", "--database", "second").json
    assert [d["alias"] for d in both["databases"]] == ["second", "default"]
    assert [d["alias"] for d in one["databases"]] == ["second"]


# ------------------------------------------------------------------------- JSON


def test_json_document_has_the_documented_schema(driver, server):
    result = run("--json")
    assert result.code == 0, result.text
    doc = result.json
    assert doc["schema_version"] == SCHEMA_VERSION == 1
    assert doc["status"] == "ok" and doc["exit_code"] == 0
    assert doc["issues"] == []
    db, reader = doc["databases"]
    assert reader["alias"] == "reader" and reader["verdict"] == "ok"
    assert set(db) == {
        "alias", "engine", "vendor", "mysql", "note", "host", "port", "socket", "user",
        "name", "driver", "server", "client", "django", "guard", "issues", "verdict",
        "hint", "probe",
    }  # fmt: skip
    assert db["alias"] == "default" and db["mysql"] is True and db["vendor"] == "mysql"
    assert db["name"] == connections["default"].settings_dict["NAME"] == "test_dbkeepalive"
    assert (db["host"], db["port"], db["user"]) == ("127.0.0.1", server.port, server.user)
    assert db["driver"]["name"] == {"mysqlclient": "mysqlclient", "pymysql": "PyMySQL"}[driver]
    assert db["driver"]["version"]
    wait = float(server.get_global("wait_timeout"))
    srv = db["server"]
    assert srv["reachable"] is True and srv["error"] is None
    assert srv["product"] == "MariaDB" and "MariaDB" in srv["version"]
    assert srv["wait_timeout"] == srv["wait_timeout_global"] == wait
    assert srv["interactive_timeout"] == float(server.get_global("interactive_timeout"))
    assert srv["net_read_timeout"] == float(server.get_global("net_read_timeout"))
    assert srv["net_write_timeout"] == float(server.get_global("net_write_timeout"))
    assert srv["max_allowed_packet"] == int(server.get_global("max_allowed_packet"))
    assert db["client"]["connect_timeout"] == 5
    assert db["client"]["read_timeout"] == db["client"]["write_timeout"] == 30
    assert db["client"]["options"]["charset"] == "utf8mb4"
    assert db["django"] == {"conn_max_age": 0, "conn_health_checks": False}
    cfg = conf.for_alias("default")
    assert db["guard"] == {
        "installed": True,
        "enabled": True,
        "mode": "auto",
        "wait_timeout": wait,
        "wait_timeout_source": "server",
        "margin": cfg.margin,
        "idle_limit": guard._limit_for(wait, cfg),
        "ping_after": cfg.ping_after,
        "peek_after": cfg.peek_after,
        "retry_reads": cfg.retry_reads,
    }
    assert db["verdict"] == "ok" and db["hint"] == "" and db["issues"] == []
    assert db["probe"] is None


def test_json_guard_values_follow_dbkeepalive_overrides(set_wait_timeout):
    set_wait_timeout(120)
    value = {"PING_AFTER": None, "DATABASES": {"default": {"MARGIN": 10, "WAIT_TIMEOUT": 100}}}
    with override_settings(DBKEEPALIVE=value):
        db = run("--json").json["databases"][0]
    assert db["guard"]["wait_timeout"] == 100
    assert db["guard"]["wait_timeout_source"] == "setting"
    assert db["guard"]["idle_limit"] == 90
    assert db["guard"]["ping_after"] is None
    assert db["server"]["wait_timeout"] == 120


# ------------------------------------------------------------------ exit status


def test_a_problem_exits_1_with_the_same_ids_as_manage_py_check(
    default_settings, monkeypatch, set_wait_timeout
):
    set_wait_timeout(60)
    monkeypatch.setitem(default_settings, "CONN_MAX_AGE", 600)
    options = {k: v for k, v in default_settings["OPTIONS"].items() if k != "read_timeout"}
    monkeypatch.setitem(default_settings, "OPTIONS", options)
    result = run("--json")
    assert result.code == 1
    doc = result.json
    assert doc["status"] == "problem" and doc["exit_code"] == 1
    db, reader = doc["databases"]
    assert reader["verdict"] == "ok"  # the problems are default's
    assert db["verdict"] == "problem"
    expected = sorted(m.id for m in run_checks(tags=[TAG], databases=["default"]))
    assert sorted(i["id"] for i in db["issues"]) == expected
    assert expected == ["dbkeepalive.W001", "dbkeepalive.W006"]
    assert "dbkeepalive.W001: Set DATABASES['default']['CONN_MAX_AGE'] below 60 s" in db["hint"]
    table = run()
    assert table.code == 1
    assert rows(table.out)["verdict"] == "problem"
    assert "(dbkeepalive.W001) Database 'default': CONN_MAX_AGE is 600 s" in table.out
    assert "HINT: Set DATABASES['default']['CONN_MAX_AGE'] below 60 s" in table.out
    assert "Problems found" in table.out


def test_silenced_checks_do_not_count(default_settings, monkeypatch):
    monkeypatch.setitem(default_settings, "CONN_MAX_AGE", None)
    assert run().code == 1
    with override_settings(SILENCED_SYSTEM_CHECKS=["dbkeepalive.W001"]):
        assert run().code == 0


def test_an_unreachable_server_exits_2_and_says_why(server, no_password_anywhere):
    with down_alias(PASSWORD=server.password) as alias:
        port = connections[alias].settings_dict["PORT"]
        table = run()
        doc = run("--json", "--database", alias)
    no_password_anywhere += [table.text, doc.text]
    assert table.code == 2
    assert f"Database 'down' (django.db.backends.mysql, 127.0.0.1:{port}" in table.out
    down = rows(table.out, alias)
    assert down["server"].startswith("UNREACHABLE: OperationalError: (200")
    assert down["verdict"] == "unreachable"
    assert "(dbkeepalive.W005) Database 'down': could not connect" in table.out
    assert rows(table.out)["verdict"] == "ok"  # default is still fine
    assert "Traceback" not in table.text
    assert doc.code == 2
    [db] = doc.json["databases"]
    assert doc.json["status"] == "unreachable"
    assert db["verdict"] == "unreachable"
    assert db["server"]["reachable"] is False
    assert "Can't connect" in db["server"]["error"]
    assert db["server"]["wait_timeout"] is None
    assert [i["id"] for i in db["issues"]] == ["dbkeepalive.W005"]


def test_settings_errors_are_reported_and_exit_1():
    with override_settings(DBKEEPALIVE={"MARGIN": -1}):
        result = run("--json")
    assert result.code == 1
    assert [i["id"] for i in result.json["issues"]] == ["dbkeepalive.E003"]
    assert result.json["databases"][0]["guard"]["mode"] == "invalid"


# ------------------------------------------------------------- other backends


def test_non_mysql_aliases_are_listed_as_such(server):
    with extra_alias("local", **SQLITE), other_vendor_alias() as other:
        table = run()
        doc = run("--json").json
    assert table.code == 0, table.text  # I001 is an Info: not a problem
    assert "Database 'local' (django.db.backends.sqlite3" in table.out
    assert rows(table.out, "local")["note"] == "not MySQL: only CONN_MAX_AGE is enforced"
    assert rows(table.out, "other")["note"] == "not MySQL: only CONN_MAX_AGE is enforced"
    assert "server" not in rows(table.out, "local")
    assert "(dbkeepalive.I001) Database 'other' uses OtherSQL" in table.out
    by_alias = {d["alias"]: d for d in doc["databases"]}
    assert by_alias["local"]["mysql"] is False
    assert by_alias["local"]["note"] == "not MySQL: only CONN_MAX_AGE is enforced"
    assert by_alias["local"]["server"] is None
    assert by_alias["local"]["guard"]["idle_limit"] is None
    assert by_alias["local"]["issues"] == []
    assert [i["id"] for i in by_alias[other]["issues"]] == ["dbkeepalive.I001"]
    assert by_alias[other]["issues"][0]["level"] == "info"
    assert by_alias[other]["verdict"] == "ok"


# -------------------------------------------------------------------- password


def test_no_output_ever_contains_the_password(server, driver, no_password_anywhere):
    options = {"password": server.password, "connect_timeout": 5, "read_timeout": 30}
    with (
        extra_alias("optpass", PASSWORD="", OPTIONS=options),
        down_alias(PASSWORD=server.password),
        extra_alias("wrongpass", PASSWORD="x" + server.password),
    ):
        table = run()
        doc = run("--json")
    no_password_anywhere += [table.text, doc.text]
    assert "x" + server.password not in table.text + doc.text
    by_alias = {d["alias"]: d for d in doc.json["databases"]}
    # The password in OPTIONS works (the server answered) and is masked.
    assert by_alias["optpass"]["verdict"] == "ok"
    assert by_alias["optpass"]["client"]["options"]["password"] == "********"
    assert by_alias["wrongpass"]["verdict"] == "unreachable"
    assert "1045" in by_alias["wrongpass"]["server"]["error"]
    assert "'password': '********'" not in table.out  # OPTIONS are not printed in the table


# ------------------------------------------------------------------------ probe


def test_probe_recovers_and_reports_the_reason(server, no_password_anywhere):
    connection.ensure_connection()
    mine = connection.connection
    result = run("--json", "--probe")
    no_password_anywhere += [result.text]
    assert result.code == 0, result.text
    probe = result.json["databases"][0]["probe"]
    assert probe["ran"] is True
    assert probe["outcome"] == "recovered" and probe["recovered"] is True
    assert probe["reasons"] in (["disconnected"], ["idle"])
    assert probe["forced_guard"] is False
    assert probe["session_wait_timeout"] == 1
    assert probe["idle_seconds"] >= 2.0
    assert 0 <= probe["query_seconds"] < 2.0
    assert probe["connection_id_after"] != probe["connection_id_before"]
    assert probe["server_connections_after"] > probe["server_connections_before"]
    assert probe["error"] is None
    assert "the guard replaced it" in probe["detail"]
    # Progress goes to stderr, so stdout stays one JSON document.
    assert "idle for 2 s past its session wait_timeout of 1 s" in result.err
    assert "...." in result.err
    # The probe used its own connection: this thread's is untouched.
    assert connection.connection is mine


def test_probe_in_the_table_with_auto_guard_off(server, no_password_anywhere):
    with override_settings(DBKEEPALIVE={"AUTO_GUARD": False}):
        result = run("--probe", "--database", "default")
    no_password_anywhere += [result.text]
    assert result.code == 1  # W008: nothing guards requests
    assert rows(result.out)["probe"].startswith("recovered: the server closed connection")
    assert "the probe turned the guard on" in result.out
    assert "server connections" in result.out
    assert "idle for 2 s past its session wait_timeout of 1 s ...." in result.out


def test_probe_failure_is_a_problem(server, no_password_anywhere):
    # Without the guard nothing replaces the connection the server closed.
    guard.uninstall()
    try:
        result = run("--json", "--probe", "--database", "default")
    finally:
        guard.install()
    no_password_anywhere += [result.text]
    assert result.code == 1
    [db] = result.json["databases"]
    assert db["verdict"] == "problem"
    assert db["guard"]["installed"] is False and db["guard"]["mode"] == "off"
    probe = db["probe"]
    assert probe["outcome"] == "failed" and probe["recovered"] is False
    assert probe["reasons"] == []
    assert re.search(r"\((2006|2013|0)\b", probe["error"]), probe["error"]
    assert "the guard is not installed" in probe["detail"]
    assert db["hint"].startswith("probe: the query after the idle period failed")


def test_probe_skips_unreachable_and_non_mysql_aliases(server):
    with down_alias() as down, extra_alias("local", **SQLITE):
        doc = run("--json", "--probe", "--database", down, "--database", "local").json
    probes = {d["alias"]: d["probe"] for d in doc["databases"]}
    assert probes[down]["ran"] is False and probes[down]["outcome"] == "skipped"
    assert probes["local"]["ran"] is False


def test_diagnose_api_returns_the_same_report_as_the_command(server):
    report = diagnose(["default"])
    assert report.exit_code == 0
    assert report.as_dict()["databases"][0]["alias"] == "default"
    with pytest.raises(ValueError, match="Unknown database alias 'x'"):
        diagnose(["x"])
