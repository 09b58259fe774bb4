"""A PostgreSQL server of the test's own, for outage tests that stop and restart the database.

``initdb`` refuses to run as root, so when the tests run as root every PostgreSQL binary is run
as the ``postgres`` OS user (``runuser -u postgres --``) on a data directory owned by that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.services import free_port

_BIN_GLOB = "/usr/lib/postgresql/*/bin"
_OS_USER = "postgres"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _missing(message: str) -> None:
    """Skip the test, or fail it when CI is set."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb, pg_ctl and postgres."""

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", Path(path).parent.name))

    for candidate in sorted(glob.glob(_BIN_GLOB), key=version, reverse=True):
        folder = Path(candidate)
        if all((folder / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


class PrivatePostgres:
    """A PostgreSQL cluster on a free loopback port, trust authentication, in a temp dir.

    ``start()`` runs ``initdb`` the first time; ``stop()`` stops the server (``pg_ctl stop -m
    fast`` by default) and ``start()`` again brings it back on the same port with the same data.
    ``cleanup()`` stops it (immediately) and deletes everything.
    """

    def __init__(self) -> None:
        bin_dir = _find_bin_dir()
        if bin_dir is None:
            _missing(f"PostgreSQL server binaries not found under {_BIN_GLOB}")
        assert bin_dir is not None
        self.bin_dir = bin_dir
        self.as_root = os.geteuid() == 0
        self._owner: pwd.struct_passwd | None = None
        if self.as_root:
            if shutil.which("runuser") is None:
                _missing("runuser is not installed (needed to run initdb as 'postgres')")
            try:
                self._owner = pwd.getpwnam(_OS_USER)
            except KeyError:
                _missing(f"no '{_OS_USER}' OS user to run initdb and pg_ctl as")
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="drm-pg-"))
        self.data = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self._initialised = False
        self.running = False
        if self._owner is not None:
            os.chown(self.root, self._owner.pw_uid, self._owner.pw_gid)
        # The postgres user must be able to enter the directory (mkdtemp makes it 0700).
        os.chmod(self.root, 0o755)  # noqa: S103  (a test server's own temp dir)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self.as_root:
            command = ["runuser", "-u", _OS_USER, "--", *command]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[:2])} failed ({result.returncode}):\n{result.stdout}\n"
                f"{result.stderr}\n{self.log_tail()}"
            )
        return result

    def _initdb(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                "\n# drm-taskiq outage tests\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
                "max_connections = 100\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "shared_buffers = 32MB\n"
            )
        self._initialised = True

    def start(self, timeout: float = 30) -> None:
        """Start the server (running ``initdb`` first if needed); return when it accepts TCP."""
        if not self._initialised:
            self._initdb()
        self._run(
            "pg_ctl", "start", "-D", str(self.data), "-l", str(self.logfile), "-w",
            "-t", str(int(timeout)),
            timeout=timeout + 10,
        )  # fmt: skip
        self.running = True
        deadline = time.monotonic() + timeout
        while not _reachable("127.0.0.1", self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"private PostgreSQL did not start\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``pg_ctl stop -m fast``; ``immediate`` is a crash)."""
        if not self.running:
            return
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "30")
        self.running = False

    def cleanup(self) -> None:
        """Stop the server if it runs and delete its directory."""
        try:
            if self.running or (self.data / "postmaster.pid").exists():
                try:
                    self.running = True
                    self.stop("immediate")
                except (RuntimeError, subprocess.TimeoutExpired):
                    self._kill_postmaster()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        pid_file = self.data / "postmaster.pid"
        try:
            pid = int(pid_file.read_text(encoding="utf-8").splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.running = False

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.logfile.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
