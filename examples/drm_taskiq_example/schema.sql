-- Tables of the example plugin. The platform applies this before on_load; safe to re-run.

CREATE TABLE IF NOT EXISTS example_activities (
  activity_id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id   TEXT NOT NULL REFERENCES tenants(tenant_id) ON DELETE CASCADE,
  source      TEXT NOT NULL,
  payload     JSONB NOT NULL,
  created_at  TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

-- Row-level security: plugin code sees only the rows of the tenant its job runs for.
SELECT drm_tenant_table('example_activities');

-- cleanup-activities deletes by (tenant, age).
CREATE INDEX IF NOT EXISTS idx_example_activities_tenant_created
  ON example_activities(tenant_id, created_at);

-- sync-activities checks whether a job's rows already exist, so that a re-run inserts nothing.
CREATE INDEX IF NOT EXISTS idx_example_activities_tenant_job
  ON example_activities(tenant_id, (payload->>'job_id'));
