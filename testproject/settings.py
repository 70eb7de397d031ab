"""Settings for the test project; the database comes from ``DBK_*`` environment variables.

DBK_DB_HOST, DBK_DB_PORT, DBK_DB_USER, DBK_DB_PASSWORD, DBK_DB_NAME: the server.
DBK_DB_READER_USER, DBK_DB_READER_PASSWORD: the "reader" alias's user (default: the same).
DBK_DRIVER: ``mysqlclient`` (default), ``pymysql``, ``connector`` (MySQL Connector/Python,
``ENGINE = "mysql.connector.django"``, pure Python) or ``connector-cext`` (the same with
its C extension, ``use_pure=False``).
DBK_APP: ``1`` (default) installs django_dbkeepalive, ``0`` shows plain Django.
DBK_CONN_MAX_AGE: seconds, or ``None`` for unlimited persistent connections (default 0).
DBK_BACKEND: ``patch`` (default: Django's MySQL ENGINE, the guard patches Django) or
``engine`` (``django_dbkeepalive.backends.mysql`` and ``DBKEEPALIVE["PATCH"] = False``).
"""

from __future__ import annotations

import os

from django.core.exceptions import ImproperlyConfigured

DRIVER = os.environ.get("DBK_DRIVER", "mysqlclient")
if DRIVER == "pymysql":
    # Must run before anything imports django.db.backends.mysql (it imports MySQLdb).
    import pymysql

    pymysql.install_as_MySQLdb()
elif DRIVER not in ("mysqlclient", "connector", "connector-cext"):
    raise ImproperlyConfigured(
        "DBK_DRIVER must be 'mysqlclient', 'pymysql', 'connector' or 'connector-cext',"
        f" not {DRIVER!r}"
    )
CONNECTOR = DRIVER.startswith("connector")

APP_ENABLED = os.environ.get("DBK_APP", "1") != "0"
BACKEND = os.environ.get("DBK_BACKEND", "patch")
if BACKEND not in ("patch", "engine"):
    raise ImproperlyConfigured(f"DBK_BACKEND must be 'patch' or 'engine', not {BACKEND!r}")
if CONNECTOR and BACKEND == "engine":
    raise ImproperlyConfigured("DBK_BACKEND=engine has no Connector/Python ENGINE")
MYSQL_ENGINE = (
    "mysql.connector.django"
    if CONNECTOR
    else "django_dbkeepalive.backends.mysql"
    if BACKEND == "engine"
    else "django.db.backends.mysql"
)
# Connector/Python: pure Python or its C extension, chosen explicitly (its default is the
# C extension when it loads, else pure Python, silently).
DRIVER_OPTIONS = {"use_pure": DRIVER == "connector"} if CONNECTOR else {}


def _client_timeouts(seconds: int) -> dict[str, int]:
    """read_timeout and write_timeout, unless the driver refuses them (Connector/Python
    before 9.x does not know them and refuses to connect)."""
    if CONNECTOR:
        from mysql.connector.constants import DEFAULT_CONFIGURATION

        if "read_timeout" not in DEFAULT_CONFIGURATION:
            return {}
    return {"read_timeout": seconds, "write_timeout": seconds}


def _conn_max_age() -> int | None:
    value = os.environ.get("DBK_CONN_MAX_AGE", "0")
    return None if value.lower() == "none" else int(value)


SECRET_KEY = "dbkeepalive-testproject-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "testproject.testapp",
]
if APP_ENABLED:
    INSTALLED_APPS.append("django_dbkeepalive")

MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "testproject.urls"
WSGI_APPLICATION = "testproject.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": MYSQL_ENGINE,
        "HOST": os.environ.get("DBK_DB_HOST", "127.0.0.1"),
        "PORT": int(os.environ.get("DBK_DB_PORT", "3306")),
        "USER": os.environ.get("DBK_DB_USER", "root"),
        "PASSWORD": os.environ.get("DBK_DB_PASSWORD", ""),
        "NAME": os.environ.get("DBK_DB_NAME", "dbkeepalive"),
        "CONN_MAX_AGE": _conn_max_age(),
        "OPTIONS": {
            "charset": "utf8mb4",
            "connect_timeout": 5,
            **_client_timeouts(30),
            **DRIVER_OPTIONS,
        },
        # CHARSET: MariaDB's default server charset is latin1.
        "TEST": {"NAME": "test_dbkeepalive", "CHARSET": "utf8mb4"},
    },
    # The same database through a second, read-only user with its own client options
    # (tests of several aliases). In tests it mirrors default's test database.
    "reader": {
        "ENGINE": MYSQL_ENGINE,
        "HOST": os.environ.get("DBK_DB_HOST", "127.0.0.1"),
        "PORT": int(os.environ.get("DBK_DB_PORT", "3306")),
        "USER": os.environ.get("DBK_DB_READER_USER") or os.environ.get("DBK_DB_USER", "root"),
        "PASSWORD": (
            os.environ.get("DBK_DB_READER_PASSWORD") or os.environ.get("DBK_DB_PASSWORD", "")
        ),
        "NAME": os.environ.get("DBK_DB_NAME", "dbkeepalive"),
        "CONN_MAX_AGE": _conn_max_age(),
        "OPTIONS": {
            "charset": "utf8mb4",
            "connect_timeout": 3,
            **_client_timeouts(20),
            "isolation_level": "read committed",
            **DRIVER_OPTIONS,
        },
        "TEST": {"MIRROR": "default"},
    },
}

# Per-alias guard settings: the reader gets its own margin.
DBKEEPALIVE: dict[str, object] = {"DATABASES": {"reader": {"MARGIN": 2.0}}}
if BACKEND == "engine":
    DBKEEPALIVE["PATCH"] = False

# Celery (testproject/celery.py): the tests start a private redis-server and pass it in
# DBK_CELERY_BROKER; without it the broker is in-memory and nothing connects anywhere.
CELERY_BROKER_URL = os.environ.get("DBK_CELERY_BROKER") or "memory://"
CELERY_RESULT_BACKEND = os.environ.get("DBK_CELERY_BROKER") or "cache+memory://"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
if os.environ.get("DBK_CELERY_DB_REUSE_MAX"):
    CELERY_DB_REUSE_MAX = int(os.environ["DBK_CELERY_DB_REUSE_MAX"])

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"django_dbkeepalive": {"handlers": ["console"], "level": "INFO"}},
}
