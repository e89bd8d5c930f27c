"""Read snapshots back, and rebuild the recorded model from the store through `from_pretrained`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..record.snapshot import MODEL_FILE, SNAPSHOT_DIR, read_snapshot_index, snapshot_name
from ..store import RunStore, StoreError, broken_file, read_json


@dataclass
class Snapshot:
    """One snapshot: trainable weights and Adam moments (float32 CPU tensors, by parameter name)."""

    step: int
    lr: float
    lr_mean: float
    betas: tuple[float, float]
    eps: float
    optimizer_step: int | None
    params: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor] | None
    exp_avg_sq: dict[str, torch.Tensor] | None
    entry: dict[str, Any]

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in self.params.items()}


def snapshot_steps(store: RunStore) -> list[int]:
    """Steps at which the run took snapshots, ascending."""
    return [e["step"] for e in read_snapshot_index(store)]


def _entry(store: RunStore, step: int) -> dict[str, Any]:
    entries = {e["step"]: e for e in read_snapshot_index(store)}
    if step not in entries:
        raise StoreError(
            f"The store at {store.path} has no snapshot at step {step} (snapshots: {sorted(entries) or 'none'}). "
            "Record the run with SnapshotCallback."
        )
    return entries[step]


def snapshot_param_shapes(store: RunStore, step: int) -> dict[str, tuple[int, ...]]:
    """The trainable parameters' shapes at `step`, as `load_snapshot(...).param_shapes` gives them, from the
    snapshot file's header alone: what naming its features takes, without reading weights and moments."""
    entry = _entry(store, step)
    shapes = store.array_shapes(snapshot_name(step))
    missing = [n for n in entry["param_names"] if f"param::{n}" not in shapes]
    if missing:
        path = store.array_path(snapshot_name(step))
        raise broken_file(path, f"no arrays for {missing[:3]}", "record the run again with SnapshotCallback")
    return {n: shapes[f"param::{n}"] for n in entry["param_names"]}


def load_snapshot(store: RunStore, step: int) -> Snapshot:
    """The snapshot at `step`; a clear `StoreError` when there is none."""
    entry = _entry(store, step)
    arrays = store.load_arrays(snapshot_name(step), as_torch=True)  # owned tensors: no second copy
    names = entry["param_names"]
    params = {n: arrays[f"param::{n}"] for n in names}
    moments = entry.get("has_moments", False)
    return Snapshot(
        step=int(step),
        lr=float(entry["lr"]),
        lr_mean=float(entry.get("lr_mean", entry["lr"])),
        betas=tuple(entry["betas"]),
        eps=float(entry["eps"]),
        optimizer_step=entry.get("optimizer_step"),
        params=params,
        exp_avg={n: arrays[f"exp_avg::{n}"] for n in names} if moments else None,
        exp_avg_sq={n: arrays[f"exp_avg_sq::{n}"] for n in names} if moments else None,
        entry=entry,
    )


def _model_description(store: RunStore) -> dict[str, Any]:
    path = store.path / SNAPSHOT_DIR / MODEL_FILE
    if not path.exists():
        raise StoreError(f"The store at {store.path} has no snapshots; record the run with SnapshotCallback.")
    return read_json(path, "record the run again with SnapshotCallback")


def load_tokenizer(store: RunStore, tokenizer=None):
    """The run's tokenizer, from the store (`AutoTokenizer.from_pretrained`) unless `tokenizer` is given."""
    if tokenizer is not None:
        return tokenizer
    folder = store.path / SNAPSHOT_DIR / "tokenizer"
    if not folder.exists():
        raise StoreError(
            f"The store at {store.path} has no saved tokenizer (the trainer had no processing_class); pass tokenizer=."
        )
    return AutoTokenizer.from_pretrained(str(folder))


def load_model(store: RunStore, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """The recorded model, ready to take snapshot weights (`Featurizer.load_snapshot` does that).

    Without `model`: the base comes from `from_pretrained(base_name_or_path)` when that loads (a
    local folder or a Hub id), else — when every parameter was trainable and so is in the
    snapshots — from the stored config with fresh weights; a PEFT adapter is rebuilt from its
    stored config (`PeftConfig.from_pretrained`). Nothing silently falls back to another model:
    when the base cannot be loaded and frozen weights are needed, this raises.
    """
    desc = _model_description(store)
    if model is not None:
        names = {n for n, _ in model.named_parameters()}
        missing = [n for n in desc["trainable"] if n not in names]
        if missing:
            raise StoreError(
                f"The model passed has no parameter(s) {missing[:3]} that the snapshots hold; pass the recorded "
                "model (for an adapter run, the PEFT model with the same adapter)."
            )
        return model
    folder = store.path / SNAPSHOT_DIR
    config = AutoConfig.from_pretrained(str(folder / "model"))
    base_path = desc.get("base_name_or_path") or ""
    all_trainable = (not desc["peft"]) and set(desc["trainable"]) >= set(desc["all_parameters"])
    base = None
    if base_path:
        try:
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        except (OSError, ValueError) as err:
            if not all_trainable:
                raise StoreError(
                    f"Could not load the recorded base model {base_path!r} ({err}); pass model= explicitly."
                ) from err
            warnings.warn(f"base model {base_path!r} did not load; rebuilding it from the stored config", stacklevel=2)
    if base is None:
        if not all_trainable:
            raise StoreError(
                "The recorded model's frozen weights are not in the store and its base has no loadable "
                "name_or_path; pass model= explicitly."
            )
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if desc["peft"]:
        from peft import PeftConfig, get_peft_model

        peft_config = PeftConfig.from_pretrained(str(folder / "adapter"))
        base = get_peft_model(base, peft_config, adapter_name=desc.get("adapter_name") or "default")
    return base


def assign_snapshot(model: torch.nn.Module, snapshot: Snapshot) -> None:
    """Copy a snapshot's weights into `model` (by name), in place."""
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in snapshot.params.items():
            if name not in named:
                raise StoreError(
                    f"the model has no parameter {name!r} that the snapshot at step {snapshot.step} holds"
                )
            if tuple(named[name].shape) != tuple(value.shape):
                raise StoreError(
                    f"parameter {name!r}: model shape {tuple(named[name].shape)} != snapshot {value.shape}"
                )
            named[name].copy_(value.to(named[name].device, named[name].dtype))


def store_folder(store: RunStore) -> Path:
    return store.path / SNAPSHOT_DIR
