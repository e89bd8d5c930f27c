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
            total = -(log_probs.float() * label_mask).sum(dim=-1)
            count = label_mask.sum(dim=-1)
        else:
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
            if shift_labels is None:
                if labels is None:
                    raise ValueError("per_sample_loss needs `labels` (or `shift_labels`) next to plain logits.")
                logits, shift_labels = logits[:, :-1], labels[:, 1:]
            shift_labels = shift_labels.to(logits.device)
            token_loss = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)),
                shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            ).view(shift_labels.shape)
            mask = shift_labels != IGNORE_INDEX
            total = (token_loss * mask).sum(dim=-1)
            count = mask.sum(dim=-1)
        loss = total / count.clamp(min=1)
        return torch.where(count > 0, loss, torch.full_like(loss, float("nan")))
