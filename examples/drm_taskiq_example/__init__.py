"""drm-taskiq's example plugin: records activities per tenant in PostgreSQL, prunes them by cron.

The plugin object is :data:`drm_taskiq_example.plugin.plugin`, registered under the entry point
``example`` of the ``drm_taskiq.plugins`` group.
"""

from __future__ import annotations
