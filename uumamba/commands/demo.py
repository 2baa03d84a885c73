"""``uumamba demo``: run :func:`uumamba.demo.run_demo` and print what a newcomer needs to see —
the held-out Dice table, where the files were kept and what to run next."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uumamba.commands.evaluate import print_summary


def demo_from_cli(output: Path | None, minutes: float, device: str, n_cases: int) -> dict[str, Any]:
    """Print a heading, run the demo (its notes come through the ``uumamba`` logger), print
    the table and, with ``--output``, where everything is.

    Raises:
        UserError: as :func:`uumamba.demo.run_demo`.
    """
    from rich.console import Console

    from uumamba.demo import run_demo

    console = Console()
    console.rule("uumamba demo")
    result = run_demo(output=output, minutes=minutes, device=device, n_cases=n_cases)
    print_summary(result, title="Held-out synthetic cases")
    if output is not None:
        root = Path(result["root"])
        console.print(f"kept: data {root / 'data'}, model {root / 'model'}, predictions and "
                      f"summary.json {root / 'predictions'}")
        console.print(f"next: uumamba predict --model {root / 'model'} --input "
                      f"{result['test_images']} --output OUT")
    console.print(f"demo finished in {result['seconds']:.0f} s")
    return result
