-- Manual retries of failed jobs: keep the failed job's message, and number the runs of a job
-- (a retried job starts a new generation; plugin_run_id is derived from job, generation, attempt).
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS message TEXT;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS generation INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS idx_jobs_failed ON jobs(tenant_id, plugin_id, finished_at DESC)
  WHERE state = 'failed';
