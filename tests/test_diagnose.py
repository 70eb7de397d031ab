"""``manage.py dbkeepalive``: table, JSON, exit status, --probe, and never a password."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections
from django.test import override_settings

from django_dbkeepalive import checks, guard
from django_dbkeepalive.checks import TAG
from django_dbkeepalive.conf import conf
from django_dbkeepalive.diagnose import SCHEMA_VERSION, diagnose

from .test_checks import (
    GOOD_OPTIONS,
    bounded,
    down_alias,
    extra_alias,
    no_driver_alias,
    other_vendor_alias,
    silent_server,
)

# The command looks at every alias, the reader included.
pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "reader"])

SQLITE = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:", "OPTIONS": {}}
ROOT = Path(__file__).resolve().parent.parent


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.out, parse_constant=not_json)

    @property
    def text(self) -> str:
        return self.out + self.err


def not_json(name: str) -> Any:
    raise AssertionError(f"{name} is not JSON")


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


#: The start of the driver row for each DBK_DRIVER: the driver the alias really uses.
DRIVER_ROW = {
    "mysqlclient": "mysqlclient ",
    "pymysql": "PyMySQL 1.",
    "connector": "MySQL Connector/Python ",
    "connector-cext": "MySQL Connector/Python ",
}


# ------------------------------------------------------------------------ table


def test_table_shows_server_client_django_and_guard_values(driver, server):
    result = run()
    assert result.code == 0, result.text
    wait = int(server.get_global("wait_timeout"))
    engine = connections["default"].settings_dict["ENGINE"]
    assert f"Database 'default' ({engine}, 127.0.0.1:{server.port}" in result.out
    assert f"user '{server.user}'" in result.out
    row = rows(result.out)
    assert row["driver"].startswith(DRIVER_ROW[driver])
    if driver == "mysqlclient":
        assert row["driver"].startswith(f"mysqlclient {metadata.version('mysqlclient')} ")
        assert "(client library " in row["driver"]
    assert row["server"].startswith("MariaDB 10.")
    assert row["wait_timeout"] == f"{wait} s (session), {wait} s (global)"
    assert row["interactive_timeout"] == f"{server.get_global('interactive_timeout')} s"
    assert row["net_read_timeout"] == f"{server.get_global('net_read_timeout')} s"
    assert row["net_write_timeout"] == f"{server.get_global('net_write_timeout')} s"
    assert row["max_allowed_packet"] == "16 MiB (16777216 bytes)"
    assert row["client connect_timeout"] == "5 s (OPTIONS)"
    assert row["client read_timeout"] == row["client write_timeout"] == "30 s (OPTIONS)"
    assert row["CONN_MAX_AGE"] == "0 (closed at the end of each request)"
    assert row["CONN_HEALTH_CHECKS"] == "False"
    assert row["guard"] == "on (AUTO_GUARD)"
    assert row["guard idle limit"] == (
        f"{wait - 5} s = {wait} s - margin 5 s (wait_timeout from the server)"
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
        "not set (PyMySQL default: 10 s, for the TCP connect only)"
        if driver == "pymysql"
        else "not set (no timeout)"
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
    assert db["driver"]["name"] == DRIVER_ROW[driver].rsplit(" ", 1)[0]
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
    assert db["client"]["connect_timeout_source"] == "options"
    assert db["client"]["read_timeout_source"] == db["client"]["write_timeout_source"] == "options"
    assert srv["error_kind"] is None
    assert db["client"]["options"]["charset"] == "utf8mb4"
    assert db["django"] == {"conn_max_age": 0, "conn_health_checks": False}
    cfg = conf.for_alias("default")
    assert db["guard"] == {
        "installed": True,
        "installed_by": "patch",
        "enabled": True,
        "mode": "auto",
        "unguarded": None,
        "wait_timeout": wait,
        "wait_timeout_source": "server",
        "margin": cfg.margin,
        "idle_limit": guard.limit_for(wait, cfg.margin),
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
    # A wrong password is a problem to fix, not an unreachable server.
    assert by_alias["wrongpass"]["verdict"] == "problem"
    assert by_alias["wrongpass"]["server"]["error_kind"] == "access_denied"
    assert "1045" in by_alias["wrongpass"]["server"]["error"]
    assert [i["id"] for i in by_alias["wrongpass"]["issues"]] == ["dbkeepalive.E006"]
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


# ------------------------------------------------------------ client timeouts


def test_client_timeouts_show_what_the_driver_gets_and_where_it_comes_from(
    default_settings, monkeypatch
):
    monkeypatch.setitem(default_settings, "OPTIONS", {"charset": "utf8mb4", "connect_timeout": 4})
    value = {"CLIENT_TIMEOUTS": {"connect_timeout": 9, "read_timeout": 42}}
    with override_settings(DBKEEPALIVE=value):
        client = run("--json", "--database", "default").json["databases"][0]["client"]
        row = rows(run("--database", "default").out)
    assert client == {
        "connect_timeout": 4,  # OPTIONS wins
        "read_timeout": 42,
        "write_timeout": None,
        "connect_timeout_source": "options",
        "read_timeout_source": "client_timeouts",
        "write_timeout_source": None,
        "options": {"charset": "utf8mb4", "connect_timeout": 4},
    }
    assert row["client connect_timeout"] == "4 s (OPTIONS)"
    assert row["client read_timeout"] == "42 s (DBKEEPALIVE['CLIENT_TIMEOUTS'])"
    assert row["client write_timeout"] == "not set (no timeout)"


def test_client_timeouts_are_not_applied_where_an_option_file_is_read(
    default_settings, monkeypatch, tmp_path
):
    option_file = tmp_path / "my.cnf"
    option_file.write_text("[client]\n")
    options = {"read_default_file": str(option_file), "read_timeout": 0}
    monkeypatch.setitem(default_settings, "OPTIONS", options)
    with override_settings(DBKEEPALIVE={"CLIENT_TIMEOUTS": True}):
        client = run("--json", "--database", "default").json["databases"][0]["client"]
        row = rows(run("--database", "default").out)
    assert client["connect_timeout"] is None
    assert client["connect_timeout_source"] == "option_file"
    assert client["read_timeout"] == 0 and client["read_timeout_source"] == "options"
    assert row["client connect_timeout"].startswith("not in OPTIONS (read_default_file may set")
    assert row["client read_timeout"] == "0 in OPTIONS (no timeout)"


# ---------------------------------------------------------- the idle limit


def test_idle_limit_shows_the_half_timeout_fallback():
    value = {"DATABASES": {"default": {"WAIT_TIMEOUT": 60, "MARGIN": 60}}}
    with override_settings(DBKEEPALIVE=value):
        result = run("--database", "default")
    assert rows(result.out)["guard idle limit"] == (
        "30 s = 60 s - min(margin 60 s, half) (wait_timeout from DBKEEPALIVE['WAIT_TIMEOUT'])"
    )


# ------------------------------------------------------------ strict JSON


def test_json_is_strict_even_with_an_infinite_conn_max_age(default_settings, monkeypatch):
    monkeypatch.setitem(default_settings, "CONN_MAX_AGE", float("inf"))
    result = run("--json", "--database", "default")
    assert "Infinity" not in result.out
    [db] = result.json["databases"]  # parse_constant fails on Infinity and NaN
    assert db["django"]["conn_max_age"] is None  # no limit, as None
    # Reusing connections without limit is a warning, not an unreachable server.
    assert result.code == 1 and db["verdict"] == "problem"
    assert [i["id"] for i in db["issues"]] == ["dbkeepalive.W001"]


# ------------------------------------------------ connection errors, by kind


@pytest.mark.parametrize(
    "changes, kind, label",
    [
        ({"CONN_MAX_AGE": "60"}, "configuration", "SETTINGS ERROR: TypeError: "),
        ({"NAME": "no_such_database"}, "unknown_database", "UNKNOWN DATABASE: "),
        (
            {"OPTIONS": {**GOOD_OPTIONS, "init_command": "SET SESSION wait_timeout = nope"}},
            "sql",
            "CONNECTION SETUP FAILED: OperationalError: (1232, ",
        ),
        ({"PASSWORD": "a"}, "access_denied", "ACCESS DENIED: OperationalError: (1045, "),
    ],
)
def test_settings_errors_are_problems_not_unreachable_servers(server, changes, kind, label):
    with extra_alias("bad", **changes) as alias:
        doc = run("--json", "--database", alias)
        table = run("--database", alias)
    assert doc.code == table.code == 1
    [db] = doc.json["databases"]
    assert doc.json["status"] == "problem"
    assert db["verdict"] == "problem"
    assert db["server"]["reachable"] is False
    assert db["server"]["error_kind"] == kind
    assert [i["id"] for i in db["issues"]] == ["dbkeepalive.E006"]
    assert db["hint"].startswith("dbkeepalive.E006: ")
    assert rows(table.out, alias)["server"].startswith(label)
    assert rows(table.out, alias)["verdict"] == "problem"
    assert "Traceback" not in table.text + doc.text


def test_a_server_that_accepts_but_never_answers_is_unreachable_in_bounded_time(
    monkeypatch, no_password_anywhere, server
):
    monkeypatch.setattr(checks.connection, "DIAGNOSTIC_TIMEOUT", 1)
    options = {"connect_timeout": 30, "write_timeout": 30}  # no read_timeout
    with (
        silent_server() as silent,
        extra_alias(
            "hung", HOST="127.0.0.1", PORT=silent.port, OPTIONS=options, PASSWORD=server.password
        ) as alias,
    ):
        result = bounded(lambda: run("--json", "--database", alias), seconds=6)
    no_password_anywhere.append(result.text)
    assert silent.accepted
    assert result.code == 2
    [db] = result.json["databases"]
    assert db["verdict"] == "unreachable"
    assert db["server"]["error_kind"] == "unreachable"
    assert "(2013, " in db["server"]["error"]
    assert "dbkeepalive.W005" in [i["id"] for i in db["issues"]]
    # The command's connection was bounded; the alias's settings were not changed.
    assert db["client"]["read_timeout"] is None
    assert db["client"]["options"] == options


# ---------------------------------------------------------------- sockets


def test_a_unix_socket_alias_reports_no_tcp_port(server):
    if not server.socket:
        pytest.skip("an external test server: no socket path known")
    with extra_alias("local_socket", HOST=server.socket) as alias:
        doc = run("--json", "--database", alias)
        table = run("--database", alias)
    assert doc.code == 0, doc.text
    [db] = doc.json["databases"]
    assert (db["host"], db["port"], db["socket"]) == (None, None, server.socket)
    assert f"Database 'local_socket' (django.db.backends.mysql, {server.socket}, user" in (
        table.out
    )


# ------------------------------------------------------ no backend, no driver


def test_an_alias_whose_backend_cannot_be_loaded_is_a_problem_with_its_reason(tmp_path):
    with no_driver_alias(tmp_path) as alias:
        doc = run("--json", "--database", alias, "--probe")
        table = run()
    assert doc.code == table.code == 1
    [db] = doc.json["databases"]
    assert db["vendor"] is None and db["mysql"] is True
    assert db["driver"] == {"name": None, "version": None, "client_library": None}
    assert db["server"]["error_kind"] == "backend"
    assert db["server"]["error"] == (
        "ImproperlyConfigured: Error loading MySQLdb module. Did you install mysqlclient?"
    )
    assert [i["id"] for i in db["issues"]] == ["dbkeepalive.E005"]
    assert db["verdict"] == "problem"
    assert db["probe"]["outcome"] == "skipped"
    assert rows(table.out, alias)["server"].startswith("BACKEND CANNOT BE LOADED: ")
    assert rows(table.out)["verdict"] == "ok"  # default is still fine
    assert "Traceback" not in table.text + doc.text


NO_DRIVER_SETTINGS = """
import sys

sys.modules["MySQLdb"] = None  # mysqlclient is not installed: importing it fails
SECRET_KEY = "not-secret"
USE_TZ = True
INSTALLED_APPS = ["django_dbkeepalive"]
DATABASES = {{"default": {{
    "ENGINE": "django.db.backends.mysql",
    "HOST": "127.0.0.1",
    "PORT": {port},
    "USER": {user!r},
    "PASSWORD": {password!r},
    "NAME": "dbkeepalive",
    "OPTIONS": {{"connect_timeout": 5, "read_timeout": 30}},
}}}}
"""


def test_without_a_mysql_driver_check_and_dbkeepalive_say_so_without_a_traceback(tmp_path, server):
    (tmp_path / "nodriver_settings.py").write_text(
        NO_DRIVER_SETTINGS.format(port=server.port, user=server.user, password=server.password)
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "DJANGO_SETTINGS_MODULE": "nodriver_settings",
    }

    def manage(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "django", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    check = manage("check")
    diagnosis = manage("dbkeepalive", "--json")
    for result in (check, diagnosis):
        assert "Traceback" not in result.stdout + result.stderr
        assert server.password not in result.stdout + result.stderr
    assert check.returncode == 1
    assert "(dbkeepalive.E005) Database 'default': its database backend " in check.stderr
    assert "Error loading MySQLdb module. Did you install mysqlclient?" in check.stderr
    assert diagnosis.returncode == 1
    doc = json.loads(diagnosis.stdout, parse_constant=not_json)
    [db] = doc["databases"]
    assert db["server"]["error_kind"] == "backend"
    assert [i["id"] for i in db["issues"]] == ["dbkeepalive.E005"]


def test_the_table_lists_settings_errors_first_with_their_hints():
    with override_settings(DBKEEPALIVE={"MARGIN": -1}):
        result = run("--database", "default")
    assert result.code == 1
    lines = result.out.splitlines()
    assert lines[0] == "Settings"
    assert lines[1].startswith("  (dbkeepalive.E003) DBKEEPALIVE['MARGIN'] is -1; it must be")
    assert lines[2].startswith("      HINT: Set DBKEEPALIVE['MARGIN'] to ")
    assert rows(result.out)["guard"] == "unknown: DBKEEPALIVE is invalid (see Settings above)"


def test_probe_in_the_table_for_an_alias_it_cannot_reach_says_it_was_skipped(server):
    with down_alias() as down:
        result = run("--probe", "--database", down)
    assert result.code == 2
    probe = rows(result.out, down)["probe"]
    assert probe.startswith("skipped: ")
    assert "server connections" not in probe and "turned the guard on" not in probe


def test_run_probe_reports_a_connection_the_server_did_not_close(server):
    from django_dbkeepalive.diagnose.probe import run_probe

    # Idle well below its session wait_timeout: as behind a proxy that keeps the flow.
    result = run_probe("default", wait_timeout=60, idle=0.2)
    assert (result.ran, result.outcome, result.recovered) == (True, "not_closed", True)
    assert result.connection_id_after == result.connection_id_before
    assert result.reasons == [] and result.error is None
    assert result.detail == (
        f"connection {result.connection_id_before} was still open after "
        f"{result.idle_seconds:g} s idle with wait_timeout 60 s (a proxy between the "
        "application and the server?); nothing to recover"
    )
    assert result.idle_seconds >= 0.2


def test_run_probe_on_an_unreachable_server_says_it_could_not_run(server, no_password_anywhere):
    from django_dbkeepalive.diagnose.probe import run_probe

    with down_alias() as down, override_settings(DBKEEPALIVE={"RETRY_CONNECT_FOR": 0}):
        result = run_probe(down, idle=0.1)
    no_password_anywhere += [result.detail]
    assert (result.outcome, result.recovered) == ("failed", False)
    assert result.connection_id_before is None
    assert result.error is not None and re.match(r"OperationalError: \(200[23]\b", result.error)
    assert result.detail == f"the probe could not run: {result.error}"
