"""Recipe (d): LESS end to end: LoRA warmup with snapshots → sharded gradient features → LESS selection.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/less_end_to_end.py \
        --model_name_or_path meta-llama/Llama-3.2-1B --dataset pool.jsonl --targets target_val.jsonl \
        --output_dir runs/less --num_train_epochs 4 --save_strategy epoch --snapshot_steps saves \
        --budget 0.05 --projection_dim 8192

    python recipes/less_end_to_end.py --tiny --output_dir runs/tiny-less     # CPU, under a minute

Writes `<output_dir>/datasel/` (losses, snapshots at every save, and the gradient features of
the pool (Adam-preconditioned) and of the targets (plain)), and `<output_dir>/subset/`: the
`budget` pool rows with the highest LESS score, with their dataset card.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from _common import ModelDataArguments, as_budget, load_pool, parse
from accelerate import PartialState
from featurize_sharded import featurize_sharded
from record_warmup import RecordArguments, build_trainer
from trl import SFTConfig

from hf_datasel import DataSelector, RunStore

# the warmup of the tiny mode: 8 steps, a snapshot at each of 2 saves
TINY_WARMUP = ["--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4", "--snapshot_steps", "saves"]


@dataclass
class LessArguments:
    """Targets, budget and feature space of the LESS selection."""

    targets: str | None = field(default=None, metadata={"help": "Target (validation) rows: path or Hub id."})
    target_task_column: str = field(default="task", metadata={"help": "Column grouping targets into tasks."})
    budget: str = field(
        default="0.05",
        metadata={"help": "A fraction in (0, 1] with a decimal point (1.0 = all rows), or a whole number of rows."},
    )
    projection_dim: int = field(default=8192)
    projection_seed: int = field(default=0)
    projection: str = field(default="tensor", metadata={"help": "tensor (default), sparse, rademacher or gaussian."})
    adam_form: str = field(default="adam", metadata={"help": "adam (bias-corrected) or adam_reference (LESS code)."})
    featurize_batch_size: int = field(default=16)


def load_targets(less_args: LessArguments, model_args: ModelDataArguments):
    if less_args.targets is None:
        if not model_args.tiny:
            raise ValueError("give --targets (the target task's validation rows)")
        from hf_datasel.synthetic import make_pool

        return make_pool(16, tasks=("add",), noise=0.0, seed=1)  # the target task: clean additions
    return load_pool(ModelDataArguments(dataset=less_args.targets, tiny=model_args.tiny))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--tiny" in argv:
        argv = [*TINY_WARMUP, *argv]
    model_args, record_args, less_args, training_args = parse(
        (ModelDataArguments, RecordArguments, LessArguments, SFTConfig), argv
    )
    if record_args.snapshot_steps is None:
        raise ValueError("LESS needs snapshots: pass --snapshot_steps saves (or a comma list of steps)")
    out = Path(training_args.output_dir)

    # 1. warmup: losses and snapshots (weights + Adam moments) on every process
    trainer = build_trainer(model_args, record_args, training_args)
    trainer.train()

    # 2. features: pool (Adam-preconditioned) and targets (plain), one shard per process
    store = RunStore.for_output_dir(out)
    pool, targets = load_pool(model_args), load_targets(less_args, model_args)
    feature_space = dict(
        k=less_args.projection_dim,
        seed=less_args.projection_seed,
        kind=less_args.projection,
        batch_size=less_args.featurize_batch_size,
        max_length=training_args.max_length,
    )
    featurize_sharded(store, pool, preconditioner=less_args.adam_form, **feature_space)
    featurize_sharded(store, targets, preconditioner="none", **feature_space)

    # 3. select on the main process (the features are cached: nothing is recomputed)
    state = PartialState()
    if state.is_main_process:
        selector = DataSelector.from_run(out, dataset=pool)
        subset = selector.select(
            "less",
            budget=as_budget(less_args.budget),
            targets=targets,
            task_column=less_args.target_task_column if less_args.target_task_column in targets.column_names else None,
            k=less_args.projection_dim,
            projection_seed=less_args.projection_seed,
            projection=less_args.projection,
            adam_form=less_args.adam_form,
            batch_size=less_args.featurize_batch_size,
            max_length=training_args.max_length,
        )
        selector.save_selection(subset, out / "subset", source_dataset=model_args.dataset or "synthetic pool")
        print(f"LESS kept {len(subset)} of {len(pool)} rows -> {out / 'subset'}")
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
