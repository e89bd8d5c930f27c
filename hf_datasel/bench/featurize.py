"""Benchmark: per-sample gradient features vs a training step and vs the reference LESS approach.

    python -m hf_datasel.bench.featurize [--model large] [--batch-size 16] [--k 8192] [--batches 8] [--rounds 5]

On the same batches of a tiny Llama with LoRA (r=8 on q_proj/v_proj), in one process:

* featurizer — `Featurizer.batch_features` (one forward + one backward per batch, per-sample
  gradients, Adam preconditioning from moments, projection to k), default sparse projector,
  and the dense Rademacher projector;
* train step — forward + backward + AdamW step (what the recording run does per batch);
* reference — the LESS scripts' way: batch size 1, full LoRA gradient, Adam update, then a
  dense (P, k) random projection.

Reports rows/s (median over rounds; methods interleaved batch by batch), the ratios to the two goals
(≥ 0.9× the training step, ≥ 10× the reference) and each method's peak extra memory
(CUDA: max allocated; CPU: peak RSS above the resting level of a forked, warmed-up child running
the method over the batches), plus the state
each keeps between batches (projector chunks, the reference's dense matrix).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

from ..data import pad_batch, tokenize_rows
from ..featurize import Featurizer, ProjectorSpec, Snapshot, adam_precondition
from ..synthetic import LARGE, PROXY, build_model, build_tokenizer, make_pool


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory(fn: Callable[[], None], device: torch.device) -> int:
    """Peak extra memory (bytes) of one call of `fn`: CUDA max allocated, or on CPU the peak RSS of a
    forked child above its resting level (the child runs `fn` once to fault in code and warm up,
    returns freed heap to the OS, resets the kernel's high-water mark, then runs `fn` again)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    import ctypes

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read)
            fn()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            base = _status_kib("VmRSS")
            fn()
            os.write(write, str(max(0, _status_kib("VmHWM") - base) * 1024).encode())
        except Exception:
            os.write(write, b"-1")
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return int(text) if text else -1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(spec_name: str, rank: int, device: torch.device, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    tok = build_tokenizer()
    base = build_model(tok, {"proxy": PROXY, "large": LARGE}[spec_name], seed=seed)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
    model.to(device)
    return tok, model


def run(
    model_name: str = "large",
    batch_size: int = 16,
    k: int = 8192,
    batches: int = 8,
    rounds: int = 5,
    rank: int = 8,
    device: str | None = None,
    threads: int | None = None,
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok, model = build(model_name, rank, dev)
    rows = tokenize_rows(make_pool(batch_size * batches, seed=1), tok, 64)
    data = [pad_batch(rows[i : i + batch_size], tok.pad_token_id) for i in range(0, len(rows), batch_size)]
    data = [{k_: v.to(dev) for k_, v in b.items()} for b in data]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in names}
    num_params = sum(math.prod(s) for s in shapes.values())

    # a few real AdamW steps first, so the LoRA B matrices and the moments are not zero
    opt = torch.optim.AdamW([params[n] for n in names], lr=1e-3)
    model.train()
    for b in data[:3]:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    snapshot = Snapshot(
        step=3, lr=1e-3, lr_mean=1e-3, betas=(0.9, 0.999), eps=1e-8, optimizer_step=3,
        params={n: params[n].detach().cpu().clone() for n in names},
        exp_avg={n: opt.state[params[n]]["exp_avg"].detach().cpu().clone() for n in names},
        exp_avg_sq={n: opt.state[params[n]]["exp_avg_sq"].detach().cpu().clone() for n in names},
        entry={},
    )  # fmt: skip

    # each method keeps its own copy of the model in its own mode (train step: train mode; the others: eval),
    # so no method pays for switching modes; all copies hold the same weights
    _, eval_model = build(model_name, rank, dev)
    featurizers = {}
    for kind in ("sparse", "rademacher"):
        f = Featurizer(eval_model, ProjectorSpec.create(shapes, k=k, seed=0, kind=kind), dev)
        f.set_snapshot(snapshot, "adam")
        featurizers[kind] = f
    eval_params = dict(eval_model.named_parameters())

    def featurize(kind: str) -> Callable[[dict], None]:
        def go(b):
            featurizers[kind].batch_features(b)

        return go

    model.train()

    def train_step(b):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    gen = torch.Generator().manual_seed(0)
    dense = (torch.randint(0, 2, (num_params, k), generator=gen).float().mul_(2).sub_(1) / math.sqrt(k)).to(dev)
    m = torch.cat([snapshot.exp_avg[n].reshape(-1) for n in names]).to(dev)
    v = torch.cat([snapshot.exp_avg_sq[n].reshape(-1) for n in names]).to(dev)

    def reference(b):
        for i in range(b["input_ids"].shape[0]):
            one = {k_: t[i : i + 1] for k_, t in b.items()}
            width = int(one["attention_mask"].sum())
            one = {k_: t[:, :width] for k_, t in one.items()}  # batch of one: no padding
            eval_model.zero_grad(set_to_none=True)
            eval_model(**one).loss.backward()
            g = torch.cat([eval_params[n].grad.reshape(1, -1) for n in names], dim=1)
            update = adam_precondition(g, m, v, 3, (0.9, 0.999), 1e-8, form="adam_reference")
            _ = update @ dense
        eval_model.zero_grad(set_to_none=True)

    methods = {
        "featurizer (sparse projector, Adam)": featurize("sparse"),
        "featurizer (dense Rademacher, Adam)": featurize("rademacher"),
        "train step (fwd+bwd+AdamW)": train_step,
        "reference (bs=1, full grad, dense proj.)": reference,
    }
    times = {name: [] for name in methods}
    for fn in methods.values():  # warm up (allocator, caches, projector chunks)
        for b in data:
            fn(b)
    memory = {name: peak_memory(lambda fn=fn: [fn(b) for b in data], dev) for name, fn in methods.items()}
    for _ in range(rounds):
        spent = dict.fromkeys(methods, 0.0)
        for b in data:  # methods interleaved batch by batch, so load changes hit them alike
            for name, fn in methods.items():
                _sync(dev)
                start = time.perf_counter()
                fn(b)
                _sync(dev)
                spent[name] += time.perf_counter() - start
        for name in methods:
            times[name].append(spent[name])
    n_rows = len(rows)
    rate = {name: n_rows / statistics.median(t) for name, t in times.items()}
    feat = rate["featurizer (sparse projector, Adam)"]
    result = {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "torch_threads": torch.get_num_threads(),
        "model": model_name,
        "lora_rank": rank,
        "trainable_params": num_params,
        "batch_size": batch_size,
        "k": k,
        "rows": n_rows,
        "rounds": rounds,
        "rows_per_s": rate,
        "peak_extra_memory_mib": {name: mem / 2**20 for name, mem in memory.items()},
        "featurizer_vs_train_step": feat / rate["train step (fwd+bwd+AdamW)"],
        "featurizer_vs_reference": feat / rate["reference (bs=1, full grad, dense proj.)"],
        "dense_projection_matrix_mib": num_params * k * 4 / 2**20,
        "projector_state_mib": {kind: f.projector._cached_bytes / 2**20 for kind, f in featurizers.items()},
    }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["proxy", "large"], default="large")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--k", type=int, default=8192)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    result = run(args.model, args.batch_size, args.k, args.batches, args.rounds, args.rank, args.device, args.threads)
    print(
        f"device={result['device']} threads={result['torch_threads']} model={result['model']} "
        f"LoRA r={result['lora_rank']} P={result['trainable_params']} batch={result['batch_size']} k={result['k']} "
        f"rows={result['rows']} rounds={result['rounds']}"
    )
    print(f"{'method':44s} {'rows/s':>10s} {'peak extra MiB':>15s}")
    for name, r in result["rows_per_s"].items():
        print(f"{name:44s} {r:10.1f} {result['peak_extra_memory_mib'][name]:15.1f}")
    print(
        f"held between batches: sparse projector {result['projector_state_mib']['sparse']:.1f} MiB, "
        f"dense Rademacher chunks {result['projector_state_mib']['rademacher']:.1f} MiB, "
        f"reference dense matrix {result['dense_projection_matrix_mib']:.1f} MiB (model excluded)"
    )
    print(f"featurizer / train step = {result['featurizer_vs_train_step']:.2f}x (goal >= 0.9x)")
    print(f"featurizer / reference  = {result['featurizer_vs_reference']:.1f}x (goal >= 10x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
