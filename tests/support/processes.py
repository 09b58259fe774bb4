"""Real drm-taskiq processes for the tests that need them (acceptance, outage).

:class:`Proc` starts one command as a process-group leader with its output in log files,
:func:`process_env` builds the environment of a process configured like a test's settings, and
:func:`wait_event` waits for a structlog event in a process's output.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from drm_taskiq.settings import Settings
from tests.support.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent
LOG_TAIL_LINES = 80

# Variables a developer's shell may set that would leak into the processes under test.
_OWN_NAMES = ("REDIS_URL", "DATABASE_URL", "WORKER_CONCURRENCY", "ACCEPT_TICK_CRON")


def binary(name: str) -> str:
    """The path of a console script installed next to this Python (skip the test if absent)."""
    path = BIN_DIR / name
    if not path.exists():
        pytest.skip(f"{name} not found next to {sys.executable}")
    return str(path)


def process_env(settings: Settings, plugin_spec: str, **extra: str | int | float) -> dict[str, str]:
    """The environment of a process: the test's servers, schema, key prefix, lease and ledger
    timings, and the plugin ``plugin_spec`` (unsigned: test plugins are not signed); ``extra``
    overrides any variable."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("DRM_") and key not in _OWN_NAMES
    }
    python_path = [str(REPO_ROOT)]
    if os.environ.get("PYTHONPATH"):
        python_path.append(os.environ["PYTHONPATH"])
    env.update(
        PYTHONPATH=os.pathsep.join(python_path),
        PYTHONUNBUFFERED="1",
        REDIS_URL=settings.redis_url,
        DATABASE_URL=settings.database_url,
        WORKER_CONCURRENCY=str(settings.worker_concurrency),
        DRM_DB_SCHEMA=settings.db_schema,
        DRM_KEY_PREFIX=settings.key_prefix,
        DRM_PLUGINS=plugin_spec,
        DRM_ENTRY_POINTS="false",
        DRM_ALLOW_UNSIGNED_PLUGINS="true",
        DRM_LEASE_MS=str(settings.lease_ms),
        DRM_STALLED_INTERVAL_MS=str(settings.stalled_interval_ms),
        DRM_LEDGER_FLUSH_MS=str(settings.ledger_flush_ms),
        DRM_LOG_FORMAT="json",
    )
    env.update({key: str(value) for key, value in extra.items()})
    return env


class Proc:
    """One started process (a process-group leader) and its log files."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.argv = argv
        self.stdout_path = cwd / f"{name}.stdout"
        self.stderr_path = cwd / f"{name}.stderr"
        self._stdout = self.stdout_path.open("wb")
        self._stderr = self.stderr_path.open("wb")
        self.popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text("utf-8", errors="replace")

    def output(self) -> str:
        """stderr, then stdout."""
        return self.stderr() + self.stdout()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The structlog JSON events written so far, optionally only those named ``name``."""
        found = []
        for raw in self.output().splitlines():
            line = raw.strip()
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                found.append(event)
        return found

    def send(self, signum: int) -> None:
        """Send ``signum`` to the main process only."""
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def killpg(self, signum: int = signal.SIGKILL) -> None:
        """Send ``signum`` to the whole process group (the main process and its children)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def close(self) -> None:
        """Kill the group, reap the main process, close the log files."""
        self.killpg(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored
            self.popen.wait(timeout=10)
        self._stdout.close()
        self._stderr.close()

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        parts = []
        for label, text in (("stdout", self.stdout()), ("stderr", self.stderr())):
            kept = text.splitlines()[-lines:]
            parts.append(f"--- {self.name} {label} (last {len(kept)} lines) ---")
            parts.extend(kept)
        return "\n".join(parts)


async def wait_event(
    proc: Proc, event: str, timeout: float = 30.0, **fields: Any
) -> dict[str, Any]:
    """Wait until ``proc`` logged ``event`` (with ``fields``); fail if it exits first."""

    def found() -> dict[str, Any] | None:
        for item in proc.events(event):
            if all(item.get(key) == value for key, value in fields.items()):
                return item
        return None

    return await wait_until(found, timeout=timeout, procs=[proc], what=f"{proc.name}: {event}")
