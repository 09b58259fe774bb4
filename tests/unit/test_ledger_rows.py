"""The run ledger's rows, computed from stream entries without PostgreSQL."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drm_taskiq.results import taskiq_result_json
from drm_taskiq.runlog import (
    RUN_NAMESPACE,
    LedgerEntry,
    _run_result,
    run_id,
    run_id_hex,
)


@given(
    job_id=st.text(min_size=1, max_size=80),
    attempt=st.integers(min_value=1, max_value=10_000),
    generation=st.integers(min_value=0, max_value=1000),
    created_ms=st.integers(min_value=0, max_value=2**45),
)
def test_run_ids_are_rfc4122_uuid5(
    job_id: str, attempt: int, generation: int, created_ms: int
) -> None:
    """The ledger's run ids are uuid5(RUN_NAMESPACE, "job:created:generation:attempt"), the
    documented formula, whichever way they are computed."""
    expected = uuid.uuid5(RUN_NAMESPACE, f"{job_id}:{created_ms}:{generation}:{attempt}")
    assert run_id(job_id, attempt, generation, created_ms) == expected
    assert run_id_hex(job_id, attempt, generation, created_ms) == expected.hex


def _entry(**fields: object) -> str:
    body: dict[str, object] = {
        "id": "j1",
        "plugin": "p",
        "tenant": "t",
        "job": "sync",
        "ts": "1764353280123",
        "started": "1764353280200",
        "at": 1764353280450,
        "attempt": 2,
        "status": "success",
        "state": "completed",
        "final": 1,
        "outcome": "completed",
        "value": '{"n": 1}',
        "progress": False,
        "extra": "{}",
        "gen": 0,
    }
    body.update(fields)
    return json.dumps(body)


def test_run_result_holds_the_job_metadata() -> None:
    """plugin_runs.result: camelCase JobMetadata, the attempt's timing, state and return value,
    and the extra metadata the worker attached (a retry's delay, a timeout)."""
    entry = LedgerEntry.parse("1-0", _entry())
    assert json.loads(_run_result(entry)) == {
        "jobId": "j1",
        "jobName": "sync",
        "attemptsMade": 2,
        "timestamp": "2025-11-28T18:08:00.123000+00:00",
        "attempt": 2,
        "state": "completed",
        "startedAt": "2025-11-28T18:08:00.200000+00:00",
        "durationMs": 250,
        "returnvalue": {"n": 1},
    }
    failed = LedgerEntry.parse(
        "1-1",
        _entry(
            status="error",
            state="delayed",
            final=0,
            outcome="retry",
            value="boom",
            extra=json.dumps({"retryDelayMs": 2000, "timedOut": True}),
            gen=3,
            started=False,
        ),
    )
    result = json.loads(_run_result(failed))
    assert "returnvalue" not in result
    assert "startedAt" not in result
    assert (result["retryDelayMs"], result["timedOut"], result["generation"]) == (2000, True, 3)


def test_entry_text_is_made_storable() -> None:
    """NUL characters and lone surrogates, which PostgreSQL refuses, are replaced; plain ASCII
    and other Unicode pass unchanged."""
    assert LedgerEntry.parse("1-0", _entry(value="a\x00b")).value == "a\\u0000b"
    assert LedgerEntry.parse("1-0", _entry(value="caf\u00e9 \u2603")).value == "caf\u00e9 \u2603"
    assert LedgerEntry.parse("1-0", _entry(value="x\ud800y")).value == "x?y"
    assert LedgerEntry.parse("1-0", _entry(value="plain")).value == "plain"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('{"n": 1, "s": "caf\\u00e9"}', {"n": 1, "s": "caf\u00e9"}),  # orjson's path
        ('"a\\u0000b"', "a\ufffdb"),  # NUL: jsonb refuses \u0000, replaced
        ('"x\\ud800y"', "x?y"),  # a lone surrogate: orjson refuses it, the library's path
        (str(2**70), 2**70),  # beyond 64 bits: the library's path, exact
        ("NaN", None),  # not JSON: jsonb would refuse the row; written as null
    ],
)
def test_result_json_is_what_jsonb_accepts(value: str, expected: object) -> None:
    """plugin_runs.result and taskiq's result are encoded by orjson where it can, by the
    standard library where only it can. The result gives text jsonb accepts (no \\u0000
    escape, no lone surrogate, no NaN) with the value kept; taskiq's result read from a
    finished job's hash keeps the value exactly."""
    entry = LedgerEntry.parse("1-0", _entry(value=value))
    text = _run_result(entry)
    assert "\\u0000" not in text and "NaN" not in text
    text.encode("utf-8")  # no lone surrogate left
    assert json.loads(text)["returnvalue"] == expected
    taskiq_result = json.loads(taskiq_result_json(True, entry.value, 0.0))
    assert taskiq_result["is_err"] is False
    if value != "NaN":  # from the hash: the value exactly as returned
        assert taskiq_result["return_value"] == json.loads(value)
