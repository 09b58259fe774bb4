"""The retry policy as a pure function: attempts, backoff formulas, jitter, bounds."""

from __future__ import annotations

from drm_taskiq import UnrecoverableError
from drm_taskiq.options import RetryOptions
from drm_taskiq.retry import backoff_delay, decide, describe


def test_attempts_count_every_try_including_the_first() -> None:
    """attempts=3 allows retries after attempts 1 and 2, and fails after attempt 3."""
    options = RetryOptions(attempts=3, backoff_delay=100)
    assert decide(1, RuntimeError("x"), options).action == "retry"
    assert decide(2, RuntimeError("x"), options).action == "retry"
    assert decide(3, RuntimeError("x"), options).action == "fail"


def test_default_is_a_single_attempt() -> None:
    """Without options a failed job fails at once."""
    assert decide(1, RuntimeError("x"), RetryOptions()).action == "fail"


def test_fixed_backoff_waits_delay_each_time() -> None:
    """fixed backoff waits `delay` after every failed attempt."""
    options = RetryOptions(attempts=5, backoff_type="fixed", backoff_delay=250)
    assert [backoff_delay(n, options) for n in (1, 2, 3, 4)] == [250, 250, 250, 250]


def test_exponential_backoff_is_bullmq_formula() -> None:
    """exponential backoff waits delay * 2**(n-1) after the n-th failed attempt."""
    options = RetryOptions(attempts=5, backoff_type="exponential", backoff_delay=1000)
    assert [backoff_delay(n, options) for n in (1, 2, 3, 4)] == [1000, 2000, 4000, 8000]


def test_backoff_upper_bound() -> None:
    """backoff_max caps the wait."""
    options = RetryOptions(
        attempts=9, backoff_type="exponential", backoff_delay=1000, backoff_max=3000
    )
    assert [backoff_delay(n, options) for n in (1, 2, 3, 4)] == [1000, 2000, 3000, 3000]


def test_jitter_draws_below_the_wait() -> None:
    """Jitter j draws the wait from [wait*(1-j), wait]."""
    options = RetryOptions(attempts=3, backoff_delay=1000, backoff_jitter=0.5)
    assert backoff_delay(1, options, rand=lambda: 0.0) == 1000
    assert backoff_delay(1, options, rand=lambda: 1.0) == 500
    assert backoff_delay(1, options, rand=lambda: 0.5) == 750


def test_decision_carries_delay_and_reason() -> None:
    """A retry decision carries the computed delay and the error description."""
    options = RetryOptions(attempts=3, backoff_type="exponential", backoff_delay=100)
    decision = decide(2, ValueError("bad"), options)
    assert (decision.action, decision.delay_ms, decision.reason) == (
        "retry",
        200,
        "ValueError: bad",
    )


def test_unrecoverable_errors_fail_at_once() -> None:
    """UnrecoverableError and configured error types are never retried."""
    options = RetryOptions(attempts=10)
    assert decide(1, UnrecoverableError("no"), options).action == "fail"
    assert decide(1, KeyError("k"), options, unrecoverable=(KeyError,)).action == "fail"
    assert decide(1, KeyError("k"), options).action == "retry"


def test_describe_error() -> None:
    """Errors are described as 'Type: message', or the type alone."""
    assert describe(RuntimeError("boom")) == "RuntimeError: boom"
    assert describe(RuntimeError()) == "RuntimeError"
