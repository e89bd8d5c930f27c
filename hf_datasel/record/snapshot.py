"""`SnapshotCallback`: trainable weights and Adam moments at chosen steps, read from the live optimizer.

Gradient methods (LESS, G2IS, Swift Study) need, at a few checkpoints, the trainable weights,
the optimizer's first and second moments for exactly those weights, and the learning rate.
Reading them from checkpoint files is fragile (optimizer state is keyed by integers, and
`save_total_limit` deletes checkpoints), so this callback reads the live optimizer, maps its
state to parameter *names* through parameter identity (`model.named_parameters()`), and writes
one safetensors file per snapshot into the run store:

    <output_dir>/datasel/snapshots/step-000010.safetensors   param::<name>, exp_avg::<name>, exp_avg_sq::<name>
    <output_dir>/datasel/snapshots/index.json                step, lr, lr_mean, betas, eps, optimizer step, ...
    <output_dir>/datasel/snapshots/lr_progress.json          at each save: LR sum and count since the last snapshot
    <output_dir>/datasel/snapshots/model.json                how to rebuild the model (base, class, PEFT)
    <output_dir>/datasel/snapshots/model/                    model config (+ adapter config for PEFT)
    <output_dir>/datasel/snapshots/tokenizer/                the processing class, via save_pretrained
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.utils import logging

from ..store import RunStore, broken_file, read_json, write_json
from .trainer_hooks import calling_trainer, is_main_process, record_processing

SNAPSHOT_DIR = "snapshots"
INDEX_FILE = "index.json"
MODEL_FILE = "model.json"
LR_PROGRESS_FILE = "lr_progress.json"
KEPT_SAVES = 64  # checkpoint saves whose LR progress is kept (a run can resume from any of them)

logger = logging.get_logger(__name__)


def snapshot_name(step: int) -> str:
    """The store array name of the snapshot at `step` (`snapshots/step-000010`)."""
    return f"{SNAPSHOT_DIR}/step-{int(step):06d}"


def read_snapshot_index(store: RunStore) -> list[dict[str, Any]]:
    """The snapshot entries of a store, sorted by step (empty when none were taken)."""
    path = store.path / SNAPSHOT_DIR / INDEX_FILE
    if not path.exists():
        return []
    entries = read_json(path, "record the run again with SnapshotCallback").get("snapshots")
    if not isinstance(entries, list):
        raise broken_file(path, "no 'snapshots' list", "record the run again with SnapshotCallback")
    return sorted(entries, key=lambda e: e["step"])


def _unwrap_optimizer(optimizer):
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


class SnapshotCallback(TrainerCallback):
    """Store trainable weights, Adam moments and learning rate at every save (or at given steps).

    Args:
        steps: global steps to snapshot at (taken at `on_step_end`, so it works with
            `save_strategy="no"`). `None` (default) snapshots at every checkpoint save
            (`on_save`, which runs after checkpoint rotation, so `save_total_limit` does not matter).
        save_tokenizer: also `save_pretrained` the trainer's processing class into the store, so
            featurizing later needs nothing but the store.

    The learning-rate weight of a snapshot (`lr_mean`) is the mean learning rate the optimizer
    used over the steps since the previous snapshot (LESS weights checkpoints by it); `lr` is the
    learning rate at the moment of the snapshot. A run resumed from a checkpoint picks up the
    learning rates of the steps before it (kept in the store at every save), so `lr_mean` is the
    same as without the interruption. Only the main process writes. Parameters must be
    whole on the main process (DDP or a single process; FSDP/ZeRO-3 sharded parameters are not supported).
    """

    def __init__(self, steps: Sequence[int] | None = None, save_tokenizer: bool = True):
        if steps is not None:
            steps = sorted({int(s) for s in steps})
            if any(s <= 0 for s in steps):
                raise ValueError("SnapshotCallback: steps must be positive global steps.")
        self.steps = steps
        self.save_tokenizer = save_tokenizer
        self.store: RunStore | None = None
        self._saves: dict[str, dict[str, float]] = {}  # checkpoint step -> LR sum and count at that save
        self._lr_sum = 0.0
        self._lr_count = 0
        self._model_saved = False

    # -- events -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.store = RunStore.for_output_dir(args.output_dir)
        self._lr_sum, self._lr_count = 0.0, 0
        self._saves = {}  # a fresh run starts its own record
        step = state.global_step
        if step > 0:  # resumed from a checkpoint: the steps since the last snapshot still count
            self._saves = self._lr_progress()
            saved = self._saves.get(str(step))
            if saved is None:
                logger.warning(
                    f"SnapshotCallback: no learning-rate record for the checkpoint at step {step}; "
                    "the next snapshot's lr_mean counts only the steps from here."
                )
            else:
                self._lr_sum, self._lr_count = float(saved["lr_sum"]), int(saved["lr_count"])
        trainer = calling_trainer()  # Trainer.train runs this event; later passes tokenize the way it does
        if trainer is not None:
            record_processing(trainer)
        if self.steps is None and str(getattr(args, "save_strategy", "")).lower().endswith("no"):
            logger.warning(
                "SnapshotCallback takes snapshots at checkpoint saves, but save_strategy='no': no snapshot will be "
                "taken. Pass SnapshotCallback(steps=[...]) or enable saving."
            )

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None and optimizer.param_groups:
            self._lr_sum += float(optimizer.param_groups[0]["lr"])  # the rate the step just used
            self._lr_count += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.steps is not None and state.global_step in self.steps:
            self._snapshot(args, state, **kwargs)

    def on_save(self, args, state, control, **kwargs):
        if self.steps is None:
            self._snapshot(args, state, **kwargs)
        if is_main_process():  # what a run resumed from this checkpoint needs for its next lr_mean
            self._saves[str(state.global_step)] = {"lr_sum": self._lr_sum, "lr_count": self._lr_count}
            self._saves = {k: self._saves[k] for k in sorted(self._saves, key=int)[-KEPT_SAVES:]}
            write_json(self._store(args).path / SNAPSHOT_DIR / LR_PROGRESS_FILE, {"saves": self._saves})

    def _store(self, args) -> RunStore:
        if self.store is None:  # events driven by hand, without on_train_begin
            self.store = RunStore.for_output_dir(args.output_dir)
        return self.store

    def _lr_progress(self) -> dict[str, dict[str, float]]:
        path = self.store.path / SNAPSHOT_DIR / LR_PROGRESS_FILE
        if not path.exists():
            return {}
        fix = f"delete {path} (only a resumed run's lr_mean needs it)"
        saves = read_json(path, fix).get("saves")
        if not isinstance(saves, dict):
            raise broken_file(path, "no 'saves' mapping", fix)
        return dict(saves)

    # -- the snapshot --------------------------------------------------------------
    def _snapshot(self, args, state, model=None, optimizer=None, processing_class=None, **kwargs) -> None:
        self._store(args)
        lr_mean = self._lr_sum / self._lr_count if self._lr_count else None
        self._lr_sum, self._lr_count = 0.0, 0
        if not is_main_process():
            return
        if model is None or optimizer is None:
            raise RuntimeError("SnapshotCallback needs the model and optimizer in the callback kwargs.")
        if not self._model_saved:
            save_model_description(self.store, model, processing_class if self.save_tokenizer else None)
            self._model_saved = True
        entry, arrays = take_snapshot(model, optimizer, int(state.global_step))
        if lr_mean is None:
            lr_mean = entry["lr"]
        entry["lr_mean"] = lr_mean
        self.store.save_arrays(snapshot_name(state.global_step), arrays)
        index = [e for e in read_snapshot_index(self.store) if e["step"] != entry["step"]]
        index = sorted([*index, entry], key=lambda e: e["step"])
        write_json(self.store.path / SNAPSHOT_DIR / INDEX_FILE, {"snapshots": index})
        self.store.update_manifest(snapshots=[{"step": e["step"], "lr_mean": e["lr_mean"]} for e in index])


def take_snapshot(model: torch.nn.Module, optimizer, step: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(index entry, arrays) for the trainable parameters of `model` and their state in `optimizer`.

    Optimizer state is looked up by parameter object, and names come from `model.named_parameters()`,
    so the integer keys of a saved optimizer state never matter.
    """
    opt = _unwrap_optimizer(optimizer)
    group_of = {}
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            group_of[id(p)] = gi
    arrays: dict[str, np.ndarray] = {}
    names, shapes, opt_steps = [], [], set()
    has_moments = True
    groups_used = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in group_of:
            raise ValueError(f"SnapshotCallback: trainable parameter {name!r} is not in the optimizer.")
        if p.numel() == 0:
            raise ValueError(
                f"SnapshotCallback: parameter {name!r} is empty on this process (sharded by FSDP/ZeRO-3?); "
                "snapshots need whole parameters."
            )
        groups_used.add(group_of[id(p)])
        names.append(name)
        shapes.append(list(p.shape))
        arrays[f"param::{name}"] = _to_numpy(p)
        st = opt.state.get(p, {})
        if "exp_avg" in st and "exp_avg_sq" in st:
            arrays[f"exp_avg::{name}"] = _to_numpy(st["exp_avg"])
            arrays[f"exp_avg_sq::{name}"] = _to_numpy(st["exp_avg_sq"])
            opt_steps.add(int(st["step"].item() if torch.is_tensor(st.get("step")) else st.get("step", 0)))
        elif not st:  # not stepped yet: zero moments, Adam's initial state
            arrays[f"exp_avg::{name}"] = np.zeros(tuple(p.shape), np.float32)
            arrays[f"exp_avg_sq::{name}"] = np.zeros(tuple(p.shape), np.float32)
            opt_steps.add(0)
        else:
            has_moments = False
    if not names:
        raise ValueError("SnapshotCallback: the model has no trainable parameters.")
    group = opt.param_groups[min(groups_used)]
    hyper = {}
    for gi in groups_used:
        g = opt.param_groups[gi]
        for key in ("lr", "betas", "eps", "weight_decay"):
            if key in g and key in group and g[key] != group[key]:
                hyper[key] = "differs between parameter groups"
    if not has_moments:
        arrays = {k: v for k, v in arrays.items() if k.startswith("param::")}
    entry = {
        "step": int(step),
        "file": f"{snapshot_name(step)}.safetensors",
        "lr": float(group["lr"]),
        "betas": [float(b) for b in group.get("betas", (0.9, 0.999))],
        "eps": float(group.get("eps", 1e-8)),
        "weight_decay": float(group.get("weight_decay", 0.0)),
        "optimizer": type(opt).__name__,
        "optimizer_step": max(opt_steps) if opt_steps and has_moments else None,
        "has_moments": has_moments,
        "param_names": names,
        "param_shapes": shapes,
        "warnings": hyper,
    }
    return entry, arrays


def save_model_description(store: RunStore, model: torch.nn.Module, tokenizer=None) -> None:
    """Write what rebuilding `model` for featurizing needs: config, base name, PEFT config, tokenizer."""
    folder = store.path / SNAPSHOT_DIR
    is_peft = hasattr(model, "peft_config") and hasattr(model, "get_base_model")
    base = model.get_base_model() if is_peft else model
    base.config.save_pretrained(folder / "model")
    adapter_name = None
    if is_peft:
        adapter_name = getattr(model, "active_adapter", "default")
        if isinstance(adapter_name, list):
            adapter_name = adapter_name[0]
        model.peft_config[adapter_name].save_pretrained(str(folder / "adapter"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder / "tokenizer"))
    write_json(
        folder / MODEL_FILE,
        {
            "base_name_or_path": getattr(base.config, "_name_or_path", "") or "",
            "class": type(base).__name__,
            "architectures": getattr(base.config, "architectures", None),
            "dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
            "peft": is_peft,
            "adapter_name": adapter_name,
            "tokenizer": tokenizer is not None,
            "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
            "all_parameters": [n for n, _ in model.named_parameters()],
        },
    )


def snapshot_folder(store: RunStore) -> Path:
    return store.path / SNAPSHOT_DIR
