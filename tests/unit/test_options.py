"""Parsing and validating job options, ids, cron expressions, payloads and labels."""

from __future__ import annotations

import json

import pytest

from drm_taskiq import InvalidInputError, JobMetadata, JobOptions
from drm_taskiq.options import (
    RetryOptions,
    check_cron,
    check_id,
    check_job_id,
    check_timezone,
    encode_payload,
    task_name,
    to_croniter,
)


def test_options_accept_a_plain_dict() -> None:
    """A dict with the specification's keys becomes JobOptions."""
    opts = JobOptions.coerce(
        {
            "cron": "0 * * * *",
            "attempts": 3,
            "backoff": {"type": "exponential", "delay": 1000},
            "timeout": 300000,
        }
    )
    assert opts.attempts == 3 and opts.backoff is not None and opts.backoff.delay == 1000
    assert opts.timeout == 300000 and opts.cron == "0 * * * *"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"priority": "high"}, "options.priority"),
        ({"attempts": 0}, "options.attempts"),
        ({"timeout": -5}, "options.timeout"),
        ({"backoff": {"type": "exponential", "delay": -1}}, "options.backoff.delay"),
        ({"tz": "Mars/Olympus"}, "options.tz"),
        ({"repeat": True}, "options.repeat"),
        ({"cron": "61 * * * *"}, "options.cron"),
    ],
)
def test_bad_options_name_the_field(options: dict[str, object], field: str) -> None:
    """Each invalid option raises InvalidInputError naming that option."""
    with pytest.raises(InvalidInputError) as caught:
        JobOptions.coerce(options)
    assert caught.value.field == field
    assert str(caught.value).startswith(field)


def test_labels_round_trip_to_retry_options() -> None:
    """Options become message labels and parse back (labels arrive as strings)."""
    opts = JobOptions(
        attempts=4, backoff={"type": "exponential", "delay": 50, "jitter": 0.1}, timeout=1500
    )  # type: ignore[arg-type]
    labels = {key: str(value) for key, value in opts.labels(default_timeout_ms=9000).items()}
    parsed = RetryOptions.from_labels(labels)
    assert parsed == RetryOptions(
        attempts=4, backoff_type="exponential", backoff_delay=50, backoff_jitter=0.1
    )
    assert float(labels["timeout"]) == 1.5
    assert float(JobOptions().labels(default_timeout_ms=9000)["timeout"]) == 9.0


def test_merged_options_override_only_what_is_set() -> None:
    """Per-call options override the registered ones field by field."""
    base = JobOptions(attempts=3, priority=5)
    merged = base.merged(JobOptions.coerce({"priority": 1}))
    assert (merged.attempts, merged.priority) == (3, 1)


@pytest.mark.parametrize("value", ["", "a:b", "{tag}", "a b", "-lead", "x" * 129, "ü"])
def test_bad_ids_refused(value: str) -> None:
    """Ids with key syntax, spaces, leading dashes, unicode or too long are refused."""
    with pytest.raises(InvalidInputError):
        check_id(value, "tenant_id")


def test_good_ids_and_job_ids() -> None:
    """Ordinary ids pass; job ids may contain ':' (cron ids do)."""
    assert check_id("google-analytics", "plugin_id") == "google-analytics"
    assert check_job_id("cron:acme:ga:sync:1700000000000") == "cron:acme:ga:sync:1700000000000"
    with pytest.raises(InvalidInputError):
        check_job_id("{x}")
    assert task_name("ga", "sync") == "plugin:ga:sync"


def test_cron_five_or_six_fields_seconds_first() -> None:
    """Five fields, or six with seconds first as in BullMQ; croniter gets seconds last."""
    assert check_cron("0 * * * *") == "0 * * * *"
    assert check_cron("*/5 * * * * *") == "*/5 * * * * *"
    assert to_croniter("*/5 1 * * * *") == "1 * * * * */5"
    for bad in ("* * * *", "* * * * * * *", "a b c d e", ""):
        with pytest.raises(InvalidInputError):
            check_cron(bad)


def test_timezones() -> None:
    """IANA zones are accepted; unknown ones are refused."""
    assert check_timezone("Europe/Berlin") == "Europe/Berlin"
    with pytest.raises(InvalidInputError):
        check_timezone("Nowhere/City")


def test_payload_rules() -> None:
    """Payloads must be JSON (no NaN, no sets) and within the size limit."""
    assert encode_payload({"a": [1, 2]}, 100) == '{"a":[1,2]}'
    with pytest.raises(InvalidInputError, match="JSON"):
        encode_payload({1, 2}, 100)
    with pytest.raises(InvalidInputError, match="JSON"):
        encode_payload(float("nan"), 100)
    with pytest.raises(InvalidInputError, match="limit is 10"):
        encode_payload("x" * 20, 10)
    deep: list[object] = []
    cursor = deep
    for _ in range(100_000):
        nxt: list[object] = []
        cursor.append(nxt)
        cursor = nxt
    with pytest.raises(InvalidInputError):
        encode_payload(deep, 10**9)


def test_job_metadata_uses_spec_keys() -> None:
    """JobMetadata serializes with the specification's camelCase keys."""
    from datetime import UTC, datetime

    meta = JobMetadata(
        job_id="j",
        job_name="n",
        attempts_made=2,
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        data={"k": 1},
    )
    body = json.loads(meta.to_json())
    assert body == {
        "jobId": "j",
        "jobName": "n",
        "attemptsMade": 2,
        "timestamp": "2026-01-01T00:00:00+00:00",
        "data": {"k": 1},
    }
