"""Hostile input (issue 7, point 7): property-based tests that drive the public API with ids full
of Redis key syntax, arbitrary and oversized JSON, random cron strings and time zones, and poison
messages put straight into the queue.

Every call is either accepted and round-trips exactly, or refused with an InvalidInputError that
names the argument; no key leaves the queue's hash-tagged prefix; poison is dead-lettered.

The random strategies leave out a few input classes (NUL, lone surrogates, impossible cron dates,
directory-like zone names); each has a dedicated test below. Return values are compared with
their types: a float comes back a float (test_float_return_value_stays_a_float).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from zoneinfo import available_timezones

import asyncpg
import pytest
import redis.asyncio as aioredis
from croniter import CroniterBadDateError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from taskiq import TaskiqMessage

from drm_taskiq import InvalidInputError, JobOptions, JobScheduler, JobStatus, store
from drm_taskiq.cron import next_slot
from drm_taskiq.options import task_name
from tests.conftest import WorkerHandle, wait_for

T = TypeVar("T")

# Function-scoped fixtures (client, worker, tenant) are shared by the examples of one test on
# purpose: one worker and one schema per test keeps the whole file well under two minutes.
_SHARED = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    deadline=None,
    database=None,
)


def shared(max_examples: int) -> settings:
    """Hypothesis settings for these tests: shared fixtures, no deadline, no example database."""
    return settings(_SHARED, max_examples=max_examples)


# The documented rules (options.check_id / check_job_id error messages), as full matches.
ID_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
JOB_ID_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@=+-]{0,254}")

REDIS_SYNTAX = "{}:*?[]^\\ \n\r\t\x00\"'/@=+.-_,;#%$!~`|<>()"
UNICODE = "éß€😀\u200b\u2028\ufeff\u0130\u0131𝄞\u0301"
NASTY = [
    "",
    "{",
    "}",
    "*",
    ":",
    " ",
    "\n",
    "\x00",
    "a}{b",
    "x:*",
    "{drm:default}:wait",
    "}:job:",
    "../../etc",
    "a" * 128,
    "a" * 129,
    "a" * 255,
    "a" * 256,
]


def _spliced(core: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid id with hostile characters before, inside or after it."""
    junk = st.text(st.sampled_from(REDIS_SYNTAX + UNICODE), min_size=1, max_size=4)
    return st.one_of(
        st.builds(lambda a, b: a + b, core, junk),
        st.builds(lambda a, b: a + b, junk, core),
        st.builds(lambda a, b: a[:1] + b + a[1:], core, junk),
    )


_short_id = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,15}", fullmatch=True)
hostile_ids = st.one_of(
    st.text(st.sampled_from(REDIS_SYNTAX + UNICODE + "aZ09"), max_size=40),
    st.text(max_size=40),
    st.text(st.characters(categories=["Cs"]) | st.sampled_from("a1"), min_size=1, max_size=6),
    st.from_regex(ID_RULE, fullmatch=True),
    st.from_regex(JOB_ID_RULE, fullmatch=True),
    _spliced(_short_id),
    st.integers(1, 400).map(lambda n: "a" * n),
    st.sampled_from(NASTY),
)


def _documented(rule: re.Pattern[str], value: str) -> bool | None:
    """True / False by the documented rule; None when either outcome is tolerated.

    Was a bug (test_ids_ending_in_a_newline_are_refused): the product's ``$`` also matches before
    a trailing newline, so ``valid + "\\n"`` is accepted; the property tests tolerate that.
    """
    if rule.fullmatch(value):
        return True
    if value.endswith("\n") and rule.fullmatch(value[:-1]):
        return None
    return False


def _storable(value: str) -> bool:
    """Whether PostgreSQL can store ``value`` as text (no NUL, valid UTF-8)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


async def attempt(call: Callable[[], Awaitable[T]]) -> T | InvalidInputError:
    """The call's result, or the InvalidInputError it raised (anything else propagates)."""
    try:
        return await call()
    except InvalidInputError as exc:
        return exc


def assert_refused(outcome: object, *fields: str) -> None:
    """``outcome`` is an InvalidInputError naming one of ``fields`` with a non-empty message."""
    assert isinstance(outcome, InvalidInputError), f"expected a refusal, got {outcome!r}"
    assert outcome.field in fields, (outcome.field, fields, str(outcome))
    assert outcome.rule.strip()
    assert str(outcome).strip()


async def echo(ctx: Any, job: Any) -> Any:
    return job.data


async def register_echo(scheduler: JobScheduler) -> None:
    await scheduler.register_job("testp", "echo", echo)


async def assert_keys_within_prefix(redis_client: aioredis.Redis, client: JobScheduler) -> None:
    """Every key that mentions the test's key prefix starts with ``{prefix:default}:``."""
    base = client.broker.queue.keys.base.encode() + b":"
    prefix = client.settings.key_prefix
    keys = [key async for key in redis_client.scan_iter(match=f"*{prefix}*", count=10_000)]
    stray = [key for key in keys if not key.startswith(base)]
    assert not stray, stray


async def queue_is_empty(redis_client: aioredis.Redis, client: JobScheduler) -> None:
    """Nothing is waiting, delayed or active, and no job hash exists."""
    queue = client.broker.queue
    assert await queue.counts() == {"waiting": 0, "delayed": 0, "active": 0}
    hashes = [key async for key in redis_client.scan_iter(match=f"{queue.keys.job_prefix}*")]
    assert not hashes, hashes


# ---------------------------------------------------------------------------------------- ids
async def _plugin_id_flow(client: JobScheduler, db: asyncpg.Pool, tenant: str, value: str) -> None:
    expect = _documented(ID_RULE, value)
    registered = await attempt(lambda: client.register_job(value, "echo", echo))
    if isinstance(registered, InvalidInputError):
        assert expect is not True, f"valid plugin id {value!r} refused: {registered}"
        assert_refused(registered, "plugin_id")
        assert_refused(
            await attempt(lambda: client.add_job(value, "echo", 1, tenant_id=tenant)), "plugin_id"
        )
        assert_refused(
            await attempt(lambda: client.get_job_status(value, "echo", "j1")), "plugin_id"
        )
        return
    assert expect is not False, f"plugin id {value!r} breaks the rule but was accepted"
    assert client.broker.find_task(task_name(value, "echo")) is not None
    await store.ensure_tenant(db, tenant, plugins={value: {}})
    job_id = await client.add_job(value, "echo", {"p": value}, tenant_id=tenant)
    status = await client.get_job_status(value, "echo", job_id, tenant_id=tenant)
    assert status is not None
    assert (status.id, status.plugin_id, status.job_name, status.tenant_id, status.state) == (
        job_id,
        value,
        "echo",
        tenant,
        "waiting",
    )


async def _job_name_flow(client: JobScheduler, tenant: str, value: str) -> None:
    expect = _documented(ID_RULE, value)
    registered = await attempt(lambda: client.register_job("testp", value, echo))
    if isinstance(registered, InvalidInputError):
        assert expect is not True, f"valid job name {value!r} refused: {registered}"
        assert_refused(registered, "job_name")
        assert_refused(
            await attempt(lambda: client.add_job("testp", value, 1, tenant_id=tenant)), "job_name"
        )
        assert_refused(
            await attempt(lambda: client.get_job_status("testp", value, "j1")), "job_name"
        )
        return
    assert expect is not False, f"job name {value!r} breaks the rule but was accepted"
    job_id = await client.add_job("testp", value, {"n": value}, tenant_id=tenant)
    status = await client.get_job_status("testp", value, job_id, tenant_id=tenant)
    assert status is not None
    assert (status.id, status.job_name, status.plugin_id, status.state) == (
        job_id,
        value,
        "testp",
        "waiting",
    )


async def _tenant_id_flow(client: JobScheduler, db: asyncpg.Pool, value: str) -> None:
    expect = _documented(ID_RULE, value)
    if _storable(value):
        # The tenant exists whenever PostgreSQL can hold its id, so a refusal of a bad id cannot
        # be explained away by "unknown tenant": it must come from the id rule.
        await store.ensure_tenant(db, value, plugins={"testp": {}})
    added = await attempt(lambda: client.add_job("testp", "echo", {"t": 1}, tenant_id=value))
    if isinstance(added, InvalidInputError):
        assert expect is not True, f"valid tenant id {value!r} refused: {added}"
        assert_refused(added, "tenant_id")
        with pytest.raises(InvalidInputError) as caught:
            client.for_tenant(value)
        assert_refused(caught.value, "tenant_id")
        refused = await attempt(
            lambda: client.register_job(
                "testp", "nightly", echo, {"cron": "0 3 * * *"}, tenant_id=value
            )
        )
        assert_refused(refused, "tenant_id")
        if _storable(value):
            # get_job_status only compares tenant_id: a bad one matches nothing. Was a bug
            # (test_get_job_status_with_an_unstorable_tenant_id_is_refused_or_none): NUL or a
            # lone surrogate reaches PostgreSQL and raises asyncpg's error.
            status = await attempt(
                lambda: client.get_job_status("testp", "echo", "j1", tenant_id=value)
            )
            if status is not None:
                assert_refused(status, "tenant_id")
        return
    assert expect is not False, f"tenant id {value!r} breaks the rule but was accepted"
    status = await client.get_job_status("testp", "echo", added, tenant_id=value)
    assert status is not None
    assert (status.id, status.tenant_id, status.state) == (added, value, "waiting")
    scoped = client.for_tenant(value)
    assert await scoped.get_job_status("testp", "echo", added) is not None
    await scoped.register_job("testp", "nightly", echo, {"cron": "0 3 * * *"})
    listed = [(s.tenant_id, s.job_name, s.cron) for s in await scoped.list_schedules(count=1)]
    assert (value, "nightly", "0 3 * * *") in listed


async def _job_id_flow(
    client: JobScheduler, tenant: str, redis_client: aioredis.Redis, value: str
) -> None:
    expect = _documented(JOB_ID_RULE, value)
    added = await attempt(
        lambda: client.add_job("testp", "echo", {"j": 1}, {"job_id": value}, tenant_id=tenant)
    )
    if isinstance(added, InvalidInputError):
        assert expect is not True, f"valid job id {value!r} refused: {added}"
        assert_refused(added, "options.job_id")
        assert_refused(
            await attempt(lambda: client.get_job_status("testp", "echo", value)), "job_id"
        )
        return
    assert expect is not False, f"job id {value!r} breaks the rule but was accepted"
    assert added == value
    status = await client.get_job_status("testp", "echo", value, tenant_id=tenant)
    assert status is not None
    assert (status.id, status.plugin_id, status.tenant_id) == (value, "testp", tenant)
    key = client.broker.queue.keys.base.encode() + b":job:" + value.encode()
    assert await redis_client.hget(key, "plugin") == b"testp"


@shared(120)
@given(value=hostile_ids)
@example(value="{x}:*\n")
@example(value="a" * 129)
@example(value="ok.id-1")
async def test_hostile_ids_are_refused_by_name_or_round_trip(
    client: JobScheduler,
    db: asyncpg.Pool,
    tenant: str,
    redis_client: aioredis.Redis,
    value: str,
) -> None:
    """Ids with key syntax, unicode, NULs or odd lengths are refused by field or round-trip."""
    await register_echo(client)
    await _plugin_id_flow(client, db, tenant, value)
    await _job_name_flow(client, tenant, value)
    await _tenant_id_flow(client, db, value)
    await _job_id_flow(client, tenant, redis_client, value)
    await assert_keys_within_prefix(redis_client, client)


async def test_hostile_ids_create_no_key_outside_the_prefix(
    client: JobScheduler, db: asyncpg.Pool, tenant: str, redis_client: aioredis.Redis
) -> None:
    """After hostile ids are used, no new key anywhere in Redis lies outside the queue prefix."""
    before = {key async for key in redis_client.scan_iter(count=10_000)}
    await register_echo(client)
    values = [
        *NASTY,
        "escape}:job:x",
        "{t_other:default}:job:1",
        "id-with:colon@and=plus+sign",
        "x" * 300,
        "sp ace",
        "tab\tid",
        "😀emoji",
        "ok-plain.id_1",
    ]
    for value in values:
        await _plugin_id_flow(client, db, tenant, value)
        await _job_name_flow(client, tenant, value)
        await _tenant_id_flow(client, db, value)
        await _job_id_flow(client, tenant, redis_client, value)
    after = {key async for key in redis_client.scan_iter(count=10_000)}
    base = client.broker.queue.keys.base.encode() + b":"
    prefix = client.settings.key_prefix.encode()
    created = after - before
    assert any(key.startswith(base) for key in created)
    # Other processes may share the server: a stray key is one that mentions this test's prefix
    # or one of its (distinctive) ids without living under the queue's hash tag.
    markers = [prefix] + [v.encode() for v in values if len(v) >= 8 and _storable(v)]
    stray = [
        key
        for key in created
        if not key.startswith(base) and any(marker in key for marker in markers)
    ]
    assert not stray, stray


async def test_ids_ending_in_a_newline_are_refused(client: JobScheduler, tenant: str) -> None:
    """An id with a trailing newline breaks the id rule and is refused like any other."""
    await register_echo(client)

    async def bind_tenant() -> object:
        return client.for_tenant(tenant + "\n")

    sites: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("tenant_id", bind_tenant),
        ("plugin_id", lambda: client.register_job("testp\n", "echo", echo)),
        ("job_name", lambda: client.register_job("testp", "echo\n", echo)),
        (
            "options.job_id",
            lambda: client.add_job("testp", "echo", 1, {"job_id": "job-1\n"}, tenant_id=tenant),
        ),
        ("job_id", lambda: client.get_job_status("testp", "echo", "job-1\n")),
    ]
    outcomes = [(field, await attempt(call)) for field, call in sites]
    for field, outcome in outcomes:
        assert_refused(outcome, field)


# --------------------------------------------------------------------------------------- data
def _text(**kwargs: Any) -> st.SearchStrategy[str]:
    # Was a bug (test_text_postgres_cannot_store_is_refused_or_recorded): NUL and lone
    # surrogates are left out here.
    return st.text(st.characters(codec="utf-8", exclude_characters="\x00"), **kwargs)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    _text(max_size=50),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(_text(max_size=20), inner, max_size=6)
    ),
    max_leaves=40,
)


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values of the same Python types: an integer is not a float, and -0.0
    keeps its sign (return values come back as their JSON text was written: migration 0008)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    return bool(a == b)


async def run_to_the_end(
    client: JobScheduler, redis_client: aioredis.Redis, job_id: str, timeout: float = 15
) -> JobStatus:
    """Wait until the job is recorded in PostgreSQL (its hash left Redis); return its status."""
    key = client.broker.queue.keys.job(job_id)

    async def gone() -> bool:
        return not await redis_client.exists(key)

    await wait_for(gone, timeout=timeout)
    status = await client.get_job_status("testp", "echo", job_id)
    assert status is not None
    return status


@pytest.fixture
async def echo_worker(client: JobScheduler, start_worker: Any) -> WorkerHandle:
    """One in-process worker running ``testp/echo``, shared by a test's examples."""
    await register_echo(client)
    handle: WorkerHandle = await start_worker(register_echo)
    return handle


@shared(30)
@given(data=json_values)
@example(data={"": [None, True, -0.0, 2**70, "\u2028\U0001f600"]})
@example(data=[[[[[[[[[[[]]]]]]]]]]])
async def test_json_payloads_round_trip_through_a_worker(
    client: JobScheduler,
    tenant: str,
    redis_client: aioredis.Redis,
    echo_worker: WorkerHandle,
    data: Any,
) -> None:
    """Any JSON value the API accepts comes back unchanged as the echo job's returnvalue."""
    try:
        job_id = await client.add_job("testp", "echo", data, tenant_id=tenant)
    except InvalidInputError as exc:
        assert_refused(exc, "data")
        assert len(json.dumps(data)) > client.settings.max_payload_bytes
        return
    status = await run_to_the_end(client, redis_client, job_id)
    assert status.state == "completed", status.failed_reason
    assert same_json(status.returnvalue, data), (status.returnvalue, data)
    assert echo_worker.task is not None and not echo_worker.task.done()


class _Opaque:
    pass


poison_leaves = st.one_of(
    st.sets(st.integers(), max_size=3),
    st.frozensets(st.integers(), max_size=3),
    st.binary(max_size=8),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), complex(1, 2)]),
    st.builds(_Opaque),
    st.builds(object),
    st.dictionaries(st.tuples(st.integers(), st.integers()), st.none(), min_size=1, max_size=2),
    st.builds(pow, st.just(10), st.just(5000)),
)
poisoned_values = st.one_of(
    poison_leaves,
    st.builds(lambda good, bad: [good, bad], json_values, poison_leaves),
    st.builds(lambda good, bad, key: {key: bad, "ok": good}, json_values, poison_leaves, _text()),
    st.recursive(poison_leaves, lambda inner: st.lists(inner, min_size=1, max_size=3)),
)


@shared(60)
@given(data=poisoned_values)
async def test_non_json_payloads_are_refused_and_nothing_is_enqueued(
    client: JobScheduler, tenant: str, redis_client: aioredis.Redis, data: Any
) -> None:
    """Sets, bytes, NaN, infinities, objects and huge ints anywhere in data are refused."""
    await register_echo(client)
    with pytest.raises(InvalidInputError) as caught:
        await client.add_job("testp", "echo", data, tenant_id=tenant)
    assert_refused(caught.value, "data")
    await queue_is_empty(redis_client, client)


@shared(15)
@given(data=json_values, extra=st.integers(1, 5000))
async def test_oversized_payloads_are_refused_and_nothing_is_enqueued(
    client: JobScheduler, tenant: str, redis_client: aioredis.Redis, data: Any, extra: int
) -> None:
    """A payload larger than max_payload_bytes as JSON is refused naming data."""
    await register_echo(client)
    limit = client.settings.max_payload_bytes
    big = {"value": data, "pad": "x" * (limit + extra)}
    with pytest.raises(InvalidInputError) as caught:
        await client.add_job("testp", "echo", big, tenant_id=tenant)
    assert_refused(caught.value, "data")
    assert str(limit) in str(caught.value)
    await queue_is_empty(redis_client, client)


async def test_payload_at_the_size_limit_round_trips(
    client: JobScheduler, tenant: str, redis_client: aioredis.Redis, echo_worker: WorkerHandle
) -> None:
    """A payload of exactly max_payload_bytes runs and comes back; one byte more is refused."""
    limit = client.settings.max_payload_bytes
    data = "é" + "x" * (limit - 8)  # '"\\u00e9xxx…"' is exactly `limit` bytes of JSON
    assert len(json.dumps(data).encode()) == limit
    job_id = await client.add_job("testp", "echo", data, tenant_id=tenant)
    status = await run_to_the_end(client, redis_client, job_id, timeout=30)
    assert status.state == "completed" and status.returnvalue == data
    with pytest.raises(InvalidInputError) as caught:
        await client.add_job("testp", "echo", data + "x", tenant_id=tenant)
    assert_refused(caught.value, "data")


def _nested(depth: int, kind: str) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


@pytest.mark.parametrize("kind", ["list", "dict"])
async def test_very_deep_nesting_is_refused(
    client: JobScheduler, tenant: str, redis_client: aioredis.Redis, kind: str
) -> None:
    """Data nested 100,000 levels deep is refused naming data; nothing is enqueued."""
    await register_echo(client)
    with pytest.raises(InvalidInputError) as caught:
        await client.add_job("testp", "echo", _nested(100_000, kind), tenant_id=tenant)
    assert_refused(caught.value, "data")
    await queue_is_empty(redis_client, client)


@pytest.mark.parametrize(
    "depth",
    [
        254,
        pytest.param(
            300,
        ),
    ],
)
async def test_moderately_deep_nesting_is_refused_or_round_trips(
    client: JobScheduler,
    tenant: str,
    redis_client: aioredis.Redis,
    echo_worker: WorkerHandle,
    depth: int,
) -> None:
    """Data nested a few hundred levels deep is refused naming data or runs and comes back."""
    data = _nested(depth, "list")
    try:
        job_id = await client.add_job("testp", "echo", data, tenant_id=tenant)
    except InvalidInputError as exc:
        assert_refused(exc, "data")
        await queue_is_empty(redis_client, client)
        return
    status = await run_to_the_end(client, redis_client, job_id)
    assert status.state == "completed", status.failed_reason
    assert status.returnvalue == data


async def _plugin_runs(db: asyncpg.Pool) -> int:
    return int(await db.fetchval("SELECT count(*) FROM plugin_runs"))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            {"k\x00": "a\x00b"},
            id="nul",
        ),
        pytest.param(
            ["\ud800"],
            id="lone-surrogate-value",
        ),
        pytest.param(
            {"\ud83d": 1},
            id="lone-surrogate-key",
        ),
    ],
)
async def test_text_postgres_cannot_store_is_refused_or_recorded(
    client: JobScheduler,
    tenant: str,
    db: asyncpg.Pool,
    redis_client: aioredis.Redis,
    echo_worker: WorkerHandle,
    data: Any,
) -> None:
    """Data with NUL or a lone surrogate is refused naming data, or it and later runs are kept."""
    try:
        job_id = await client.add_job("testp", "echo", data, tenant_id=tenant)
    except InvalidInputError as exc:
        assert_refused(exc, "data")
        await queue_is_empty(redis_client, client)
        return
    await client.add_job("testp", "echo", "plain", tenant_id=tenant)
    await wait_for(lambda: _at_least(db, 2), timeout=5)
    status = await client.get_job_status("testp", "echo", job_id)
    assert status is not None and status.returnvalue == data


async def _plugin_runs(db: asyncpg.Pool) -> int:
    return int(await db.fetchval("SELECT count(*) FROM plugin_runs"))


async def _at_least(db: asyncpg.Pool, count: int) -> bool:
    return await _plugin_runs(db) >= count


async def test_handler_error_with_nul_is_recorded(
    client: JobScheduler, tenant: str, db: asyncpg.Pool, start_worker: Any
) -> None:
    """A handler failing with a NUL in its message is recorded, and so are later runs."""

    async def fail(ctx: Any, job: Any) -> Any:
        raise ValueError(f"bad\x00{job.data}")

    async def setup(s: JobScheduler) -> None:
        await s.register_job("testp", "fail", fail)
        await register_echo(s)

    await setup(client)
    await start_worker(setup)
    await client.add_job("testp", "fail", "x", tenant_id=tenant)
    await client.add_job("testp", "echo", "plain", tenant_id=tenant)
    await wait_for(lambda: _at_least(db, 2), timeout=5)


@pytest.mark.parametrize("data", [1e308, 1e16, [1e16, {"x": 2.5e-300}]])
async def test_float_return_value_stays_a_float(
    client: JobScheduler,
    tenant: str,
    redis_client: aioredis.Redis,
    echo_worker: WorkerHandle,
    data: float,
) -> None:
    """A float payload echoed by a job comes back as the same float (a float nested in a
    list or object too), from PostgreSQL after the job's hash left Redis (Was a bug: jobs'
    return values were jsonb, whose numbers are numeric, and 1e16 came back as an integer)."""
    job_id = await client.add_job("testp", "echo", data, tenant_id=tenant)
    status = await run_to_the_end(client, redis_client, job_id)
    assert status.state == "completed"
    assert status.returnvalue == data
    assert repr(status.returnvalue) == repr(data)  # the same types: float, not int
    result = await client.broker.result_backend.get_result(job_id)  # the taskiq_results view
    assert repr(result.return_value) == repr(data)


@pytest.mark.parametrize("data", [{1: "a", "1": "b"}, {None: 1}])
async def test_non_string_keys_are_refused_or_round_trip(
    client: JobScheduler,
    tenant: str,
    redis_client: aioredis.Redis,
    echo_worker: WorkerHandle,
    data: Any,
) -> None:
    """A dict with non-string keys is refused naming data, or comes back unchanged."""
    try:
        job_id = await client.add_job("testp", "echo", data, tenant_id=tenant)
    except InvalidInputError as exc:
        assert_refused(exc, "data")
        return
    status = await run_to_the_end(client, redis_client, job_id)
    assert status.returnvalue == data


# --------------------------------------------------------------------------------------- cron
NUMBERS = ["0", "1", "2", "5", "7", "12", "23", "24", "28", "29", "30", "31", "32", "59", "60"]
CRON_TOKENS = [
    *NUMBERS,
    "*",
    "?",
    "L",
    "W",
    "LW",
    "1W",
    "15W",
    "5#3",
    "0#5",
    "7L",
    "5L",
    "-1",
    "*/0",
    "*/5",
    "1-5",
    "5-1",
    "1,2,3",
    "1/0",
    "2/3",
    "sun",
    "MON",
    "mon-fri",
    "jan",
    "DEC",
    "feb",
    "H",
    "H(0-5)",
    "@daily",
    "R",
    "",
]
cron_fields = st.one_of(
    st.sampled_from(CRON_TOKENS),
    st.builds(
        lambda a, sep, b: f"{a}{sep}{b}",
        st.sampled_from([*NUMBERS, "*"]),
        st.sampled_from(["-", "/", ",", "#"]),
        st.sampled_from(NUMBERS),
    ),
    st.text(st.sampled_from("0123456789*/-,?LW#HMONSUJADEC"), min_size=1, max_size=6),
)
structured_crons = st.builds(
    lambda fields, seps: "".join(f + s for f, s in zip(fields, seps, strict=False)).strip(" "),
    st.lists(cron_fields, min_size=4, max_size=7),
    st.lists(st.sampled_from([" ", " ", " ", "  ", "\t", "\n"]), min_size=7, max_size=7),
)
cron_strings = st.one_of(
    structured_crons, st.text(max_size=40), st.text(st.sampled_from("0123456789*/-, "))
)
moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2090, 12, 31), timezones=st.just(UTC)
)


def _check_next_slots(cron: str, tz: str, now: datetime) -> None:
    """Two consecutive slots after ``now`` exist and move forward (or the known bug)."""
    try:
        first = next_slot(cron, tz, now)
        second = next_slot(cron, tz, first)
    except CroniterBadDateError:
        # Was a bug (test_cron_that_never_fires_is_refused): accepted, but no date ever matches.
        return
    assert first > now and first.utcoffset() is not None
    assert second > first


@shared(400)
@given(cron=cron_strings, now=moments, tz=st.sampled_from(["UTC", "Europe/Berlin"]))
@example(cron="0 0 29 2 *", now=datetime(2001, 3, 1, tzinfo=UTC), tz="UTC")
@example(cron="0 30 2 * * *", now=datetime(2026, 3, 29, tzinfo=UTC), tz="Europe/Berlin")
def test_random_cron_strings_are_refused_or_have_next_slots(
    cron: str, now: datetime, tz: str
) -> None:
    """JobOptions refuses a cron string naming options.cron, or its next slots can be computed."""
    try:
        opts = JobOptions.coerce({"cron": cron})
    except InvalidInputError as exc:
        assert_refused(exc, "options.cron")
        return
    assert opts.cron == cron
    _check_next_slots(cron, tz, now)


@shared(60)
@given(cron=cron_strings)
async def test_register_job_with_random_cron_is_refused_or_listed(
    client: JobScheduler, tenant: str, cron: str
) -> None:
    """register_job for a tenant refuses a cron naming options.cron, or lists the schedule."""
    scoped = client.for_tenant(tenant)
    name = f"c{uuid.uuid4().hex[:10]}"
    outcome = await attempt(lambda: scoped.register_job("testp", name, echo, {"cron": cron}))
    if isinstance(outcome, InvalidInputError):
        assert_refused(outcome, "options.cron")
        assert name not in {s.job_name for s in await scoped.list_schedules(count=1)}
        return
    now = datetime.now(UTC)
    try:
        next_slot(cron, "UTC", now)
    except CroniterBadDateError:
        # Was a bug (test_cron_that_never_fires_is_refused): remove it so listing keeps working.
        await scoped.remove_job("testp", name)
        return
    [listed] = [s for s in await scoped.list_schedules(count=2) if s.job_name == name]
    assert (listed.tenant_id, listed.cron, listed.tz) == (tenant, cron, "UTC")
    assert len(listed.next_runs) == 2 and now < listed.next_runs[0] < listed.next_runs[1]
    await scoped.remove_job("testp", name)
    assert name not in {s.job_name for s in await scoped.list_schedules(count=1)}


@pytest.mark.parametrize("cron", ["0 0 31 2 *", "0 0 30 2 *", "0 0 31 4 *", "0 0 0 31 11 *"])
def test_cron_that_never_fires_is_refused(cron: str) -> None:
    """A cron expression no date matches is refused naming options.cron."""
    try:
        JobOptions.coerce({"cron": cron})
    except InvalidInputError as exc:
        assert_refused(exc, "options.cron")
        return
    now = datetime.now(UTC)
    assert next_slot(cron, "UTC", now) > now


ZONES = sorted(available_timezones())
tz_strings = st.one_of(
    st.sampled_from(ZONES),
    st.text(max_size=30),
    st.text(st.sampled_from("abcAZ/_-+.09 \n\x00"), max_size=20),
    st.builds(
        lambda zone, suffix: zone + suffix,
        st.sampled_from(ZONES),
        st.sampled_from(["/", "\n", " ", "/..", "/.", "\x00", "x"]),
    ),
    st.sampled_from(["", ".", "..", "/", "/etc/localtime", "../../etc/passwd", "Factory", "UTC\n"]),
)


@shared(300)
@given(tz=tz_strings, now=moments)
def test_random_time_zones_are_refused_or_usable(tz: str, now: datetime) -> None:
    """JobOptions refuses a time zone naming options.tz, or cron slots can be computed in it."""
    try:
        opts = JobOptions.coerce({"cron": "*/7 3 * * *", "tz": tz})
    except InvalidInputError as exc:
        assert_refused(exc, "options.tz")
        return
    except OSError:
        # Was a bug (test_directory_or_overlong_time_zone_is_refused).
        return
    assert opts.tz == tz
    _check_next_slots("*/7 3 * * *", tz, now)


@pytest.mark.parametrize("tz", ["America", "US", "a" * 300])
def test_directory_or_overlong_time_zone_is_refused(tz: str) -> None:
    """A time zone that names a tzdata folder or is absurdly long is refused naming options.tz."""
    with pytest.raises(InvalidInputError) as caught:
        JobOptions.coerce({"tz": tz})
    assert_refused(caught.value, "options.tz")


async def test_cron_for_an_unknown_tenant_is_refused_by_name(client: JobScheduler) -> None:
    """register_job with cron for a tenant that does not exist is refused naming tenant_id."""
    with pytest.raises(InvalidInputError) as caught:
        await client.register_job(
            "testp", "nightly", echo, {"cron": "0 3 * * *"}, tenant_id="nobody"
        )
    assert_refused(caught.value, "tenant_id")


@pytest.mark.parametrize("tenant_id", ["acme\x00", "\ud800"])
async def test_get_job_status_with_an_unstorable_tenant_id_is_refused_or_none(
    client: JobScheduler, tenant: str, tenant_id: str
) -> None:
    """get_job_status with a NUL or lone surrogate in tenant_id refuses it by name or says None."""
    await register_echo(client)
    outcome = await attempt(
        lambda: client.get_job_status("testp", "echo", "no-such-job", tenant_id=tenant_id)
    )
    if outcome is not None:
        assert_refused(outcome, "tenant_id")


# ------------------------------------------------------------------------------------- poison
@pytest.fixture
async def template_message(
    client: JobScheduler, tenant: str, redis_client: aioredis.Redis
) -> dict[str, Any]:
    """A real enqueued taskiq message (as JSON), taken back out of the queue."""
    await register_echo(client)
    job_id = await client.add_job("testp", "echo", {"x": 1}, tenant_id=tenant)
    keys = client.broker.queue.keys
    raw = await redis_client.hget(keys.job(job_id), "msg")
    assert raw is not None
    await redis_client.zrem(keys.wait, job_id)
    await redis_client.delete(keys.job(job_id))
    message: dict[str, Any] = json.loads(raw)
    assert message["task_name"] == "plugin:testp:echo"
    return message


@pytest.fixture
async def poison_worker(template_message: dict[str, Any], start_worker: Any) -> WorkerHandle:
    """The echo worker, started only after the template message was taken out of the queue."""
    handle: WorkerHandle = await start_worker(register_echo)
    return handle


def _undecodable(raw: bytes) -> bool:
    """Whether the worker's formatter (taskiq's ProxyFormatter + JSONSerializer) rejects it."""
    try:
        TaskiqMessage.model_validate(json.loads(raw.decode()))
    except Exception:
        return True
    return False


undecodable_bytes = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"", b"\xff\x00garbage", b"null", b"[]", b'{"task_id": 1}', b"{" * 300]),
    st.builds(lambda doc: json.dumps(doc).encode(), json_values),
).filter(_undecodable)
unknown_task_names = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["plugin:testp:nosuch", "plugin:nosuch:echo", "plugin:testp:echo:extra"]),
).filter(lambda name: name != "plugin:testp:echo")


@shared(12)
@given(
    poison=st.one_of(
        undecodable_bytes.map(lambda raw: ("bytes", raw)),
        unknown_task_names.map(lambda name: ("task", name)),
    )
)
async def test_poison_messages_are_dead_lettered_and_the_worker_keeps_running(
    client: JobScheduler,
    tenant: str,
    redis_client: aioredis.Redis,
    template_message: dict[str, Any],
    poison_worker: WorkerHandle,
    poison: tuple[str, Any],
) -> None:
    """Undecodable bytes or an unknown task are dead-lettered and logged; work goes on."""
    job_id = f"poison-{uuid.uuid4().hex[:12]}"
    kind, value = poison
    if kind == "bytes":
        raw = value
    else:
        raw = json.dumps({**template_message, "task_id": job_id, "task_name": value}).encode()
    with capture_logs() as logs:
        await put_poison(client, redis_client, job_id, raw)
        await wait_for(
            lambda: [
                e for e in logs if e["event"] == "job_dead_lettered" and e["job_id"] == job_id
            ],
            timeout=10,
        )
    keys = client.broker.queue.keys
    assert job_id.encode() in await redis_client.lrange(keys.dead, 0, -1)
    assert await redis_client.hget(keys.job(job_id), "state") in (b"failed", None)
    assert poison_worker.task is not None and not poison_worker.task.done()
    # The worker keeps working. (Its completion is read from Redis: after undecodable bytes the
    # run ledger is stuck, see test_runs_after_undecodable_poison_are_recorded.)
    after = await client.add_job("testp", "echo", {"after": job_id}, tenant_id=tenant)
    status = await wait_for(lambda: _finished(client, after), timeout=10)
    assert status.state == "completed" and status.returnvalue == {"after": job_id}


async def put_poison(
    client: JobScheduler, redis_client: aioredis.Redis, job_id: str, raw: bytes
) -> None:
    """Write a job hash holding ``raw`` as its message straight into the wait set."""
    keys = client.broker.queue.keys
    await redis_client.hset(
        keys.job(job_id), mapping={"msg": raw, "pri": 0, "seq": 0, "state": "waiting", "ts": 0}
    )
    await redis_client.zadd(keys.wait, {job_id: 0})
    await redis_client.lpush(keys.marker, "1")


async def _finished(client: JobScheduler, job_id: str) -> JobStatus | None:
    status = await client.get_job_status("testp", "echo", job_id)
    return status if status is not None and status.state in ("completed", "failed") else None


async def test_runs_after_undecodable_poison_are_recorded(
    client: JobScheduler,
    tenant: str,
    db: asyncpg.Pool,
    redis_client: aioredis.Redis,
    echo_worker: WorkerHandle,
) -> None:
    """After a poison message of non-UTF-8 bytes, later runs still reach plugin_runs."""
    await put_poison(client, redis_client, "poison-1", b"\xff\x00garbage")
    dead = client.broker.queue.keys.dead
    await wait_for(lambda: redis_client.lrange(dead, 0, -1))
    await client.add_job("testp", "echo", "plain", tenant_id=tenant)
    await wait_for(lambda: _at_least(db, 1), timeout=5)
