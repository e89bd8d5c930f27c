"""Run an hf_datasel command that stops dead at a chosen point, for tests that kill it there with SIGKILL.

    FAULT=step:5 FAULT_MARKER=/tmp/m python tests/fault_driver.py recipes/record_warmup.py --tiny ...
    FAULT=batch:2 FAULT_MARKER=/tmp/m python tests/fault_driver.py cli featurize RUN ROWS ...

At the fault point the process writes FAULT_MARKER and sleeps; the test then kills it with
`kill -9`, so nothing of the library's own cleanup runs, exactly as in a crash. Fault points:

    step:N    training, at the end of global step N (after the recorder's work for that step)
    sweep:N   training, as the loss sweep at step N starts
    batch:N   featurizing, once the N-th batch is written to the arrays (not yet logged as done)
    merge     featurizing, inside the shard merge (merge.lock held, nothing merged yet)
    card      exporting a selection, after the parquet shards, before the dataset card
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path


def stop_here() -> None:
    """Tell the test where we are, then wait to be killed."""
    Path(os.environ["FAULT_MARKER"]).write_text(str(os.getpid()))
    while True:
        time.sleep(60)


def install(fault: str) -> None:
    kind, _, arg = fault.partition(":")
    if kind in ("step", "sweep"):
        from hf_datasel.record.loss_recorder import LossRecorderCallback

        name = "on_step_end" if kind == "step" else "_sweep"
        original = getattr(LossRecorderCallback, name)

        def patched(self, *args, **kwargs):
            step = args[1].global_step if kind == "step" else args[0]
            if kind == "step":
                original(self, *args, **kwargs)
            if step == int(arg):
                stop_here()
            if kind == "sweep":
                original(self, *args, **kwargs)

        setattr(LossRecorderCallback, name, patched)
    elif kind == "batch":
        from hf_datasel.featurize import features

        original, calls = features._write_batch, []

        def write_batch(*args, **kwargs):
            original(*args, **kwargs)
            calls.append(1)
            if len(calls) == int(arg):
                stop_here()

        features._write_batch = write_batch
    elif kind == "merge":
        from hf_datasel.featurize import features

        features._merge = lambda *args, **kwargs: stop_here()
    elif kind == "card":
        from hf_datasel import hub

        hub.render_card = lambda *args, **kwargs: stop_here()
    else:
        raise ValueError(f"unknown fault point {fault!r}")


def main() -> None:
    install(os.environ["FAULT"])
    target, *argv = sys.argv[1:]
    if target == "cli":
        from hf_datasel.cli import main as cli

        sys.argv = ["hf-datasel", *argv]
        cli()
    else:  # a recipe script, run as `python <recipe> <argv>` would run it
        sys.argv = [target, *argv]
        sys.path.insert(0, str(Path(target).resolve().parent))
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
