"""Settings of the application servers the load runs start (:mod:`benchmarks.load`).

The test project's settings (database from ``DBK_DB_*``, driver from ``DBK_DRIVER``,
``DBK_APP`` = 0 for plain Django, ``DBK_CONN_MAX_AGE``), with the load views of
:mod:`benchmarks.loadapp`, its error-reporting middleware and quieter logging.
"""

from __future__ import annotations

from testproject.settings import *  # noqa: F403
from testproject.settings import DATABASES, LOGGING

ROOT_URLCONF = "benchmarks.loadapp"
# CommonMiddleware sets Content-Length, without which uWSGI's HTTP/1.1 keep-alive socket
# cannot delimit a response (gunicorn and uvicorn fall back to chunked encoding).
MIDDLEWARE = ["django.middleware.common.CommonMiddleware", "benchmarks.loadapp.ErrorReport"]
# Only the alias the views use (the "reader" alias needs a user the load server lacks).
DATABASES = {"default": DATABASES["default"]}
DBKEEPALIVE: dict[str, object] = {}  # the defaults (the test project's names "reader")
LOGGING = {
    **LOGGING,
    "loggers": {
        "django_dbkeepalive": {"handlers": ["console"], "level": "WARNING"},
        # The failures are counted by the load driver from the HTTP 500 bodies.
        "django.request": {"handlers": ["console"], "level": "CRITICAL"},
    },
}
