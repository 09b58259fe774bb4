-- drm-taskiq schema, version 1.
-- plugin_runs is exactly the specification's table; the other tables serve the job system.

CREATE TABLE IF NOT EXISTS tenants (
  tenant_id  TEXT PRIMARY KEY,
  name       TEXT NOT NULL DEFAULT '',
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS plugin_runs (
  plugin_run_id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  plugin_id TEXT NOT NULL,
  tenant_id TEXT NOT NULL,
  hook_name TEXT NOT NULL,
  args_hash TEXT,
  status TEXT NOT NULL,
  result JSONB,
  error TEXT,
  executed_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  FOREIGN KEY (tenant_id) REFERENCES tenants(tenant_id) ON DELETE CASCADE
);

CREATE INDEX IF NOT EXISTS idx_plugin_runs_tenant_plugin ON plugin_runs(tenant_id, plugin_id);
CREATE INDEX IF NOT EXISTS idx_plugin_runs_executed_at ON plugin_runs(executed_at DESC);

-- Which tenant has which plugin, and the plugin's per-tenant configuration.
CREATE TABLE IF NOT EXISTS tenant_plugins (
  tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id) ON DELETE CASCADE,
  plugin_id TEXT NOT NULL,
  enabled   BOOLEAN NOT NULL DEFAULT TRUE,
  config    JSONB NOT NULL DEFAULT '{}'::jsonb,
  PRIMARY KEY (tenant_id, plugin_id)
);

-- Final state of every job that left Redis (completed or failed), written by the run ledger.
CREATE TABLE IF NOT EXISTS jobs (
  job_id        TEXT PRIMARY KEY,
  queue         TEXT NOT NULL,
  plugin_id     TEXT NOT NULL,
  tenant_id     TEXT NOT NULL REFERENCES tenants(tenant_id) ON DELETE CASCADE,
  job_name      TEXT NOT NULL,
  state         TEXT NOT NULL CHECK (state IN ('completed', 'failed')),
  attempts_made INTEGER NOT NULL,
  progress      JSONB,
  returnvalue   JSONB,
  failed_reason TEXT,
  created_at    TIMESTAMPTZ NOT NULL,
  finished_at   TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_jobs_tenant_plugin_state ON jobs(tenant_id, plugin_id, state, finished_at DESC);

-- taskiq's result format (taskiq_pg's AsyncpgResultBackend layout), JSON-serialized.
CREATE TABLE IF NOT EXISTS taskiq_results (
  task_id  VARCHAR UNIQUE,
  result   BYTEA,
  progress BYTEA
);

-- Cron schedules registered by plugins at run time, one per (tenant, plugin, job).
CREATE TABLE IF NOT EXISTS schedules (
  schedule_id TEXT PRIMARY KEY,
  tenant_id   TEXT NOT NULL REFERENCES tenants(tenant_id) ON DELETE CASCADE,
  plugin_id   TEXT NOT NULL,
  job_name    TEXT NOT NULL,
  cron        TEXT NOT NULL,
  tz          TEXT NOT NULL DEFAULT 'UTC',
  options     JSONB NOT NULL DEFAULT '{}'::jsonb,
  data        JSONB,
  created_at  TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  updated_at  TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  UNIQUE (tenant_id, plugin_id, job_name)
);
