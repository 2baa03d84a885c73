"""Inference off the event loop: a thread pool with bounded admission.

``workers_per_device`` threads share one loaded predictor (PyTorch releases the GIL inside
kernels, and an eval-mode network under ``torch.inference_mode`` keeps no per-call state), so
at most that many inferences run at a time. Admission is decided *before* the upload is read:
:meth:`InferencePool.reserve` hands out a :class:`Slot` while fewer than
``workers + max_queue`` requests are admitted, else raises :class:`QueueFull` (the app answers
429 with ``Retry-After``). A slot is given back when its work finishes, is cancelled, or the
request fails before submitting (:attr:`Slot.submitted` tells which side releases it).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class QueueFull(Exception):
    """Every worker is busy and the waiting queue holds ``max_queue`` requests."""


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
