"""TLS is what it would be without the app; PyMySQL's preferred context is built once.

PyMySQL 1.2 with no ssl option prefers TLS and builds ``ssl.create_default_context()``
per connect (tens of milliseconds); the app gives it one context per process, PyMySQL's
own (see ``guard/families/mysql_tls.py``). Against a private server that offers TLS
(self-signed certificate) and the session server, which does not: the session is
encrypted exactly when the driver alone would encrypt it, the certificate rules are the
driver's, an alias with ssl options (or ``ssl_disabled``) is left alone, and a reconnect
after a KILL does not build a context. Run once per driver (DBK_DRIVER).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections

from django_dbkeepalive.guard.families import mysql_tls

from .conftest import extra_alias
from .mariadb import MariaDBServer


@pytest.fixture(scope="module")
def tls_server() -> Iterator[MariaDBServer]:
    """A private MariaDB of this module that offers TLS (a self-signed certificate)."""
    server = MariaDBServer()
    try:
        server.start()
        if not server.set_tls(True):
            pytest.skip("openssl is not installed: the private server cannot offer TLS")
        yield server
    finally:
        server.close()


@pytest.fixture(params=["tls", "plain"])
def target(request: Any, tls_server: MariaDBServer, mariadb: MariaDBServer) -> MariaDBServer:
    """The server offering TLS, or the session server (no TLS)."""
    if request.param == "plain":
        assert not mariadb.tls
        return mariadb
    return tls_server


@contextlib.contextmanager
def alias_on(server: MariaDBServer, **options: Any) -> Iterator[Any]:
    """A Django alias (guarded by the app) on ``server`` with ``OPTIONS = options``."""
    with extra_alias(
        "tls_probe",
        HOST=server.host,
        PORT=server.port,
        USER=server.user,
        PASSWORD=server.password,
        NAME="mysql",
        CONN_MAX_AGE=None,
        CONN_HEALTH_CHECKS=False,
        OPTIONS=dict(options),
    ) as alias:
        yield connections[alias]


def direct(db: Any, server: MariaDBServer, **options: Any) -> Any:
    """The same connection made by the driver alone, never through the app's hook."""
    assert mysql_tls._ARMED.get() is None  # nothing of the app's is pending
    return db.Database.connect(
        host=server.host,
        port=server.port,
        user=server.user,
        password=server.password,
        database="mysql",
        **options,
    )


def cipher(conn: Any) -> str:
    cursor = conn.cursor()
    try:
        cursor.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        return str(cursor.fetchone()[1] or "")
    finally:
        cursor.close()


def outcome(connect: Any) -> tuple[str, Any]:
    """``("ok", cipher)`` or ``("error", (class name, code))`` of a connect."""
    try:
        conn = connect()
    except Exception as exc:
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        return "error", (type(exc).__name__, code)
    try:
        return "ok", cipher(conn)
    finally:
        conn.close()


class Borrowed:
    """The alias's connection, opened through the app; closing it is the alias's job."""

    def __init__(self, db: Any) -> None:
        db.ensure_connection()
        self.conn = db.connection

    def cursor(self) -> Any:
        return self.conn.cursor()

    def close(self) -> None:
        pass


def pymysql_only(db: Any) -> None:
    if db.Database.__name__ != "pymysql":
        pytest.skip("PyMySQL's preferred mode (DBK_DRIVER=pymysql)")


def preferred_mode_only(db: Any) -> None:
    pymysql_only(db)
    if mysql_tls.preferred_context() is None:
        pytest.skip("this PyMySQL (before 1.2) has no preferred TLS mode: nothing is cached")


# -- no ssl option: the same TLS as the driver alone --------------------------------


def test_the_session_is_encrypted_exactly_when_it_is_without_the_app(target, driver):
    with alias_on(target) as db:
        with db.cursor() as cursor:
            cursor.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            with_app = cursor.fetchone()[1] or ""
        without = outcome(lambda: direct(db, target))
    assert without == ("ok", with_app)
    if driver == "pymysql" and mysql_tls.preferred_context() is not None:
        # PyMySQL 1.2's preferred mode: TLS whenever the server offers it.
        assert bool(with_app) == target.tls
    elif driver == "pymysql":  # PyMySQL 1.1: no TLS without an ssl option
        assert with_app == ""


def test_preferred_mode_verifies_nothing_with_or_without_the_app(tls_server, driver):
    with alias_on(tls_server) as db:
        preferred_mode_only(db)
        db.ensure_connection()
        ours = db.connection.ctx
        plain = direct(db, tls_server)
        try:
            assert ours is mysql_tls.preferred_context()
            assert plain.ctx is not ours  # the driver alone builds one per connect
            for name in ("verify_mode", "check_hostname", "verify_flags", "options"):
                assert getattr(ours, name) == getattr(plain.ctx, name), name
            assert (ours.minimum_version, ours.maximum_version) == (
                plain.ctx.minimum_version,
                plain.ctx.maximum_version,
            )
            assert ours.cert_store_stats() == plain.ctx.cert_store_stats()
            assert (ours.verify_mode, ours.check_hostname) == (ssl.CERT_NONE, False)
            # The self-signed certificate is accepted unverified, both ways.
            assert db.connection._sock.getpeercert() == plain._sock.getpeercert() == {}
        finally:
            plain.close()


# -- the user's ssl options: left alone -----------------------------------------------


def _explicit_options(server: MariaDBServer) -> dict[str, dict[str, Any]]:
    return {
        "verify_without_ca": {"ssl_verify_cert": True},  # the system CAs: refused
        "ca_and_hostname": {"ssl": {"ca": str(server.ssl_cert)}},  # CN only, no IP SAN
        "ca_no_hostname": {"ssl": {"ca": str(server.ssl_cert), "check_hostname": False}},
        "disabled": {"ssl_disabled": True},
        "opt_out": {"ssl_disabled": False},  # PyMySQL's default, spelled out
    }


@pytest.mark.parametrize(
    "case", ["verify_without_ca", "ca_and_hostname", "ca_no_hostname", "disabled", "opt_out"]
)
def test_an_alias_with_ssl_options_gets_the_drivers_own_rules(tls_server, driver, case):
    options = _explicit_options(tls_server)[case]
    with alias_on(tls_server, **options) as db:
        with_app = outcome(lambda: Borrowed(db))
        preferred = mysql_tls.preferred_context() if driver == "pymysql" else None
        if preferred is not None and with_app[0] == "ok":
            assert getattr(db.connection, "ctx", None) is not preferred
        db.close()
        without = outcome(lambda: direct(db, tls_server, **options))
    assert with_app == without
    assert mysql_tls._ARMED.get() is None


def test_a_users_context_is_the_one_the_driver_gets(tls_server):
    mine = ssl.create_default_context(cafile=str(tls_server.ssl_cert))
    mine.check_hostname = False
    with alias_on(tls_server, ssl=mine) as db:
        pymysql_only(db)
        with db.cursor() as cursor:
            cursor.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            assert cursor.fetchone()[1]
        assert db.connection.ctx is mine


def test_mysqlclients_arguments_are_untouched(target):
    from django_dbkeepalive.guard.families.mysql_drivers import Mysqlclient

    params = {"host": target.host, "port": target.port, "user": target.user}
    assert Mysqlclient().connection_params(dict(params), "default") == params
    with alias_on(target) as db:
        if db.Database.__name__ == "pymysql":
            pytest.skip("mysqlclient (DBK_DRIVER=mysqlclient)")
        assert mysql_tls.SSL_OPTIONS.isdisjoint(db.get_connection_params())
        db.ensure_connection()
        assert mysql_tls._ARMED.get() is None


# -- one context per process ------------------------------------------------------------


def test_the_context_is_reused_across_reconnects_and_threads(target):
    with alias_on(target) as db:
        preferred_mode_only(db)
        db.ensure_connection()
        first, session = db.connection.ctx, db.connection.thread_id()
        target.kill(session)
        with db.cursor() as cursor:  # the guard reconnects
            cursor.execute("SELECT 1")
        assert db.connection.thread_id() != session
        assert db.connection.ctx is first
        seen: list[Any] = []

        def other() -> None:
            with alias_on_thread(db.alias) as mine:
                mine.ensure_connection()
                seen.append(mine.connection.ctx)

        worker = threading.Thread(target=other)
        worker.start()
        worker.join()
        assert seen == [first]


@contextlib.contextmanager
def alias_on_thread(alias: str) -> Iterator[Any]:
    db = connections[alias]
    try:
        yield db
    finally:
        db.close()


def test_a_cold_cache_built_from_many_threads_at_once_builds_one_context():
    saved = list(mysql_tls._CACHE)
    mysql_tls._CACHE[:] = [None, threading.Lock(), None]
    try:
        barrier = threading.Barrier(8)
        got: list[Any] = []

        def build() -> None:
            barrier.wait()
            got.append(mysql_tls.preferred_context())

        threads = [threading.Thread(target=build) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(got) == 8 and all(context is got[0] for context in got)
    finally:
        mysql_tls._CACHE[:] = saved


def in_child(body: Any) -> int:
    """Fork; the child exits 0 when ``body()`` is true (1 if false, 2 if it raised)."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 2
        try:
            code = 0 if body() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_forked_child_builds_its_own():
    inherited = mysql_tls.preferred_context()
    if inherited is None:
        pytest.skip("this PyMySQL has no preferred mode")

    def child() -> bool:
        again = mysql_tls.preferred_context()
        return again is not inherited and again is mysql_tls.preferred_context()

    assert in_child(child) == 0
    assert mysql_tls.preferred_context() is inherited


def test_the_hook_runs_at_connect_time_only(target, monkeypatch):
    calls: list[int] = []
    arm = mysql_tls.arm
    monkeypatch.setattr(mysql_tls, "arm", lambda params: (calls.append(1), arm(params))[1])
    with alias_on(target) as db:
        pymysql_only(db)
        db.ensure_connection()
        assert calls == [1]
        with db.cursor() as cursor:
            for _ in range(200):
                cursor.execute("SELECT 1")
        assert calls == [1]


def test_a_reconnect_after_a_kill_builds_no_context(target):
    """Reported figure: ``-s`` prints it; the bound is loose (a reconnect must cost
    less than one ``ssl.create_default_context()``, which it did per connect before)."""
    with alias_on(target) as db:
        pymysql_only(db)
        builds = []
        for _ in range(3):
            started = time.perf_counter()
            ssl.create_default_context()
            builds.append(time.perf_counter() - started)
        reconnects = []
        for _ in range(7):
            db.ensure_connection()
            target.kill(db.connection.thread_id())
            started = time.perf_counter()
            with db.cursor() as cursor:
                cursor.execute("SELECT 1")
            reconnects.append(time.perf_counter() - started)
        build, reconnect = statistics.median(builds), statistics.median(reconnects)
        print(f"\nKILL -> statement {reconnect * 1e3:.2f} ms; one context {build * 1e3:.1f} ms")
        assert reconnect < build
