"""``BaseKeepaliveCommand`` through a crawler-style command, in-process and as a process."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command, load_command_class
from django.core.management.base import BaseCommand
from django.db import IntegrityError, connection, transaction
from django.test import override_settings

from django_dbkeepalive import BaseKeepaliveCommand
from testproject.testapp.models import Item

from .conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

Raw = Callable[..., list[tuple[Any, ...]]]

MANAGE = Path(__file__).resolve().parent.parent / "testproject" / "manage.py"


def rows(raw: Raw) -> list[tuple[str, int]]:
    """(key, id of the server connection that wrote it) of every item, in order."""
    return [(r[0], int(r[1])) for r in raw("SELECT `key`, value FROM testapp_item ORDER BY id")]


def live_ids(server: Any) -> set[int]:
    return {int(p["id"]) for p in server.processlist()}


def gone(server: Any, ids: set[int]) -> bool:
    """Whether none of the server connections ``ids`` is open any more."""
    return wait_for(lambda: not ids & live_ids(server))


def aborted_clients(server: Any) -> int:
    """Connections the server saw end without a proper COM_QUIT from the client."""
    return int(server.query("SHOW GLOBAL STATUS LIKE 'Aborted_clients'")[0][1])


def _default_sigint() -> None:
    # A shell without job control starts background commands with SIGINT ignored, and
    # an ignored SIGINT is inherited: Python then installs no KeyboardInterrupt handler.
    # A terminal's Ctrl-C reaches a command with the default one: so must the tests'.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def manage(*args: str, driver: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DBK_DRIVER": driver, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(MANAGE), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


@override_settings(DBKEEPALIVE={"AUTO_GUARD": False})
def test_crawl_writes_every_row_across_pauses_past_wait_timeout(set_wait_timeout, raw, server):
    # AUTO_GUARD off: only the command's keepalive() stands between it and error 2006.
    set_wait_timeout(2)
    out = io.StringIO()
    call_command("crawl", "--count", "2", "--pause", "3", "--prefix", "c-", stdout=out)
    written = rows(raw)
    assert [key for key, _ in written] == ["c-0", "c-1"]
    assert out.getvalue().splitlines() == [f"wrote {k} on connection {t}" for k, t in written]
    assert written[0][1] != written[1][1]  # the first connection died in the pause
    assert connection.connection is None
    assert gone(server, {tid for _, tid in written})


def test_crawl_as_a_process_writes_every_row_and_closes_its_connection(
    set_wait_timeout, raw, server, driver
):
    set_wait_timeout(2)
    proc = manage("crawl", "--count", "2", "--pause", "3", "--prefix", "p-", driver=driver)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    written = rows(raw)
    assert [key for key, _ in written] == ["p-0", "p-1"]
    assert out.splitlines() == [f"wrote {key} on connection {tid}" for key, tid in written]
    assert gone(server, {tid for _, tid in written})


def test_connections_are_closed_when_handle_raises(raw, server):
    raw("INSERT INTO testapp_item (`key`, value, created) VALUES ('dup-1', 0, NOW())")
    with pytest.raises(IntegrityError):
        call_command("crawl", "--count", "3", "--prefix", "dup-", stdout=io.StringIO())
    [(_, tid)] = [row for row in rows(raw) if row[0] == "dup-0"]
    assert connection.connection is None
    assert gone(server, {tid})


def write_own_connection_id(key: str) -> None:
    connection.ensure_connection()
    Item.objects.create(key=key, value=connection.connection.thread_id())


class Interrupted(BaseKeepaliveCommand):
    """Writes a row, then gets Ctrl-C."""

    def handle(self, *args: Any, **options: Any) -> None:
        write_own_connection_id("keepalive")
        raise KeyboardInterrupt


class PlainInterrupted(BaseCommand):
    """The same on Django's plain ``BaseCommand``."""

    def handle(self, *args: Any, **options: Any) -> None:
        write_own_connection_id("plain")
        raise KeyboardInterrupt


class Terminated(BaseKeepaliveCommand):
    """Writes a row, then gets SIGTERM; its own cleanup blocks SIGTERM, so the signal the
    command sends itself again stays pending instead of ending the test run."""

    def handle(self, *args: Any, **options: Any) -> None:
        write_own_connection_id("terminated")
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # (the handler raises as soon as the signal is handled)
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def test_sigterm_in_process_closes_the_connection_then_sends_sigterm_again(raw, server):
    # As a process it dies of that second SIGTERM (see the SIGTERM test below); here it
    # is blocked, so it stays pending and the command's exception gets out.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    try:
        started = time.monotonic()
        with pytest.raises(BaseException) as caught:
            call_command(Terminated())
        assert type(caught.value).__name__ == "_Terminated"
        assert time.monotonic() - started < 4  # the pause did not run to its end
        assert signal.SIGTERM in signal.sigpending()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # its handler is gone
        assert connection.connection is None
        [(_, tid)] = rows(raw)
        assert gone(server, {tid})
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # drops the pending one
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_connections_are_closed_on_keyboard_interrupt_in_process(raw, server):
    with pytest.raises(KeyboardInterrupt):
        call_command(Interrupted())
    assert connection.connection is None
    [(_, tid)] = rows(raw)
    assert gone(server, {tid})


def test_a_plain_command_interrupted_in_process_leaves_its_connection_open(raw, server):
    # The control for the test above: call_command() itself closes nothing.
    try:
        with pytest.raises(KeyboardInterrupt):
            call_command(PlainInterrupted())
        [(_, tid)] = rows(raw)
        assert connection.connection is not None
        assert tid in live_ids(server)
    finally:
        connection.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_pause_closes_the_connection_cleanly(raw, server, driver, signum):
    proc = manage("crawl", "--count", "3", "--pause", "30", "--prefix", "i-", driver=driver)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed after the first write, before the pause
        assert line.startswith("wrote i-0 on connection "), line + proc.stderr.read()
        tid = int(line.rsplit(" ", 1)[1])
        assert tid in live_ids(server)
        aborted = aborted_clients(server)
        time.sleep(0.2)  # well inside the 30 s pause
        started = time.monotonic()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - started < 5  # it did not sit out the pause
    if signum == signal.SIGINT:
        assert proc.returncode != 0 and "KeyboardInterrupt" in err
    else:  # it still dies of SIGTERM, as a supervisor expects, after closing
        assert proc.returncode == -signal.SIGTERM, err
    assert [key for key, _ in rows(raw)] == ["i-0"]
    assert gone(server, {tid})
    # Closed with COM_QUIT, not dropped by the kernel when the process died (a SIGKILLed
    # crawl, measured here, bumps Aborted_clients by one).
    assert aborted_clients(server) == aborted


def test_call_command_inside_atomic_leaves_the_callers_transaction_alone(raw):
    with transaction.atomic():
        Item.objects.create(key="outer")
        call_command("crawl", "--count", "1", "--prefix", "inner-", stdout=io.StringIO())
        Item.objects.create(key="after")
    assert [key for key, _ in rows(raw)] == ["outer", "inner-0", "after"]


def test_the_commands_own_options_are_untouched():
    def options(command: BaseCommand) -> set[str]:
        parser = command.create_parser("manage.py", "x")
        return {s for action in parser._actions for s in action.option_strings}

    crawl = load_command_class("testproject.testapp", "crawl")
    assert isinstance(crawl, BaseKeepaliveCommand)
    assert options(crawl) - options(BaseCommand()) == {"--count", "--pause", "--prefix"}
