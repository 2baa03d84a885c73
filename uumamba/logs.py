"""Messages from library code: the standard ``logging`` module under the ``uumamba`` logger.

Library modules never print; they log notes and warnings (``logging.getLogger(__name__)``,
so every name is under ``uumamba.``) and return or raise. Whoever runs them decides where the
messages go: the CLI (:mod:`uumamba.commands`) installs a handler on the ``uumamba`` logger
for the whole command; an application or notebook configures ``logging`` as it likes.

:func:`default_output` covers the remaining case, a bare call of a long-running entry point
(``run_fold`` in a script): when no handler is attached to the ``uumamba`` logger, INFO and
above are written to standard output, message only, for the duration of the call — the
behaviour of ``logging.basicConfig`` without touching the root logger. (An application that
set its root logger to INFO then sees the notes twice: attach a handler to ``uumamba``, or
set ``logging.getLogger("uumamba").propagate = False``.)
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from uumamba.errors import printable

ROOT = "uumamba"


class _StdoutHandler(logging.Handler):
    """Write each record to the *current* ``sys.stdout`` (so redirection, a rich live display
    or pytest's capture still receive it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # one line per record: a line break inside a file name a message quotes is
            # escaped (\x0a) and cannot start a line of its own
            print(printable(self.format(record)), file=sys.stdout, flush=True)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _message_handler(level: int) -> _StdoutHandler:
    handler = _StdoutHandler(level)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def _configured(logger: logging.Logger) -> bool:
    """True when ``logger`` itself has a handler. The root logger is not consulted: test
    runners and servers attach capture handlers there that do not show anything to a user."""
    return bool(logger.handlers)


@contextlib.contextmanager
def default_output(level: int = logging.INFO) -> Iterator[None]:
    """Print ``uumamba`` INFO+ messages to stdout while inside, unless logging is configured."""
    logger = logging.getLogger(ROOT)
    if _configured(logger):
        yield
        return
    handler = _message_handler(level)
    previous = logger.level
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def print_messages(level: int = logging.INFO) -> None:
    """Print ``uumamba`` messages of ``level`` and above to stdout from now on (the CLI's
    setting; installing it twice has no further effect)."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        logger.addHandler(_message_handler(level))
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
