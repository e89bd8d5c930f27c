"""Recipe (c): small-to-large (S2L): loss trajectories of a small proxy → S2L selection → train the large model.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/s2l_small_to_large.py \
        --proxy_model EleutherAI/pythia-160m --large_model meta-llama/Llama-3.1-8B --dataset pool.jsonl \
        --output_dir runs/s2l --budget 0.3 --proxy_epochs 1 --sweeps 5 --large_max_steps 2000

    python recipes/s2l_small_to_large.py --tiny --output_dir runs/tiny-s2l     # CPU, under a minute

Writes `<output_dir>/proxy/datasel/` (the proxy's store: losses and S2L's loss sweeps),
`<output_dir>/subset/` (the selected raw rows + dataset card, `load_dataset`-readable) and,
unless `--large_max_steps 0`, `<output_dir>/large/` (the large model trained on the subset).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from _common import TINY_TRAINING_DEFAULTS, ModelDataArguments, as_budget, load_model_and_tokenizer, load_pool, parse
from accelerate import PartialState
from trl import SFTConfig, SFTTrainer

from hf_datasel import DataSelector, LossRecorderCallback, with_row_ids
from hf_datasel.hub import load_local_dataset


@dataclass
class S2LArguments:
    output_dir: str = field(metadata={"help": "Folder for the proxy run, the subset and the large run."})
    proxy_model: str | None = field(default=None, metadata={"help": "Small proxy model (path or Hub id)."})
    large_model: str | None = field(default=None, metadata={"help": "Large model trained on the subset."})
    dataset: str | None = field(default=None, metadata={"help": "Raw pool (path or Hub id)."})
    dataset_split: str = field(default="train")
    tiny: bool = field(default=False, metadata={"help": "Tiny Llamas and the synthetic pool, on CPU."})
    pool_size: int = field(default=96)
    budget: str = field(
        default="0.3",
        metadata={"help": "A fraction in (0, 1] with a decimal point (1.0 = all rows), or a whole number of rows."},
    )
    num_clusters: int = field(default=100, metadata={"help": "k-means clusters of the loss trajectories."})
    proxy_epochs: float = field(default=1.0)
    sweeps: int = field(default=4, metadata={"help": "Loss sweeps (trajectory length) over the proxy run."})
    large_max_steps: int = field(default=200, metadata={"help": "Steps of the large model; 0 skips it."})
    per_device_train_batch_size: int = field(default=8)
    learning_rate: float = field(default=1e-3)
    max_length: int = field(default=1024)
    seed: int = field(default=0)


def sft_args(args: S2LArguments, output_dir: Path, **kwargs) -> SFTConfig:
    base = dict(TINY_TRAINING_DEFAULTS) if args.tiny else {"report_to": "none", "bf16": True}
    base.update(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.per_device_train_batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    if not args.tiny:
        base["max_length"] = args.max_length
    base.update(kwargs)
    return SFTConfig(**base)


def main(argv: list[str] | None = None) -> None:
    (args,) = parse((S2LArguments,), argv)
    if not args.tiny and not (args.proxy_model and args.large_model and args.dataset):
        raise ValueError("give --proxy_model, --large_model and --dataset, or --tiny")
    out = Path(args.output_dir)
    data_args = ModelDataArguments(
        model_name_or_path=args.proxy_model, dataset=args.dataset, dataset_split=args.dataset_split,
        tiny=args.tiny, pool_size=args.pool_size, model_seed=args.seed,
    )  # fmt: skip
    pool = load_pool(data_args)

    # 1. record: the proxy's loss on every row, swept `sweeps` times over its run
    proxy, proxy_tok = load_model_and_tokenizer(data_args, out, spec="proxy")
    world = PartialState().num_processes
    steps_per_epoch = -(-len(pool) // (args.per_device_train_batch_size * world))
    total = max(1, int(steps_per_epoch * args.proxy_epochs))
    interval = max(1, total // args.sweeps)  # a sweep at every save: the trajectory has one point per save
    save = dict(save_strategy="steps", save_steps=interval, save_only_model=True, save_total_limit=1)
    trainer = SFTTrainer(
        model=proxy,
        args=sft_args(args, out / "proxy", max_steps=interval * args.sweeps, **save),
        train_dataset=with_row_ids(pool),
        processing_class=proxy_tok,
        callbacks=[LossRecorderCallback(sweep_steps="saves")],
    )
    trainer.train()

    # 2. select (main process), then every process reads the same subset back
    state = PartialState()
    if state.is_main_process:
        selector = DataSelector.from_run(out / "proxy", dataset=pool)
        subset = selector.select("s2l", budget=as_budget(args.budget), seed=args.seed, num_clusters=args.num_clusters)
        selector.save_selection(subset, out / "subset", source_dataset=args.dataset or "synthetic pool")
        print(f"S2L kept {len(subset)} of {len(pool)} rows -> {out / 'subset'}")
    state.wait_for_everyone()
    subset = load_local_dataset(out / "subset")

    # 3. train the large model on the subset (a different model: the subset holds raw rows, no token ids)
    if args.large_max_steps > 0:
        large_args = ModelDataArguments(
            model_name_or_path=args.large_model, dataset=args.dataset, tiny=args.tiny, model_seed=args.seed
        )
        large, large_tok = load_model_and_tokenizer(large_args, out, spec="large")
        large_trainer = SFTTrainer(
            model=large,
            args=sft_args(args, out / "large", max_steps=args.large_max_steps),
            train_dataset=subset,
            processing_class=large_tok,
        )
        large_trainer.train()
        large_trainer.save_model()  # the main process writes <output_dir>/large
        if state.is_main_process:
            print(f"large model trained on the subset -> {out / 'large'}")


if __name__ == "__main__":
    main()
