"""Seeded random projections of per-sample gradients, described by a spec stored with the features.

A projected feature is `g @ R` with `R` a (P, k) random matrix scaled by `1/sqrt(k)`, so inner
products are preserved in expectation (Johnson-Lindenstrauss). `R` is never held whole for a
large model: it is cut into parameter blocks (one per named parameter) and each block into row
chunks, and every chunk is generated on the CPU from a seed derived from (seed, parameter name,
chunk index). The same spec therefore gives bit-identical matrices on any machine or GPU model,
whatever order blocks are visited in, and whether or not chunks are cached.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

ProjectorKind = Literal["identity", "sparse", "rademacher", "gaussian"]
CHUNK_ELEMENTS = 1 << 22  # one generated chunk holds at most this many numbers (16 MiB of fp32)


class SpecMismatchError(ValueError):
    """Features made with different projector specs (or parameters) were about to be mixed."""


@dataclass(frozen=True)
class ProjectorSpec:
    """Everything that determines a feature space: two feature sets can be compared only if their specs are equal.

    Attributes:
        kind: "identity" (exact mode: the full gradient, k = number of parameters);
            "sparse" (default: a CountSketch, each coordinate added with a random sign to one random
            output — O(P) work per sample instead of O(P·k), and the same variance bound as a dense
            JL projection: Var <Rx, Ry> ≤ (|x|²|y|² + <x,y>²)/k);
            "rademacher" (dense ±1/sqrt(k)) or "gaussian" (dense N(0, 1/k)).
        k: feature dimension.
        seed: projector seed.
        dtype: dtype the unit-normalized features are stored in ("float16" or "float32").
        param_names: the trainable parameters, in the order their blocks are concatenated.
        param_shapes: their shapes.
        chunk_rows: rows of R generated per chunk (fixed by k, so part of the spec).
    """

    kind: ProjectorKind
    k: int
    seed: int
    dtype: str
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    chunk_rows: int = 0
    version: int = 1

    @classmethod
    def create(
        cls,
        param_shapes: dict[str, tuple[int, ...]],
        k: int | None,
        seed: int = 0,
        kind: ProjectorKind = "sparse",
        dtype: str = "float16",
    ) -> ProjectorSpec:
        """A spec over `param_shapes` (name -> shape, in order); `k=None` means exact mode (no projection)."""
        if dtype not in ("float16", "float32"):
            raise ValueError(f"feature dtype must be 'float16' or 'float32', not {dtype!r}")
        names = tuple(param_shapes)
        shapes = tuple(tuple(int(s) for s in param_shapes[n]) for n in names)
        total = sum(math.prod(s) for s in shapes)
        if k is None or kind == "identity":
            return cls("identity", total, int(seed), dtype, names, shapes, 0)
        if kind not in ("sparse", "rademacher", "gaussian"):
            raise ValueError(f"projector kind must be 'identity', 'sparse', 'rademacher' or 'gaussian', not {kind!r}")
        if int(k) <= 0:
            raise ValueError(f"k must be positive, not {k}")
        rows = CHUNK_ELEMENTS if kind == "sparse" else max(1, CHUNK_ELEMENTS // int(k))
        return cls(kind, int(k), int(seed), dtype, names, shapes, rows)

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["param_names"] = list(self.param_names)
        out["param_shapes"] = [list(s) for s in self.param_shapes]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProjectorSpec:
        d = dict(d)
        d["param_names"] = tuple(d["param_names"])
        d["param_shapes"] = tuple(tuple(s) for s in d["param_shapes"])
        return cls(**d)

    @property
    def spec_id(self) -> str:
        """A short content hash of the spec, used to name feature folders."""
        payload = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.blake2b(payload, digest_size=6).hexdigest()

    def cosine_tolerance(self, z: float = 4.0) -> float:
        """Bound on |projected cosine − exact cosine| that holds for all but a ~z-sigma tail of pairs.

        For a JL projection the error of a cosine has standard deviation at most sqrt((1 + cos²) / k)
        ≤ sqrt(2 / k); exact mode has tolerance 0.
        """
        return 0.0 if self.kind == "identity" else z * math.sqrt(2.0 / self.k)

    def check_same(self, other: ProjectorSpec, what: str = "features") -> None:
        """Raise `SpecMismatchError` unless `other` describes the same feature space."""
        if self != other:
            diffs = [
                f"{key}: {a!r} != {b!r}"
                for key, a, b in ((f, getattr(self, f), getattr(other, f)) for f in self.__dataclass_fields__)
                if a != b
            ]
            short = [d if len(d) < 160 else d[:157] + "..." for d in diffs]
            raise SpecMismatchError(
                f"Cannot mix {what} made with different projector specs ({'; '.join(short)}). "
                "Featurize both with the same k, seed, kind, dtype and trainable parameters."
            )


@contextmanager
def _deterministic(enabled: bool):
    """Turn on PyTorch's deterministic algorithms for the block (restoring the previous mode)."""
    if not enabled or torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False, warn_only=warn_only)


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Projector:
    """Applies a `ProjectorSpec` to per-sample gradient blocks, accumulating (B, k) features.

    Chunks of R are cached on `device` while their total size stays under `cache_bytes`
    (so a small model never regenerates them); beyond that they are regenerated per batch,
    so memory stays bounded by one chunk for any model size.
    """

    def __init__(self, spec: ProjectorSpec, device: torch.device | str = "cpu", cache_bytes: int = 1 << 30):
        self.spec = spec
        self.device = torch.device(device)
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self._cached_bytes = 0
        self._shapes = dict(zip(spec.param_names, spec.param_shapes))
        offsets, start = {}, 0
        for name, shape in self._shapes.items():
            offsets[name] = start
            start += math.prod(shape)
        self.offsets = offsets
        self._full_sparse: tuple[torch.Tensor, torch.Tensor] | None = None

    def chunk(self, name: str, index: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rows [index*chunk_rows, ...) of parameter `name`'s block of R: a (rows, k) float32 matrix,
        or for "sparse" the (output index, sign) of each row."""
        key = (name, index)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        spec = self.spec
        numel = math.prod(self._shapes[name])
        rows = min(spec.chunk_rows, numel - index * spec.chunk_rows)
        gen = torch.Generator(device="cpu").manual_seed(_chunk_seed(spec.seed, name, index))
        if spec.kind == "sparse":
            target = torch.randint(0, spec.k, (rows,), generator=gen, dtype=torch.int64)
            sign = torch.randint(0, 2, (rows,), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
            mat = (target.to(self.device), sign.to(self.device))
            size = rows * 12
            if self._cached_bytes + size <= self.cache_bytes:
                self._cache[key] = mat
                self._cached_bytes += size
            return mat
        if spec.kind == "rademacher":
            mat = torch.randint(0, 2, (rows, spec.k), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
            mat.mul_(1.0 / math.sqrt(spec.k))
        else:
            mat = torch.randn((rows, spec.k), generator=gen, dtype=torch.float32).mul_(1.0 / math.sqrt(spec.k))
        mat = mat.to(self.device)
        size = mat.numel() * 4
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = mat
            self._cached_bytes += size
        return mat

    def new_output(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.spec.k, dtype=torch.float32, device=self.device)

    def add(self, out: torch.Tensor, name: str, grads: torch.Tensor) -> None:
        """Add the projection of one parameter's per-sample gradients (B, *shape) into `out` (B, k)."""
        flat = grads.reshape(grads.shape[0], -1).float()
        if self.spec.kind == "identity":
            start = self.offsets[name]
            out[:, start : start + flat.shape[1]] = flat
            return
        rows = self.spec.chunk_rows
        for index, start in enumerate(range(0, flat.shape[1], rows)):
            if self.spec.kind == "sparse":
                target, sign = self.chunk(name, index)
                with _deterministic(out.is_cuda):  # CUDA's default index_add_ sums in a random order
                    out.index_add_(1, target, flat[:, start : start + rows] * sign)
            else:
                out.addmm_(flat[:, start : start + rows], self.chunk(name, index))

    def project_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Project (B, P) gradients laid out in spec order (the same result as `add` block by block)."""
        if self.spec.kind == "identity":
            return flat
        out = self.new_output(flat.shape[0])
        if self.spec.kind == "sparse" and self.spec.num_params * 12 <= self.cache_bytes:
            if self._full_sparse is None:
                parts = [
                    self.chunk(name, i)
                    for name, shape in self._shapes.items()
                    for i in range(math.ceil(math.prod(shape) / self.spec.chunk_rows))
                ]
                self._full_sparse = (torch.cat([t for t, _ in parts]), torch.cat([s for _, s in parts]))
            target, sign = self._full_sparse
            with _deterministic(out.is_cuda):
                out.index_add_(1, target, flat * sign)
            return out
        for name, shape in self._shapes.items():
            start = self.offsets[name]
            self.add(out, name, flat[:, start : start + math.prod(shape)])
        return out
