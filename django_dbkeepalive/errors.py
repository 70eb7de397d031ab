"""The errors django-dbkeepalive raises, and the public predicate for a lost connection.

:class:`ConnectionLostInTransaction` is what the guard raises instead of a bare 2006 or
2013 when a connection was lost inside a transaction. :func:`is_disconnect` tells any
driver error that means a lost connection (it asks the guard's one predicate).
Must never import at module level: the guard (it raises these errors; this module is
below it).
"""

from __future__ import annotations

from django.db import OperationalError

__all__ = ["ConnectionLostInTransaction", "is_disconnect"]


def is_disconnect(exc: BaseException) -> bool:
    """``True`` when ``exc`` (or its ``__cause__``) means the connection is lost: a MySQL
    error code such as 2006, 2013 or 4031 (never the text, which differs by driver), a
    PostgreSQL SQLSTATE such as ``57P01``, or the driver's own "already closed" error.

    Example::

        from django_dbkeepalive import is_disconnect

        try:
            Item.objects.create(name="x")
        except OperationalError as exc:
            if is_disconnect(exc):
                ...  # the server closed the connection; the next statement reconnects
    """
    from .guard.families import classify

    return classify(exc) is not None


class ConnectionLostInTransaction(OperationalError):
    """The connection was lost (or idled out) inside a transaction.

    The server has rolled the transaction back, so nothing the block wrote since it
    began is saved. The guard never reconnects inside a transaction, because the rest
    of the block would then silently run outside it. Leave the atomic block (the
    connection works again after it) and run the whole unit of work again.

    Example::

        from django.db import transaction
        from django_dbkeepalive import ConnectionLostInTransaction

        try:
            with transaction.atomic():
                order.save()
                slow_call()  # longer than the server's wait_timeout
                order.lines.create(...)
        except ConnectionLostInTransaction:
            ...  # nothing was committed: retry the whole block, or report it
    """

    def __init__(
        self,
        message: str,
        *,
        alias: str = "default",
        idle: float | None = None,
        limit: float | None = None,
        code: int | None = None,
        cause: str | None = None,
    ) -> None:
        super().__init__(code if code is not None else 2013, message)
        self.alias = alias
        self.idle = idle
        self.limit = limit
        #: What happened, as a :class:`Cause` kind (``"killed"``, ``"idle_timeout"``,
        #: ``"timeout"``, ``"too_large"`` ...), or ``None`` when it is not known.
        self.cause = cause
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        # Picklable with its keyword-only arguments (Celery stores a task's exception in
        # the result backend; multiprocessing sends it to the parent).
        return (
            _rebuild_lost_in_transaction,
            (self.message, self.alias, self.idle, self.limit, self.args[0], self.cause),
            self.__dict__,
        )


def _rebuild_lost_in_transaction(
    message: str,
    alias: str,
    idle: float | None,
    limit: float | None,
    code: int | None,
    cause: str | None,
) -> ConnectionLostInTransaction:
    return ConnectionLostInTransaction(
        message, alias=alias, idle=idle, limit=limit, code=code, cause=cause
    )
