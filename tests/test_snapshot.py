"""SnapshotCallback in real SFTTrainer runs: weights, Adam moments and LR read from the live optimizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from hf_datasel import DataSelector, LossRecorderCallback, RunStore, SnapshotCallback, with_row_ids
from hf_datasel.featurize import assign_snapshot, gradient_features, load_model, load_snapshot, load_tokenizer
from hf_datasel.record.snapshot import read_snapshot_index
from hf_datasel.store import StoreError
from hf_datasel.synthetic import build_model, make_pool, save_and_reload
from tests.conftest import sft_config
from tests.gradient_store import lora_model


class LiveOptimizerProbe(TrainerCallback):
    """Copies the live optimizer's state by *integer key* (state_dict), mapped to names independently."""

    def __init__(self, at: str):
        self.at = at
        self.seen: dict[int, dict] = {}
        self.lrs: list[float] = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def _capture(self, state, model, optimizer):
        sd = optimizer.state_dict()
        params_in_order = [p for group in optimizer.param_groups for p in group["params"]]
        ids_in_order = [i for group in sd["param_groups"] for i in group["params"]]
        name_of = {id(p): n for n, p in model.named_parameters()}
        captured = {}
        for p, key in zip(params_in_order, ids_in_order):
            st = sd["state"][key]
            captured[name_of[id(p)]] = {
                "param": p.detach().clone(),
                "exp_avg": st["exp_avg"].clone(),
                "exp_avg_sq": st["exp_avg_sq"].clone(),
                "step": int(st["step"]),
            }
        self.seen[state.global_step] = captured

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.at == "save":
            self._capture(state, model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.at == "step":
            self._capture(state, model, optimizer)


def _check_against_probe(store: RunStore, probe: LiveOptimizerProbe, steps: list[int]):
    assert [e["step"] for e in read_snapshot_index(store)] == steps
    for step in steps:
        snap = load_snapshot(store, step)
        live = probe.seen[step]
        assert set(snap.params) == set(live) and snap.optimizer_step == step
        for name, values in live.items():
            torch.testing.assert_close(snap.params[name], values["param"], rtol=0, atol=0)
            torch.testing.assert_close(snap.exp_avg[name], values["exp_avg"], rtol=0, atol=0)
            torch.testing.assert_close(snap.exp_avg_sq[name], values["exp_avg_sq"], rtol=0, atol=0)
            assert values["step"] == step
        assert snap.betas == (0.9, 0.999) and snap.eps == 1e-8


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("snapshot_lora")
    base, tok = save_and_reload(build_model(tokenizer, seed=0), tokenizer, root / "base")
    model = lora_model(base)
    pool = make_pool(48, seed=0)
    probe = LiveOptimizerProbe("save")
    args = sft_config(root / "run", save_strategy="steps", save_steps=2, save_total_limit=1, max_steps=6)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=with_row_ids(pool),
        processing_class=tok,
        callbacks=[LossRecorderCallback(), SnapshotCallback(), probe],
    )
    trainer.train()
    return root, trainer, probe, pool


def test_lora_snapshots_equal_live_adamw_despite_rotation(lora_run):
    root, trainer, probe, _ = lora_run
    assert sorted(p.name for p in (root / "run").glob("checkpoint-*")) == ["checkpoint-6"]  # rotated away
    store = RunStore.for_output_dir(root / "run")
    _check_against_probe(store, probe, [2, 4, 6])
    names = load_snapshot(store, 2).params
    assert names and all("lora_" in n for n in names)
    lrs = probe.lrs
    expected = [np.mean(lrs[0:2]), np.mean(lrs[2:4]), np.mean(lrs[4:6])]
    assert [load_snapshot(store, s).lr_mean for s in (2, 4, 6)] == pytest.approx(expected)
    assert store.manifest["snapshots"][0]["step"] == 2


def test_rebuild_from_store_through_from_pretrained(lora_run, tokenizer):
    root, trainer, _, pool = lora_run
    store = RunStore.for_output_dir(root / "run")
    rebuilt = load_model(store)
    assign_snapshot(rebuilt, load_snapshot(store, 6))
    trained = dict(trainer.model.named_parameters())
    for name, p in rebuilt.named_parameters():
        torch.testing.assert_close(p, trained[name].detach(), rtol=0, atol=0)  # frozen base and adapter alike
    tok = load_tokenizer(store)
    assert tok("add 1+2=")["input_ids"] == tokenizer("add 1+2=")["input_ids"]
    sub = pool.select(range(8))
    common = dict(k=None, dtype="float32", steps=[6], max_length=32, progress=False)
    (from_store,) = gradient_features(store, sub, **common)
    import shutil

    shutil.rmtree(store.path / "features")
    (from_override,) = gradient_features(store, sub, model=trainer.model, tokenizer=tokenizer, **common)
    np.testing.assert_allclose(from_store.raw(), from_override.raw(), rtol=1e-6, atol=1e-9)


def test_user_flow_selects_with_less(lora_run):
    root, _, _, pool = lora_run
    targets = make_pool(6, noise=0.0, seed=3, tasks=("add", "sort"))
    selector = DataSelector.from_run(root / "run", dataset=pool)
    subset = selector.select("less", budget=0.25, targets=targets, k=256, max_length=32)
    assert len(subset) == 12 and subset.column_names == pool.column_names
    assert selector.last.selection.method == "less"


def test_full_model_snapshots_at_explicit_steps_without_saves(tmp_path, tokenizer):
    model = build_model(tokenizer, seed=1)
    probe = LiveOptimizerProbe("step")
    trainer = SFTTrainer(
        model=model,
        args=sft_config(tmp_path / "run", save_strategy="no", max_steps=3),
        train_dataset=with_row_ids(make_pool(32, seed=2)),
        processing_class=tokenizer,
        callbacks=[SnapshotCallback(steps=[1, 3]), probe],
    )
    trainer.train()
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    store = RunStore.for_output_dir(tmp_path / "run")
    _check_against_probe(store, probe, [1, 3])
    snap = load_snapshot(store, 3)
    assert set(snap.params) == {n for n, p in model.named_parameters() if p.requires_grad}
    rebuilt = load_model(store)  # no loadable base name: every weight is in the snapshot, config from the store
    assign_snapshot(rebuilt, snap)
    for name, p in rebuilt.named_parameters():
        torch.testing.assert_close(p, dict(model.named_parameters())[name].detach(), rtol=0, atol=0)


def test_steps_must_be_positive():
    with pytest.raises(ValueError):
        SnapshotCallback(steps=[0, 2])


class _StopAt(TrainerCallback):
    """Ends training after step `step` (its checkpoint is saved first): an interrupted run."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resumed_run_keeps_the_learning_rates_before_its_checkpoint(tmp_path, tokenizer):
    """A snapshot after a resume weighs by the mean LR since the last snapshot, steps before the resume included."""
    pool = with_row_ids(make_pool(48, seed=0))

    def train(out, extra=(), resume=None):
        probe = LiveOptimizerProbe("step")
        args = sft_config(out, save_strategy="steps", save_steps=2, max_steps=7, lr_scheduler_type="linear")
        trainer = SFTTrainer(
            model=build_model(tokenizer, seed=0), args=args, train_dataset=pool, processing_class=tokenizer,
            callbacks=[SnapshotCallback(steps=[3, 7]), probe, *extra],
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return RunStore.for_output_dir(out), probe.lrs

    straight, lrs = train(tmp_path / "straight")
    train(tmp_path / "resumed", extra=[_StopAt(5)])  # interrupted after step 5; checkpoints at 2 and 4
    resumed, _ = train(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "checkpoint-4"))
    assert len(set(lrs[3:7])) > 1  # the rates differ, so losing steps 4's rate would show
    expected = {3: np.mean(lrs[0:3]), 7: np.mean(lrs[3:7])}
    for store in (straight, resumed):
        assert {e["step"]: e["lr_mean"] for e in read_snapshot_index(store)} == pytest.approx(expected, rel=1e-12)


def test_broken_learning_rate_record_is_named_not_guessed(tmp_path, tokenizer):
    """A resumed run whose LR record is not ours stops with the file's name and what to do; nothing is overwritten."""
    args = sft_config(tmp_path / "run", save_strategy="steps", save_steps=2, max_steps=4)
    trainer = SFTTrainer(
        model=build_model(tokenizer, seed=0), args=args, train_dataset=with_row_ids(make_pool(32, seed=0)),
        processing_class=tokenizer, callbacks=[SnapshotCallback(steps=[4])],
    )  # fmt: skip
    trainer.train()
    path = RunStore.for_output_dir(tmp_path / "run").path / "snapshots" / "lr_progress.json"
    assert sorted(json.loads(path.read_text())["saves"], key=int) == ["2", "4"]
    path.write_text('{"saves": [1, 2]}')
    with pytest.raises(StoreError, match="lr_progress.json.*delete"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert path.read_text() == '{"saves": [1, 2]}'
