"""Exact per-sample gradients of a causal LM's trainable parameters, for a whole padded batch at once.

One forward and one backward per batch, like a training step. Forward hooks on the modules
that own trainable parameters keep each call's input; `torch.autograd.grad` then returns the
gradient of the summed per-sample losses with respect to each call's *output* (never the
summed parameter gradients, which are not computed at all). Because sample b's loss depends
only on sample b's activations, those output gradients are per-sample, and:

* `nn.Linear` (base weights, LoRA A and B, the LM head): `dW_b = Σ_t δ_bt x_btᵀ`, `db_b = Σ_t δ_bt`
  — one batched matmul;
* any other module (RMSNorm, Embedding, ...): `torch.func.vmap` of the module's own VJP over
  the batch, which is exact for any module whose forward treats samples independently.

Each sample's loss is the mean cross-entropy over its label tokens (`!= -100`, after the usual
shift), the loss a batch of one would have. Position ids are taken from the attention mask,
so left and right padding give the same gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..record.per_sample_loss import IGNORE_INDEX


@dataclass
class _Owner:
    module: nn.Module
    local_to_name: dict[str, str]  # the module's own attribute name -> canonical parameter name


@dataclass
class _Call:
    owner: _Owner
    args: tuple
    kwargs: dict
    output: torch.Tensor


class PerSampleGradients:
    """Per-sample gradients of `param_names` (default: every trainable parameter) of a causal LM.

    Args:
        model: a causal LM (plain transformers model or a PEFT model) returning `logits`.
        param_names: canonical names from `model.named_parameters()`; tied parameters appear once.

    Calling the object on a padded batch (`input_ids`, `attention_mask`, `labels`) runs one
    forward and one backward and hands each parameter's (B, *shape) float32 gradient to
    `consume(name, grads)` as soon as it is complete (so only one block is alive at a time),
    or returns them all in a dict when `consume` is None.
    """

    def __init__(self, model: nn.Module, param_names: Sequence[str] | None = None):
        self.model = model
        named = dict(model.named_parameters())
        if param_names is None:
            param_names = [n for n, p in named.items() if p.requires_grad]
        missing = [n for n in param_names if n not in named]
        if missing:
            raise KeyError(f"the model has no parameter(s) {missing[:5]} (of {len(missing)} missing)")
        if not param_names:
            raise ValueError("no trainable parameters to take gradients of")
        self.param_names = list(param_names)
        self.params = {n: named[n] for n in self.param_names}
        by_id = {id(p): n for n, p in self.params.items()}
        self.owners: list[_Owner] = []
        for module in model.modules():
            owned = {
                local: by_id[id(p)] for local, p in module._parameters.items() if p is not None and id(p) in by_id
            }
            if owned:
                self.owners.append(_Owner(module, owned))
        self.shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        self._all_params = list(model.parameters())
        self._wanted = {id(p) for p in self.params.values()}

    @contextmanager
    def _only_these_trainable(self):
        """Only the chosen parameters require grad while featurizing (so autograd builds no other paths)."""
        flips = [p for p in self._all_params if p.requires_grad != (id(p) in self._wanted)]
        try:
            for p in flips:
                p.requires_grad_(not p.requires_grad)
            yield
        finally:
            for p in flips:
                p.requires_grad_(not p.requires_grad)

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        consume: Callable[[str, torch.Tensor], None] | None = None,
    ) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor, torch.Tensor]:
        """Returns (grads or None, per-sample loss (B,), valid (B,) bool).

        A row without label tokens, or with a non-finite loss, is not valid: it takes no part
        in the backward pass and its gradient is all zeros; callers must not use it.
        """
        calls: list[_Call] = []

        def capture(owner: _Owner):
            def hook(module, args, kwargs, output):
                if not torch.is_tensor(output):
                    raise TypeError(f"per-sample gradients: {type(module).__name__} returned {type(output)}")
                calls.append(_Call(owner, args, kwargs, output))

            return hook

        hooks = [o.module.register_forward_hook(capture(o), with_kwargs=True) for o in self.owners]
        try:
            with self._only_these_trainable(), torch.enable_grad():
                position_ids = _positions(attention_mask)
                out = self.model(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
                )
                loss, valid = _per_sample_loss(out.logits, labels)
                total = loss.masked_fill(~valid, 0.0).sum()
                outputs = [c.output for c in calls]
                if valid.any():
                    deltas = torch.autograd.grad(total, outputs, allow_unused=True)
                else:
                    deltas = (None,) * len(outputs)
        finally:
            for h in hooks:
                h.remove()
        batch = input_ids.shape[0]
        remaining = {n: 0 for n in self.param_names}
        for c in calls:
            for name in c.owner.local_to_name.values():
                remaining[name] += 1
        result: dict[str, torch.Tensor] | None = {} if consume is None else None
        emit = consume if consume is not None else result.__setitem__
        for name, count in remaining.items():  # parameters never used in the forward: zero gradient
            if count == 0:
                emit(name, torch.zeros(batch, *self.shapes[name], device=input_ids.device))
        acc: dict[str, torch.Tensor] = {}
        for i, (call, delta) in enumerate(zip(calls, deltas)):
            calls[i] = None  # free activations as we go
            grads = _module_grads(call, delta, batch)
            for local, name in call.owner.local_to_name.items():
                g = grads[local]
                acc[name] = g if name not in acc else acc[name] + g
                remaining[name] -= 1
                if remaining[name] == 0:
                    emit(name, acc.pop(name))
        return result, loss.detach(), valid


def _positions(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Position ids counted over real tokens; None (the model's own 0..T-1) when every row is right-padded."""
    mask = attention_mask.long()
    if bool(mask[:, 0].all()) and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return None
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    token_loss = F.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, T-1), zero where ignored
    count = (shift_labels != IGNORE_INDEX).sum(-1)
    loss = token_loss.sum(-1) / count.clamp_min(1)
    valid = (count > 0) & torch.isfinite(loss).detach()
    return torch.where(count > 0, loss, torch.full_like(loss, float("nan"))), valid


def _module_grads(call: _Call, delta: torch.Tensor | None, batch: int) -> dict[str, torch.Tensor]:
    module = call.owner.module
    params = {local: getattr(module, local) for local in call.owner.local_to_name}
    if delta is None:
        return {local: torch.zeros(batch, *p.shape, device=p.device) for local, p in params.items()}
    if type(module) is nn.Linear:
        x = call.args[0] if call.args else call.kwargs["input"]
        x = x.detach().reshape(batch, -1, x.shape[-1]).float()
        d = delta.reshape(batch, -1, delta.shape[-1]).float()
        out = {"weight": torch.bmm(d.transpose(1, 2), x)}
        if "bias" in params:
            out["bias"] = d.sum(1)
        return {local: out[local] for local in params}
    return _vmap_grads(module, params, call, delta, batch)


def _vmap_grads(module, params, call: _Call, delta, batch) -> dict[str, torch.Tensor]:
    """Per-sample VJP of one module call, vmapped over the batch (any module that treats rows independently).

    Tensor arguments (positional or keyword) whose first dimension is the batch are split per
    sample; everything else is passed to every sample unchanged.
    """

    def is_batched(a) -> bool:
        return torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == batch

    args = [a.detach() if torch.is_tensor(a) else a for a in call.args]
    kwargs = {k: v.detach() if torch.is_tensor(v) else v for k, v in call.kwargs.items()}
    arg_slots = [i for i, a in enumerate(args) if is_batched(a)]
    kwarg_slots = [k for k, v in kwargs.items() if is_batched(v)]
    bare = _Bare(module)  # the module's forward without its hooks (e.g. transformers' input-grad hook)
    detached = {f"inner.{k}": p.detach() for k, p in params.items()}

    def one(sample_args, sample_kwargs, g):
        full_args = list(args)
        for i, a in zip(arg_slots, sample_args):
            full_args[i] = a.unsqueeze(0)
        full_kwargs = {**kwargs, **{k: v.unsqueeze(0) for k, v in sample_kwargs.items()}}

        def f(p):
            return torch.func.functional_call(bare, p, tuple(full_args), full_kwargs)

        _, vjp = torch.func.vjp(f, detached)
        return vjp(g.unsqueeze(0))[0]

    sample_args = tuple(args[i] for i in arg_slots)
    sample_kwargs = {k: kwargs[k] for k in kwarg_slots}
    grads = torch.func.vmap(one)(sample_args, sample_kwargs, delta.detach())
    return {k.removeprefix("inner."): v.float() for k, v in grads.items()}


class _Bare(nn.Module):
    """Calls `inner.forward` directly, so forward hooks registered on `inner` do not run."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner.forward(*args, **kwargs)
