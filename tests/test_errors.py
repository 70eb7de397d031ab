"""The one predicate that decides "is this a disconnect", and which reads may be re-run."""

from __future__ import annotations

import MySQLdb
import pymysql
import pytest
from django.db import connection
from django.db.utils import InterfaceError, OperationalError

from django_dbkeepalive.errors import is_disconnect
from django_dbkeepalive.guard.causes import tls_failure
from django_dbkeepalive.guard.families import classify
from django_dbkeepalive.guard.families.mysql import DISCONNECT_CODES
from django_dbkeepalive.guard.statements import is_retryable_read


@pytest.mark.parametrize(
    "exc, code, not_sent",
    [
        (MySQLdb.OperationalError(2006, "Server has gone away"), 2006, True),  # libmariadb
        (MySQLdb.OperationalError(2006, "MySQL server has gone away"), 2006, True),
        (MySQLdb.OperationalError(2013, "Lost connection to server during query"), 2013, False),
        (
            pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query"),
            2013,
            False,
        ),
        (
            pymysql.err.OperationalError(
                2006, "MySQL server has gone away (BrokenPipeError(32, 'Broken pipe'))"
            ),
            2006,
            True,
        ),
        (pymysql.err.InterfaceError(0, ""), 0, True),
        (
            pymysql.err.OperationalError(
                4031, "The client was disconnected by the server because of inactivity."
            ),
            4031,
            True,
        ),
        (pymysql.err.OperationalError(1927, "Connection was killed"), 1927, False),
        (pymysql.err.OperationalError(1053, "Server shutdown in progress"), 1053, False),
        (
            pymysql.err.OperationalError(
                2055,
                "Lost connection to server at 'reading initial communication packet', "
                "system error: 104",
            ),
            2055,
            False,
        ),
        (ConnectionResetError(104, "Connection reset by peer"), -1, False),
    ],
)
def test_disconnects_of_both_drivers_are_recognised_by_code_not_text(exc, code, not_sent):
    found = classify(exc)
    assert found is not None
    assert found.code == code
    assert found.not_sent is not_sent


def test_django_wrapped_errors_are_recognised_through_cause():
    driver_error = pymysql.err.InterfaceError(0, "")
    wrapped = InterfaceError(*driver_error.args)
    wrapped.__cause__ = driver_error
    assert is_disconnect(wrapped)
    outer = RuntimeError("task failed")
    outer.__cause__ = OperationalError(2013, "Lost connection")
    assert is_disconnect(outer)


@pytest.mark.parametrize(
    "exc",
    [
        pymysql.err.IntegrityError(1062, "Duplicate entry 'a' for key 'key'"),
        pymysql.err.OperationalError(1205, "Lock wait timeout exceeded"),
        pymysql.err.OperationalError(1213, "Deadlock found"),
        pymysql.err.ProgrammingError(1064, "You have an error in your SQL syntax"),
        MySQLdb.OperationalError(1045, "Access denied"),
        ValueError("2006"),
    ],
)
def test_other_errors_are_not_disconnects(exc):
    assert classify(exc) is None


@pytest.mark.parametrize(
    ("name", "errno", "msg", "kind", "not_sent"),
    [
        # Its cursor()/ping() on a connection it found closed: nothing was sent.
        ("OperationalError", -1, "MySQL Connection not available", "closed", True),
        ("InterfaceError", -1, "MySQL Connection not available", "closed", True),
        # Its client-side timeouts (3024 is also the server's max_execution_time: the
        # class tells them apart): the statement may have run.
        ("ReadTimeoutError", 3024, "The Read Operation timed out", "timeout", False),
        ("WriteTimeoutError", 3025, "The Write Operation timed out", "timeout", False),
        # -1 is also its code for usage errors: those are no disconnect.
        ("InterfaceError", -1, "No result set to fetch from", None, None),
        ("ProgrammingError", -1, "Use multi=True when executing multiple statements", None, None),
        ("DatabaseError", 3024, "Query execution was interrupted", None, None),
    ],
)
def test_connector_pythons_own_errors_are_told_apart_by_class_and_code(
    name, errno, msg, kind, not_sent
):
    errors = pytest.importorskip("mysql.connector.errors")
    if not hasattr(errors, name):
        pytest.skip(f"this Connector/Python has no {name} (its client timeouts came in 9.x)")
    found = classify(getattr(errors, name)(msg=msg, errno=errno))
    if kind is None:
        assert found is None
    else:
        assert found is not None and (found.kind, found.not_sent) == (kind, not_sent)


def test_a_1290_for_another_server_option_is_no_read_only_refusal():
    from django_dbkeepalive.guard.families.mysql_codes import refusal_of

    secure = "The MariaDB server is running with the --secure-file-priv option so it cannot"
    assert refusal_of(pymysql.err.OperationalError(1290, secure)) is None
    read_only = "The MariaDB server is running with the --read-only option so it cannot"
    assert refusal_of(pymysql.err.OperationalError(1290, read_only)) == (1290, "read_only")


def _psycopg_errors():
    """psycopg 3's error classes, or a skip in the psycopg2 run (where it is hidden)."""
    return pytest.importorskip("psycopg.errors")


@pytest.mark.parametrize(
    ("name", "kind", "not_sent"),
    [
        ("AdminShutdown", "terminated", False),  # 57P01: pg_terminate_backend, shutdown
        ("CrashShutdown", "shutdown", False),  # 57P02
        ("IdleSessionTimeout", "idle_timeout", True),  # 57P05: sent while idle
        ("IdleInTransactionSessionTimeout", "idle_timeout", True),  # 25P03
        ("CannotConnectNow", "unreachable", True),  # 57P03
        ("ConnectionFailure", "lost", False),  # 08006
        ("ConnectionDoesNotExist", "closed", True),  # 08003
    ],
)
def test_psycopg_disconnects_are_recognised_by_sqlstate_through_django(name, kind, not_sent):
    driver_error = getattr(_psycopg_errors(), name)("terminating connection")
    wrapped = OperationalError(*driver_error.args)  # as Django's error wrapper raises it
    wrapped.__cause__ = driver_error
    found = classify(wrapped)
    assert found is not None
    assert (found.kind, found.not_sent, found.sqlstate) == (kind, not_sent, driver_error.sqlstate)


@pytest.mark.parametrize(
    "name", ["QueryCanceled", "SerializationFailure", "LockNotAvailable", "UniqueViolation"]
)
def test_psycopg_errors_of_a_working_session_are_not_disconnects(name):
    # Some are OperationalError subclasses too: the SQLSTATE decides, not the class.
    assert classify(getattr(_psycopg_errors(), name)("no")) is None


def test_psycopg2_connection_errors_without_sqlstate_are_disconnects():
    psycopg2 = pytest.importorskip("psycopg2")
    closed = classify(psycopg2.InterfaceError("connection already closed"))
    assert closed is not None and closed.kind == "closed" and closed.not_sent
    lost = classify(psycopg2.OperationalError("server closed the connection unexpectedly"))
    assert lost is not None and lost.kind == "lost" and not lost.not_sent
    assert classify(psycopg2.errors.lookup("40001")("could not serialize")) is None


def test_packet_too_large_is_a_disconnect_that_is_never_retried():
    found = classify(
        pymysql.err.OperationalError(1153, "Got a packet bigger than 'max_allowed_packet' bytes")
    )
    assert found is not None and found.kind == "too_large" and not found.retryable


def test_disconnect_codes_cover_the_documented_ones():
    assert {2006, 2013, 2055, 4031, 1927, 1053} <= DISCONNECT_CODES


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "  select * from t where id = %s",
        "/* comment */ SELECT a FROM b",
        "-- note\nSELECT 1",
        "(SELECT 1) UNION (SELECT 2)",
        "SHOW SESSION STATUS LIKE 'Questions'",
        "EXPLAIN SELECT 1",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        b"SELECT 1",
        # Re-run only outside a transaction, where their locks end with the statement.
        "SELECT * FROM t WHERE id = %s FOR UPDATE",
        "SELECT * FROM t LOCK IN SHARE MODE",
        # System variables answer for the new session (Django reads them on connect).
        "SELECT VERSION(), @@sql_mode, @@default_storage_engine, @@sql_auto_is_null",
        "SELECT @@SESSION.wait_timeout",
    ],
)
def test_reads_may_be_rerun(sql):
    assert is_retryable_read(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO t VALUES (1)",
        "UPDATE t SET a = 1",
        "DELETE FROM t",
        "REPLACE INTO t VALUES (1)",
        "SELECT a INTO @x FROM t",
        "SELECT a FROM t INTO OUTFILE '/tmp/x'",
        "SELECT LAST_INSERT_ID()",
        "SELECT FOUND_ROWS()",
        "SELECT GET_LOCK('job', 10)",
        "SELECT @counter",
        "SELECT @`quoted var`",
        "SELECT @@last_insert_id",
        "SELECT @@SESSION.warning_count",
        "SELECT @@identity",
        "SELECT NEXTVAL(seq)",
        "SET SESSION wait_timeout = 5",
        "CALL proc()",
        None,
    ],
)
def test_writes_and_session_dependent_reads_are_never_rerun(sql):
    assert not is_retryable_read(sql)


@pytest.mark.django_db(transaction=True)
def test_a_real_kill_is_classified_for_the_driver_in_use(server, driver):
    connection.ensure_connection()
    raw_conn = connection.connection
    server.kill(raw_conn.thread_id())
    import time

    time.sleep(0.3)
    with pytest.raises(Exception) as caught:
        # The driver itself, below the guard (Connector/Python's cursor() pings first:
        # it fails there, with -1 "MySQL Connection not available").
        cursor = raw_conn.cursor()
        cursor.execute("SELECT 1")
    found = classify(caught.value)
    assert found is not None, repr(caught.value)
    assert found.code in ((-1,) if driver.startswith("connector") else (2006, 2013, 1927))
    connection.connection = None


def _pymysql_connect_error(cause: BaseException) -> BaseException:
    # What PyMySQL raises when connect() fails: 2003 wrapping the socket-level error.
    try:
        try:
            raise cause
        except Exception as exc:
            raise pymysql.err.OperationalError(
                2003, f"Can't connect to MySQL server on '127.0.0.1' ({exc})"
            ) from exc
    except pymysql.err.OperationalError as error:
        return error


def test_a_tls_handshake_failure_is_told_apart_from_an_unreachable_server():
    import ssl

    bad_certificate = _pymysql_connect_error(
        ssl.SSLCertVerificationError(
            1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
        )
    )
    refused = _pymysql_connect_error(ConnectionRefusedError(111, "Connection refused"))
    assert classify(bad_certificate).kind == classify(refused).kind == "unreachable"
    assert tls_failure(bad_certificate)
    assert tls_failure(MySQLdb.OperationalError(2026, "TLS/SSL error: self-signed certificate"))
    assert not tls_failure(refused)


def test_connection_lost_in_transaction_survives_pickling():
    import pickle

    from django_dbkeepalive import ConnectionLostInTransaction
    from django_dbkeepalive.guard.causes import add_note

    error = ConnectionLostInTransaction(
        "lost it", alias="reader", idle=3.5, limit=1.0, code=2013, cause="idle_timeout"
    )
    add_note(error, "a note")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is ConnectionLostInTransaction
    assert isinstance(again, OperationalError)
    assert (str(again), again.args) == ("lost it", (2013, "lost it"))
    assert (again.alias, again.idle, again.limit, again.cause) == (
        "reader",
        3.5,
        1.0,
        "idle_timeout",
    )
    assert again.__notes__ == ["a note"]
