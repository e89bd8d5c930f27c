"""Performance: how fast each step of the flow is, as ratios measured side by side in one run.

    hf-datasel bench perf                              # every part; scoring parts on 1 000 000 rows
    hf-datasel bench perf --rows 100000 --parts s2l_kmeans less_scoring
    python -m hf_datasel.bench.perf --out docs/bench/perf.json

Parts (each runs in its own child process, so its peak memory is its own):

* `recorder` — training step with and without `LossRecorderCallback` (`hf_datasel.bench.recorder`);
* `featurize` — per-sample gradient featurizer vs a plain training step vs the reference
  batch-size-1 LESS approach (`hf_datasel.bench.featurize`, the gradient engine's own bench);
* `spectra` — factored singular values vs forming each gradient and a full SVD
  (`hf_datasel.bench.spectra`);
* `s2l_kmeans` — S2L's k-means + balanced sampling on `rows` synthetic loss trajectories,
  read from a memory-mapped file;
* `less_scoring` — LESS scores of `rows` memory-mapped fp16 features at several snapshots;
* `g2is` — G2IS's PCA + lazy-kNN gradient walk on `rows` memory-mapped features
  (`hf_datasel.bench.g2is`);
* `lm_head` — the gradient engine with the LM head only at the positions that predict a label vs at every
  position (a tiny LoRA Llama with a 32k vocabulary, completion-only rows): an engine-only figure;
* `featurize-vs-peers` — a training step, the library's engine and `gradient_features` (LoRA and
  full model, exact and projected, each preconditioner), bergson's `collect_gradients` when bergson
  is installed, and a batch-size-1 loop, interleaved in one process, with projection fidelity
  (`hf_datasel.bench.peers`; also writes `peers_out` and its `.md` table; `--device cuda` on a GPU).

A part that fails or whose module is missing is reported with its error; the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..store import write_json

PEERS = "featurize-vs-peers"
PARTS = ("recorder", "featurize", "lm_head", "spectra", "s2l_kmeans", "less_scoring", "g2is", PEERS)


@dataclass
class PerfConfig:
    """Sizes of each part. The defaults are the README's numbers; tests shrink them."""

    parts: tuple[str, ...] = PARTS
    rows: int = 1_000_000
    # recorder
    recorder_steps: int = 40
    recorder_repeats: int = 5
    # featurize (gradient engine bench)
    featurize_model: str = "proxy"
    featurize_batches: int = 8
    featurize_rounds: int = 5
    featurize_k: int = 8192
    featurize_threads: int | None = 1
    # lm_head (the engine's LM head at label positions vs every position)
    lm_head_vocab: int = 32000
    lm_head_tokens: int = 128
    lm_head_completion_share: float = 0.25  # of each row's tokens: the completion (labels); the rest is prompt
    lm_head_batch: int = 8
    lm_head_batches: int = 4
    lm_head_rounds: int = 3
    # spectra
    spectra_d: int = 512
    spectra_tokens: int = 128
    spectra_rows: int = 16
    spectra_layers: int = 2
    # S2L
    trajectory_length: int = 8
    num_clusters: int = 100
    # LESS / G2IS
    dims: int = 512
    snapshots: int = 4
    target_rows: int = 64
    budget_share: float = 0.01
    g2is_budget_share: float = 0.001
    g2is_dims: int = 256
    # featurize-vs-peers (hf_datasel.bench.peers)
    peers_rows: int = 512
    peers_rounds: int = 5
    peers_k: int = 8192
    peers_fidelity_rows: int = 128
    peers_threads: int | None = 1
    peers_memory: bool = True
    peers_out: str | None = "docs/bench/peers.json"
    peers_timeout_s: int = 3600
    peers_overrides: dict[str, Any] = field(default_factory=dict)  # other PeersConfig fields (tests: a smaller model)
    device: str | None = None  # featurize and featurize-vs-peers; default CUDA when available
    timeout_s: int = 900  # per part
    workdir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _status_mib(fields: tuple[str, ...] = ("RssAnon", "VmRSS")) -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0]) / 1024
    return out


class PeakMemory:
    """Sample this process's memory every few ms while the block runs.

    `anon_mib`: peak anonymous memory (the heap: arrays, models) above the level at entry;
    `rss_mib`: peak resident set, which also counts the pages of memory-mapped files read.
    """

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.anon_mib = self.rss_mib = 0.0

    def __enter__(self) -> PeakMemory:
        import threading

        self._start = _status_mib()
        self._peak = dict(self._start)
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval_s):
                for key, value in _status_mib().items():
                    self._peak[key] = max(self._peak[key], value)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for key, value in _status_mib().items():
            self._peak[key] = max(self._peak[key], value)
        self.anon_mib = self._peak["RssAnon"] - self._start["RssAnon"]
        self.rss_mib = self._peak["VmRSS"]


# -- parts (run inside a child process) ------------------------------------------------------


def part_recorder(config: PerfConfig, workdir: Path) -> dict[str, Any]:
    from .recorder import run_recorder_bench

    r = run_recorder_bench(steps=config.recorder_steps, repeats=config.recorder_repeats, workdir=workdir)
    return {
        "plain_median_step_ms": r["plain"]["median_step_ms"],
        "recorder_median_step_ms": r["recorder"]["median_step_ms"],
        "overhead": r["overhead"],
        "overhead_paired_median": r["overhead_paired_median"],
        "hook_ms_per_step": r["hook_ms_per_step"],
        "hook_share_of_plain_step": r["hook_share_of_plain_step"],
        "goal_overhead": r["goal_overhead"],
        "meets_goal": r["meets_goal"],
        "settings": r["settings"],
    }


def part_featurize(config: PerfConfig, workdir: Path) -> dict[str, Any]:
    from .featurize import run

    r = run(
        config.featurize_model,
        k=config.featurize_k,
        batches=config.featurize_batches,
        rounds=config.featurize_rounds,
        device=config.device,
    )
    return {
        "featurizer_vs_train_step": r.get("featurizer_vs_train_step"),
        "featurizer_vs_reference": r.get("featurizer_vs_reference"),
        "rows_per_s": r.get("rows_per_s"),
        "peak_extra_memory_mib": r.get("peak_extra_memory_mib"),
        "settings": {k: r.get(k) for k in ("model", "lora_rank", "trainable_params", "batch_size", "k", "rows")},
    }


def part_lm_head(config: PerfConfig, workdir: Path) -> dict[str, Any]:
    """`PerSampleGradients` with the LM head at label positions vs at every position, batch-interleaved, with the
    gradients of the two compared and each one's peak extra memory (heap on CPU, allocated on CUDA)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..featurize import PerSampleGradients

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    vocab, batch, tokens = config.lm_head_vocab, config.lm_head_batch, config.lm_head_tokens
    llama = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4,
    )  # fmt: skip
    model = LlamaForCausalLM(llama).eval()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).to(device)
    prompt = tokens - max(1, round(tokens * config.lm_head_completion_share))
    batches = []
    for _ in range(config.lm_head_batches):
        ids = torch.randint(1, vocab, (batch, tokens))
        labels = ids.clone()
        labels[:, :prompt] = -100
        batches.append(tuple(t.to(device) for t in (ids, torch.ones_like(ids), labels)))
    engines = {
        "label_positions": PerSampleGradients(model),
        "every_position": PerSampleGradients(model, lm_head_at_labels=False),
    }
    grads = {name: engine(*batches[0])[0] for name, engine in engines.items()}
    difference = max(
        float((grads["label_positions"][n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
        for n, g in grads["every_position"].items()
    )
    del grads
    memory = {}
    for name, engine in engines.items():  # the smaller one first: freed heap is handed back in between
        _release_heap()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
        with PeakMemory() as peak:
            engine(*batches[0], consume=lambda name, g: None)
        memory[name] = (
            (torch.cuda.max_memory_allocated(device) - start) / 2**20 if device.type == "cuda" else peak.anon_mib
        )
    seconds = {name: 0.0 for name in engines}
    for r in range(config.lm_head_rounds):
        for i, b in enumerate(batches):
            for name in list(engines)[:: 1 if (r + i) % 2 else -1]:
                started = time.perf_counter()
                engines[name](*b, consume=lambda name, g: None)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[name] += time.perf_counter() - started
    calls = config.lm_head_rounds * len(batches)
    return {
        "ms_per_batch": {name: 1000 * t / calls for name, t in seconds.items()},
        "speedup": seconds["every_position"] / seconds["label_positions"],
        "peak_extra_memory_mib": memory,
        "max_relative_difference": difference,
        "settings": {
            "vocab_size": vocab,
            "batch_size": batch,
            "tokens": tokens,
            "label_tokens": tokens - prompt,
            "model": "Llama hidden 128, 4 layers, LoRA r=8 on q/v",
            "device": str(device),
        },  # fmt: skip
    }


def _release_heap() -> None:
    """Hand freed heap back to the OS (glibc), so the next block's peak is its own."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def part_spectra(config: PerfConfig, workdir: Path) -> dict[str, Any]:
    from .spectra import bench_end_to_end, bench_kernel

    d, t, n = config.spectra_d, config.spectra_tokens, config.spectra_rows
    kernel = bench_kernel(d, t, n)
    end = bench_end_to_end(d, t, n, config.spectra_layers)
    return {
        "kernel": kernel,
        "kernel_speedup_float32": kernel["explicit_float32_s"] / kernel["factored_float32_s"],
        "kernel_speedup_float64": kernel["explicit_float64_s"] / kernel["factored_float64_s"],
        "end_to_end": end,
        "end_to_end_speedup": end["per_sample_full_svd_s"] / end["factored_float32_s"],
        "settings": {"d": d, "tokens": t, "rows": n, "layers": config.spectra_layers, "times": "CPU seconds"},
    }


def synthetic_trajectories(path: Path, rows: int, length: int, seed: int = 0, chunk: int = 1 << 17) -> np.memmap:
    """Loss curves `a·exp(-b·t) + c + noise`, some flat and high (noisy rows), as a float32 memmap."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, length))
    t = np.linspace(0, 1, length, dtype=np.float32)
    for lo in range(0, rows, chunk):
        n = min(chunk, rows - lo)
        a = rng.uniform(0.5, 3.0, (n, 1)).astype(np.float32)
        b = rng.uniform(0.5, 6.0, (n, 1)).astype(np.float32)
        c = rng.uniform(0.0, 1.0, (n, 1)).astype(np.float32)
        flat = rng.random((n, 1)) < 0.2
        curve = np.where(flat, a + c, a * np.exp(-b * t) + c)
        out[lo : lo + n] = curve + rng.normal(0, 0.05, (n, length)).astype(np.float32)
    out.flush()
    return np.load(path, mmap_mode="r")


def part_s2l_kmeans(config: PerfConfig, workdir: Path) -> dict[str, Any]:
    from ..methods.s2l import balanced_sample, cluster_trajectories

    started = time.perf_counter()
    traj = synthetic_trajectories(workdir / "trajectories.npy", config.rows, config.trajectory_length)
    generate_s = time.perf_counter() - started
    base_rss = current_rss_mib()
    budget = max(1, int(round(config.budget_share * config.rows)))
    with PeakMemory() as memory:
        started = time.perf_counter()
        labels = cluster_trajectories(traj, config.num_clusters, seed=0)
        kmeans_s = time.perf_counter() - started
        started = time.perf_counter()
        chosen = balanced_sample(labels, budget, np.random.default_rng(0))
        sample_s = time.perf_counter() - started
    return {
        "rows": config.rows,
        "trajectory_length": config.trajectory_length,
        "num_clusters": config.num_clusters,
        "budget": budget,
        "chosen": int(len(chosen)),
        "generate_s": generate_s,
        "kmeans_s": kmeans_s,
        "balanced_sample_s": sample_s,
        "total_s": kmeans_s + sample_s,
        "rss_before_mib": base_rss,
        "peak_extra_anon_mib": memory.anon_mib,
        "peak_rss_during_mib": memory.rss_mib,
        "trajectory_file_mib": config.rows * config.trajectory_length * 4 / 2**20,
    }


def _unit_features(path: Path, rows: int, dims: int, rng: np.random.Generator, chunk: int = 1 << 16) -> np.ndarray:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dims))
    shared = rng.standard_normal(dims).astype(np.float32)
    for lo in range(0, rows, chunk):
        n = min(chunk, rows - lo)
        block = rng.standard_normal((n, dims), dtype=np.float32) + 0.3 * shared
        out[lo : lo + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    out.flush()
    return np.load(path, mmap_mode="r")


def part_less_scoring(config: PerfConfig, workdir: Path) -> dict[str, Any]:
    from ..featurize import FeatureSet
    from ..featurize.projector import ProjectorSpec
    from ..methods.less import less_scores

    rng = np.random.default_rng(0)
    spec = ProjectorSpec.create({"w": (config.dims * 64,)}, k=config.dims, seed=0)
    started = time.perf_counter()
    train, targets = [], []
    lrs = np.linspace(1.0, 0.25, config.snapshots)
    for s in range(config.snapshots):
        unit = _unit_features(workdir / f"train-{s}.npy", config.rows, config.dims, rng)
        tgt = _unit_features(workdir / f"target-{s}.npy", config.target_rows, config.dims, rng)
        common = dict(spec=spec, step=10 * (s + 1), lr=float(lrs[s]), lr_mean=float(lrs[s]), preconditioner="adam")
        train.append(FeatureSet(path=workdir, unit=unit, norms=np.ones(config.rows, np.float32), meta={}, **common))
        targets.append(
            FeatureSet(path=workdir, unit=tgt, norms=np.ones(config.target_rows, np.float32), meta={}, **common)
        )
    for sets in (train, targets):
        for fs in sets:
            fs.weight = fs.lr_mean / float(lrs.sum())
    generate_s = time.perf_counter() - started
    base_rss = current_rss_mib()
    budget = max(1, int(round(config.budget_share * config.rows)))
    with PeakMemory() as memory:
        started = time.perf_counter()
        score, _, _, _ = less_scores(train, targets, np.zeros(config.target_rows, np.int64))
        score_s = time.perf_counter() - started
        started = time.perf_counter()
        top = np.argpartition(-score, budget - 1)[:budget]
        topk_s = time.perf_counter() - started
    return {
        "rows": config.rows,
        "dims": config.dims,
        "snapshots": config.snapshots,
        "target_rows": config.target_rows,
        "budget": budget,
        "chosen": int(len(top)),
        "generate_s": generate_s,
        "score_s": score_s,
        "topk_s": topk_s,
        "total_s": score_s + topk_s,
        "rss_before_mib": base_rss,
        "peak_extra_anon_mib": memory.anon_mib,
        "peak_rss_during_mib": memory.rss_mib,
        "feature_files_mib": config.snapshots * config.rows * config.dims * 2 / 2**20,
    }


def part_g2is(config: PerfConfig, workdir: Path) -> dict[str, Any]:
    out = workdir / "g2is.json"
    cmd = [
        sys.executable, "-m", "hf_datasel.bench.g2is", "--rows", str(config.rows), "--dims", str(config.g2is_dims),
        "--budget-share", str(config.g2is_budget_share), "--workdir", str(workdir), "--json", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=config.timeout_s)
    result = json.loads(out.read_text())
    return result[0] if isinstance(result, list) else result


def part_featurize_vs_peers(config: PerfConfig, workdir: Path) -> dict[str, Any]:
    from .peers import PeersConfig, run_peers, summary, write_results

    peers = PeersConfig(
        rows=config.peers_rows, rounds=config.peers_rounds, k=config.peers_k,
        fidelity_rows=config.peers_fidelity_rows, threads=config.peers_threads, device=config.device,
        memory=config.peers_memory, workdir=str(workdir), **config.peers_overrides,
    )  # fmt: skip
    result = run_peers(peers)
    if config.peers_out:
        write_results(result, config.peers_out)
    return {**summary(result), "results": config.peers_out}


PART_FUNCTIONS = {
    "recorder": part_recorder,
    "featurize": part_featurize,
    "lm_head": part_lm_head,
    "spectra": part_spectra,
    "s2l_kmeans": part_s2l_kmeans,
    "less_scoring": part_less_scoring,
    "g2is": part_g2is,
    PEERS: part_featurize_vs_peers,
}


def _child(part: str, config_json: str, out: str) -> None:
    """Run one part in this (child) process and write its result with timing and peak memory."""
    config = PerfConfig(**json.loads(config_json))
    config.parts = tuple(config.parts)
    base = peak_rss_mib()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=config.workdir) as tmp:
        result = PART_FUNCTIONS[part](config, Path(tmp))
    result["wall_s"] = time.perf_counter() - started
    result["peak_rss_mib"] = peak_rss_mib()
    result["peak_rss_at_start_mib"] = base
    Path(out).write_text(json.dumps(result, default=float))


def run_part(part: str, config: PerfConfig) -> dict[str, Any]:
    """Run `part` in a child process; its result, or `{"error": ...}` when it failed."""
    if part not in PART_FUNCTIONS:
        raise ValueError(f"unknown part {part!r}; choose from {PARTS}")
    with tempfile.TemporaryDirectory(dir=config.workdir) as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "hf_datasel.bench.perf", "--child", part, json.dumps(asdict(config)), str(out)]
        env = dict(os.environ)
        timeout = config.peers_timeout_s if part == PEERS else config.timeout_s
        threads = config.peers_threads if part == PEERS else config.featurize_threads
        if part in ("featurize", "lm_head", PEERS) and threads == 1:
            # one thread from the start: no OpenMP pool exists when the bench forks to measure memory
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        # its own session, so a timeout ends the part's forked helpers too
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"error": f"timed out after {timeout} s"}
        if proc.returncode != 0 or not out.exists():
            errors = [line for line in stderr.strip().splitlines() if "Error" in line or "error" in line]
            return {"error": (errors or stderr.strip().splitlines() or ["no output"])[-1][:500]}
        return json.loads(out.read_text())


def run_perf(
    config: PerfConfig | None = None, out: str | os.PathLike | None = None, log=print, update: bool = False
) -> dict[str, Any]:
    """Every part of `config.parts` in turn; the combined result (also written to `out`).

    With `update=True` and an existing `out`, only the parts run now are replaced in it.
    """
    from .recorder import machine

    config = config or PerfConfig()
    started = time.perf_counter()
    parts = {}
    for part in config.parts:
        log(f"perf: {part} ...")
        parts[part] = run_part(part, config)
        log(f"perf: {part}: {summary_line(part, parts[part])}")
    result = {
        "benchmark": "performance",
        "settings": {**asdict(config), "parts": list(config.parts)},
        "machine": {**machine(), "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        "parts": parts,
        "seconds": round(time.perf_counter() - started, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if out and update and Path(out).exists():
        earlier = json.loads(Path(out).read_text())
        for part, value in earlier.get("parts", {}).items():
            if part not in parts:
                if "measured" not in value:  # measured by the earlier run itself, on its machine
                    value.update(measured=earlier.get("created"), machine=earlier.get("machine"))
                result["parts"] = {**{part: value}, **result["parts"]}
        result["parts"] = {p: result["parts"][p] for p in PARTS if p in result["parts"]}
        result["settings"]["parts"] = list(result["parts"])
    if out:
        write_json(out, result)
        Path(out).with_suffix(".md").write_text(markdown_table(result) + "\n")
    return result


def summary_line(part: str, r: dict[str, Any]) -> str:
    """One human line per part."""
    if "error" in r:
        return f"not measured: {r['error']}"
    if part == "recorder":
        return (
            f"plain {r['plain_median_step_ms']:.1f} ms/step, recorder {r['recorder_median_step_ms']:.1f} ms/step, "
            f"overhead {r['overhead']:+.1%} (paired median {r['overhead_paired_median']:+.1%}; goal ≤ "
            f"{r['goal_overhead']:.0%}); inside the hooks "
            f"{r.get('hook_share_of_plain_step', float('nan')):.1%} of a step"
        )
    if part == "featurize":
        return (
            f"featurizer = {r['featurizer_vs_train_step']:.2f}× a training step, "
            f"{r['featurizer_vs_reference']:.1f}× the batch-size-1 reference"
        )
    if part == "lm_head":
        ms, mem, st = r["ms_per_batch"], r["peak_extra_memory_mib"], r["settings"]
        return (
            f"{r['speedup']:.2f}× faster ({ms['every_position']:.0f} → {ms['label_positions']:.0f} ms/batch), "
            f"peak extra memory {mem['every_position']:.0f} → {mem['label_positions']:.0f} MiB "
            f"({st['label_tokens']} of {st['tokens']} tokens labelled, vocabulary {st['vocab_size']:,}; "
            f"same gradients to {r['max_relative_difference']:.0e})"
        )
    if part == "spectra":
        return (
            f"factored vs full SVD: kernel {r['kernel_speedup_float32']:.1f}× (fp32), "
            f"end to end {r['end_to_end_speedup']:.1f}×"
        )
    if part in ("s2l_kmeans", "less_scoring"):
        return (
            f"{r['rows']:,} rows: {r['total_s']:.1f} s; heap +{r['peak_extra_anon_mib']:.0f} MiB, "
            f"resident incl. mapped features {r['peak_rss_during_mib']:.0f} MiB"
        )
    if part == PEERS:
        from .peers import summary_line as peers_line

        return peers_line(r)
    if part == "g2is":
        return (
            f"{r.get('rows', 0):,} rows × {r.get('dims')} dims, budget {r.get('budget')}: PCA "
            f"{r.get('normalize_and_pca_s')} s + walk {r.get('walk_lazy_s')} s; peak RSS "
            f"{r.get('peak_rss_after_lazy_walk_gib')} GiB (bench process)"
        )
    return json.dumps(r)[:200]


def markdown_table(result: dict[str, Any]) -> str:
    """The README table: one line per part."""
    lines = ["| part | what is compared | result | peak RSS |", "|---|---|---|---|"]
    what = {
        "recorder": "training step with vs without LossRecorderCallback (demo proxy, batch 8)",
        "featurize": "per-sample gradient features vs training step vs batch-size-1 reference",
        "lm_head": "the engine's LM head at the label positions vs at every position (engine only)",
        "spectra": "factored singular values vs forming G + full SVD",
        "s2l_kmeans": "S2L k-means + balanced sampling (memory-mapped trajectories)",
        "less_scoring": "LESS scores + top-k (memory-mapped fp16 features)",
        "g2is": "G2IS PCA + lazy-kNN gradient walk (memory-mapped fp16 features)",
        PEERS: "gradient features (× a training step): library end to end vs bergson vs batch-size-1 loop",
    }
    for part, r in result["parts"].items():
        if "error" in r:
            peak = "–"
        elif part == "g2is":
            peak = f"{1024 * r.get('peak_rss_after_lazy_walk_gib', float('nan')):.0f} MiB"
        else:
            peak = f"{r.get('peak_rss_mib', float('nan')):.0f} MiB"
        lines.append(f"| {part} | {what.get(part, part)} | {summary_line(part, r)} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _child(*argv[1:4])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", default="docs/bench/perf.json")
    parser.add_argument("--update", action="store_true", help="replace only these parts in an existing --out")
    parser.add_argument("--device", default=None, help="featurize parts: cpu or cuda (default: CUDA when available)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = PerfConfig(parts=tuple(args.parts), rows=args.rows, device=args.device)
    result = run_perf(config, out=args.out, update=args.update)
    print(markdown_table(result))


if __name__ == "__main__":
    main()
