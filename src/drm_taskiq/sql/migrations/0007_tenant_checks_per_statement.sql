-- plugin_runs and jobs check their tenant once per statement instead of once per row.
--
-- Their foreign keys to tenants ran a look-up per inserted row (a quarter of PostgreSQL's time
-- in a run-ledger batch, measured in docs/performance.md). They are replaced by what gives the
-- same guarantees per statement:
--   * after an INSERT or UPDATE, the tenants the statement's rows name are locked FOR KEY SHARE
--     (as a foreign key's check locks them: a concurrent DELETE or key change of the tenant
--     waits for this transaction, and this one for such a change under way), and a row whose
--     tenant does not exist fails the statement with foreign_key_violation (SQLSTATE 23503,
--     asyncpg.ForeignKeyViolationError), as before;
--   * deleting tenants deletes their plugin_runs and jobs rows (ON DELETE CASCADE was);
--   * changing the tenant_id of a tenant that has rows there is refused (NO ACTION was);
--   * TRUNCATE tenants (CASCADE: tenant_plugins and schedules keep their foreign keys, few rows
--     written rarely) empties plugin_runs and jobs too, as the cascade did.
-- The functions run as their owner (SECURITY DEFINER): plugin code (drm_plugin) inserts
-- plugin_runs rows and has no rights on tenants.
-- tests/integration/test_tenant_checks.py holds each rule, concurrent deletes included.
DO $$
DECLARE
  schema_name TEXT := current_schema();
  tbl TEXT;
BEGIN
  EXECUTE format($f$
    CREATE OR REPLACE FUNCTION %1$I.drm_check_row_tenants() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = %1$I, pg_temp AS $body$
    DECLARE
      missing TEXT;
    BEGIN
      PERFORM 1 FROM tenants AS t
      WHERE t.tenant_id IN (SELECT DISTINCT n.tenant_id FROM new_rows AS n)
      FOR KEY SHARE OF t;
      SELECT n.tenant_id INTO missing FROM new_rows AS n
      WHERE NOT EXISTS (SELECT 1 FROM tenants AS t WHERE t.tenant_id = n.tenant_id)
      LIMIT 1;
      IF FOUND THEN
        RAISE EXCEPTION 'insert or update on table "%%" violates its tenant check', TG_TABLE_NAME
          USING ERRCODE = 'foreign_key_violation',
                DETAIL = format('Key (tenant_id)=(%%s) is not present in table "tenants".',
                                missing),
                TABLE = TG_TABLE_NAME, SCHEMA = TG_TABLE_SCHEMA;
      END IF;
      RETURN NULL;
    END
    $body$
  $f$, schema_name);

  EXECUTE format($f$
    CREATE OR REPLACE FUNCTION %1$I.drm_delete_tenant_rows() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = %1$I, pg_temp AS $body$
    BEGIN
      IF TG_OP = 'TRUNCATE' THEN
        TRUNCATE plugin_runs, jobs;
      ELSE  -- DELETE: old_rows holds the deleted tenants
        DELETE FROM plugin_runs WHERE tenant_id IN (SELECT o.tenant_id FROM old_rows AS o);
        DELETE FROM jobs WHERE tenant_id IN (SELECT o.tenant_id FROM old_rows AS o);
      END IF;
      RETURN NULL;
    END
    $body$
  $f$, schema_name);

  EXECUTE format($f$
    CREATE OR REPLACE FUNCTION %1$I.drm_refuse_tenant_key_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = %1$I, pg_temp AS $body$
    BEGIN
      IF EXISTS (SELECT 1 FROM plugin_runs WHERE tenant_id = OLD.tenant_id)
         OR EXISTS (SELECT 1 FROM jobs WHERE tenant_id = OLD.tenant_id) THEN
        RAISE EXCEPTION 'update on table "tenants" violates the tenant check of its runs'
          USING ERRCODE = 'foreign_key_violation',
                DETAIL = format('Key (tenant_id)=(%%s) is still referenced.', OLD.tenant_id),
                TABLE = 'tenants', SCHEMA = TG_TABLE_SCHEMA;
      END IF;
      RETURN NULL;
    END
    $body$
  $f$, schema_name);

  FOREACH tbl IN ARRAY ARRAY['plugin_runs', 'jobs'] LOOP
    EXECUTE format('ALTER TABLE %I.%I DROP CONSTRAINT IF EXISTS %I',
                   schema_name, tbl, tbl || '_tenant_id_fkey');
    EXECUTE format('CREATE TRIGGER drm_tenant_check_insert AFTER INSERT ON %I.%I'
                   ' REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT'
                   ' EXECUTE FUNCTION %I.drm_check_row_tenants()', schema_name, tbl, schema_name);
    EXECUTE format('CREATE TRIGGER drm_tenant_check_update AFTER UPDATE ON %I.%I'
                   ' REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT'
                   ' EXECUTE FUNCTION %I.drm_check_row_tenants()', schema_name, tbl, schema_name);
  END LOOP;
  EXECUTE format('CREATE TRIGGER drm_tenant_rows_cascade AFTER DELETE ON %I.tenants'
                 ' REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT'
                 ' EXECUTE FUNCTION %I.drm_delete_tenant_rows()', schema_name, schema_name);
  EXECUTE format('CREATE TRIGGER drm_tenant_rows_truncate AFTER TRUNCATE ON %I.tenants'
                 ' FOR EACH STATEMENT EXECUTE FUNCTION %I.drm_delete_tenant_rows()',
                 schema_name, schema_name);
  EXECUTE format('CREATE TRIGGER drm_tenant_key_change AFTER UPDATE OF tenant_id ON %I.tenants'
                 ' FOR EACH ROW WHEN (OLD.tenant_id IS DISTINCT FROM NEW.tenant_id)'
                 ' EXECUTE FUNCTION %I.drm_refuse_tenant_key_change()', schema_name, schema_name);
END
$$;
