"""Benchmark: factored gradient spectra vs forming each per-sample gradient and taking its full SVD.

    python -m hf_datasel.bench.spectra [--d 512] [--tokens 128] [--rows 16] [--layers 2] [--threads 1]

One thread by default: on a shared CPU, oversubscribed BLAS/LAPACK threads make timings meaningless.

Two comparisons, both checking that the singular values agree:
* kernel: singular values of `G = Δᵀ X` for a batch of (T×d) factors — thin QRs and a T×T SVD
  vs building the d×d matrix and `torch.linalg.svdvals` on it;
* end to end on a Llama with hidden size d and rows of T tokens: `gradient_spectra` (one
  batched forward/backward, factored SVD) vs the usual per-sample loop (one backward per row,
  then `svdvals` of every q/k/v/o gradient).
"""

from __future__ import annotations

import argparse
import time

import torch

from ..data import tokenize_rows
from ..spectra import _core_singular_values, _r_factor, gradient_spectra


def _timed(fn, repeat: int = 1):
    """(best CPU seconds of this process, result). CPU time, not wall time: with one thread it is what the
    computation costs, and it does not count the time other processes on a shared machine take from us."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.process_time()
        out = fn()
        best = min(best, time.process_time() - start)
    return best, out


def _max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |Δσ| relative to the largest σ, over the first len(ours) values."""
    k = ours.shape[-1]
    return ((ours - ref[..., :k]).abs().amax(-1) / ref[..., 0]).max().item()


def bench_kernel(d: int, tokens: int, rows: int, shared: int = 1, repeat: int = 3) -> dict[str, float]:
    """`shared` output-gradients per input, as q/k/v read one input: its QR is done once for all of them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, tokens, d, generator=gen)
    deltas = [torch.randn(rows, tokens, d, generator=gen) / d for _ in range(shared)]
    out = {}
    for dtype in (torch.float64, torch.float32):
        tag = str(dtype).removeprefix("torch.")

        def factored(dtype=dtype):
            r_input = _r_factor(x, dtype)
            return torch.stack([_core_singular_values(delta, r_input, dtype) for delta in deltas])

        def explicit(dtype=dtype):
            return torch.stack([torch.linalg.svdvals(dl.to(dtype).transpose(-1, -2) @ x.to(dtype)) for dl in deltas])

        out[f"factored_{tag}_s"], ours = _timed(factored, repeat)
        out[f"explicit_{tag}_s"], ref = _timed(explicit, repeat)
        out[f"max_rel_err_{tag}"] = _max_rel_err(ours.double(), ref.double())
    return out


def _text_rows(tokenizer, num_rows: int, tokens: int):
    """`text` rows of exactly `tokens` tokens (character tokenizer: tokens - 1 characters plus EOS)."""
    from datasets import Dataset

    from ..synthetic import make_pool

    pool = make_pool(num_rows * 20, noise=0.2, seed=1)
    text = " ".join(p + c for p, c in zip(pool["prompt"], pool["completion"]))
    width = tokens - 1
    return Dataset.from_dict({"text": [text[i * width : (i + 1) * width] for i in range(num_rows)]})


def bench_end_to_end(d: int, tokens: int, rows: int, layers: int) -> dict[str, float]:
    from ..synthetic import TinyLlamaSpec, build_model, build_tokenizer

    tok = build_tokenizer()
    spec = TinyLlamaSpec(
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=max(1, d // 64),
        intermediate_size=2 * d,
        max_position_embeddings=tokens + 8,
    )
    model = build_model(tok, spec, seed=0).eval()
    data = _text_rows(tok, rows, tokens)
    encoded = tokenize_rows(data, tok, max_length=None)
    assert all(len(r["input_ids"]) == tokens for r in encoded)

    out = {}
    out["factored_s"], spectra = _timed(
        lambda: gradient_spectra(model, data, tok, batch_size=8, keep_singular_values=True)
    )
    names = [t.name for t in spectra.targets]
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in names]

    def per_sample_full_svd():
        sigmas = []
        for r in encoded:
            ids, labels = torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])
            logits = model(input_ids=ids).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
            grads = torch.autograd.grad(loss, weights)
            sigmas.append(torch.stack([torch.linalg.svdvals(g) for g in grads]))
        return torch.stack(sigmas)

    out["per_sample_full_svd_s"], ref = _timed(per_sample_full_svd)
    out["max_rel_err"] = _max_rel_err(torch.from_numpy(spectra.singular_values).double(), ref.double())
    out["factored_float32_s"], spectra32 = _timed(
        lambda: gradient_spectra(model, data, tok, batch_size=8, dtype=torch.float32, keep_singular_values=True)
    )
    out["max_rel_err_float32"] = _max_rel_err(torch.from_numpy(spectra32.singular_values).double(), ref.double())
    out["matrices"] = len(names)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=512, help="hidden size (d_in = d_out of q/k/v/o)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 keeps torch's default")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), d={args.d}, T={args.tokens}, "
        f"rows={args.rows}; times are CPU seconds of this process (kernel: best of 3)"
    )

    for shared, what in [(1, "one matrix per input"), (3, "q/k/v: three matrices read one input")]:
        k = bench_kernel(args.d, args.tokens, args.rows, shared=shared)
        print(
            f"\nkernel, {what}: singular values of {args.rows * shared} gradients G = ΔᵀX "
            f"({args.d}x{args.d}, rank <= {args.tokens})"
        )
        for tag in ("float64", "float32"):
            speedup = k[f"explicit_{tag}_s"] / k[f"factored_{tag}_s"]
            print(
                f"  {tag}: factored {k[f'factored_{tag}_s'] * 1e3:8.1f} ms   form G + svdvals "
                f"{k[f'explicit_{tag}_s'] * 1e3:8.1f} ms   speedup {speedup:5.1f}x   "
                f"max |Δσ|/σ_max {k[f'max_rel_err_{tag}']:.1e}"
            )

    e = bench_end_to_end(args.d, args.tokens, args.rows, args.layers)
    print(
        f"\nend to end: Llama d={args.d}, {args.layers} layers, {e['matrices']} matrices (q/k/v/o), "
        f"{args.rows} rows x {args.tokens} tokens"
    )
    base = e["per_sample_full_svd_s"]
    print(f"  per-sample backward + svdvals of each gradient (float32)   {base:7.2f} s")
    for key, err, what in [
        ("factored_s", "max_rel_err", "float64"),
        ("factored_float32_s", "max_rel_err_float32", "float32"),
    ]:
        print(
            f"  gradient_spectra (batched, factored, {what})            {e[key]:7.2f} s   "
            f"speedup {base / e[key]:5.1f}x   max |Δσ|/σ_max {e[err]:.1e}"
        )


if __name__ == "__main__":
    main()
