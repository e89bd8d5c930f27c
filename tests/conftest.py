"""Shared fixtures: the embedded tiny default (local tokenizer, tiny Llama, synthetic pool)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from hf_datasel.synthetic import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def pool():
    from hf_datasel.synthetic import make_pool

    return make_pool(96, noise=0.2, seed=0)


@pytest.fixture
def tiny_model(tokenizer):
    from hf_datasel.synthetic import build_model

    return build_model(tokenizer, seed=0)


def sft_config(output_dir, **overrides):
    """An SFTConfig for exact CPU tests: fp32, no checkpointing, no reporting."""
    from trl import SFTConfig

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        max_steps=4,
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        learning_rate=1e-3,
        max_length=32,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)
