"""Benchmark part `featurize-vs-peers`: gradient features against a training step, bergson and a bs=1 loop.

    hf-datasel bench perf --part featurize-vs-peers [--device cuda]
    python -m hf_datasel.bench.peers [--rows 512] [--rounds 5] [--device cuda] [--out docs/bench/peers.json]

One process, one tiny Llama (hidden 128, 4 layers, 4 heads, intermediate 256: 661 k parameters),
`rows` synthetic rows (`make_pool`) in batches of 16, one CPU thread by default. Each model variant
(LoRA r=8 on q/v, and the full model) gets a real run store: a short SFTTrainer run recorded with
`SnapshotCallback`, whose last snapshot (weights + AdamW moments) every method below uses.

Methods (per model variant):

* **train step** — forward + backward + AdamW step: the reference the batch-level methods' "× train step" is of;
* **train steps, one pass** — the same steps over every batch in one go: the reference of the end-to-end
  calls, which also go batch after batch (so both run with warm caches; interleaved with other methods, a
  batch-level method finds its caches cold);
* **library engine** — `Featurizer.batch_features`, one per preconditioner in
  `featurize.PRECONDITIONERS` (except the LESS-reference Adam form) and per projection: exact
  (`k=None`, LoRA only) and every sketch kind in `projector.ProjectorKind` that is not a dense
  matrix (CountSketch "sparse" and any factored/tensor sketch the library has), at `k`;
* **library end to end** — the public `gradient_features(store, dataset, ...)` on a fresh copy of the
  store (copied outside the timing): it hashes the raw rows, takes the rows the recording trainer kept in
  the store for them (the rows it trained on, as in a user's run: the dataset went through `with_row_ids`),
  loads the snapshot, batches the rows and writes and merges the fp16 features and the resume log; the model
  object is passed in (`model=`, progress off), as bergson's API takes one;
* **bergson** (only when `import bergson` works; `pip install hf_datasel[bench]`) —
  `bergson.collect_gradients` end to end, writing its on-disk index to a fresh folder, with a fresh
  `GradientProcessor` per call (so its projection matrices are built inside the call, as ours are):
  `AdamNormalizer(exp_avg_sq)` from the same snapshot for every tracked module (bergson's
  "Adam-normalized" gradient `g / (sqrt(v) + 1e-8)`: no first moment, no bias correction),
  `projection_dim=p` (16) with `projection_target="per_module"` (a p×p two-sided Rademacher sketch per
  module, JL-scaled), `loss_reduction="mean"` (the per-sample mean token loss the library uses),
  the trainer's tokenized rows and labels and the library's own batch plan (`batches=`), fp32 storage
  (the model's dtype), its progress bar and INFO logging off. bergson tracks `nn.Linear` modules only:
  on LoRA the adapters' A and B (the same parameters as ours); on the full model the 28 Linear layers
  of the decoder (`model.base_model`), not the embedding/LM head or the norms that the library's
  full-model features include;
* **naive bs=1** — one row at a time through autograd (`loss.backward()`), the flat gradient
  Adam-preconditioned ("adam") and projected with the same CountSketch.

Timing: batch-level methods (train step, engines, naive) are interleaved batch by batch; end-to-end
calls (library, bergson) run once per round each, in the same rounds; the method order rotates from
round to round. Reported: rows/s (median over rounds) and "× train step" (median over rounds of the
ratio to the same round's train step; for end-to-end calls, to the same round's one-pass train steps).
Peak extra memory: `bench.featurize.peak_memory` (CUDA: max allocated; CPU: peak RSS of a forked child
above its resting level) over the two longest batches for batch-level methods, over one whole call for
end-to-end ones.

Fidelity, on the first `fidelity_rows` rows: for every projected method, the mean and 99th percentile
of |projected cosine − exact cosine| over all pairs of rows, against exact per-sample features with
the same preconditioner (the library's `k=None`/identity spec; for bergson its own unprojected
features, `projection_dim=0`, with the same normalizer).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..store import write_json
from .recorder import device_name

PART = "featurize-vs-peers"
TRAIN_PASS = "train pass"  # the family of the end-to-end calls' reference
DENSE_KINDS = ("identity", "rademacher", "gaussian")  # exact, or a dense (P, k) matrix: not benched on full models
SKIP_PRECONDITIONERS = ("adam_reference",)  # the LESS reference form: same cost as "adam"
KIND_LABELS = {"identity": "exact", "sparse": "CountSketch"}


@dataclass
class PeersConfig:
    """Sizes of the bench; the defaults are the README's, tests shrink them."""

    rows: int = 512
    batch_size: int = 16
    rounds: int = 5
    k: int = 8192
    lora_rank: int = 8
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 256
    vocab_size: int | None = None  # None: the char tokenizer's (a few dozen); e.g. 32000 for a real LM head's cost
    train_steps: int = 4  # of the recorded run; its last step is the snapshot
    fidelity_rows: int = 128
    bergson_p: int = 16
    threads: int | None = 1
    device: str | None = None
    models: tuple[str, ...] = ("lora", "full")
    memory: bool = True
    seed: int = 0
    workdir: str | None = None


@dataclass
class Method:
    """One benchmarked method: per batch (`batch_fn`), or one end-to-end call per round (`pass_fn`), which
    gets a fresh empty folder that `prepare` (untimed) may fill first."""

    name: str
    model: str
    family: str
    settings: dict[str, Any]
    batch_fn: Callable[[dict[str, torch.Tensor]], None] | None = None
    pass_fn: Callable[[Path], None] | None = None
    prepare: Callable[[Path], Any] = lambda folder: None
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    fidelity: dict[str, float] | None = None


# -- environment ------------------------------------------------------------------------------


def bergson_version() -> str | None:
    """bergson's version when it imports, else None (its rows are then left out)."""
    try:
        from importlib.metadata import version

        import bergson  # noqa: F401

        return version("bergson")
    except Exception:
        return None


def projected_kinds() -> list[str]:
    """The library's sketch kinds, read at run time (`projector.SKETCH_KINDS`, else every `ProjectorKind`
    that is neither exact nor a dense matrix)."""
    from ..featurize import projector

    kinds = getattr(projector, "SKETCH_KINDS", None)
    if kinds is None:
        kinds = [k for k in typing.get_args(projector.ProjectorKind) if k not in DENSE_KINDS]
    return list(kinds)


@contextmanager
def quiet_bergson() -> Iterator[None]:
    """No progress bars or INFO lines from bergson or `datasets` inside (bergson's tqdm becomes a plain loop,
    as the library's runs with `progress=False`); everything restored on exit."""
    from unittest import mock

    import datasets

    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    logging.disable(logging.INFO)
    try:
        with mock.patch("bergson.collector.collector.tqdm", lambda iterable, **kwargs: iterable):
            yield
    finally:
        logging.disable(logging.NOTSET)
        if bars:
            datasets.enable_progress_bars()


def preconditioners() -> list[str]:
    """The library's preconditioners, read at run time (the LESS-reference Adam form left out)."""
    from ..featurize import PRECONDITIONERS

    return [p for p in PRECONDITIONERS if p not in SKIP_PRECONDITIONERS]


def code_version() -> dict[str, Any]:
    """The git commit measured, and whether the featurizer's sources differed from it (work in progress)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "hf_datasel/featurize"], cwd=root, capture_output=True, text=True
        )
        return {"commit": commit.stdout.strip(), "featurize_modified": bool(dirty.stdout.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "featurize_modified": None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- a real run store per model variant ----------------------------------------------------------


@dataclass
class Variant:
    """A recorded run (store) of one model variant, and everything the methods share."""

    name: str
    store: Any
    tokenizer: Any
    dataset: Any
    rows: list[dict[str, list[int]]]
    plan: list[list[int]]
    batches: list[dict[str, torch.Tensor]]
    snapshot: Any
    model: torch.nn.Module  # eval copy template with the snapshot's weights, on the device
    num_params: int


def record_variant(name: str, config: PeersConfig, root: Path, device: torch.device) -> Variant:
    """Train `config.train_steps` SFTTrainer steps with `SnapshotCallback` and gather what the methods share."""
    from trl import SFTTrainer

    from ..data import load_processing, make_collator, prepare_rows
    from ..featurize import load_model, load_snapshot, plan_batches, snapshot_steps
    from ..featurize.snapshots import assign_snapshot
    from ..record.snapshot import SnapshotCallback
    from ..rows import with_row_ids
    from ..store import RunStore
    from ..synthetic import TinyLlamaSpec, build_model, build_tokenizer, make_pool, save_and_reload, tiny_sft_config

    spec = TinyLlamaSpec(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
    )
    tok = build_tokenizer()
    base, tok = save_and_reload(build_model(tok, spec, seed=config.seed), tok, root / f"{name}-base")
    peft_config = None
    if name == "lora":
        from peft import LoraConfig

        rank = config.lora_rank
        peft_config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"])
    dataset = with_row_ids(make_pool(config.rows, seed=1))  # as a user records: the store keeps the trainer's rows
    out = root / f"{name}-run"
    args = tiny_sft_config(
        out, max_steps=config.train_steps, per_device_train_batch_size=config.batch_size, seed=config.seed,
        use_cpu=device.type != "cuda",
    )  # fmt: skip
    trainer = SFTTrainer(
        model=base, args=args, train_dataset=dataset, processing_class=tok, peft_config=peft_config,
        callbacks=[SnapshotCallback(steps=[config.train_steps])],
    )  # fmt: skip
    trainer.train()
    store = RunStore.for_output_dir(out)
    snapshot = load_snapshot(store, snapshot_steps(store)[-1])
    model = load_model(store)
    assign_snapshot(model, snapshot)
    model.to(device).eval()
    processing = load_processing(store.path)
    rows = prepare_rows(dataset, tok, processing)
    collate = make_collator(processing, tok)
    plan = plan_batches(rows, config.batch_size)
    keys = ("input_ids", "attention_mask", "labels")
    batches = [{k: v.to(device) for k, v in collate([rows[i] for i in b]).items() if k in keys} for b in plan]
    num_params = sum(math.prod(s) for s in snapshot.param_shapes.values())
    return Variant(name, store, tok, dataset, rows, plan, batches, snapshot, model, num_params)


# -- the methods -------------------------------------------------------------------------------


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _training_step(v: Variant) -> Callable[[dict[str, torch.Tensor]], None]:
    """One forward + backward + AdamW step of a fresh copy of the variant's model."""
    model = copy.deepcopy(v.model).train()
    opt = torch.optim.AdamW(_trainable(model), lr=1e-4)

    def step(b: dict[str, torch.Tensor]) -> None:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_step_method(v: Variant) -> Method:
    return Method("train step (fwd+bwd+AdamW)", v.name, "train step", {}, batch_fn=_training_step(v))


def train_pass_method(v: Variant) -> Method:
    """The same training steps over every batch in one go: the reference of the end-to-end calls, which also
    run batch after batch (warm caches), unlike the interleaved batch-level methods."""
    step = _training_step(v)

    def one_pass(folder: Path) -> None:
        for b in v.batches:
            step(b)

    return Method("train steps, one pass", v.name, TRAIN_PASS, {}, pass_fn=one_pass)


def library_methods(v: Variant, config: PeersConfig, device: torch.device, errors: list[dict]) -> list[Method]:
    """Engine and end-to-end methods for every preconditioner × projection of the library."""
    from ..featurize import Featurizer, ProjectorSpec, gradient_features
    from ..store import RunStore

    shapes = v.snapshot.param_shapes
    projections: list[tuple[str, int | None]] = [(kind, config.k) for kind in projected_kinds()]
    if v.name == "lora":
        projections.insert(0, ("identity", None))
    methods = []
    for precond in preconditioners():
        for kind, k in projections:
            label = f"{precond}, {KIND_LABELS.get(kind, kind)}" + (f" k={k}" if k else "")
            settings = {"preconditioner": precond, "projection": kind, "k": k if k else v.num_params}
            try:
                spec = ProjectorSpec.create(shapes, k, seed=0, kind=kind)
                featurizer = Featurizer(copy.deepcopy(v.model), spec, device)
                featurizer.set_snapshot(v.snapshot, precond)
                featurizer.batch_features(v.batches[0])  # fails here, not mid-bench, when a combination is refused
            except Exception as err:  # noqa: BLE001 - a refused combination is reported, the others still run
                errors.append({"model": v.name, "method": f"library engine ({label})", "error": _short(err)})
                continue
            engine = Method(
                f"library engine ({label})", v.name, "library engine", settings,
                batch_fn=lambda b, f=featurizer: f.batch_features(b),
            )  # fmt: skip
            engine.featurizer = featurizer  # type: ignore[attr-defined]  # reused for fidelity
            methods.append(engine)
            e2e_model = copy.deepcopy(v.model)

            def end_to_end(folder: Path, precond=precond, kind=kind, k=k, model=e2e_model) -> None:
                gradient_features(
                    RunStore(folder / v.store.path.name), v.dataset, preconditioner=precond, k=k, kind=kind,
                    seed=0, batch_size=config.batch_size, model=model, device=device, progress=False,
                )  # fmt: skip

            methods.append(
                Method(
                    f"library end to end ({label})",
                    v.name,
                    "library end to end",
                    settings,
                    pass_fn=end_to_end,
                    prepare=lambda folder: shutil.copytree(v.store.path, folder / v.store.path.name),
                )  # fmt: skip
            )
    return methods


def naive_method(v: Variant, config: PeersConfig, device: torch.device) -> Method:
    """Batch size 1 through autograd, then Adam preconditioning and the library's CountSketch."""
    from ..featurize import Projector, ProjectorSpec, adam_precondition

    model = copy.deepcopy(v.model).eval()
    named = dict(model.named_parameters())
    names = list(v.snapshot.param_shapes)
    projector = Projector(ProjectorSpec.create(v.snapshot.param_shapes, config.k, seed=0, kind="sparse"), device)
    m = torch.cat([v.snapshot.exp_avg[n].reshape(-1) for n in names]).to(device)
    s = torch.cat([v.snapshot.exp_avg_sq[n].reshape(-1) for n in names]).to(device)
    snap = v.snapshot

    def loop(b: dict[str, torch.Tensor]) -> None:
        for i in range(b["input_ids"].shape[0]):
            width = int(b["attention_mask"][i].sum())
            one = {key: t[i : i + 1, :width] for key, t in b.items()}  # right padding: the row alone
            model.zero_grad(set_to_none=True)
            model(**one).loss.backward()
            g = torch.cat([named[n].grad.reshape(1, -1) for n in names], dim=1)
            g = adam_precondition(g, m, s, snap.optimizer_step or 0, snap.betas, snap.eps)
            projector.project_flat(g)
        model.zero_grad(set_to_none=True)

    settings = {"preconditioner": "adam", "projection": "sparse", "k": config.k}
    return Method(f"naive bs=1 loop (adam, CountSketch k={config.k})", v.name, "naive bs=1", settings, batch_fn=loop)


# -- bergson -------------------------------------------------------------------------------------


def _bergson_setup(v: Variant, model: torch.nn.Module) -> tuple[set[str] | None, dict[str, torch.Tensor]]:
    """bergson's target modules for this variant and each one's `exp_avg_sq` from the snapshot (by module name)."""
    from bergson.collector.collector import HookCollectorBase

    peft = hasattr(model, "peft_config")
    targets = None
    if peft:
        from bergson.utils.peft import detect_peft_modules

        targets = detect_peft_modules(model)
    base = model.base_model
    found = HookCollectorBase.discover_targets(base, targets)
    param_name = {id(p): n for n, p in model.named_parameters()}
    avg_sq = {}
    for name in found:
        weight = base.get_submodule(name).weight
        avg_sq[name] = v.snapshot.exp_avg_sq[param_name[id(weight)]].to(weight.device)
    return targets, avg_sq


def _bergson_processor(avg_sq: dict[str, torch.Tensor], p: int):
    from bergson import GradientProcessor
    from bergson.gradients import AdamNormalizer

    normalizers = {name: AdamNormalizer(v) for name, v in avg_sq.items()}
    return GradientProcessor(normalizers, projection_dim=p or None, projection_target="per_module")


def _bergson_data(v: Variant, positions: list[int] | None = None):
    from datasets import Dataset

    rows = v.rows if positions is None else [v.rows[i] for i in positions]
    return Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]})


def bergson_method(v: Variant, config: PeersConfig) -> Method:
    """`bergson.collect_gradients` end to end (on-disk index), Adam-normalized, per-module projection."""
    from bergson import IndexConfig, collect_gradients

    model = copy.deepcopy(v.model).eval()
    targets, avg_sq = _bergson_setup(v, model)
    data = _bergson_data(v)
    p = config.bergson_p

    def run(folder: Path) -> None:
        cfg = IndexConfig(run_path=str(folder / "index"), projection_dim=p, loss_reduction="mean")
        with quiet_bergson():
            collect_gradients(model, data, _bergson_processor(avg_sq, p), cfg, batches=v.plan, target_modules=targets)

    dims = len(avg_sq) * p * p
    settings = {
        "preconditioner": "bergson AdamNormalizer g/(sqrt(v)+eps)", "projection": f"per-module {p}x{p}",
        "k": dims, "modules": len(avg_sq), "projection_dim": p, "loss_reduction": "mean",
    }  # fmt: skip
    method = Method(f"bergson collect_gradients (Adam-normalized, per-module p={p})", v.name, "bergson",
                    settings, pass_fn=run)  # fmt: skip
    method.bergson = (model, targets, avg_sq)  # type: ignore[attr-defined]
    return method


def bergson_features(v: Variant, method: Method, positions: list[int], p: int, workdir: str | None) -> np.ndarray:
    """bergson's per-sample features of `positions` (all tracked modules, concatenated), in memory."""
    from bergson import CollectorComputer, IndexConfig, InMemoryCollector

    model, targets, avg_sq = method.bergson  # type: ignore[attr-defined]
    data = _bergson_data(v, positions)
    size = len(positions)
    batches = [list(range(i, min(i + 16, size))) for i in range(0, size, 16)]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cfg = IndexConfig(run_path=str(Path(tmp) / "index"), projection_dim=p, loss_reduction="mean")
        cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
        collector = InMemoryCollector(
            model=model.base_model, cfg=cfg, processor=_bergson_processor(avg_sq, p), target_modules=targets,
            data=data,
        )  # fmt: skip
        computer = CollectorComputer(model=model, data=data, collector=collector, batches=batches, cfg=cfg)
        with quiet_bergson():
            computer.run_with_collector_hooks()
    return torch.cat([collector.gradients[n].float().reshape(size, -1) for n in collector.gradients], 1).numpy()


# -- fidelity ----------------------------------------------------------------------------------


def cosine_errors(exact: np.ndarray, projected: np.ndarray) -> dict[str, float]:
    """Mean and 99th percentile of |cos_proj − cos_exact| over all pairs of rows (zero/NaN-norm rows left out)."""
    exact = np.asarray(exact, np.float64)
    projected = np.asarray(projected, np.float64)
    ne, npj = np.linalg.norm(exact, axis=1), np.linalg.norm(projected, axis=1)
    ok = np.isfinite(ne) & np.isfinite(npj) & (ne > 0) & (npj > 0)
    a, b = exact[ok] / ne[ok, None], projected[ok] / npj[ok, None]
    upper = np.triu_indices(int(ok.sum()), 1)
    err = np.abs((a @ a.T)[upper] - (b @ b.T)[upper])
    return {
        "mean_abs_error": float(err.mean()),
        "p99_abs_error": float(np.quantile(err, 0.99)),
        "max_abs_error": float(err.max()),
        "pairs": int(err.size),
    }


def _engine_features(featurizer, v: Variant, positions: list[int], batch_size: int, device) -> np.ndarray:
    from ..data import load_processing, make_collator

    collate = make_collator(load_processing(v.store.path), v.tokenizer)
    keys = ("input_ids", "attention_mask", "labels")
    out = []
    for start in range(0, len(positions), batch_size):
        batch = collate([v.rows[i] for i in positions[start : start + batch_size]])
        feats, _, _ = featurizer.batch_features({k: t.to(device) for k, t in batch.items() if k in keys})
        out.append(feats.detach().float().cpu().numpy())
    return np.concatenate(out)


def measure_fidelity(
    v: Variant, methods: list[Method], config: PeersConfig, device: torch.device, errors: list[dict]
) -> None:
    """Fill `Method.fidelity` for every projected engine (and its end-to-end twin) and bergson, on a row subset."""
    from ..featurize import Featurizer, ProjectorSpec

    positions = list(range(min(config.fidelity_rows, len(v.rows))))
    by_precond: dict[str, np.ndarray] = {}
    for method in methods:
        s = method.settings
        if method.family != "library engine" or s["projection"] == "identity":
            continue
        precond = s["preconditioner"]
        try:
            if precond not in by_precond:
                exact = Featurizer(copy.deepcopy(v.model), ProjectorSpec.create(v.snapshot.param_shapes, None), device)
                exact.set_snapshot(v.snapshot, precond)
                by_precond[precond] = _engine_features(exact, v, positions, config.batch_size, device)
            projected = _engine_features(method.featurizer, v, positions, config.batch_size, device)  # type: ignore[attr-defined]
            method.fidelity = cosine_errors(by_precond[precond], projected)
        except Exception as err:  # noqa: BLE001
            errors.append({"model": v.name, "method": f"fidelity of {method.name}", "error": _short(err)})
    twins = {(m.settings.get("preconditioner"), m.settings.get("projection")): m.fidelity for m in methods
             if m.family == "library engine"}  # fmt: skip
    for method in methods:
        if method.family == "library end to end":
            method.fidelity = twins.get((method.settings["preconditioner"], method.settings["projection"]))
    for method in methods:
        if method.family == "bergson":
            try:
                exact = bergson_features(v, method, positions, 0, config.workdir)
                projected = bergson_features(v, method, positions, config.bergson_p, config.workdir)
                method.fidelity = {**cosine_errors(exact, projected), "exact": "bergson projection_dim=0"}
            except Exception as err:  # noqa: BLE001
                errors.append({"model": v.name, "method": f"fidelity of {method.name}", "error": _short(err)})


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:400]


# -- the bench -------------------------------------------------------------------------------


def _time(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def run_pass(m: Method, device: torch.device, workdir: str | None) -> float:
    """One end-to-end call of `m` in a fresh folder (made, prepared and removed outside the timing); seconds."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        m.prepare(Path(tmp))
        return _time(lambda: m.pass_fn(Path(tmp)), device)


def run_peers(config: PeersConfig | None = None, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the bench; the result as a JSON-ready dict (see `markdown_table` for its README form)."""
    from .featurize import peak_memory

    config = config or PeersConfig()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    errors: list[dict] = []
    berg = bergson_version()
    code = code_version()  # at the start: the code this process imported
    methods: list[Method] = []
    variants: dict[str, Variant] = {}
    with tempfile.TemporaryDirectory(dir=config.workdir) as tmp:
        for name in config.models:
            log(f"peers: recording the {name} run ...")
            v = variants[name] = record_variant(name, config, Path(tmp), device)
            methods += [train_step_method(v), train_pass_method(v)]
            methods += library_methods(v, config, device, errors)
            if berg:
                try:
                    methods.append(bergson_method(v, config))
                except Exception as err:  # noqa: BLE001
                    errors.append({"model": name, "method": "bergson", "error": _short(err)})
            methods.append(naive_method(v, config, device))
        batch_methods = [m for m in methods if m.batch_fn is not None]
        pass_methods = [m for m in methods if m.pass_fn is not None]
        log(f"peers: {len(batch_methods)} batch-level and {len(pass_methods)} end-to-end methods; warming up ...")
        for m in batch_methods:
            for b in variants[m.model].batches[:2]:
                m.batch_fn(b)
        for m in list(pass_methods):
            try:
                run_pass(m, device, config.workdir)
            except Exception as err:  # noqa: BLE001
                errors.append({"model": m.model, "method": m.name, "error": _short(err)})
                pass_methods.remove(m)
                methods.remove(m)
        if config.memory:
            log("peers: peak memory ...")
            for m in batch_methods:
                longest = variants[m.model].batches[-2:]
                m.peak_mib = peak_memory(lambda m=m, bs=longest: [m.batch_fn(b) for b in bs], device) / 2**20
            for m in pass_methods:
                m.peak_mib = peak_memory(lambda m=m: run_pass(m, device, config.workdir), device) / 2**20
        for r in range(config.rounds):
            log(f"peers: round {r + 1}/{config.rounds} ...")
            shift = r % max(1, len(batch_methods))
            order = batch_methods[shift:] + batch_methods[:shift]
            spent = dict.fromkeys(map(id, order), 0.0)
            for i in range(max(len(v.batches) for v in variants.values())):
                for m in order:
                    batches = variants[m.model].batches
                    if i < len(batches):
                        spent[id(m)] += _time(lambda m=m, b=batches[i]: m.batch_fn(b), device)
            for m in order:
                m.times.append(spent[id(m)])
            shift = r % max(1, len(pass_methods))
            for m in pass_methods[shift:] + pass_methods[:shift]:
                m.times.append(run_pass(m, device, config.workdir))
            train = {(m.model, m.family): m.times[-1] for m in methods if m.family in ("train step", TRAIN_PASS)}
            for m in methods:  # batch-level methods against the train step, end-to-end calls against the pass
                m.ratios.append(train[m.model, "train step" if m.batch_fn else TRAIN_PASS] / m.times[-1])
        log("peers: fidelity ...")
        for name, v in variants.items():
            measure_fidelity(v, [m for m in methods if m.model == name], config, device, errors)
        result = {
            "benchmark": PART,
            "device": device_name(device),
            "device_type": device.type,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "bergson": berg,
            "code": code,
            "settings": {**asdict(config), "models": list(config.models)},
            "variants": {
                name: {"params": v.num_params, "rows": len(v.rows), "batches": len(v.batches), "step": v.snapshot.step}
                for name, v in variants.items()
            },
            "methods": [_method_result(m, len(variants[m.model].rows)) for m in methods],
            "errors": errors,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "seconds": round(time.perf_counter() - started, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    return result


def _method_result(m: Method, rows: int) -> dict[str, Any]:
    return {
        "name": m.name,
        "model": m.model,
        "family": m.family,
        **m.settings,
        "rows_per_s": rows / statistics.median(m.times),
        "vs_train_step": statistics.median(m.ratios),
        "seconds_per_round": m.times,
        "peak_extra_memory_mib": m.peak_mib,
        "fidelity": m.fidelity,
    }


# -- reports ----------------------------------------------------------------------------------


def markdown_table(result: dict[str, Any]) -> str:
    """Speed table (one line per method, LoRA and full side by side) and fidelity table."""
    models = list(result["variants"])
    rows: dict[str, dict[str, dict]] = {}
    for m in result["methods"]:
        rows.setdefault(m["name"], {})[m["model"]] = m
    params = ", ".join(f"{n}: {result['variants'][n]['params']:,} trainable" for n in models)
    if result["settings"].get("vocab_size"):
        params += f", vocabulary padded to {result['settings']['vocab_size']:,}"
    lines = [
        f"Device: {result['device']} ({result['torch_threads']} torch thread(s)), torch {result['torch']}, "
        f"bergson {result['bergson'] or 'not installed'}; {params}; "
        f"{result['variants'][models[0]]['rows']} rows, batch {result['settings']['batch_size']}, "
        f"median of {result['settings']['rounds']} interleaved rounds. × train step: batch-level methods against "
        "the interleaved train step, end-to-end calls (and the one-pass train steps themselves) against the "
        "one-pass train steps of the same round.",
        "",
        "| method | " + " | ".join(f"{n} rows/s | {n} × train step | {n} peak MiB" for n in models) + " |",
        "|---|" + "---|---|---|" * len(models),
    ]
    for name, by_model in rows.items():
        cells = []
        for n in models:
            m = by_model.get(n)
            if m is None:
                cells += ["–", "–", "–"]
                continue
            peak = "–" if m["peak_extra_memory_mib"] is None else f"{m['peak_extra_memory_mib']:.0f}"
            cells += [f"{m['rows_per_s']:.0f}", f"{m['vs_train_step']:.2f}", peak]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Projection fidelity on {result['settings']['fidelity_rows']} rows: |cos(projected) − cos(exact)| over "
        "all pairs, exact = the same preconditioner without projection.",
        "",
        "| method | model | dims | mean abs error | p99 abs error |",
        "|---|---|---|---|---|",
    ]
    for m in result["methods"]:
        f = m.get("fidelity")
        if f and m["family"] != "library end to end":
            lines.append(
                f"| {m['name']} | {m['model']} | {m['k']:,} | {f['mean_abs_error']:.4f} | {f['p99_abs_error']:.4f} |"
            )
    if result.get("errors"):
        lines += ["", "Not measured:", ""] + [f"* {e['model']}: {e['method']}: {e['error']}" for e in result["errors"]]
    return "\n".join(lines)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers `bench perf` keeps in perf.json: per method and model, × train step, rows/s, memory, fidelity."""
    keep = ("model", "name", "family", "preconditioner", "projection", "k", "rows_per_s", "vs_train_step")
    methods = []
    for m in result["methods"]:
        f = m.get("fidelity") or {}
        methods.append(
            {**{key: m.get(key) for key in keep}, "peak_extra_memory_mib": m["peak_extra_memory_mib"],
             "cosine_mean_abs_error": f.get("mean_abs_error"), "cosine_p99_abs_error": f.get("p99_abs_error")}
        )  # fmt: skip
    return {"device": result["device"], "bergson": result["bergson"], "methods": methods, "errors": result["errors"]}


def summary_line(r: dict[str, Any]) -> str:
    """One human line: per model, × train step of the library (Adam, CountSketch) end to end and engine,
    bergson, and the batch-size-1 loop."""
    parts = []
    for model in dict.fromkeys(m["model"] for m in r["methods"]):
        ms = [m for m in r["methods"] if m["model"] == model]

        def ratio(family: str, ms=ms) -> str:
            for m in ms:
                adam_sketch = m.get("preconditioner") == "adam" and m.get("projection") == "sparse"
                if m["family"] == family and (family == "bergson" or adam_sketch):
                    return f"{m['vs_train_step']:.2f}×"
            return "–"

        parts.append(
            f"{model}: library end to end {ratio('library end to end')}, engine {ratio('library engine')}, "
            f"bergson {ratio('bergson')}, bs=1 {ratio('naive bs=1')}"
        )
    return "; ".join(parts) + f" a training step (Adam, CountSketch; {r['device']})"


def write_results(result: dict[str, Any], out: str | os.PathLike) -> None:
    """`out` (JSON) and the markdown tables beside it (`.md`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    out.with_suffix(".md").write_text(markdown_table(result) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--k", type=int, default=8192)
    parser.add_argument("--fidelity-rows", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's choice)")
    parser.add_argument("--models", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--vocab-size", type=int, default=None, help="pad the model's vocabulary (default: none)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", default="docs/bench/peers.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = PeersConfig(
        rows=args.rows, rounds=args.rounds, k=args.k, fidelity_rows=args.fidelity_rows, device=args.device,
        threads=args.threads or None, models=tuple(args.models), memory=not args.no_memory, vocab_size=args.vocab_size,
    )  # fmt: skip
    result = run_peers(config, log=print)
    write_results(result, args.out)
    print(markdown_table(result))


if __name__ == "__main__":
    main()
