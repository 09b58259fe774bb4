"""PostgreSQL access: the connection pool and the versioned migrations in ``sql/migrations``."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

import asyncpg
import structlog

from drm_taskiq.settings import Settings, mask_url

log = structlog.get_logger()

_MIGRATIONS_LOCK = 0x64726D74  # "drmt": advisory lock serialising concurrent migrators


def _migrations() -> list[tuple[int, str, str]]:
    folder = resources.files("drm_taskiq") / "sql" / "migrations"
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql"):
            found.append((int(name.split("_", 1)[0]), name, entry.read_text(encoding="utf-8")))
    return sorted(found)


async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections use the configured schema as their ``search_path``."""
    try:
        pool = await asyncpg.create_pool(
            settings.database_url,
            min_size=min_size,
            max_size=max_size,
            server_settings={"search_path": f"{settings.db_schema},public"},
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise ConnectionError(
            f"cannot connect to PostgreSQL at {mask_url(settings.database_url)}: {exc}"
        ) from None
    assert pool is not None
    return pool


async def create_plugin_pool(settings: Settings, *, max_size: int = 10) -> asyncpg.Pool:
    """The pool plugin code uses: it logs in as the row-level-security role (see migration 3)."""
    try:
        pool = await asyncpg.create_pool(
            settings.plugin_dsn(),
            min_size=0,
            max_size=max_size,
            server_settings={"search_path": f"{settings.db_schema},public"},
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise ConnectionError(
            f"cannot connect to PostgreSQL as the plugin role at {mask_url(settings.plugin_dsn())}:"
            f" {exc}"
        ) from None
    assert pool is not None
    return pool


async def tenant_binding_secret(pool: asyncpg.Pool) -> bytes:
    """The secret that signs a transaction's tenant binding (never given to plugin code)."""
    value = await pool.fetchval("SELECT value FROM drm_secrets WHERE name = 'tenant_binding'")
    if value is None:
        raise ConnectionError("the schema has no tenant binding secret: run drm-taskiq migrate")
    return bytes(value)


async def migrate(settings: Settings) -> list[str]:
    """Apply the migrations not yet applied; safe when several processes start at once."""
    conn = await asyncpg.connect(settings.database_url)
    applied: list[str] = []
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATIONS_LOCK)
            schema = settings.db_schema
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(f'SET LOCAL search_path TO "{schema}", public')
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL,"
                " applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW())"
            )
            done = {
                row["version"]: row["checksum"]
                for row in await conn.fetch("SELECT version, checksum FROM schema_migrations")
            }
            for version, name, sql in _migrations():
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if version in done:
                    if done[version] != checksum:
                        log.warning("migration_changed", migration=name)
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    version,
                    name,
                    checksum,
                )
                applied.append(name)
    finally:
        await conn.close()
    if applied:
        log.info("migrations_applied", migrations=applied, schema=settings.db_schema)
    return applied


async def apply_plugin_schema(pool: asyncpg.Pool, plugin_id: str, sql: str) -> bool:
    """Run a plugin's DDL with the platform's rights, one process at a time, unless this very
    DDL was applied already (its checksum in ``plugin_schemas``); True when it ran. Without
    that table (migrations not applied) it always runs."""
    lock = int.from_bytes(hashlib.sha256(f"plugin-schema:{plugin_id}".encode()).digest()[:8], "big")
    checksum = hashlib.sha256(sql.encode()).hexdigest()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock - 2**63)
        tracked = await conn.fetchval("SELECT to_regclass('plugin_schemas') IS NOT NULL")
        if tracked:
            applied = await conn.fetchval(
                "SELECT checksum FROM plugin_schemas WHERE plugin_id = $1", plugin_id
            )
            if applied == checksum:
                return False
        await conn.execute(sql)
        if tracked:
            await conn.execute(
                "INSERT INTO plugin_schemas (plugin_id, checksum) VALUES ($1, $2)"
                " ON CONFLICT (plugin_id) DO UPDATE"
                " SET checksum = EXCLUDED.checksum, applied_at = NOW()",
                plugin_id,
                checksum,
            )
    return True


async def fetch_enabled_tenants(pool: asyncpg.Pool, plugin_id: str) -> list[str]:
    """Tenants that have ``plugin_id`` enabled."""
    rows = await pool.fetch(
        "SELECT tenant_id FROM tenant_plugins WHERE plugin_id = $1 AND enabled ORDER BY tenant_id",
        plugin_id,
    )
    return [row["tenant_id"] for row in rows]


async def fetch_enabled_pairs(pool: asyncpg.Pool, plugin_ids: list[str]) -> list[tuple[str, str]]:
    """(plugin, tenant) pairs enabled for any of ``plugin_ids``, by plugin then tenant."""
    rows = await pool.fetch(
        "SELECT plugin_id, tenant_id FROM tenant_plugins WHERE plugin_id = ANY($1::text[])"
        " AND enabled ORDER BY plugin_id, tenant_id",
        plugin_ids,
    )
    return [(row["plugin_id"], row["tenant_id"]) for row in rows]


async def tenant_plugin_enabled(pool: asyncpg.Pool, tenant_id: str, plugin_id: str) -> bool | None:
    """True/False for an enabled/disabled plugin, None when the tenant does not exist."""
    row = await pool.fetchrow(
        "SELECT t.tenant_id, tp.enabled FROM tenants t"
        " LEFT JOIN tenant_plugins tp ON tp.tenant_id = t.tenant_id AND tp.plugin_id = $2"
        " WHERE t.tenant_id = $1",
        tenant_id,
        plugin_id,
    )
    if row is None:
        return None
    return bool(row["enabled"])


async def ensure_tenant(
    pool: asyncpg.Pool, tenant_id: str, *, name: str = "", plugins: dict[str, Any] | None = None
) -> None:
    """Create the tenant if missing and enable ``plugins`` (id -> config) for it."""
    await pool.execute(
        "INSERT INTO tenants (tenant_id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        tenant_id,
        name,
    )
    for plugin_id, config in (plugins or {}).items():
        await pool.execute(
            "INSERT INTO tenant_plugins (tenant_id, plugin_id, enabled, config)"
            " VALUES ($1, $2, TRUE, $3::jsonb)"
            " ON CONFLICT (tenant_id, plugin_id)"
            " DO UPDATE SET enabled = TRUE, config = EXCLUDED.config",
            tenant_id,
            plugin_id,
            json.dumps(config or {}),
        )
