"""Plugin definitions and discovery (entry points and the ``DRM_PLUGINS`` setting), which loads
only plugins whose signature verifies (:mod:`drm_taskiq.signing`)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from drm_taskiq.errors import InvalidInputError, PluginLoadError
from drm_taskiq.options import check_id
from drm_taskiq.settings import Settings, get_settings
from drm_taskiq.signing import (
    PluginSignatureError,
    VerifiedPackage,
    check_identity,
    parse_public_key,
    verify_package,
)

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec

    from drm_taskiq.context import PluginContext

ENTRY_POINT_GROUP = "drm_taskiq.plugins"

LifecycleHook = Callable[["PluginContext"], Awaitable[None]]

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Plugin:
    """A plugin: its identity and the hooks called once per tenant that enables it."""

    id: str
    name: str
    version: str
    on_load: LifecycleHook | None = None
    on_unload: LifecycleHook | None = None
    schema: str | None = None


def define_plugin(
    *,
    id: str,
    name: str,
    version: str,
    on_load: LifecycleHook | None = None,
    on_unload: LifecycleHook | None = None,
    schema: str | None = None,
) -> Plugin:
    """Define a plugin. ``on_load(ctx)`` registers its jobs; ``on_unload(ctx)`` removes them.

    ``schema`` is the plugin's own DDL (idempotent SQL: ``CREATE TABLE IF NOT EXISTS ...``). The
    platform applies it, not the plugin: plugin code connects through a role that may not create
    or alter tables. Each table with a ``tenant_id`` column must be followed by
    ``SELECT drm_tenant_table('name');``, which gives it the platform's row-level security.
    """
    check_id(id, "id")
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError("name", "must be a non-empty string")
    if not isinstance(version, str) or not version.strip():
        raise InvalidInputError("version", "must be a non-empty string")
    for field_name, hook in (("on_load", on_load), ("on_unload", on_unload)):
        if hook is not None and not inspect.iscoroutinefunction(hook):
            raise InvalidInputError(field_name, "must be an async function taking (ctx)")
    if schema is not None and (not isinstance(schema, str) or not schema.strip()):
        raise InvalidInputError("schema", "must be SQL text or None")
    return Plugin(
        id=id, name=name, version=version, on_load=on_load, on_unload=on_unload, schema=schema
    )


def load_object(spec: str) -> Plugin:
    """Import ``package.module:attribute`` and check that it is a :class:`Plugin`."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        value = getattr(module, attribute)
    except (ImportError, AttributeError) as exc:
        raise PluginLoadError(f"cannot load plugin {spec!r}: {exc}") from exc
    if not isinstance(value, Plugin):
        raise PluginLoadError(f"{spec!r} is not a plugin made with define_plugin()")
    return value


def plugin_directory(module_name: str) -> Path:
    """The directory of the package that holds ``module_name`` (the module itself when it is a
    package), found without importing either: the unit a plugin signature covers."""
    try:
        spec = _find_spec(module_name)
        if spec is not None and spec.submodule_search_locations is None:
            if not spec.parent:
                raise PluginSignatureError(
                    f"module {module_name!r} is not in a package; only packages can be signed"
                )
            spec = _find_spec(spec.parent)
    except (ImportError, ValueError) as exc:
        raise PluginLoadError(f"cannot find module {module_name!r}: {exc}") from exc
    if spec is None:
        raise PluginLoadError(f"no module named {module_name!r}")
    origin = Path(spec.origin) if spec.has_location and spec.origin else None
    if origin is None or not origin.name.startswith("__init__.") or not origin.is_file():
        raise PluginSignatureError(
            f"package {spec.name!r} is not a directory with an __init__.py"
            " (namespace and zipped packages cannot be signed)"
        )
    return origin.parent


def _find_spec(name: str) -> ModuleSpec | None:
    """``importlib.util.find_spec`` that never imports: a submodule's parents are looked up too,
    rather than imported (which would run the ``__init__.py`` under verification)."""
    module = sys.modules.get(name)
    if module is not None:
        return module.__spec__
    parent, _, _ = name.rpartition(".")
    if not parent:
        return importlib.util.find_spec(name)
    parent_spec = _find_spec(parent)
    if parent_spec is None or parent_spec.submodule_search_locations is None:
        return None
    path = list(parent_spec.submodule_search_locations)
    for finder in sys.meta_path:
        spec = finder.find_spec(name, path, None)
        if spec is not None:
            return spec
    return None


def _trust(
    settings: Settings | None, trusted_keys: Sequence[bytes] | None, allow_unsigned: bool | None
) -> tuple[tuple[bytes, ...], bool]:
    if trusted_keys is None or allow_unsigned is None:
        if settings is None:
            settings = get_settings()
        if trusted_keys is None:
            trusted_keys = [parse_public_key(text) for text in settings.trusted_keys]
        if allow_unsigned is None:
            allow_unsigned = settings.allow_unsigned_plugins
    return tuple(trusted_keys), allow_unsigned


def load_verified(
    label: str,
    module_name: str,
    load: Callable[[], Plugin],
    *,
    trusted_keys: Sequence[bytes],
    allow_unsigned: bool = False,
) -> tuple[Plugin, VerifiedPackage | None]:
    """Verify the package of ``module_name``, and only then import the plugin with ``load()``.

    Refusals raise :class:`PluginSignatureError` naming ``label``. With ``allow_unsigned``
    they are logged (``plugin_signature_skipped``, CRITICAL) and the plugin loads anyway.
    """
    verified: VerifiedPackage | None = None
    try:
        verified = verify_package(plugin_directory(module_name), trusted_keys)
    except PluginSignatureError as exc:
        _refuse_or_skip(label, exc, allow_unsigned=allow_unsigned)
    except PluginLoadError as exc:
        raise PluginLoadError(f"cannot load plugin {label!r}: {exc}") from exc
    plugin = load()
    if verified is not None:
        try:
            _check_loaded(verified, module_name, plugin)
        except PluginSignatureError as exc:
            _refuse_or_skip(label, exc, allow_unsigned=allow_unsigned)
            verified = None
    if verified is not None:
        log.info(
            "plugin_verified",
            plugin=label,
            plugin_id=plugin.id,
            version=plugin.version,
            key_id=verified.key_id,
            files=len(verified.manifest.files),
        )
    return plugin, verified


def _refuse_or_skip(label: str, exc: PluginSignatureError, *, allow_unsigned: bool) -> None:
    if not allow_unsigned:
        raise exc.refusing(label) from None
    log.critical(
        "plugin_signature_skipped",
        plugin=label,
        reason=exc.reason,
        setting="DRM_ALLOW_UNSIGNED_PLUGINS=true",
        warning="loading a plugin that is not verified; for development only",
    )


def _check_loaded(verified: VerifiedPackage, module_name: str, plugin: Plugin) -> None:
    check_identity(verified, plugin.id, plugin.version)
    file = getattr(sys.modules.get(module_name), "__file__", None)
    directory = verified.directory.resolve()
    if file is None or directory not in Path(file).resolve().parents:
        raise PluginSignatureError(
            f"module {module_name!r} was imported from {file}, not from the verified {directory}"
        )


def _load_entry_point(entry: EntryPoint) -> Plugin:
    plugin = entry.load()
    if not isinstance(plugin, Plugin):
        raise PluginLoadError("not a Plugin")
    return plugin


def discover_plugins(
    specs: tuple[str, ...] = (),
    *,
    use_entry_points: bool = True,
    errors: list[str] | None = None,
    settings: Settings | None = None,
    trusted_keys: Sequence[bytes] | None = None,
    allow_unsigned: bool | None = None,
) -> list[Plugin]:
    """Plugins from the entry-point group and from ``specs``; one per id (settings win).

    Each plugin's package must be signed by one of ``trusted_keys`` and match its manifest
    (see :mod:`drm_taskiq.signing`); it is verified before it is imported. ``trusted_keys`` and
    ``allow_unsigned`` default to ``DRM_TRUSTED_KEYS`` and ``DRM_ALLOW_UNSIGNED_PLUGINS`` of
    ``settings`` (or of :func:`~drm_taskiq.settings.get_settings` when not given).

    An entry point that fails to load or is refused is logged (``plugin_load_failed``,
    ``plugin_refused``) and skipped (its name is appended to ``errors``); a plugin named in
    ``specs`` that fails to load or is refused raises :class:`PluginLoadError`.
    """
    keys, allow = _trust(settings, trusted_keys, allow_unsigned)
    if allow:
        log.warning("plugin_signatures_not_enforced", setting="DRM_ALLOW_UNSIGNED_PLUGINS=true")
    found: dict[str, Plugin] = {}
    if use_entry_points:
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                plugin, _ = load_verified(
                    entry.name,
                    entry.module,
                    functools.partial(_load_entry_point, entry),
                    trusted_keys=keys,
                    allow_unsigned=allow,
                )
            except PluginSignatureError as exc:
                log.error(
                    "plugin_refused", plugin=entry.name, entry_point=entry.value, reason=exc.reason
                )
                if errors is not None:
                    errors.append(entry.name)
                continue
            except Exception as exc:
                error = str(exc) if isinstance(exc, PluginLoadError) else repr(exc)
                log.error("plugin_load_failed", entry_point=entry.name, error=error)
                if errors is not None:
                    errors.append(entry.name)
                continue
            found[plugin.id] = plugin
    for spec in specs:
        plugin, _ = load_verified(
            spec,
            spec.partition(":")[0],
            functools.partial(load_object, spec),
            trusted_keys=keys,
            allow_unsigned=allow,
        )
        found[plugin.id] = plugin
    return list(found.values())
