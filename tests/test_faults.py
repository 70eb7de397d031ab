"""Faults the soak run (make soak) found, reproduced one by one against real servers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import DatabaseError, connection, transaction

from testproject.testapp.models import Item

from .conftest import close_connections

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

Raw = Callable[..., list[tuple[Any, ...]]]


def keys(raw: Raw) -> list[str]:
    return [row[0] for row in raw("SELECT `key` FROM testapp_item ORDER BY id")]


@pytest.mark.restart
def test_server_down_when_an_atomic_block_ends_leaves_autocommit_on(server, raw) -> None:
    # The block's rollback drops the dead connection; Django's set_autocommit(True) at
    # the block's end then fails to connect. The next connection must be in autocommit
    # mode, or the next create() would sit in a transaction nobody commits, and be lost.
    with pytest.raises(DatabaseError):
        with transaction.atomic():
            Item.objects.create(key="rolled-back")
            server.stop()
            Item.objects.create(key="never")
    server.start_again()
    Item.objects.create(key="after")
    assert connection.get_autocommit() is True
    close_connections()
    assert keys(raw) == ["after"]
