"""The example plugin's pure pieces: validation, the flaky job, the schema text, the definition."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from drm_taskiq.errors import UnrecoverableError
from drm_taskiq.plugins import Plugin
from drm_taskiq_example import plugin as example


@dataclass
class FakeJob:
    """The attributes of a job that the example handlers use."""

    id: str = "job-1"
    data: Any = None
    attempts_made: int = 0
    progress: list[Any] = field(default_factory=list)

    async def update_progress(self, value: Any) -> None:
        """Record the progress value."""
        self.progress.append(value)


class UnusedDatabase:
    """A database handle that fails the test when a handler touches it."""

    async def execute(self, *_: Any) -> str:
        """Fail: validation must happen before any query."""
        raise AssertionError("the database must not be used")

    fetchval = execute


def _ctx(config: dict[str, Any] | None = None) -> Any:
    return SimpleNamespace(tenant_id="t1", config=config or {}, db=UnusedDatabase())


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"count": 0}, (0, "example")),
        ({"count": 10_000, "source": "crm"}, (10_000, "crm")),
        ({"count": 3, "source": "x" * 200}, (3, "x" * 200)),
    ],
)
def test_parse_sync_data_accepts_counts_in_range(data: Any, expected: tuple[int, str]) -> None:
    """A count of 0..10000 and an optional non-empty source are accepted."""
    assert example.parse_sync_data(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        None,
        [1],
        {},
        {"count": -1},
        {"count": 10_001},
        {"count": True},
        {"count": 1.0},
        {"count": "5"},
        {"count": 1, "source": ""},
        {"count": 1, "source": 7},
        {"count": 1, "source": "x" * 201},
    ],
)
def test_parse_sync_data_rejects_bad_payloads(data: Any) -> None:
    """A missing, non-integer or out-of-range count, or a bad source, is unrecoverable."""
    with pytest.raises(UnrecoverableError):
        example.parse_sync_data(data)


def test_parse_retention_defaults_to_an_hour() -> None:
    """Without retention_s in the tenant config, rows are kept 3600 seconds."""
    assert example.parse_retention({}) == 3600.0


@pytest.mark.parametrize("value", [-1, "60", True, None, 1e12])
def test_parse_retention_rejects_bad_values(value: Any) -> None:
    """A retention that is not a non-negative number of seconds is unrecoverable."""
    with pytest.raises(UnrecoverableError):
        example.parse_retention({"retention_s": value})


async def test_sync_rejects_a_bad_count_before_touching_the_database() -> None:
    """sync-activities fails at once, without a query, when count is invalid."""
    with pytest.raises(UnrecoverableError, match="count"):
        await example.sync_activities(_ctx(), FakeJob(data={"count": 10_001}))


async def test_cleanup_rejects_a_bad_retention_before_touching_the_database() -> None:
    """cleanup-activities fails at once, without a query, when retention_s is invalid."""
    with pytest.raises(UnrecoverableError, match="retention_s"):
        await example.cleanup_activities(_ctx({"retention_s": "soon"}), FakeJob())


@pytest.mark.parametrize("attempts_made", [0, 1])
async def test_flaky_fails_on_its_first_two_attempts(attempts_made: int) -> None:
    """flaky raises RuntimeError when fewer than two attempts were made before."""
    with pytest.raises(RuntimeError, match=f"attempt {attempts_made + 1}"):
        await example.flaky(_ctx(), FakeJob(attempts_made=attempts_made))


async def test_flaky_succeeds_on_its_third_attempt() -> None:
    """flaky returns the attempt number once two attempts have failed."""
    assert await example.flaky(_ctx(), FakeJob(attempts_made=2)) == {"attempt": 3}


def test_schema_creates_the_table_with_row_level_security() -> None:
    """The plugin's schema creates example_activities and puts it under tenant isolation."""
    sql = example.schema_sql()
    assert example.plugin.schema == sql
    assert "CREATE TABLE IF NOT EXISTS example_activities" in sql
    assert "SELECT drm_tenant_table('example_activities');" in sql
    assert "REFERENCES tenants(tenant_id) ON DELETE CASCADE" in sql


def test_plugin_definition() -> None:
    """The module exposes a Plugin with id 'example' and both lifecycle hooks."""
    assert isinstance(example.plugin, Plugin)
    assert example.plugin.id == "example"
    assert example.plugin.on_load is example.on_load
    assert example.plugin.on_unload is example.on_unload
