"""define_plugin, the hook registry and plugin discovery."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from drm_taskiq import HookRegistry, InvalidInputError, Plugin, PluginLoadError, define_plugin
from drm_taskiq.plugins import load_object


async def _hook(ctx: Any) -> None:
    return None


def test_define_plugin_checks_its_fields() -> None:
    """Ids, names, versions and hooks are validated with the field named."""
    plugin = define_plugin(id="ga", name="GA", version="1.0.0", on_load=_hook, on_unload=_hook)
    assert isinstance(plugin, Plugin)
    assert (plugin.id, plugin.name, plugin.version) == ("ga", "GA", "1.0.0")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"id": "bad id"}, "id"),
        ({"name": " "}, "name"),
        ({"version": ""}, "version"),
        ({"on_load": lambda ctx: None}, "on_load"),
        ({"schema": "  "}, "schema"),
    ]
    for override, field in cases:
        kwargs: dict[str, Any] = {"id": "ga", "name": "GA", "version": "1"} | override
        with pytest.raises(InvalidInputError) as caught:
            define_plugin(**kwargs)
        assert caught.value.field == field


def test_load_object_reports_bad_specs() -> None:
    """A plugin spec that does not import or is not a Plugin fails with PluginLoadError."""
    with pytest.raises(PluginLoadError, match="cannot load"):
        load_object("no_such_module_xyz:plugin")
    with pytest.raises(PluginLoadError, match="not a plugin"):
        load_object("drm_taskiq.options:MAX_PRIORITY")
    assert load_object("tests.plugins.accept:plugin").id == "accept"


async def test_subscribing_a_handler_again_changes_nothing() -> None:
    """on_load runs once per tenant: the same handler (function, or bound method of one object)
    subscribed each time runs once per emit; distinct handlers each run; off removes it."""
    hooks = HookRegistry()
    seen: list[str] = []

    async def handler(value: str) -> None:
        seen.append(f"fn:{value}")

    class Listener:
        async def on_event(self, value: str) -> None:
            seen.append(f"method:{value}")

    listener = Listener()
    for tenant in ("acme", "globex", "initech"):  # three on_load calls
        hooks.on("activity.created", handler, plugin_id="p1")
        hooks.on("activity.created", listener.on_event, plugin_id="p1")

        async def per_tenant(value: str, tenant: str = tenant) -> None:
            seen.append(f"{tenant}:{value}")

        hooks.on("activity.created", per_tenant, plugin_id="p1")
    await hooks.emit("activity.created", "x")
    assert seen == ["fn:x", "method:x", "acme:x", "globex:x", "initech:x"]
    hooks.off("activity.created", listener.on_event)
    hooks.off("activity.created", handler)
    seen.clear()
    await hooks.emit("activity.created", "y")
    assert seen == ["acme:y", "globex:y", "initech:y"]


async def test_hooks_run_in_order_and_survive_a_failing_handler() -> None:
    """Handlers run in registration order; a failing one is logged and skipped."""
    hooks = HookRegistry()
    seen: list[str] = []

    async def first(value: str) -> str:
        seen.append(f"first:{value}")
        return "a"

    async def broken(value: str) -> str:
        raise RuntimeError("boom")

    async def last(value: str) -> str:
        seen.append(f"last:{value}")
        return "b"

    hooks.on("activity.created", first, plugin_id="p1")
    hooks.on("activity.created", broken, plugin_id="p2")
    hooks.on("activity.created", last, plugin_id="p3")
    with capture_logs() as logs:
        results = await hooks.emit("activity.created", "x")
    assert results == ["a", "b"]
    assert seen == ["first:x", "last:x"]
    assert [e["plugin_id"] for e in logs if e["event"] == "hook_failed"] == ["p2"]
    hooks.off("activity.created", broken)
    assert hooks.handlers("activity.created") == [first, last]
    assert await hooks.emit("nothing") == []
