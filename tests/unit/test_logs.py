"""Log set-up: JSON lines, and no secret ever printed."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from drm_taskiq.logs import configure_logging, mask_secrets
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
