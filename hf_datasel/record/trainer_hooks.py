"""How the recording callbacks reach into a Trainer run without a second forward pass.

Callbacks are handed the model, optimizer and dataloaders, but not the trainer. Recording
needs three things from it, all set up once at `on_init_end`, before any dataloader exists:
the row-id column kept through `remove_unused_columns`, a collator that carries it into the
batch, and the model's forward hooks that take it back out before the model sees it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer

from ..rows import ROW_COLUMNS, ROW_ID

ROW_LABELS = "datasel_labels"  # the batch's labels again: the trainer pops "labels" under label smoothing


def calling_trainer() -> Trainer | None:
    """The Trainer whose `__init__` is running the current callback event, if any.

    Trainer events do not pass the trainer itself; `on_init_end` is called from
    `Trainer.__init__`, so the trainer is the `self` of a frame up the stack.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame


class RowIdCollator:
    """Wrap a data collator so the batch carries each example's raw row id."""

    def __init__(self, inner: Callable[[list[dict]], dict]):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples or ROW_ID not in examples[0]:
            return self.inner(examples)
        row_ids = torch.tensor([int(ex[ROW_ID]) for ex in examples], dtype=torch.long)
        batch = self.inner([{k: v for k, v in ex.items() if k not in ROW_COLUMNS} for ex in examples])
        batch[ROW_ID] = row_ids
        if "labels" in batch:
            # Trainer pops "labels" before the forward when label smoothing or compute_loss_func is on;
            # the recorder still needs them for the plain per-sample cross-entropy (same tensor, no copy).
            batch[ROW_LABELS] = batch["labels"]
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def refuse_packing(args, who: str) -> None:
    if getattr(args, "packing", False) or getattr(args, "padding_free", False):
        raise ValueError(
            f"{who}: packing / padding-free batches merge several rows into one sequence, so a per-row loss "
            "cannot be read from them exactly. Set packing=False and padding_free=False for the recording run "
            "(the large-model run on the selected subset may pack)."
        )


def keep_row_ids(trainer: Trainer, who: str) -> None:
    """Make `trainer` keep the row-id column and put it in every batch (idempotent)."""
    refuse_packing(trainer.args, who)
    train_dataset = trainer.train_dataset
    columns = getattr(train_dataset, "column_names", None)
    if columns is None or ROW_ID not in columns:
        raise ValueError(
            f"{who}: the training dataset has no '{ROW_ID}' column, so recorded numbers could not be tied to "
            "your raw rows. Pass `hf_datasel.with_row_ids(raw_dataset)` as the train_dataset."
        )
    if trainer.args.remove_unused_columns:
        trainer._set_signature_columns_if_needed()
        if ROW_ID not in trainer._signature_columns:
            trainer._signature_columns = [*trainer._signature_columns, ROW_ID]
    if not isinstance(trainer.data_collator, RowIdCollator):
        trainer.data_collator = RowIdCollator(trainer.data_collator)


def record_processing(trainer: Trainer) -> None:
    """Write how `trainer` turns raw rows into inputs, and the rows it made, into its run store (main process)."""
    from ..data import RowProcessing, save_processing, save_trainer_rows
    from ..store import RunStore

    if is_main_process():
        path = RunStore.for_output_dir(trainer.args.output_dir).path
        processing = RowProcessing.from_trainer(trainer)
        save_processing(path, processing)
        save_trainer_rows(path, trainer.train_dataset, processing)  # the rows it trains on, for later passes


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every process's `obj` on the main process (None elsewhere); all processes must call it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def wait_for_everyone() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
