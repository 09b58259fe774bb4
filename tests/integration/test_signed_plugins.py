"""The signed example plugin: it verifies with the committed key; a one-byte change is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

import drm_taskiq_example
from drm_taskiq import signing
from drm_taskiq.errors import PluginLoadError
from drm_taskiq.jobs import JobScheduler
from drm_taskiq.plugins import discover_plugins
from drm_taskiq.queue_broker import DrmBroker
from drm_taskiq.settings import Settings, get_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
PUBLIC_KEY_FILE = REPO_ROOT / "config" / "example-plugin-key.pub"
EXAMPLE_DIR = Path(drm_taskiq_example.__file__).resolve().parent
EXAMPLE_SPEC = "drm_taskiq_example.plugin:plugin"
SIGNED_FILES = ("__init__.py", "plugin.py", "schema.sql")


@pytest.fixture
def example_key() -> bytes:
    """The example plugin's public key, as committed in config/example-plugin-key.pub."""
    return signing.parse_public_key(PUBLIC_KEY_FILE.read_text("ascii"))


@pytest.fixture
def example_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A copy of the signed example package under a new name on sys.path; yields the name."""
    name = f"example_copy_{uuid.uuid4().hex[:12]}"
    shutil.copytree(EXAMPLE_DIR, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [module for module in sys.modules if module.split(".")[0] == name]:
        del sys.modules[module]


def _cli(*args: str, python_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRM_")}
    env["DRM_LOG_LEVEL"] = "WARNING"
    if python_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(python_path), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "drm_taskiq.cli", "plugins", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_example_manifest_lists_every_file_and_its_identity(example_key: bytes) -> None:
    """The committed manifest covers the example's files and names plugin example 0.1.0."""
    verified = signing.verify_package(EXAMPLE_DIR, [example_key])
    assert sorted(verified.manifest.files) == sorted(SIGNED_FILES)
    assert (verified.manifest.id, verified.manifest.version) == ("example", "0.1.0")
    assert verified.key_id == signing.key_id(example_key)


def test_example_loads_from_settings_with_the_committed_key(example_key: bytes) -> None:
    """DRM_PLUGINS naming the example loads it when its key is trusted."""
    plugins = discover_plugins((EXAMPLE_SPEC,), use_entry_points=False, trusted_keys=(example_key,))
    assert [plugin.id for plugin in plugins] == ["example"]


def test_example_entry_point_is_verified(example_key: bytes) -> None:
    """The example's entry point loads with its key trusted and is refused and skipped without."""
    errors: list[str] = []
    plugins = discover_plugins(trusted_keys=(example_key,), errors=errors)
    assert "example" in [plugin.id for plugin in plugins]
    assert errors == []
    with capture_logs() as logs:
        plugins = discover_plugins(trusted_keys=(), allow_unsigned=False, errors=errors)
    assert "example" not in [plugin.id for plugin in plugins]
    assert "example" in errors
    refused = [entry for entry in logs if entry["event"] == "plugin_refused"]
    assert refused[0]["plugin"] == "example"
    assert "no key is trusted" in refused[0]["reason"]


def test_unchanged_copy_of_the_example_verifies(example_copy: str, example_key: bytes) -> None:
    """A byte-for-byte copy of the example package (under another name) still verifies."""
    spec = f"{example_copy}.plugin:plugin"
    plugins = discover_plugins((spec,), use_entry_points=False, trusted_keys=(example_key,))
    assert [plugin.id for plugin in plugins] == ["example"]


@pytest.mark.parametrize("relative", SIGNED_FILES)
def test_copy_with_one_byte_changed_is_refused(
    example_copy: str, example_key: bytes, tmp_path: Path, relative: str
) -> None:
    """Changing one byte of any file of the example refuses it, naming the plugin and the file."""
    path = tmp_path / example_copy / relative
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))
    spec = f"{example_copy}.plugin:plugin"
    with pytest.raises(PluginLoadError) as exc:
        discover_plugins((spec,), use_entry_points=False, trusted_keys=(example_key,))
    assert str(exc.value).startswith(
        f"plugin '{spec}' refused: file '{relative}' does not match its signed digest"
    )
    assert example_copy not in sys.modules


def test_cli_verify_exit_codes(example_copy: str, tmp_path: Path) -> None:
    """`plugins verify` exits 0 with "ok" for the example and 1 with the reason once it changes."""
    ok = _cli("verify", EXAMPLE_SPEC, "--key", str(PUBLIC_KEY_FILE))
    assert (ok.returncode, ok.stdout.splitlines()[-1]) == (
        0,
        f"ok: plugin 'example' 0.1.0, 3 files, signed by trusted key "
        f"{signing.key_id(signing.parse_public_key(PUBLIC_KEY_FILE.read_text()))}",
    )
    untrusted = _cli("verify", EXAMPLE_SPEC)
    assert untrusted.returncode == 1
    assert "no key is trusted (set DRM_TRUSTED_KEYS)" in untrusted.stderr
    with (tmp_path / example_copy / "plugin.py").open("a") as file:
        file.write("\n")
    spec = f"{example_copy}.plugin:plugin"
    tampered = _cli("verify", spec, "--key", str(PUBLIC_KEY_FILE), python_path=tmp_path)
    assert tampered.returncode == 1
    assert f"error: plugin '{spec}' refused: file 'plugin.py' does not match" in tampered.stderr


@pytest.fixture
def trust_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """DRM_TRUSTED_KEYS holds the example key too, for callers that read get_settings()."""
    monkeypatch.setenv("DRM_TRUSTED_KEYS", PUBLIC_KEY_FILE.read_text().strip())
    monkeypatch.delenv("DRM_ALLOW_UNSIGNED_PLUGINS", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.usefixtures("trust_env")
async def test_job_scheduler_loads_only_verified_plugins(
    settings: Settings,
    db: asyncpg.Pool,
    redis_client: aioredis.Redis,
    example_copy: str,
    tmp_path: Path,
) -> None:
    """A JobScheduler that discovers plugins loads the signed example and refuses a changed copy."""
    trusted = settings.model_copy(
        update={"plugins": (EXAMPLE_SPEC,), "trusted_keys": (PUBLIC_KEY_FILE.read_text().strip(),)}
    )
    scheduler = JobScheduler(DrmBroker(trusted, own_process=False))
    await scheduler.start()
    try:
        await scheduler.load_plugins()
        assert list(scheduler.loaded_plugins) == ["example"]
    finally:
        await scheduler.close()

    (tmp_path / example_copy / "schema.sql").write_text("DROP TABLE tenants;\n")
    changed = trusted.model_copy(update={"plugins": (f"{example_copy}.plugin:plugin",)})
    scheduler = JobScheduler(DrmBroker(changed, own_process=False))
    await scheduler.start()
    try:
        with pytest.raises(PluginLoadError, match=r"refused: file 'schema.sql' does not match"):
            await scheduler.load_plugins()
        assert scheduler.loaded_plugins == {}
    finally:
        await scheduler.close()
