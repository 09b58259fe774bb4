"""The drm-taskiq command: argument parsing, option building and the runs table."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from drm_taskiq import cli
from drm_taskiq.errors import InvalidInputError


def _parse(*argv: str) -> Any:
    return cli.build_parser().parse_args(argv)


def _run(**values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "executed_at": datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC),
        "tenant": "t1",
        "plugin": "example",
        "hook_name": "job:sync-activities",
        "status": "success",
        "attempt": "0",
        "error": None,
    }
    row.update(values)
    return row


def test_enqueue_parses_every_option() -> None:
    """enqueue reads plugin, job, tenant, JSON data, priority, delay and job id."""
    args = _parse(
        "enqueue", "example", "sync-activities", "--tenant", "t1", "--data", '{"count": 2}',
        "--priority", "5", "--delay", "1000", "--job-id", "j-1",
    )  # fmt: skip
    assert (args.command, args.plugin, args.job, args.tenant) == (
        "enqueue",
        "example",
        "sync-activities",
        "t1",
    )
    assert cli.parse_json(args.data, "--data") == {"count": 2}
    assert cli.enqueue_options(args) == {"priority": 5, "delay": 1000, "job_id": "j-1"}


def test_enqueue_without_options_passes_none() -> None:
    """enqueue with no option flags gives no options, so the job's defaults apply."""
    args = _parse("enqueue", "example", "flaky", "--tenant", "t1")
    assert cli.enqueue_options(args) is None
    assert cli.parse_json(args.data, "--data") is None


def test_enqueue_requires_a_tenant(capsys: pytest.CaptureFixture[str]) -> None:
    """enqueue without --tenant is a usage error (exit 2)."""
    with pytest.raises(SystemExit) as exc:
        _parse("enqueue", "example", "flaky")
    assert exc.value.code == 2
    assert "--tenant" in capsys.readouterr().err


def test_tenant_add_collects_plugins_and_config() -> None:
    """tenant add accepts several --plugin ids and applies --config to each of them."""
    args = _parse(
        "tenant", "add", "t1", "--name", "T One", "--plugin", "a", "b", "--plugin", "c",
        "--config", '{"retention_s": 60}',
    )  # fmt: skip
    assert (args.tenant_id, args.name) == ("t1", "T One")
    assert cli.tenant_plugins(args) == {
        "a": {"retention_s": 60},
        "b": {"retention_s": 60},
        "c": {"retention_s": 60},
    }


@pytest.mark.parametrize(
    "argv",
    [
        ("tenant", "add", "t1", "--plugin", "a", "--config", "[1]"),
        ("tenant", "add", "t1", "--plugin", "a", "--config", "{bad"),
        ("tenant", "add", "t1", "--config", "{}"),
    ],
)
def test_tenant_add_rejects_bad_config(argv: tuple[str, ...]) -> None:
    """--config must be a JSON object and needs a --plugin to apply to."""
    with pytest.raises(InvalidInputError, match="--config"):
        cli.tenant_plugins(_parse(*argv))


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (("tenant", "add", "bad id!"), "TENANT_ID"),
        (("tenant", "add", "t1", "--plugin", "no/slash"), "--plugin"),
    ],
)
def test_tenant_add_rejects_bad_ids(argv: tuple[str, ...], field: str) -> None:
    """Tenant and plugin ids must be valid ids before anything is written."""
    with pytest.raises(InvalidInputError, match=field):
        cli.tenant_plugins(_parse(*argv))


def test_runs_defaults_and_limit_bounds() -> None:
    """runs defaults to 50 rows with no filter and refuses a limit of 0."""
    args = _parse("runs")
    assert (args.tenant, args.plugin, args.limit) == (None, None, 50)
    assert _parse("runs", "--tenant", "t", "--plugin", "p", "--limit", "3").limit == 3
    with pytest.raises(SystemExit):
        _parse("runs", "--limit", "0")


def test_status_takes_three_positionals() -> None:
    """status reads the plugin, the job name and the job id."""
    args = _parse("status", "example", "flaky", "abc")
    assert (args.plugin, args.job, args.job_id) == ("example", "flaky", "abc")


def test_a_command_is_required() -> None:
    """Running drm-taskiq with no command is a usage error."""
    with pytest.raises(SystemExit):
        _parse()


def test_bad_settings_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invalid settings print 'error: ...' naming the variable and exit with status 2."""
    monkeypatch.setenv("DATABASE_URL", "mysql://nowhere")
    assert cli.main(["runs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "DATABASE_URL" in err


def test_bad_json_data_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invalid --data is refused with 'error: --data: ...' and status 2, before any connection."""
    monkeypatch.setattr(cli, "configure_logging", lambda *_: None)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    assert cli.main(["enqueue", "example", "flaky", "--tenant", "t1", "--data", "{"]) == 2
    assert capsys.readouterr().err.startswith("error: --data: must be valid JSON")


def test_format_runs_aligns_columns() -> None:
    """Every line starts each column at the same offset, under a header."""
    lines = cli.format_runs(
        [_run(), _run(tenant="a-much-longer-tenant", status="error", error="boom")]
    ).splitlines()
    assert lines[0].split() == list(cli.RUN_COLUMNS)
    statuses = ["status", "success", "error"]
    offsets = {line.index(status) for line, status in zip(lines, statuses, strict=True)}
    assert len(offsets) == 1
    assert lines[1].startswith("2026-01-02 03:04:05.678+00:00")
    assert lines[2].endswith("boom")


def test_format_runs_truncates_errors_to_one_line() -> None:
    """A long multi-line error is flattened and cut to the column width with an ellipsis."""
    table = cli.format_runs([_run(error="Traceback\n" + "x" * 200)])
    last = table.splitlines()[1]
    error = last.split("  ")[-1]
    assert len(error) == cli.ERROR_WIDTH
    assert error.startswith("Traceback x")
    assert error.endswith("…")


def test_format_runs_shows_missing_values_as_blank() -> None:
    """None (no attempt count, no error) prints as an empty cell, with no trailing spaces."""
    line = cli.format_runs([_run(attempt=None)]).splitlines()[1]
    assert line.endswith("success")


def test_format_runs_without_rows() -> None:
    """An empty history prints a placeholder instead of a bare header."""
    assert cli.format_runs([]) == "(no runs)"


def test_admin_commands_parse() -> None:
    """failed, retry, dead, schedules, paused, resume and queue parse their arguments."""
    from drm_taskiq.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["failed", "example", "--tenant", "acme", "--limit", "5"])
    assert (args.command, args.plugin, args.tenant, args.limit) == ("failed", "example", "acme", 5)
    args = parser.parse_args(["retry", "example", "flaky", "j1"])
    assert (args.plugin, args.job, args.job_id) == ("example", "flaky", "j1")
    args = parser.parse_args(["schedules", "--tenant", "acme"])
    assert (args.tenant, args.count) == ("acme", 3)
    args = parser.parse_args(["dead"])
    assert (args.command, args.limit, args.purge) == ("dead", 50, False)
    assert parser.parse_args(["dead", "--purge"]).purge
    assert parser.parse_args(["paused"]).tenant is None
    args = parser.parse_args(["resume", "example", "--tenant", "acme"])
    assert (args.plugin, args.tenant) == ("example", "acme")
    assert parser.parse_args(["queue"]).command == "queue"
    with pytest.raises(SystemExit):
        parser.parse_args(["queue", "extra"])  # it takes no arguments
