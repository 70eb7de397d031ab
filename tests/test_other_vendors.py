"""A vendor the guard knows nothing about (SQLite here): no socket to peek at, no server
timeout to read, nothing to ping. Only ``CONN_MAX_AGE`` is enforced between statements;
otherwise the connection is left exactly as Django keeps it, in and out of transactions.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from django.db import connections, transaction
from django.test import override_settings

from django_dbkeepalive import guard
from django_dbkeepalive.testing import record_recycles

from .conftest import extra_alias

pytestmark = pytest.mark.django_db(transaction=True)


def sqlite_alias(tmp_path: Path, **changes: Any) -> AbstractContextManager[str]:
    """The alias ``lite``: a SQLite file database, for the block."""
    return extra_alias(
        "lite",
        ENGINE="django.db.backends.sqlite3",
        NAME=str(tmp_path / "lite.sqlite3"),
        HOST="",
        PORT="",
        USER="",
        PASSWORD="",
        OPTIONS={},
        **changes,
    )


def rows(db: Any) -> list[int]:
    with db.cursor() as cursor:
        cursor.execute("SELECT n FROM t ORDER BY n")
        return [n for (n,) in cursor.fetchall()]


@override_settings(DBKEEPALIVE={"PEEK_AFTER": 0.05, "PING_AFTER": 0.1})
def test_another_vendors_connection_is_kept_across_pauses_in_and_out_of_transactions(
    tmp_path: Path,
) -> None:
    with sqlite_alias(tmp_path, CONN_MAX_AGE=None) as alias:
        db = connections[alias]
        with db.cursor() as cursor:
            cursor.execute("CREATE TABLE t (n INTEGER)")
        conn = db.connection
        assert guard.idle_limits(db) == (None, None)  # no server timeout to know
        with record_recycles(alias) as recycles:
            time.sleep(0.15)  # past PEEK_AFTER and PING_AFTER: nothing to ping
            with transaction.atomic(using=alias):
                with db.cursor() as cursor:
                    cursor.execute("INSERT INTO t VALUES (1)")
                time.sleep(0.15)  # inside the transaction: no server timeout applies
                with db.cursor() as cursor:
                    cursor.execute("INSERT INTO t VALUES (2)")
            time.sleep(0.15)
            assert rows(db) == [1, 2]
        assert recycles.reasons == []
        assert db.connection is conn  # the same connection all along


def test_another_vendors_connection_older_than_conn_max_age_is_replaced(
    tmp_path: Path,
) -> None:
    with sqlite_alias(tmp_path, CONN_MAX_AGE=1) as alias:
        db = connections[alias]
        with db.cursor() as cursor:
            cursor.execute("CREATE TABLE t (n INTEGER)")
            cursor.execute("INSERT INTO t VALUES (1)")
        conn = db.connection
        time.sleep(1.1)
        with record_recycles(alias) as recycles:
            assert rows(db) == [1]  # the file database, on a new connection
        assert recycles.reasons == ["max_age"]
        assert db.connection is not conn
