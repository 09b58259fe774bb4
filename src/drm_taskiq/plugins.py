"""Plugin definitions and discovery (entry points and the ``DRM_PLUGINS`` setting)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

import structlog

from drm_taskiq.errors import InvalidInputError, PluginLoadError
from drm_taskiq.options import check_id

if TYPE_CHECKING:
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


def define_plugin(
    *,
    id: str,
    name: str,
    version: str,
    on_load: LifecycleHook | None = None,
    on_unload: LifecycleHook | None = None,
) -> Plugin:
    """Define a plugin. ``on_load(ctx)`` registers its jobs; ``on_unload(ctx)`` removes them."""
    check_id(id, "id")
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError("name", "must be a non-empty string")
    if not isinstance(version, str) or not version.strip():
        raise InvalidInputError("version", "must be a non-empty string")
    for field_name, hook in (("on_load", on_load), ("on_unload", on_unload)):
        if hook is not None and not inspect.iscoroutinefunction(hook):
            raise InvalidInputError(field_name, "must be an async function taking (ctx)")
    return Plugin(id=id, name=name, version=version, on_load=on_load, on_unload=on_unload)


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


def discover_plugins(
    specs: tuple[str, ...] = (),
    *,
    use_entry_points: bool = True,
    errors: list[str] | None = None,
) -> list[Plugin]:
    """Plugins from the entry-point group and from ``specs``; one per id (settings win).

    An entry point that fails to load is logged and skipped (its name is appended to ``errors``);
    a plugin named in ``specs`` that fails to load raises :class:`PluginLoadError`.
    """
    found: dict[str, Plugin] = {}
    if use_entry_points:
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                plugin = entry.load()
            except Exception as exc:
                log.error("plugin_load_failed", entry_point=entry.name, error=repr(exc))
                if errors is not None:
                    errors.append(entry.name)
                continue
            if isinstance(plugin, Plugin):
                found[plugin.id] = plugin
            else:
                log.error("plugin_load_failed", entry_point=entry.name, error="not a Plugin")
                if errors is not None:
                    errors.append(entry.name)
    for spec in specs:
        plugin = load_object(spec)
        found[plugin.id] = plugin
    return list(found.values())
