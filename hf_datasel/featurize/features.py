"""Per-sample gradient features of a dataset at a snapshot: computed in batches, stored, resumable, shardable.

Storage (one folder per dataset × snapshot × preconditioner × projector spec, under the store):

    features/<dataset key>/step-000010/<preconditioner>-<spec id>/
        meta.json      projector spec, step, learning rates, preconditioner, row count, complete flag
        unit.npy       (rows, k) float16 (spec.dtype) memory-mapped: each row's feature divided by its norm
        norms.npy      (rows,) float32: each row's feature norm
        loss.npy       (rows,) float32: each row's loss at the snapshot (the one whose gradient the feature is)
        shard-*-of-*/  work folders of unfinished or sharded runs: unit/norms/loss/rows.npy, progress.json (the
                       batch plan) and done.log (finished batch numbers, appended after the arrays are flushed)

Row i of the arrays is row i of the dataset. Storing unit vectors and norms apart keeps fp16 away
from the under/overflow that raw gradient values would hit; `raw = unit * norm`. A row whose
gradient is undefined (no label tokens, non-finite loss) is NaN in both files; a zero gradient
has norm 0 and a zero unit row. Nothing turns either into a number.

The dataset key hashes the tokenized rows (so it covers content, tokenizer and `max_length`).
Batches are planned once for the whole dataset (rows sorted by length, then cut into batches);
a shard is a contiguous range of those batches, so any number of processes computes exactly
the batches a single process would, and the merged files are identical to a single run.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from ..data import TRAINER_ROWS_FILE, Collator, load_processing, make_collator, prepare_rows, to_left_padding
from ..locks import FileLock
from ..model_state import checkpointing_off, plain_forward
from ..record.snapshot import read_snapshot_index
from ..store import RunStore, StoreError, atomic_path, broken_file, load_npy, read_json, write_json
from .grads import PerSampleGradients, Scratch
from .projector import SKETCH_KINDS, Projector, ProjectorKind, ProjectorSpec, SpecMismatchError
from .snapshots import (
    Snapshot,
    assign_snapshot,
    load_model,
    load_snapshot,
    load_tokenizer,
    snapshot_param_shapes,
    snapshot_steps,
)

Preconditioner = Literal["none", "adam", "adam_reference", "adam_factored"]
PRECONDITIONERS = ("none", "adam", "adam_reference", "adam_factored")
FEATURES_DIR = "features"
DONE_LOG = "done.log"
SHARD_ARRAYS = ("unit.npy", "norms.npy", "loss.npy")  # a shard's row files, in `_open_shard`'s order
# A 2-D weight's gradient is sketched from its factors (never formed) when d0·d1 ≥ this × k·log2(k):
# where the FFTs of the factored sketch cost less than forming the gradient (measured on CPU, see
# `hf-datasel bench perf`).
FACTOR_RATIO = 5.0


# -- Adam preconditioning -------------------------------------------------------------
@dataclass(frozen=True)
class AdamConstants:
    """A per-sample Adam direction is `(a1·g + b1·m) / (sqrt(a2·g² + b2·v + c) + eps)`.

    `m` and `v` are the optimizer's own moments, not copies (for a full model two copies would be as
    large as the snapshot's moments again): the bias corrections, and the reference form's ε inside
    the root (`c`), are folded into the scalars, and the scaled moments are made per block (P numbers,
    against the block's B·P), so the direction is a few in-place passes over a freshly computed block.

    `signs` (s1, s2), for a 2-D weight whose gradients come with the "tensor" hash's signs `s1[i]·s2[j]`
    on entry (i, j): `m` is signed the same way, which gives the signed direction (`g²` is unchanged).
    """

    a1: float
    m: torch.Tensor
    b1: float
    a2: float
    v: torch.Tensor
    b2: float
    c: float
    eps: float
    signs: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def create(cls, exp_avg, exp_avg_sq, step: int, betas, eps: float, form: str = "adam") -> AdamConstants:
        beta1, beta2 = betas
        if form == "adam_reference":  # LESS's code: m'/sqrt(v' + 1e-8), no bias correction
            return cls(1 - beta1, exp_avg, beta1, 1 - beta2, exp_avg_sq, beta2, 1e-8, 0.0)
        if form not in ("adam", "adam_factored"):
            raise ValueError(f"Adam form must be 'adam', 'adam_reference' or 'adam_factored', not {form!r}")
        t = int(step) + 1
        c1, c2 = 1 - beta1**t, 1 - beta2**t
        return cls((1 - beta1) / c1, exp_avg, beta1 / c1, (1 - beta2) / c2, exp_avg_sq, beta2 / c2, 0.0, eps)

    def scaled_moments(self, scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(b1·m, b2·v + c), in `scratch` slots 1 and 2 when given."""
        m_into, v_into = (None, None) if scratch is None else (
            scratch.take(self.m.shape, self.m.device, 1), scratch.take(self.v.shape, self.v.device, 2))  # fmt: skip
        if self.signs is None:
            scaled_m = torch.mul(self.m, self.b1, out=m_into)
        else:
            rows, cols = self.signs
            scaled_m = torch.mul(self.m, (rows * self.b1)[:, None], out=m_into).mul_(cols)
        scaled_v = torch.mul(self.v, self.b2, out=v_into)
        return scaled_m, scaled_v.add_(self.c) if self.c else scaled_v

    def apply_(self, g: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
        """The direction of each row of `g` (B, *shape), computed in place in `g` (5 passes; the one
        temporary, and the scaled moments, taken from `scratch` when given)."""
        usable = scratch if scratch is not None and g.dtype == torch.float32 == self.m.dtype == self.v.dtype else None
        m, v = self.scaled_moments(usable)
        into = None if usable is None else usable.take(g.shape, g.device)
        denominator = torch.addcmul(v, g, g, value=self.a2, out=into).sqrt_()
        if self.eps:
            denominator.add_(self.eps)
        return torch.add(m, g, alpha=self.a1, out=g).div_(denominator)

    def factored_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ρ, γ) with `1/(sqrt(v) + eps) ≈ ρ_i γ_j` for a 2-D weight (Adafactor's rank-1 second moment).

        `V = (sqrt(b2·v + c) + eps)²` is replaced by `r cᵀ / ΣV` (r, c its row and column sums), the
        per-sample `a2·g²` term is dropped: an approximation, exact when V is rank one.
        """
        second = (torch.mul(self.v, self.b2).add_(self.c).sqrt_() + self.eps).square_()
        rows, cols, total = second.sum(1), second.sum(0), second.sum()
        return rows.rsqrt(), cols.rsqrt() * total.sqrt()


def adam_precondition(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    betas: tuple[float, float],
    eps: float,
    form: Literal["adam", "adam_reference"] = "adam",
) -> torch.Tensor:
    """The Adam update direction a sample's gradient `grad` (B, *shape) would produce from the stored moments.

    `m' = β1 m + (1-β1) g`, `v' = β2 v + (1-β2) g²`. Form "adam" (default) is AdamW's own update at
    step `t = step + 1`: `m'/(1-β1^t) / (sqrt(v'/(1-β2^t)) + eps)`. Form "adam_reference" is the LESS
    reference code: `m' / sqrt(v' + 1e-8)` (no bias correction, epsilon inside the root).
    """
    return AdamConstants.create(exp_avg, exp_avg_sq, step, betas, eps, form).apply_(grad.float().clone())


# -- the batch featurizer ---------------------------------------------------------------
class Featurizer:
    """(B, k) gradient features of padded batches for one model at one snapshot.

    The model is used in place (eval mode, activation checkpointing off); `gradient_features`
    hands a model it was given back as it came. One forward and one backward per batch (see
    `grads.PerSampleGradients`). Each parameter's per-sample gradient block is preconditioned in
    place and projected as soon as it is complete, while it is still in cache (only one block is
    alive at a time); when the whole batch's gradients are small (B × P floats ≤ `fuse_bytes`, LoRA
    adapters usually) they are gathered and handled in a few large operations instead.

    With the "tensor" projector and preconditioner "none" or "adam_factored", large 2-D weights
    (d0·d1 ≥ FACTOR_RATIO·k·log2 k) are never formed: their sketch is computed from the
    per-token factors (`Projector.add_factored`). "adam_factored" is an approximation of "adam"
    (Adafactor-style second moments, see `AdamConstants.factored_scale`; 1-D parameters exact).
    On CPU, the other linear weights that the "tensor" hash pairs (`Projector.paired`: an even width of
    at least `PAIRED_MIN_COLUMNS`) are formed with the hash's signs on their factors and sketched by one
    complex scatter of column pairs (`Projector.add_paired`), for every preconditioner (exact Adam
    signs the first moment the same way).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        spec: ProjectorSpec,
        device: str | torch.device | None = None,
        fuse_bytes: int = 1 << 23,
    ):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        checkpointing_off(model)  # recomputed forwards would fire the capture hooks twice
        self.model = model.to(self.device).eval()
        self.engine = PerSampleGradients(self.model, spec.param_names)
        self.engine.scratch = Scratch()  # weight blocks are consumed at once (below), so one buffer serves all
        self._scratch = Scratch()  # the Adam direction's temporary and scaled moments
        if self.engine.shapes != dict(zip(spec.param_names, spec.param_shapes)):
            raise ValueError("the model's trainable parameter shapes differ from the projector spec's")
        self.preconditioner: Preconditioner = "none"
        self.fuse_bytes = fuse_bytes
        self._snapshot: Snapshot | None = None
        self.spec = spec  # builds the projector and the per-parameter plan

    @property
    def spec(self) -> ProjectorSpec:
        return self._spec

    @spec.setter
    def spec(self, spec: ProjectorSpec) -> None:
        self._spec = spec
        self.projector = Projector(spec, self.device)
        self._configure()

    def set_snapshot(self, snapshot: Snapshot | None, preconditioner: Preconditioner = "none") -> None:
        """Load `snapshot`'s weights into the model and use its moments for `preconditioner`."""
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, not {preconditioner!r}")
        if snapshot is not None:
            assign_snapshot(self.model, snapshot)
        if preconditioner != "none" and (snapshot is None or snapshot.exp_avg is None):
            raise StoreError(
                "Adam-preconditioned features need the snapshot's Adam moments; the run's optimizer kept none "
                "(use an Adam/AdamW optimizer, or preconditioner='none')."
            )
        self.preconditioner = preconditioner
        self._snapshot = snapshot
        self._configure()

    def _configure(self) -> None:
        """Per parameter: Adam constants, factored scales and which weights are sketched from factors."""
        snap, form = self._snapshot, self.preconditioner
        self._adam: dict[str, AdamConstants] = {}  # exact Adam, per parameter
        self._flat_adam: AdamConstants | None = None  # the same, concatenated (fused path)
        self._formed_scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # adam_factored, formed 2-D
        self._factor_scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # adam_factored, factored
        self._constant: torch.Tensor | None = None
        factored_ok = self.spec.kind == "tensor" and form in ("none", "adam_factored")
        linear = self.engine.factorable
        threshold = FACTOR_RATIO * self.spec.k * math.log2(max(2, self.spec.k))
        self.engine.factored = frozenset(
            n for n, s in zip(self.spec.param_names, self.spec.param_shapes)
            if factored_ok and n in linear and len(s) == 2 and s[0] * s[1] >= threshold
        )  # fmt: skip
        # embeddings: only the rows a sample's tokens touch are computed (any preconditioner, exactly)
        rows_ok = self.spec.kind in ("identity", *SKETCH_KINDS)
        self.engine.row_sparse = self.engine.row_sparse_able if rows_ok else frozenset()
        self._row_adam: dict[str, tuple[AdamConstants, torch.Tensor]] = {}  # exact Adam: constants, direction at g=0
        self._engine_scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # adam_factored's, on the factors
        # formed "tensor" weights get the hash's signs on their factors too (T·(d0 + d1) multiplies a row,
        # not a pass over the block), then one complex scatter
        paired_ok = self.device.type == "cpu"
        self._paired = frozenset(
            n for n in self.spec.param_names
            if paired_ok and n in linear and n not in self.engine.factored and self.projector.paired(n)
        )  # fmt: skip
        self.engine.weight_scales = {name: self.projector.sign_factors(name) for name in self._paired}
        if form == "none":
            return
        step = snap.optimizer_step or 0
        constant = self.projector.new_output(1)  # the part of every sample's direction that does not depend on it
        for name, shape in zip(self.spec.param_names, self.spec.param_shapes):
            m, v = snap.exp_avg[name].to(self.device), snap.exp_avg_sq[name].to(self.device)
            c = AdamConstants.create(m, v, step, snap.betas, snap.eps, form)
            if form != "adam_factored" or len(shape) != 2:
                self._adam[name] = replace(c, signs=self.engine.weight_scales.get(name))
                if name in self.engine.row_sparse:  # untouched rows: the direction of a zero gradient
                    at_zero = c.apply_(torch.zeros(1, *shape, device=self.device))
                    self.projector.add(constant, name, at_zero, keep=False)
                    self._row_adam[name] = (c, at_zero[0])
                continue
            rho, gamma = c.factored_scale()  # (a1·g + m) ⊙ ρ γᵀ: ρ·a1 on the rows, γ on the columns, m ⊙ ρ γᵀ once
            if name in self.engine.factorable or name in self.engine.row_sparse:
                # sketched from factors or rows (Featurizer), or formed from scaled factors (engine): no pass over G
                sketched = name in self.engine.factored or name in self.engine.row_sparse
                scales = (rho * c.a1, gamma)
                if sketched:
                    self._factor_scales[name] = scales
                else:
                    self._engine_scales[name] = scales
                    signs = self.engine.weight_scales.get(name, (1.0, 1.0))
                    self.engine.weight_scales[name] = (scales[0] * signs[0], scales[1] * signs[1])
                self.projector.add(constant, name, (c.m * (c.b1 * rho)[:, None] * gamma[None, :])[None], keep=False)
            else:
                scale = rho[:, None] * gamma[None, :]
                self._formed_scales[name] = (scale * c.a1, c.m * (scale * c.b1))
        if self._factor_scales or self._row_adam or self._engine_scales:
            self._constant = constant

    def _precondition_(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        if self.preconditioner == "none" or name in self._engine_scales:  # (scaled on the factors)
            return grads
        if name in self._formed_scales:  # adam_factored, 2-D: (a1·ρ γᵀ) ⊙ g + m ⊙ ρ γᵀ
            multiplier, offset = self._formed_scales[name]
            return grads.mul_(multiplier).add_(offset)
        return self._adam[name].apply_(grads, self._scratch)

    def batch_features(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features (B, k) float32, per-sample loss (B,), valid (B,)) for one padded batch."""
        batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        size = batch["input_ids"].shape[0]
        inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        small = size * self.spec.num_params * 4 <= self.fuse_bytes
        if small and not self.engine.factored and self.preconditioner != "adam_factored":
            return self._fused_features(size, inputs)
        projector = self.projector
        out = projector.new_output(size)
        signed = projector.signed_output(size) if self.spec.kind in SKETCH_KINDS else None
        paired = projector.paired_output(size) if self._paired else None

        def consume(name: str, grads: torch.Tensor) -> None:
            grads = self._precondition_(name, grads)
            if name in self._paired:  # formed with the hash's signs on its factors
                projector.add_paired(paired, name, grads)
            elif signed is not None:
                projector.add_signed(signed, name, grads)
            else:
                projector.add(out, name, grads)

        def consume_factors(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
            if name in self._factor_scales:  # adam_factored: ρ and a1 on the row factor, γ on the column factor
                row_scale, col_scale = self._factor_scales[name]
                a, b = a * row_scale, b * col_scale
            projector.add_factored(out, name, a, b)

        def consume_rows(name: str, ids: torch.Tensor, samples: torch.Tensor, values: torch.Tensor) -> None:
            if name in self._row_adam:  # exact Adam of the touched rows, less the constant part added below
                c, at_zero = self._row_adam[name]
                values = replace(c, m=c.m[ids], v=c.v[ids]).apply_(values).sub_(at_zero[ids])
            elif name in self._factor_scales:  # adam_factored: (a1·ρ_i γ_j) g_ij (m ⊙ ρ γᵀ is in the constant)
                row_scale, col_scale = self._factor_scales[name]
                values = values * row_scale[ids][:, None] * col_scale
            projector.add_rows(out, name, ids, samples, values)

        _, loss, valid = self.engine(
            *inputs, consume=consume, consume_factors=consume_factors, consume_rows=consume_rows
        )  # fmt: skip
        if signed is not None:
            out += projector.finish_signed(signed)
        if paired is not None:
            out += projector.finish_paired(paired)
        if self._constant is not None:
            out += self._constant
        return out, loss, valid

    def _fused_features(self, size: int, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Small models: gather the batch's (B, P) gradients, then precondition and project them at once."""
        buffer = torch.empty(size, self.spec.num_params, device=self.device)
        offsets = self.projector.offsets

        def gather(name: str, grads: torch.Tensor) -> None:
            start = offsets[name]
            buffer[:, start : start + grads[0].numel()] = grads.reshape(size, -1)

        # projected at once below: gradients without the hash's signs (nor adam_factored's scales: not fused)
        _, loss, valid = self.engine(*inputs, consume=gather, weight_scales={})
        if self.preconditioner != "none":
            if self._flat_adam is None:  # the per-parameter constants as one flat set, built on first use
                parts = [self._adam[n] for n in self.spec.param_names]
                flat = {key: torch.cat([getattr(c, key).reshape(-1) for c in parts]) for key in ("m", "v")}
                self._flat_adam = replace(parts[0], m=flat["m"], v=flat["v"], signs=None)  # same scalars
            self._flat_adam.apply_(buffer)
        return self.projector.project_flat(buffer), loss, valid


# -- planning and storage ---------------------------------------------------------------
def dataset_key(rows: list[dict[str, list[int]]]) -> str:
    """A content hash of tokenized rows (covers the dataset, the tokenizer and max_length)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray([len(r["input_ids"]) for r in rows], np.int64).tobytes())
    for key in ("input_ids", "labels"):
        h.update(np.concatenate([np.asarray(r[key], np.int64) for r in rows]).tobytes())
    return h.hexdigest()


def plan_batches(rows: list[dict[str, list[int]]], batch_size: int) -> list[list[int]]:
    """Row positions of every batch: rows sorted (stably) by length, then cut into batches."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    order = np.argsort(np.asarray([len(r["input_ids"]) for r in rows]), kind="stable").tolist()
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def shard_batches(num_batches: int, index: int, num_shards: int) -> range:
    """The contiguous range of batch numbers that shard `index` of `num_shards` computes."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} is not in [0, {num_shards})")
    return range(index * num_batches // num_shards, (index + 1) * num_batches // num_shards)


@dataclass
class FeatureSet:
    """Stored gradient features of one dataset at one snapshot (row i = dataset row i).

    Attributes:
        unit: (rows, k) memory-mapped unit-normalized features (NaN rows: undefined gradient).
        norms: (rows,) float32 feature norms (NaN: undefined, 0: zero gradient).
        spec: the projector spec; compare two sets with `spec.check_same`.
        step, lr, lr_mean: the snapshot's step, learning rate, and mean learning rate since the previous one.
        weight: lr_mean normalized over the snapshots returned together (set by `gradient_features`).
        preconditioner: "none", "adam", "adam_reference" or "adam_factored".
        loss: (rows,) float32 each row's loss at the snapshot (NaN: no label token); None in a cache written
            before the library stored it.
    """

    path: Path
    spec: ProjectorSpec
    step: int
    lr: float
    lr_mean: float
    preconditioner: str
    unit: np.ndarray
    norms: np.ndarray
    meta: dict[str, Any]
    weight: float = 1.0
    loss: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureSet:
        path = Path(path)
        meta = _read_meta(path)
        if not meta.get("complete"):
            raise StoreError(f"features at {path} are not complete; run featurization again to finish them.")
        spec = ProjectorSpec.from_dict(meta["spec"])
        unit = load_npy(path / "unit.npy", _redo(path), mmap_mode="r")
        norms = load_npy(path / "norms.npy", _redo(path))
        loss = load_npy(path / "loss.npy", _redo(path)) if (path / "loss.npy").exists() else None
        n = meta["num_rows"]
        arrays = [("unit.npy", unit, (n, spec.k)), ("norms.npy", norms, (n,)), ("loss.npy", loss, (n,))]
        for name, array, shape in arrays:
            if array is not None and array.shape != shape:  # a file of another run or version in this folder
                raise broken_file(path / name, f"shape {array.shape}, meta.json says {shape}", _redo(path))
        return cls(
            path=path,
            spec=spec,
            step=int(meta["step"]),
            lr=float(meta["lr"]),
            lr_mean=float(meta["lr_mean"]),
            preconditioner=meta["preconditioner"],
            unit=unit,
            norms=norms,
            meta=meta,
            loss=loss,
        )

    @property
    def num_rows(self) -> int:
        return len(self.norms)

    def raw(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """float32 features (unit × norm) of `rows` (all rows by default)."""
        rows = slice(None) if rows is None else rows
        return np.asarray(self.unit[rows], np.float32) * self.norms[rows, None]

    def valid_rows(self) -> np.ndarray:
        """Bool mask of rows with a defined gradient (finite norm)."""
        return np.isfinite(self.norms)


def _read_meta(folder: Path) -> dict[str, Any]:
    """A feature folder's meta.json; a `StoreError` naming it when it is torn or not JSON."""
    return read_json(folder / "meta.json", _redo(folder))


def _redo(folder: Path) -> str:
    return f"delete {folder} and run the featurization again (it is a cache: the rest of the store is untouched)"


def _is_complete(folder: Path) -> bool:
    return (folder / "meta.json").exists() and bool(_read_meta(folder).get("complete"))


def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # Windows: no pwrite (one writer per shard file, so seek + write is safe)
    return os.write(fd, data)


class _RowFile:
    """Rows of an existing .npy array on disk, written in place with `os.pwrite`.

    The rows go to the page cache, not into this process's memory (a memmap's written pages stay in
    its resident set, so featurizing a large dataset would look like holding all its features).
    """

    def __init__(self, path: Path):
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # the header: shape, dtype, data offset
        self.shape, self.dtype, self._offset = array.shape, array.dtype, array.offset
        del array
        self._row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        self._fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """`array[rows] = values`, one write per run of rows consecutive both in the file and in `values`."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if not len(values):
            return
        order = np.argsort(rows, kind="stable")  # ascending file rows: sequential writes
        sorted_rows = np.asarray(rows)[order]
        breaks = (np.flatnonzero((np.diff(sorted_rows) != 1) | (np.diff(order) != 1)) + 1).tolist()
        for start, end in zip([0, *breaks], [*breaks, len(order)]):
            first = int(order[start])
            data = memoryview(values[first : first + end - start]).cast("B")
            offset = self._offset + int(sorted_rows[start]) * self._row_bytes
            while data:  # a write may write less than asked
                written = _pwrite(self._fd, data, offset)
                data, offset = data[written:], offset + written

    def sync(self) -> None:
        getattr(os, "fdatasync", os.fsync)(self._fd)  # on disk before `done.log` says so (macOS: no fdatasync)

    def close(self) -> None:
        os.close(self._fd)


def _open_shard(
    folder: Path, rows: np.ndarray, spec: ProjectorSpec, plan_info: dict
) -> tuple[list[_RowFile], set[int]]:
    """Open (or create) a shard's arrays; returns ([unit, norms, loss], done batch numbers)."""
    progress_path = folder / "progress.json"
    if progress_path.exists():
        try:  # a shard folder is scratch: one torn by a crash or a full disk is started over
            progress = read_json(progress_path, "")
            if progress.get("plan") == plan_info:
                files = [_RowFile(folder / name) for name in SHARD_ARRAYS]
                if [f.shape for f in files] == [(len(rows), spec.k), (len(rows),), (len(rows),)]:
                    return files, _done_batches(folder)
                for f in files:
                    f.close()
        except (StoreError, ValueError, OSError):  # (also a shard of an older version, without loss.npy)
            pass
        shutil.rmtree(folder)  # another batch plan, or torn: its batches are not ours to reuse
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "rows.npy", rows)
    unit = np.lib.format.open_memmap(  # a sparse file of the right size: nothing is written yet
        folder / "unit.npy", mode="w+", dtype=np.dtype(spec.dtype), shape=(len(rows), spec.k)
    )
    del unit
    for name in SHARD_ARRAYS[1:]:
        np.save(folder / name, np.full(len(rows), np.nan, np.float32))
    (folder / DONE_LOG).write_text("")
    write_json(progress_path, {"plan": plan_info})
    return [_RowFile(folder / name) for name in SHARD_ARRAYS], set()


def _done_batches(folder: Path) -> set[int]:
    """Batch numbers recorded as finished in a shard's append-only log (a torn last line is ignored)."""
    path = folder / DONE_LOG
    if not path.exists():
        return set()
    text = path.read_text()
    lines = text.split("\n")[:-1]  # only lines that were terminated
    return {int(line) for line in lines if line.strip().isdigit()}  # anything else: that batch is redone


def _mark_done(folder: Path, batches: Sequence[int]) -> None:
    with open(folder / DONE_LOG, "a") as f:  # append-only: O(1) per batch, unlike rewriting a list
        f.write("".join(f"{b}\n" for b in batches))  # a torn last line is ignored on reading


def _write_batch(
    files: list[_RowFile], local: np.ndarray, feats: torch.Tensor, loss: torch.Tensor, valid: torch.Tensor
) -> None:
    unit, norms, losses = files
    feats = feats.detach().float()
    norm = torch.linalg.vector_norm(feats, dim=1)
    ok = valid & torch.isfinite(norm)
    divisor = torch.where(ok, torch.where(norm > 0, norm, 1.0), float("nan"))  # NaN: an undefined gradient
    u = torch.empty(feats.shape, dtype=getattr(torch, unit.dtype.name), device=feats.device)
    torch.div(feats, divisor[:, None], out=u)  # divided and cast in one pass, on the device
    unit.write(local, u.cpu().numpy())
    norms.write(local, torch.where(ok, norm, float("nan")).cpu().numpy())
    losses.write(local, loss.detach().float().cpu().numpy())


def featurize_rows(
    featurizer: Featurizer,
    rows: list[dict[str, list[int]]],
    folder: str | os.PathLike,
    meta: dict[str, Any],
    *,
    collate: Collator,
    batch_size: int = 16,
    padding_side: Literal["left", "right"] = "right",
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    flush_every: int = 64,
    flush_bytes: int = 64 << 20,
) -> dict[str, int]:
    """Featurize prepared `rows` into `folder` (shard `shard` of the batch plan); resumable.

    `collate` turns a list of rows into a batch the way the recorded trainer's collator did
    (`data.make_collator`); `padding_side="left"` moves its padding to the left (results do not change).

    Finished batches are appended to the shard's `done.log` after the arrays are flushed, every
    `flush_every` batches or `flush_bytes` of features (and at the end), so a rerun after an
    interruption (even `kill -9`) recomputes only the batches since the last flush, bit for bit.
    When every shard is done, the shards are merged into `unit.npy`/`norms.npy`/`loss.npy` and `meta.json` is
    marked complete.
    Returns counts: `batches_computed`, `batches_skipped`, `merged` (0/1).
    """
    folder = Path(folder)
    index, num_shards = shard
    plan = plan_batches(rows, batch_size)
    mine = shard_batches(len(plan), index, num_shards)
    shard_rows = np.sort(np.asarray([p for b in mine for p in plan[b]], np.int64))
    plan_info = {"batch_size": batch_size, "num_rows": len(rows), "num_batches": len(plan), "num_shards": num_shards}
    work = folder / f"shard-{index:03d}-of-{num_shards:03d}"
    stats = {"batches_computed": 0, "batches_skipped": 0, "merged": 0}
    if _is_complete(folder):
        stats["batches_skipped"] = len(mine)
        return stats
    write_json(folder / "meta.json", {**meta, "complete": False, "num_rows": len(rows), "plan": plan_info})
    files, done = _open_shard(work, shard_rows, featurizer.spec, plan_info)
    todo = [b for b in mine if b not in done]
    stats["batches_skipped"] = len(mine) - len(todo)
    desc = f"features @ step {meta.get('step')} ({meta.get('preconditioner')})"
    pending: list[int] = []  # written to the memmaps, not yet flushed and logged
    pending_bytes = 0
    row_bytes = featurizer.spec.k * np.dtype(featurizer.spec.dtype).itemsize + 8

    def flush() -> None:
        nonlocal pending_bytes
        if pending:
            for f in files:
                f.sync()
            _mark_done(work, pending)  # only after the arrays: a lost line only means recomputing a batch
            done.update(pending)
            pending.clear()
        pending_bytes = 0

    try:
        bars = progress and hf_logging.is_progress_bar_enabled()  # transformers' switch turns ours off too
        for b in tqdm(todo, desc=desc, disable=not bars, unit="batch"):
            positions = plan[b]
            batch = collate([rows[i] for i in positions])
            if padding_side == "left":
                batch = to_left_padding(batch)
            feats, loss, valid = featurizer.batch_features(batch)
            _write_batch(files, np.searchsorted(shard_rows, positions), feats, loss, valid)
            pending.append(b)
            pending_bytes += len(positions) * row_bytes
            if len(pending) >= flush_every or pending_bytes >= flush_bytes:
                flush()
            stats["batches_computed"] += 1
    finally:  # an exception or Ctrl-C keeps every finished batch; only a kill loses the unflushed ones
        try:
            flush()
        finally:
            for f in files:
                f.close()
    if merge_shards(folder, raise_if_incomplete=False):
        stats["merged"] = 1
    return stats


def merge_shards(folder: str | os.PathLike, raise_if_incomplete: bool = True) -> bool:
    """Merge a feature folder's finished shards into its row files (`SHARD_ARRAYS`) in row order; True when merged."""
    folder = Path(folder)
    meta = _read_meta(folder)
    if meta.get("complete"):
        return True
    plan = meta["plan"]
    num_shards = plan["num_shards"]
    works = [folder / f"shard-{i:03d}-of-{num_shards:03d}" for i in range(num_shards)]
    missing = []
    for i, w in enumerate(works):
        p = w / "progress.json"
        try:
            progress = read_json(p, "") if p.exists() else None
        except StoreError:
            progress = None  # torn: that shard is not finished, and its next run starts it over
        expected = set(shard_batches(plan["num_batches"], i, num_shards))
        arrays = all((w / name).exists() for name in SHARD_ARRAYS)  # (a one-shard merge moves them)
        if progress is None or progress["plan"] != plan or not arrays or not expected <= _done_batches(w):
            missing.append(i)
    if missing:
        if raise_if_incomplete:
            raise StoreError(f"features at {folder}: shards {missing} of {num_shards} are not finished yet.")
        return False
    # one merger when shards finish together; a dead merger's lock is taken over, a live one waited for
    with FileLock(folder / "merge.lock"):
        if _read_meta(folder).get("complete"):
            return True  # another process merged (and removed the shards) while we waited for the lock
        _merge(folder, meta, works)
    return True


def _merge(folder: Path, meta: dict[str, Any], works: list[Path]) -> None:
    plan = meta["plan"]
    spec = ProjectorSpec.from_dict(meta["spec"])
    n = plan["num_rows"]
    if len(works) == 1 and len(np.load(works[0] / "rows.npy", mmap_mode="r")) == n:
        # one shard holds every row in row order already: move its files instead of copying them
        for name in SHARD_ARRAYS:
            os.replace(works[0] / name, folder / name)
        write_json(folder / "meta.json", {**meta, "complete": True})
        shutil.rmtree(works[0], ignore_errors=True)
        return
    with ExitStack() as stack:
        tmp = {name: stack.enter_context(atomic_path(folder / name)) for name in SHARD_ARRAYS}
        unit = np.lib.format.open_memmap(tmp["unit.npy"], mode="w+", dtype=np.dtype(spec.dtype), shape=(n, spec.k))
        per_row = {name: np.full(n, np.nan, np.float32) for name in SHARD_ARRAYS[1:]}  # norms, losses
        for w in works:
            rows = np.load(w / "rows.npy")
            part = np.load(w / "unit.npy", mmap_mode="r")
            for start in range(0, len(rows), 65536):
                unit[rows[start : start + 65536]] = part[start : start + 65536]
            for name, values in per_row.items():
                values[rows] = np.load(w / name)
        unit.flush()
        del unit
        for name, values in per_row.items():
            with open(tmp[name], "wb") as f:
                np.save(f, values)
    write_json(folder / "meta.json", {**meta, "complete": True})
    for w in works:
        shutil.rmtree(w, ignore_errors=True)


# -- the public entry point ---------------------------------------------------------------
def gradient_features(
    store: RunStore,
    dataset: Dataset,
    *,
    preconditioner: Preconditioner = "none",
    k: int | None = 8192,
    seed: int = 0,
    kind: ProjectorKind = "tensor",
    dtype: str = "float16",
    steps: Sequence[int] | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    padding_side: Literal["left", "right"] = "right",
    model: torch.nn.Module | None = None,
    tokenizer=None,
    data_collator: Collator | None = None,
    formatting_func: Callable[[dict], str] | None = None,
    device: str | torch.device | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> list[FeatureSet] | None:
    """Per-sample gradient features of `dataset` at each snapshot of the run in `store`, cached in the store.

    This is the one API gradient-based methods call:

    * LESS / G2IS: `gradient_features(store, train, preconditioner="adam", k=...)` and
      `gradient_features(store, targets, preconditioner="none", k=...)` (same k and seed) give, per
      snapshot, Adam-preconditioned train features and plain target features; `FeatureSet.weight`
      is the snapshot's learning-rate weight (mean LR since the previous snapshot, normalized to sum 1).
    * Swift Study / RelInf: `gradient_features(store, probes, k=None)` gives exact plain gradients
      (`FeatureSet.raw()` for inner products), or pass `k` for projected ones.

    Args:
        store: the run store (`RunStore.for_output_dir(output_dir)`), holding snapshots from SnapshotCallback.
        dataset: raw rows in any format the recorded trainer accepts (text, prompt/completion, conversational,
            `messages`, pre-tokenized); they become model inputs exactly as the trainer made them
            (`data.prepare_rows` with the run's recorded `RowProcessing`). Other columns are ignored.
        preconditioner: "none" (plain gradients), "adam" (bias-corrected AdamW update, ε outside the root),
            "adam_reference" (the LESS reference `m'/sqrt(v'+1e-8)`) or "adam_factored" (an approximation
            of "adam" with Adafactor-style row/column second moments, so that large weight matrices are
            sketched from their factors instead of formed: the fast form for full models).
        k: projection dimension; `None` for exact features (every trainable parameter, no projection).
        seed, kind, dtype: the projector (`ProjectorSpec`); features of different specs are never mixed. The
            default kind "tensor" is a CountSketch whose hash lets a weight matrix's per-sample gradient be
            sketched from its factors (done where cheaper: d_out·d_in ≥ FACTOR_RATIO·k·log2 k, with
            preconditioner "none" or "adam_factored"), and a formed one with one complex scatter of its
            column pairs (on CPU; half the adds of "sparse"); "sparse" is a plain CountSketch.
        steps: snapshot steps (default: all).
        batch_size, padding_side: batching (results do not depend on padding).
        max_length: truncation; default (None) the recorded trainer's own.
        model, tokenizer: overrides; by default both are rebuilt from the store with `from_pretrained`.
            A model passed in is handed back as it came (weights, train/eval mode, activation
            checkpointing), though it takes each snapshot's weights meanwhile. The cache does not key on
            it (its frozen weights must match the run), only on its precision (`compute_dtype`): a model with
            bf16 weights computes in bf16, and those features are kept apart from the store model's fp32 ones.
        data_collator: the recorded run's collator, when it was one the store cannot rebuild (a custom one).
        formatting_func: the recorded run's `formatting_func`, when it used one (a store cannot keep a function);
            rows the trainer trained on need none, other rows (targets, probes) do.
        device: default the model's device when `model` is given, else CUDA when available, else CPU.
        shard: `(index, num_shards)` to compute one shard (for several processes); the call that
            finishes the last shard merges. Returns None while shards are missing.

    Returns one `FeatureSet` per snapshot (ascending step), or None for an unfinished sharded run.
    Rows whose gradient is undefined are NaN; the caller decides how to leave them out.
    Features are identical whatever the sharding; on CPU also bit for bit across runs (on GPU, up
    to the nondeterminism of the model's own backward kernels).
    """
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, not {preconditioner!r}")
    available = snapshot_steps(store)
    if not available:
        raise StoreError(
            f"The store at {store.path} has no snapshots: add SnapshotCallback() to the training run's callbacks."
        )
    steps = available if steps is None else [int(s) for s in steps]
    unknown = sorted(set(steps) - set(available))
    if unknown:
        raise StoreError(f"no snapshot at step(s) {unknown}; the run has snapshots at {available}.")
    trainer_rows = store.path / TRAINER_ROWS_FILE if tokenizer is None else None  # the trainer's own rows
    tokenizer = load_tokenizer(store, tokenizer)
    processing = load_processing(store.path)
    if max_length is not None:
        processing = processing.replace(max_length=max_length)
    rows = prepare_rows(
        dataset, tokenizer, processing, cache_dir=store.path / FEATURES_DIR / "rows", trainer_rows=trainer_rows,
        formatting_func=formatting_func,
    )  # fmt: skip
    collate = make_collator(processing, tokenizer, data_collator)
    key = dataset_key(rows)
    shard = shard or (0, 1)
    results: list[FeatureSet] = []
    finished = True
    snapshot_params = {n for e in read_snapshot_index(store) for n in e["param_names"]}
    # a model passed in takes snapshot weights while we work; it comes back exactly as it was. One whose weights
    # are not all fp32 (a bf16 base) computes in its own precision: those features are kept apart
    precision = compute_dtype(model)
    tag = "" if precision == "float32" else f"-{precision}"
    with plain_forward(model, keep_weights=snapshot_params) if model is not None else nullcontext():
        featurizer: Featurizer | None = None
        for step in steps:
            kind_k = kind if k else "identity"
            shapes = snapshot_param_shapes(store, step)  # the header only: cached features read no weights
            spec = ProjectorSpec.create(shapes, k, seed=seed, kind=kind_k, dtype=dtype)
            folder = store.path / FEATURES_DIR / key / f"step-{step:06d}" / f"{preconditioner}-{spec.spec_id}{tag}"
            if not _is_complete(folder):
                snapshot = load_snapshot(store, step)
                if featurizer is None:
                    featurizer = Featurizer(load_model(store, model), spec, _device_for(model, device))
                elif featurizer.spec != spec:
                    featurizer.spec = spec
                featurizer.set_snapshot(snapshot, preconditioner)
                meta = {
                    "spec": spec.to_dict(),
                    "step": step,
                    "lr": snapshot.lr,
                    "lr_mean": snapshot.lr_mean,
                    "preconditioner": preconditioner,
                    "dataset_key": key,
                    "processing": processing.to_dict(),
                    "padding_side": padding_side,
                    "compute_dtype": precision,
                }
                stats = featurize_rows(
                    featurizer, rows, folder, meta, collate=collate, batch_size=batch_size,
                    padding_side=padding_side, shard=shard, progress=progress,
                )  # fmt: skip
                if not stats["merged"]:
                    finished = False
                    continue
            results.append(FeatureSet.open(folder))
    if not finished:
        if shard == (0, 1):  # one process computed every batch, so the merge ran (or raised)
            raise StoreError(f"features of the dataset were not merged under {store.path / FEATURES_DIR / key}")
        return None
    total = sum(r.lr_mean for r in results)
    for r in results:
        r.weight = r.lr_mean / total if total > 0 else 1.0 / len(results)
    return results


def _device_for(model: torch.nn.Module | None, device: str | torch.device | None) -> torch.device:
    """`device`; else a model's own device (a user's model is never moved); else CUDA when available."""
    if device is not None:
        return torch.device(device)
    if model is not None:
        return next(model.parameters()).device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(model: torch.nn.Module | None) -> str:
    """The precision gradients are computed in: float32 for the store's model (loaded in fp32), else the lowest of a
    passed model's floating weights (a bf16 base with fp32 adapters computes in bf16); 32 bits or more is float32."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()} if model is not None else set()
    lowest = min(dtypes, key=lambda d: torch.finfo(d).bits, default=torch.float32)
    return str(lowest).removeprefix("torch.") if torch.finfo(lowest).bits < 32 else "float32"


def check_same_space(*feature_sets: FeatureSet) -> None:
    """Raise `SpecMismatchError` unless all feature sets share one projector spec and one compute precision."""
    for other in feature_sets[1:]:
        feature_sets[0].spec.check_same(other.spec)
        ours, theirs = (f.meta.get("compute_dtype", "float32") for f in (feature_sets[0], other))
        if ours != theirs:
            raise SpecMismatchError(
                f"features computed in {ours} ({feature_sets[0].path}) and in {theirs} ({other.path}) are not "
                "comparable: featurize both through the same model (model=, or none for the store's fp32 one)"
            )


def cosine_tolerance(k: int | None, z: float = 4.0) -> float:
    """The projector's stated tolerance on cosines at dimension `k` (0 for exact features)."""
    return 0.0 if k is None else z * math.sqrt(2.0 / k)
