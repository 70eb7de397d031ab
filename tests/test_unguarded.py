"""A backend the guard cannot protect (a third-party MySQL backend on a driver module it
does not know) is reported as not guarded by ``manage.py check`` and ``manage.py
dbkeepalive``, and left alone: never shown as on."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import OperationalError, connections

from django_dbkeepalive import guard
from django_dbkeepalive.checks import configuration_messages
from django_dbkeepalive.diagnose import diagnose

from .conftest import extra_alias

pytestmark = pytest.mark.django_db(transaction=True)

DRIVER = '''"""A third-party MySQL driver: mysqlclient's (or PyMySQL's) under another name."""
import MySQLdb as _driver
from MySQLdb import *  # noqa: F403

connect = Connect = _driver.connect
version_info = _driver.version_info
__version__ = getattr(_driver, "__version__", ".".join(map(str, version_info[:3])))
'''
BACKEND = """from django.db.backends.mysql.base import DatabaseWrapper as MySQLWrapper

from dbk_thirdparty import driver


class DatabaseWrapper(MySQLWrapper):
    Database = driver
"""


@pytest.fixture
def third_party(tmp_path: Path) -> Iterator[str]:
    """The alias ``third`` on ``dbk_thirdparty.mysql``, whose ``Database`` module is
    ``dbk_thirdparty.driver``; the same server as ``default``."""
    package = tmp_path / "dbk_thirdparty"
    (package / "mysql").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "driver.py").write_text(DRIVER)
    (package / "mysql" / "__init__.py").write_text("")
    (package / "mysql" / "base.py").write_text(BACKEND)
    sys.path.insert(0, str(tmp_path))
    try:
        with extra_alias("third", ENGINE="dbk_thirdparty.mysql") as alias:
            yield alias
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("dbk_thirdparty")]:
            del sys.modules[name]


def test_a_backend_on_an_unknown_driver_module_gets_a_warning_naming_it(third_party):
    found = [m for m in configuration_messages(third_party) if m.id == "dbkeepalive.W011"]
    assert len(found) == 1
    assert found[0].msg.startswith("Database 'third' is not guarded: its driver module ")
    assert "(dbk_thirdparty.driver)" in found[0].msg
    assert "ENGINE 'dbk_thirdparty.mysql'" in found[0].msg
    assert "mysqlclient, PyMySQL or MySQL Connector/Python" in found[0].hint
    # The known drivers' aliases get no such warning.
    assert not [m for m in configuration_messages("default") if m.id == "dbkeepalive.W011"]


def test_the_report_shows_the_guard_off_and_why(third_party):
    [db] = diagnose([third_party]).as_dict()["databases"]
    assert db["guard"]["mode"] == "off" and db["guard"]["enabled"] is False
    assert "dbk_thirdparty.driver" in db["guard"]["unguarded"]
    out = io.StringIO()
    with pytest.raises(SystemExit) as exited:  # a problem: exit status 1
        call_command("dbkeepalive", "--database", third_party, stdout=out, no_color=True)
    assert exited.value.code == 1
    rows = [line.split(None, 1) for line in out.getvalue().splitlines() if line.strip()]
    guard_rows = [row for row in rows if row[0].startswith("guard")]
    assert guard_rows == [
        [
            "guard",
            "OFF (not guarded: its driver module (dbk_thirdparty.driver) is not one "
            "the guard knows)",
        ]
    ]  # no idle limit, ping or peek shown for a connection nothing guards


def test_its_connections_are_left_alone_not_shown_as_guarded(third_party, server):
    db = connections[third_party]
    with db.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        [(thread_id,)] = cursor.fetchall()
    assert guard.unguarded(db) is not None
    assert not guard.is_guarded(db)
    server.kill(thread_id)
    # As with plain Django: nothing checks the connection, the read fails.
    with pytest.raises(OperationalError):
        with db.cursor() as cursor:
            cursor.execute("SELECT 1")
