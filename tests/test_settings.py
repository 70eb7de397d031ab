"""``DBKEEPALIVE`` validation and resolution."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test import override_settings

from django_dbkeepalive import guard
from django_dbkeepalive.conf import DEFAULTS, conf, find_problems

from .conftest import close_connections

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_apply_when_the_setting_is_absent():
    resolved = conf.for_alias("default")
    assert resolved.auto_guard is True
    assert resolved.margin == DEFAULTS["MARGIN"]
    assert resolved.wait_timeout is None
    assert resolved.retry_reads is True


def test_per_alias_overrides_win_over_the_top_level():
    value = {"MARGIN": 2, "DATABASES": {"default": {"MARGIN": 7, "RETRY_READS": False}}}
    with override_settings(DBKEEPALIVE=value):
        assert conf.for_alias("default").margin == 7
        assert conf.for_alias("default").retry_reads is False
        assert conf.for_alias("other").margin == 2


def test_unknown_key_names_the_key_and_suggests_the_closest():
    with override_settings(DBKEEPALIVE={"MARGN": 3}):
        with pytest.raises(ImproperlyConfigured) as caught:
            conf.validate()
    assert "'MARGN'" in str(caught.value)
    assert "Did you mean 'MARGIN'" in str(caught.value)


@pytest.mark.parametrize(
    "value, fragment",
    [
        ({"MARGIN": -1}, "MARGIN"),
        ({"MARGIN": "5"}, "MARGIN"),
        ({"PEEK_AFTER": True}, "PEEK_AFTER"),
        ({"WAIT_TIMEOUT": 0}, "WAIT_TIMEOUT"),
        ({"PING_AFTER": -0.5}, "PING_AFTER"),
        ({"AUTO_GUARD": "yes"}, "AUTO_GUARD"),
        ({"RETRY_READS": 1}, "RETRY_READS"),
        (
            {"DATABASES": {"default": {"MARGIN": -2}}},
            "DBKEEPALIVE['DATABASES']['default']['MARGIN'] is -2",
        ),
        ({"DATABASES": {"default": {"NOPE": 1}}}, "'NOPE'"),
        ({"DATABASES": ["default"]}, "DATABASES"),
        ({"DATABASES": {"replica": {"MARGIN": 1}}}, "'replica'"),
        (["MARGIN"], "must be a dict"),
    ],
)
def test_invalid_values_raise_improperly_configured_naming_key_and_allowed_values(value, fragment):
    with override_settings(DBKEEPALIVE=value):
        with pytest.raises(ImproperlyConfigured) as caught:
            conf.validate()
    message = str(caught.value)
    assert fragment in message
    assert (
        "must be" in message or "unknown key" in message or "not in settings.DATABASES" in message
    )


def test_every_problem_is_reported_at_once():
    problems = find_problems({"MARGIN": -1, "PEEK_AFTER": "x", "FOO": 1}, ["default"])
    assert sorted(p.key for p in problems) == ["FOO", "MARGIN", "PEEK_AFTER"]
    assert all(p.hint for p in problems)


def test_valid_settings_pass():
    value = {
        "AUTO_GUARD": False,
        "MARGIN": 0,
        "WAIT_TIMEOUT": 300,
        "PEEK_AFTER": 0.5,
        "PING_AFTER": None,
        "RETRY_READS": False,
        "DATABASES": {"default": {"WAIT_TIMEOUT": 60.5}},
    }
    with override_settings(DBKEEPALIVE=value):
        conf.validate()
        assert conf.for_alias("default").wait_timeout == 60.5


def test_invalid_setting_stops_django_at_startup_with_a_clear_message(tmp_path):
    (tmp_path / "bad_settings.py").write_text(
        "from testproject.settings import *\nDBKEEPALIVE = {'MARGIN': -3}\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "DJANGO_SETTINGS_MODULE": "bad_settings",
    }
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "(dbkeepalive.E003) DBKEEPALIVE['MARGIN'] is -3" in result.stderr


# --------------------------------------------------- values that would break later


@pytest.mark.parametrize("key", ["MARGIN", "WAIT_TIMEOUT", "PEEK_AFTER", "PING_AFTER"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 10**400, 31536001])
def test_seconds_must_be_finite_and_at_most_a_year(key, value):
    [problem] = find_problems({key: value}, ["default"])
    assert problem.id == "dbkeepalive.E003"
    assert problem.message.startswith(f"DBKEEPALIVE[{key!r}] is ")
    assert "31536000" in problem.message
    assert len(problem.message) < 250  # 10**400 is not printed in full


@pytest.mark.parametrize(
    "value, where",
    [
        ({"TCP_KEEPALIVE": 32768}, "DBKEEPALIVE['TCP_KEEPALIVE'] is 32768"),
        ({"TCP_KEEPALIVE": 10**10}, "DBKEEPALIVE['TCP_KEEPALIVE'] is 10000000000"),
        (
            {"CLIENT_TIMEOUTS": {"read_timeout": 10**10}},
            "DBKEEPALIVE['CLIENT_TIMEOUTS']['read_timeout'] is 10000000000",
        ),
        (
            {"DATABASES": {"default": {"CLIENT_TIMEOUTS": {"connect_timeout": 2147484}}}},
            "DBKEEPALIVE['DATABASES']['default']['CLIENT_TIMEOUTS']['connect_timeout'] is",
        ),
    ],
)
def test_socket_and_driver_values_must_fit_what_the_kernel_and_libmariadb_take(value, where):
    [problem] = find_problems(value, ["default"])
    assert problem.id == "dbkeepalive.E003"
    assert where in problem.message
    assert ("32767" if "TCP_KEEPALIVE" in where else "2147483") in problem.message


def test_a_typo_in_client_timeouts_suggests_the_key():
    [problem] = find_problems({"CLIENT_TIMEOUTS": {"connect_timout": 5}}, ["default"])
    assert problem.id == "dbkeepalive.E003"
    assert problem.message == "DBKEEPALIVE['CLIENT_TIMEOUTS'] has an unknown key 'connect_timout'."
    assert problem.hint.startswith("Did you mean 'connect_timeout'?")


@pytest.mark.parametrize(
    "value, message",
    [
        (5, "DBKEEPALIVE is an int; it must be a dict."),
        ("MARGIN", "DBKEEPALIVE is a str; it must be a dict."),
        ({"DATABASES": None}, "DBKEEPALIVE['DATABASES'] is None; it must be"),
        ({"DATABASES": {"default": 1}}, "DBKEEPALIVE['DATABASES']['default'] is an int;"),
        ({"DATABASES": {"default": {"NOPE": 1}}}, "DBKEEPALIVE['DATABASES']['default'] has an"),
    ],
)
def test_messages_name_types_and_paths_in_plain_python(value, message):
    [problem] = find_problems(value, ["default"])
    assert problem.message.startswith(message)


def test_largest_accepted_values_resolve_without_error():
    value = {
        "MARGIN": 31536000,
        "WAIT_TIMEOUT": 31536000,
        "PEEK_AFTER": 31536000,
        "PING_AFTER": 31536000.0,
        "TCP_KEEPALIVE": 32767,
        "CLIENT_TIMEOUTS": {"connect_timeout": 2147483, "read_timeout": 2147483},
    }
    assert find_problems(value, ["default"]) == []
    with override_settings(DBKEEPALIVE=value):
        resolved = conf.for_alias("default")
    assert resolved.wait_timeout == resolved.margin == 31536000.0
    assert resolved.tcp_keepalive == 32767
    assert resolved.client_timeouts == {"connect_timeout": 2147483, "read_timeout": 2147483}


def test_a_rejected_value_never_breaks_resolution_its_default_applies():
    # Only possible after startup (validate() refuses it there): the guard must go on.
    value = {
        "MARGIN": 10**400,
        "PING_AFTER": float("nan"),
        "TCP_KEEPALIVE": "60",
        "DATABASES": {"default": {"MARGIN": 3, "WAIT_TIMEOUT": float("inf")}},
    }
    with override_settings(DBKEEPALIVE=value):
        default = conf.for_alias("default")
        reader = conf.for_alias("reader")
    assert default.margin == 3 and default.wait_timeout is None
    assert default.ping_after == reader.ping_after == DEFAULTS["PING_AFTER"]
    assert reader.margin == DEFAULTS["MARGIN"]
    assert default.tcp_keepalive is None


@pytest.mark.django_db(transaction=True)
def test_the_largest_accepted_values_work_on_a_real_connection(db_options, caplog):
    # What libmariadb and Linux take at most: the connection opens, keepalive is set.
    db_options(connect_timeout=None, read_timeout=None, write_timeout=None)
    largest = dict.fromkeys(("connect_timeout", "read_timeout", "write_timeout"), 2147483)
    value = {"TCP_KEEPALIVE": 32767, "CLIENT_TIMEOUTS": largest}
    with (
        override_settings(DBKEEPALIVE=value),
        caplog.at_level(logging.WARNING, logger="django_dbkeepalive"),
    ):
        close_connections()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
        fd = guard.sockets.verified_fd(guard.state_of(connection))
        assert fd is not None
        sock = socket.socket(fileno=os.dup(fd))
        try:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 32767
        finally:
            sock.close()
        close_connections()
    assert "could not enable TCP keepalive" not in caplog.text
