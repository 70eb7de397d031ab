"""pytest fixtures for :mod:`django_dbkeepalive.testing` (loaded automatically when
django-dbkeepalive is installed, through its ``pytest11`` entry point; or list it in
``pytest_plugins = ["django_dbkeepalive.pytest_plugin"]``).

- ``kill_connection``: the function :func:`~django_dbkeepalive.testing.kill_connection`;
- ``expire_connection``: the function :func:`~django_dbkeepalive.testing.expire_connection`;
- ``recycles``: a :class:`~django_dbkeepalive.testing.RecycleLog` of every recycle during
  the test (``recycles.reasons == ["idle"]``).

Example::

    @pytest.mark.django_db(transaction=True)
    def test_import_survives_a_kill(kill_connection, recycles):
        import_batch(1)
        kill_connection()
        import_batch(2)
        assert recycles.reasons == ["disconnected"]

Use them in transactional tests (``transactional_db``, ``django_db(transaction=True)``):
in a test wrapped in a transaction (``db``), a killed connection loses that transaction
(``kill_connection`` warns with ``TransactionLostWarning``). Each fixture needs
``"django_dbkeepalive"`` in ``INSTALLED_APPS`` and raises ``ImproperlyConfigured``
otherwise.

Nothing here imports Django until a fixture is used, so the plugin costs nothing in
projects (or test runs) that do not use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .testing import RecycleLog


@pytest.fixture
def kill_connection() -> Callable[..., int]:
    """``kill_connection(using="default", *, notice=True)``: a real ``KILL`` of this
    thread's connection; see :func:`django_dbkeepalive.testing.kill_connection`."""
    from .testing import kill_connection as kill

    return kill


@pytest.fixture
def expire_connection() -> Callable[..., float]:
    """``expire_connection(using="default", *, idle=None)``: the connection looks idle
    past its limit; see :func:`django_dbkeepalive.testing.expire_connection`."""
    from .testing import expire_connection as expire

    return expire


@pytest.fixture
def recycles() -> Iterator[RecycleLog]:
    """Every ``connection_recycled`` signal sent during the test, from every thread."""
    from .testing import record_recycles

    with record_recycles() as log:
        yield log
