"""Signed plugins: a manifest of a plugin package's files, its Ed25519 signature, verification.

A plugin package holds two extra files next to its ``__init__.py``:

- ``drm-plugin.json``, the manifest: ``{"algorithm", "files", "id", "version"}`` as canonical JSON
  (sorted keys, no spaces, one final newline), where ``files`` maps every file of the package
  (relative POSIX path, ``__pycache__`` directories and these two files excluded) to its SHA-256;
- ``drm-plugin.sig``: ``{"algorithm", "key_id", "signature"}``, the base64 Ed25519 signature of
  the manifest's exact bytes and the id of the key that made it (:func:`key_id`).

Public keys are the 32 raw bytes of an Ed25519 key, written as base64. Private keys are PKCS#8
PEM files. This module checks files and signatures; :mod:`drm_taskiq.plugins` decides when.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from drm_taskiq.errors import PluginLoadError

MANIFEST_NAME: Final = "drm-plugin.json"
SIGNATURE_NAME: Final = "drm-plugin.sig"
ALGORITHM: Final = "ed25519"
PUBLIC_KEY_BYTES: Final = 32
KEY_ID_CHARS: Final = 16
SKIPPED_DIR: Final = "__pycache__"
MAX_LISTED_PROBLEMS: Final = 5

_MANIFEST_KEYS: Final = frozenset({"algorithm", "files", "id", "version"})
_SIGNATURE_KEYS: Final = frozenset({"algorithm", "key_id", "signature"})
_SHA256_HEX: Final = frozenset("0123456789abcdef")


class PluginSignatureError(PluginLoadError):
    """The plugin is unsigned, or its signature, manifest or files do not verify."""

    def __init__(self, reason: str, *, plugin: str | None = None) -> None:
        self.reason = reason
        self.plugin = plugin
        super().__init__(reason if plugin is None else f"plugin {plugin!r} refused: {reason}")

    def refusing(self, plugin: str) -> PluginSignatureError:
        """The same reason, now naming the plugin that is refused."""
        return PluginSignatureError(self.reason, plugin=plugin)


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a signature vouches for: the plugin's id and version and the digest of every file."""

    id: str
    version: str
    files: Mapping[str, str]

    def to_bytes(self) -> bytes:
        """The canonical form that is written to ``drm-plugin.json`` and signed."""
        files = dict(self.files)
        return canonical_json(
            {"algorithm": ALGORITHM, "files": files, "id": self.id, "version": self.version}
        )


@dataclass(frozen=True, slots=True)
class VerifiedPackage:
    """A package whose manifest is signed by a trusted key and whose files match it."""

    directory: Path
    manifest: Manifest
    key_id: str


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """``value`` as UTF-8 JSON with sorted keys, no spaces and one final newline."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return (text + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------------ keys
def key_id(public_key: bytes) -> str:
    """The short id of a raw public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_key).hexdigest()[:KEY_ID_CHARS]


def parse_public_key(text: str) -> bytes:
    """The raw bytes of a base64 Ed25519 public key; ValueError if it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError("not the base64 of a 32-byte Ed25519 public key")
    return raw


def encode_public_key(public_key: bytes) -> str:
    """A raw public key as the base64 text ``DRM_TRUSTED_KEYS`` and ``.pub`` files hold."""
    return base64.b64encode(public_key).decode("ascii")


def generate_private_key() -> Ed25519PrivateKey:
    """A new Ed25519 signing key."""
    return Ed25519PrivateKey.generate()


def public_key_of(private_key: Ed25519PrivateKey) -> bytes:
    """The raw public key of ``private_key``."""
    return private_key.public_key().public_bytes_raw()


def private_key_pem(private_key: Ed25519PrivateKey) -> bytes:
    """``private_key`` as an unencrypted PKCS#8 PEM file."""
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key in the PKCS#8 PEM file ``path``; ValueError if it holds anything else."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key


# ----------------------------------------------------------------------------------------- files
def package_files(directory: Path) -> dict[str, str]:
    """Relative POSIX path -> SHA-256 (hex) of every file of the package, sorted by path.

    Skips ``__pycache__`` directories and the manifest and signature files. Everything else
    counts, including sourceless ``.pyc`` files and extension modules, which Python imports too.
    """

    def fail(exc: OSError) -> None:
        raise PluginSignatureError(f"cannot read {exc.filename}: {exc.strerror}")

    files: dict[str, str] = {}
    for root, dirnames, filenames in os.walk(directory, onerror=fail):
        here = Path(root)
        dirnames[:] = sorted(name for name in dirnames if name != SKIPPED_DIR)
        for name in dirnames:
            if (here / name).is_symlink():
                relative = (here / name).relative_to(directory).as_posix()
                raise PluginSignatureError(
                    f"directory {relative!r} is a symbolic link, which a signed plugin cannot hold"
                )
        for name in filenames:
            path = here / name
            relative = path.relative_to(directory).as_posix()
            if relative in {MANIFEST_NAME, SIGNATURE_NAME}:
                continue
            try:
                files[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as exc:
                raise PluginSignatureError(f"cannot read {relative!r}: {exc.strerror}") from None
    return dict(sorted(files.items()))


def build_manifest(directory: Path, *, plugin_id: str, version: str) -> Manifest:
    """The manifest of the package in ``directory`` as it is now."""
    return Manifest(id=plugin_id, version=version, files=package_files(directory))


def sign_package(
    directory: Path, private_key: Ed25519PrivateKey, *, plugin_id: str, version: str
) -> Manifest:
    """Write ``drm-plugin.json`` and ``drm-plugin.sig`` for the package in ``directory``."""
    manifest = build_manifest(directory, plugin_id=plugin_id, version=version)
    data = manifest.to_bytes()
    signature = {
        "algorithm": ALGORITHM,
        "key_id": key_id(public_key_of(private_key)),
        "signature": base64.b64encode(private_key.sign(data)).decode("ascii"),
    }
    (directory / MANIFEST_NAME).write_bytes(data)
    (directory / SIGNATURE_NAME).write_bytes(canonical_json(signature))
    return manifest


# ---------------------------------------------------------------------------------- verification
def verify_package(directory: Path, trusted_keys: Sequence[bytes]) -> VerifiedPackage:
    """Check that the package in ``directory`` is signed by one of ``trusted_keys`` and that its
    files are exactly those of the manifest; raise :class:`PluginSignatureError` saying why not."""
    manifest_path = directory / MANIFEST_NAME
    signature_path = directory / SIGNATURE_NAME
    for path in (manifest_path, signature_path):
        if not path.is_file():
            raise PluginSignatureError(
                f"unsigned: no {path.name} in {directory} (sign it with `drm-taskiq plugins sign`)"
            )
    data = manifest_path.read_bytes()
    signed_by, signature = _parse_signature(signature_path.read_bytes())
    keys = {key_id(key): key for key in trusted_keys}
    if not keys:
        raise PluginSignatureError(
            f"signed by key {signed_by}, but no key is trusted (set DRM_TRUSTED_KEYS)"
        )
    if signed_by not in keys:
        raise PluginSignatureError(
            f"signed by key {signed_by}, which is not a trusted key (DRM_TRUSTED_KEYS)"
        )
    try:
        Ed25519PublicKey.from_public_bytes(keys[signed_by]).verify(signature, data)
    except (InvalidSignature, ValueError):
        raise PluginSignatureError(
            f"the signature of {MANIFEST_NAME} does not verify with key {signed_by}"
            " (the manifest or the signature changed after signing)"
        ) from None
    manifest = _parse_manifest(data)
    problems = file_problems(manifest.files, package_files(directory))
    if problems:
        listed = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        text = "; ".join(listed) + (f"; and {more} more" if more else "")
        raise PluginSignatureError(f"{text} (in {directory})")
    return VerifiedPackage(directory=directory, manifest=manifest, key_id=signed_by)


def file_problems(signed: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """How the files on disk differ from the signed list, one sentence per file, by path."""
    problems = []
    for path in sorted(signed.keys() | actual.keys()):
        if path not in actual:
            problems.append(f"file {path!r} is missing")
        elif path not in signed:
            problems.append(f"file {path!r} is not listed in the signed manifest")
        elif signed[path] != actual[path]:
            problems.append(f"file {path!r} does not match its signed digest")
    return problems


def check_identity(verified: VerifiedPackage, plugin_id: str, version: str) -> None:
    """Raise :class:`PluginSignatureError` unless the manifest names this plugin id and version."""
    manifest = verified.manifest
    if (manifest.id, manifest.version) != (plugin_id, version):
        raise PluginSignatureError(
            f"the signed manifest is for plugin {manifest.id!r} version {manifest.version!r},"
            f" but the code defines plugin {plugin_id!r} version {version!r}"
        )


def _parse_signature(data: bytes) -> tuple[str, bytes]:
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if (
        isinstance(value, dict)
        and set(value) == _SIGNATURE_KEYS
        and value["algorithm"] == ALGORITHM
        and isinstance(value["key_id"], str)
        and isinstance(value["signature"], str)
    ):
        try:
            return value["key_id"], base64.b64decode(value["signature"], validate=True)
        except binascii.Error:
            pass
    raise PluginSignatureError(
        f"{SIGNATURE_NAME} is malformed (expected JSON with algorithm {ALGORITHM!r},"
        " key_id and a base64 signature)"
    )


def _parse_manifest(data: bytes) -> Manifest:
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if (
        isinstance(value, dict)
        and set(value) == _MANIFEST_KEYS
        and value["algorithm"] == ALGORITHM
        and isinstance(value["id"], str)
        and isinstance(value["version"], str)
        and isinstance(value["files"], dict)
        and all(_is_digest(digest) for digest in value["files"].values())
    ):
        return Manifest(id=value["id"], version=value["version"], files=dict(value["files"]))
    raise PluginSignatureError(
        f"{MANIFEST_NAME} is malformed (expected JSON with algorithm, files, id and version)"
    )


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _SHA256_HEX
