-- taskiq's results are read from `jobs` instead of being written a third time.
--
-- The run ledger wrote a final attempt three times (plugin_runs, jobs, taskiq_results), the
-- return value in each. taskiq_results becomes a view over jobs: taskiq-postgres's queries
-- (SELECT result / EXISTS ... WHERE task_id = $1) read it as they read the table, and a result
-- now goes when its job does (a deleted tenant's jobs, jobs older than DRM_JOB_RETENTION_DAYS).
-- jobs.started_at is the final attempt's start (the result's execution_time; NULL in rows
-- written before this migration: execution_time 0 there).
--
-- The JSON is the one drm_taskiq.results.taskiq_result_json builds from a finished job's hash
-- (the same result from Redis and from PostgreSQL; tests/integration/test_results.py compares
-- them). A failure's error is taskiq's serialized RuntimeError(failed_reason).
--
-- The table's rows are not carried over: every one was written with its jobs row, which the
-- view reads, except those of deleted tenants (left behind by the cascade, which did not reach
-- the table) and progress written through taskiq's own progress tracker (now kept in the job's
-- hash and jobs.progress, see JobResultBackend.set_progress).
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS started_at TIMESTAMPTZ;

DROP TABLE IF EXISTS taskiq_results;

CREATE VIEW taskiq_results AS
SELECT
  j.job_id AS task_id,
  convert_to(
    jsonb_build_object(
      'is_err', j.state <> 'completed',
      'log', NULL,
      'return_value', CASE WHEN j.state = 'completed' THEN j.returnvalue END,
      'execution_time', COALESCE(
        round(EXTRACT(EPOCH FROM j.finished_at - j.started_at), 3)::float8, 0),
      'labels', '{}'::jsonb,
      'error', CASE WHEN j.state <> 'completed' THEN jsonb_build_object(
        'exc_type', 'RuntimeError',
        'exc_message', jsonb_build_array(COALESCE(j.failed_reason, '')),
        'exc_module', 'builtins',
        'exc_cause', NULL,
        'exc_context', NULL,
        'exc_suppress_context', false) END
    )::text,
    'UTF8') AS result,
  NULL::bytea AS progress,
  j.generation
FROM jobs AS j;
