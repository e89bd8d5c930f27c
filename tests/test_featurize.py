"""Per-sample gradient features: exactness, Adam preconditioning, projections, storage, resume, shards."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch

from hf_datasel.data import pad_batch, tokenize_rows
from hf_datasel.featurize import (
    Featurizer,
    PerSampleGradients,
    Projector,
    ProjectorSpec,
    Snapshot,
    SpecMismatchError,
    adam_precondition,
    check_same_space,
    gradient_features,
)
from hf_datasel.featurize import features as features_module
from hf_datasel.synthetic import build_model, make_pool
from tests.gradient_store import lora_model, make_snapshot_store


def _model(tokenizer, peft: bool):
    model = build_model(tokenizer, seed=0)
    return (lora_model(model) if peft else model).eval()


def _loop_gradients(model, rows, pad_token_id, names) -> torch.Tensor:
    """The reference: one row at a time, plain autograd, gradients concatenated in `names` order."""
    params = dict(model.named_parameters())
    out = []
    for row in rows:
        model.zero_grad()
        model(**pad_batch([row], pad_token_id)).loss.backward()
        out.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
    return torch.stack(out)


@pytest.fixture(scope="module")
def rows(tokenizer):
    rows = tokenize_rows(make_pool(12, seed=3), tokenizer, 64)
    assert len({len(r["input_ids"]) for r in rows}) >= 3  # rows of different lengths
    return rows


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_exact_mode_equals_autograd_loop(tokenizer, rows, peft, padding_side):
    model = _model(tokenizer, peft)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    spec = ProjectorSpec.create({n: p.shape for n, p in model.named_parameters() if p.requires_grad}, k=None)
    assert spec.kind == "identity" and spec.k == sum(p.numel() for p in model.parameters() if p.requires_grad)
    featurizer = Featurizer(model, spec, "cpu")
    featurizer.set_snapshot(None)
    feats, loss, valid = featurizer.batch_features(pad_batch(rows, tokenizer.pad_token_id, padding_side))
    reference = _loop_gradients(model, rows, tokenizer.pad_token_id, names)
    assert valid.all()
    assert reference.abs().max() > 0
    torch.testing.assert_close(feats, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_full_model_covers_tied_embeddings_and_norms(tokenizer, rows):
    model = _model(tokenizer, peft=False)
    engine = PerSampleGradients(model)
    assert "model.embed_tokens.weight" in engine.param_names  # tied with lm_head: one name, both uses
    assert any("norm" in n for n in engine.param_names)
    grads, _, valid = engine(**pad_batch(rows[:3], tokenizer.pad_token_id))
    assert set(grads) == set(engine.param_names) and valid.all()


def test_row_without_label_tokens_is_invalid(tokenizer, rows):
    model = _model(tokenizer, peft=True)
    engine = PerSampleGradients(model)
    masked = {"input_ids": rows[0]["input_ids"], "labels": [-100] * len(rows[0]["input_ids"])}
    grads, loss, valid = engine(**pad_batch([masked, rows[1]], tokenizer.pad_token_id))
    assert valid.tolist() == [False, True] and torch.isnan(loss[0])
    assert all(g[0].abs().max() == 0 for g in grads.values())


def _fake_snapshot(model, step=3, seed=0) -> Snapshot:
    gen = torch.Generator().manual_seed(seed)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    m = {n: torch.randn(p.shape, generator=gen) * 1e-3 for n, p in params.items()}
    v = {n: torch.rand(p.shape, generator=gen) * 1e-5 for n, p in params.items()}
    return Snapshot(step, 1e-3, 1e-3, (0.9, 0.99), 1e-6, step, params, m, v, {})


@pytest.mark.parametrize("form", ["adam", "adam_reference"])
def test_adam_preconditioning_matches_independent_formula(tokenizer, rows, form):
    model = _model(tokenizer, peft=True)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    snapshot = _fake_snapshot(model)
    featurizer = Featurizer(model, ProjectorSpec.create(shapes, k=None), "cpu")
    featurizer.set_snapshot(snapshot, form)
    feats, _, _ = featurizer.batch_features(pad_batch(rows, tokenizer.pad_token_id))
    g = _loop_gradients(model, rows, tokenizer.pad_token_id, list(shapes)).double().numpy()
    m = np.concatenate([snapshot.exp_avg[n].reshape(-1).double().numpy() for n in shapes])
    v = np.concatenate([snapshot.exp_avg_sq[n].reshape(-1).double().numpy() for n in shapes])
    m1, v1 = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g**2
    if form == "adam":
        t = snapshot.optimizer_step + 1
        expected = (m1 / (1 - 0.9**t)) / (np.sqrt(v1 / (1 - 0.99**t)) + 1e-6)
    else:
        expected = m1 / np.sqrt(v1 + 1e-8)
    np.testing.assert_allclose(feats.double().numpy(), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


@pytest.mark.parametrize("form", ["adam", "adam_reference"])
def test_adam_directions_use_the_moments_in_place(form):
    """The constants hold the optimizer's own moments, not copies; scratch buffers or not, the same directions."""
    from hf_datasel.featurize.features import AdamConstants
    from hf_datasel.featurize.grads import Scratch

    gen = torch.Generator().manual_seed(0)
    m, v = torch.randn(5, 7, generator=gen) * 1e-3, torch.rand(5, 7, generator=gen) * 1e-5
    c = AdamConstants.create(m, v, 4, (0.9, 0.99), 1e-6, form)
    assert c.m.data_ptr() == m.data_ptr() and c.v.data_ptr() == v.data_ptr()
    g = torch.randn(3, 5, 7, generator=gen)
    scratch = Scratch()
    plain, reused = c.apply_(g.clone()), c.apply_(g.clone(), scratch)
    again = c.apply_(g.clone(), scratch)  # the slots reused
    assert torch.equal(plain, reused) and torch.equal(plain, again)
    g64, m64, v64 = g.double(), m.double(), v.double()
    m1, v1 = 0.9 * m64 + 0.1 * g64, 0.99 * v64 + 0.01 * g64**2
    if form == "adam":  # step 4 taken: this is the 5th
        expected = (m1 / (1 - 0.9**5)) / ((v1 / (1 - 0.99**5)).sqrt() + 1e-6)
    else:
        expected = m1 / (v1 + 1e-8).sqrt()
    torch.testing.assert_close(plain.double(), expected, rtol=1e-5, atol=0)
    assert torch.equal(m, c.m) and torch.equal(v, c.v)  # untouched


def test_adam_precondition_rejects_unknown_form():
    with pytest.raises(ValueError):
        adam_precondition(torch.ones(1, 2), torch.zeros(2), torch.zeros(2), 0, (0.9, 0.99), 1e-8, form="sgd")


def _cosines(x: np.ndarray) -> np.ndarray:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    return (u @ u.T)[np.triu_indices(len(x), 1)]


@pytest.mark.parametrize("kind", ["sparse", "rademacher", "gaussian"])
def test_projected_cosines_within_stated_tolerance(tokenizer, kind):
    model = _model(tokenizer, peft=True)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    rows = tokenize_rows(make_pool(40, seed=5), tokenizer, 64)
    batch = pad_batch(rows, tokenizer.pad_token_id)
    exact = Featurizer(model, ProjectorSpec.create(shapes, k=None), "cpu")
    exact.set_snapshot(None)
    x = exact.batch_features(batch)[0].double().numpy()
    k = 512
    spec = ProjectorSpec.create(shapes, k=k, seed=1, kind=kind)
    projected = Featurizer(model, spec, "cpu")
    projected.set_snapshot(None)
    y = projected.batch_features(batch)[0].double().numpy()
    err = _cosines(y) - _cosines(x)  # 780 pairs
    assert np.all(np.abs(err) <= spec.cosine_tolerance())
    assert np.sqrt(np.mean(err**2)) <= math.sqrt(2 / k)
    # inner products too: relative to |x||y|, the same bound
    ip_err = (y @ y.T - x @ x.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1))
    assert np.all(np.abs(ip_err) <= spec.cosine_tolerance())


def test_projector_is_seeded_and_bounded(tokenizer):
    model = _model(tokenizer, peft=True)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    batch = pad_batch(tokenize_rows(make_pool(8, seed=2), tokenizer, 64), tokenizer.pad_token_id)
    outs = []
    for seed, cache in ((0, 1 << 30), (0, 0), (1, 1 << 30)):  # cache off: chunks regenerated, same numbers
        f = Featurizer(model, ProjectorSpec.create(shapes, k=64, seed=seed, kind="rademacher"), "cpu")
        f.projector.cache_bytes = cache
        f.set_snapshot(None)
        outs.append(f.batch_features(batch)[0])
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])
    big = ProjectorSpec.create({"w": (1 << 20,)}, k=4096, kind="rademacher")
    assert big.chunk_rows * big.k <= 1 << 22  # a chunk, never the whole k x P matrix


@pytest.mark.parametrize("kind", ["sparse", "tensor", "rademacher"])
def test_one_off_projection_caches_nothing(kind):
    """A constant projected once per snapshot (`keep=False`) gives the cached path's numbers and keeps no chunk."""
    spec = ProjectorSpec.create({"w": (24, 40), "b": (40,)}, 128, seed=4, kind=kind)
    grads = {"w": torch.randn(1, 24, 40), "b": torch.randn(1, 40)}
    once, cached = Projector(spec), Projector(spec)
    out_once, out_cached = once.new_output(1), cached.new_output(1)
    for name, g in grads.items():
        once.add(out_once, name, g, keep=False)
        cached.add(out_cached, name, g)
    assert torch.equal(out_once, out_cached)
    assert not [key for key in once._cache if key[1] != -1]  # (only the O(d0 + d1) factor hashes)
    assert cached._cache


def test_store_features_same_seed_identical_different_spec_refused(tmp_path, tokenizer):
    pool = make_pool(20, seed=1)
    store, _ = make_snapshot_store(tmp_path, tokenizer, pool)
    a = gradient_features(store, pool, k=128, seed=0, progress=False)
    shutil.rmtree(store.path / "features")
    b = gradient_features(store, pool, k=128, seed=0, progress=False)
    assert [f.step for f in a] == [2, 4] and abs(sum(f.weight for f in a) - 1) < 1e-12
    for fa, fb in zip(a, b):
        assert fa.unit.dtype == np.float16 and fa.unit.shape == (20, 128)
        np.testing.assert_array_equal(np.asarray(fa.unit), np.asarray(fb.unit))
        np.testing.assert_array_equal(fa.norms, fb.norms)
    c = gradient_features(store, pool, k=128, seed=1, progress=False)
    d = gradient_features(store, pool, k=64, seed=0, progress=False)
    for other in (c[0], d[0]):
        with pytest.raises(SpecMismatchError):
            check_same_space(a[0], other)
    check_same_space(a[0], b[0])


def test_stored_exact_features_match_loop_and_mark_undefined_rows(tmp_path, tokenizer):
    pool = make_pool(10, seed=4)
    pool = pool.add_item(
        {"prompt": "copy " + "abcdefgh" * 8 + "=", "completion": "ab", "task": "copy", "is_noisy": False}
    )
    store, model = make_snapshot_store(tmp_path, tokenizer, pool, steps=(3,))
    (fs,) = gradient_features(store, pool, k=None, dtype="float32", max_length=32, batch_size=4, progress=False)
    assert np.isnan(fs.norms[-1]) and np.isnan(fs.unit[-1]).all()  # completion truncated away: undefined
    model.eval()
    rows = tokenize_rows(pool.select(range(10)), tokenizer, 32)
    ref = _loop_gradients(model, rows, tokenizer.pad_token_id, list(fs.spec.param_names)).numpy()
    np.testing.assert_allclose(fs.raw(np.arange(10)), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    with torch.no_grad():  # each row's stored loss is the loss the model gives it alone
        losses = [model(**pad_batch([row], tokenizer.pad_token_id)).loss.item() for row in rows]
    assert fs.loss.dtype == np.float32 and np.isnan(fs.loss[-1])
    np.testing.assert_allclose(fs.loss[:10], losses, rtol=1e-5)


def test_a_cache_written_without_losses_still_opens(tmp_path, tokenizer):
    """Feature folders from before `loss.npy` was stored keep working; their `loss` is None."""
    pool = make_pool(10, seed=4)
    store, _ = make_snapshot_store(tmp_path, tokenizer, pool, steps=(3,))
    (fs,) = gradient_features(store, pool, k=64, batch_size=4, progress=False)
    assert fs.loss.shape == (10,) and np.isfinite(fs.loss).all()
    (fs.path / "loss.npy").unlink()
    (old,) = gradient_features(store, pool, k=64, batch_size=4, progress=False)
    assert old.loss is None
    np.testing.assert_array_equal(old.norms, fs.norms)


_ORIGINAL_BATCH_FEATURES = features_module.Featurizer.batch_features


class SimulatedInterruption(Exception):
    pass


def _count_batches(monkeypatch, fail_after: int | None = None) -> dict:
    counter = {"n": 0}
    original = _ORIGINAL_BATCH_FEATURES

    def counting(self, batch):
        if fail_after is not None and counter["n"] >= fail_after:
            raise SimulatedInterruption("simulated interruption")
        counter["n"] += 1
        return original(self, batch)

    monkeypatch.setattr(features_module.Featurizer, "batch_features", counting)
    return counter


def test_cached_features_read_no_snapshot_weights(tmp_path, tokenizer, monkeypatch):
    """A call whose features are complete names them from the snapshot file's header alone: for a large model,
    reading weights and Adam moments would cost more than the features (every `selector.run` makes this call)."""
    from hf_datasel.featurize import load_snapshot, snapshot_steps
    from hf_datasel.featurize.snapshots import snapshot_param_shapes

    pool = make_pool(12, seed=6)
    store, _ = make_snapshot_store(tmp_path, tokenizer, pool, steps=(1, 2))
    first = gradient_features(store, pool, k=64, batch_size=8, progress=False)
    for step in snapshot_steps(store):
        assert snapshot_param_shapes(store, step) == load_snapshot(store, step).param_shapes

    def refused(*args, **kwargs):
        raise AssertionError("snapshot weights read for cached features")

    monkeypatch.setattr(features_module, "load_snapshot", refused)
    again = gradient_features(store, pool, k=64, batch_size=8, progress=False)
    assert [(f.path, f.weight) for f in again] == [(f.path, f.weight) for f in first]
    with pytest.raises(AssertionError, match="snapshot weights read"):  # features still to compute do read them
        gradient_features(store, pool, k=32, batch_size=8, progress=False)


def test_interrupted_featurization_resumes_without_recomputing(tmp_path, tokenizer, monkeypatch):
    pool = make_pool(40, seed=6)
    store, _ = make_snapshot_store(tmp_path, tokenizer, pool, steps=(2,))
    reference_store = tmp_path / "reference"
    shutil.copytree(store.path, reference_store)
    counter = _count_batches(monkeypatch, fail_after=3)
    with pytest.raises(SimulatedInterruption):
        gradient_features(store, pool, k=64, batch_size=8, progress=False)
    assert counter["n"] == 3
    counter = _count_batches(monkeypatch)
    (resumed,) = gradient_features(store, pool, k=64, batch_size=8, progress=False)
    assert counter["n"] == 5 - 3  # 40 rows / 8 = 5 batches, 3 already done
    counter["n"] = 0
    gradient_features(store, pool, k=64, batch_size=8, progress=False)
    assert counter["n"] == 0  # cached
    from hf_datasel.store import RunStore

    (full,) = gradient_features(RunStore(reference_store), pool, k=64, batch_size=8, progress=False)
    np.testing.assert_array_equal(np.asarray(resumed.unit), np.asarray(full.unit))
    np.testing.assert_array_equal(resumed.norms, full.norms)
    np.testing.assert_array_equal(resumed.loss, full.loss)


def test_an_unfinished_shard_of_an_older_version_is_started_over(tmp_path, tokenizer, monkeypatch):
    """A shard interrupted before `loss.npy` existed has no loss file: its batches are recomputed, not kept
    without losses."""
    pool = make_pool(40, seed=6)
    store, _ = make_snapshot_store(tmp_path, tokenizer, pool, steps=(2,))
    _count_batches(monkeypatch, fail_after=3)
    with pytest.raises(SimulatedInterruption):
        gradient_features(store, pool, k=64, batch_size=8, progress=False)
    (old_loss,) = store.path.rglob("shard-*/loss.npy")
    old_loss.unlink()
    counter = _count_batches(monkeypatch)
    (resumed,) = gradient_features(store, pool, k=64, batch_size=8, progress=False)
    assert counter["n"] == 5 and np.isfinite(resumed.loss).all()


def test_a_failed_write_is_raised_and_no_batch_after_it_is_logged(tmp_path, tokenizer, monkeypatch):
    """A disk-full error while writing features reaches the caller as it is; the batches flushed before it
    stay done, none from the failed one on is logged, and the next call finishes them bit for bit."""
    import errno

    from hf_datasel.store import RunStore

    pool = make_pool(40, seed=6)
    store, _ = make_snapshot_store(tmp_path, tokenizer, pool, steps=(2,))
    reference_store = tmp_path / "reference"
    shutil.copytree(store.path, reference_store)
    monkeypatch.setitem(features_module.featurize_rows.__kwdefaults__, "flush_every", 1)
    original, unit_writes = features_module._RowFile.write, []

    def write(self, rows, values):
        if values.ndim == 2:  # unit.npy; norms.npy is 1-d
            unit_writes.append(1)
            if len(unit_writes) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        original(self, rows, values)

    monkeypatch.setattr(features_module._RowFile, "write", write)
    with pytest.raises(OSError, match="No space left"):
        gradient_features(store, pool, k=64, batch_size=8, progress=False)
    (log,) = store.path.rglob("done.log")
    assert log.read_text().split() == ["0", "1"]  # 5 batches: the 3rd failed, the 4th and 5th are not logged
    monkeypatch.undo()
    counter = _count_batches(monkeypatch)
    (resumed,) = gradient_features(store, pool, k=64, batch_size=8, progress=False)
    assert counter["n"] == 3
    (full,) = gradient_features(RunStore(reference_store), pool, k=64, batch_size=8, progress=False)
    np.testing.assert_array_equal(np.asarray(resumed.unit), np.asarray(full.unit))
    np.testing.assert_array_equal(resumed.norms, full.norms)


@pytest.mark.parametrize("system", ["posix", "no-pwrite-no-fdatasync"])
def test_row_file_writes_scattered_rows_in_place(tmp_path, monkeypatch, system):
    """The shard writer: runs of consecutive rows, single rows and rows out of order land where numpy puts them;
    also where `os.pwrite` (Windows) or `os.fdatasync` (macOS) does not exist."""
    if system != "posix":
        monkeypatch.delattr(os, "pwrite", raising=False)
        monkeypatch.delattr(os, "fdatasync", raising=False)
    path = tmp_path / "unit.npy"
    reference = np.full((9, 5), np.nan, np.float16)
    np.save(path, reference)
    rows = features_module._RowFile(path)
    for positions in ([0, 1, 2], [4], [8, 6], [7, 3, 5]):
        values = np.random.default_rng(len(positions)).standard_normal((len(positions), 5))
        rows.write(np.asarray(positions), values)  # float64 in: cast to the file's dtype
        reference[positions] = values
    rows.sync()
    rows.close()
    np.testing.assert_array_equal(np.load(path), reference)


def test_two_shard_merge_equals_single_run(tmp_path, tokenizer):
    from hf_datasel.store import RunStore

    pool = make_pool(30, seed=7)
    store, _ = make_snapshot_store(tmp_path, tokenizer, pool)
    single_store = tmp_path / "single"
    shutil.copytree(store.path, single_store)
    assert gradient_features(store, pool, k=64, batch_size=4, shard=(0, 2), progress=False) is None
    merged = gradient_features(store, pool, k=64, batch_size=4, shard=(1, 2), progress=False)
    single = gradient_features(RunStore(single_store), pool, k=64, batch_size=4, progress=False)
    for a, b in zip(merged, single):
        np.testing.assert_array_equal(np.asarray(a.unit), np.asarray(b.unit))
        np.testing.assert_array_equal(a.norms, b.norms)
        np.testing.assert_array_equal(a.loss, b.loss)
        assert np.isfinite(a.loss).all()
    assert not list(merged[0].path.glob("shard-*"))


def test_gradient_checkpointed_model_gives_the_same_features(tokenizer, rows):
    model = _model(tokenizer, peft=False)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    batch = pad_batch(rows[:4], tokenizer.pad_token_id)
    plain = Featurizer(model, ProjectorSpec.create(shapes, k=None), "cpu")
    plain.set_snapshot(None)
    expected = plain.batch_features(batch)[0]
    model.gradient_checkpointing_enable()
    checkpointed = Featurizer(model, ProjectorSpec.create(shapes, k=None), "cpu")
    checkpointed.set_snapshot(None)
    torch.testing.assert_close(checkpointed.batch_features(batch)[0], expected)


def test_generic_path_handles_keyword_inputs():
    """A module called with its batch as a keyword argument still gets exact per-sample gradients."""

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

        def forward(self, hidden):
            return hidden * self.weight

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(7, 3)
            self.scale = Scale()
            self.head = torch.nn.Linear(3, 7)

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            from types import SimpleNamespace

            return SimpleNamespace(logits=self.head(self.scale(hidden=self.emb(input_ids))))

    torch.manual_seed(0)
    toy = Toy()
    ids = torch.randint(0, 7, (3, 5))
    labels = ids.clone()
    labels[1, :2] = -100
    grads, _, valid = PerSampleGradients(toy)(ids, torch.ones_like(ids), labels)
    for i in range(3):
        toy.zero_grad()
        logits = toy(ids[i : i + 1]).logits
        torch.nn.functional.cross_entropy(logits[0, :-1], labels[i, 1:], ignore_index=-100).backward()
        for name, p in toy.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["sparse", "tensor", "rademacher"])
def test_fused_and_blockwise_paths_agree(tokenizer, rows, kind):
    """Small P: one (B, P) buffer; large P: block by block. Same features either way (with "tensor", block by
    block the LoRA A matrices are signed on their factors and scattered in column pairs; fused, they are not)."""
    model = _model(tokenizer, peft=True)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    snapshot = _fake_snapshot(model)
    batch = pad_batch(rows[:6], tokenizer.pad_token_id)
    out = []
    for fuse_bytes in (1 << 30, 0):
        f = Featurizer(model, ProjectorSpec.create(shapes, k=96, seed=3, kind=kind), "cpu", fuse_bytes=fuse_bytes)
        assert bool(f._paired) == (kind == "tensor")
        f.set_snapshot(snapshot, "adam")
        out.append(f.batch_features(batch)[0])
    # the two paths add the same P terms g_p·R_pj in another order. fp32 rounding of a sum of P terms stays within
    # λ·sqrt(P)·u·Σ_p |g_p R_pj| but with probability 1 - 2P·exp(-λ²/2) (Higham & Mary 2019; λ = 8: < 1e-10), so the
    # paths differ by at most twice that; |R_pj| is 1 for the sketches, 1/sqrt(k) for Rademacher
    exact = Featurizer(model, ProjectorSpec.create(shapes, k=None), "cpu")
    exact.set_snapshot(snapshot, "adam")
    g = exact.batch_features(batch)[0]
    entry = 1.0 / math.sqrt(96) if kind == "rademacher" else 1.0
    unit_roundoff = torch.finfo(torch.float32).eps / 2
    bound = 2 * 8 * math.sqrt(g.shape[1]) * unit_roundoff * g.abs().sum(1, keepdim=True) * entry
    assert bool(((out[0] - out[1]).abs() <= bound).all())
    assert float(bound.max()) < 1e-2 * float(out[0].abs().max())  # tight enough to catch a term left out


_SHARD_SCRIPT = """
import sys
from hf_datasel.featurize import gradient_features
from hf_datasel.store import RunStore
from hf_datasel.synthetic import make_pool
index = int(sys.argv[2])
gradient_features(RunStore(sys.argv[1]), make_pool(20, seed=8), k=32, batch_size=4, shard=(index, 2), progress=False)
"""


def test_two_processes_featurize_shards_concurrently(tmp_path, tokenizer):
    import os
    import subprocess
    import sys

    from hf_datasel.store import RunStore

    pool = make_pool(20, seed=8)
    store, _ = make_snapshot_store(tmp_path, tokenizer, pool, steps=(2,))
    single_store = tmp_path / "single"
    shutil.copytree(store.path, single_store)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _SHARD_SCRIPT, str(store.path), str(i)], env=env) for i in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    (merged,) = gradient_features(store, pool, k=32, batch_size=4, progress=False)  # complete: read from cache
    (single,) = gradient_features(RunStore(single_store), pool, k=32, batch_size=4, progress=False)
    np.testing.assert_array_equal(np.asarray(merged.unit), np.asarray(single.unit))
    np.testing.assert_array_equal(merged.norms, single.norms)
