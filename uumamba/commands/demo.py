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

    console = Console(soft_wrap=True)  # one line per message when piped
    console.rule("uumamba demo")
    result = run_demo(output=output, minutes=minutes, device=device, n_cases=n_cases)
    print_summary(result, title="Held-out synthetic cases")
    floor = result["expected_min_dice"]
    low = [f"{m['name']} {m['Dice']:.3f}" for m in result["mean"].values()
           if m["Dice"] is not None and m["Dice"] < floor]
    console.print(f"expected: Dice >= {floor} for every class after {result['planned_iterations']} "
                  f"iterations (trained {result['iterations']} on {result['device']})"
                  + (f"; below it: {', '.join(low)}" if low else "; every class reached it"))
    if result["cut_short"]:
        console.print(f"[yellow]training was cut short by the --minutes {minutes:g} cap; rerun with "
                      "a larger --minutes for the full result[/yellow]")
    if output is not None:
        root = Path(result["root"])
        console.print(f"kept: data {root / 'data'}, model {root / 'model'}, predictions and "
                      f"summary.json {root / 'predictions'}", markup=False, highlight=False)
        console.print(f"next: uumamba predict --model {root / 'model'} --input "
                      f"{result['test_images']} --output OUT", markup=False, highlight=False)
    console.print(f"demo finished in {result['seconds']:.0f} s")
    return result
