"""The guard without patching: django_dbkeepalive.backends ENGINEs and DBKEEPALIVE["PATCH"];
and patching that never takes another library's patch away."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core import checks as django_checks
from django.db import (
    IntegrityError,
    ProgrammingError,
    connection,
    connections,
    transaction,
)
from django.db.backends.utils import CursorWrapper
from django.test import override_settings

from django_dbkeepalive import guard
from django_dbkeepalive.checks import check_configuration
from django_dbkeepalive.guard import wrappers
from django_dbkeepalive.testing import kill_connection, record_recycles
from testproject.testapp.models import Item

from .conftest import close_connections, extra_alias, json_from

pytestmark = [
    pytest.mark.django_db(transaction=True),
    # They set up the mode they test themselves (a subprocess, an extra alias).
    pytest.mark.skipif(
        os.environ.get("DBK_BACKEND") == "engine", reason="run in the patching sessions"
    ),
]
ROOT = Path(__file__).resolve().parent.parent

# Run with DBK_BACKEND=engine: Django's classes must be Django's own, and the backend
# must recover a KILLed connection by itself. Prints one JSON line.
ENGINE_PROBE = """
import json, django
django.setup()
from django.db import connection, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.mysql.base import DatabaseWrapper as MySQLWrapper
from django.db.backends.utils import CursorWrapper
from django_dbkeepalive import guard
from django_dbkeepalive.testing import kill_connection
from testproject.testapp.models import Item

def djangos(cls, name):
    method = cls.__dict__.get(name)
    return method is not None and method.__module__.startswith("django.db.")

untouched = {
    "CursorWrapper.execute": djangos(CursorWrapper, "execute"),
    "CursorWrapper.executemany": djangos(CursorWrapper, "executemany"),
    "CursorWrapper.callproc": djangos(CursorWrapper, "callproc"),
    "CursorWrapper.close absent": "close" not in CursorWrapper.__dict__,
    "BaseDatabaseWrapper.connect": djangos(BaseDatabaseWrapper, "connect"),
    "BaseDatabaseWrapper.set_autocommit": djangos(BaseDatabaseWrapper, "set_autocommit"),
    "BaseDatabaseWrapper.commit": djangos(BaseDatabaseWrapper, "commit"),
    "BaseDatabaseWrapper.rollback": djangos(BaseDatabaseWrapper, "rollback"),
    "MySQL is_usable": djangos(MySQLWrapper, "is_usable"),
    "MySQL get_connection_params": djangos(MySQLWrapper, "get_connection_params"),
}
Item.objects.create(key="before-kill")
victim = kill_connection()
Item.objects.create(key="after-kill")  # runs on a new connection
with connection.cursor() as cursor:
    cursor.execute("SELECT CONNECTION_ID()")
    after = cursor.fetchone()[0]
print(json.dumps({
    "untouched": untouched,
    "installed": guard.is_installed(),
    "patched": guard.is_patched(),
    "engine": type(connections["default"]).__module__,
    "victim": victim,
    "after": after,
}))
"""


def run_engine_probe() -> dict[str, Any]:
    env = {**os.environ, "DBK_BACKEND": "engine", "DJANGO_SETTINGS_MODULE": "testproject.settings"}
    return json_from(["-c", ENGINE_PROBE], env)


def test_the_engine_without_patching_leaves_djangos_classes_alone_and_recovers_a_kill(raw):
    result = run_engine_probe()
    assert result["installed"] is True and result["patched"] is False
    assert result["engine"] == "django_dbkeepalive.backends.mysql.base"
    assert result["untouched"] == dict.fromkeys(result["untouched"], True)
    assert result["after"] != result["victim"]
    assert sorted(key for (key,) in raw("SELECT `key` FROM testapp_item")) == [
        "after-kill",
        "before-kill",
    ]


@pytest.fixture
def engine_alias() -> Iterator[str]:
    """An alias ``engine`` on the test database with the guarded MySQL ENGINE, while the
    patches are installed too (``PATCH`` on, the test session's default)."""
    with extra_alias("engine", ENGINE="django_dbkeepalive.backends.mysql") as alias:
        yield alias


def test_the_engine_under_patching_recovers_once_never_twice(engine_alias, server):
    db = connections[engine_alias]
    assert getattr(db, "dbkeepalive_native", False) and guard.is_patched()
    with db.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        [first] = cursor.fetchone()
    before = server.connections_total()
    # The KILL lands while the statement is on its way: a read is re-run once.
    kill_connection(engine_alias, notice=False)
    with record_recycles(engine_alias) as log, db.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM testapp_item")
        assert cursor.fetchone() == (0,)
        cursor.execute("SELECT CONNECTION_ID()")
        [second] = cursor.fetchone()
    assert second != first
    assert log.reasons == ["disconnected"]  # one recycle: the mixin passed through
    assert server.connections_total() - before == 1 + 1  # the killer's, then one reconnect


def test_patch_off_warns_about_an_alias_whose_engine_has_no_guard():
    with override_settings(DBKEEPALIVE={"PATCH": False}):
        found = [m for m in check_configuration() if m.id == "dbkeepalive.W009"]
    assert {m.msg.split("'")[1] for m in found} == {"default", "reader"}
    [default] = [m for m in found if "'default'" in m.msg]
    assert default.level == django_checks.WARNING
    assert "DBKEEPALIVE['PATCH'] is False" in default.msg
    assert "'django.db.backends.mysql'" in default.msg
    assert "Set DATABASES['default']['ENGINE'] = 'django_dbkeepalive.backends.mysql'" in (
        default.hint
    )
    with override_settings(DBKEEPALIVE={"PATCH": True}):
        assert not [m for m in check_configuration() if m.id == "dbkeepalive.W009"]


def test_an_invalid_patch_value_is_a_settings_error():
    from django_dbkeepalive.conf import find_problems

    [problem] = find_problems({"PATCH": "no"}, ["default"])
    assert problem.id == "dbkeepalive.E003"
    assert problem.key == "PATCH"
    [problem] = find_problems({"DATABASES": {"default": {"PATCH": False}}}, ["default"])
    assert problem.id == "dbkeepalive.E002"  # top level only


def test_uninstall_keeps_a_patch_made_after_the_guard_and_install_reuses_it(server, raw):
    seen: list[str] = []
    guarded = CursorWrapper.execute
    connection.ensure_connection()  # its setup statements are not the point

    def spy(self: Any, sql: Any, params: Any = None) -> Any:
        seen.append(sql)
        return guarded(self, sql, params)

    CursorWrapper.execute = spy  # type: ignore[method-assign]
    try:
        guard.uninstall()
        assert CursorWrapper.execute is spy  # not undone by the guard's removal
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")  # the guard's replacement only passes through
        assert seen == ["SELECT 1"]
        guard.install()
        assert CursorWrapper.execute is spy  # the kept replacement is live again
        close_connections()
        connection.ensure_connection()
        kill_connection()
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO testapp_item (`key`, value, created) VALUES ('spied', 1, NOW())"
            )
        assert len([s for s in seen if s.startswith("INSERT")]) == 1  # seen, and sent once
        assert raw("SELECT `key` FROM testapp_item") == [("spied",)]
    finally:
        CursorWrapper.execute = guarded  # type: ignore[method-assign]
        if not guard.is_installed():
            guard.install()


def _traced(method: Any, seen: list[str], name: str = "execute") -> Any:
    """A tracing library's wrapper of ``method`` (as Sentry's: ``functools.wraps``)."""

    @functools.wraps(method)
    def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(name)
        return method(self, *args, **kwargs)

    return traced


@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
def test_the_guard_over_another_librarys_execute_reruns_a_read_and_sends_a_write_once(server, raw):
    seen: list[str] = []
    guard.uninstall()
    djangos = CursorWrapper.execute
    CursorWrapper.execute = _traced(djangos, seen)  # type: ignore[method-assign]
    try:
        guard.install()  # calls through the tracing wrapper, not Django's own body
        assert not wrappers.is_djangos_own(CursorWrapper.execute.__wrapped__)
        close_connections()
        Item.objects.create(key="a")
        kill_connection(notice=False)  # the read below meets the dead session
        assert Item.objects.count() == 1  # re-run once on a new connection
        kill_connection()
        Item.objects.create(key="b")  # the guard replaced the connection first
        assert sorted(key for (key,) in raw("SELECT `key` FROM testapp_item")) == ["a", "b"]
        assert seen.count("execute") >= 4  # every statement went through the library
    finally:
        guard.uninstall()
        CursorWrapper.execute = djangos  # type: ignore[method-assign]
        guard.install()
        close_connections()


def test_uninstalled_under_another_librarys_wrappers_the_guard_passes_every_call_through(
    server, raw
):
    # The guard's replacements stay under the library's wrappers, and only pass through.
    from django.db.backends.base.base import BaseDatabaseWrapper

    methods = [
        (CursorWrapper, name) for name in ("execute", "executemany", "callproc", "close")
    ] + [
        (BaseDatabaseWrapper, name) for name in ("connect", "set_autocommit", "commit", "rollback")
    ]
    guards = {(cls, name): cls.__dict__[name] for cls, name in methods}
    seen: list[str] = []
    raw("DROP PROCEDURE IF EXISTS dbk_pause")
    raw("CREATE PROCEDURE dbk_pause(IN pause DOUBLE) BEGIN SELECT 1; DO SLEEP(pause); END")
    for cls, name in methods:
        setattr(cls, name, _traced(guards[cls, name], seen, name))
    try:
        guard.uninstall()
        close_connections()
        with transaction.atomic():
            Item.objects.create(key="committed")
        with pytest.raises(ValueError), transaction.atomic():
            Item.objects.create(key="rolled-back")
            raise ValueError
        with connection.cursor() as cursor:
            with pytest.raises(ProgrammingError) as caught:
                cursor.execute("SELEC 1")
            assert not getattr(caught.value, "__notes__", None)  # untouched by the guard
            with pytest.raises(IntegrityError):
                cursor.executemany(
                    "INSERT INTO testapp_item (`key`, value, created) VALUES (%s, 0, NOW())",
                    [["committed"]],
                )
        cursor = connection.cursor()
        cursor.callproc("dbk_pause", [30])  # its final status is still to come
        server.kill(int(connection.connection.thread_id()))
        with pytest.raises(Exception) as closing:
            cursor.close()  # the driver's error, as without the guard
        assert closing.value.args[0] == 2013
        # Nothing replaces the dead connection: PyMySQL says InterfaceError(0, ''), and
        # mysqlclient's raw error escapes from the ORM's cursor.close() in its cleanup.
        with pytest.raises(Exception) as dead:
            Item.objects.count()
        assert dead.value.args[0] in (0, 2006, 2013)
        assert raw("SELECT `key` FROM testapp_item") == [("committed",)]
        assert {name for _, name in methods} <= set(seen)
    finally:
        for cls, name in methods:
            setattr(cls, name, guards[cls, name])
        close_connections()  # dead: install() would read its limits (and fail)
        guard.install()
        raw("DROP PROCEDURE IF EXISTS dbk_pause")
