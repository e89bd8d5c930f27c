"""`LossRecorderCallback`: per-sample losses from the trainer's own forward pass, and S2L's sweeps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from ..rows import ROW_COUNT, ROW_HASH, ROW_ID
from ..store import RunStore
from .per_sample_loss import forward_at_labels, per_sample_loss, row_losses
from .trainer_hooks import (
    ROW_LABELS,
    calling_trainer,
    gather_to_main,
    is_main_process,
    keep_row_ids,
    record_processing,
    wait_for_everyone,
)

_EMPTY = {
    "row_id": np.zeros(0, np.int64),
    "step": np.zeros(0, np.int64),
    "epoch": np.zeros(0, np.int64),
    "loss": np.zeros(0, np.float32),
}


class LossRecorderCallback(TrainerCallback):
    """Record every training row's loss at the step it is trained on, into `<output_dir>/datasel/`.

    Losses come from the forward the trainer already runs (plain logits, or TRL's fused LM
    head), so recording costs no extra forward. The training dataset must come from
    `hf_datasel.with_row_ids`, which is how each loss lands on the right raw row through
    shuffling, length grouping, SFTTrainer's filtering and multi-process sharding.

    Args:
        sweep_steps: extra pass that computes the loss of *every* training row (eval mode,
            `no_grad`, batched) at these global steps, or at every save with `"saves"`.
            This is S2L's loss trajectory; `None` turns it off.
        sweep_batch_size: batch size of the sweep (default: `per_device_eval_batch_size`).
        trainer: the trainer, when the callback is added after `Trainer.__init__`
            (`trainer.add_callback(LossRecorderCallback(trainer=trainer))`).
    """

    def __init__(
        self,
        sweep_steps: Sequence[int] | Literal["saves"] | None = None,
        sweep_batch_size: int | None = None,
        trainer: Trainer | None = None,
    ):
        if sweep_steps is not None and sweep_steps != "saves":
            sweep_steps = sorted({int(s) for s in sweep_steps})
            if any(s <= 0 for s in sweep_steps):
                raise ValueError("sweep_steps must be positive global steps (checkpoint steps).")
        self.sweep_steps = sweep_steps
        self.sweep_batch_size = sweep_batch_size
        self.trainer: Trainer | None = None
        self.store: RunStore | None = None
        self._state = None
        self._pending_rows: torch.Tensor | None = None
        self._pending_labels: torch.Tensor | None = None
        self._rows, self._steps, self._epochs, self._losses = [], [], [], []
        self._previous = dict(_EMPTY)
        self._sweeps: dict[int, dict[str, np.ndarray]] = {}
        self._hooks = []
        if trainer is not None:
            self.attach(trainer)

    # -- wiring -------------------------------------------------------------------
    def attach(self, trainer: Trainer) -> None:
        """Hook into `trainer` (called for you from `on_init_end`)."""
        if self.trainer is trainer:
            return
        keep_row_ids(trainer, type(self).__name__)
        self.trainer = trainer
        self.store = RunStore.for_output_dir(trainer.args.output_dir)
        model = trainer.model
        self._hooks = [
            model.register_forward_pre_hook(self._take_row_ids, with_kwargs=True),
            model.register_forward_hook(self._record, with_kwargs=True),
        ]

    def on_init_end(self, args, state, control, **kwargs):
        if self.trainer is None:
            trainer = calling_trainer()
            if trainer is None:
                raise RuntimeError(
                    "LossRecorderCallback could not find its Trainer; pass it explicitly: "
                    "trainer.add_callback(LossRecorderCallback(trainer=trainer))."
                )
            self.attach(trainer)

    def _take_row_ids(self, module, args, kwargs):
        row_ids = kwargs.pop(ROW_ID, None)
        labels = kwargs.pop(ROW_LABELS, None)
        if row_ids is not None:
            self._pending_rows, self._pending_labels = row_ids, labels
        return args, kwargs

    def _record(self, module, args, kwargs, outputs):
        if not module.training or self._pending_rows is None:
            return
        row_ids, self._pending_rows = self._pending_rows, None
        labels = kwargs.get("labels")
        if labels is None and kwargs.get("shift_labels") is None:
            labels = self._pending_labels  # popped by the trainer (label smoothing, compute_loss_func)
        self._pending_labels = None
        # the plain mean cross-entropy over label tokens, whatever loss the trainer optimizes
        loss = per_sample_loss(outputs, labels=labels, shift_labels=kwargs.get("shift_labels"))
        # kept on the device until a flush: no host sync on the training step
        self._rows.append(row_ids.detach())
        self._steps.append(torch.full_like(self._rows[-1], self._state.global_step))
        # the epoch tells accelerate's padding (a row seen twice in one epoch) from a real second pass
        self._epochs.append(torch.full_like(self._rows[-1], math.floor(self._state.epoch or 0)))
        self._losses.append(loss.detach())

    # -- events -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError(
                "LossRecorderCallback was added after Trainer.__init__ without its trainer; use "
                "trainer.add_callback(LossRecorderCallback(trainer=trainer)) or pass it in `callbacks=`."
            )
        self._state = state
        resuming = state.global_step > 0 and self.store.has(RunStore.LOSSES)
        if resuming:
            previous = self.store.load_arrays(RunStore.LOSSES)
            keep = previous["step"] < state.global_step  # the steps after the checkpoint are trained again
            self._previous = {k: v[keep] for k, v in previous.items()}
            if self.store.has(RunStore.SWEEP):
                sweep = self.store.load_arrays(RunStore.SWEEP)
                for i, step in enumerate(sweep["steps"].tolist()):
                    if step <= state.global_step:
                        self._sweeps[step] = {"row_id": sweep["row_id"], "loss": sweep["loss"][i]}
        record_processing(self.trainer)
        if is_main_process():
            dataset = self.trainer.train_dataset
            self.store.save_arrays(
                RunStore.ROWS,
                {"row_id": np.asarray(dataset[ROW_ID], np.int64), "row_hash": np.asarray(dataset[ROW_HASH], np.int64)},
            )
            self.store.write_manifest(self._manifest(args, state))
        wait_for_everyone()

    def on_step_end(self, args, state, control, **kwargs):
        if isinstance(self.sweep_steps, list) and state.global_step in self.sweep_steps:
            self._sweep(state.global_step)  # a listed step sweeps whether or not it saves a checkpoint

    def on_save(self, args, state, control, **kwargs):
        if self.sweep_steps == "saves" and state.global_step not in self._sweeps:
            self._sweep(state.global_step)
        self._flush(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._flush(args, state)

    def detach(self) -> None:
        """Remove the forward hooks from the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- sweep ------------------------------------------------------------------
    @torch.no_grad()
    def _sweep(self, step: int) -> None:
        trainer, model = self.trainer, self.trainer.model
        loader = trainer.get_eval_dataloader(trainer.train_dataset)
        if self.sweep_batch_size is not None:
            loader = trainer.accelerator.prepare(
                torch.utils.data.DataLoader(
                    loader.dataset, batch_size=self.sweep_batch_size, collate_fn=trainer.data_collator
                )
            )
        was_training = model.training
        model.eval()
        rows, losses = [], []
        try:
            for batch in tqdm(
                loader, desc=f"loss sweep @ step {step}", disable=not is_main_process() or trainer.args.disable_tqdm
            ):
                row_ids = batch.pop(ROW_ID)
                batch.pop(ROW_LABELS, None)
                batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                labels = batch.pop("labels", None)
                outputs, kept = forward_at_labels(model, batch, labels)  # the LM head where a label is predicted
                rows.append(row_ids.cpu())
                losses.append(row_losses(outputs.logits, labels, kept)[0].cpu())
        finally:
            model.train(was_training)
        local = {"row_id": torch.cat(rows).numpy(), "loss": torch.cat(losses).numpy()}
        gathered = gather_to_main(local)
        if gathered is not None:
            self._sweeps[step] = _dedup_rows(gathered)

    # -- writing ------------------------------------------------------------------
    def _local_records(self) -> dict[str, np.ndarray]:
        if not self._rows:
            return {k: v.copy() for k, v in _EMPTY.items()}
        return {
            "row_id": torch.cat(self._rows).cpu().numpy().astype(np.int64),
            "step": torch.cat(self._steps).cpu().numpy().astype(np.int64),
            "epoch": torch.cat(self._epochs).cpu().numpy().astype(np.int64),
            "loss": torch.cat(self._losses).cpu().numpy().astype(np.float32),
        }

    def _flush(self, args, state) -> None:
        gathered = gather_to_main(self._local_records())
        # what was gathered is kept on the main process: each flush sends only the records since the last one
        self._rows, self._steps, self._epochs, self._losses = [], [], [], []
        if gathered is None:
            return
        records = self._previous = _dedup_records([self._previous, *gathered])
        self.store.save_arrays(RunStore.LOSSES, records)
        if self._sweeps:
            steps = sorted(self._sweeps)
            row_id = np.unique(np.concatenate([self._sweeps[s]["row_id"] for s in steps]))
            loss = np.full((len(steps), len(row_id)), np.nan, np.float32)
            for i, s in enumerate(steps):
                loss[i, np.searchsorted(row_id, self._sweeps[s]["row_id"])] = self._sweeps[s]["loss"]
            self.store.save_arrays(
                RunStore.SWEEP, {"steps": np.asarray(steps, np.int64), "row_id": row_id, "loss": loss}
            )
        nonfinite = int((~np.isfinite(records["loss"])).sum())
        self.store.update_manifest(
            recorded={
                "loss_records": int(len(records["loss"])),
                "nonfinite_losses": nonfinite,
                "last_step": int(state.global_step),
                "sweep_steps": sorted(self._sweeps),
            }
        )

    def _manifest(self, args, state) -> dict:
        model = self.trainer.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        dataset = self.trainer.train_dataset
        return {
            "model": {
                "name_or_path": getattr(base.config, "_name_or_path", None) or type(base).__name__,
                "class": type(base).__name__,
                "num_parameters": int(sum(p.numel() for p in model.parameters())),
                "trainable_parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
                "peft": hasattr(model, "peft_config"),
            },
            "dataset": {
                "rows_trained": len(dataset),
                "max_row_id": int(max(dataset[ROW_ID])),
                # the raw dataset's size: rows after the last trained one may have been dropped, not appended
                **({"num_rows": int(dataset[0][ROW_COUNT])} if ROW_COUNT in dataset.column_names else {}),
            },
            "training": {
                "trainer": type(self.trainer).__name__,
                "seed": args.seed,
                "per_device_train_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "world_size": args.world_size,
                "resumed_from_step": int(state.global_step),
            },
            "recorded": {"loss_records": 0, "sweep_steps": []},
        }


def _dedup_records(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One record per (row, epoch), the first, ordered by (step, row).

    Under several processes accelerate pads an epoch's last batch with rows from its start, so a
    row can come back within the same epoch (or twice in one step); a one-process run with the
    same global batch trains on it once, and so does the record.
    """
    merged = {k: np.concatenate([p[k] for p in parts]) for k in _EMPTY}
    order = np.lexsort((merged["step"], merged["epoch"], merged["row_id"]))
    merged = {k: v[order] for k, v in merged.items()}
    if len(order):
        keep = np.ones(len(order), bool)
        keep[1:] = (np.diff(merged["row_id"]) != 0) | (np.diff(merged["epoch"]) != 0)
        merged = {k: v[keep] for k, v in merged.items()}
    order = np.lexsort((merged["row_id"], merged["step"]))
    return {k: v[order] for k, v in merged.items()}


def _dedup_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    row_id = np.concatenate([p["row_id"] for p in parts])
    loss = np.concatenate([p["loss"] for p in parts])
    row_id, first = np.unique(row_id, return_index=True)
    return {"row_id": row_id, "loss": loss[first]}
