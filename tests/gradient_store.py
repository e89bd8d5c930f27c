"""Test helper: a run store with snapshots, made without a Trainer (a few manual AdamW steps).

Gradient tests need snapshots (weights + Adam moments) but not a whole SFTTrainer run; this
builds a tiny Llama saved to a local folder (so rebuilding it goes through `from_pretrained`),
optionally wraps it in LoRA, takes a few AdamW steps and records snapshots with the real
`SnapshotCallback` code.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from hf_datasel.data import pad_batch, tokenize_rows
from hf_datasel.record.snapshot import SnapshotCallback
from hf_datasel.store import RunStore
from hf_datasel.synthetic import build_model, save_and_reload

LORA_TARGETS = ["q_proj", "v_proj"]


def lora_model(base, r: int = 4, init_lora_weights: bool = False):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        base, LoraConfig(r=r, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=init_lora_weights)
    )


def make_snapshot_store(
    tmp_path: Path, tokenizer, dataset, peft: bool = True, steps: tuple[int, ...] = (2, 4), lr: float = 1e-2
) -> tuple[RunStore, torch.nn.Module]:
    """Train `steps[-1]` AdamW steps on `dataset` and snapshot at `steps`; returns (store, trained model)."""
    model, tok = save_and_reload(build_model(tokenizer, seed=0), tokenizer, tmp_path / "base")
    if peft:
        model = lora_model(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (2 * max(steps)))
    rows = tokenize_rows(dataset, tok, 64)
    cb = SnapshotCallback(steps=list(steps))
    args = SimpleNamespace(output_dir=str(tmp_path / "run"))
    cb.on_train_begin(args, SimpleNamespace(global_step=0), None)
    for step in range(1, max(steps) + 1):
        batch = pad_batch([rows[(step * 8 + i) % len(rows)] for i in range(8)], tok.pad_token_id)
        model(**batch).loss.backward()
        opt.step()
        cb.on_optimizer_step(args, None, None, optimizer=opt)
        sched.step()
        opt.zero_grad()
        state = SimpleNamespace(global_step=step)
        cb.on_step_end(args, state, None, model=model, optimizer=opt, processing_class=tok)
    return RunStore.for_output_dir(tmp_path / "run"), model
