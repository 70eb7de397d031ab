"""System checks against the real server: every ID fires when it should and only then."""

from __future__ import annotations

import contextlib
import copy
import io
import re
import socket
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection, connections
from django.test import override_settings

from django_dbkeepalive import checks
from django_dbkeepalive.checks import CHECK_IDS, MIDDLEWARE_PATH, REGISTRY, TAG
from django_dbkeepalive.conf import conf

from .conftest import close_connections

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "django_dbkeepalive"
ID_PATTERN = re.compile(r"dbkeepalive\.[EWI]\d{3}")


def _ensure_connection(self: Any) -> None:
    """``BaseDatabaseWrapper.ensure_connection`` without the test case's alias guard.

    Django's test case (and pytest-django's blocker) let a test use only the aliases
    it declared when it started, by patching ``BaseDatabaseWrapper.ensure_connection``.
    These tests add aliases while they run (an unreachable server, another vendor), so
    the wrappers of those get Django's plain behaviour back as an instance attribute.
    """
    if self.connection is None:
        with self.wrap_database_errors:
            self.connect()


# --------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port nothing listens on (bound and released again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def extra_alias(alias: str, **changes: Any) -> Iterator[str]:
    """Add a database alias (a copy of ``default`` with ``changes``) for the block.

    ``connections.settings`` is ``settings.DATABASES`` itself, so the alias exists for
    Django and for the checks (in this thread); afterwards its connection is closed and
    it is removed before the test case's teardown looks at the aliases again.
    """
    assert alias not in connections.settings
    new = copy.deepcopy(connections["default"].settings_dict)
    new.update(changes)
    connections.settings[alias] = new
    db = connections[alias]
    db.ensure_connection = types.MethodType(_ensure_connection, db)
    try:
        yield alias
    finally:
        for db in connections.all(initialized_only=True):
            if db.alias == alias:
                with contextlib.suppress(Exception):
                    db.close()
        with contextlib.suppress(AttributeError):
            del connections[alias]
        del connections.settings[alias]


@contextlib.contextmanager
def down_alias(alias: str = "down", **changes: Any) -> Iterator[str]:
    """An alias pointing at a closed port on this machine."""
    options = {"connect_timeout": 2, "read_timeout": 5, "write_timeout": 5}
    with extra_alias(alias, HOST="127.0.0.1", PORT=free_port(), OPTIONS=options, **changes):
        yield alias


@contextlib.contextmanager
def other_vendor_alias(alias: str = "other") -> Iterator[str]:
    """An alias on a non-MySQL backend with a server (vendor ``othersql``).

    PostgreSQL's backend needs psycopg, which the test environment does not install;
    the check looks at the backend's ``vendor`` only, so a SQLite-based backend that
    calls itself something else exercises the same path. Nothing connects to it.
    """
    from django.db.backends.sqlite3 import base as sqlite_base

    class DatabaseWrapper(sqlite_base.DatabaseWrapper):  # type: ignore[misc]
        vendor = "othersql"
        display_name = "OtherSQL"

    package = types.ModuleType("dbk_other_backend")
    package.__path__ = []
    base = types.ModuleType("dbk_other_backend.base")
    base.DatabaseWrapper = DatabaseWrapper  # type: ignore[attr-defined]
    sys.modules["dbk_other_backend"] = package
    sys.modules["dbk_other_backend.base"] = base
    try:
        with extra_alias(alias, ENGINE="dbk_other_backend", NAME=":memory:", OPTIONS={}):
            yield alias
    finally:
        del sys.modules["dbk_other_backend.base"], sys.modules["dbk_other_backend"]


def ids(messages: list[Any]) -> list[str]:
    return sorted(m.id for m in messages)


def ours(databases: list[str] | None = None) -> list[Any]:
    """Every message of this app's checks (``databases`` as ``check --database``)."""
    return run_checks(tags=[TAG], databases=databases)


def by_id(messages: list[Any], check_id: str) -> list[Any]:
    return [m for m in messages if m.id == check_id]


def text_of(messages: list[Any]) -> str:
    return "\n".join(f"{m.msg}\n{m.hint}" for m in messages)


@pytest.fixture
def default_settings(monkeypatch) -> dict[str, Any]:
    """``DATABASES['default']`` (the live dict): change keys with ``monkeypatch``."""
    return connections["default"].settings_dict


@pytest.fixture
def packet_size(server) -> Iterator[Any]:
    """``packet_size(bytes)``: GLOBAL max_allowed_packet for new connections; restored."""
    saved = server.get_global("max_allowed_packet")

    def set_(value: int) -> None:
        server.set_global("max_allowed_packet", value)
        close_connections()

    yield set_
    server.set_global("max_allowed_packet", saved)
    close_connections()


# -------------------------------------------------------------------- registry


def test_every_check_id_is_unique_well_formed_and_documented():
    assert len(CHECK_IDS) == len(set(CHECK_IDS)) == len(REGISTRY)
    assert all(ID_PATTERN.fullmatch(i) for i in CHECK_IDS)
    for info in REGISTRY:
        assert info.level == {"E": "error", "W": "warning", "I": "info"}[info.id[12]]
        assert info.title
    docs = (ROOT / "docs" / "checks.md").read_text()
    documented = re.findall(r"^#+\s*`?(dbkeepalive\.[EWI]\d{3})", docs, re.MULTILINE)
    assert sorted(documented) == sorted(CHECK_IDS), "docs/checks.md: one heading per ID"
    readme = ROOT / "README.md"
    if readme.exists() and "dbkeepalive.W001" in readme.read_text():
        missing = [i for i in CHECK_IDS if i not in readme.read_text()]
        assert not missing, f"README.md does not document {missing}"


def test_every_id_the_code_emits_is_registered_and_every_registered_id_is_emitted():
    source = (PACKAGE / "checks.py").read_text() + (PACKAGE / "conf.py").read_text()
    assert set(ID_PATTERN.findall(source)) == set(CHECK_IDS)


def test_checks_are_registered_with_their_tags():
    from django.core.checks import registry

    registered = {c.__name__: set(c.tags) for c in registry.registry.get_checks()}
    assert registered["check_settings"] == {TAG}
    assert registered["check_configuration"] == {TAG}
    assert registered["check_servers"] == {TAG, "database"}


# -------------------------------------------------------------------- good setup


def test_the_test_projects_settings_are_quiet_with_and_without_databases(driver):
    assert ours() == []
    assert ours(["default"]) == []


def test_manage_py_check_database_reports_nothing_of_ours_on_a_good_setup():
    out, err = io.StringIO(), io.StringIO()
    call_command("check", "--database", "default", stdout=out, stderr=err)
    assert "dbkeepalive." not in out.getvalue() + err.getvalue()


# ---------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "value, check_id, fragment",
    [
        (["MARGIN"], "dbkeepalive.E001", "must be a dict"),
        ({"MARGN": 3}, "dbkeepalive.E002", "Did you mean 'MARGIN'"),
        ({"DATABASES": {"default": {"PING_AFTR": 1}}}, "dbkeepalive.E002", "'PING_AFTER'"),
        ({"MARGIN": -1}, "dbkeepalive.E003", "DBKEEPALIVE[MARGIN] is -1"),
        ({"WAIT_TIMEOUT": "300"}, "dbkeepalive.E003", "WAIT_TIMEOUT"),
        ({"DATABASES": ["default"]}, "dbkeepalive.E003", "DATABASES"),
        ({"DATABASES": {"default": 5}}, "dbkeepalive.E003", "it must be a dict"),
        ({"DATABASES": {"replica": {"MARGIN": 1}}}, "dbkeepalive.E004", "'replica'"),
    ],
)
def test_invalid_dbkeepalive_is_an_error_with_its_own_id(value, check_id, fragment):
    with override_settings(DBKEEPALIVE=value):
        found = ours()
        with pytest.raises(ImproperlyConfigured) as caught:
            conf.validate()
    assert ids(found) == [check_id]
    assert fragment in found[0].msg + found[0].hint
    assert found[0].hint
    # The startup error names the same problem and its check ID.
    assert f"({check_id})" in str(caught.value)
    assert found[0].msg in str(caught.value)


def test_several_problems_are_reported_each_under_its_id():
    value = {"MARGIN": -1, "FOO": 1, "DATABASES": {"nope": {"MARGIN": 1}}}
    with override_settings(DBKEEPALIVE=value):
        assert ids(ours()) == ["dbkeepalive.E002", "dbkeepalive.E003", "dbkeepalive.E004"]


def test_manage_py_check_fails_on_an_invalid_setting_with_the_id():
    with (
        override_settings(DBKEEPALIVE={"MARGIN": "five"}),
        pytest.raises(SystemCheckError) as caught,
    ):
        call_command("check", stdout=io.StringIO(), stderr=io.StringIO())
    assert "dbkeepalive.E003" in str(caught.value)
    assert "DBKEEPALIVE[MARGIN] is 'five'" in str(caught.value)


# ------------------------------------------------------------------------ server


def test_server_checks_do_nothing_without_databases():
    with down_alias():
        # Plain `manage.py check` (databases=None) never connects: no W005.
        assert checks.check_servers(databases=None) == []
        assert ours() == []


def test_conn_max_age_none_warns_with_the_server_numbers(
    default_settings, monkeypatch, set_wait_timeout
):
    set_wait_timeout(300)
    monkeypatch.setitem(default_settings, "CONN_MAX_AGE", None)
    assert ours() == []  # static checks don't see the server
    found = ours(["default"])
    assert ids(found) == ["dbkeepalive.W001"]
    assert "'default'" in found[0].msg
    assert "CONN_MAX_AGE is None" in found[0].msg
    assert "300 s" in found[0].msg
    assert "below 300 s (e.g. 295" in found[0].hint


@pytest.mark.parametrize("max_age, warns", [(600, True), (300, True), (299, False), (0, False)])
def test_conn_max_age_must_be_below_wait_timeout(
    default_settings, monkeypatch, set_wait_timeout, max_age, warns
):
    set_wait_timeout(300)
    monkeypatch.setitem(default_settings, "CONN_MAX_AGE", max_age)
    found = ours(["default"])
    assert ids(found) == (["dbkeepalive.W001"] if warns else [])
    if warns:
        assert f"CONN_MAX_AGE is {max_age} s" in found[0].msg


def test_the_session_wait_timeout_is_the_effective_one(default_settings, monkeypatch):
    # init_command lowers it for Django's connections only: the check must see that.
    options = {**default_settings["OPTIONS"], "init_command": "SET SESSION wait_timeout = 40"}
    monkeypatch.setitem(default_settings, "OPTIONS", options)
    monkeypatch.setitem(default_settings, "CONN_MAX_AGE", 60)
    close_connections()
    try:
        found = ours(["default"])
    finally:
        close_connections()
    assert ids(found) == ["dbkeepalive.W001"]
    assert "wait_timeout of 40 s (session wait_timeout 40 s; GLOBAL wait_timeout" in found[0].msg


def test_margin_not_below_wait_timeout_warns(set_wait_timeout):
    set_wait_timeout(8)
    with override_settings(DBKEEPALIVE={"MARGIN": 10}):
        found = ours(["default"])
    assert ids(found) == ["dbkeepalive.W002"]
    assert "MARGIN (10 s) is not below the wait_timeout (8 s)" in found[0].msg
    assert "idle limit 4 s" in found[0].msg
    assert "DBKEEPALIVE['MARGIN']" in found[0].hint
    with override_settings(DBKEEPALIVE={"MARGIN": 7}):
        assert ours(["default"]) == []


def test_margin_is_compared_with_a_configured_wait_timeout():
    value = {"DATABASES": {"default": {"WAIT_TIMEOUT": 4, "MARGIN": 5}}}
    with override_settings(DBKEEPALIVE=value):
        found = ours(["default"])
    assert ids(found) == ["dbkeepalive.W002"]
    assert "DBKEEPALIVE WAIT_TIMEOUT (4 s)" in found[0].msg
    assert "DBKEEPALIVE['DATABASES']['default']['MARGIN']" in found[0].hint


def test_configured_wait_timeout_above_the_servers_warns(set_wait_timeout):
    set_wait_timeout(300)
    with override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 600}):
        found = ours(["default"])
    assert ids(found) == ["dbkeepalive.W003"]
    assert "DBKEEPALIVE['WAIT_TIMEOUT'] is 600 s" in found[0].msg
    assert "after 300 s" in found[0].msg
    assert "300 s or less" in found[0].hint
    with override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 300}):
        assert ours(["default"]) == []


def test_small_max_allowed_packet_warns_and_says_why(packet_size):
    packet_size(1024 * 1024)
    found = ours(["default"])
    assert ids(found) == ["dbkeepalive.W004"]
    assert "max_allowed_packet is 1 MiB (1048576 bytes), below 16 MiB" in found[0].msg
    assert "close the connection" in found[0].msg
    assert "max_allowed_packet" in found[0].hint
    packet_size(16 * 1024 * 1024)
    assert ours(["default"]) == []


def test_unreachable_server_gives_one_clear_warning_and_no_password(server):
    with down_alias(PASSWORD=server.password) as alias:
        port = connections[alias].settings_dict["PORT"]
        found = ours([alias])
        assert connections[alias].connection is None
    assert ids(found) == ["dbkeepalive.W005"]
    message = found[0].msg
    assert f"Database 'down': could not connect to the server at 127.0.0.1:{port}" in message
    assert "OperationalError" in message
    assert "2002" in message or "2003" in message
    assert "Traceback" not in message
    assert server.password not in text_of(found)


def test_wrong_password_is_reported_without_it(server):
    wrong = "wrong-" + server.password
    with extra_alias("badpass", PASSWORD=wrong) as alias:
        found = ours([alias])
    assert ids(found) == ["dbkeepalive.W005"]
    assert "1045" in found[0].msg
    assert wrong not in text_of(found)
    assert server.password not in text_of(found)


def test_only_the_aliases_asked_for_are_visited():
    with down_alias() as alias:
        assert ours(["default"]) == []
        assert ids(ours([alias])) == ["dbkeepalive.W005"]
        assert ids(ours(["default", alias, "not-configured"])) == ["dbkeepalive.W005"]


def test_manage_py_check_database_shows_the_warnings_and_does_not_fail(
    default_settings, monkeypatch, server
):
    monkeypatch.setitem(default_settings, "CONN_MAX_AGE", None)
    out, err = io.StringIO(), io.StringIO()
    call_command("check", "--database", "default", stdout=out, stderr=err)
    assert "(dbkeepalive.W001)" in err.getvalue()
    # Django's own MySQL check (sql_mode) raises on an unreachable server, so the
    # unreachable alias is checked with our tag only.
    with down_alias(PASSWORD=server.password) as alias:
        out, err = io.StringIO(), io.StringIO()
        call_command("check", "--database", alias, "--tag", TAG, stdout=out, stderr=err)
    text = out.getvalue() + err.getvalue()
    assert "(dbkeepalive.W005)" in text
    assert "Traceback" not in text
    assert server.password not in text


def test_split_aliases_filters_by_vendor():
    with other_vendor_alias() as other, down_alias() as down:
        assert checks.split_aliases() == (["default", "reader", down], [other])
        assert checks.split_aliases([other, "default", "nope"]) == (["default"], [other])


# --------------------------------------------------------- the guard's view


def test_check_reuses_an_open_connection_and_closes_only_one_it_opened(server):
    close_connections()
    assert ours(["default"]) == []
    assert connection.connection is None  # opened for the check, closed again
    connection.ensure_connection()
    before = connection.connection
    assert ours(["default"]) == []
    assert connection.connection is before  # left open


def kill_default_connection(server) -> int:
    connection.ensure_connection()
    with connection.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        (thread_id,) = cursor.fetchone()
    server.kill(thread_id)
    return int(thread_id)


def current_thread_id() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        return int(cursor.fetchone()[0])


def test_check_on_a_killed_connection_goes_through_the_guard(server):
    killed = kill_default_connection(server)
    time.sleep(0.3)  # past PEEK_AFTER: the guard sees the closed socket and reconnects
    assert ours(["default"]) == []
    assert connection.connection is not None
    assert current_thread_id() != killed


def test_check_right_after_a_kill_is_not_an_unreachable_server(server):
    # Within PEEK_AFTER of the last statement the guard does not look at the socket;
    # the query fails with 2013 and reads session variables, which the guard rightly
    # does not re-run. The check replaces the stale connection once itself.
    killed = kill_default_connection(server)
    assert ours(["default"]) == []
    assert current_thread_id() != killed


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "remove, missing",
    [
        (("read_timeout",), "read_timeout"),
        (("connect_timeout",), "connect_timeout"),
        (("connect_timeout", "read_timeout"), "connect_timeout or read_timeout"),
        (("write_timeout",), None),
    ],
)
def test_missing_client_timeouts_warn(default_settings, monkeypatch, driver, remove, missing):
    options = {k: v for k, v in default_settings["OPTIONS"].items() if k not in remove}
    monkeypatch.setitem(default_settings, "OPTIONS", options)
    found = ours()
    if driver == "pymysql" and missing is not None:
        # PyMySQL's connect_timeout defaults to 10 s: only read_timeout matters.
        missing = "read_timeout" if "read_timeout" in remove else None
    if missing is None:
        assert found == []
        return
    assert ids(found) == ["dbkeepalive.W006"]
    assert f"Database 'default' has no {missing} in OPTIONS" in found[0].msg
    if "read_timeout" in missing:
        assert "15 minutes" in found[0].msg
    assert "DATABASES['default']['OPTIONS']" in found[0].hint


def test_client_timeouts_setting_satisfies_the_timeout_check(default_settings, monkeypatch):
    options = {
        k: v
        for k, v in default_settings["OPTIONS"].items()
        if k not in ("connect_timeout", "read_timeout")
    }
    monkeypatch.setitem(default_settings, "OPTIONS", options)
    assert ids(ours()) == ["dbkeepalive.W006"]
    with override_settings(DBKEEPALIVE={"CLIENT_TIMEOUTS": True}):
        assert ours() == []


def test_middleware_without_the_app_warns():
    from django.conf import settings

    apps_without = [a for a in settings.INSTALLED_APPS if a != "django_dbkeepalive"]
    middleware = [*settings.MIDDLEWARE, MIDDLEWARE_PATH]
    with override_settings(INSTALLED_APPS=apps_without, MIDDLEWARE=middleware):
        found = ours()
    assert ids(found) == ["dbkeepalive.W007"]
    assert "'django_dbkeepalive' is not in INSTALLED_APPS" in found[0].msg
    assert found[0].hint == "Add 'django_dbkeepalive' to INSTALLED_APPS."
    with override_settings(MIDDLEWARE=middleware):
        assert ours() == []


def test_auto_guard_off_without_middleware_warns():
    from django.conf import settings

    with override_settings(DBKEEPALIVE={"AUTO_GUARD": False}):
        found = ours()
    assert ids(found) == ["dbkeepalive.W008", "dbkeepalive.W008"]  # default and reader
    assert "DBKEEPALIVE['AUTO_GUARD'] is False for database 'default'" in found[0].msg
    assert "DBKEEPALIVE['AUTO_GUARD'] is False for database 'reader'" in found[1].msg
    value = {"DATABASES": {"default": {"AUTO_GUARD": False}}}
    with override_settings(DBKEEPALIVE=value):
        found = ours()
    assert ids(found) == ["dbkeepalive.W008"]
    assert "DBKEEPALIVE['DATABASES']['default']['AUTO_GUARD']" in found[0].msg
    middleware = [*settings.MIDDLEWARE, MIDDLEWARE_PATH]
    with override_settings(DBKEEPALIVE=value, MIDDLEWARE=middleware):
        assert ours() == []


def test_non_mysql_alias_gets_an_info_saying_what_is_covered():
    with other_vendor_alias() as alias:
        found = ours()
    assert ids(found) == ["dbkeepalive.I001"]
    assert found[0].level < 30  # Info: `manage.py check` does not count it as an issue
    assert f"Database {alias!r} uses OtherSQL" in found[0].msg
    assert "CONN_MAX_AGE is closed before its next statement" in found[0].msg
    assert "CONN_HEALTH_CHECKS" in found[0].hint


def test_sqlite_alias_has_nothing_to_protect():
    sqlite = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:", "OPTIONS": {}}
    with extra_alias("local", **sqlite):
        assert ours() == []
        assert ours(["local"]) == []


def test_no_message_ever_contains_the_password(default_settings, monkeypatch, server, driver):
    # Everything at once: bad settings, missing timeouts, an unreachable alias and one
    # whose password is in OPTIONS.
    monkeypatch.setitem(default_settings, "CONN_MAX_AGE", None)
    monkeypatch.setitem(default_settings, "OPTIONS", {"charset": "utf8mb4"})
    value = {"MARGIN": "x", "WAIT_TIMEOUT": 10**6}
    options = {"password": server.password, "connect_timeout": 2}
    with (
        override_settings(DBKEEPALIVE=value),
        down_alias(PASSWORD=server.password) as down,
        extra_alias("optpass", PASSWORD="", OPTIONS=options) as optpass,
    ):
        found = ours(["default", down, optpass])
    assert "dbkeepalive.W005" in ids(found)
    assert "dbkeepalive.E003" in ids(found)
    assert server.password not in text_of(found)
