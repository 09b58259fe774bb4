"""Signed plugins: manifests, Ed25519 signatures, refusals at discovery, settings and the CLI."""

from __future__ import annotations

import base64
import json
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from drm_taskiq import cli, signing
from drm_taskiq.errors import PluginLoadError, SettingsError
from drm_taskiq.plugins import discover_plugins, plugin_directory
from drm_taskiq.settings import load_settings
from drm_taskiq.signing import Manifest, PluginSignatureError

PLUGIN_SOURCE = """\
from drm_taskiq.plugins import define_plugin

plugin = define_plugin(id={id!r}, name="Signed test plugin", version={version!r})
"""


@dataclass
class Package:
    """A plugin package written to a temporary directory that is on ``sys.path``."""

    name: str
    directory: Path
    key: Ed25519PrivateKey

    @property
    def spec(self) -> str:
        """The ``MODULE:ATTR`` of its plugin object."""
        return f"{self.name}.plugin:plugin"

    @property
    def public_key(self) -> bytes:
        """The raw public key of the key it is signed with."""
        return signing.public_key_of(self.key)

    def sign(self, plugin_id: str = "signed", version: str = "1.0.0") -> Manifest:
        """Sign the package as it is now."""
        return signing.sign_package(self.directory, self.key, plugin_id=plugin_id, version=version)

    def imported(self) -> bool:
        """Whether any module of the package has been imported."""
        return any(name.split(".")[0] == self.name for name in sys.modules)


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Package]:
    """A signed plugin package ``signed`` 1.0.0 with a module, a data file and a subpackage."""
    name = f"signed_{uuid.uuid4().hex[:12]}"
    directory = tmp_path / name
    (directory / "sub").mkdir(parents=True)
    (directory / "__init__.py").write_text('"""A signed plugin."""\n')
    (directory / "plugin.py").write_text(PLUGIN_SOURCE.format(id="signed", version="1.0.0"))
    (directory / "schema.sql").write_text("CREATE TABLE IF NOT EXISTS t (id int);\n")
    (directory / "sub" / "__init__.py").write_text("")
    (directory / "sub" / "helpers.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = Package(name, directory, Ed25519PrivateKey.generate())
    result.sign()
    yield result
    for module in [module for module in sys.modules if module.split(".")[0] == name]:
        del sys.modules[module]


def _flip_byte(path: Path, index: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


def _discover(package: Package, *keys: bytes, allow_unsigned: bool = False) -> list[str]:
    plugins = discover_plugins(
        (package.spec,),
        use_entry_points=False,
        trusted_keys=keys or (package.public_key,),
        allow_unsigned=allow_unsigned,
    )
    return [plugin.id for plugin in plugins]


# -------------------------------------------------------------------------- manifest and keys
def test_manifest_is_canonical_json() -> None:
    """The manifest is JSON with sorted keys, no spaces and one final newline."""
    manifest = Manifest(id="p", version="1.0", files={"b.py": "2" * 64, "a.py": "1" * 64})
    expected = (
        '{"algorithm":"ed25519","files":{"a.py":"' + "1" * 64 + '","b.py":"' + "2" * 64 + '"},'
        '"id":"p","version":"1.0"}\n'
    )
    assert manifest.to_bytes() == expected.encode()


def test_key_id_is_16_hex_digits_of_the_public_key_digest() -> None:
    """A key id is the first 16 hex digits of the SHA-256 of the raw public key."""
    # sha256(32 zero bytes) = 66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925
    assert signing.key_id(bytes(32)) == "66687aadf862bd77"


def test_public_key_text_round_trips() -> None:
    """A public key written as base64 parses back to its raw bytes; other text is refused."""
    raw = signing.public_key_of(Ed25519PrivateKey.generate())
    assert signing.parse_public_key(signing.encode_public_key(raw) + "\n") == raw
    for bad in ("", "not base64!", base64.b64encode(bytes(31)).decode()):
        with pytest.raises(ValueError, match="32-byte Ed25519"):
            signing.parse_public_key(bad)


def test_package_files_skip_pycache_and_signature_files(package: Package) -> None:
    """Listed files are every file of the package but __pycache__ and the manifest/signature."""
    (package.directory / "__pycache__").mkdir()
    (package.directory / "__pycache__" / "plugin.cpython-311.pyc").write_bytes(b"x")
    files = signing.package_files(package.directory)
    assert list(files) == [
        "__init__.py",
        "plugin.py",
        "schema.sql",
        "sub/__init__.py",
        "sub/helpers.py",
    ]


# ---------------------------------------------------------------------------- verification
def test_sign_then_verify_round_trips(package: Package) -> None:
    """A freshly signed package verifies with its key and reports manifest and key id."""
    verified = signing.verify_package(package.directory, [package.public_key])
    assert verified.manifest.id == "signed"
    assert verified.manifest.version == "1.0.0"
    assert verified.key_id == signing.key_id(package.public_key)
    assert set(verified.manifest.files) == set(signing.package_files(package.directory))


def test_signature_file_names_the_key(package: Package) -> None:
    """drm-plugin.sig holds the algorithm, the signing key's id and a base64 signature."""
    value = json.loads((package.directory / signing.SIGNATURE_NAME).read_bytes())
    assert value["algorithm"] == "ed25519"
    assert value["key_id"] == signing.key_id(package.public_key)
    assert len(base64.b64decode(value["signature"])) == 64


@pytest.mark.parametrize(
    "relative", ["__init__.py", "plugin.py", "schema.sql", "sub/__init__.py", "sub/helpers.py"]
)
def test_one_changed_byte_in_any_file_is_refused(package: Package, relative: str) -> None:
    """Flipping one bit of any listed file refuses the package, naming that file."""
    path = package.directory / relative
    if not path.read_bytes():
        path.write_bytes(b"\n")
    else:
        _flip_byte(path, len(path.read_bytes()) // 2)
    with pytest.raises(PluginSignatureError, match=rf"file '{relative}' does not match"):
        signing.verify_package(package.directory, [package.public_key])


def test_unlisted_python_file_is_refused(package: Package) -> None:
    """A .py file added after signing refuses the package, naming it."""
    (package.directory / "sub" / "extra.py").write_text("import os\n")
    with pytest.raises(PluginSignatureError, match=r"file 'sub/extra.py' is not listed"):
        signing.verify_package(package.directory, [package.public_key])


def test_sourceless_bytecode_outside_pycache_is_refused(package: Package) -> None:
    """A .pyc next to the sources (importable without a .py) counts as an unlisted file."""
    (package.directory / "evil.pyc").write_bytes(b"\x00" * 16)
    with pytest.raises(PluginSignatureError, match=r"file 'evil.pyc' is not listed"):
        signing.verify_package(package.directory, [package.public_key])


def test_missing_file_is_refused(package: Package) -> None:
    """A listed file that was deleted refuses the package, naming it."""
    (package.directory / "schema.sql").unlink()
    with pytest.raises(PluginSignatureError, match=r"file 'schema.sql' is missing"):
        signing.verify_package(package.directory, [package.public_key])


def test_untrusted_key_is_refused(package: Package) -> None:
    """A package signed by a key that is not trusted is refused, naming the signing key."""
    other = signing.public_key_of(Ed25519PrivateKey.generate())
    with pytest.raises(PluginSignatureError, match=r"not a trusted key") as exc:
        signing.verify_package(package.directory, [other])
    assert signing.key_id(package.public_key) in str(exc.value)


def test_no_trusted_keys_is_refused(package: Package) -> None:
    """With no trusted keys at all, the refusal says to set DRM_TRUSTED_KEYS."""
    with pytest.raises(PluginSignatureError, match=r"no key is trusted \(set DRM_TRUSTED_KEYS\)"):
        signing.verify_package(package.directory, [])


def test_forged_key_id_is_refused(package: Package) -> None:
    """A signature made by another key but labelled with the trusted key's id does not verify."""
    forger = Ed25519PrivateKey.generate()
    manifest = (package.directory / signing.MANIFEST_NAME).read_bytes()
    forged = {
        "algorithm": "ed25519",
        "key_id": signing.key_id(package.public_key),
        "signature": base64.b64encode(forger.sign(manifest)).decode(),
    }
    (package.directory / signing.SIGNATURE_NAME).write_bytes(signing.canonical_json(forged))
    with pytest.raises(PluginSignatureError, match=r"does not verify with key"):
        signing.verify_package(package.directory, [package.public_key])


def test_edited_manifest_is_refused(package: Package) -> None:
    """A manifest edited after signing (here: a new digest for a changed file) does not verify."""
    path = package.directory / "plugin.py"
    path.write_text(path.read_text() + "import os\n")
    manifest = signing.build_manifest(package.directory, plugin_id="signed", version="1.0.0")
    (package.directory / signing.MANIFEST_NAME).write_bytes(manifest.to_bytes())
    with pytest.raises(PluginSignatureError, match=r"does not verify"):
        signing.verify_package(package.directory, [package.public_key])


@pytest.mark.parametrize("name", [signing.MANIFEST_NAME, signing.SIGNATURE_NAME])
def test_unsigned_package_is_refused(package: Package, name: str) -> None:
    """A package without its manifest or its signature is unsigned."""
    (package.directory / name).unlink()
    with pytest.raises(PluginSignatureError, match=rf"unsigned: no {name}"):
        signing.verify_package(package.directory, [package.public_key])


def test_malformed_signature_file_is_refused(package: Package) -> None:
    """A signature file that is not the expected JSON is refused as malformed."""
    (package.directory / signing.SIGNATURE_NAME).write_text("garbage")
    with pytest.raises(PluginSignatureError, match=r"drm-plugin.sig is malformed"):
        signing.verify_package(package.directory, [package.public_key])


# ------------------------------------------------------------------------------- discovery
def test_discovery_loads_a_verified_plugin(package: Package) -> None:
    """discover_plugins loads a plugin whose package verifies, and logs plugin_verified."""
    with capture_logs() as logs:
        assert _discover(package) == ["signed"]
    verified = [entry for entry in logs if entry["event"] == "plugin_verified"]
    assert verified[0]["key_id"] == signing.key_id(package.public_key)


def test_refused_plugin_is_never_imported(package: Package) -> None:
    """A tampered plugin named in specs raises PluginLoadError naming it, before any import."""
    _flip_byte(package.directory / "plugin.py")
    with pytest.raises(
        PluginLoadError, match=rf"plugin '{package.spec}' refused: file 'plugin.py'"
    ):
        _discover(package)
    assert not package.imported()


def test_wrong_key_is_refused_at_discovery(package: Package) -> None:
    """discover_plugins refuses a plugin signed by a key that is not trusted."""
    other = signing.public_key_of(Ed25519PrivateKey.generate())
    with pytest.raises(PluginLoadError, match=r"refused: signed by key .* not a trusted key"):
        _discover(package, other)


@pytest.mark.parametrize(("plugin_id", "version"), [("other", "1.0.0"), ("signed", "2.0.0")])
def test_id_or_version_mismatch_is_refused(package: Package, plugin_id: str, version: str) -> None:
    """A manifest signed for another plugin id or version is refused once the code is loaded."""
    package.sign(plugin_id=plugin_id, version=version)
    with pytest.raises(PluginLoadError, match=r"refused: the signed manifest is for plugin"):
        _discover(package)


def test_plain_module_outside_a_package_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin in a top-level module (no package) cannot be signed, so it is refused."""
    name = f"lonely_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(PLUGIN_SOURCE.format(id="lonely", version="1"))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginLoadError, match=r"is not in a package; only packages can be signed"):
        discover_plugins((f"{name}:plugin",), use_entry_points=False, trusted_keys=(bytes(32),))
    assert name not in sys.modules


def test_missing_module_is_a_load_error(package: Package) -> None:
    """A spec whose module does not exist fails as before, not as a signature refusal."""
    with pytest.raises(PluginLoadError, match=r"cannot load plugin 'nope_missing.x:plugin'") as exc:
        discover_plugins(("nope_missing.x:plugin",), use_entry_points=False, trusted_keys=())
    assert not isinstance(exc.value, PluginSignatureError)


def test_plugin_directory_does_not_import_the_package(package: Package) -> None:
    """Locating a plugin's package runs none of its code (not even its __init__.py)."""
    (package.directory / "__init__.py").write_text("raise RuntimeError('imported')\n")
    assert plugin_directory(f"{package.name}.plugin") == package.directory
    assert plugin_directory(package.name) == package.directory
    assert not package.imported()


def test_unsigned_plugin_is_refused_by_default(package: Package) -> None:
    """Without DRM_ALLOW_UNSIGNED_PLUGINS, an unsigned plugin is refused and not imported."""
    (package.directory / signing.SIGNATURE_NAME).unlink()
    with pytest.raises(PluginLoadError, match=r"refused: unsigned: no drm-plugin.sig"):
        _discover(package)
    assert not package.imported()


@pytest.mark.parametrize("damage", ["unsigned", "tampered", "wrong id"])
def test_allow_unsigned_loads_with_a_loud_log(package: Package, damage: str) -> None:
    """With allow_unsigned, an unverifiable plugin loads; plugin_signature_skipped is CRITICAL."""
    if damage == "unsigned":
        (package.directory / signing.MANIFEST_NAME).unlink()
    elif damage == "tampered":
        _flip_byte(package.directory / "schema.sql")
    else:
        package.sign(plugin_id="other")
    with capture_logs() as logs:
        assert _discover(package, allow_unsigned=True) == ["signed"]
    skipped = [entry for entry in logs if entry["event"] == "plugin_signature_skipped"]
    assert len(skipped) == 1
    assert skipped[0]["log_level"] == "critical"
    assert skipped[0]["plugin"] == package.spec
    assert skipped[0]["reason"]
    assert any(entry["event"] == "plugin_signatures_not_enforced" for entry in logs)


def test_allow_unsigned_logs_at_every_load(package: Package) -> None:
    """Every discovery of an unverifiable plugin logs plugin_signature_skipped again."""
    (package.directory / signing.SIGNATURE_NAME).unlink()
    with capture_logs() as logs:
        _discover(package, allow_unsigned=True)
        _discover(package, allow_unsigned=True)
    assert [entry["event"] for entry in logs].count("plugin_signature_skipped") == 2


def test_discovery_reads_trust_from_settings(package: Package) -> None:
    """Without explicit keys, discover_plugins uses DRM_TRUSTED_KEYS of the settings given."""
    trusted = load_settings(trusted_keys=signing.encode_public_key(package.public_key))
    untrusted = load_settings(trusted_keys="")
    found = discover_plugins((package.spec,), use_entry_points=False, settings=trusted)
    assert [plugin.id for plugin in found] == ["signed"]
    with pytest.raises(PluginLoadError, match=r"no key is trusted"):
        discover_plugins((package.spec,), use_entry_points=False, settings=untrusted)


# -------------------------------------------------------------------------------- settings
def test_settings_default_to_enforcing_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default no key is trusted and unsigned plugins are not allowed."""
    monkeypatch.delenv("DRM_TRUSTED_KEYS", raising=False)
    monkeypatch.delenv("DRM_ALLOW_UNSIGNED_PLUGINS", raising=False)
    settings = load_settings()
    assert settings.trusted_keys == ()
    assert settings.allow_unsigned_plugins is False


def test_settings_read_trusted_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """DRM_TRUSTED_KEYS is a comma-separated list of base64 keys; the dev switch is a bool."""
    keys = [signing.encode_public_key(bytes([n]) * 32) for n in (1, 2)]
    monkeypatch.setenv("DRM_TRUSTED_KEYS", f" {keys[0]} ,{keys[1]},")
    monkeypatch.setenv("DRM_ALLOW_UNSIGNED_PLUGINS", "true")
    settings = load_settings()
    assert settings.trusted_keys == tuple(keys)
    assert settings.allow_unsigned_plugins is True


def test_settings_reject_a_bad_trusted_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value that is not a base64 32-byte key stops the process, naming DRM_TRUSTED_KEYS."""
    monkeypatch.setenv("DRM_TRUSTED_KEYS", "c2VjcmV0")
    with pytest.raises(SettingsError, match=r"DRM_TRUSTED_KEYS: .*key 1 is not") as exc:
        load_settings()
    assert "c2VjcmV0" not in str(exc.value)


# ------------------------------------------------------------------------------------- CLI
@pytest.fixture
def quiet_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run cli.main without reconfiguring process-wide logging or reading trust from the shell."""
    monkeypatch.setattr(cli, "configure_logging", lambda *_: None)
    monkeypatch.delenv("DRM_TRUSTED_KEYS", raising=False)
    monkeypatch.delenv("DRM_ALLOW_UNSIGNED_PLUGINS", raising=False)


@pytest.mark.usefixtures("quiet_cli")
def test_cli_keygen_sign_verify(
    package: Package, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """keygen writes a private PEM (mode 600) and a .pub; sign then verify with it exits 0."""
    keys = tmp_path / "keys"
    assert cli.main(["plugins", "keygen", "--out", str(keys)]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    assert (keys / "drm-plugin-key.pub").read_text().strip() == printed
    assert (keys / "drm-plugin-key.pem").stat().st_mode & 0o777 == 0o600
    pem = str(keys / "drm-plugin-key.pem")
    assert cli.main(["plugins", "sign", package.spec, "--key", pem]) == 0
    assert "signed plugin 'signed' 1.0.0" in capsys.readouterr().out
    pub = str(keys / "drm-plugin-key.pub")
    assert cli.main(["plugins", "verify", package.spec, "--key", pub]) == 0
    assert "\nok: plugin 'signed' 1.0.0" in "\n" + capsys.readouterr().out
    assert cli.main(["plugins", "verify", package.spec, "--key", printed]) == 0


@pytest.mark.usefixtures("quiet_cli")
def test_cli_keygen_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """keygen into a directory that already holds the key files exits 2 and keeps them."""
    assert cli.main(["plugins", "keygen", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "drm-plugin-key.pem").read_bytes()
    assert cli.main(["plugins", "keygen", "--out", str(tmp_path)]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert (tmp_path / "drm-plugin-key.pem").read_bytes() == before


@pytest.mark.usefixtures("quiet_cli")
def test_cli_verify_refusals_exit_1_with_the_reason(
    package: Package, capsys: pytest.CaptureFixture[str]
) -> None:
    """verify exits 1 and prints the reason for a wrong key and for a tampered file."""
    public = signing.encode_public_key(package.public_key)
    other = signing.encode_public_key(signing.public_key_of(Ed25519PrivateKey.generate()))
    assert cli.main(["plugins", "verify", package.spec, "--key", other]) == 1
    assert "not a trusted key" in capsys.readouterr().err
    _flip_byte(package.directory / "sub" / "helpers.py")
    assert cli.main(["plugins", "verify", package.spec, "--key", public]) == 1
    err = capsys.readouterr().err
    assert f"error: plugin '{package.spec}' refused: file 'sub/helpers.py'" in err


@pytest.mark.usefixtures("quiet_cli")
def test_cli_verify_uses_drm_trusted_keys(
    package: Package, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """verify without --key trusts DRM_TRUSTED_KEYS, and refuses when it is empty."""
    assert cli.main(["plugins", "verify", package.spec]) == 1
    assert "no key is trusted" in capsys.readouterr().err
    monkeypatch.setenv("DRM_TRUSTED_KEYS", signing.encode_public_key(package.public_key))
    assert cli.main(["plugins", "verify", package.spec]) == 0


@pytest.mark.usefixtures("quiet_cli")
def test_cli_bad_arguments_exit_2(package: Package, capsys: pytest.CaptureFixture[str]) -> None:
    """A spec without ':attribute' or a --key that is not a public key is a usage error."""
    assert cli.main(["plugins", "verify", package.name, "--key", "AAAA"]) == 2
    assert "must look like 'package.module:attribute'" in capsys.readouterr().err
    assert cli.main(["plugins", "verify", package.spec, "--key", "AAAA"]) == 2
    assert "--key" in capsys.readouterr().err
