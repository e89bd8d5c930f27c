"""Training settings for the embedded tiny models, shared by the demo and the benchmarks."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PrinterCallback, Trainer
from transformers.utils import logging as hf_logging
from trl import SFTConfig

# transformers 5.24 renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns);
# setting the name this transformers has keeps the library's own defaults free of warnings.
CHECKPOINTING_FLAG = (
    "activation_checkpointing"
    if any(f.name == "activation_checkpointing" for f in dataclasses.fields(SFTConfig))
    else "gradient_checkpointing"
)


def tiny_sft_config(output_dir: str | os.PathLike, **overrides) -> SFTConfig:
    """An SFTConfig sized for the tiny Llamas: fp32, no activation checkpointing, quiet, no checkpoints.

    Runs on the GPU when there is one, else on the CPU; any field can be overridden.
    """
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=3e-3,
        logging_steps=50,
        report_to=[],
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        **{CHECKPOINTING_FLAG: False},
        max_length=48,
        save_strategy="no",
        disable_tqdm=True,
    )
    settings.update(overrides)
    return SFTConfig(**settings)


def without_log_prints(trainer: Trainer) -> Trainer:
    """`trainer` without the callback that prints its log dicts (with progress bars off, the end-of-training
    summary would land in the demo's and the benchmarks' own output)."""
    trainer.remove_callback(PrinterCallback)
    return trainer


@contextmanager
def quiet_checkpoint_rotation() -> Iterator[None]:
    """Within the block, transformers' checkpoint rotation does not warn that mtimes are unreliable.

    The tiny runs save checkpoints less than a second apart, which that check takes for a filesystem
    without mtimes; it then orders them by step number, which is right, so the warning is only noise
    in the demo's and the benchmarks' output.
    """
    logger = hf_logging.get_logger("transformers.trainer_utils")
    level = logger.level
    logger.setLevel(hf_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
