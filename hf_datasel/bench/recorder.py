"""Recorder overhead: training time per step with and without `LossRecorderCallback`, side by side.

    python -m hf_datasel.bench.recorder                     # demo proxy model, batch 8, 5 × 2 interleaved runs
    python -m hf_datasel.bench.recorder --steps 60 --repeats 7 --out docs/bench/recorder.json

Both variants train the demo's proxy Llama (char tokenizer) with `SFTTrainer` from the same
initial weights on the same synthetic pool: "plain" gets the raw rows, "recorder" gets
`with_row_ids(rows)` and a `LossRecorderCallback` (no sweep: the sweep is an opt-in extra
pass, timed separately as `sweep_seconds`). The runs alternate (plain, recorder, recorder,
plain, ...) in one process, so machine load hits both alike. A step is timed from
`on_step_begin` to `on_step_end` (forward, backward, optimizer); the first `--warmup` steps of
each run are dropped. The overhead is the ratio of the median step times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer

from ..record import LossRecorderCallback
from ..rows import with_row_ids
from ..store import write_json
from ..synthetic import PROXY, build_model, build_tokenizer, make_pool, tiny_sft_config

GOAL_OVERHEAD = 0.03


class HookTimer:
    """Wrap a callback's forward hooks (before the trainer registers them) and add up the time spent in them."""

    def __init__(self, recorder: LossRecorderCallback, names: tuple[str, ...] = ("_take_row_ids", "_record")):
        self.seconds = 0.0
        for name in names:
            setattr(recorder, name, self._timed(getattr(recorder, name)))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapper


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, from `on_step_begin` to `on_step_end`."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def device_name(device: torch.device) -> str:
    """The CUDA device's name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def _args(output_dir: str, steps: int, batch_size: int, seed: int) -> SFTConfig:
    return tiny_sft_config(
        output_dir, per_device_train_batch_size=batch_size, max_steps=steps, logging_steps=10_000, seed=seed
    )


def _one_run(variant: str, init_state: dict, tokenizer, pool, steps: int, batch_size: int, seed: int, workdir: str):
    """Train one fresh copy of the proxy for `steps`; return (step times, train wall, sweep s, hook s per step)."""
    model = build_model(tokenizer, PROXY, seed=seed)
    model.load_state_dict(init_state)
    timer = StepTimer()
    callbacks: list[TrainerCallback] = [timer]
    dataset = pool
    recorder = hooks = None
    if variant == "recorder":
        recorder = LossRecorderCallback()
        hooks = HookTimer(recorder)
        callbacks.append(recorder)
        dataset = with_row_ids(pool)
    out = tempfile.mkdtemp(prefix=f"{variant}-", dir=workdir)
    trainer = SFTTrainer(
        model=model,
        args=_args(out, steps, batch_size, seed),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    sweep = None
    if recorder is not None:
        started = time.perf_counter()
        recorder._sweep(steps)  # the opt-in S2L sweep over the whole pool, timed on its own
        sweep = time.perf_counter() - started
        recorder.detach()
    return timer.times, wall, sweep, (hooks.seconds / steps if hooks is not None else None)


def run_recorder_bench(
    steps: int = 40,
    repeats: int = 5,
    warmup: int = 5,
    batch_size: int = 8,
    pool_size: int = 512,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Interleaved plain/recorder runs; per-step medians, the overhead ratio and the raw step times."""
    if steps <= warmup:
        raise ValueError("steps must be larger than warmup")
    hf_logging.set_verbosity_error()
    tokenizer = build_tokenizer()
    pool = make_pool(pool_size, noise=0.2, seed=seed)
    init_state = {k: v.clone() for k, v in build_model(tokenizer, PROXY, seed=seed).state_dict().items()}
    times: dict[str, list[list[float]]] = {"plain": [], "recorder": []}
    walls: dict[str, list[float]] = {"plain": [], "recorder": []}
    sweeps: list[float] = []
    hook_seconds: list[float] = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for r in range(repeats):
            order = ("plain", "recorder") if r % 2 == 0 else ("recorder", "plain")
            for variant in order:
                step_times, wall, sweep, hook = _one_run(
                    variant, init_state, tokenizer, pool, steps, batch_size, seed, tmp
                )
                times[variant].append(step_times[warmup:])
                walls[variant].append(wall)
                if sweep is not None:
                    sweeps.append(sweep)
                    hook_seconds.append(hook)
    per_variant = {}
    for variant, runs in times.items():
        flat = np.concatenate([np.asarray(t) for t in runs])
        per_variant[variant] = {
            "median_step_ms": float(np.median(flat) * 1e3),
            "mean_step_ms": float(np.mean(flat) * 1e3),
            "p10_step_ms": float(np.percentile(flat, 10) * 1e3),
            "p90_step_ms": float(np.percentile(flat, 90) * 1e3),
            "run_median_step_ms": [float(np.median(t) * 1e3) for t in runs],
            "train_wall_s": [round(w, 3) for w in walls[variant]],
            "steps_timed": int(len(flat)),
        }
    paired = [
        np.median(rec) / np.median(plain) - 1.0 for plain, rec in zip(times["plain"], times["recorder"], strict=True)
    ]
    overhead = per_variant["recorder"]["median_step_ms"] / per_variant["plain"]["median_step_ms"] - 1.0
    return {
        "benchmark": "recorder_overhead",
        "settings": {
            "model": "demo proxy (hf_datasel.synthetic.PROXY, char tokenizer)",
            "parameters": int(sum(v.numel() for v in init_state.values())),
            "batch_size": batch_size,
            "steps_per_run": steps,
            "warmup_steps_dropped": warmup,
            "repeats": repeats,
            "pool_size": pool_size,
            "order": "interleaved, alternating which variant goes first",
        },
        "machine": machine(),
        "plain": per_variant["plain"],
        "recorder": per_variant["recorder"],
        "overhead": float(overhead),
        "overhead_paired_median": float(np.median(paired)),
        "overhead_paired": [float(p) for p in paired],
        "goal_overhead": GOAL_OVERHEAD,
        "meets_goal": bool(overhead <= GOAL_OVERHEAD),
        "sweep_seconds_per_pool": float(np.median(sweeps)) if sweeps else None,
        # time spent inside the recorder's forward hooks, measured directly (not a difference of noisy totals)
        "hook_ms_per_step": float(np.median(hook_seconds) * 1e3),
        "hook_share_of_plain_step": float(np.median(hook_seconds) * 1e3 / per_variant["plain"]["median_step_ms"]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def summary_line(result: dict[str, Any]) -> str:
    plain, rec = result["plain"]["median_step_ms"], result["recorder"]["median_step_ms"]
    return (
        f"plain {plain:.2f} ms/step, with LossRecorderCallback {rec:.2f} ms/step: overhead {result['overhead']:+.1%} "
        f"(paired median {result['overhead_paired_median']:+.1%}; goal ≤ {result['goal_overhead']:.0%}); "
        f"time inside the recorder's hooks {result['hook_ms_per_step']:.3f} ms/step = "
        f"{result['hook_share_of_plain_step']:.1%} of a plain step"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pool-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/bench/recorder.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run_recorder_bench(args.steps, args.repeats, args.warmup, args.batch_size, args.pool_size, args.seed)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("overhead", "overhead_paired_median", "meets_goal")}))
    print(summary_line(result))


if __name__ == "__main__":
    main()
