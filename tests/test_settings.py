"""``DBKEEPALIVE`` validation and resolution."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from django_dbkeepalive.conf import DEFAULTS, conf, find_problems

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
        ({"DATABASES": {"default": {"MARGIN": -2}}}, "DATABASES['default']['MARGIN']"),
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
    assert "DBKEEPALIVE[MARGIN] is -3" in result.stderr
