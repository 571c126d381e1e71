"""Supervision of the daemon's long-running tasks (the outbox relay, the pipeline): a task that raises, or
returns while the daemon is not stopping, is started again with backoff (tenacity: `first_s` doubling to
`max_s`, for ever), and the daemon says so meanwhile: the component `task:<name>` is degraded (health:
`academyd status`, /healthz 503, systemd STATUS=) from the crash until the restarted task has run for
`healthy_after_s`. No task of the daemon ends silently while the daemon reports itself healthy.

Periodic work (the policy tick, the champion watch) runs as APScheduler jobs instead: `watch_jobs`
reports a job that raised the same way until its next run succeeds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never, wait_exponential

log = structlog.get_logger("academyd.supervise")


class HealthReport(Protocol):
    def degrade(self, component: str, reason: str, now: datetime) -> None: ...

    def recover(self, component: str) -> None: ...


class TaskEnded(Exception):
    """A supervised task returned although the daemon is not stopping."""


async def supervise(name: str, run: Callable[[], Awaitable[Any]], *, stop: asyncio.Event, health: HealthReport,
                    clock: Callable[[], datetime], first_s: float = 1.0, max_s: float = 60.0,
                    healthy_after_s: float = 30.0) -> None:
    """Run `run()` until `stop` is set (or this task is cancelled), restarting it whenever it ends."""
    component = f"task:{name}"
    crashes = 0

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.error("task_crashed", task=name, restarts=state.attempt_number, retry_in_s=round(wait, 2),
                  error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        health.degrade(component, f"{name} stopped ({type(exc).__name__}: {exc}); restarting with backoff "
                                  f"({state.attempt_number} so far)", clock())

    async def sleep(seconds: float) -> None:  # a backoff ends early when the daemon stops
        try:
            await asyncio.wait_for(stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

    retrying = AsyncRetrying(retry=retry_if_exception_type(Exception), stop=stop_never,
                             wait=wait_exponential(multiplier=first_s, min=first_s, max=max_s),
                             before_sleep=before_sleep, sleep=sleep, reraise=True)
    async for attempt in retrying:
        if stop.is_set():
            return
        with attempt:
            task = asyncio.ensure_future(run())
            try:
                if crashes and await _survives(task, healthy_after_s):  # a restart that holds: healthy again
                    health.recover(component)
                    log.info("task_recovered", task=name)
                await task
            except asyncio.CancelledError:
                task.cancel()
                raise
            except Exception:
                crashes += 1
                raise
            if not stop.is_set():
                crashes += 1
                raise TaskEnded(f"{name} returned while the daemon runs")


async def _survives(task: asyncio.Future[Any], seconds: float) -> bool:
    """Whether `task` is still running after `seconds` (it is not cancelled either way)."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return not done


def watch_jobs(scheduler: Any, health: HealthReport, clock: Callable[[], datetime]) -> None:
    """Report an APScheduler job that raised (`scheduler:<job id>` degraded) until it next runs well."""
    from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED

    def on_event(event: Any) -> None:
        component = f"scheduler:{event.job_id}"
        if event.code == EVENT_JOB_ERROR:
            log.error("job_failed", job=event.job_id, error=f"{type(event.exception).__name__}: {event.exception}")
            health.degrade(component, f"the {event.job_id} job failed ({type(event.exception).__name__}: "
                                      f"{event.exception}); it runs again at its next tick", clock())
        else:
            health.recover(component)

    scheduler.add_listener(on_event, EVENT_JOB_ERROR | EVENT_JOB_EXECUTED)
