"""Log set-up: JSON lines, and no secret ever printed."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from drm_taskiq.logs import LoopBufferedLogger, configure_logging, log_info, mask_secrets
from drm_taskiq.redaction import forget_all, remember


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()
    forget_all()


def test_json_lines_mask_urls_and_config_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    """Passwords in URLs and remembered config secrets are masked in every JSON log line."""
    remember(["s3cr3t-api-key"])
    configure_logging("json", "INFO")
    log = structlog.get_logger()
    log.info(
        "connecting",
        redis="redis://:hunter2@cache:6379/0",
        nested={"error": "401 for s3cr3t-api-key", "dsn": "postgresql://u:pw@db/x"},
        text="password=abc&token=def",
    )
    logging.getLogger("third.party").warning("failed with s3cr3t-api-key")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    event = json.loads(lines[0])
    assert event["event"] == "connecting"
    assert event["redis"] == "redis://:***@cache:6379/0"
    assert event["nested"] == {"error": "401 for ***", "dsn": "postgresql://u:***@db/x"}
    assert event["text"] == "password=***&token=***"
    for secret in ("hunter2", "s3cr3t-api-key", ":pw@", "=abc", "=def"):
        assert secret not in "\n".join(lines)


def test_console_format_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    """The console format prints the event name and fields on one line."""
    configure_logging("console", "INFO")
    structlog.get_logger().info("job_started", job_id="j1")
    out = capsys.readouterr().err
    assert "job_started" in out
    assert "job_id=j1" in out


def test_mask_leaves_plain_text_alone() -> None:
    """Text without secrets is unchanged."""
    assert (
        mask_secrets("nothing to see at redis://cache:6379")
        == "nothing to see at redis://cache:6379"
    )


def test_json_line_has_what_structlog_processors_would_write(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The one-step JSON processor writes the fields structlog's chain (add_log_level,
    TimeStamper, format_exc_info, JSONRenderer) would: level names, a UTC ISO timestamp, the
    traceback as text, and values JSON has no type for as their repr."""
    configure_logging("json", "INFO")
    log = structlog.get_logger()
    log.warning("slow", job_id="j1", attempt=2, took=1.5, flags=[1, "a"], thing=object())
    try:
        raise ValueError("bad password=abc")
    except ValueError:
        log.exception("crashed", job_id="j2")
    log.debug("hidden")
    first, second = (json.loads(x) for x in capsys.readouterr().err.strip().splitlines())
    assert first["level"] == "warning"
    assert first["event"] == "slow"
    assert (first["job_id"], first["attempt"], first["took"], first["flags"]) == (
        "j1",
        2,
        1.5,
        [1, "a"],
    )
    assert first["thing"].startswith("<object object at")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["timestamp"])
    stamp = datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 5
    assert second["level"] == "error"
    assert "Traceback" in second["exception"]
    assert "ValueError: bad password=***" in second["exception"]  # tracebacks are masked too


def _without_time(line: str) -> list[tuple[str, Any]]:
    """A JSON line's fields in their order, the timestamp left out."""
    return [(k, v) for k, v in json.loads(line).items() if k != "timestamp"]


def test_per_job_events_are_the_lines_structlog_writes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """log_info (job_enqueued, job_started, job_succeeded) writes what
    structlog.get_logger().info writes: the same fields in the same order, context variables
    merged, secrets masked; nothing below the configured level."""
    remember(["s3cr3t-api-key"])
    for cache in (False, True):
        configure_logging("json", "INFO", cache=cache)
        fields = {"job_id": "j1", "attempt": 2, "dsn": "redis://:hunter2@h/0", "n": None}
        with structlog.contextvars.bound_contextvars(request_id="r1", job_id="from-context"):
            log_info("job_started", **fields, note="401 for s3cr3t-api-key")
            structlog.get_logger().info("job_started", **fields, note="401 for s3cr3t-api-key")
        direct, through_structlog = capsys.readouterr().err.strip().splitlines()
        assert _without_time(direct) == _without_time(through_structlog)
        event = json.loads(direct)
        assert (event["job_id"], event["request_id"], event["level"]) == ("j1", "r1", "info")
        assert event["dsn"] == "redis://:***@h/0"
        assert event["note"] == "401 for ***"
        assert "timestamp" in event
    configure_logging("json", "WARNING")
    log_info("job_started", job_id="j2")
    assert capsys.readouterr().err == ""


def test_per_job_events_follow_any_other_logging_configuration(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Under structlog.testing.capture_logs, the console format or an application's own
    structlog configuration, log_info's events go through structlog like any other."""
    configure_logging("json", "INFO")
    with structlog.testing.capture_logs() as captured:
        log_info("job_enqueued", job_id="j1", priority=0)
    assert captured == [
        {"event": "job_enqueued", "job_id": "j1", "priority": 0, "log_level": "info"}
    ]
    assert capsys.readouterr().err == ""
    log_info("job_enqueued", job_id="j2")  # the JSON set-up again, once the capture ended
    assert json.loads(capsys.readouterr().err)["job_id"] == "j2"

    configure_logging("console", "INFO")
    log_info("job_started", job_id="j3")
    out = capsys.readouterr().err
    assert "job_started" in out
    assert "job_id=j3" in out

    seen: list[dict[str, Any]] = []

    def keep(_: Any, __: str, event_dict: Any) -> Any:
        seen.append(dict(event_dict))
        raise structlog.DropEvent

    configure_logging("json", "INFO")
    structlog.configure(processors=[keep])  # the application's own
    log_info("job_succeeded", job_id="j4")
    assert seen == [{"event": "job_succeeded", "job_id": "j4"}]
    assert capsys.readouterr().err == ""


def test_lines_of_one_loop_turn_are_written_together_and_in_order() -> None:
    """Inside an event loop, lines are written together shortly after the first of them (one
    write), in the order they were logged, standard-library records included; outside a loop
    each line is written at once; what is pending at exit is written."""
    import asyncio
    import io

    writes: list[bytes] = []  # what reaches the file: one entry per system call

    class File(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            writes.append(bytes(data))
            return len(data)

    # unbuffered, as with PYTHONUNBUFFERED=1: every write to the stream is a system call
    stream = io.TextIOWrapper(File(), encoding="utf-8", write_through=True)  # type: ignore[arg-type]
    logger = LoopBufferedLogger(stream)
    logger.msg("outside a loop")
    assert writes == [b"outside a loop\n"]

    async def turn() -> None:
        logger.msg("one")
        logger.msg("two")
        logger.write("stdlib record\n")  # logging.StreamHandler(logger)
        logger.msg("three")
        assert len(writes) == 1  # nothing written yet
        await asyncio.sleep(0)
        # a quiet logger writes the lines of a turn in the loop's next pass, in one write
        assert writes[1:] == [b"one\ntwo\nstdlib record\nthree\n"]
        logger.msg("four, just after a write")
        await asyncio.sleep(0)
        logger.msg("five, a turn later")
        await asyncio.sleep(0)
        assert len(writes) == 2  # within FLUSH_AFTER_S of the last write: a timer writes them
        await asyncio.sleep(LoopBufferedLogger.FLUSH_AFTER_S * 4)
        assert writes[2:] == [b"four, just after a write\nfive, a turn later\n"]
        logger.msg("pending when the process exits")

    asyncio.run(turn())
    logger.flush()  # what atexit / multiprocessing's exit hook call
    assert writes[3:] == [b"pending when the process exits\n"]


_LAST_LINE_SCRIPT = """
import asyncio, multiprocessing, sys
import structlog
from drm_taskiq.logs import configure_logging

def log_last(where):
    # the loop stops at the end of this turn, before the turn that would write the line
    loop = asyncio.new_event_loop()

    def last():
        structlog.get_logger().info("last_line", where=where)
        loop.stop()

    loop.call_soon(last)
    loop.run_forever()

def child():
    configure_logging("json", "INFO")
    log_last("forked worker")

if __name__ == "__main__":
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join()
    configure_logging("json", "INFO")
    log_last("main process")
"""


def test_lines_pending_at_exit_are_written(tmp_path: Any) -> None:
    """A line logged in a loop's last turn is written when the process exits, also in a forked
    worker process (taskiq's), which leaves through os._exit."""
    import subprocess
    import sys

    script = tmp_path / "last.py"
    script.write_text(_LAST_LINE_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(x) for x in done.stderr.splitlines() if x.startswith("{")]
    assert [x["where"] for x in lines if x["event"] == "last_line"] == [
        "forked worker",
        "main process",
    ]


def test_configuring_again_keeps_one_buffered_output_per_stream(monkeypatch: Any) -> None:
    """A second configure_logging on the same stderr reuses its buffered output (pending lines
    keep their order, no more exit hooks); a new stderr gets a new one after the old one's
    pending lines are written."""
    import io

    from drm_taskiq import logs

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("json", "INFO")
    output = logs._OUTPUT[0]
    output._pending.append("pending line")
    configure_logging("json", "INFO")
    assert [output] == logs._OUTPUT
    monkeypatch.setattr(sys, "stderr", second)
    configure_logging("json", "INFO")
    assert logs._OUTPUT[0] is not output and logs._OUTPUT[0]._file is second
    assert first.getvalue() == "pending line\n"
    monkeypatch.undo()
    configure_logging("json", "INFO")  # back to the real stderr for the tests that follow
