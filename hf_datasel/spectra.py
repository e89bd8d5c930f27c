"""Layer-wise gradient spectra: per sample and weight matrix, the singular values of the loss gradient.

Li et al., 2025 (arXiv 2504.10766): the spectrum of a sample's gradient on each attention
projection says something about its quality — higher-quality rows tend to give lower nuclear
norms and higher effective ranks. A sample's gradient on a linear layer `y = x Wᵀ` is

    G = Σ_t δ_t x_tᵀ = Δᵀ X        (Δ: T×d_out output-gradients, X: T×d_in inputs)

so its rank is at most the number of tokens T. With `Xᵀ = Q_x R_x` and `Δᵀ = Q_d R_d` (thin
QR), `G = Q_d (R_d R_xᵀ) Q_xᵀ`, and the singular values of G are those of the small
`R_d R_xᵀ` (at most T×T). Nothing of size d_out×d_in is ever formed or decomposed. Inputs and
output-gradients are captured with hooks, so the weight itself need not require grad (frozen
base weights under a LoRA adapter work the same as a full model), and one backward pass over a
padded batch gives every row's factors at once (rows never interact in a causal LM).

`q`, `k`, `v`, `o` are the same four matrices on every family. Where q, k and v are row blocks of
one fused weight (GPT-2 and GPT-BigCode `c_attn`, GPT-NeoX, Falcon and Bloom `query_key_value`, Phi-3 and
CodeGen `qkv_proj`, MPT `Wqkv`), a
block's gradient is `G_q = Σ_t δ_t[q] x_tᵀ`: the same factoring with Δ cut to the block's rows,
laid out as each family's modeling code splits them (`qkv_rows`). GPT-2's `Conv1D` (weight stored
(in, out)) is read through the same hooks. The model is handed back exactly as it came.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers.pytorch_utils import Conv1D

from .data import RowProcessing, Rows, iter_batches, load_processing, prepare_rows
from .model_state import plain_forward
from .record.per_sample_loss import forward_at_labels, row_losses
from .rows import ROW_COLUMNS, row_hashes
from .store import RunStore, StoreError

METRICS = ("nuclear_norm", "effective_rank", "frobenius_norm", "top_sigma")
"""Per (row, weight matrix): Σσ, exp(entropy of σ/Σσ), sqrt(Σσ²), max σ."""

QUALITY_DIRECTION = {
    "nuclear_norm": "lowest",
    "effective_rank": "highest",
    "frobenius_norm": "lowest",
    "top_sigma": "lowest",
}
"""Which end of each metric the paper associates with higher-quality data."""

STORE_NAME = "spectra"
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")
_PEFT_PREFIX = "base_model.model."


# -- linear algebra ---------------------------------------------------------------------------------------------------
def _r_factor(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """R of the thin QR of each `a[b]ᵀ`: a is (B, T, d) -> R is (B, min(d, T), T), with `a[b] a[b]ᵀ = R[b]ᵀ R[b]`."""
    return torch.linalg.qr(a.to(dtype).transpose(-1, -2), mode="r").R


def factored_singular_values(
    inputs: torch.Tensor,
    output_grads: torch.Tensor,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Singular values of `G[b] = output_grads[b]ᵀ @ inputs[b]` for a batch, without forming G.

    `inputs` is (B, T, d_in), `output_grads` (B, T, d_out), `mask` (B, T) marks the tokens that
    count (padding contributes nothing, exactly). Returns (B, min(T, d_in, d_out)), descending.
    """
    if mask is not None:
        keep = mask.to(torch.bool).unsqueeze(-1)
        inputs = torch.where(keep, inputs, torch.zeros((), dtype=inputs.dtype, device=inputs.device))
        output_grads = torch.where(
            keep, output_grads, torch.zeros((), dtype=output_grads.dtype, device=output_grads.device)
        )
    return _core_singular_values(output_grads, _r_factor(inputs, dtype), dtype)


def _core_singular_values(output_grads: torch.Tensor, r_input: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """σ of `Δᵀ X` from Δ (B, T, d_out, padding zeroed) and X's R factor (B, k, T): `σ(R_Δ R_xᵀ)`.

    Two thin QRs and a small SVD: nothing is squared, so small singular values keep the precision
    of `dtype` (a Gram/eigenvalue route would lose half the digits).
    """
    return torch.linalg.svdvals(_r_factor(output_grads, dtype) @ r_input.transpose(-1, -2))


def spectral_metrics(sigma: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Nuclear norm, effective rank, Frobenius norm and top σ from singular values on the last axis.

    Effective rank is `exp(-Σ p ln p)` with `p = σ / Σσ` (0 ln 0 = 0); it is NaN for an all-zero
    gradient, where it is undefined. NaN singular values (padding of ragged spectra) are ignored.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64)
    s = torch.nan_to_num(s, nan=0.0).clamp(min=0.0)
    nuclear = s.sum(-1)
    p = s / torch.where(nuclear > 0, nuclear, torch.ones_like(nuclear)).unsqueeze(-1)
    entropy = -torch.xlogy(p, p).sum(-1)
    erank = torch.where(nuclear > 0, entropy.exp(), torch.full_like(nuclear, float("nan")))
    top = s.amax(-1) if s.shape[-1] else torch.zeros(s.shape[:-1], dtype=s.dtype)
    return {
        "nuclear_norm": nuclear.numpy(),
        "effective_rank": erank.numpy(),
        "frobenius_norm": s.square().sum(-1).sqrt().numpy(),
        "top_sigma": top.numpy(),
    }


# -- which weight matrices -------------------------------------------------------------------------------------------
PROJECTION_ALIASES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj",),
    "k": ("k_proj",),
    "v": ("v_proj",),
    "o": (
        "o_proj", "self_attn.out_proj", "attn.out_proj", "attention.dense", "self_attention.dense", "self_attn.dense",
        "attn.c_proj",
    ),
}  # fmt: skip
"""Module-name endings of the attention projections stored as their own weight: `o` is `o_proj` (Llama,
Phi-3, ...), `out_proj` (OPT `self_attn.out_proj`, MPT and CodeGen `attn.out_proj`), `dense` (GPT-NeoX
`attention.dense`, Falcon and Bloom `self_attention.dense`, Phi `self_attn.dense`) or `attn.c_proj` (GPT-2 and
GPT-BigCode, whose MLPs have a `c_proj` too). Fused q/k/v weights are in `FUSED_QKV`."""

FUSED_QKV: dict[str, str] = {
    "gpt2": "attn.c_attn",
    "gpt_neox": "attention.query_key_value",
    "phi3": "self_attn.qkv_proj",
    "falcon": "self_attention.query_key_value",
    "bloom": "self_attention.query_key_value",
    "gpt_bigcode": "attn.c_attn",
    "mpt": "attn.Wqkv",
    "codegen": "attn.qkv_proj",
}
"""Per `model_type`, the module-name ending of the weight that holds q, k and v as row blocks (see `qkv_rows`)."""

CODEGEN_MP_NUM = 4  # `CodeGenAttention.mp_num`: a constant of the modeling code, not in the config

_FUSED_QKV_NAMES = ("c_attn", "query_key_value", "qkv_proj", "Wqkv", "qkv", "W_pack")
"""Last name parts that usually mean a fused q/k/v weight: named in the error for a model type of unknown layout."""


def _blocks(groups: int, chunks: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """Output rows of each label when the weight repeats `chunks` ((label, rows) in order) `groups` times."""
    rows: dict[str, list[torch.Tensor]] = {label: [] for label, _ in chunks}
    start = 0
    for _ in range(groups):
        for label, size in chunks:
            rows[label].append(torch.arange(start, start + size))
            start += size
    return {label: torch.cat(parts) for label, parts in rows.items()}


def qkv_rows(config) -> dict[str, torch.Tensor]:
    """Which output rows of a fused q/k/v weight are q, k and v, as the family's modeling code splits them.

    The gradient of the q block is `Σ_t δ_t[q] x_tᵀ`: the q rows of the fused weight's gradient.
    "Rows" are output features (columns of a GPT-2 `Conv1D` weight, which is stored (in, out)).
    Layouts (transformers 5, `models/<family>/modeling_<family>.py`):

    * gpt2 — `GPT2Attention.forward`: `self.c_attn(hidden_states).split(self.split_size, dim=2)`,
      `split_size = embed_dim`: `[q | k | v]`.
    * gpt_neox — `GPTNeoXAttention.forward`: `qkv.view(*input_shape, -1, 3 * self.head_size)` then
      `qkv.chunk(3, dim=-1)`: per head `[q_h | k_h | v_h]`.
    * phi3 — `Phi3Attention.forward`: `qkv[..., :query_pos]`, then `num_key_value_heads * head_dim`
      for k, the rest v (`query_pos = num_attention_heads * head_dim`): `[q | k | v]` with GQA sizes.
    * falcon — `FalconAttention.forward`: with `new_decoder_architecture`, `view(..., num_kv_heads, -1,
      head_dim)`, q = `[..., :-2, :]`, k = `[..., -2, :]`, v = `[..., -1, :]`: per kv group
      `[q_1 … q_g | k | v]`; without it and without `multi_query`, `unflatten(-2, (num_heads, 3))`: per
      head `[q_h | k_h | v_h]`; with `multi_query`, `split([num_heads, 1, 1], dim=-2)`: `[q | k | v]` with
      one k and one v head.
    * bloom — `BloomAttention._reshape`: `view(batch, seq_length, num_heads, 3, head_dim)`, q = `[..., 0, :]`:
      per head `[q_h | k_h | v_h]`.
    * gpt_bigcode — `GPTBigCodeAttention.forward`: with `multi_query`, `split((embed_dim, kv_dim, kv_dim))`,
      `kv_dim = head_dim`: `[q | k | v]` with one k and one v head; without it, `view(..., num_heads, 3 * head_dim)`
      then `split(3 * [head_dim])`: per head `[q_h | k_h | v_h]`.
    * mpt — `MptAttention.forward`: `mixed_qkv.chunk(3, dim=2)`: `[q | k | v]`.
    * codegen — `CodeGenAttention.forward`: `view(..., -1, 3 * local_dim)` with `local_dim = embed_dim // mp_num`
      (`mp_num = 4`), then `query, value, key = qkv.split(local_dim, dim=-1)`: per group `[q_g | v_g | k_g]`
      (v before k), q the groups' q parts in order.
    """
    family = getattr(config, "model_type", None)
    heads, d = config.num_attention_heads, config.hidden_size
    head = d // heads
    per_head = [("q", head), ("k", head), ("v", head)]  # `[q_h | k_h | v_h]`, once per head
    one_kv = [("q", d), ("k", head), ("v", head)]  # multi-query: one k and one v head
    if family in ("gpt2", "mpt"):
        return _blocks(1, [("q", d), ("k", d), ("v", d)])
    if family in ("gpt_neox", "bloom"):
        return _blocks(heads, per_head)
    if family == "phi3":
        head = getattr(config, "head_dim", head)
        kv = config.num_key_value_heads * head
        return _blocks(1, [("q", heads * head), ("k", kv), ("v", kv)])
    if family == "falcon" and config.new_decoder_architecture:
        return _blocks(config.num_kv_heads, [("q", heads // config.num_kv_heads * head), ("k", head), ("v", head)])
    if family in ("falcon", "gpt_bigcode"):
        return _blocks(1, one_kv) if config.multi_query else _blocks(heads, per_head)
    if family == "codegen":
        local = d // CODEGEN_MP_NUM
        return _blocks(CODEGEN_MP_NUM, [("q", local), ("v", local), ("k", local)])
    raise ValueError(f"the q/k/v layout of a fused weight of model type {family!r} is not known")


@dataclass(frozen=True)
class Target:
    """One weight matrix whose per-sample gradient spectrum is measured."""

    name: str  # canonical module name (PEFT prefix and `.base_layer` removed)
    layer: int  # transformer block index, -1 when the name has none
    projection: str  # the label the user asked for ("q", "gate_proj", ...) or the module's last name part
    block: str | None = None  # "q", "k" or "v": that row block of a fused q/k/v weight; None: the whole weight

    @property
    def qualified_name(self) -> str:
        """The module name, with `[q]`/`[k]`/`[v]` for a block of a fused weight: unique per measured matrix."""
        return self.name if self.block is None else f"{self.name}[{self.block}]"


class Matrix(NamedTuple):
    """A measured matrix: its `Target`, the module whose input and output the hooks read, and, for a
    block of a fused weight, the output rows that make it up (`None`: every row)."""

    target: Target
    module: nn.Module
    rows: torch.Tensor | None = None


_WEIGHT_MODULES = (nn.Linear, Conv1D)


def _canonical(name: str) -> str:
    name = name.removesuffix(".base_layer")
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def _layer_of(name: str) -> int:
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else -1


def _ends_with(name: str, suffix: str) -> bool:
    """Whether `name` ends with the whole dotted parts of `suffix` (`attention.dense` is no `self_attention.dense`)."""
    return name == suffix or name.endswith("." + suffix)


def _out_features(module: nn.Module) -> int:
    return module.nf if isinstance(module, Conv1D) else module.out_features


def _model_config(model: nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "config", None)


def find_targets(
    model: nn.Module,
    layers: Literal["all"] | int | Sequence[int] = "all",
    projections: Sequence[str] = ("q", "k", "v", "o"),
    modules: Sequence[str] | None = None,
) -> list[Matrix]:
    """The weight matrices to measure, in (layer, projection) order: exactly one per requested layer and projection.

    `q`, `k`, `v`, `o` mean the attention projections on every family: a separate `q_proj`, or the
    q row block of a fused weight (GPT-2/GPT-BigCode `c_attn`, GPT-NeoX/Falcon/Bloom `query_key_value`,
    Phi-3/CodeGen `qkv_proj`, MPT `Wqkv`; see `qkv_rows`), and `o_proj`/`out_proj`/`dense`/`attn.c_proj` for
    `o`. Any other label is a module-name ending (`mlp.down_proj`, or `c_attn` to measure a fused weight whole).
    A label that matches nothing, or more than one matrix, in some requested layer is an error:
    a spectrum table never silently lacks a layer or mixes two matrices under one key.
    `modules` instead names linear layers exactly. Linear and GPT-2 `Conv1D` layers qualify;
    under a PEFT model the frozen `base_layer` of a LoRA-wrapped layer is used.
    """
    weights = [(_canonical(n), m) for n, m in model.named_modules() if isinstance(m, _WEIGHT_MODULES)]
    if modules is not None:
        if isinstance(modules, str) or not modules:
            raise ValueError("modules must be a non-empty list of linear layer names")
        by_name = dict(weights)
        missing = [n for n in modules if n not in by_name]
        if missing:
            raise ValueError(f"no linear layer named {missing}; linear layers include {sorted(by_name)[:8]}")
        return [Matrix(Target(n, _layer_of(n), n.rsplit(".", 1)[-1]), by_name[n]) for n in modules]
    if isinstance(projections, str):
        projections = (projections,)
    if not projections:
        raise ValueError("projections must name at least one matrix, e.g. ('q', 'k', 'v', 'o')")
    present = sorted({_layer_of(n) for n, _ in weights} - {-1})
    if not present:
        raise ValueError("no linear layer sits in a numbered block (layers.N, h.N, ...); name them with modules=[...]")
    if isinstance(layers, int):
        layers = [layers]
    wanted = present if layers == "all" else sorted({int(i) for i in layers})
    if set(wanted) - set(present):
        raise ValueError(f"layers {sorted(set(wanted) - set(present))} do not exist; the model has {present}")
    config = _model_config(model)
    fused_suffix = FUSED_QKV.get(getattr(config, "model_type", None))
    fused_rows = qkv_rows(config) if fused_suffix is not None else {}
    found: list[Matrix] = []
    for label in projections:
        per_layer: dict[int, list[Matrix]] = {layer: [] for layer in wanted}
        for name, module in weights:
            layer = _layer_of(name)
            if layer not in per_layer:
                continue
            if label in fused_rows and _ends_with(name, fused_suffix):
                width = sum(len(r) for r in fused_rows.values())
                if width != _out_features(module):
                    raise ValueError(
                        f"{name} has {_out_features(module)} outputs, but the {config.model_type} q/k/v layout of "
                        f"its config has {width}"
                    )
                per_layer[layer].append(Matrix(Target(name, layer, label, block=label), module, fused_rows[label]))
            elif any(_ends_with(name, suffix) for suffix in PROJECTION_ALIASES.get(label, (label,))):
                per_layer[layer].append(Matrix(Target(name, layer, label), module))
        _check_one_per_layer(label, per_layer, weights, config)
        found.extend(m for matches in per_layer.values() for m in matches)
    order = {label: i for i, label in enumerate(projections)}
    return sorted(found, key=lambda m: (m.target.layer, order[m.target.projection]))


def _check_one_per_layer(label: str, per_layer: dict[int, list[Matrix]], weights, config) -> None:
    """Raise unless `label` matched exactly one matrix in every requested layer (saying what it did match)."""
    missing = [layer for layer, matches in per_layer.items() if not matches]
    if missing:
        names = sorted({n for n, _ in weights if _layer_of(n) == missing[0]})
        hint = "Pass modules=[...] to name matrices exactly."
        fused = [n for n in names if n.rsplit(".", 1)[-1] in _FUSED_QKV_NAMES]
        if label in ("q", "k", "v") and fused:
            family = getattr(config, "model_type", None)
            hint = (
                f"{fused[0]} looks like a fused q/k/v weight, but its layout for model type {family!r} is not "
                f"known; measure it whole with projections=({fused[0].rsplit('.', 1)[-1]!r},) or modules=[...]."
            )
        raise ValueError(
            f"projection {label!r} matches no linear layer in layers {missing} "
            f"(layer {missing[0]} has {names}). {hint}"
        )
    several = {layer: [m.target.name for m in matches] for layer, matches in per_layer.items() if len(matches) > 1}
    if several:
        layer, names = next(iter(several.items()))
        raise ValueError(
            f"projection {label!r} matches {len(names)} linear layers in layer {layer}: {names}; "
            "use a longer name ending or modules=[...]."
        )


# -- the result ------------------------------------------------------------------------------------------------------
@dataclass
class GradientSpectra:
    """Per-row, per-weight-matrix gradient spectrum metrics of one model on one dataset.

    `metrics[name]` has shape (rows, matrices) in the order of `targets`; `loss` is each row's
    response-token loss (NaN for a row without response tokens, whose metrics are all NaN);
    `row_hash` ties the rows to the dataset (see `hf_datasel.rows.row_hashes`).
    """

    targets: list[Target]
    metrics: dict[str, np.ndarray]
    loss: np.ndarray
    num_tokens: np.ndarray
    row_hash: np.ndarray
    singular_values: np.ndarray | None = None  # (rows, matrices, k), NaN-padded, when kept
    columns: Any = None  # pandas DataFrame of the dataset's scalar columns, for grouping (not stored)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return len(self.loss)

    @property
    def table(self):
        """Long pandas DataFrame: one line per row × layer × projection with every metric and the row's loss."""
        import pandas as pd

        n, m = self.num_rows, len(self.targets)
        data = {
            "row": np.repeat(np.arange(n), m),
            "layer": np.tile([t.layer for t in self.targets], n),
            "projection": np.tile([t.projection for t in self.targets], n),
            "module": np.tile([t.name for t in self.targets], n),
        }
        data.update({k: self.metrics[k].reshape(-1) for k in METRICS})
        data["loss"] = np.repeat(self.loss, m)
        data["num_tokens"] = np.repeat(self.num_tokens, m)
        return pd.DataFrame(data)

    def _select_targets(
        self, layers: Literal["all"] | int | Sequence[int] | None, projections: Sequence[str] | None
    ) -> np.ndarray:
        keep = np.ones(len(self.targets), bool)
        if layers is not None and layers != "all":
            layers = {layers} if isinstance(layers, int) else set(layers)
            keep &= np.array([t.layer in layers for t in self.targets])
        if projections is not None:
            projections = {projections} if isinstance(projections, str) else set(projections)
            keep &= np.array([t.projection in projections for t in self.targets])
        if not keep.any():
            raise ValueError(f"no measured matrix matches layers={layers!r}, projections={projections!r}")
        return np.flatnonzero(keep)

    def summary(
        self,
        metric: str = "effective_rank",
        layers: Literal["all"] | int | Sequence[int] | None = None,
        projections: Sequence[str] | None = None,
    ) -> np.ndarray:
        """One number per row: `metric` averaged over the chosen matrices (NaN if any of them is NaN)."""
        if metric not in METRICS:
            raise ValueError(f"unknown spectral metric {metric!r}; choose from {METRICS}")
        return self.metrics[metric][:, self._select_targets(layers, projections)].mean(axis=1)

    def _group_labels(self, group_by) -> np.ndarray | None:
        if group_by is None:
            return None
        if isinstance(group_by, str):
            if self.columns is None or group_by not in self.columns:
                have = [] if self.columns is None else list(self.columns.columns)
                raise ValueError(f"no column {group_by!r} to group by (columns kept: {have}); pass labels instead")
            return np.asarray(self.columns[group_by])
        labels = np.asarray(group_by)
        if len(labels) != self.num_rows:
            raise ValueError(f"group_by has {len(labels)} labels for {self.num_rows} rows")
        return labels

    def report(self, group_by: str | Sequence | None = None):
        """Mean of each metric per layer and projection (per group), with row and NaN counts; see `layer_report`."""
        table = self.table
        labels = self._group_labels(group_by)
        column = None
        if labels is not None:
            column = group_by if isinstance(group_by, str) else "group"
            table[column] = np.repeat(labels, len(self.targets))
        return layer_report(table, group_by=column)

    def plot(
        self,
        path: str | os.PathLike,
        group_by: str | Sequence | None = None,
        metrics: Sequence[str] = ("nuclear_norm", "effective_rank"),
    ) -> str:
        """Save a PNG: mean metric per layer, one panel per metric × projection, one line per group."""
        labels = self._group_labels(group_by)
        table = self.table
        column = None
        if labels is not None:
            column = group_by if isinstance(group_by, str) else "group"
            table[column] = np.repeat(labels, len(self.targets))
        return plot_report(layer_report(table, group_by=column), path, group_by=column, metrics=metrics)

    # -- store ------------------------------------------------------------------------------------------------------
    def save(self, store: str | os.PathLike | RunStore, name: str = STORE_NAME) -> RunStore:
        """Write to the run store as one atomic safetensors file (metadata embedded), keyed by row hashes."""
        store = store if isinstance(store, RunStore) else RunStore.for_output_dir(store)
        meta = {"targets": [t.__dict__ for t in self.targets], "info": self.info, "format": 1}
        arrays = {k: np.asarray(v, np.float64) for k, v in self.metrics.items()}
        arrays.update(
            loss=np.asarray(self.loss, np.float64),
            num_tokens=np.asarray(self.num_tokens, np.int64),
            row_hash=np.asarray(self.row_hash, np.int64),
            meta=np.frombuffer(json.dumps(meta, default=str).encode(), np.uint8).copy(),
        )
        if self.singular_values is not None:
            arrays["singular_values"] = np.asarray(self.singular_values, np.float32)
        store.save_arrays(name, arrays)
        if not store.exists():  # a fresh store: make it usable by DataSelector.from_run on these rows
            store.save_arrays(
                RunStore.ROWS, {"row_id": np.arange(self.num_rows, dtype=np.int64), "row_hash": arrays["row_hash"]}
            )
            store.write_manifest({"created_by": "gradient_spectra", "dataset": {"rows": self.num_rows}})
        return store

    @classmethod
    def load(
        cls, store: str | os.PathLike | RunStore, dataset: Dataset | None = None, name: str = STORE_NAME
    ) -> GradientSpectra:
        """Read spectra from a run store; with `dataset`, check its rows are the ones measured and keep its columns."""
        store = store if isinstance(store, RunStore) else RunStore.for_output_dir(store)
        arrays = store.load_arrays(name)
        meta = json.loads(arrays.pop("meta").tobytes().decode())
        spectra = cls(
            targets=[Target(**t) for t in meta["targets"]],
            metrics={k: arrays[k] for k in METRICS},
            loss=arrays["loss"],
            num_tokens=arrays["num_tokens"],
            row_hash=arrays["row_hash"],
            singular_values=arrays.get("singular_values"),
            info={**meta["info"], "store": str(store.path)},
        )
        if dataset is not None:
            spectra.check_rows(dataset, where=f"the '{name}' record at {store.path}")
            spectra.columns = _scalar_columns(dataset)
        return spectra

    def check_rows(self, dataset: Dataset, where: str = "these spectra") -> None:
        """Raise `StoreError` unless `dataset` has exactly the measured rows, in the same order."""
        if len(dataset) != self.num_rows:
            raise StoreError(
                f"{where} cover {self.num_rows} rows; the dataset has {len(dataset)}. "
                "Measure spectra on the same raw dataset you select from."
            )
        mismatched = np.flatnonzero(row_hashes(dataset) != self.row_hash)
        if len(mismatched):
            raise StoreError(
                f"{where} do not match this dataset: {len(mismatched)} of {self.num_rows} rows differ "
                f"(first rows: {mismatched[:5].tolist()}). Pass the same rows, in the same order."
            )


# -- report and plot -------------------------------------------------------------------------------------------------
def layer_report(table, group_by: str | None = None, metrics: Sequence[str] = METRICS):
    """Mean of each metric per (group,) layer and projection, NaN skipped; `rows` and `nan_<metric>` counts.

    `table` is a long DataFrame like `GradientSpectra.table` (columns `layer`, `projection`, the
    metrics, and `group_by` if given).
    """
    keys = ([group_by] if group_by is not None else []) + ["layer", "projection"]
    grouped = table.groupby(keys, sort=False, dropna=False)  # projections stay in the order measured
    out = grouped[list(metrics)].mean()
    out.insert(0, "rows", grouped.size())
    for m in metrics:
        out[f"nan_{m}"] = grouped[m].apply(lambda s: int(s.isna().sum()))
    out = out.reset_index()
    return out.sort_values(keys[:-1], kind="stable").reset_index(drop=True)


def plot_report(
    report,
    path: str | os.PathLike,
    group_by: str | None = None,
    metrics: Sequence[str] = ("nuclear_norm", "effective_rank"),
) -> str:
    """Draw `layer_report` output to a PNG (Agg, no global pyplot state) and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    projections = list(dict.fromkeys(report["projection"]))
    groups = [None] if group_by is None else list(dict.fromkeys(report[group_by]))
    fig = Figure(figsize=(3.2 * len(projections), 2.6 * len(metrics)), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), len(projections), squeeze=False, sharex=True)
    for i, metric in enumerate(metrics):
        for j, proj in enumerate(projections):
            ax = axes[i][j]
            part = report[report["projection"] == proj]
            for g in groups:
                line = part if g is None else part[part[group_by] == g]
                label = "all rows" if g is None else f"{group_by}={g}"
                ax.plot(line["layer"], line[metric], marker="o", label=label)
            ax.set_title(f"{proj}: {metric.replace('_', ' ')}", fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if i == len(metrics) - 1:
                ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    path = str(path)
    fig.savefig(path, dpi=110)
    return path


_GROUPABLE = {
    "string",
    "large_string",
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
}


def _scalar_columns(dataset: Dataset):
    """The dataset's string/bool/integer columns, to group rows by."""
    import pandas as pd

    keep = [c for c, f in dataset.features.items() if c not in ROW_COLUMNS and getattr(f, "dtype", None) in _GROUPABLE]
    return pd.DataFrame({c: dataset[c] for c in keep})


# -- computing -------------------------------------------------------------------------------------------------------
class _Capture:
    """Hooks that turn one forward/backward of a padded batch into every row's spectra for every matrix.

    One forward hook per module: a fused q/k/v weight's input is factored once, and its output
    gradient is split into the q, k and v rows of each block (`δ_t[q]`) before the core SVD.
    """

    def __init__(self, matrices: list[Matrix], dtype: torch.dtype):
        self.matrices, self.dtype = matrices, dtype
        self.mask: torch.Tensor | None = None
        self.r_inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.calls: dict[int, int] = {}
        self.sigma: list[torch.Tensor | None] = []
        by_module: dict[int, list[int]] = {}
        for j, matrix in enumerate(matrices):
            by_module.setdefault(id(matrix.module), []).append(j)
        self.handles = [
            matrices[js[0]].module.register_forward_hook(self._forward_hook(js)) for js in by_module.values()
        ]

    def start(self, mask: torch.Tensor) -> None:
        self.mask = mask.to(torch.bool).unsqueeze(-1)
        self.r_inputs.clear()
        self.calls = {}
        self.sigma = [None] * len(self.matrices)

    def _masked(self, a: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, a, torch.zeros((), dtype=a.dtype, device=a.device))

    def _per_token(self, a: torch.Tensor, name: str) -> torch.Tensor:
        """`a` as (batch, tokens, features); also for a module that sees it flattened to (batch·tokens, features)."""
        batch, tokens = self.mask.shape[:2]
        if a.dim() == 3 and a.shape[:2] == (batch, tokens):
            return a
        if a.dim() == 2 and a.shape[0] == batch * tokens:
            return a.reshape(batch, tokens, a.shape[1])
        raise NotImplementedError(f"{name} sees a tensor of shape {tuple(a.shape)}, not (batch, tokens, features)")

    def _forward_hook(self, js: list[int]):
        name = self.matrices[js[0]].target.name

        def hook(module, args, output):
            if self.mask is None:
                return
            self.calls[js[0]] = self.calls.get(js[0], 0) + 1
            if self.calls[js[0]] > 1:
                raise NotImplementedError(
                    f"{name} runs more than once per forward (shared weights); "
                    "its per-sample gradient is not a single Δᵀ X product."
                )
            if not output.requires_grad:
                raise RuntimeError(f"{name}: its output does not require grad")
            x = args[0]
            with torch.no_grad():
                cached = self.r_inputs.get(id(x))  # q, k and v read the same tensor: factor it once
                if cached is None:
                    cached = (x, _r_factor(self._masked(self._per_token(x.detach(), name)), self.dtype))
                    self.r_inputs[id(x)] = cached
            r_input = cached[1]
            output.register_hook(lambda g: self._on_grad(js, self._per_token(g, name), r_input))

        return hook

    def _on_grad(self, js: list[int], grad: torch.Tensor, r_input: torch.Tensor) -> None:
        with torch.no_grad():
            grad = self._masked(grad)
            for j in js:
                rows = self.matrices[j].rows
                delta = grad if rows is None else grad.index_select(-1, rows.to(grad.device))
                self.sigma[j] = _core_singular_values(delta, r_input, self.dtype)

    def stop(self) -> None:
        self.mask = None
        self.r_inputs.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _prepared_rows(
    dataset: Dataset, tokenizer, max_length: int | None, store: RunStore | None, formatting_func
) -> Rows:
    """The rows as the recorded trainer made them (its `RowProcessing` when `store` has one, else SFTTrainer's)."""
    processing = load_processing(store.path) if store is not None else RowProcessing()
    if max_length is not None:
        processing = processing.replace(max_length=max_length)
    if tokenizer is None:
        if "input_ids" not in dataset.column_names:
            raise ValueError("gradient_spectra needs tokenizer= for a dataset that is not tokenized yet")
        processing = processing.replace(format="tokenized", collator="trl")  # the rows' own ids and labels
    return prepare_rows(dataset, tokenizer, processing, formatting_func=formatting_func)


def gradient_spectra(
    model: nn.Module,
    dataset: Dataset,
    tokenizer=None,
    *,
    layers: Literal["all"] | int | Sequence[int] = "all",
    projections: Sequence[str] = ("q", "k", "v", "o"),
    modules: Sequence[str] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    padding_side: Literal["left", "right"] = "right",
    dtype: torch.dtype = torch.float64,
    keep_singular_values: bool = False,
    store: str | os.PathLike | RunStore | None = None,
    name: str = STORE_NAME,
    formatting_func: Callable[[dict], str] | None = None,
    progress: bool = False,
) -> GradientSpectra:
    """Gradient spectra of every row of `dataset` on the chosen weight matrices of `model`.

    The loss is the response-token loss (mean cross-entropy over completion tokens; all tokens of
    a `text` row), on the rows exactly as the recorded trainer made them (with `store=`, its recorded
    processing: chat template, masks, truncation; else SFTTrainer's defaults; `max_length` overrides).
    Singular values come from the factored gradient in `dtype` (float64 by default), one forward and
    one backward per batch; padding contributes nothing. With `store=` (a run's output_dir or a
    `RunStore`) the result is also written there, keyed by the dataset's row hashes, for the
    `spectral` selection method.

    `projections=("q", "k", "v", "o")` measures the same four matrices on every family, fused q/k/v
    weights split into their blocks (see `find_targets`). The model comes back as it came: the
    passes run under `plain_forward` (eval mode, activation checkpointing off, both restored on
    exit), no weight is written and no `.grad` is left behind. `formatting_func`: the recorded run's own,
    when it used one (with `store=`).
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gradient_spectra: dtype must be torch.float64 or torch.float32, not {dtype}")
    run_store = None if store is None else store if isinstance(store, RunStore) else RunStore.for_output_dir(store)
    rows = _prepared_rows(dataset, tokenizer, max_length, run_store, formatting_func)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    matrices = find_targets(model, layers, projections, modules)
    device = next(model.parameters()).device
    n, m = len(rows), len(matrices)
    metrics = {k: np.full((n, m), np.nan) for k in METRICS}
    loss = np.full(n, np.nan)
    num_tokens = np.zeros(n, np.int64)
    sigmas: list[tuple[list[int], list[np.ndarray]]] = []

    emb_out: list[torch.Tensor] = []

    def embedding_hook(module, args, out):
        if not out.requires_grad:  # frozen embeddings (LoRA): keep the first blocks' activations in the graph
            out = out.requires_grad_(True)
        emb_out.append(out)
        return out

    emb_handle = model.get_input_embeddings().register_forward_hook(embedding_hook)
    capture = _Capture(matrices, dtype)
    batches = iter_batches(rows, batch_size, pad_id, padding_side)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=(n + batch_size - 1) // batch_size, desc="gradient spectra")
    try:
        with plain_forward(model):  # eval, no checkpointing; mode and flags restored on exit
            for positions, batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                mask = batch["attention_mask"]
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # exact for left padding too
                emb_out.clear()
                capture.start(mask)
                with torch.enable_grad():
                    inputs = dict(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids)
                    out, kept = forward_at_labels(model, inputs, batch["labels"], use_cache=False)
                    row_loss, count = row_losses(out.logits, batch["labels"], kept)
                    total = row_loss[count > 0].sum()
                    if bool((count > 0).any()):
                        torch.autograd.grad(total, emb_out[-1])
                capture.stop()
                has = (count > 0).cpu().numpy()
                pos = np.asarray(positions)
                loss[pos[has]] = row_loss.detach().double().cpu().numpy()[has]
                num_tokens[pos] = count.cpu().numpy()
                lengths = mask.sum(-1).cpu().numpy()
                kept = []
                for j, sigma in enumerate(capture.sigma):
                    if sigma is None:  # no row of the batch has response tokens
                        sigma = torch.zeros(len(pos), 0, dtype=torch.float64)
                    values = spectral_metrics(sigma.cpu())
                    for k in METRICS:
                        metrics[k][pos[has], j] = values[k][has]
                    if keep_singular_values:  # rank <= the row's own length: drop the zeros padding adds
                        values = sigma.cpu().numpy().astype(np.float32)
                        values[np.arange(values.shape[1]) >= lengths[:, None]] = np.nan
                        values[~has] = np.nan
                        kept.append(values)
                if keep_singular_values:
                    sigmas.append((positions, kept))
    finally:
        capture.stop()
        capture.remove()
        emb_handle.remove()

    singular_values = None
    if keep_singular_values:
        width = max((s.shape[1] for _, kept in sigmas for s in kept), default=0)
        singular_values = np.full((n, m, width), np.nan, np.float32)
        for positions, kept in sigmas:
            for j, s in enumerate(kept):
                singular_values[np.asarray(positions), j, : s.shape[1]] = s
    zero = int(np.sum(np.isnan(metrics["effective_rank"]) & np.isfinite(loss)[:, None]))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    spectra = GradientSpectra(
        targets=[matrix.target for matrix in matrices],
        metrics=metrics,
        loss=loss,
        num_tokens=num_tokens,
        row_hash=row_hashes(dataset),
        singular_values=singular_values,
        columns=_scalar_columns(dataset),
        info={
            "model": getattr(getattr(base, "config", None), "_name_or_path", None) or type(base).__name__,
            "model_type": getattr(getattr(base, "config", None), "model_type", None),
            "peft": hasattr(model, "peft_config"),
            "dtype": str(dtype).removeprefix("torch."),
            "max_length": max_length,
            "rows_without_response_tokens": int(np.sum(num_tokens == 0)),
            "zero_gradients": zero,
        },
    )
    if store is not None:
        spectra.save(store, name=name)
    return spectra
