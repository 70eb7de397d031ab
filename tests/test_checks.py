"""System checks against the real server: every ID fires when it should and only then."""

from __future__ import annotations

import contextlib
import copy
import io
import re
import socket
import sys
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import django
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

from .conftest import close_connections, extra_alias, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "django_dbkeepalive"
ID_PATTERN = re.compile(r"dbkeepalive\.[EWI]\d{3}")
# Django 6.1 passes every alias to the checks it runs (not only the database-tagged
# ones): its model checks then load each alias's backend and may connect.
DJANGO_MODEL_CHECKS_CONNECT = django.VERSION >= (6, 1)


# --------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port nothing listens on (bound and released again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def down_alias(alias: str = "down", **changes: Any) -> Iterator[str]:
    """An alias pointing at a closed port on this machine."""
    options = {"connect_timeout": 2, "read_timeout": 5, "write_timeout": 5}
    with extra_alias(alias, HOST="127.0.0.1", PORT=free_port(), OPTIONS=options, **changes):
        yield alias


@contextlib.contextmanager
def other_vendor_alias(alias: str = "other") -> Iterator[str]:
    """An alias on a non-MySQL backend with a server (vendor ``othersql``).

    The check looks at the backend's ``vendor`` only, so a SQLite-based backend that
    calls itself something else stands for any backend the guard has no rules for
    (PostgreSQL has its own, I002: tests/test_postgres.py). Nothing connects to it.
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


@dataclass
class SilentServer:
    """A TCP server that accepts connections and never sends a byte (a hung server, or
    a proxy whose server is gone)."""

    port: int
    accepted: list[socket.socket] = field(default_factory=list)


@contextlib.contextmanager
def silent_server() -> Iterator[SilentServer]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)
    silent = SilentServer(int(listener.getsockname()[1]))
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            silent.accepted.append(conn)

    thread = threading.Thread(target=accept, name="silent-server", daemon=True)
    thread.start()
    try:
        yield silent
    finally:
        stop.set()
        thread.join()
        for conn in silent.accepted:
            conn.close()
        listener.close()


def bounded(call: Any, seconds: float) -> Any:
    """``call()``, run in a thread: fails (instead of hanging the test run) when it
    takes longer than ``seconds``."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="bounded", daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    if errors:
        raise errors[0]
    assert time.monotonic() - started < seconds
    return result[0]


#: A backend like Django's MySQL one in an environment without its driver: importing
#: its ``base`` module raises what ``django.db.backends.mysql.base`` raises there.
NO_DRIVER_BASE = """
from django.core.exceptions import ImproperlyConfigured

try:
    import dbk_mysqldb_not_installed as Database  # noqa: F401
except ImportError as err:
    raise ImproperlyConfigured(
        "Error loading MySQLdb module.\\nDid you install mysqlclient?"
    ) from err
"""


@contextlib.contextmanager
def no_driver_alias(tmp_path: Path, alias: str = "nodriver") -> Iterator[str]:
    """An alias whose ENGINE (``dbk_nodriver.mysql``) fails to load for want of a driver."""
    backend = tmp_path / "dbk_nodriver" / "mysql"
    backend.mkdir(parents=True)
    (tmp_path / "dbk_nodriver" / "__init__.py").write_text("")
    (backend / "__init__.py").write_text("")
    (backend / "base.py").write_text(NO_DRIVER_BASE)
    sys.path.insert(0, str(tmp_path))
    new = copy.deepcopy(connections["default"].settings_dict)
    new["ENGINE"] = "dbk_nodriver.mysql"
    connections.settings[alias] = new
    try:
        yield alias
    finally:
        del connections.settings[alias]
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("dbk_nodriver")]:
            del sys.modules[name]


def ids(messages: list[Any]) -> list[str]:
    return sorted(m.id for m in messages)


def ours(databases: list[str] | None = None) -> list[Any]:
    """Every message of this app's checks, as ``manage.py check`` gives them (with
    ``databases``: as ``check --database``). Not ``run_checks(tags=[TAG])``: since Django
    6.1, a tag filter runs the database-tagged checks too, on every alias."""
    if databases is not None:
        return run_checks(tags=[TAG], databases=databases)
    from django.core.checks import registry

    found: list[Any] = []
    for check in registry.registry.get_checks():
        if TAG in check.tags and "database" not in check.tags:
            found += check(app_configs=None, databases=None)
    return found


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


def test_the_docs_summary_table_has_one_row_per_registered_id():
    docs = (ROOT / "docs" / "checks.md").read_text()
    rows = re.findall(r"^\| \[`([EWI]\d{3})`\]", docs, re.MULTILINE)
    assert rows, "docs/checks.md has no summary table rows"
    assert rows == [i.removeprefix("dbkeepalive.") for i in CHECK_IDS]


def test_every_id_the_code_emits_is_registered_and_every_registered_id_is_emitted():
    # The IDs as the emitting modules write them, never the registry, which lists them.
    emitters = [p for p in (PACKAGE / "checks").glob("*.py") if p.name != "registry.py"]
    emitted = {
        *ID_PATTERN.findall("".join(p.read_text() for p in emitters)),
        *(problem_id for problem_id in _conf_problem_ids()),
    }
    registry = (PACKAGE / "checks" / "registry.py").read_text()
    assert "dbkeepalive.E001" in registry  # the registry writes its IDs out
    assert emitted == set(CHECK_IDS)


def _conf_problem_ids() -> set[str]:
    """The IDs ``conf.find_problems()`` gives its problems, by making each happen."""
    from django_dbkeepalive import conf as conf_module

    values: list[object] = [
        ["MARGIN"],
        {"MARGN": 1},
        {"MARGIN": -1},
        {"DATABASES": {"nope": {}}},
    ]
    return {p.id for v in values for p in conf_module.find_problems(v, ["default"])}


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
        ({"MARGIN": -1}, "dbkeepalive.E003", "DBKEEPALIVE['MARGIN'] is -1"),
        ({"MARGIN": float("inf")}, "dbkeepalive.E003", "DBKEEPALIVE['MARGIN'] is inf"),
        ({"TCP_KEEPALIVE": 40000}, "dbkeepalive.E003", "from 1 to 32767"),
        (
            {"DATABASES": {"default": {"PING_AFTER": -1}}},
            "dbkeepalive.E003",
            "DBKEEPALIVE['DATABASES']['default']['PING_AFTER'] is -1",
        ),
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


# Django 6.1's own model checks (`manage.py check`) connect to every alias.
@pytest.mark.django_db(transaction=True, databases=["default", "reader"])
def test_manage_py_check_fails_on_an_invalid_setting_with_the_id():
    with (
        override_settings(DBKEEPALIVE={"MARGIN": "five"}),
        pytest.raises(SystemCheckError) as caught,
    ):
        call_command("check", stdout=io.StringIO(), stderr=io.StringIO())
    assert "dbkeepalive.E003" in str(caught.value)
    assert "DBKEEPALIVE['MARGIN'] is 'five'" in str(caught.value)


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
    assert found[0].hint.startswith("Set DATABASES['default']['CONN_MAX_AGE'] below 40 s (e.g. 35")
    assert "DATABASES['default']['OPTIONS']['init_command']" in found[0].hint
    assert "on the server" not in found[0].hint


def test_margin_not_below_wait_timeout_warns(set_wait_timeout):
    set_wait_timeout(8)
    with override_settings(DBKEEPALIVE={"MARGIN": 10}):
        found = ours(["default"])
    assert ids(found) == ["dbkeepalive.W002"]
    assert (
        "DBKEEPALIVE['MARGIN'] (10 s) is not below the server's wait_timeout (8 s)" in found[0].msg
    )
    assert "idle limit 4 s = 8 s - min(margin 10 s, half)" in found[0].msg
    assert found[0].hint == (
        "Lower DBKEEPALIVE['MARGIN'] below 8 s (e.g. 2 s), or raise wait_timeout on the server."
    )
    with override_settings(DBKEEPALIVE={"MARGIN": 7}):
        assert ours(["default"]) == []


def test_margin_is_compared_with_a_configured_wait_timeout():
    value = {"DATABASES": {"default": {"WAIT_TIMEOUT": 4, "MARGIN": 5}}}
    with override_settings(DBKEEPALIVE=value):
        found = ours(["default"])
    assert ids(found) == ["dbkeepalive.W002"]
    assert "not below the DBKEEPALIVE['DATABASES']['default']['WAIT_TIMEOUT'] (4 s)" in (
        found[0].msg
    )
    hint = found[0].hint
    assert hint.startswith("Lower DBKEEPALIVE['DATABASES']['default']['MARGIN'] below 4 s")
    # The timeout is the setting: raising the server's wait_timeout would change nothing.
    assert "on the server" not in hint
    assert "raise DBKEEPALIVE['DATABASES']['default']['WAIT_TIMEOUT'] up to" in hint


def test_configured_wait_timeout_above_the_servers_warns(set_wait_timeout):
    set_wait_timeout(300)
    with override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 600}):
        found = ours(["default"])
    assert ids(found) == ["dbkeepalive.W003"]
    assert "DBKEEPALIVE['WAIT_TIMEOUT'] is 600 s" in found[0].msg
    assert "after 300 s" in found[0].msg
    assert "its idle limit is 595 s = 600 s - margin 5 s, not below the server's 300 s" in (
        found[0].msg
    )
    assert "300 s or less" in found[0].hint
    with override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 300}):
        assert ours(["default"]) == []


def test_configured_wait_timeout_above_the_servers_is_fine_while_its_limit_is_below(
    set_wait_timeout,
):
    # The guard replaces connections idle over 40 - 15 = 25 s: before the server's 30 s.
    set_wait_timeout(30)
    with override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 40, "MARGIN": 15}):
        assert ours(["default"]) == []
    # 60 - min(60, half) = 30 s: not below the server's 30 s.
    value = {"DATABASES": {"default": {"WAIT_TIMEOUT": 60, "MARGIN": 60}}}
    with override_settings(DBKEEPALIVE=value):
        found = by_id(ours(["default"]), "dbkeepalive.W003")
    assert len(found) == 1
    assert "its idle limit is 30 s = 60 s - min(margin 60 s, half)" in found[0].msg
    assert "connections idle up to 30 s that the server closes after 30 s" in found[0].msg


def test_small_max_allowed_packet_warns_and_says_why(packet_size):
    packet_size(1024 * 1024)
    found = ours(["default"])
    assert ids(found) == ["dbkeepalive.W004"]
    assert "max_allowed_packet is 1 MiB (1048576 bytes), below 16 MiB" in found[0].msg
    assert "close the connection" in found[0].msg
    assert "max_allowed_packet" in found[0].hint
    packet_size(16 * 1024 * 1024)
    assert ours(["default"]) == []


def test_a_max_allowed_packet_in_kib_is_shown_in_kib(packet_size):
    packet_size(1025 * 1024)  # the server keeps it a multiple of 1024
    [found] = ours(["default"])
    assert found.id == "dbkeepalive.W004"
    assert "max_allowed_packet is 1025 KiB (1049600 bytes), below 16 MiB" in found.msg


def test_an_unreachable_unix_socket_is_named_in_the_warning(server, tmp_path):
    path = str(tmp_path / "mysqld.sock")  # nothing listens there
    options = {"unix_socket": path, "connect_timeout": 2, "read_timeout": 5}
    with (
        override_settings(DBKEEPALIVE={"RETRY_CONNECT_FOR": 0}),
        extra_alias("down", HOST="localhost", PORT="", OPTIONS=options) as alias,
    ):
        found = ours([alias])
    assert ids(found) == ["dbkeepalive.W005"]
    assert f"Database 'down': could not connect to the server at unix socket {path} " in (
        found[0].msg
    )


def test_unreachable_server_gives_one_clear_warning_and_no_password(server):
    with down_alias(PASSWORD=server.password) as alias:
        port = connections[alias].settings_dict["PORT"]
        started = time.monotonic()
        found = ours([alias])
        # An answer now: the check's connection does not wait out RETRY_CONNECT_FOR (5 s).
        assert time.monotonic() - started < 2.0
        assert connections[alias].connection is None
    assert ids(found) == ["dbkeepalive.W005"]
    message = found[0].msg
    assert f"Database 'down': could not connect to the server at 127.0.0.1:{port}" in message
    assert "OperationalError" in message
    assert "2002" in message or "2003" in message
    assert "Traceback" not in message
    assert server.password not in text_of(found)


def test_wrong_password_is_an_error_naming_user_and_password_not_an_unreachable_server(server):
    wrong = "wrong-" + server.password
    with extra_alias("badpass", PASSWORD=wrong) as alias:
        found = ours([alias])
    assert ids(found) == ["dbkeepalive.E006"]
    assert "the server at 127.0.0.1:" in found[0].msg
    assert "refused the login" in found[0].msg
    assert "1045" in found[0].msg
    assert f"DATABASES['badpass']['USER'] ({server.user!r})" in found[0].hint
    assert "DATABASES['badpass']['PASSWORD']" in found[0].hint
    assert wrong not in text_of(found)
    assert server.password not in text_of(found)


def _django_forbids_new_wrappers_of_undeclared_aliases() -> bool:
    # Django 4.2.1+ (and 5.x, 6.x) also patch BaseDatabaseWrapper.ensure_connection, so the
    # check's own wrapper of "reader" is refused; Django 4.2.0 patched only the alias's
    # own wrapper instance.
    from django.test import TransactionTestCase

    return hasattr(TransactionTestCase, "ensure_connection_patch_method")


def test_an_alias_the_test_did_not_declare_is_not_checked_and_not_an_error():
    # This test declares only "default": Django's test case forbids connecting to
    # "reader" (DatabaseOperationForbidden). That says nothing about the server.
    found = ours(["reader"])
    if not _django_forbids_new_wrappers_of_undeclared_aliases():
        # Django 4.2.0: the check's connection is allowed and really reads the server.
        from django_dbkeepalive.diagnose import diagnose

        assert found == []
        [db] = diagnose(["reader"]).as_dict()["databases"]
        assert db["server"]["version"], db
        assert db["verdict"] == "ok"
        return
    assert ids(found) == ["dbkeepalive.I003"]
    assert found[0].msg.startswith("Database 'reader': its server at 127.0.0.1:")
    assert "DatabaseOperationForbidden" in found[0].msg
    assert "declare the alias" in found[0].hint
    from django_dbkeepalive.diagnose import diagnose

    [db] = diagnose(["reader"]).as_dict()["databases"]
    assert db["server"]["error_kind"] == "not_checked"
    assert db["verdict"] == "ok"


def test_a_test_without_database_access_is_not_checked_and_not_an_error(django_db_blocker):
    # pytest-django's blocker (a test without the django_db mark) raises a RuntimeError:
    # the context's refusal, not a problem with the server or the settings.
    with django_db_blocker.block():
        found = ours(["default"])
    assert ids(found) == ["dbkeepalive.I003"]
    assert "Database access not allowed" in found[0].msg
    assert "E006" not in text_of(found)


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


# ------------------------------------------------- the checks' own connection


def test_check_never_touches_this_threads_connection(server):
    close_connections()
    assert ours(["default"]) == []
    assert connection.connection is None  # nothing opened on the thread's wrapper
    connection.ensure_connection()
    before = connection.connection
    thread_id = current_thread_id()
    assert ours(["default"]) == []
    assert connection.connection is before  # left open, and still the same session
    assert current_thread_id() == thread_id


def kill_default_connection(server) -> int:
    connection.ensure_connection()
    thread_id = current_thread_id()
    server.kill(thread_id)
    return thread_id


def current_thread_id() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        return int(cursor.fetchone()[0])


def test_check_right_after_a_kill_is_not_an_unreachable_server(server):
    # The thread's connection is dead, but the check does not use it: it makes one of
    # its own, and only one.
    kill_default_connection(server)
    before = server.connections_total()
    assert ours(["default"]) == []
    assert server.connections_total() == before + 1


def test_the_checks_connection_is_closed_again(server):
    before = len(server.processlist(user=server.user))
    assert ours(["default"]) == []
    assert wait_for(lambda: len(server.processlist(user=server.user)) <= before)


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


# ------------------------------------------------------------------ passwords


@pytest.mark.parametrize(
    "password, text, expected",
    [
        # Long: masked as a whole token, not inside a longer word.
        ("s3cret-Pw", "using s3cret-Pw or 's3cret-Pw'", "using ******** or '********'"),
        ("hunter22", "user:hunter22@db, xhunter22y", "user:********@db, xhunter22y"),
        # Short: only where it stands as a value.
        ("a", "OperationalError (using password: YES) 'a' \"a\"", None),
        ("1", "(1045, 'Access denied for user'@'127.0.0.1')", None),
        ("1", "mysql://app:1@db/app, password=1 x=12 '1'", "mysql://app:********@db/app, "),
    ],
)
def test_passwords_are_masked_only_where_they_stand_as_a_value(password, text, expected):
    masked = checks.mask_secrets(text, {"PASSWORD": password})
    if password == "a":
        assert masked == "OperationalError (using password: YES) '********' \"********\""
    elif expected is None:
        assert masked == text  # nothing in it is the password
    elif password == "1":
        assert masked == "mysql://app:********@db/app, password=******** x=12 '********'"
    else:
        assert masked == expected


@pytest.mark.parametrize("password", ["a", "1", "YES"])
def test_a_short_wrong_password_leaves_the_error_readable(server, password):
    with extra_alias("short", PASSWORD=password) as alias:
        [found] = by_id(ours([alias]), "dbkeepalive.E006")
    # Nothing garbled ("Oper********tion"), no digit of the host masked.
    assert "OperationalError: (1045, " in found.msg
    assert "127.0.0.1" in found.msg
    assert "using password: YES" in found.msg
    assert "********" not in found.msg


def test_every_password_option_is_masked_whatever_its_case(server):
    secret = "Passwd-Upper-Case"
    options = {"connect_timeout": 2, "read_timeout": 5, "PASSWD": secret}
    with extra_alias("upper", OPTIONS=options) as alias:
        found = ours([alias])
        text = checks.mask_secrets(f"{secret} and {secret!r}", connections.settings[alias])
    assert text == "******** and '********'"
    assert secret not in text_of(found)


# ------------------------------------------------------ bounded connections


def test_diagnostic_settings_cap_timeouts_and_keep_smaller_ones():
    options = {"connect_timeout": 2, "read_timeout": 600, "write_timeout": 0, "charset": "x"}
    original = {"NAME": "app", "OPTIONS": options}
    bounded = checks.diagnostic_settings(original, cap=10)
    assert bounded["OPTIONS"] == {
        "connect_timeout": 2,  # the user's smaller value
        "read_timeout": 10,
        "write_timeout": 10,  # 0 is no timeout
        "charset": "x",
    }
    assert bounded["NAME"] == "app"
    assert original == {"NAME": "app", "OPTIONS": options}  # nothing changed
    assert options["read_timeout"] == 600
    # A float stays a float (mysqlclient rejects it as it would in production); what is
    # not a number is left for the driver to reject; None and negatives are capped.
    odd = {"OPTIONS": {"connect_timeout": 20.5, "read_timeout": "5", "write_timeout": None}}
    assert checks.diagnostic_settings(odd, cap=10)["OPTIONS"] == {
        "connect_timeout": 10.0,
        "read_timeout": "5",
        "write_timeout": 10,
    }
    # CLIENT_TIMEOUTS' smaller values count, except where an option file is read.
    extra = {"connect_timeout": 3, "read_timeout": 4}
    assert checks.diagnostic_settings({"OPTIONS": {}}, extra, cap=10)["OPTIONS"] == {
        "connect_timeout": 3,
        "read_timeout": 4,
        "write_timeout": 10,
    }
    with_file = {"OPTIONS": {"read_default_file": "/etc/my.cnf"}}
    assert checks.diagnostic_settings(with_file, extra, cap=10)["OPTIONS"] == {
        "read_default_file": "/etc/my.cnf",
        "connect_timeout": 10,
        "read_timeout": 10,
        "write_timeout": 10,
    }


def test_a_server_that_accepts_but_never_answers_cannot_hang_the_check(monkeypatch, driver):
    # No read_timeout: PyMySQL would wait for the server's greeting forever, and
    # mysqlclient for connect_timeout (here 30 s).
    monkeypatch.setattr(checks.connection, "DIAGNOSTIC_TIMEOUT", 1)
    options = {"connect_timeout": 30}
    with (
        silent_server() as silent,
        extra_alias("hung", HOST="127.0.0.1", PORT=silent.port, OPTIONS=options) as alias,
    ):
        settings_dict = connections.settings[alias]
        found = bounded(lambda: ours([alias]), seconds=6)
        # The alias's settings (shared with django.db.connections) are unchanged.
        assert settings_dict["OPTIONS"] is options
        assert options == {"connect_timeout": 30}
    assert silent.accepted, "the server accepted the connection"
    [warning] = by_id(found, "dbkeepalive.W005")
    assert f"could not connect to the server at 127.0.0.1:{silent.port}" in warning.msg
    assert "(2013, " in warning.msg
    assert "accepted, then lost or not answered in time during the login" in warning.msg


# ---------------------------------------------- errors that are not the network


GOOD_OPTIONS = {"connect_timeout": 5, "read_timeout": 30, "write_timeout": 30}


@pytest.mark.parametrize(
    "changes, message, hint",
    [
        (
            {"CONN_MAX_AGE": "60"},
            "fails because of the alias's settings, not the network (TypeError: ",
            "DATABASES['bad']['CONN_MAX_AGE'] is '60' (a str): it must be a number",
        ),
        (
            {"OPTIONS": {**GOOD_OPTIONS, "init_command": "SET SESSION wait_timeout = nope"}},
            "rejected a statement run while connecting (OperationalError: (1232, ",
            "Fix DATABASES['bad']['OPTIONS']['init_command'] ('SET SESSION wait_timeout = nope').",
        ),
        (
            {"NAME": "no_such_database"},
            "has no database 'no_such_database' (OperationalError: (1049, ",
            "Check DATABASES['bad']['NAME'] ('no_such_database')",
        ),
        (
            {"OPTIONS": {**GOOD_OPTIONS, "PASSWD": "opt-secret-1"}},
            "fails because of the alias's settings, not the network (TypeError: ",
            "DATABASES['bad']['OPTIONS'] has 'PASSWD', which ",
        ),
    ],
)
def test_connection_errors_that_are_not_the_network_name_the_setting_to_fix(
    server, changes, message, hint
):
    with extra_alias("bad", **changes) as alias:
        found = ours([alias])
        out, err = io.StringIO(), io.StringIO()
        with pytest.raises(SystemCheckError) as caught:
            call_command("check", "--database", alias, "--tag", TAG, stdout=out, stderr=err)
    [error] = by_id(found, "dbkeepalive.E006")
    assert "dbkeepalive.W005" not in ids(found)
    assert error.msg.startswith("Database 'bad': ")
    assert message in error.msg
    assert hint in error.hint
    assert "opt-secret-1" not in text_of(found)
    # `manage.py check --database` fails on it, with the message and no traceback.
    assert "(dbkeepalive.E006)" in str(caught.value)
    assert "Traceback" not in str(caught.value) + out.getvalue() + err.getvalue()


def test_fractional_timeouts_are_a_settings_error_with_mysqlclient_only(server, driver):
    options = {**GOOD_OPTIONS, "connect_timeout": 2.5}
    with extra_alias("fraction", OPTIONS=options) as alias:
        found = ours([alias])
    if driver == "pymysql":
        assert found == []  # PyMySQL takes seconds as floats
        return
    [error] = by_id(found, "dbkeepalive.E006")
    assert "TypeError" in error.msg
    assert "mysqlclient takes whole seconds only: connect_timeout is 2.5" in error.hint


def test_conn_max_age_infinite_is_reused_without_limit_not_unreachable(
    default_settings, monkeypatch
):
    monkeypatch.setitem(default_settings, "CONN_MAX_AGE", float("inf"))
    [warning] = ours(["default"])
    assert warning.id == "dbkeepalive.W001"
    assert "CONN_MAX_AGE is inf (connections are reused without limit)" in warning.msg


# ------------------------------------------------------ no backend, no driver


# Django 6.1's own model checks (`manage.py check`) connect to every alias.
@pytest.mark.django_db(transaction=True, databases=["default", "reader"])
def test_an_alias_whose_backend_cannot_be_loaded_gets_one_clear_error(tmp_path):
    with no_driver_alias(tmp_path) as alias:
        found = ours()
        with_server = ours([alias, "default"])
        assert checks.split_aliases() == (["default", "reader"], [])
        out, err = io.StringIO(), io.StringIO()
        expected = ImproperlyConfigured if DJANGO_MODEL_CHECKS_CONNECT else SystemCheckError
        with pytest.raises(expected) as caught:
            call_command("check", stdout=out, stderr=err)
    assert ids(found) == ids(with_server) == ["dbkeepalive.E005"]
    if DJANGO_MODEL_CHECKS_CONNECT:
        # Django's own model checks load every alias's backend first and stop there,
        # before any app's check can report it (Django's behaviour, not ours).
        assert "Error loading MySQLdb module" in str(caught.value)
        return
    error = found[0]
    assert error.msg == (
        "Database 'nodriver': its database backend 'dbk_nodriver.mysql' cannot be loaded "
        "(ImproperlyConfigured: Error loading MySQLdb module. Did you install mysqlclient?), "
        "so Django cannot connect to it and django-dbkeepalive cannot guard it or check "
        "its server."
    )
    assert "pip install mysqlclient" in error.hint
    assert "DATABASES['nodriver']['ENGINE']" in error.hint
    assert "(dbkeepalive.E005)" in str(caught.value)
    assert "Traceback" not in str(caught.value) + out.getvalue() + err.getvalue()


# -------------------------------------------------------------- timeouts


@pytest.mark.parametrize(
    "options, missing, note",
    [
        (
            {"connect_timeout": None, "read_timeout": 30},
            "connect_timeout",
            "connect_timeout is None there, which sets no timeout",
        ),
        (
            {"connect_timeout": 5, "read_timeout": 0},
            "read_timeout",
            "read_timeout is 0 there, which sets no timeout",
        ),
    ],
)
def test_timeouts_that_are_there_but_set_no_timeout_count_as_missing(
    default_settings, monkeypatch, options, missing, note
):
    monkeypatch.setitem(default_settings, "OPTIONS", {**options, "write_timeout": 30})
    # CLIENT_TIMEOUTS does not help: OPTIONS wins, also with None or 0.
    with override_settings(DBKEEPALIVE={"CLIENT_TIMEOUTS": True}):
        [warning] = ours()
    assert warning.id == "dbkeepalive.W006"
    assert f"Database 'default' has no {missing} in OPTIONS ({note})" in warning.msg


def test_timeout_check_explains_what_bounds_connecting_per_driver(
    default_settings, monkeypatch, driver
):
    monkeypatch.setitem(default_settings, "OPTIONS", {"write_timeout": 30})
    [warning] = ours()
    assert "10 s by default" not in warning.msg
    if driver == "pymysql":
        assert "has no read_timeout in OPTIONS" in warning.msg
        assert "PyMySQL's connect_timeout bounds only the TCP connect" in warning.msg
    else:
        assert "has no connect_timeout or read_timeout in OPTIONS" in warning.msg
        assert "accepts the connection but never answers" in warning.msg


def test_client_timeouts_do_not_count_where_an_option_file_is_read(
    default_settings, monkeypatch, tmp_path
):
    option_file = tmp_path / "my.cnf"
    option_file.write_text("[client]\n")
    monkeypatch.setitem(default_settings, "OPTIONS", {"read_default_file": str(option_file)})
    with override_settings(DBKEEPALIVE={"CLIENT_TIMEOUTS": True}):
        found = ours()
        timeouts = checks.client_timeouts("default")
    assert ids(found) == ["dbkeepalive.W006"]
    assert {t.source for t in timeouts.values()} == {"option_file"}


# ---------------------------------------------------- hints that agree


def test_a_one_second_wait_timeout_gets_hints_that_can_be_followed(default_settings, monkeypatch):
    # The session's wait_timeout comes from init_command: raising the server's would
    # change nothing, and no CONN_MAX_AGE or MARGIN "below 1 s (e.g. 1)" can help.
    init = "SET SESSION wait_timeout = 1"
    monkeypatch.setitem(default_settings, "OPTIONS", {**GOOD_OPTIONS, "init_command": init})
    monkeypatch.setitem(default_settings, "CONN_MAX_AGE", 60)
    found = ours(["default"])
    close_connections()
    assert ids(found) == ["dbkeepalive.W001", "dbkeepalive.W002"]
    w001, w002 = by_id(found, "dbkeepalive.W001")[0], by_id(found, "dbkeepalive.W002")[0]
    assert "(e.g. 1," not in w001.hint
    assert "set DATABASES['default']['CONN_MAX_AGE'] = 0" in w001.hint
    assert (
        "raise the wait_timeout that DATABASES['default']['OPTIONS']['init_command'] "
        "('SET SESSION wait_timeout = 1') sets" in w001.hint
    )
    assert "on the server" not in w001.hint + w002.hint
    assert "idle limit 0.5 s = 1 s - min(margin 5 s, half)" in w002.msg
    assert w002.hint.startswith("Lower DBKEEPALIVE['MARGIN'] below 1 s (e.g. 0.25 s)")


def test_a_session_wait_timeout_from_client_flag_interactive_is_explained(
    default_settings, monkeypatch, server
):
    saved = server.get_global("interactive_timeout")
    server.set_global("interactive_timeout", 40)
    try:
        options = {**GOOD_OPTIONS, "client_flag": 1024}  # CLIENT.INTERACTIVE
        monkeypatch.setitem(default_settings, "OPTIONS", options)
        monkeypatch.setitem(default_settings, "CONN_MAX_AGE", 60)
        [warning] = ours(["default"])
    finally:
        server.set_global("interactive_timeout", saved)
        close_connections()
    assert warning.id == "dbkeepalive.W001"
    assert "wait_timeout of 40 s (session wait_timeout 40 s" in warning.msg
    assert "DATABASES['default']['OPTIONS']['client_flag'], which includes" in warning.hint
