-- jobs.returnvalue keeps a job's return value as the job wrote it: json (its text as written)
-- instead of jsonb, which stores numbers as numeric and gave a float such as 1e16 back as the
-- integer 10000000000000000 once the job's result came from PostgreSQL (get_job_status,
-- taskiq's get_result). The taskiq_results view builds its JSON with the json functions, which
-- copy a json value's text as it is (jsonb_build_object would turn it into jsonb again).
--
-- Rows written before keep the value jsonb gave them (their numbers' original spelling is
-- gone). plugin_runs.result and jobs.progress stay jsonb (documented in docs/plugin-api.md).
-- The view depends on the column: it is dropped and created again around the type change.
DROP VIEW IF EXISTS taskiq_results;

ALTER TABLE jobs ALTER COLUMN returnvalue TYPE JSON USING returnvalue::json;

CREATE VIEW taskiq_results AS
SELECT
  j.job_id AS task_id,
  convert_to(
    json_build_object(
      'is_err', j.state <> 'completed',
      'log', NULL,
      'return_value', CASE WHEN j.state = 'completed' THEN j.returnvalue END,
      'execution_time', COALESCE(
        round(EXTRACT(EPOCH FROM j.finished_at - j.started_at), 3)::float8, 0),
      'labels', '{}'::json,
      'error', CASE WHEN j.state <> 'completed' THEN json_build_object(
        'exc_type', 'RuntimeError',
        'exc_message', json_build_array(COALESCE(j.failed_reason, '')),
        'exc_module', 'builtins',
        'exc_cause', NULL,
        'exc_context', NULL,
        'exc_suppress_context', false) END
    )::text,
    'UTF8') AS result,
  NULL::bytea AS progress,
  j.generation
FROM jobs AS j;
