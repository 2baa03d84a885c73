"""Support for the scripts in ``benchmarks/``: one-line failures (the CLI's error style,
outside typer) and the one-line machine description every measurement is printed with.

``python benchmarks/bench_acdc.py --data missing/`` should say what is wrong in one line and
exit non-zero, as ``uumamba`` commands do, instead of printing a traceback. Bugs still raise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from uumamba.errors import UserError, cli_text


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
        print(f"error: {cli_text(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def describe_machine() -> str:
    """Host, CPU model, cores, RAM, torch version and threads, load average and UTC time, in
    one line (for the header of a benchmark's table)."""
    import datetime
    import os
    import platform
    from pathlib import Path

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB RAM"
    except (ValueError, OSError, AttributeError):
        mem = "RAM unknown"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{platform.node()}: {cpu}; {os.cpu_count()} cores, {mem}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; load average {load}; {now}")
