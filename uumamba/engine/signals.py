"""Stopping on request: SIGINT / SIGTERM become a flag the training loop polls.

The loop checks the flag after every iteration and, through the network, inside validation:
it saves ``checkpoint_latest.pt`` (or, during validation, keeps the one saved just before
it) and returns; the CLI then exits with 128 + signal number (see :mod:`uumamba.engine.loop`).
DataLoader workers ignore both signals (:mod:`uumamba.engine.sampling`), so a signal sent to
the whole process group (SLURM, systemd, ``kill -- -PGID``, Ctrl-C) stops only the main
process's loop, never a worker.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

#: The signals that ask a run to save and stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: SIGINT / SIGTERM set :attr:`received` instead of ending the process.

    A second SIGINT raises KeyboardInterrupt (abort without saving) — except inside
    :meth:`protect`, where it is held until the protected block (a checkpoint save) has
    finished. Further SIGTERMs only set the flag again. Handlers are installed only in the
    main thread and the previous ones are restored on exit.

    Attributes:
        received: the first stop signal's number, None before one arrived.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._protecting = 0
        self._abort_held = False

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            if self._protecting:
                self._abort_held = True
                return
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """Inside: a second SIGINT does not interrupt; it raises KeyboardInterrupt when the
        block has finished."""
        self._protecting += 1
        try:
            yield
        finally:
            self._protecting -= 1
        if not self._protecting and self._abort_held:
            self._abort_held = False
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
