"""Recipe (a): record losses, loss sweeps and snapshots during a short LoRA warmup, on one or many GPUs.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/record_warmup.py \
        --model_name_or_path Qwen/Qwen2.5-0.5B --dataset pool.jsonl --output_dir runs/warmup \
        --num_train_epochs 1 --save_strategy steps --save_steps 200 --sweep_steps saves --snapshot_steps saves

    python recipes/record_warmup.py --tiny --output_dir runs/tiny-warmup --max_steps 12   # CPU, seconds

Writes `<output_dir>/datasel/` (manifest, rows, losses, sweep, snapshots): the run store that
`DataSelector.from_run(output_dir, dataset)` and `hf-datasel select` read. Every process records
the rows it trains on; the main process gathers them, drops accelerate's padded duplicates and writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from _common import ModelDataArguments, load_model_and_tokenizer, load_pool, parse, parse_steps
from trl import SFTConfig, SFTTrainer

from hf_datasel import LossRecorderCallback, with_row_ids


@dataclass
class RecordArguments:
    """What to record besides every trained row's loss."""

    lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (the warmup); false: full fine-tuning."})
    lora_r: int = field(default=8)
    lora_alpha: int = field(default=16)
    lora_target_modules: str = field(default="all-linear", metadata={"help": "Comma list, or all-linear."})
    sweep_steps: str | None = field(
        default=None, metadata={"help": "Loss of every row at these steps (comma list) or at every save ('saves')."}
    )
    sweep_batch_size: int | None = field(default=None)
    snapshot_steps: str | None = field(
        default=None, metadata={"help": "Weights and Adam moments at these steps (comma list) or 'saves'."}
    )


def build_trainer(model_args: ModelDataArguments, record_args: RecordArguments, training_args: SFTConfig):
    """The SFTTrainer of the warmup with the recording callbacks attached."""
    model, tokenizer = load_model_and_tokenizer(model_args, training_args.output_dir)
    pool = load_pool(model_args)
    peft_config = None
    if record_args.lora:
        from peft import LoraConfig

        targets = record_args.lora_target_modules
        peft_config = LoraConfig(
            r=record_args.lora_r,
            lora_alpha=record_args.lora_alpha,
            lora_dropout=0.0,  # dropout would make recorded losses and gradients random
            target_modules=targets if targets == "all-linear" else targets.split(","),
            task_type="CAUSAL_LM",
        )
    callbacks = [
        LossRecorderCallback(
            sweep_steps=parse_steps(record_args.sweep_steps), sweep_batch_size=record_args.sweep_batch_size
        )
    ]
    snapshot_steps = parse_steps(record_args.snapshot_steps)
    if snapshot_steps is not None:
        from hf_datasel.record.snapshot import SnapshotCallback

        callbacks.append(SnapshotCallback(steps=None if snapshot_steps == "saves" else snapshot_steps))
    return SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=with_row_ids(pool),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def main(argv: list[str] | None = None) -> None:
    model_args, record_args, training_args = parse((ModelDataArguments, RecordArguments, SFTConfig), argv)
    trainer = build_trainer(model_args, record_args, training_args)
    trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"run store: {training_args.output_dir}/datasel")


if __name__ == "__main__":
    main()
