"""What a SQL statement does, as far as re-running it is concerned.

Owns: telling a read from a write, and a read whose answer does not depend on the
session it runs in (safe to run again on a new connection). Pure functions on text.
Must never import: anything of Django or of the rest of the guard.
"""

from __future__ import annotations

import re

__all__ = ["is_read", "is_retryable_read"]

_LEADING_NOISE = r"(?:\s+|/\*.*?\*/|--[^\n]*(?:\n|$)|#[^\n]*(?:\n|$)|\()*"
_READ_START = re.compile(
    _LEADING_NOISE + r"(SELECT|SHOW|DESCRIBE|DESC|EXPLAIN|WITH|VALUES|TABLE|CHECKSUM)\b",
    re.IGNORECASE | re.DOTALL,
)
# A read that changes something, or whose answer depends on the session it runs in,
# would give a different (wrong) answer on a new connection. (Locking reads, FOR UPDATE
# and LOCK IN SHARE MODE, are not among them: a read is only ever re-run outside a
# transaction, where the server releases their locks as soon as they return.) User
# variables (@x) belong to the lost session; system variables (@@sql_mode, Django's own
# read of them on a new connection) answer for the session the code goes on with,
# except those about the session's last statements (@@last_insert_id ...).
_NOT_IDEMPOTENT = re.compile(
    r"\b(INTO|INSERT|UPDATE|DELETE|REPLACE"
    r"|GET_LOCK|RELEASE_LOCK|RELEASE_ALL_LOCKS|IS_USED_LOCK|IS_FREE_LOCK"
    r"|LAST_INSERT_ID|FOUND_ROWS|ROW_COUNT|CONNECTION_ID|NEXTVAL|SETVAL|LASTVAL"
    r"|NEXT\s+VALUE|PREVIOUS\s+VALUE)\b|(?<!@)@(?!@)[A-Za-z_`'\"]"
    r"|@@(?:SESSION\.|LOCAL\.)?(?:LAST_INSERT_ID|INSERT_ID|IDENTITY|WARNING_COUNT"
    r"|ERROR_COUNT|LAST_GTID|PSEUDO_THREAD_ID|TIMESTAMP|RAND_SEED1|RAND_SEED2)\b",
    re.IGNORECASE,
)
_LOCKING_CLAUSE = re.compile(
    r"\bFOR\s+(?:UPDATE|SHARE)\b|\bLOCK\s+IN\s+SHARE\s+MODE\b", re.IGNORECASE
)
_WRITES = re.compile(r"\b(INSERT|UPDATE|DELETE|REPLACE|MERGE|INTO)\b", re.IGNORECASE)


def _text(sql: object) -> str | None:
    if isinstance(sql, bytes):
        return sql.decode("utf-8", "replace")
    return sql if isinstance(sql, str) else None


def is_read(sql: object) -> bool:
    """``True`` for a statement that starts like a read (``SELECT``, ``SHOW`` ...) and
    writes nothing (not ``WITH ... INSERT``, not ``SELECT ... INTO``).

    Example::

        is_read("SELECT * FROM app_item")  # True
        is_read("INSERT INTO app_item VALUES (1)")  # False
    """
    text = _text(sql)
    return (
        text is not None
        and bool(_READ_START.match(text))
        and not _WRITES.search(_LOCKING_CLAUSE.sub(" ", text))
    )


def is_retryable_read(sql: object) -> bool:
    """``True`` for a statement that only reads and whose answer is session-independent,
    so that running it again on a new connection, outside a transaction, gives the same
    answer.

    Example::

        is_retryable_read("SELECT * FROM app_item WHERE id = %s")  # True
        is_retryable_read("SELECT LAST_INSERT_ID()")  # False: depends on the session
    """
    text = _text(sql)
    if text is None:
        return False
    return bool(_READ_START.match(text)) and not _NOT_IDEMPOTENT.search(
        _LOCKING_CLAUSE.sub(" ", text)
    )
