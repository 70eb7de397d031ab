"""What a failed connect of the checks means, and the message for it: ``W005`` when the
server could not be reached, ``E006`` when the alias's settings, credentials, database
name or ``init_command`` are at fault, ``I003`` when something other than the server or
the settings forbade the connect (Django's test framework). Never shows a password.
Must never import: :mod:`.server`, :mod:`.configuration`.
"""

from __future__ import annotations

from collections.abc import Iterator

from django.core import checks
from django.db import connections

from ..conf import TIMEOUT_NAMES, type_text
from ..guard import classify
from .aliases import backend_error, driver_name, is_real, options_of, settings_dict_of
from .registry import message
from .text import describe_server, error_text, mask_secrets

#: Error codes that mean the server was not reached, or not usable right now, on top of
#: what :func:`~django_dbkeepalive.errors.classify` counts as a lost connection.
_UNREACHABLE_CODES = frozenset(
    {
        1040,  # ER_CON_COUNT_ERROR: too many connections
        2001,  # CR_SOCKET_CREATE_ERROR
        2004,  # CR_IPSOCK_ERROR
        2005,  # CR_UNKNOWN_HOST
        2012,  # CR_SERVER_HANDSHAKE_ERR
    }
)
_ACCESS_DENIED_CODES = frozenset(
    {
        1044,  # ER_DBACCESS_DENIED_ERROR
        1045,  # ER_ACCESS_DENIED_ERROR
        1129,  # ER_HOST_IS_BLOCKED
        1130,  # ER_HOST_NOT_PRIVILEGED
        1251,  # ER_NOT_SUPPORTED_AUTH_MODE
        1698,  # ER_ACCESS_DENIED_NO_PASSWORD_ERROR
        1862,  # ER_MUST_CHANGE_PASSWORD_LOGIN
    }
)
_UNKNOWN_DATABASE = 1049
#: Refusals that come from the calling code's context, not from the server or the alias's
#: settings: Django's test cases forbid connecting to aliases a test did not declare
#: (``django.test.testcases.DatabaseOperationForbidden``), and Django forbids a blocking
#: connect from an event loop's thread. Matched by class name, so that the checks never
#: import ``django.test``.
_NOT_CHECKED_ERRORS = frozenset({"DatabaseOperationForbidden", "SynchronousOnlyOperation"})
#: pytest-django's database blocker (a test without the ``django_db`` mark) raises a plain
#: ``RuntimeError`` with this message.
_PYTEST_DJANGO_BLOCKED = "Database access not allowed"


def _forbidden_by_context(exc: BaseException) -> bool:
    return type(exc).__name__ in _NOT_CHECKED_ERRORS or (
        isinstance(exc, RuntimeError) and str(exc).startswith(_PYTEST_DJANGO_BLOCKED)
    )


def _chain(exc: BaseException) -> Iterator[BaseException]:
    current: BaseException | None = exc
    for _ in range(6):
        if current is None:
            return
        yield current
        current = current.__cause__


def _code(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    return None


def connect_error_kind(exc: BaseException) -> str:
    """What an error from connecting to check a server means:

    - ``"unreachable"``: the network or the server (refused, unknown host, timed out,
      lost during the handshake, too many connections): try again later;
    - ``"access_denied"``: the server refused ``USER``/``PASSWORD`` (1045, 1044, 1130...);
    - ``"unknown_database"``: the server has no database ``NAME`` (1049);
    - ``"sql"``: the server rejected a statement run while connecting (``init_command``);
    - ``"configuration"``: the alias's settings are wrong before anything reaches the
      server (a ``TypeError`` from bad ``OPTIONS`` or ``CONN_MAX_AGE``, a client error);
    - ``"not_checked"``: the caller's context forbade the connect (a Django test that did
      not declare the alias, a pytest test without the ``django_db`` mark, an event
      loop's thread): nothing is known about the server.
    """
    if any(_forbidden_by_context(current) for current in _chain(exc)):
        return "not_checked"
    if classify(exc) is not None:
        return "unreachable"
    for current in _chain(exc):
        code = _code(current)
        if code in _UNREACHABLE_CODES:
            return "unreachable"
        if code in _ACCESS_DENIED_CODES:
            return "access_denied"
        if code == _UNKNOWN_DATABASE:
            return "unknown_database"
        if code is not None and code > 0 and not 2000 <= code < 3000:
            return "sql"  # a server error (client errors are 2000-2999)
        if isinstance(current, OSError):  # TimeoutError, socket errors let through
            return "unreachable"
    return "configuration"


def unreachable_message(alias: str, exc: BaseException) -> checks.CheckMessage:
    """``W005``: the server of ``alias`` could not be reached; never shows the password."""
    settings_dict = settings_dict_of(alias)
    error = error_text(alias, exc)
    found = classify(exc)
    lost = (
        " The connection was accepted, then lost or not answered in time during the "
        "login: a hung or overloaded server, or a proxy or load balancer whose server "
        "is down."
        if found is not None and found.kind == "lost"
        else ""
    )
    return message(
        "dbkeepalive.W005",
        f"Database {alias!r}: could not connect to the server at "
        f"{describe_server(settings_dict)} to check its timeouts ({error}).{lost}",
        "Check that the server is running and reachable from here and that HOST and PORT "
        f"are right; then run `manage.py dbkeepalive --database {alias}` again.",
    )


def _configuration_fix(alias: str, exc: BaseException) -> str:
    settings_dict = settings_dict_of(alias)
    options = options_of(settings_dict)
    text = str(exc)
    fixes: list[str] = []
    max_age = settings_dict.get("CONN_MAX_AGE")
    if max_age is not None and not is_real(max_age):
        fixes.append(
            f"DATABASES[{alias!r}]['CONN_MAX_AGE'] is {max_age!r} ({type_text(max_age)}): "
            "it must be a number of seconds (0: close connections at the end of each "
            "request) or None (no limit)."
        )
    named = [str(key) for key in options if f"'{key}'" in text]
    backend_loaded = backend_error(alias) is None
    driver = driver_name(connections[alias]) if backend_loaded else "the driver"
    if named:
        fixes.append(
            f"DATABASES[{alias!r}]['OPTIONS'] has {', '.join(map(repr, named))}, which "
            f"{driver} does not accept as it is: fix or remove it."
        )
    if driver == "mysqlclient":
        floats = [n for n in TIMEOUT_NAMES if isinstance(options.get(n), float)]
        if floats:
            fixes.append(
                "mysqlclient takes whole seconds only: "
                + ", ".join(f"{n} is {options[n]!r}" for n in floats)
                + f" in DATABASES[{alias!r}]['OPTIONS']."
            )
    if not fixes:
        fixes.append(
            f"Check DATABASES[{alias!r}] (OPTIONS, CONN_MAX_AGE and the other connection "
            f"settings) against what Django and {driver} accept."
        )
    return " ".join(fixes)


def connect_error_message(alias: str, exc: BaseException) -> checks.CheckMessage:
    """The message for an error from connecting to check ``alias``'s server:
    ``W005`` when the server could not be reached, ``E006`` when the alias's settings,
    credentials, database name or ``init_command`` are at fault, ``I003`` when the
    caller's context forbade the connect. Never shows the password."""
    kind = connect_error_kind(exc)
    if kind == "unreachable":
        return unreachable_message(alias, exc)
    settings_dict = settings_dict_of(alias)
    server = describe_server(settings_dict)
    error = error_text(alias, exc)
    again = f" Then run `manage.py dbkeepalive --database {alias}` again."
    if kind == "not_checked":
        return message(
            "dbkeepalive.I003",
            f"Database {alias!r}: its server at {server} was not checked: the calling "
            f"code's context forbade connecting to it ({error}). Nothing is known about "
            "its timeouts; this is not a problem with the server or the settings.",
            "Run `manage.py check --database "
            f"{alias}` or `manage.py dbkeepalive --database {alias}` outside that context "
            "(in a test, declare the alias in the test's databases).",
        )
    if kind == "access_denied":
        user = settings_dict.get("USER")
        msg = f"Database {alias!r}: the server at {server} refused the login ({error})."
        hint = (
            f"Check DATABASES[{alias!r}]['USER'] ({user!r}) and DATABASES[{alias!r}]"
            "['PASSWORD'] (or OPTIONS 'user'/'password'/'read_default_file' if they are "
            f"set there), and that this user may connect from this host (GRANT ... TO "
            f"{user!r}@'host')."
        )
    elif kind == "unknown_database":
        name = settings_dict.get("NAME")
        msg = f"Database {alias!r}: the server at {server} has no database {name!r} ({error})."
        hint = (
            f"Check DATABASES[{alias!r}]['NAME'] ({name!r}), or create the database on the "
            "server (CREATE DATABASE ...; migrate does not create it)."
        )
    elif kind == "sql":
        init = options_of(settings_dict).get("init_command")
        msg = (
            f"Database {alias!r}: the server at {server} rejected a statement run while "
            f"connecting ({error}), so every new connection of this alias fails."
        )
        if init:
            shown = mask_secrets(repr(init), settings_dict)
            hint = f"Fix DATABASES[{alias!r}]['OPTIONS']['init_command'] ({shown})."
        else:
            hint = (
                f"Check DATABASES[{alias!r}]['OPTIONS'] (isolation_level, charset, sql_mode) "
                "and the user's privileges."
            )
    else:
        msg = (
            f"Database {alias!r}: connecting to the server at {server} fails because of "
            f"the alias's settings, not the network ({error})."
        )
        hint = _configuration_fix(alias, exc)
    return message("dbkeepalive.E006", msg, hint + again)
