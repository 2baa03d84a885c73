"""Child of ``bench_throughput.py``: one real training run that trains in turns.

Runs ``uumamba.engine.train.run_fold`` of whatever ``uumamba`` is first on ``PYTHONPATH`` (so
the same file drives an earlier commit's engine) with a callback that, every ``--turn``
iterations, reports the seconds of that turn and waits for the next "go". The control
channel is two file descriptors inherited from the driver (``--fds R,W``): the driver
writes ``go`` or ``stop`` lines, this process answers ``turn SECONDS ITERATIONS``. While
it waits it uses no CPU (its DataLoader worker fills its two prefetched batches, then idles),
so the two trees of a comparison never train at the same time.

Uses only API present since the engine's callbacks existed: ``uumamba.config.load_config``,
``uumamba.engine.callbacks.Callback``, ``uumamba.engine.train.run_fold``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--fds", required=True, help="read,write descriptors of the driver's pipes")
    p.add_argument("--turn", type=int, default=10, help="iterations per turn")
    p.add_argument("--iterations", type=int, required=True, help="iterations planned")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    read_fd, write_fd = (int(v) for v in args.fds.split(","))
    commands = os.fdopen(read_fd, "r")
    answers = os.fdopen(write_fd, "w", buffering=1)

    import torch

    from uumamba.config import load_config
    from uumamba.engine.callbacks import Callback
    from uumamba.engine.train import run_fold

    torch.set_num_threads(args.threads)

    class Turns(Callback):
        def wait(self) -> None:
            if commands.readline().strip() != "go":
                os._exit(0)  # "stop" or the driver is gone: nothing of this run is kept
            self.t0, self.done = time.perf_counter(), 0

        def on_train_start(self, ctx) -> None:
            self.wait()

        def on_iteration_end(self, ctx, log) -> None:
            self.done += 1
            if self.done == args.turn:
                answers.write(f"turn {time.perf_counter() - self.t0:.6f} {self.done}\n")
                self.wait()

    overrides = [*args.overrides, "train.epochs=1", f"train.iterations_per_epoch={args.iterations}",
                 "train.val_every=1", "train.schedule_by_time=false",
                 "train.time_limit_minutes=null"]
    cfg = load_config(args.config, overrides)
    run_fold(cfg, args.data, args.output, "0", device="cpu", callbacks=[Turns()], progress=False)
    answers.write("finished\n")


if __name__ == "__main__":
    main()
