"""Stopping on request: SIGINT / SIGTERM become a flag the training loop polls.

The loop finishes the current iteration, saves ``checkpoint_latest.pt`` and returns; the CLI
then exits with 128 + signal number (see :mod:`uumamba.engine.loop`).
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopSignals:
    """Context manager: SIGINT / SIGTERM set :attr:`received` instead of ending the process.

    A second SIGINT raises KeyboardInterrupt (abort without saving). Handlers are installed
    only in the main thread and the previous ones are restored on exit.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
