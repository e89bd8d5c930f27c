"""Recipe (b): per-sample gradient features of a dataset at every snapshot, one shard per process.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/featurize_sharded.py \
        --run_dir runs/warmup --dataset pool.jsonl --preconditioner adam --k 8192

    python recipes/featurize_sharded.py --tiny --run_dir runs/tiny-warmup --preconditioner adam --k 64

Writes `<run_dir>/datasel/features/<dataset key>/step-*/<preconditioner>-<spec>/` (unit.npy,
norms.npy, loss.npy, meta.json): the cache that LESS, G2IS and Swift Study read. Each process computes a
contiguous range of the length-sorted batch plan on its own device; the shards are merged into
one array in row order, so the result does not depend on the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from _common import load_pool, parse
from accelerate import PartialState
from datasets import Dataset

from hf_datasel import RunStore
from hf_datasel.featurize import gradient_features


@dataclass
class FeaturizeArguments:
    """Which run, which rows, which feature space."""

    run_dir: str = field(metadata={"help": "The recorded run's output_dir (with snapshots)."})
    dataset: str | None = field(default=None, metadata={"help": "Rows to featurize (path or Hub id)."})
    dataset_split: str = field(default="train")
    tiny: bool = field(default=False, metadata={"help": "Featurize the synthetic pool of the tiny recording."})
    pool_size: int = field(default=96)
    preconditioner: str = field(default="none", metadata={"help": "none, adam or adam_reference."})
    k: int | None = field(default=8192, metadata={"help": "Projection dimension (omit with --exact)."})
    exact: bool = field(default=False, metadata={"help": "Full gradients, no projection (small models)."})
    seed: int = field(default=0)
    projection: str = field(default="tensor")
    dtype: str = field(default="float16")
    batch_size: int = field(default=16)
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU (implied by --tiny and by no GPU)."})
    max_length: int = field(default=1024)

    def __post_init__(self):
        if not self.tiny and self.dataset is None:
            raise ValueError("give --dataset, or --tiny for the synthetic pool.")


def featurize_sharded(store: RunStore, dataset: Dataset, **kwargs) -> list | None:
    """`gradient_features` with one shard per process; every process returns the merged feature sets.

    All processes must call it (it waits for the others before opening the merged features).
    """
    state = PartialState()  # set up by the caller (main) or by a Trainer
    device = state.device if state.device.type != "mps" else "cpu"
    shard = (state.process_index, state.num_processes) if state.num_processes > 1 else None
    gradient_features(store, dataset, shard=shard, device=device, progress=state.is_local_main_process, **kwargs)
    state.wait_for_everyone()
    return gradient_features(store, dataset, device=device, progress=False, **kwargs)  # merged: opens the cache


def main(argv: list[str] | None = None) -> None:
    (args,) = parse((FeaturizeArguments,), argv)
    PartialState(cpu=args.use_cpu or args.tiny or not torch.cuda.is_available())  # CPU processes need cpu=True
    store = RunStore.for_output_dir(args.run_dir)
    dataset = load_pool(args)
    sets = featurize_sharded(
        store,
        dataset,
        preconditioner=args.preconditioner,
        k=None if args.exact else args.k,
        seed=args.seed,
        kind=args.projection,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    if PartialState().is_main_process:
        for fs in sets:
            print(f"step {fs.step}: {fs.num_rows} rows × {fs.spec.k} -> {fs.path}")


if __name__ == "__main__":
    main()
