"""G2IS benchmark: kNN-graph build and gradient-walk time and peak memory on synthetic features.

    python -m hf_datasel.bench.g2is                       # 10 000 and 100 000 rows, 8 192 dims, fp16 on disk
    python -m hf_datasel.bench.g2is --rows 10000 --dims 1024

Features are written once to a memory-mapped fp16 file (generated in chunks) and read the way
the featurizer's cache is read. Rows are `shared + cluster centre + noise`, with cluster centres
in a low-dimensional subspace so that some clusters point away from each other: the conflict
rule then has real work to do, as with real gradients. The full graph (`2 · rows² · dims`
flops) is built only up to `--full-graph-max-rows`; above that its time is extrapolated from
the first `--estimate-chunks` chunks and marked as an estimate.

Defaults: k = 32 neighbours, graph chunks of 1 024 query rows (a 1 024 × rows fp32 block,
400 MiB at 100 000 rows), lazy lists computed 32 rows per pass over the pool, budget 1 %.
Each size runs in its own process so its peak RSS is its own (it includes the pages of the
memory-mapped fp16 file that were read).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..methods.g2is import (
    GraphNeighbors,
    LazyNeighbors,
    core_knowledge,
    gradient_walk,
    knn_graph,
    l2_normalize,
    split_budget,
)


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_seconds() -> float:
    """User + system CPU time of this process so far: a fairer measure than wall time on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Timer:
    """Wall and CPU seconds of a block, stored into `result` as `<name>_s` and `<name>_cpu_s`."""

    def __init__(self, result: dict, name: str):
        self.result, self.name = result, name

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def __exit__(self, *exc):
        self.result[f"{self.name}_s"] = round(time.perf_counter() - self.wall, 1)
        self.result[f"{self.name}_cpu_s"] = round(cpu_seconds() - self.cpu, 1)


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def synthetic_features(
    path: Path, rows: int, dims: int, seed: int, clusters: int = 64, chunk: int = 4096
) -> tuple[np.memmap, np.ndarray]:
    """Train features as an fp16 memmap at `path`, and 256 target rows drawn from four of the clusters."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((8, dims), dtype=np.float32) / np.sqrt(dims)
    centers = rng.standard_normal((clusters, 8), dtype=np.float32) @ basis
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    shared = rng.standard_normal(dims, dtype=np.float32)
    shared *= 0.45 / np.linalg.norm(shared)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dims))
    for lo in range(0, rows, chunk):
        n = min(chunk, rows - lo)
        labels = rng.integers(0, clusters, n)
        noise = rng.standard_normal((n, dims), dtype=np.float32) * np.float32(0.6 / np.sqrt(dims))
        out[lo : lo + n] = shared + centers[labels] + noise
    out.flush()
    labels = rng.integers(0, 4, 256)
    noise = rng.standard_normal((256, dims), dtype=np.float32) * np.float32(0.6 / np.sqrt(dims))
    targets = shared + centers[labels] + noise
    return np.load(path, mmap_mode="r"), targets


def bench(rows: int, args: argparse.Namespace, workdir: Path) -> dict:
    result: dict = {"rows": rows, "dims": args.dims, "neighbors": args.neighbors, "chunk_rows": args.chunk_rows}
    with Timer(result, "generate"):
        train, targets = synthetic_features(workdir / f"train-{rows}.npy", rows, args.dims, args.seed)

    with Timer(result, "normalize_and_pca"):
        normed, valid = l2_normalize(train)
        core = core_knowledge(targets, variance_share=args.variance_share)
        budget = max(1, int(round(args.budget_share * rows)))
        budgets = split_budget(core.weights, budget)
    result.update(budget=budget, components=len(core.weights), rss_after_load_gib=round(current_rss_gib(), 2))

    lazy = LazyNeighbors(normed, args.neighbors, valid)
    with Timer(result, "walk_lazy"):
        walk = gradient_walk(normed, core.components, budgets, lazy, args.delta, True, valid)
    result.update(
        lazy_neighbour_queries=lazy.calls,
        lazy_passes_over_pool=lazy.passes,
        chosen=int(walk.chosen.sum()),
        reanchors=int(walk.reanchors.sum()),
        shortfall=int(walk.shortfall.sum()),
        peak_rss_after_lazy_walk_gib=round(peak_rss_gib(), 2),
    )

    if rows <= args.full_graph_max_rows:
        with Timer(result, "graph_build"):
            graph, _ = knn_graph(normed, args.neighbors, args.chunk_rows, valid)
        with Timer(result, "walk_full_graph"):
            full = gradient_walk(normed, core.components, budgets, GraphNeighbors(graph), args.delta, True, valid)
        result["full_and_lazy_agree"] = bool(np.array_equal(full.indices, walk.indices))
        result["peak_rss_after_full_graph_gib"] = round(peak_rss_gib(), 2)
    else:
        n_chunks = -(-rows // args.chunk_rows)
        sample = normed[: args.estimate_chunks * args.chunk_rows]
        sampled: dict = {}
        base = torch.from_numpy(normed)
        with Timer(sampled, "sample"):
            for lo in range(0, len(sample), args.chunk_rows):
                sims = torch.from_numpy(sample[lo : lo + args.chunk_rows]) @ base.T
                torch.topk(sims, args.neighbors + 1, dim=1)
        scale = n_chunks / args.estimate_chunks
        result["graph_build_s_estimate"] = round(sampled["sample_s"] * scale, 0)
        result["graph_build_cpu_s_estimate"] = round(sampled["sample_cpu_s"] * scale, 0)
        result["peak_rss_after_graph_sample_gib"] = round(peak_rss_gib(), 2)
    result["load_average_1min"] = round(os.getloadavg()[0], 1)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dims", type=int, default=8192)
    parser.add_argument("--neighbors", type=int, default=32)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--budget-share", type=float, default=0.01)
    parser.add_argument("--variance-share", type=float, default=0.5)
    parser.add_argument("--delta", type=float, default=0.8)
    parser.add_argument("--full-graph-max-rows", type=int, default=20_000)
    parser.add_argument("--estimate-chunks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where the fp16 feature files go (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if len(args.rows) > 1:  # one process per size, so each peak RSS is that size's own
        results = []
        for rows in args.rows:
            cmd = [sys.executable, "-m", "hf_datasel.bench.g2is", "--rows", str(rows)]
            for name, value in vars(args).items():
                if name not in ("rows", "json") and value is not None:
                    cmd += [f"--{name.replace('_', '-')}", str(value)]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(out.strip().splitlines()[-1], flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for rows in args.rows:
            res = bench(rows, args, Path(tmp))
            print(json.dumps(res), flush=True)
            results.append(res)
            (Path(tmp) / f"train-{rows}.npy").unlink()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
