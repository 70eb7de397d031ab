"""Test helpers: make production's connection faults happen in milliseconds.

Against a real MySQL or MariaDB server (the one your tests already use), with either
driver::

    from django_dbkeepalive.testing import assert_recycles, expire_connection, kill_connection

    def test_the_import_survives_a_killed_connection(transactional_db):
        import_batch(1)
        kill_connection()  # a real KILL, as an administrator or a failover would
        with assert_recycles(1, reasons=["disconnected"]):
            import_batch(2)  # reconnects before its first statement

    def test_the_job_survives_wait_timeout(transactional_db):
        run_job()
        expire_connection()  # as if idle past its limit, without sleeping
        with assert_recycles(reasons=["idle"]):
            run_job()

The pytest plugin (:mod:`django_dbkeepalive.pytest_plugin`) exposes them as fixtures:
``kill_connection``, ``expire_connection`` and ``recycles``.

Use ``transactional_db`` (or ``@pytest.mark.django_db(transaction=True)``,
``TransactionTestCase``): with ``db`` / ``TestCase`` every test runs inside a transaction,
where the guard never reconnects and a lost connection raises
``ConnectionLostInTransaction`` instead; ``kill_connection()`` there also breaks the
later tests of a ``TestCase`` class, and warns (:class:`TransactionLostWarning`).

Every helper needs ``"django_dbkeepalive"`` in ``INSTALLED_APPS`` (it raises
``ImproperlyConfigured`` before doing anything otherwise).
"""

from __future__ import annotations

from .faults import KILL_TIMEOUT, expire_connection, kill_connection
from .recycles import (
    ExpireInTransactionWarning,
    Recycle,
    RecycleLog,
    TestingWarning,
    TransactionLostWarning,
    assert_recycles,
    record_recycles,
)

__all__ = [
    "KILL_TIMEOUT",
    "ExpireInTransactionWarning",
    "Recycle",
    "RecycleLog",
    "TestingWarning",
    "TransactionLostWarning",
    "assert_recycles",
    "expire_connection",
    "kill_connection",
    "record_recycles",
]
