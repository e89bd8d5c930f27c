"""Seeded random projections of per-sample gradients, described by a spec stored with the features.

A projected feature is `g @ R` with `R` a (P, k) random matrix scaled by `1/sqrt(k)`, so inner
products are preserved in expectation (Johnson-Lindenstrauss). The "tensor" kind is a CountSketch
whose hash of a weight matrix's entry (i, j) is `h1(i) + h2(j) mod k` with sign `s1(i)·s2(j)`
(TensorSketch, Pham & Pagh 2013): the sketch of a per-sample gradient `Σ_t δ_t x_tᵀ` is then
`irfft(Σ_t rfft(CS1 δ_t) · rfft(CS2 x_t))`, had from the two factors in O(T·(d_in + d_out + k log k))
without ever forming the d_out×d_in gradient; a formed gradient gets the same projection. Since
version 2, columns 2m and 2m+1 of a row (of a matrix at least `PAIRED_MIN_COLUMNS` wide) share a
bucket `h1(i) + h2(m) mod k/2` as the real and imaginary part of one complex number (outputs 2c and
2c+1), each with its own sign: a formed gradient whose signs were put on its factors is then
sketched by one complex scatter, half the element adds of a real one, and the factored form is the
same convolution over k/2 complex buckets.

`R` is never held whole for a large model: it is cut into parameter blocks (one per named
parameter) and each block into row chunks, and every chunk is generated on the CPU from a seed
derived from (seed, parameter name, chunk index). The same spec therefore gives bit-identical
matrices on any machine or GPU model, whatever order blocks are visited in, and whether or not
chunks are cached.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

ProjectorKind = Literal["identity", "sparse", "tensor", "rademacher", "gaussian"]
SKETCH_KINDS = ("sparse", "tensor")  # one ±1 per coordinate: O(P) work per sample
CHUNK_ELEMENTS = 1 << 22  # one generated chunk holds at most this many numbers (16 MiB of fp32)
PAIRED_VERSION = 2  # "tensor" specs from this version on hash column pairs to complex buckets
# ... of 2-D parameters at least this wide: on narrower ones (a LoRA B of rank 8) pairs measurably
# worsened pairwise cosines, and a narrow block is cheap to scatter anyway
PAIRED_MIN_COLUMNS = 64


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
            "tensor" (a CountSketch with a structured hash on 2-D weights, so full-model gradients can be
            sketched from their factors or scattered as complex column pairs; measured to keep pairwise
            cosines as well as "sparse");
            "rademacher" (dense ±1/sqrt(k)) or "gaussian" (dense N(0, 1/k)).
        k: feature dimension.
        seed: projector seed.
        dtype: dtype the unit-normalized features are stored in ("float16" or "float32").
        param_names: the trainable parameters, in the order their blocks are concatenated.
        param_shapes: their shapes.
        chunk_rows: rows of R generated per chunk (fixed by k, so part of the spec).
        version: of the hash; "tensor" specs of version 1 (hf_datasel before column pairs) keep their
            unpaired hash, so their features can still be compared with new ones made under them.
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
        if kind not in ("sparse", "tensor", "rademacher", "gaussian"):
            raise ValueError(
                f"projector kind must be 'identity', 'sparse', 'tensor', 'rademacher' or 'gaussian', not {kind!r}"
            )
        if int(k) <= 0:
            raise ValueError(f"k must be positive, not {k}")
        rows = CHUNK_ELEMENTS if kind in SKETCH_KINDS else max(1, CHUNK_ELEMENTS // int(k))
        return cls(kind, int(k), int(seed), dtype, names, shapes, rows, PAIRED_VERSION if kind == "tensor" else 1)

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
        self._full_sparse: torch.Tensor | None = None

    def chunk(self, name: str, index: int, keep: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rows [index*chunk_rows, ...) of parameter `name`'s block of R: a (rows, k) float32 matrix,
        or for the sketch kinds the (output index, sign) of each row; `keep=False`: not cached."""
        key = (name, index)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if not keep:
            key = None
        spec = self.spec
        numel = math.prod(self._shapes[name])
        rows = min(spec.chunk_rows, numel - index * spec.chunk_rows)
        if spec.kind == "tensor" and len(self._shapes[name]) == 2:
            cols = self._shapes[name][1]
            flat = torch.arange(index * spec.chunk_rows, index * spec.chunk_rows + rows, device=self.device)
            return self._keep(key, self.tensor_hash(name, flat // cols, flat % cols), rows * 12)
        gen = torch.Generator(device="cpu").manual_seed(_chunk_seed(spec.seed, name, index))
        if spec.kind in SKETCH_KINDS:
            target = torch.randint(0, spec.k, (rows,), generator=gen, dtype=torch.int64)
            sign = torch.randint(0, 2, (rows,), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
            return self._keep(key, (target.to(self.device), sign.to(self.device)), rows * 12)
        if spec.kind == "rademacher":
            mat = torch.randint(0, 2, (rows, spec.k), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
            mat.mul_(1.0 / math.sqrt(spec.k))
        else:
            mat = torch.randn((rows, spec.k), generator=gen, dtype=torch.float32).mul_(1.0 / math.sqrt(spec.k))
        return self._keep(key, mat.to(self.device), mat.numel() * 4)

    def _keep(self, key: tuple[str, int] | None, mat, size: int):
        if key is not None and self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = mat
            self._cached_bytes += size
        return mat

    def paired(self, name: str) -> bool:
        """Whether parameter `name` gets the column-pair hash: "tensor" kind (version ≥ 2), 2-D, an even
        number of columns, at least `PAIRED_MIN_COLUMNS`, and an even k."""
        shape = self._shapes[name]
        spec = self.spec
        if spec.kind != "tensor" or spec.version < PAIRED_VERSION or len(shape) != 2:
            return False
        return shape[1] % 2 == 0 and shape[1] >= PAIRED_MIN_COLUMNS and spec.k % 2 == 0

    def factor_hashes(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ "tensor" kind, 2-D parameter `name` of shape (d0, d1): (h1, s1) for dim 0 and (h2, s2) for dim 1.

        Entry (i, j) of the parameter's gradient goes to output `(h1[i] + h2[j]) % k` with sign `s1[i]·s2[j]`;
        when `paired(name)`, to output `2·((h1[i] + h2[j // 2]) % (k/2)) + j % 2` (h2 has one bucket per column
        pair, s2 one sign per column). See `tensor_hash`.
        """
        key = (name, -1)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        d0, d1 = self._shapes[name]
        paired = self.paired(name)
        buckets, columns = (self.spec.k // 2, d1 // 2) if paired else (self.spec.k, d1)
        gen = torch.Generator(device="cpu").manual_seed(_chunk_seed(self.spec.seed, name, -1))
        h1 = torch.randint(0, buckets, (d0,), generator=gen, dtype=torch.int64)
        s1 = torch.randint(0, 2, (d0,), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
        h2 = torch.randint(0, buckets, (columns,), generator=gen, dtype=torch.int64)
        s2 = torch.randint(0, 2, (d1,), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
        hashes = tuple(t.to(self.device) for t in (h1, s1, h2, s2))
        self._cache[key] = hashes  # O(d0 + d1): always kept
        return hashes

    def tensor_hash(self, name: str, i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output index, sign) of entries (i, j) of 2-D parameter `name` under the "tensor" kind."""
        h1, s1, h2, s2 = self.factor_hashes(name)
        if self.paired(name):
            target = 2 * ((h1[i] + h2[j // 2]) % (self.spec.k // 2)) + j % 2
        else:
            target = (h1[i] + h2[j]) % self.spec.k
        return target, s1[i] * s2[j]

    def sign_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(s1, s2): the "tensor" signs of 2-D parameter `name`, to be put on the rows and columns of its gradient."""
        _, s1, _, s2 = self.factor_hashes(name)
        return s1, s2

    # -- paired parameters: signed gradients, one complex scatter ----------------------------------
    def paired_output(self, batch: int) -> torch.Tensor:
        """A (B, k/2) complex accumulator for `add_paired`; `finish_paired` turns it into (B, k) features."""
        return torch.zeros(batch, self.spec.k // 2, dtype=torch.complex64, device=self.device)

    def add_paired(self, out_c: torch.Tensor, name: str, signed: torch.Tensor) -> None:
        """Add the sketch of a paired parameter's per-sample gradients (B, d0, d1) into `out_c`.

        `signed` must already carry the hash's signs, `s1[i]·s2[j]` on entry (i, j) (put on the factors
        of a formed gradient at T·(d0 + d1) a row, see `sign_factors`); each column pair is one complex number.
        """
        batch, d0, d1 = signed.shape
        rows = max(1, CHUNK_ELEMENTS // d1)
        with _deterministic(out_c.is_cuda):
            for index, start in enumerate(range(0, d0, rows)):
                part = signed[:, start : start + rows].reshape(batch, -1, 2)
                out_c.index_add_(1, self._pair_index(name, index, start, rows), torch.view_as_complex(part))

    def _pair_index(self, name: str, index: int, start: int, rows: int) -> torch.Tensor:
        """The complex bucket of every column pair of rows [start, start + rows) of a paired parameter."""
        key = (name, index, "paired")
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        h1, _, h2, _ = self.factor_hashes(name)
        buckets = (h1[start : start + rows, None] + h2[None, :]) % (self.spec.k // 2)
        return self._keep(key, buckets.reshape(-1), buckets.numel() * 8)

    def finish_paired(self, out_c: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(out_c).reshape(out_c.shape[0], self.spec.k)

    def add_factored(self, out: torch.Tensor, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add the "tensor" sketch of per-sample gradients `G_b = Σ_t a_bt b_btᵀ` of 2-D parameter `name` into `out`.

        `a` is (B, T, d0), `b` is (B, T, d1) (for nn.Linear: a = output gradients, b = inputs). The
        result equals `add(out, name, G)` up to float rounding, without forming G.
        """
        if self.spec.kind != "tensor":
            raise ValueError(f"factored sketches need the 'tensor' projector kind, not {self.spec.kind!r}")
        h1, s1, h2, s2 = self.factor_hashes(name)
        k = self.spec.k
        paired = self.paired(name)
        batch, tokens = a.shape[:2]
        step = max(1, (1 << 24) // max(1, tokens * k))  # rows per chunk: bounded (B, T, k) temporaries
        for start in range(0, batch, step):
            rows = slice(start, start + step)
            shape = a[rows].shape[:2]
            sa = a.new_zeros(shape + (k // 2 if paired else k,)).index_add_(2, h1, a[rows].float() * s1)
            if paired:  # column pairs as complex numbers: a convolution over k/2 complex buckets
                pairs = (b[rows].float() * s2).reshape(*shape, -1, 2)  # (real, imaginary) of each pair
                sb = torch.view_as_complex(pairs.new_zeros(shape + (k // 2, 2)).index_add_(2, h2, pairs))
                spectrum = (torch.fft.fft(sa, dim=2) * torch.fft.fft(sb, dim=2)).sum(1)
                out[rows] += torch.view_as_real(torch.fft.ifft(spectrum, dim=1)).reshape(-1, k)
                continue
            sb = b.new_zeros(shape + (k,)).index_add_(2, h2, b[rows].float() * s2)
            spectrum = (torch.fft.rfft(sa, dim=2) * torch.fft.rfft(sb, dim=2)).sum(1)
            out[rows] += torch.fft.irfft(spectrum, n=k, dim=1)

    def add_rows(
        self, out: torch.Tensor, name: str, ids: torch.Tensor, samples: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Add the projection of row-sparse per-sample gradients of 2-D parameter `name` into `out`.

        Row `ids[u]` of sample `samples[u]`'s gradient is `values[u]` (d1 numbers); every other row is
        zero. The same result as `add` on the formed (B, d0, d1) gradients, in O(U·d1) instead of O(B·d0·d1).
        """
        width = self._shapes[name][1]
        cols = torch.arange(width, device=ids.device)
        if self.spec.kind == "identity":
            target, sign = self.offsets[name] + ids[:, None] * width + cols, None
        elif self.spec.kind == "tensor":
            target, sign = self.tensor_hash(name, ids[:, None], cols)
        elif self.spec.kind == "sparse":
            flat = ids[:, None] * width + cols
            target, sign = torch.empty_like(flat), torch.empty(flat.shape, device=flat.device)
            chunk_of = flat // self.spec.chunk_rows
            for index in torch.unique(chunk_of).tolist():
                where = chunk_of == index
                chunk_target, chunk_sign = self.chunk(name, index)
                local = flat[where] - index * self.spec.chunk_rows
                target[where], sign[where] = chunk_target[local], chunk_sign[local]
        else:
            raise ValueError(f"row-sparse gradients need a sketch or exact projector, not {self.spec.kind!r}")
        values = values.float() if sign is None else values.float() * sign
        flat_target = (samples[:, None] * out.shape[1] + target).reshape(-1)
        with _deterministic(out.is_cuda):
            out.view(-1).index_add_(0, flat_target, values.reshape(-1))

    def new_output(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.spec.k, dtype=torch.float32, device=self.device)

    def add(self, out: torch.Tensor, name: str, grads: torch.Tensor, keep: bool = True) -> None:
        """Add the projection of one parameter's per-sample gradients (B, *shape) into `out` (B, k).

        `keep=False`: a one-off (e.g. a constant computed once), so the chunks of R it needs are not cached.
        """
        flat = grads.reshape(grads.shape[0], -1).float()
        if self.spec.kind == "identity":
            start = self.offsets[name]
            out[:, start : start + flat.shape[1]] = flat
            return
        rows = self.spec.chunk_rows
        for index, start in enumerate(range(0, flat.shape[1], rows)):
            if self.spec.kind in SKETCH_KINDS:
                target, sign = self.chunk(name, index, keep)
                with _deterministic(out.is_cuda):  # CUDA's default index_add_ sums in a random order
                    out.index_add_(1, target, flat[:, start : start + rows] * sign)
            else:
                out.addmm_(flat[:, start : start + rows], self.chunk(name, index, keep))

    # -- sketches without a sign pass: positive and negative coordinates go to two halves -----------
    def signed_output(self, batch: int) -> torch.Tensor:
        """A (B, 2k) accumulator for `add_signed`; `finish_signed` turns it into (B, k) features."""
        return torch.zeros(batch, 2 * self.spec.k, dtype=torch.float32, device=self.device)

    def signed_target(self, name: str, index: int) -> torch.Tensor:
        """A sketch chunk's output index, plus k where its sign is negative (so no multiply is needed)."""
        key = (name, index, "signed")
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        target, sign = self.chunk(name, index, keep=False)  # only the signed form is kept (8 bytes a coordinate)
        return self._keep(key, target + self.spec.k * (sign < 0), target.numel() * 8)

    def add_signed(self, out2: torch.Tensor, name: str, grads: torch.Tensor) -> None:
        """`add` for the sketch kinds into a `signed_output` accumulator: one scatter, no sign multiply."""
        flat = grads.reshape(grads.shape[0], -1)
        rows = self.spec.chunk_rows
        with _deterministic(out2.is_cuda):
            for index, start in enumerate(range(0, flat.shape[1], rows)):
                out2.index_add_(1, self.signed_target(name, index), flat[:, start : start + rows])

    def finish_signed(self, out2: torch.Tensor) -> torch.Tensor:
        k = self.spec.k
        return out2[:, :k] - out2[:, k:]

    def project_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Project (B, P) gradients laid out in spec order (the same result as `add` block by block)."""
        if self.spec.kind == "identity":
            return flat
        out = self.new_output(flat.shape[0])
        if self.spec.kind in SKETCH_KINDS and self.spec.num_params * 12 <= self.cache_bytes:
            if self._full_sparse is None:
                parts = [
                    self.chunk(name, i)
                    for name, shape in self._shapes.items()
                    for i in range(math.ceil(math.prod(shape) / self.spec.chunk_rows))
                ]
                self._full_sparse = torch.cat([t + self.spec.k * (s < 0) for t, s in parts])  # signed targets
            out2 = self.signed_output(flat.shape[0])
            with _deterministic(out.is_cuda):
                out2.index_add_(1, self._full_sparse, flat)
            return self.finish_signed(out2)
        for name, shape in self._shapes.items():
            start = self.offsets[name]
            self.add(out, name, flat[:, start : start + math.prod(shape)])
        return out
