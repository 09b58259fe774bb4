-- Tenant isolation for plugin code (see docs/security.md).
--
-- Plugin code reaches PostgreSQL only through ctx.db, which logs in as the role drm_plugin:
-- no superuser, no BYPASSRLS, owner of nothing here. Every tenant-owned table has row-level
-- security with a policy comparing tenant_id to drm_tenant(). drm_tenant() returns the tenant a
-- transaction is bound to, and only when the binding carries a signature made with a secret
-- the plugin role cannot read: a handler that sets app.tenant_id to another tenant gets no rows.
-- The platform's own connections (the migrating user, owner of the tables) are not affected.

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'drm_plugin') THEN
    CREATE ROLE drm_plugin LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
  END IF;
END
$$;

CREATE TABLE IF NOT EXISTS drm_secrets (
  name  TEXT PRIMARY KEY,
  value BYTEA NOT NULL
);
REVOKE ALL ON drm_secrets FROM PUBLIC;
INSERT INTO drm_secrets (name, value)
VALUES ('tenant_binding', uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()))
ON CONFLICT (name) DO NOTHING;

DO $$
DECLARE
  schema_name TEXT := current_schema();
  tbl TEXT;
BEGIN
  EXECUTE format($f$
    CREATE OR REPLACE FUNCTION %1$I.drm_tenant() RETURNS TEXT
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = %1$I, pg_temp AS $body$
      SELECT b.tenant
      FROM (SELECT current_setting('app.tenant_id', true) AS tenant,
                   current_setting('app.tenant_sig', true) AS sig) AS b,
           drm_secrets AS s
      WHERE s.name = 'tenant_binding'
        AND b.tenant IS NOT NULL AND b.tenant <> ''
        AND b.sig = encode(sha256(s.value || sha256(s.value || convert_to(b.tenant, 'UTF8'))),
                           'hex')
    $body$
  $f$, schema_name);
  EXECUTE format('REVOKE ALL ON FUNCTION %I.drm_tenant() FROM PUBLIC', schema_name);
  EXECUTE format('GRANT EXECUTE ON FUNCTION %I.drm_tenant() TO drm_plugin', schema_name);
  EXECUTE format('GRANT USAGE ON SCHEMA %I TO drm_plugin', schema_name);

  FOREACH tbl IN ARRAY ARRAY['plugin_runs', 'tenant_plugins', 'jobs', 'schedules'] LOOP
    EXECUTE format('ALTER TABLE %I.%I ENABLE ROW LEVEL SECURITY', schema_name, tbl);
    EXECUTE format('DROP POLICY IF EXISTS tenant_isolation ON %I.%I', schema_name, tbl);
    EXECUTE format(
      'CREATE POLICY tenant_isolation ON %I.%I USING (tenant_id = (SELECT %I.drm_tenant()))'
      ' WITH CHECK (tenant_id = (SELECT %I.drm_tenant()))',
      schema_name, tbl, schema_name, schema_name);
  END LOOP;

  -- What plugin code may do with the platform's tables (always within its tenant).
  EXECUTE format('GRANT SELECT, INSERT ON %I.plugin_runs TO drm_plugin', schema_name);
  EXECUTE format('GRANT SELECT ON %I.tenant_plugins, %I.jobs, %I.schedules TO drm_plugin',
                 schema_name, schema_name, schema_name);
END
$$;

-- drm_tenant_table(name): give a plugin's own table (it must have a tenant_id column) the same
-- isolation; plugin schemas call it after creating their tables.
DO $$
DECLARE
  schema_name TEXT := current_schema();
BEGIN
  EXECUTE format($f$
    CREATE OR REPLACE FUNCTION %1$I.drm_tenant_table(table_name TEXT) RETURNS VOID
    LANGUAGE plpgsql AS $body$
    DECLARE
      seq TEXT;
    BEGIN
      EXECUTE format('ALTER TABLE %%I.%%I ENABLE ROW LEVEL SECURITY', %1$L, table_name);
      EXECUTE format('ALTER TABLE %%I.%%I FORCE ROW LEVEL SECURITY', %1$L, table_name);
      EXECUTE format('DROP POLICY IF EXISTS tenant_isolation ON %%I.%%I', %1$L, table_name);
      EXECUTE format('CREATE POLICY tenant_isolation ON %%I.%%I'
                     ' USING (tenant_id = (SELECT %%I.drm_tenant()))'
                     ' WITH CHECK (tenant_id = (SELECT %%I.drm_tenant()))',
                     %1$L, table_name, %1$L, %1$L);
      EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %%I.%%I TO drm_plugin',
                     %1$L, table_name);
      FOR seq IN
        SELECT s.relname FROM pg_class s
        JOIN pg_depend d ON d.objid = s.oid AND d.deptype IN ('a', 'i')
        JOIN pg_class t ON t.oid = d.refobjid
        WHERE s.relkind = 'S' AND t.relname = table_name AND t.relnamespace = %1$L::regnamespace
      LOOP
        EXECUTE format('GRANT USAGE ON SEQUENCE %%I.%%I TO drm_plugin', %1$L, seq);
      END LOOP;
    END
    $body$
  $f$, schema_name);
END
$$;
