"""Handing stored jobs to this process's inference pool.

A job is stored first (:class:`~uumamba_service.jobs.JobStore`), then one pool task per
queued job runs :func:`~uumamba_service.runner.run_next`, which claims the *oldest* queued
job, whoever submitted it: so jobs and synchronous requests share ``workers_per_device`` and
the pool's admission, and jobs left queued by a restart, re-queued after a lost worker, or
submitted through another API process of the same state folder are picked up by
:func:`top_up` from the upkeep loop.
"""

from __future__ import annotations

from .runner import run_next
from .state import ServiceState
from .worker import QueueFull, Slot


def runs_jobs(state: ServiceState) -> bool:
    """Whether this process runs jobs (``run_jobs`` and no broker), once its model is ready."""
    settings = state.settings
    return settings.run_jobs and not settings.broker_url and state.run_context is not None


def dispatch(state: ServiceState, slot: Slot) -> None:
    """Submit one job-running task on ``slot`` (released by the pool when the task ends).

    ``state.drains`` counts the tasks submitted and not yet started.
    """
    started = False
    with state.drain_lock:
        state.drains += 1

    def start() -> None:
        nonlocal started
        with state.drain_lock:
            started = True
            state.drains -= 1
        run_next(state.jobs, state.run_context)

    def ended(_future) -> None:  # cancelled before it started (shutdown)
        with state.drain_lock:
            if not started:
                state.drains -= 1

    state.pool.submit(slot, start).add_done_callback(ended)


def top_up(state: ServiceState) -> int:
    """Submit pool tasks for queued jobs that have none, while the pool admits them.

    Returns:
        How many tasks were submitted (queued jobs minus tasks waiting to start).
    """
    if not runs_jobs(state):
        return 0
    with state.drain_lock:
        missing = state.jobs.waiting(state.run_context.model) - state.drains
    submitted = 0
    while missing > submitted:
        try:
            slot = state.pool.reserve()
        except QueueFull:
            break
        dispatch(state, slot)
        submitted += 1
    return submitted
