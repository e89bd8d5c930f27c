"""Exact per-sample gradients of a causal LM's trainable parameters, for a whole padded batch at once.

One forward and one backward per batch, like a training step. Forward hooks on the modules
that own trainable parameters keep each call's inputs and output; `torch.autograd.grad` then
returns the gradient of the summed per-sample losses with respect to each call's *output*
(never the summed parameter gradients, which are not computed at all). Because sample b's loss
depends only on sample b's activations, those output gradients δ are per-sample, and:

* a *linear* module — `nn.Linear` (base weights, LoRA A and B, the LM head), `Conv1D` (GPT-2,
  weight stored (in, out)), or any `nn.Linear`/`Conv1D` subclass whose forward is still
  `x Wᵀ + b` / `x W + b` (checked once, on a random probe, when the engine is built):
  `dW_b = Σ_t δ_bt x_btᵀ` (transposed for the (in, out) layout), `db_b = Σ_t δ_bt` — one
  batched matmul;
* an `nn.Embedding` (plain forward): row `i` of `dW_b` is the sum of δ_bt over the tokens t with id i —
  one scatter; it can also be handed out as its few non-zero rows (`consume_rows`), so a vocabulary-sized
  gradient is never formed;
* any other module (RMSNorm, LayerNorm, ...): `torch.func.vmap` of the module's own VJP over
  the batch, exact for any module whose forward treats samples independently. A module whose 1-D
  parameters act per channel and affinely (`y = w ⊙ x̂ + b`, `(1 + w) ⊙ x̂`: every norm) takes a
  shortcut instead, `dw_b = Σ_t δ_bt ⊙ (y(w=1) − y(w=0))_bt` from two batched forwards, once its
  first call has given the vmap result. Faster forms, each kept likewise (`CHANNEL_FORMS`): a module
  whose one parameter scales its output (`w ⊙ x̂`: RMSNorm; `(1 + w) ⊙ x̂`: Gemma) needs no forward
  at all, `dw_b = (Σ_t δ_bt ⊙ y_bt) / w` (or `/ (1 + w)`) from the output it returned; a LayerNorm
  (`w ⊙ x̂ + b`) one, of `x̂ = y(w=1, b=0)`.

Nothing depends on module shapes by special case. A tensor is split into rows by its leading
dimension, which must be the batch size B or, for modules that see inputs flattened over batch
and tokens (OPT's MLP), B·T; anything else is an error. Every way a per-sample gradient could
silently come out wrong raises `PerSampleGradientError` instead:

* a module output that reaches the loss with a leading dimension that is neither B nor B·T (e.g.
  position embeddings built once for the whole batch: their gradient would be a batch sum);
* a vmap call with no per-row argument, or whose one-row-at-a-time outputs differ from the
  batched output (the module mixes rows across the batch);
* a trainable parameter used outside the forward of a module that owns it (e.g. read as
  `module.weight` by its parent): that use is invisible to the hooks.

The last two are properties of the model's structure, checked on an engine's first batch (each
vmap module on its first call of two rows or more: one row cannot show mixing; a shortcut is
likewise decided on such a call, with a gradient that is not all zero); the leading-dimension
checks run on every batch.

Each sample's loss is the mean cross-entropy over its label tokens (`!= -100`, after the usual
shift), the loss a batch of one would have. Position ids counted over each row's real tokens are
always passed (when the model's forward takes `position_ids`), so left and right padding give the
gradients of the row alone; a model that does not take them and builds positions shared by the
whole batch is caught by the leading-dimension check above.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from transformers.pytorch_utils import Conv1D

from ..model_state import forward_takes
from ..record.per_sample_loss import keeps_label_logits, label_positions, row_losses
from .projector import _deterministic

# Weight layouts of linear modules: y = x Wᵀ + b (nn.Linear) and y = x W + b (Conv1D).
OUT_IN, IN_OUT = "out_in", "in_out"


class Scratch:
    """One float32 buffer, grown as needed, that same-sized per-batch blocks are formed in again and again.

    Freshly allocated blocks of a few MiB fragment the CPU heap: the process's resident size grows
    well past what is alive. Reusing one buffer keeps it at what is alive (CUDA's caching allocator
    does this by itself; the buffer is harmless there).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, int], torch.Tensor] = {}  # per device (a model split over several)

    def take(self, shape: Sequence[int], device: torch.device, slot: int = 0) -> torch.Tensor:
        """A (shape) float32 view of buffer `slot`: its contents are undefined, and the next `take` of the
        slot reuses it (several slots for tensors that are alive at the same time)."""
        numel = math.prod(int(size) for size in shape)
        buffer = self._buffers.get((device, slot))
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[device, slot] = torch.empty(numel, dtype=torch.float32, device=device)
        return buffer[:numel].view(*shape)


class PerSampleGradientError(RuntimeError):
    """A per-sample gradient of this model cannot be had exactly; raised instead of returning a wrong one."""


@dataclass
class _Owner:
    name: str  # module path in the model, for error messages
    module: nn.Module
    local_to_name: dict[str, str]  # the module's own attribute name -> canonical parameter name
    layout: str | None  # OUT_IN / IN_OUT for a linear module (batched matmul), None for the vmap path
    embedding: bool = False  # a plain nn.Embedding: one scatter
    per_channel: bool | None = None  # 1-D parameters per output channel: None untried, True/False once compared
    channel_form: str | None = None  # per channel: its exact fast form (`CHANNEL_FORMS`), "" none, None untried
    verified: bool = False  # its rows, recomputed one at a time, gave the batched output once
    scale_check: tuple = ()  # (weight identity and version, usable): a scale is checked once, not every batch


@dataclass
class _Call:
    owner: _Owner
    args: tuple
    kwargs: dict
    output: torch.Tensor | tuple | None  # a tensor, or a tuple of tensors and Nones (an MoE router's)
    version: int = -1  # the output tensor's version counter when the call returned (in-place writes bump it)


def _output_parts(output: object) -> tuple | None:
    """A module call's output as a tuple (a tensor is one part); None when it is not tensors (and Nones)."""
    if torch.is_tensor(output):
        return (output,)
    if isinstance(output, (tuple, list)) and all(o is None or torch.is_tensor(o) for o in output):
        return tuple(output)
    return None


def _grad_parts(output: torch.Tensor | tuple) -> list[tuple[int, torch.Tensor]]:
    """(position, tensor) of the output parts gradients flow back through."""
    return [(j, o) for j, o in enumerate(_output_parts(output)) if torch.is_tensor(o) and o.requires_grad]


class PerSampleGradients:
    """Per-sample gradients of `param_names` (default: every trainable parameter) of a causal LM.

    Args:
        model: a causal LM (plain transformers model or a PEFT model) returning `logits`.
        param_names: canonical names from `model.named_parameters()`; tied parameters appear once.
        lm_head_at_labels: compute the LM head only at the positions that predict a label (prompt tokens and
            padding need no vocabulary-sized logits: faster, far less memory), when the model's forward takes
            transformers' `logits_to_keep`; False computes every position's logits, as the model's own loss
            does. The gradients are the same.

    Calling the object on a padded batch (`input_ids`, `attention_mask`, `labels`) runs one
    forward and one backward and hands each parameter's (B, *shape) float32 gradient to
    `consume(name, grads)` as soon as it is complete (so only one block is alive at a time),
    or returns them all in a dict when `consume` is None. Raises `PerSampleGradientError` when
    some per-sample gradient cannot be had exactly (see the module docstring).

    With `scratch` set (a `Scratch`), a linear module's weight block handed to `consume` is formed
    in that buffer, which the next block reuses: the consumer must be done with it when `consume`
    returns (`Featurizer` is). Blocks that are kept (the returned dict, tied weights) never are.
    """

    def __init__(self, model: nn.Module, param_names: Sequence[str] | None = None, lm_head_at_labels: bool = True):
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
        for path, module in model.named_modules():
            if isinstance(module, _CONTAINERS):
                continue  # never called: its parameters belong to the module that holds it
            owned = {local: by_id[id(p)] for local, p in _own_parameters(module) if id(p) in by_id}
            if owned:
                layout = _linear_layout(module) if set(owned) <= {"weight", "bias"} else None
                embedding = set(owned) == {"weight"} and _plain_embedding(module)
                per_channel = None if all(module.get_parameter(local).dim() == 1 for local in owned) else False
                self.owners.append(
                    _Owner(path or type(module).__name__, module, owned, layout, embedding, per_channel)
                )
        self.shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        self._all_params = list(model.parameters())
        self._checkpointable = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        self._wanted = {id(p) for p in self.params.values()}
        self._pass_positions = forward_takes(model, "position_ids")
        self._keep_logits = lm_head_at_labels and keeps_label_logits(model)
        owners_of: dict[str, int] = {}
        for o in self.owners:
            for name in o.local_to_name.values():
                owners_of[name] = owners_of.get(name, 0) + 1
        # weights whose per-sample gradient can be handed out as factors: a linear module's own, not tied
        self.factorable = frozenset(
            o.local_to_name["weight"]
            for o in self.owners
            if o.layout is not None and "weight" in o.local_to_name and owners_of[o.local_to_name["weight"]] == 1
        )
        self.factored: frozenset[str] = frozenset()  # those of them handed out as factors (see `__call__`)
        # embedding weights whose per-sample gradient can be handed out as its non-zero rows: not tied
        self.row_sparse_able = frozenset(
            o.local_to_name["weight"] for o in self.owners if o.embedding and owners_of[o.local_to_name["weight"]] == 1
        )
        self.row_sparse: frozenset[str] = frozenset()  # those of them handed out as rows (see `__call__`)
        # factorable weights whose gradient is wanted scaled, (ρ γᵀ) ⊙ G: applied to the factors, not to G
        self.weight_scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scratch: Scratch | None = None
        self._uses_checked = False
        self._tap = True  # output gradients handled inside the backward pass (see `_Tap`)

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
        consume_factors: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
        consume_rows: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
        weight_scales: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor, torch.Tensor]:
        """Returns (grads or None, per-sample loss (B,), valid (B,) bool).

        A row without label tokens, or with a non-finite loss, is not valid: it takes no part
        in the backward pass and its gradient is all zeros; callers must not use it.

        With `consume_factors`, the weight of every linear module named in `self.factored` (and used
        by that one call only) is never formed: `consume_factors(name, a, b)` gets its per-sample
        gradient as factors, `G_b = Σ_t a_bt b_btᵀ` (see `linear_factors`); a and b are zero on
        padding and on invalid rows, so they contribute nothing.

        With `consume_rows`, the weight of every embedding named in `self.row_sparse` is handed out as
        its non-zero rows: `consume_rows(name, ids (U,), samples (U,), values (U, d))` means row
        `ids[u]` of sample `samples[u]`'s gradient is `values[u]`, and every other row is zero.

        `weight_scales` replaces `self.weight_scales` (the scales put on formed weights' factors) for this call.
        """
        if any(m.gradient_checkpointing is True for m in self._checkpointable):
            raise PerSampleGradientError(
                "gradient checkpointing is on: its recomputed forwards would re-fire the capture hooks; turn it off"
            )
        batch, tokens = input_ids.shape
        scales_of = self.weight_scales if weight_scales is None else weight_scales
        calls: list[_Call] = []
        anchor = torch.zeros((), device=input_ids.device, requires_grad=True) if self._tap else None
        done: list[bool] = []

        def capture(owner: _Owner):
            def hook(module, args, kwargs, output):
                if _output_parts(output) is None:
                    raise PerSampleGradientError(
                        f"{owner.name} ({type(module).__name__}) returned {type(output).__name__}, not tensors, "
                        "so its parameters' per-sample gradients cannot be had: freeze them (requires_grad=False) "
                        "or train LoRA adapters on linear layers instead"
                    )
                # What the model gets back is never a tensor it could write into unseen: a write in place would
                # make δ the gradient of what was written, not of the call's output (taps refuse such writes)
                if not torch.is_tensor(output):  # each part through an identity node: its gradient is then
                    # only what reaches it from outside the call, not also what flows from one part into another
                    parts = tuple(o.view_as(o) if torch.is_tensor(o) and o.requires_grad else o for o in output)
                    calls.append(_Call(owner, args, kwargs, parts))
                    done.append(False)
                    handed = tuple(o.clone() if torch.is_tensor(o) and o.requires_grad else o for o in parts)
                    return type(output)(handed) if type(output) in (tuple, list) else type(output)(*handed)
                calls.append(_Call(owner, args, kwargs, output, output._version))
                done.append(False)
                if not output.requires_grad:
                    return None
                if anchor is not None:  # δ is handled the moment backward reaches it
                    return _Tap.apply(output, anchor, functools.partial(process, len(calls) - 1))
                return output.clone()  # the model refused the taps: it writes into module outputs in place

            return hook

        remaining: dict[str, int] = {}
        uses: dict[str, int] = {}
        acc: dict[str, torch.Tensor] = {}
        result: dict[str, torch.Tensor] | None = {} if consume is None else None
        emit = consume if consume is not None else result.__setitem__

        def process(i: int, delta: torch.Tensor | None) -> None:
            """Turn call i's output gradient into its parameters' per-sample gradients (then free the call)."""
            call, calls[i], done[i] = calls[i], None, True
            weight = call.owner.local_to_name.get("weight")
            if (
                consume_factors is not None
                and delta is not None
                and call.owner.layout is not None
                and weight in self.factored
                and uses[weight] == 1  # a tied weight (two calls) is formed and summed
            ):
                _check_rows(delta, batch, tokens, f"the output of {call.owner.name}")
                a, b = linear_factors(call, delta, batch, tokens)
                consume_factors(weight, a, b)  # the weight is never formed; a bias still goes the common way
                has_bias = "bias" in call.owner.local_to_name
                grads = {"bias": (a if call.owner.layout == OUT_IN else b).sum(1)} if has_bias else {}
                owned = {local: name for local, name in call.owner.local_to_name.items() if local != "weight"}
                remaining[weight] = 0
            elif (
                consume_rows is not None
                and delta is not None
                and call.owner.embedding
                and weight in self.row_sparse
                and uses[weight] == 1
            ):
                _check_rows(delta, batch, tokens, f"the output of {call.owner.name}")
                consume_rows(weight, *embedding_rows(call, delta, batch, tokens))
                grads, owned = {}, {}
                remaining[weight] = 0
            else:
                into = None
                formed_once = call.owner.layout is not None and weight is not None and uses[weight] == 1
                if self.scratch is not None and consume is not None and formed_once and torch.is_tensor(delta):
                    into = self.scratch.take((batch, *self.shapes[weight]), delta.device)  # handed on at once
                grads = _module_grads(call, delta, batch, tokens, scales_of.get(weight), into)
                owned = call.owner.local_to_name
            for local, name in owned.items():
                acc[name] = grads[local] if name not in acc else acc[name] + grads[local]
                remaining[name] -= 1
                if remaining[name] == 0:
                    emit(name, acc.pop(name))

        hooks = [o.module.register_forward_hook(capture(o), with_kwargs=True) for o in self.owners]
        forwarded, refused = False, None
        try:
            with self._only_these_trainable(), torch.enable_grad():
                extra = {"position_ids": _positions(attention_mask)} if self._pass_positions else {}
                kept = label_positions(labels.to(input_ids.device)) if self._keep_logits else None
                if kept is not None:  # the LM head only where a label is predicted (memory: (B, K, V) logits)
                    extra["logits_to_keep"] = kept
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
                forwarded = True
                loss, valid = _per_sample_loss(out.logits, labels, kept)
                total = loss.masked_fill(~valid, 0.0).sum()
                if not self._uses_checked:  # structural: the model's graph is the same for every batch
                    names = {id(p): n for n, p in self.params.items()}
                    _check_parameter_uses(total, calls, self._wanted, names)
                    self._uses_checked = True
                for c in calls:
                    for name in c.owner.local_to_name.values():
                        remaining[name] = remaining.get(name, 0) + 1
                uses.update(remaining)
                for name in self.param_names:  # parameters never used in the forward: zero gradient
                    if name not in remaining:
                        emit(name, torch.zeros(batch, *self.shapes[name], device=input_ids.device))
                differentiable = [i for i, c in enumerate(calls) if _grad_parts(c.output)]
                if valid.any() and differentiable:
                    # without taps, autograd is asked for every δ at once; with them, only for tuple outputs' parts
                    late = [i for i in differentiable if anchor is None or not torch.is_tensor(calls[i].output)]
                    parts = [(i, j, o) for i in late for j, o in _grad_parts(calls[i].output)]
                    if anchor is not None:  # every tap lies on a path to the anchor: each δ passes through once
                        for c in calls:  # outputs still to be compared once, or read again, are kept
                            o = c.owner
                            tapped = torch.is_tensor(c.output)
                            read = o.per_channel is not False and o.channel_form in (None, *_FROM_OUTPUT)
                            if tapped and (o.layout is not None or o.embedding or (o.verified and not read)):
                                c.output = None
                    asked = ([anchor] if anchor is not None else []) + [o for _, _, o in parts]
                    deltas = torch.autograd.grad(total, asked, allow_unused=True)[len(asked) - len(parts) :]
                    by_call: dict[int, list] = {i: [None] * len(_output_parts(calls[i].output)) for i in late}
                    for (i, j, _), d in zip(parts, deltas):
                        by_call[i][j] = d
                    for i in late:
                        process(i, by_call[i][0] if torch.is_tensor(calls[i].output) else tuple(by_call[i]))
        except RuntimeError as err:
            # Autograd refuses a write in place into a tap's output (Falcon's decoder adds into its Linear's output)
            if anchor is None or forwarded or isinstance(err, (PerSampleGradientError, torch.OutOfMemoryError)):
                raise
            refused = err
        finally:
            for h in hooks:
                h.remove()
        if refused is not None:  # the forward failed with the taps only: without them, autograd gives every δ at once
            self._tap = False
            try:
                return self(input_ids, attention_mask, labels, consume, consume_factors, consume_rows, weight_scales)
            except BaseException:
                self._tap = True  # it fails without the taps too: the taps were not the cause
                raise
        for i, finished in enumerate(done):  # outputs that never reached the loss (or no valid row)
            if not finished:
                process(i, None)
        return result, loss.detach(), valid


class _Tap(torch.autograd.Function):
    """Identity on a module's output whose backward hands its gradient δ to a callback as soon as it is final.

    Processing each δ inside the backward pass (instead of asking autograd for all of them at once)
    keeps one output gradient alive at a time, as a training step does. The scalar `anchor` input puts
    every tap on a path to the one tensor the backward is asked for, so none is skipped.
    """

    @staticmethod
    def forward(ctx, output, anchor, callback):
        ctx.callback = callback
        return output.view_as(output)

    @staticmethod
    def backward(ctx, delta):
        ctx.callback(delta)
        return delta, None, None


# -- owners: the modules whose calls the hooks see -----------------------------------------
_CONTAINERS = (nn.ParameterDict, nn.ParameterList)


def _own_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(local name, parameter) of `module`'s own parameters and of the parameter containers it holds.

    A container (e.g. peft's `lora_embedding_A` ParameterDict) has no forward of its own: the
    module holding it uses its parameters in its own forward, so that module's calls are the
    ones whose per-sample gradient accounts for them.
    """
    for local, p in module._parameters.items():
        if p is not None:
            yield local, p
    for child_name, child in module._modules.items():
        if isinstance(child, _CONTAINERS):
            for local, p in child.named_parameters():
                yield f"{child_name}.{local}", p


# -- inputs and loss -----------------------------------------------------------------------
def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids counted over each row's real tokens: a row gets the positions it has alone.

    Padding gets the neighbouring real position (0 before a left-padded row, the last one after a
    right-padded row), so every row's ids are non-decreasing (never read as packed sequences).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _per_sample_loss(
    logits: torch.Tensor, labels: torch.Tensor, kept: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's mean loss over its label tokens (NaN without any), and whether it has a defined gradient."""
    loss, count = row_losses(logits, labels, kept)
    return loss, (count > 0) & torch.isfinite(loss).detach()


# -- rows: the leading dimension is B, or B·T for inputs flattened over batch and tokens ----
def _has_rows(t: object, batch: int, tokens: int) -> bool:
    return torch.is_tensor(t) and t.dim() > 0 and t.shape[0] in (batch, batch * tokens)


def _check_rows(t: torch.Tensor, batch: int, tokens: int, what: str) -> None:
    if not _has_rows(t, batch, tokens):
        raise PerSampleGradientError(
            f"{what} has shape {tuple(t.shape)}: its leading dimension is neither the batch size {batch} nor "
            f"batch × tokens {batch * tokens}, so it cannot be split into per-sample parts"
        )


def _by_row(t: torch.Tensor, batch: int) -> torch.Tensor:
    """View a (B, ...) or (B·T, ...) tensor as (B, n, ...): row b's part, as a batch of one would hold it."""
    return t.reshape(batch, t.shape[0] // batch, *t.shape[1:])


# -- linear modules: one batched matmul ---------------------------------------------------
def _linear_layout(module: nn.Module) -> str | None:
    """OUT_IN or IN_OUT if `module` computes `x Wᵀ + b` or `x W + b` from its 2-D `weight` (and `bias`), else None.

    `nn.Linear` and `Conv1D` themselves are known. A subclass that overrides `forward` (e.g.
    Falcon's `FalconLinear`, `input @ weight.T + bias`) is probed once on random weights and a
    random input; one that is not linear there takes the generic vmap path.
    """
    if not isinstance(module, (nn.Linear, Conv1D)):
        return None
    if type(module).forward is nn.Linear.forward:
        return OUT_IN
    if type(module).forward is Conv1D.forward:
        return IN_OUT
    weight, bias = module.weight, module._parameters.get("bias")
    if weight.dim() != 2 or (bias is not None and bias.dim() != 1):
        return None
    gen = torch.Generator().manual_seed(0)
    probe = {"inner.weight": torch.randn(weight.shape, generator=gen)}
    if bias is not None:
        probe["inner.bias"] = torch.randn(bias.shape, generator=gen)
    probe = {k: v.to(weight.device) for k, v in probe.items()}
    w, b = probe["inner.weight"], probe.get("inner.bias")
    for layout, (d_out, d_in) in ((OUT_IN, weight.shape), (IN_OUT, weight.shape[::-1])):
        if b is not None and b.shape[0] != d_out:
            continue
        x = torch.randn(2, 3, d_in, generator=gen).to(weight.device)
        expected = x @ (w.T if layout == OUT_IN else w) + (b if b is not None else 0.0)
        try:
            with torch.no_grad():
                y = torch.func.functional_call(_Bare(module), probe, (x,))
        except (RuntimeError, TypeError, ValueError):  # a shape mismatch: not this layout
            continue
        if torch.is_tensor(y) and y.shape == expected.shape and torch.allclose(y, expected, rtol=1e-4, atol=1e-4):
            return layout
    return None


def _input_tensor(call: _Call) -> torch.Tensor:
    """The one tensor a linear module was called with (positionally or by keyword)."""
    tensors = [a for a in (*call.args, *call.kwargs.values()) if torch.is_tensor(a)]
    if len(tensors) != 1:
        raise PerSampleGradientError(f"{call.owner.name} was called with {len(tensors)} tensors, expected one input")
    return tensors[0]


def linear_factors(call: _Call, delta: torch.Tensor, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), each (B, T, ·), with the weight's per-sample gradient `Σ_t a_bt b_btᵀ` in its own layout.

    nn.Linear's (out, in) weight: a = δ (output gradients), b = x (inputs); Conv1D's (in, out): a = x, b = δ.
    """
    x = _input_tensor(call)
    _check_rows(x, batch, tokens, f"the input of {call.owner.name}")
    if x.shape[:-1] != delta.shape[:-1]:
        raise PerSampleGradientError(
            f"{call.owner.name}: input {tuple(x.shape)} and output {tuple(delta.shape)} do not match token for token"
        )
    x = _by_row(x.detach(), batch).reshape(batch, -1, x.shape[-1]).float()
    d = _by_row(delta, batch).reshape(batch, -1, delta.shape[-1]).float()
    return (d, x) if call.owner.layout == OUT_IN else (x, d)


def _linear_grads(
    call: _Call, delta: torch.Tensor, batch: int, tokens: int, scales=None, into: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """dW_b = Σ_t δ_bt x_btᵀ (x_bt δ_btᵀ for the (in, out) layout), db_b = Σ_t δ_bt, as batched matmuls.

    `scales` (ρ, γ): the weight's gradient comes out as `(ρ γᵀ) ⊙ dW_b`, scaled on the factors.
    `into`: a (B, *weight shape) float32 tensor the weight's gradient is written to.
    """
    a, b = linear_factors(call, delta, batch, tokens)
    out = {}
    if "bias" in call.owner.local_to_name:
        out["bias"] = (a if call.owner.layout == OUT_IN else b).sum(1)
    if "weight" in call.owner.local_to_name:
        if scales is not None:
            a, b = a * scales[0], b * scales[1]
        out["weight"] = torch.bmm(a.transpose(1, 2), b, out=into)
    return out


# -- any other module: vmap of its own VJP over the rows ----------------------------------
def _module_grads(
    call: _Call, delta: torch.Tensor | tuple | None, batch: int, tokens: int, scales=None, into=None
) -> dict[str, torch.Tensor]:
    module = call.owner.module
    if isinstance(delta, tuple) and any(d is not None for d in delta):  # several outputs (an MoE router's)
        return _vmap_grads(call, delta, batch, tokens)  # (which checks the rows of every floating part)
    if delta is None or isinstance(delta, tuple):  # no output reaches the loss (e.g. DoRA's detached weight norm)
        params = {local: module.get_parameter(local) for local in call.owner.local_to_name}
        return {local: torch.zeros(batch, *p.shape, device=p.device) for local, p in params.items()}
    _check_rows(delta, batch, tokens, f"the output of {call.owner.name} ({type(module).__name__})")
    if call.owner.layout is not None:
        return _linear_grads(call, delta, batch, tokens, scales, into)
    if call.owner.embedding:
        return _embedding_grads(call, delta, batch, tokens)
    owner = call.owner
    if owner.per_channel:
        fast = CHANNEL_FORMS[owner.channel_form](call, delta, batch) if owner.channel_form else None
        return fast if fast is not None else _per_channel_grads(call, delta, batch)
    if owner.per_channel is None:  # untried: each shortcut is kept only if it gives the vmap result
        exact = _vmap_grads(call, delta, batch, tokens)
        if batch < 2 or not any(bool(v.any()) for v in exact.values()):  # one row cannot show mixing, and all
            return exact  # zeros would equal anything: decide on a later call
        try:
            quick = _per_channel_grads(call, delta, batch)
        except (RuntimeError, TypeError, ValueError):  # a module the shortcut cannot even run on
            quick = None
        owner.per_channel = quick is not None and all(_close(quick[k], v) for k, v in exact.items())
        owner.channel_form = ""
        for form, grads_of in CHANNEL_FORMS.items() if owner.per_channel else ():
            fast = grads_of(call, delta, batch)
            if fast is not None and fast.keys() == exact.keys() and all(_close(fast[k], v) for k, v in exact.items()):
                owner.channel_form = form
                break
        return exact
    return _vmap_grads(call, delta, batch, tokens)


# -- embeddings: one scatter ----------------------------------------------------------------
def _plain_embedding(module: nn.Module) -> bool:
    """An `nn.Embedding` whose forward is the plain lookup (no max_norm renorm, no frequency scaling)."""
    return (
        isinstance(module, nn.Embedding)
        and type(module).forward is nn.Embedding.forward
        and module.max_norm is None
        and not module.scale_grad_by_freq
    )


def embedding_rows(
    call: _Call, delta: torch.Tensor, batch: int, tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, samples, values): the non-zero rows of each sample's embedding gradient (see `__call__`)."""
    module = call.owner.module
    ids = _input_tensor(call)
    _check_rows(ids, batch, tokens, f"the input of {call.owner.name}")
    ids = _by_row(ids, batch).reshape(batch, -1)
    d = _by_row(delta, batch).reshape(batch, ids.shape[1], -1).float()
    vocab = module.num_embeddings
    keys = torch.arange(batch, device=ids.device)[:, None] * vocab + ids
    keep = ids != module.padding_idx if module.padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)
    unique, inverse = torch.unique(keys[keep], return_inverse=True)
    values = d.new_zeros(len(unique), d.shape[-1])
    with _deterministic(values.is_cuda):
        values.index_add_(0, inverse, d[keep])
    return unique % vocab, unique // vocab, values


def _embedding_grads(call: _Call, delta: torch.Tensor, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    ids, samples, values = embedding_rows(call, delta, batch, tokens)
    module = call.owner.module
    grads = values.new_zeros(batch * module.num_embeddings, values.shape[1])
    grads[samples * module.num_embeddings + ids] = values  # (sample, id) pairs are unique
    return {"weight": grads.reshape(batch, module.num_embeddings, -1)}


# -- per-channel parameters (norms): a few batched forwards, or none --------------------------
def _per_channel_grads(call: _Call, delta: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """`dw_b = Σ_t δ_bt ⊙ ∂y_bt/∂w` for 1-D parameters that act per output channel and affinely (every norm).

    `∂y/∂w = y(w = 1) − y(w = 0)` with the module's other parameters at zero: exact for such modules
    only, which is why its first call is compared with the vmap result (`_module_grads`).
    """
    owner = call.owner
    zeros = {local: torch.zeros_like(owner.module.get_parameter(local)) for local in owner.local_to_name}
    at_zero = _forward_with(call, zeros)
    out = {}
    for local in owner.local_to_name:
        width = zeros[local].shape[0]
        if delta.shape[-1] != width or at_zero.shape != delta.shape:
            raise ValueError(f"{owner.name}: output {tuple(at_zero.shape)} is not per channel of {local}")
        slope = _forward_with(call, {**zeros, local: torch.ones_like(zeros[local])}).float() - at_zero.float()
        out[local] = _channel_sums(delta.float() * slope, batch)
    return out


def _channel_sums(per_token: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, channels): each row's sum over its tokens of a per-token, per-channel tensor (B or B·T leading)."""
    return _by_row(per_token, batch).reshape(batch, -1, per_token.shape[-1]).sum(1)


def _forward_with(call: _Call, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The call's output again, with its module's parameters `params` (local names) instead (no hooks, no grad)."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    args, kwargs = tree_unflatten([a.detach() if torch.is_tensor(a) else a for a in leaves], spec)
    with torch.no_grad():
        return torch.func.functional_call(
            _Bare(call.owner.module), {f"inner.{k}": v for k, v in params.items()}, tuple(args), kwargs
        )


def _scaled_output_grads(
    call: _Call, delta: torch.Tensor, batch: int, offset: float = 0.0
) -> dict[str, torch.Tensor] | None:
    """`dw_b = (Σ_t δ_bt ⊙ y_bt) / (offset + w)` for a module whose one parameter scales its output,
    `y = (offset + w) ⊙ s(x)` (RMSNorm, a LayerNorm without bias; Gemma's norms with offset 1): no forward at
    all, since `∂y/∂w = s = y / (offset + w)`.

    Exact for such modules only, which is why its first call is compared with the vmap result (`_module_grads`);
    None (use `_per_channel_grads`) when it cannot apply to this call: a scale with a zero (or subnormal) entry,
    an output the model wrote into after the call, or an output that is not one tensor per channel of w.
    """
    owner = call.owner
    y = call.output
    if len(owner.local_to_name) != 1 or not torch.is_tensor(y) or y._version != call.version:
        return None
    ((local, _),) = owner.local_to_name.items()
    param = owner.module.get_parameter(local)
    w = param.detach().float() + offset
    if y.shape != delta.shape or w.dim() != 1 or y.shape[-1] != w.shape[0]:
        return None
    key = (param.data_ptr(), param._version, offset, y.dtype)  # new weights (a snapshot, a write): checked again
    if owner.scale_check[:1] != (key,):
        owner.scale_check = (key, _usable_scale(w, y.dtype))
    if not owner.scale_check[1]:
        return None
    return {local: _channel_sums(delta.float() * y.float(), batch).div_(w)}


def _usable_scale(w: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `y / w` recovers `y`'s unscaled part: every entry finite and not zero or subnormal in `dtype`
    (one device-to-host sync, so it is asked once per weight version, not once per batch: an in-place write bumps
    the version, as `assign_snapshot`'s do; a write through `.data` does not)."""
    return bool(torch.all(torch.isfinite(w) & (w.abs() >= torch.finfo(dtype).tiny)))


def _scale_shift_grads(call: _Call, delta: torch.Tensor, batch: int) -> dict[str, torch.Tensor] | None:
    """`dw_b = Σ_t δ_bt ⊙ s_bt`, `db_b = Σ_t δ_bt` for a module `y = w ⊙ s(x) + b` (LayerNorm): one forward,
    `s = y(w = 1, b = 0)`, instead of the general shortcut's three.

    Exact for such modules only, which is why its first call is compared with the vmap result (`_module_grads`);
    None when the module's parameters are not a `weight` and a `bias` of its output's width.
    """
    owner = call.owner
    if set(owner.local_to_name) != {"weight", "bias"}:
        return None
    w = owner.module.get_parameter("weight")
    if w.dim() != 1 or delta.shape[-1] != w.shape[0]:
        return None
    s = _forward_with(
        call, {"weight": torch.ones_like(w), "bias": torch.zeros_like(owner.module.get_parameter("bias"))}
    )
    if s.shape != delta.shape:
        return None
    d = delta.float()
    return {"weight": _channel_sums(d * s.float(), batch), "bias": _channel_sums(d, batch)}


CHANNEL_FORMS: dict[str, Callable[[_Call, torch.Tensor, int], dict[str, torch.Tensor] | None]] = {
    "scale": _scaled_output_grads,
    "one_plus_scale": functools.partial(_scaled_output_grads, offset=1.0),
    "scale_shift": _scale_shift_grads,
}
"""Faster exact forms of the per-channel shortcut, tried in order on a module's first call (kept if equal to vmap)."""
_FROM_OUTPUT = ("scale", "one_plus_scale")  # the forms that read the call's output


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of two summation orders (relative to the larger magnitude)."""
    if a.shape != b.shape:
        return False
    scale = max(a.abs().max().item(), b.abs().max().item()) if a.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * scale))


def _vmap_grads(call: _Call, delta: torch.Tensor | tuple, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    """Per-sample VJP of one module call, vmapped over the batch (any module that treats rows independently).

    Every tensor in the call's arguments (nested in tuples, lists, dicts too) whose leading
    dimension is B or B·T is split by rows, so each row's call sees what a batch of one would
    (a (1, ...) or a flattened (T, ...) tensor); everything else is passed to every row
    unchanged. The rows' recomputed outputs must equal the batched output, or the module mixes
    rows and its per-sample gradient is not what this computes. A tuple output (`delta` a tuple of
    its parts' gradients, None where a part gets none) is differentiated through its floating parts.
    """
    owner = call.owner
    leaves, spec = tree_flatten((call.args, call.kwargs))
    leaves = [a.detach() if torch.is_tensor(a) else a for a in leaves]
    slots = [i for i, a in enumerate(leaves) if _has_rows(a, batch, tokens)]
    if not slots:
        raise PerSampleGradientError(
            f"{owner.name} ({type(owner.module).__name__}) was called with no argument that has the batch (or "
            "batch × tokens) as its leading dimension, so its per-sample gradient cannot be separated"
        )
    bare = _Bare(owner.module)  # the module's forward without its hooks (e.g. transformers' input-grad hook)
    detached = {f"inner.{local}": owner.module.get_parameter(local).detach() for local in owner.local_to_name}
    if torch.is_tensor(delta):
        picked, cotangents = None, (delta,)
    else:  # the floating parts; a part without a gradient gets zeros
        outputs = call.output
        picked = [j for j, o in enumerate(outputs) if torch.is_tensor(o) and o.is_floating_point()]
        for j in picked:
            _check_rows(outputs[j], batch, tokens, f"an output of {owner.name} ({type(owner.module).__name__})")
        cotangents = tuple(delta[j] if delta[j] is not None else torch.zeros_like(outputs[j]) for j in picked)

    def one(rows: tuple[torch.Tensor, ...], g: tuple[torch.Tensor, ...]):
        full = list(leaves)
        for i, a in zip(slots, rows):
            full[i] = a
        args, kwargs = tree_unflatten(full, spec)

        def f(p):
            out = torch.func.functional_call(bare, p, tuple(args), kwargs)
            return (out,) if picked is None else tuple(out[j] for j in picked)

        output, vjp = torch.func.vjp(f, detached)
        return vjp(g)[0], output

    rows = tuple(_by_row(leaves[i], batch) for i in slots)
    grads, outputs = torch.func.vmap(one)(rows, tuple(_by_row(g.detach(), batch) for g in cotangents))
    if not owner.verified:  # a module that mixes rows does so in every batch of two rows or more: checked on
        # its first such batch (in a one-row batch there is nothing to mix)
        batched = (call.output,) if picked is None else tuple(call.output[j] for j in picked)
        for per_row, whole in zip(outputs, batched):
            _check_same_output(per_row, whole.detach(), owner)
        owner.verified = batch > 1
    return {k.removeprefix("inner."): v.float() for k, v in grads.items()}


def _check_same_output(per_row: torch.Tensor, batched: torch.Tensor, owner: _Owner) -> None:
    """Raise unless the module's rows, computed one at a time, give its batched output (up to rounding)."""
    if per_row.numel() == batched.numel():
        per_row = per_row.reshape(batched.shape)
        tol = max(1e-5, 4 * torch.finfo(batched.dtype).eps) if batched.is_floating_point() else 0.0
        scale = batched.abs().max().item() if batched.numel() and batched.is_floating_point() else 0.0
        if torch.allclose(per_row, batched, rtol=tol, atol=tol * scale):
            return
    raise PerSampleGradientError(
        f"{owner.name} ({type(owner.module).__name__}) gives other outputs one row at a time than for the batch: "
        "it mixes rows across the batch, so its per-sample gradient cannot be had"
    )


class _Bare(nn.Module):
    """Calls `inner.forward` directly, so forward hooks registered on `inner` do not run."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner.forward(*args, **kwargs)


# -- every use of a parameter must be inside a call the hooks saw -------------------------
def _walk(root, stop: set) -> Iterator:
    """Autograd nodes reachable from `root`, not descending into (or yielding) the nodes in `stop`."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        yield node
        stack.extend(child for child, _ in node.next_functions)


def _check_parameter_uses(total: torch.Tensor, calls: list[_Call], wanted: set[int], names: dict[int, str]) -> None:
    """Raise if a trainable parameter reaches the loss other than inside the forward of a module owning it.

    The hooks only see a module's calls; a parameter its parent reads directly (`child.weight`)
    contributes a gradient no captured call accounts for. An edge from an autograd node to a
    parameter counts as inside a call if the node lies between that call's output and its inputs.
    """
    if total.grad_fn is None:
        return
    inside = set()
    for c in calls:
        owned = {id(c.owner.module.get_parameter(local)) for local in c.owner.local_to_name}
        inputs = {t.grad_fn for t in tree_flatten((c.args, c.kwargs))[0] if torch.is_tensor(t) and t.grad_fn}
        for _, part in _grad_parts(c.output):
            for node in _walk(part.grad_fn, inputs) if part.grad_fn is not None else ():
                for child, _ in node.next_functions:
                    if id(getattr(child, "variable", None)) in owned:
                        inside.add((node, id(child.variable)))
    for node in _walk(total.grad_fn, set()):
        for child, _ in node.next_functions:
            param = getattr(child, "variable", None)
            if param is not None and id(param) in wanted and (node, id(param)) not in inside:
                raise PerSampleGradientError(
                    f"parameter {names[id(param)]} is used outside the forward of the module that owns it "
                    f"(by {node.name()}), so its per-sample gradient cannot be taken from that module's calls"
                )
