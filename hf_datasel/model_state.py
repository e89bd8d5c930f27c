"""Run passes of our own on a user's model and hand it back exactly as it came.

Featurizing, spectra, probes and sweeps need a plain forward: no activation checkpointing (a
recomputed forward would fire the capture hooks twice), no dropout, and no mixed-precision autocast
that `accelerate` wrapped around the forward of a trainer's model (TRL's bf16 default): these passes are
fp32, as when the model is loaded from the store. A model passed in by the
user (`model=`, `gradient_spectra(model)`, `trainer.model`) must come back with the same weights,
train/eval mode, checkpointing flags and `requires_grad` flags, whatever happens inside.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def checkpointing_off(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Turn activation checkpointing off on every module that has the flag; returns (module, previous flag).

    Only the flags change (not the checkpoint functions or input-grad hooks), so setting them back
    restores the model exactly.
    """
    flags = [(m, m.gradient_checkpointing) for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    for module, _ in flags:
        module.gradient_checkpointing = False
    return flags


def autocast_off(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """Put back the forward that `accelerate` wrapped in autocast (it keeps it as `_original_forward`) on every
    module that has one; returns (module, wrapped forward) to set back."""
    wrapped = [(m, vars(m)["forward"]) for m in model.modules() if {"forward", "_original_forward"} <= vars(m).keys()]
    for module, _ in wrapped:
        module.forward = module._original_forward
    return wrapped


@contextmanager
def plain_forward(model: nn.Module, keep_weights: Iterable[str] = ()) -> Iterator[nn.Module]:
    """Eval mode, no activation checkpointing and no autocast wrapper inside; everything restored on exit, errors
    included.

    `keep_weights` names parameters the caller will overwrite (e.g. with snapshot weights): their
    values are copied first and written back on exit, so the user's trained weights survive.
    """
    modes = [(m, m.training) for m in model.modules()]
    named = dict(model.named_parameters())
    requires = [(p, p.requires_grad) for p in named.values()]
    saved = {n: named[n].detach().clone() for n in keep_weights}
    checkpointing = checkpointing_off(model)
    autocast = autocast_off(model)
    try:
        model.eval()
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                named[name].copy_(value)
        for module, flag in checkpointing:
            module.gradient_checkpointing = flag
        for module, forward in autocast:
            module.forward = forward
        for module, flag in modes:
            module.training = flag
        for p, flag in requires:
            p.requires_grad_(flag)


def forward_takes(model: nn.Module, argument: str) -> bool:
    """Whether the model's forward (a PEFT wrapper's base model's) names `argument` in its signature."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(inner.forward).parameters
