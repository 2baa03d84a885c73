"""Inference off the event loop: a thread pool with bounded admission.

``workers_per_device`` threads share one loaded predictor (PyTorch releases the GIL inside
kernels, and an eval-mode network under ``torch.inference_mode`` keeps no per-call state), so
at most that many inferences run at a time. Admission is decided once the upload is complete
and checked: :meth:`InferencePool.reserve` hands out a :class:`Slot` while fewer than
``workers + max_queue`` requests are admitted, else raises :class:`QueueFull` (the app answers
429 with ``Retry-After``). A slot is given back when its work finishes, is cancelled, or the
request fails before submitting (:attr:`Slot.submitted` tells which side releases it).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class QueueFull(Exception):
    """Every worker is busy and the waiting queue holds ``max_queue`` requests."""


class CancelToken:
    """Cancel flag of one inference, read by the sliding window between window batches.

    Set by :meth:`cancel` (request timed out, job deleted) or, once :meth:`start` gave a
    wall-time cap, when that many seconds have passed since the inference started.
    ``reason`` says which (``None`` while not cancelled).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._deadline: float | None = None
        self.reason: str | None = None

    def start(self, max_seconds: float | None) -> None:
        """The inference starts now; cancel it after ``max_seconds`` (``None``: no cap)."""
        self._deadline = None if max_seconds is None else time.monotonic() + max_seconds

    def cancel(self, reason: str) -> None:
        """Ask the running inference to stop (idempotent; the first reason is kept)."""
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        """True once cancelled or past the wall-time cap."""
        if not self._event.is_set() and self._deadline is not None and time.monotonic() > self._deadline:
            self.cancel("wall-time cap")
        return self._event.is_set()


class Slot:
    """An admitted request's place in the pool; :meth:`release` is idempotent.

    Once handed to :meth:`InferencePool.submit` (``submitted`` is then true) the pool releases
    it when the work ends; before that, whoever reserved it does.
    """

    def __init__(self, pool: InferencePool) -> None:
        self._pool = pool
        self._released = False
        self.submitted = False

    def release(self) -> None:
        """Give the place back (safe to call more than once)."""
        with self._pool._lock:
            if self._released:
                return
            self._released = True
            self._pool._admitted -= 1


class InferencePool:
    """Run inference callables on ``workers`` threads; admit at most ``workers + max_queue``.

    Args:
        workers: inferences running at the same time (``workers_per_device``), >= 1.
        max_queue: admitted requests allowed to wait beyond the running ones, >= 0.

    Raises:
        ValueError: ``workers`` < 1 or ``max_queue`` < 0.
    """

    def __init__(self, workers: int, max_queue: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.workers = workers
        self.capacity = workers + max_queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="uumamba-infer")
        self._lock = threading.Lock()
        self._admitted = 0
        self._running = 0

    def reserve(self) -> Slot:
        """Admit one request or raise :class:`QueueFull`."""
        with self._lock:
            if self._admitted >= self.capacity:
                raise QueueFull(f"{self._admitted} requests admitted (capacity {self.capacity})")
            self._admitted += 1
        return Slot(self)

    def submit(self, slot: Slot, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)`` on a worker thread; ``slot`` is released when it ends or is cancelled."""

        def run() -> Any:
            with self._lock:
                self._running += 1
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self._running -= 1

        future = self._executor.submit(contextvars.copy_context().run, run)
        slot.submitted = True
        future.add_done_callback(lambda _f: slot.release())
        return future

    @property
    def full(self) -> bool:
        """True when :meth:`reserve` would raise :class:`QueueFull` now."""
        with self._lock:
            return self._admitted >= self.capacity

    @property
    def running(self) -> int:
        """Inferences executing now."""
        with self._lock:
            return self._running

    @property
    def queued(self) -> int:
        """Admitted requests not yet running (uploading, being checked, or waiting for a worker)."""
        with self._lock:
            return self._admitted - self._running

    def shutdown(self) -> None:
        """Cancel waiting work and stop accepting; running inferences finish in the background."""
        self._executor.shutdown(wait=False, cancel_futures=True)
