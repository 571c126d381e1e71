"""The trigger as a pure function: thresholds, the 24 h interval, quiet hours, backoff, force."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from academyd.policy import decide, failure_backoff, in_quiet_hours
from academyd.settings import PolicySettings, QuietHours
from academyd.store import Snapshot

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def snap(new: int = 0, ended_ago_h: float | None = None, active: str | None = None, failures: int = 0,
         failed_ago_min: float | None = None) -> Snapshot:
    return Snapshot(
        new_successful_lessons=new,
        lesson_watermark=0,
        last_training_ended=None if ended_ago_h is None else NOW - timedelta(hours=ended_ago_h),
        active_run=active,
        consecutive_failures=failures,
        last_failure_at=None if failed_ago_min is None else NOW - timedelta(minutes=failed_ago_min),
    )


P = PolicySettings()


@pytest.mark.parametrize(
    ("snapshot", "force", "train", "reason_part"),
    [
        (snap(new=99), False, False, "99/100"),
        (snap(new=100), False, True, "100 new successful lessons"),
        (snap(new=100, ended_ago_h=23 + 59 / 60), False, False, "less than 24 h"),
        (snap(new=100, ended_ago_h=24), False, True, "interval has passed"),
        (snap(new=500, ended_ago_h=1), False, False, "less than 24 h"),
        (snap(new=100, active="run-1"), False, False, "run-1 is active"),
        (snap(new=0, ended_ago_h=1), True, True, "forced"),
        (snap(new=0, active="run-1"), True, False, "run-1 is active"),
        (snap(new=100, failures=1, failed_ago_min=5), False, False, "backing off after 1"),
        (snap(new=100, failures=1, failed_ago_min=11), False, True, "interval"),
        (snap(new=100, failures=3, failed_ago_min=300), False, False, "backing off after 3"),
    ],
)
def test_decide_table(snapshot: Snapshot, force: bool, train: bool, reason_part: str) -> None:
    d = decide(P, snapshot, NOW, force=force)
    assert d.train is train
    assert reason_part in d.reason


def test_next_eligible_is_end_of_interval() -> None:
    d = decide(P, snap(new=10, ended_ago_h=20), NOW)
    assert d.next_eligible == NOW + timedelta(hours=4)
    assert decide(P, snap(new=10), NOW).next_eligible is None


def test_quiet_hours_wrap_midnight_and_delay_eligibility() -> None:
    quiet = QuietHours.parse("22:00-06:00")
    assert in_quiet_hours(quiet, NOW.replace(hour=23))
    assert in_quiet_hours(quiet, NOW.replace(hour=5, minute=59))
    assert not in_quiet_hours(quiet, NOW.replace(hour=6))
    assert not in_quiet_hours(quiet, NOW)
    p = PolicySettings(quiet_hours="22:00-06:00")
    night = NOW.replace(hour=23)
    d = decide(p, snap(new=100), night)
    assert not d.train and "quiet hours" in d.reason
    assert d.next_eligible == (night + timedelta(days=1)).replace(hour=6, minute=0)
    same_day = PolicySettings(quiet_hours="09:00-17:00")
    assert not decide(same_day, snap(new=100), NOW).train


def test_quiet_hours_parse_errors_say_the_format() -> None:
    with pytest.raises(ValueError, match="22:00-06:00"):
        QuietHours.parse("10pm to 6am")


def test_failure_backoff_steps_and_repeats_last() -> None:
    assert failure_backoff(P, 0) == timedelta(0)
    assert failure_backoff(P, 1) == timedelta(minutes=10)
    assert failure_backoff(P, 2) == timedelta(minutes=60)
    assert failure_backoff(P, 7) == timedelta(minutes=360)


def test_thresholds_are_settings() -> None:
    p = PolicySettings(min_lessons=3, min_interval_h=1)
    assert decide(p, snap(new=3, ended_ago_h=1), NOW).train
    assert not decide(p, snap(new=2, ended_ago_h=5), NOW).train
