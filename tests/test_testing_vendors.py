"""django_dbkeepalive.testing on a backend it does not serve: a clear error, nothing done.

Not marked ``django_db``: ``pg_alias`` sets up the test's database access itself.
"""

from __future__ import annotations

import pytest
from django.db import connections

from django_dbkeepalive.testing import expire_connection, kill_connection


def test_kill_and_expire_refuse_a_postgresql_alias_before_doing_anything(postgres, pg_alias):
    for helper in (kill_connection, expire_connection):
        with pytest.raises(ValueError) as caught:
            helper(pg_alias)
        assert str(caught.value) == (
            "django-dbkeepalive: the 'pg' connection is postgresql; kill_connection() and "
            "expire_connection() support MySQL and MariaDB only."
        )
    assert connections[pg_alias].connection is None  # not even connected
