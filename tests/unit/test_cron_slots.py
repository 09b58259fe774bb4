"""Cron slot arithmetic: seconds fields, time zones, daylight saving, missed-slot policies."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from drm_taskiq.cron import due_slots, next_slot, slots_to_fire


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_six_fields_have_seconds_first() -> None:
    """`*/5 * * * * *` fires every five seconds, aligned to the slot."""
    start = at("2026-01-01T00:00:01+00:00")
    assert next_slot("*/5 * * * * *", "UTC", start) == at("2026-01-01T00:00:05+00:00")
    slots = due_slots("*/5 * * * * *", "UTC", start, at("2026-01-01T00:00:21+00:00"))
    assert [s.second for s in slots] == [5, 10, 15, 20]


def test_time_zone_of_the_schedule() -> None:
    """A daily 09:00 job in Asia/Tokyo fires at 00:00 UTC."""
    assert next_slot("0 9 * * *", "Asia/Tokyo", at("2026-06-01T12:00:00+00:00")) == at(
        "2026-06-02T00:00:00+00:00"
    )


def test_spring_forward_runs_once_after_the_gap() -> None:
    """02:30 Europe/Berlin on 2026-03-29 does not exist: it runs once, at 03:00 local."""
    slots = due_slots(
        "30 2 * * *",
        "Europe/Berlin",
        at("2026-03-28T12:00:00+00:00"),
        at("2026-03-30T12:00:00+00:00"),
    )
    assert slots == [at("2026-03-29T03:00:00+02:00"), at("2026-03-30T02:30:00+02:00")]


def test_fall_back_runs_once_at_the_first_occurrence() -> None:
    """02:30 Europe/Berlin happens twice on 2026-10-25: the job runs once, at the first."""
    slots = due_slots(
        "30 2 * * *",
        "Europe/Berlin",
        at("2026-10-24T12:00:00+00:00"),
        at("2026-10-26T12:00:00+00:00"),
    )
    assert slots == [at("2026-10-25T02:30:00+02:00"), at("2026-10-26T02:30:00+01:00")]


def test_hourly_jobs_follow_real_hours_across_fall_back() -> None:
    """A wildcard-hour job fires every real hour, including the repeated one."""
    slots = due_slots(
        "30 * * * *",
        "Europe/Berlin",
        at("2026-10-24T22:00:00+00:00"),
        at("2026-10-25T04:00:00+00:00"),
    )
    assert len(slots) == 6
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(slots))


def test_missed_slots_latest_and_skip() -> None:
    """After downtime `latest` fires the newest missed slot once; `skip` fires none."""
    now = at("2026-01-01T01:00:30+00:00")
    slots = due_slots("*/10 * * * *", "UTC", at("2026-01-01T00:00:00+00:00"), now)
    assert len(slots) == 6
    assert slots_to_fire(slots, now, "latest") == [at("2026-01-01T01:00:00+00:00")]
    assert slots_to_fire([s for s in slots if s.minute != 0 or s.hour != 1], now, "skip") == []


def test_on_time_slot_fires_under_either_policy() -> None:
    """A slot that just passed fires whatever the missed-slot policy."""
    now = at("2026-01-01T00:10:01+00:00")
    slots = [at("2026-01-01T00:10:00+00:00")]
    assert slots_to_fire(slots, now, "skip") == slots
    assert slots_to_fire(slots, now, "latest") == slots
