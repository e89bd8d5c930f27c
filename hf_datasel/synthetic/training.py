"""Training settings for the embedded tiny models, shared by the demo and the benchmarks."""

from __future__ import annotations

import os

import torch
from trl import SFTConfig


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
        gradient_checkpointing=False,
        max_length=48,
        save_strategy="no",
        disable_tqdm=True,
    )
    settings.update(overrides)
    return SFTConfig(**settings)
