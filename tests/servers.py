"""What the private test servers (MariaDB, PostgreSQL, redis) share: a free port, a
process that dies with pytest, a clean stop, a self-signed certificate, the cleanup."""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
from pathlib import Path

STOP_TIMEOUT = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL the server if pytest dies without cleaning up."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT
) -> None:
    """Stop a server process: ``sig`` (its clean shutdown), SIGKILL after ``timeout`` s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def system_env() -> dict[str, str]:
    """This process's environment for a system program: without ``LD_PRELOAD``, which
    the Connector/Python C extension's session sets to its own newer OpenSSL (the
    system's ``openssl`` refuses to start with it)."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def make_certificate(directory: Path, owner: pwd.struct_passwd | None = None) -> Path | None:
    """A self-signed certificate and key (``server.crt``, ``server.key``, mode 0600) in
    ``directory``, for a private server's TLS; ``None`` without ``openssl`` (installed
    with Debian's postgresql and mariadb packages, through ssl-cert and libssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    key, cert = directory / "server.key", directory / "server.crt"
    subprocess.run(
        [
            openssl,
            "req",
            "-new",
            "-x509",
            "-days",
            "2",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-newkey",
            "rsa:2048",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        env=system_env(),
    )
    for path in (key, cert):
        os.chmod(path, 0o600)
        if owner is not None:
            os.chown(path, owner.pw_uid, owner.pw_gid)
    return cert


class PrivateServer:
    """A server process with a temporary directory of its own: ``stop()`` sends
    ``STOP_SIGNAL`` (its clean shutdown) and SIGKILLs after ``STOP_TIMEOUT`` seconds;
    ``close()`` also removes the directory (idempotent)."""

    STOP_SIGNAL: int = signal.SIGTERM
    STOP_TIMEOUT: float = STOP_TIMEOUT

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.tmpdir: Path | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Stop the process; keeps its directory (and data) for a start again."""
        proc = self.process
        if proc is None:
            return
        stop_process(proc, self.STOP_SIGNAL, self.STOP_TIMEOUT)
        self.process = None

    def close(self) -> None:
        """Final cleanup: stop the server and delete its temporary directory."""
        try:
            self.stop()
        finally:
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None
                self._removed()

    def _removed(self) -> None:
        """Called once the directory is gone (a next start initialises anew)."""
