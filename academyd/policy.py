"""The training trigger: a pure function of a snapshot, the settings and `now`.

`decide(policy, snapshot, now)` never reads a clock or the database; the daemon passes both in, so the
tests drive time through `now` instead of sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from academyd.settings import PolicySettings, QuietHours
from academyd.store import Snapshot


@dataclass(frozen=True)
class Decision:
    train: bool
    reason: str
    next_eligible: datetime | None
    """Earliest time the clock conditions allow a run (ignores the lesson count); None: now."""


def in_quiet_hours(quiet: QuietHours | None, now: datetime) -> bool:
    if quiet is None:
        return False
    t = now.timetz().replace(tzinfo=None)
    if quiet.start <= quiet.end:
        return quiet.start <= t < quiet.end
    return t >= quiet.start or t < quiet.end  # the window wraps past midnight


def quiet_hours_end(quiet: QuietHours, now: datetime) -> datetime:
    """The next moment at or after `now` that is outside the quiet window."""
    end = now.replace(hour=quiet.end.hour, minute=quiet.end.minute, second=0, microsecond=0)
    if end <= now:
        end += timedelta(days=1)
    return end


def failure_backoff(policy: PolicySettings, failures: int) -> timedelta:
    """Wait after `failures` consecutive failed or refused runs (last step repeats)."""
    if failures <= 0 or not policy.retry_backoff_min:
        return timedelta(0)
    steps = policy.retry_backoff_min
    return timedelta(minutes=steps[min(failures, len(steps)) - 1])


def next_eligible(policy: PolicySettings, snap: Snapshot, now: datetime) -> datetime | None:
    """When the clock conditions (interval, failure backoff, quiet hours) next allow a run."""
    candidates = [now]
    if snap.last_training_ended is not None:
        candidates.append(snap.last_training_ended + timedelta(hours=policy.min_interval_h))
    if snap.consecutive_failures and snap.last_failure_at is not None:
        candidates.append(snap.last_failure_at + failure_backoff(policy, snap.consecutive_failures))
    at = max(candidates)
    if policy.quiet_hours is not None and in_quiet_hours(policy.quiet_hours, at):
        at = quiet_hours_end(policy.quiet_hours, at)
    return None if at <= now else at


def decide(policy: PolicySettings, snap: Snapshot, now: datetime, *, force: bool = False) -> Decision:
    """Should a training run start now?

    Train when no run is active, at least `min_lessons` new successful lessons arrived since the last
    training, at least `min_interval_h` hours passed since it ended, the failure backoff has passed and
    `now` is outside quiet hours. `force` skips every threshold but never the one-active-run rule.
    """
    eligible_at = next_eligible(policy, snap, now)
    if snap.active_run is not None:
        return Decision(False, f"run {snap.active_run} is active", eligible_at)
    if force:
        return Decision(True, "forced", eligible_at)
    if snap.new_successful_lessons < policy.min_lessons:
        return Decision(
            False,
            f"{snap.new_successful_lessons}/{policy.min_lessons} new successful lessons",
            eligible_at,
        )
    if eligible_at is not None:
        if policy.quiet_hours is not None and in_quiet_hours(policy.quiet_hours, now):
            why = "quiet hours"
        elif snap.consecutive_failures and snap.last_failure_at is not None and (
            now < snap.last_failure_at + failure_backoff(policy, snap.consecutive_failures)
        ):
            why = f"backing off after {snap.consecutive_failures} failed run(s)"
        else:
            why = f"less than {policy.min_interval_h:g} h since the last training"
        return Decision(False, f"{why}; eligible at {eligible_at.isoformat()}", eligible_at)
    return Decision(
        True, f"{snap.new_successful_lessons} new successful lessons and the interval has passed", None
    )

