"""Per-sample loss of a causal LM from the outputs the trainer's own forward already made."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def per_sample_loss(
    outputs, labels: torch.Tensor | None = None, shift_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy over each row's label tokens (`!= -100`), after the usual one-token shift.

    Reads TRL's fused-LM-head outputs (`log_probs`, zero where ignored, plus `label_mask`)
    or plain `logits`. Returns float32 of shape (batch,); a row without label tokens is NaN,
    never a made-up number.
    """
    with torch.no_grad():
        log_probs = getattr(outputs, "log_probs", None)
        label_mask = getattr(outputs, "label_mask", None)
        if log_probs is not None and label_mask is not None:
            count = label_mask.sum(dim=-1)
            loss = -(log_probs.float() * label_mask).sum(dim=-1) / count.clamp(min=1)
            return torch.where(count > 0, loss, torch.full_like(loss, float("nan")))
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        return row_losses(logits, labels, shift_labels=shift_labels)[0]


def label_positions(labels: torch.Tensor, most: float = 0.75) -> torch.Tensor | None:
    """(B, K) positions whose logits predict a label token, each row's in order (K: the most any row has; a row
    with fewer repeats positions that predict none), or None when they are more than `most` of the positions.

    Logits elsewhere take no part in the loss, so computing the LM head only here changes nothing but its cost
    (prompt tokens of completion-only rows, padding); `logits_to_keep` as a (B, K) tensor asks transformers for it.
    """
    predicts = labels[:, 1:] != IGNORE_INDEX  # position p predicts token p + 1
    most_kept = int(predicts.sum(1).max()) if predicts.numel() else 0
    if most_kept == 0 or most_kept > most * labels.shape[1]:
        return None
    order = torch.sort((~predicts).to(torch.uint8), dim=1, stable=True).indices  # predicting positions first
    return order[:, :most_kept]


def row_losses(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    kept: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over each row's label tokens, NaN for a row without any; each row's label-token count)
    from plain logits: of every position, or of the positions `kept` (`label_positions`), or already aligned with
    `shift_labels` (the labels shifted by one, as transformers' loss takes them)."""
    if labels is None and shift_labels is None:
        raise ValueError(
            "a per-sample loss needs `labels` (or `shift_labels`) next to plain logits: the batch has none "
            "(use a collator that makes them, e.g. the trainer's DataCollatorForLanguageModeling)"
        )
    if shift_labels is None:
        shift_labels = labels[:, 1:].to(logits.device)
        if kept is None:
            logits = logits[:, :-1]
        else:
            if logits.shape[:2] == labels.shape:  # a forward that took `logits_to_keep` but gave every position
                logits = torch.take_along_dim(logits, kept[..., None], dim=1)
            elif logits.shape[:2] != kept.shape:
                raise ValueError(
                    f"the model gave logits of shape {tuple(logits.shape)} for logits_to_keep positions of shape "
                    f"{tuple(kept.shape)}: its forward does not take per-row positions (PerSampleGradients: "
                    "lm_head_at_labels=False)"
                )
            shift_labels = torch.take_along_dim(shift_labels, kept, dim=1)
    shift_labels = shift_labels.to(logits.device)
    token_loss = F.cross_entropy(
        logits.float().transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # zero where ignored
    count = (shift_labels != IGNORE_INDEX).sum(-1)
    loss = token_loss.sum(-1) / count.clamp(min=1)
    return torch.where(count > 0, loss, torch.full_like(loss, float("nan"))), count


def keeps_label_logits(model: torch.nn.Module) -> bool:
    """Whether `model`'s forward takes per-row positions in `logits_to_keep`: it names the argument, and this
    transformers slices with `slice_logits_to_keep` (older 5.x releases index with a 2-D tensor, which would give
    every row every row's positions)."""
    import transformers.modeling_utils

    from ..model_state import forward_takes

    return hasattr(transformers.modeling_utils, "slice_logits_to_keep") and forward_takes(model, "logits_to_keep")


def forward_at_labels(model: torch.nn.Module, batch: dict, labels: torch.Tensor | None, **kwargs) -> tuple:
    """`model(**batch)` with the LM head only where `labels` predict a token, when its forward takes
    `logits_to_keep` (transformers' causal LMs); returns (outputs, kept positions or None for every position).

    `batch` must not hold `labels` then (the model's own loss would not line up with the kept logits).
    """
    kept = label_positions(labels) if labels is not None and keeps_label_logits(model) else None
    if kept is None:
        return model(**batch, **kwargs), None
    return model(**batch, logits_to_keep=kept, **kwargs), kept
