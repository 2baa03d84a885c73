"""One-line failures for the scripts in ``benchmarks/`` (the CLI's error style, outside typer).

``python benchmarks/bench_acdc.py --data missing/`` should say what is wrong in one line and
exit non-zero, as ``uumamba`` commands do, instead of printing a traceback. Bugs still raise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from uumamba.errors import UserError


def run_script(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a benchmark's ``main(argv)`` and return its exit status.

    Returns:
        ``main``'s integer result (0 when it returns None or a non-integer such as a result
        dict); 1 after printing ``error: <message>`` on stderr for a
        :class:`uumamba.errors.UserError` (a bad flag value, a missing or unreadable dataset);
        130 after an interrupt (Ctrl-C), without a traceback.
    """
    try:
        result = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
