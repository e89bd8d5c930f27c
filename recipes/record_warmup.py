"""Recipe (a): record losses, loss sweeps and snapshots during a short LoRA warmup, on one or many GPUs.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/record_warmup.py \
        --model_name_or_path Qwen/Qwen2.5-0.5B --dataset pool.jsonl --output_dir runs/warmup \
        --num_train_epochs 1 --save_strategy steps --save_steps 200 --sweep_steps saves --snapshot_steps saves

    python recipes/record_warmup.py --tiny --output_dir runs/tiny-warmup --max_steps 12   # CPU, seconds

Writes `<output_dir>/datasel/` (manifest, rows, losses, sweep, snapshots): the run store that
`DataSelector.from_run(output_dir, dataset)` and `hf-datasel select` read. Every process records
the rows it trains on; the main process gathers them, drops accelerate's padded duplicates and writes.

Run the same command again after a crash and it resumes from the last checkpoint whose records
reached the store (`--resume false` starts over): what was lost is trained and recorded again,
and the store ends up as an uninterrupted run's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from _common import ModelDataArguments, load_model_and_tokenizer, load_pool, parse, parse_steps
from trl import SFTConfig, SFTTrainer

from hf_datasel import LossRecorderCallback, RunStore, with_row_ids
from hf_datasel.record.snapshot import read_snapshot_index


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
    resume: bool = field(
        default=True,
        metadata={"help": "Resume from the last checkpoint the store fully recorded; false: start over."},
    )


def resume_checkpoint(output_dir: str, snapshot_steps: list[int] | str | None) -> str | None:
    """The latest `checkpoint-N` of `output_dir` that the store recorded completely, or None to start over.

    A checkpoint is written before the recorder flushes at that save (and a snapshot at a save is
    taken after it), so a crash in between leaves a checkpoint whose records are not in the store:
    resuming from it would lose them. Only a checkpoint N with the losses and sweeps flushed up to
    N, and every snapshot due by N in the store, is resumed from.
    """
    store = RunStore.for_output_dir(output_dir)
    if not store.exists():
        return None
    flushed = store.manifest.get("recorded", {}).get("last_step")
    if flushed is None:
        return None
    snapshots = {e["step"] for e in read_snapshot_index(store)}
    found = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        if match and (folder / "trainer_state.json").exists():
            found.append(int(match.group(1)))
    for step in sorted(found, reverse=True):
        due = {step} if snapshot_steps == "saves" else {s for s in snapshot_steps or () if s <= step}
        if step <= flushed and due <= snapshots:
            return str(Path(output_dir) / f"checkpoint-{step}")
    return None


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
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None and record_args.resume:
        checkpoint = resume_checkpoint(training_args.output_dir, parse_steps(record_args.snapshot_steps))
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.accelerator.is_main_process:
        print(f"run store: {training_args.output_dir}/datasel")


if __name__ == "__main__":
    main()
