-- The checksum of each plugin's schema (its DDL) as last applied: a process that starts applies
-- a plugin's schema only when it changed (drm_tenant_table() re-creates a policy, which locks
-- the table for a moment: every worker start did it for every plugin table). Plugin code
-- (drm_plugin) has no rights on it.
CREATE TABLE IF NOT EXISTS plugin_schemas (
  plugin_id  TEXT PRIMARY KEY,
  checksum   TEXT NOT NULL,
  applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
REVOKE ALL ON plugin_schemas FROM PUBLIC;
