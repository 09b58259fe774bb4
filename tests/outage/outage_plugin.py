"""The ``outage`` plugin: one trivial job for real worker processes in the outage tests.

``on_load`` registers ``noop`` (returns ``job.data``) through ``ctx.scheduler``, once per tenant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from drm_taskiq import define_plugin

if TYPE_CHECKING:
    from drm_taskiq.context import PluginContext
    from drm_taskiq.jobs import Job

PLUGIN_ID: Final = "outage"
PLUGIN_SPEC: Final = "tests.outage.outage_plugin:plugin"


async def noop(ctx: PluginContext, job: Job) -> Any:
    """Return ``job.data``."""
    return job.data


async def on_load(ctx: PluginContext) -> None:
    """Register ``noop`` for ``ctx.tenant_id``."""
    await ctx.scheduler.register_job(ctx.plugin_id, "noop", noop, None)


plugin = define_plugin(id=PLUGIN_ID, name="Outage tests", version="1.0.0", on_load=on_load)
