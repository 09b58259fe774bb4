"""The ``drm-taskiq`` command: migrations, tenants, run history, enqueueing, job status and
plugin signing (``plugins keygen``, ``plugins sign``, ``plugins verify``).

Exit status: 0 on success, 1 when a service fails or a job is not found, 2 on bad input or
settings (the message goes to stderr as ``error: ...``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from redis.exceptions import RedisError

from drm_taskiq import signing, store
from drm_taskiq.errors import DrmTaskiqError, InvalidInputError, SettingsError
from drm_taskiq.logs import configure_logging
from drm_taskiq.options import check_id
from drm_taskiq.plugins import load_object, load_verified, plugin_directory
from drm_taskiq.settings import Settings, load_settings

if TYPE_CHECKING:
    from drm_taskiq.jobs import JobScheduler

RUN_COLUMNS = ("executed_at", "tenant", "plugin", "hook_name", "status", "attempt", "error")
ERROR_WIDTH = 60
MAX_LIMIT = 10_000

_RUNS_QUERY = """
SELECT executed_at, tenant_id AS tenant, plugin_id AS plugin, hook_name, status,
       result->>'attemptsMade' AS attempt, error
FROM plugin_runs
WHERE ($1::text IS NULL OR tenant_id = $1) AND ($2::text IS NULL OR plugin_id = $2)
ORDER BY executed_at DESC
LIMIT $3
"""


def _limit(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_LIMIT}")
    return value


def _add_admin_commands(commands: Any) -> None:
    """Failed jobs, schedules and the circuit breaker."""
    failed = commands.add_parser("failed", help="list a tenant's failed jobs of a plugin")
    failed.add_argument("plugin", metavar="PLUGIN")
    failed.add_argument("--tenant", required=True, metavar="TENANT_ID")
    failed.add_argument("--limit", type=_limit, default=50, metavar="N")

    retry = commands.add_parser("retry", help="run a failed job again")
    retry.add_argument("plugin", metavar="PLUGIN")
    retry.add_argument("job", metavar="JOB")
    retry.add_argument("job_id", metavar="JOB_ID")

    dead = commands.add_parser(
        "dead", help="list dead-lettered jobs (undecodable, or their task not registered)"
    )
    dead.add_argument("--limit", type=_limit, default=50, metavar="N")
    dead.add_argument(
        "--purge",
        action="store_true",
        help="empty the list and delete those jobs that are still failed",
    )

    schedules = commands.add_parser("schedules", help="a tenant's cron schedules, next runs")
    schedules.add_argument("--tenant", required=True, metavar="TENANT_ID")
    schedules.add_argument("--count", type=_limit, default=3, metavar="N")

    paused = commands.add_parser("paused", help="plugins paused by the circuit breaker")
    paused.add_argument("--tenant", metavar="TENANT_ID")

    resume = commands.add_parser("resume", help="resume a plugin paused for a tenant")
    resume.add_argument("plugin", metavar="PLUGIN")
    resume.add_argument("--tenant", required=True, metavar="TENANT_ID")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``drm-taskiq`` and its subcommands."""
    parser = argparse.ArgumentParser(prog="drm-taskiq", description="drm-taskiq job system tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("migrate", help="apply the database migrations not yet applied")
    commands.add_parser(
        "ledger",
        help="write the run ledger (plugin_runs) until SIGTERM, as a dedicated writer",
    )

    tenant = commands.add_parser("tenant", help="manage tenants")
    tenant_commands = tenant.add_subparsers(dest="tenant_command", required=True, metavar="ACTION")
    add = tenant_commands.add_parser("add", help="create a tenant and enable plugins for it")
    add.add_argument("tenant_id", metavar="TENANT_ID")
    add.add_argument("--name", default="", help="display name")
    add.add_argument(
        "--plugin",
        dest="plugins",
        action="extend",
        nargs="+",
        default=[],
        metavar="ID",
        help="plugin ids to enable",
    )
    add.add_argument("--config", help="JSON object: the config of every plugin given")

    runs = commands.add_parser("runs", help="print the plugin_runs history, newest last")
    runs.add_argument("--tenant")
    runs.add_argument("--plugin")
    runs.add_argument("--limit", type=_limit, default=50, help="rows (default 50)")

    enqueue = commands.add_parser("enqueue", help="enqueue a one-off job; prints its id")
    enqueue.add_argument("plugin", metavar="PLUGIN")
    enqueue.add_argument("job", metavar="JOB")
    enqueue.add_argument("--tenant", required=True)
    enqueue.add_argument("--data", help="JSON payload")
    enqueue.add_argument("--priority", type=int, help="0 (highest) .. 2**21 - 1")
    enqueue.add_argument("--delay", type=int, metavar="MS", help="milliseconds before it may run")
    enqueue.add_argument("--job-id", help="caller-chosen id (deduplicates)")

    commands.add_parser(
        "queue", help="print the queue at a glance as JSON (jobs per state, ledger, dead letters)"
    )
    status = commands.add_parser("status", help="print a job's status as JSON")
    status.add_argument("plugin", metavar="PLUGIN")
    status.add_argument("job", metavar="JOB")
    status.add_argument("job_id", metavar="JOB_ID")

    _add_admin_commands(commands)

    plugins = commands.add_parser("plugins", help="sign plugins and verify their signatures")
    plugin_commands = plugins.add_subparsers(
        dest="plugins_command", required=True, metavar="ACTION"
    )
    keygen = plugin_commands.add_parser(
        "keygen", help="create an Ed25519 key pair; prints the public key for DRM_TRUSTED_KEYS"
    )
    keygen.add_argument("--out", required=True, type=Path, metavar="DIR")
    keygen.add_argument("--name", default="drm-plugin-key", help="file name stem")
    sign = plugin_commands.add_parser(
        "sign", help="write drm-plugin.json and drm-plugin.sig into the plugin's package"
    )
    sign.add_argument("spec", metavar="MODULE:ATTR")
    sign.add_argument("--key", required=True, type=Path, metavar="PRIVATE_KEY_FILE")
    verify = plugin_commands.add_parser(
        "verify", help="check a plugin's signature and files (exit 0: it would load)"
    )
    verify.add_argument("spec", metavar="MODULE:ATTR")
    verify.add_argument(
        "--key",
        dest="keys",
        action="append",
        default=[],
        metavar="PUBKEY",
        help="trusted public key: base64, or a file holding it (repeatable;"
        " default: DRM_TRUSTED_KEYS)",
    )
    return parser


def parse_json(text: str | None, option: str) -> Any:
    """The JSON value of a command-line option (None when absent); InvalidInputError if bad."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(option, f"must be valid JSON ({exc})") from None


def enqueue_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The job options given on the command line, or None when there are none."""
    options = {
        key: value
        for key, value in (
            ("priority", args.priority),
            ("delay", args.delay),
            ("job_id", args.job_id),
        )
        if value is not None
    }
    return options or None


def tenant_plugins(args: argparse.Namespace) -> dict[str, Any]:
    """Plugin id -> config for ``tenant add``; ``--config`` applies to every ``--plugin``."""
    check_id(args.tenant_id, "TENANT_ID")
    for plugin_id in args.plugins:
        check_id(plugin_id, "--plugin")
    config = parse_json(args.config, "--config")
    if config is not None and not isinstance(config, dict):
        raise InvalidInputError("--config", "must be a JSON object")
    if config is not None and not args.plugins:
        raise InvalidInputError("--config", "needs at least one --plugin to apply to")
    return {plugin_id: dict(config or {}) for plugin_id in args.plugins}


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="milliseconds")
    text = " ".join(str(value).split())  # one line: tracebacks and messages may hold newlines
    if column == "error" and len(text) > ERROR_WIDTH:
        return text[: ERROR_WIDTH - 1] + "…"
    return text


def format_runs(rows: Sequence[Mapping[str, Any]]) -> str:
    """``plugin_runs`` rows as a text table with aligned columns (the last one is not padded)."""
    if not rows:
        return "(no runs)"
    table = [list(RUN_COLUMNS)] + [[_cell(c, row.get(c)) for c in RUN_COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(RUN_COLUMNS) - 1)]
    lines = []
    for line in table:
        padded = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        lines.append("  ".join([*padded, line[-1]]).rstrip())
    return "\n".join(lines)


async def _migrate(settings: Settings, _: argparse.Namespace) -> int:
    applied = await store.migrate(settings)
    print("\n".join(applied) if applied else "nothing to apply")
    return 0


async def _tenant_add(settings: Settings, args: argparse.Namespace) -> int:
    plugins = tenant_plugins(args)
    pool = await store.create_pool(settings, max_size=1)
    try:
        await store.ensure_tenant(pool, args.tenant_id, name=args.name, plugins=plugins)
    finally:
        await pool.close()
    print(f"tenant {args.tenant_id}: plugins {', '.join(plugins) or '(none)'}")
    return 0


async def _runs(settings: Settings, args: argparse.Namespace) -> int:
    pool = await store.create_pool(settings, max_size=1)
    try:
        rows = await pool.fetch(_RUNS_QUERY, args.tenant, args.plugin, args.limit)
    finally:
        await pool.close()
    print(format_runs([dict(row) for row in reversed(rows)]))
    return 0


async def _enqueue(_: Settings, args: argparse.Namespace) -> int:
    data = parse_json(args.data, "--data")
    options = enqueue_options(args)
    from drm_taskiq.jobs import get_scheduler  # noqa: PLC0415  (builds the broker: only here)

    scheduler = get_scheduler()
    await scheduler.start()
    try:
        job_id = await scheduler.add_job(
            args.plugin, args.job, data, options, tenant_id=args.tenant
        )
    finally:
        await scheduler.close()
    print(job_id)
    return 0


async def _status(_: Settings, args: argparse.Namespace) -> int:
    from drm_taskiq.jobs import get_scheduler  # noqa: PLC0415  (builds the broker: only here)

    scheduler = get_scheduler()
    await scheduler.start()
    try:
        status = await scheduler.get_job_status(args.plugin, args.job, args.job_id)
    finally:
        await scheduler.close()
    if status is None:
        print(f"error: no job {args.job_id!r} for {args.plugin}:{args.job}", file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(status), default=str, indent=2))
    return 0


async def _queue(settings: Settings, _: argparse.Namespace) -> int:
    """``RedisQueue.stats`` (Redis only: no plugins are loaded, PostgreSQL is not needed)."""
    from redis.asyncio import Redis  # noqa: PLC0415

    from drm_taskiq.redis_queue import RedisQueue  # noqa: PLC0415

    redis = Redis.from_url(settings.redis_url)
    try:
        stats = await RedisQueue(redis, settings.key_prefix, settings.queue).stats()
    finally:
        await redis.aclose()
    print(json.dumps(stats, indent=2))
    return 0


async def _with_scheduler(action: Callable[[JobScheduler], Awaitable[int]]) -> int:
    from drm_taskiq.jobs import get_scheduler  # noqa: PLC0415  (builds the broker: only here)

    scheduler = get_scheduler()
    await scheduler.start()
    try:
        return await action(scheduler)
    finally:
        await scheduler.close()


async def _failed(_: Settings, args: argparse.Namespace) -> int:
    async def action(scheduler: JobScheduler) -> int:
        jobs = await scheduler.list_failed(args.plugin, tenant_id=args.tenant, limit=args.limit)
        for job in jobs:
            print(
                f"{job.finished_on}  {job.job_name}  {job.id}  attempts={job.attempts_made}"
                f"  {job.failed_reason}"
            )
        print(f"{len(jobs)} failed job(s)")
        return 0

    return await _with_scheduler(action)


async def _retry(_: Settings, args: argparse.Namespace) -> int:
    async def action(scheduler: JobScheduler) -> int:
        if await scheduler.retry_job(args.plugin, args.job, args.job_id):
            print(f"retrying {args.job_id}")
            return 0
        print(
            f"error: job {args.job_id!r} is not a failed {args.plugin}:{args.job} job",
            file=sys.stderr,
        )
        return 1

    return await _with_scheduler(action)


async def _dead(_: Settings, args: argparse.Namespace) -> int:
    async def action(scheduler: JobScheduler) -> int:
        if args.purge:
            entries, deleted = await scheduler.purge_dead()
            print(
                f"removed {entries} dead-letter entr{'y' if entries == 1 else 'ies'},"
                f" deleted {deleted} job(s)"
            )
            return 0
        jobs = await scheduler.list_dead(limit=args.limit)
        for job in jobs:
            print(
                f"{job['id']}  {job['state']}  {job.get('tenant', '')}"
                f"  {job.get('plugin', '')}:{job.get('job', '')}  {job.get('reason', '')}"
            )
        print(f"{len(jobs)} dead-lettered job(s)")
        return 0

    return await _with_scheduler(action)


async def _schedules(_: Settings, args: argparse.Namespace) -> int:
    async def action(scheduler: JobScheduler) -> int:
        infos = await scheduler.list_schedules(args.tenant, count=args.count)
        for info in infos:
            nxt = ", ".join(run.isoformat() for run in info.next_runs)
            print(
                f"{info.plugin_id}:{info.job_name}  {info.cron!r} {info.tz}  next: {nxt}"
                f"  last: {info.last_fired} {info.last_status or ''}"
            )
        print(f"{len(infos)} schedule(s)")
        return 0

    return await _with_scheduler(action)


async def _paused(_: Settings, args: argparse.Namespace) -> int:
    async def action(scheduler: JobScheduler) -> int:
        pairs = await scheduler.paused_plugins(args.tenant)
        for tenant_id, plugin_id in pairs:
            print(f"{tenant_id}  {plugin_id}")
        print(f"{len(pairs)} paused")
        return 0

    return await _with_scheduler(action)


async def _resume(_: Settings, args: argparse.Namespace) -> int:
    async def action(scheduler: JobScheduler) -> int:
        if await scheduler.resume_plugin(args.plugin, tenant_id=args.tenant):
            print(f"resumed {args.plugin} for {args.tenant}")
        else:
            print(f"{args.plugin} was not paused for {args.tenant}")
        return 0

    return await _with_scheduler(action)


def plugin_spec(spec: str) -> str:
    """The module of a ``MODULE:ATTR`` plugin spec; InvalidInputError if it is not one."""
    module, _, attribute = spec.partition(":")
    if not module or not attribute:
        raise InvalidInputError(
            "MODULE:ATTR", f"{spec!r} must look like 'package.module:attribute'"
        )
    return module


def public_key_argument(text: str) -> bytes:
    """A ``--key`` of ``plugins verify``: base64, or the path of a file holding it."""
    path = Path(text)
    try:
        return signing.parse_public_key(path.read_text("ascii") if path.is_file() else text)
    except (ValueError, OSError) as exc:
        raise InvalidInputError("--key", f"{text!r}: {exc}") from None


async def _plugins_keygen(_: Settings, args: argparse.Namespace) -> int:
    private_path = args.out / f"{args.name}.pem"
    public_path = args.out / f"{args.name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise InvalidInputError("--out", f"{path} exists; keys are never overwritten")
    key = signing.generate_private_key()
    public_key = signing.encode_public_key(signing.public_key_of(key))
    args.out.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(signing.private_key_pem(key))
    public_path.write_text(public_key + "\n", "ascii")
    print(f"private key: {private_path} (keep it secret, out of the repository)")
    print(f"public key:  {public_path} (key id {signing.key_id(signing.public_key_of(key))})")
    print(public_key)
    return 0


async def _plugins_sign(_: Settings, args: argparse.Namespace) -> int:
    directory = plugin_directory(plugin_spec(args.spec))
    try:
        key = signing.load_private_key(args.key)
    except ValueError as exc:
        raise InvalidInputError("--key", str(exc)) from None
    plugin = load_object(args.spec)
    manifest = signing.sign_package(directory, key, plugin_id=plugin.id, version=plugin.version)
    key_id = signing.key_id(signing.public_key_of(key))
    print(f"signed plugin {plugin.id!r} {plugin.version} with key {key_id}: {directory}")
    for path in manifest.files:
        print(f"  {path}")
    return 0


async def _plugins_verify(settings: Settings, args: argparse.Namespace) -> int:
    module = plugin_spec(args.spec)
    if args.keys:
        keys = [public_key_argument(text) for text in args.keys]
    else:
        keys = [signing.parse_public_key(text) for text in settings.trusted_keys]
    plugin, verified = load_verified(
        args.spec, module, lambda: load_object(args.spec), trusted_keys=keys
    )
    if verified is None:  # cannot happen: with allow_unsigned off, every refusal raises
        raise DrmTaskiqError(f"plugin {args.spec!r} was not verified")
    print(
        f"ok: plugin {plugin.id!r} {plugin.version}, {len(verified.manifest.files)} files,"
        f" signed by trusted key {verified.key_id}"
    )
    return 0


_PLUGIN_COMMANDS = {
    "keygen": _plugins_keygen,
    "sign": _plugins_sign,
    "verify": _plugins_verify,
}


async def _plugins(settings: Settings, args: argparse.Namespace) -> int:
    return await _PLUGIN_COMMANDS[args.plugins_command](settings, args)


async def _ledger(settings: Settings, args: argparse.Namespace) -> int:
    from drm_taskiq.runlog import serve  # noqa: PLC0415

    return await serve(settings)


_COMMANDS = {
    "migrate": _migrate,
    "ledger": _ledger,
    "tenant": _tenant_add,
    "runs": _runs,
    "enqueue": _enqueue,
    "status": _status,
    "queue": _queue,
    "failed": _failed,
    "retry": _retry,
    "dead": _dead,
    "schedules": _schedules,
    "paused": _paused,
    "resume": _resume,
    "plugins": _plugins,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``drm-taskiq``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings.log_format, settings.log_level)
        return asyncio.run(_COMMANDS[args.command](settings, args))
    except (SettingsError, InvalidInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except asyncpg.UndefinedTableError as exc:
        print(f"error: {exc} (run `drm-taskiq migrate` first)", file=sys.stderr)
        return 1
    except (DrmTaskiqError, OSError, asyncpg.PostgresError, RedisError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
