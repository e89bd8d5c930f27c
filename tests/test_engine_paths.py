"""The engine's shortcuts (embedding scatter and rows, per-channel norms) vs plain autograd and the formed path."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_datasel.data import pad_batch, tokenize_rows
from hf_datasel.featurize import Featurizer, PerSampleGradients, ProjectorSpec, Snapshot
from hf_datasel.featurize import grads as engine_module
from hf_datasel.featurize.grads import Scratch, _Call, _scaled_output_grads
from hf_datasel.featurize.grads import _usable_scale as usable_scale
from hf_datasel.synthetic import make_pool


class Scale(torch.nn.Module):
    """Per channel: y_c = w_c · h_c (what every norm's weight does)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(-1.0, 2.0, d))

    def forward(self, h):
        return h * self.weight


class Reversed(torch.nn.Module):
    """A 1-D parameter that is NOT per channel: y_c = h_c + w_{d-1-c}."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, -0.5, d))

    def forward(self, h):
        return h + self.weight.flip(0)


class Toy(torch.nn.Module):
    def __init__(self, vocab: int = 9, d: int = 4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d, padding_idx=0)
        self.scale, self.reversed = Scale(d), Reversed(d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return SimpleNamespace(logits=self.head(torch.tanh(self.reversed(self.scale(self.emb(input_ids))))))


def _loop(toy, ids, labels):
    out = []
    for i in range(len(ids)):
        toy.zero_grad()
        logits = toy(ids[i : i + 1]).logits
        torch.nn.functional.cross_entropy(logits[0, :-1], labels[i, 1:], ignore_index=-100).backward()
        out.append({n: p.grad.clone() for n, p in toy.named_parameters()})
    return out


def test_embedding_scatter_and_per_channel_shortcut_are_exact():
    torch.manual_seed(0)
    toy = Toy()
    engine = PerSampleGradients(toy)
    owners = {o.name: o for o in engine.owners}
    assert owners["emb"].embedding and not owners["head"].embedding
    for _ in range(3):  # the first call compares the shortcut with vmap; later calls use what it decided
        ids = torch.randint(0, 9, (4, 6))
        ids[0, 1] = ids[0, 3] = 0  # the padding id as a real token: autograd gives its row no gradient
        ids[1, 2] = ids[1, 4] = 5  # a token twice in one row: its gradients add up
        labels = ids.clone()
        labels[2, :3] = -100
        grads, _, valid = engine(ids, torch.ones_like(ids), labels)
        assert valid.all()
        for i, ref in enumerate(_loop(toy, ids, labels)):
            for name, g in ref.items():
                torch.testing.assert_close(grads[name][i], g, rtol=1e-5, atol=1e-7)
        assert grads["emb.weight"][0, 0].abs().max() == 0
    assert owners["scale"].per_channel is True  # its shortcut gave the vmap result: kept
    assert owners["reversed"].per_channel is False  # it did not: vmap for good


class OnePlus(torch.nn.Module):
    """Per channel, scaling the output by 1 + w: y_c = (1 + w_c) · h_c (Gemma's norms)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.3, -0.6, d))

    def forward(self, h):
        return h * (1 + self.weight)


class DoubleShift(torch.nn.Module):
    """Per channel and affine, but its bias counts twice: y_c = w_c · h_c + 2 b_c."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.bias = torch.nn.Parameter(torch.linspace(-0.2, 0.2, d))

    def forward(self, h):
        return h * self.weight + 2 * self.bias


class Norms(torch.nn.Module):
    """Per-channel modules of each form; `write_into` makes the forward write into the first one's output, a zero
    `gate` cuts every norm off from the loss."""

    def __init__(self, vocab: int = 9, d: int = 4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.scale, self.one_plus, self.double_shift = Scale(d), OnePlus(d), DoubleShift(d)
        self.layer_norm = torch.nn.LayerNorm(d)
        with torch.no_grad():
            self.scale.weight.copy_(torch.linspace(-1.0, 2.0, d) + 0.3)  # no zero entry
            self.layer_norm.weight.copy_(torch.linspace(0.5, 1.5, d))
            self.layer_norm.bias.copy_(torch.linspace(0.3, -0.3, d))
        self.head = torch.nn.Linear(d, vocab)
        self.write_into, self.gate = False, 1.0

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        h = self.scale(self.emb(input_ids))
        if self.write_into:
            h.mul_(2)
        h = self.double_shift(self.layer_norm(self.one_plus(h))) * self.gate
        return SimpleNamespace(logits=self.head(torch.tanh(h)))


def test_per_channel_fast_forms_are_exact_and_step_aside_when_they_cannot_apply(monkeypatch):
    """`dw = Σ δ ⊙ y / w` for a module whose weight scales its output (`/ (1 + w)` for Gemma's (1 + w) ⊙ h), one
    forward for a LayerNorm's `w ⊙ s + b`, the general shortcut for w ⊙ h + 2b (which the fast forms would get
    wrong), a weight with a zero entry and an output the model wrote into (which `y / w` would get wrong)."""
    torch.manual_seed(0)
    toy = Norms()
    engine = PerSampleGradients(toy)
    owners = {o.name: o for o in engine.owners}

    def check():
        ids = torch.randint(0, 9, (4, 6))
        grads, _, valid = engine(ids, torch.ones_like(ids), ids)
        assert valid.all()
        for i, ref in enumerate(_loop(toy, ids, ids)):
            for name, g in ref.items():
                torch.testing.assert_close(grads[name][i], g, rtol=1e-5, atol=1e-7)

    toy.gate = 0.0
    check()  # every norm's gradient is zero: any shortcut would equal vmap, so none is decided yet
    norms = ("scale", "layer_norm", "one_plus", "double_shift")
    assert all(owners[name].per_channel is None for name in norms)
    toy.gate = 1.0
    check()  # compares the shortcuts with vmap
    assert all(owners[name].per_channel for name in norms)
    assert [owners[name].channel_form for name in norms] == ["scale", "scale_shift", "one_plus_scale", ""]
    checks = []
    monkeypatch.setattr(engine_module, "_usable_scale", lambda *args: checks.append(1) or usable_scale(*args))
    check()
    assert checks == []  # these weights were checked in an earlier batch
    with torch.no_grad():
        toy.scale.weight.mul_(1.5)  # new weights (as a snapshot's are)
    check()
    check()
    assert checks == [1]  # the scale is checked once for these weights (a host sync on CUDA), not every batch
    with torch.no_grad():
        toy.scale.weight[1] = 0.0
    check()  # a zero weight (a new version of it): no y / w
    assert checks == [1, 1] and owners["scale"].scale_check[1] is False
    with torch.no_grad():
        toy.scale.weight[1] = 0.5
    toy.write_into = True
    check()  # the model writes into the output: without taps, into a copy, so the call's output stays intact
    assert engine._tap is False and owners["scale"].channel_form == "scale"

    ids = torch.randint(0, 9, (2, 3))  # an output written into after the call (its version moved): no y / w
    h = toy.emb(ids)
    y = toy.scale(h)
    call = _Call(owners["scale"], (h,), {}, y, y._version)
    delta = torch.randn_like(y)
    expected = (delta * h).sum(1)
    torch.testing.assert_close(_scaled_output_grads(call, delta, 2)["weight"], expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        y.mul_(2)
    assert _scaled_output_grads(call, delta, 2) is None


def _untied_llama(vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _snapshot(model) -> Snapshot:
    gen = torch.Generator().manual_seed(1)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = {n: torch.randn(p.shape, generator=gen) * 1e-3 for n, p in params.items()}
    v = {n: torch.rand(p.shape, generator=gen) * 1e-5 for n, p in params.items()}
    return Snapshot(3, 1e-3, 1e-3, (0.9, 0.99), 1e-6, 3, params, m, v, {})


@pytest.fixture(scope="module")
def llama_batch(tokenizer):
    rows = tokenize_rows(make_pool(6, seed=5), tokenizer, 64)
    return _untied_llama(len(tokenizer)), pad_batch(rows, tokenizer.pad_token_id)


def _features(model, shapes, kind, k, precond, batch, rows: bool):
    featurizer = Featurizer(model, ProjectorSpec.create(shapes, k, seed=2, kind=kind), "cpu", fuse_bytes=0)
    if not rows:
        featurizer.engine.row_sparse_able = frozenset()
    featurizer.set_snapshot(_snapshot(model), precond)
    assert bool(featurizer.engine.row_sparse) == rows
    return featurizer.batch_features(batch)[0]


@pytest.mark.parametrize("precond", ["none", "adam", "adam_reference", "adam_factored"])
@pytest.mark.parametrize("kind", ["identity", "sparse", "tensor"])
def test_embedding_rows_path_equals_the_formed_gradients(llama_batch, kind, precond):
    """Only the rows a sample's tokens touch are computed; every other row's (constant) direction is added once."""
    model, batch = llama_batch
    shapes = {n: p.shape for n, p in model.named_parameters()}
    k = None if kind == "identity" else 512
    quick = _features(model, shapes, kind, k, precond, batch, rows=True)
    formed = _features(model, shapes, kind, k, precond, batch, rows=False)
    scale = formed.abs().max().item()
    torch.testing.assert_close(quick, formed, rtol=1e-4, atol=1e-5 * scale)


def test_embedding_rows_path_matches_the_adam_formula_on_loop_gradients(llama_batch, tokenizer):
    """Exact features through the rows path == AdamW's update direction of one-row autograd gradients."""
    model, batch = llama_batch
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    feats = _features(model, shapes, "identity", None, "adam", batch, rows=True).double().numpy()
    params = dict(model.named_parameters())
    g = []
    for i in range(batch["input_ids"].shape[0]):
        width = int(batch["attention_mask"][i].sum())
        model.zero_grad()
        model(**{key: t[i : i + 1, :width] for key, t in batch.items()}).loss.backward()
        g.append(torch.cat([params[n].grad.reshape(-1) for n in names]).double().numpy())
    g = np.stack(g)
    snap = _snapshot(model)
    m = np.concatenate([snap.exp_avg[n].reshape(-1).double().numpy() for n in names])
    v = np.concatenate([snap.exp_avg_sq[n].reshape(-1).double().numpy() for n in names])
    t = snap.optimizer_step + 1
    expected = ((0.9 * m + 0.1 * g) / (1 - 0.9**t)) / (np.sqrt((0.99 * v + 0.01 * g**2) / (1 - 0.99**t)) + 1e-6)
    np.testing.assert_allclose(feats, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_weight_blocks_formed_in_one_reused_buffer_equal_fresh_ones(llama_batch):
    """With a scratch buffer, consumed weight blocks share one buffer and hold the same numbers; kept ones never do."""
    model, batch = llama_batch
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    fresh = PerSampleGradients(model)(*inputs)[0]
    engine = PerSampleGradients(model)
    engine.scratch = Scratch()
    seen, buffers = {}, {}

    def consume(name, grads):
        seen[name] = grads.clone()
        buffers[name] = grads.untyped_storage().data_ptr()

    for _ in range(2):  # the buffer grows to the largest block during the first batch, then stays
        engine(*inputs, consume=consume)
        assert seen.keys() == fresh.keys()
        for name, grads in fresh.items():
            torch.testing.assert_close(seen[name], grads, rtol=0, atol=0)
    linear = [n for n in fresh if n.endswith("proj.weight") or n == "lm_head.weight"]
    assert len(linear) == 8 and len({buffers[n] for n in linear}) == 1
    kept = engine(*inputs)[0]  # returned blocks are kept by the caller: each its own memory
    assert len({g.untyped_storage().data_ptr() for g in kept.values()}) == len(kept)
    for name, grads in fresh.items():
        torch.testing.assert_close(kept[name], grads, rtol=0, atol=0)


def test_adam_factored_scales_on_factors_and_rows_keep_biases_exact():
    """adam_factored: linear weights scaled on their factors, embedding rows scaled, 1-D (biases, norms) exact Adam."""
    torch.manual_seed(0)
    toy = Toy()
    shapes = {n: p.shape for n, p in toy.named_parameters()}
    snapshot = _snapshot(toy)
    ids = torch.randint(1, 9, (4, 6))
    labels = ids.clone()
    featurizer = Featurizer(toy, ProjectorSpec.create(shapes, None, dtype="float32"), "cpu", fuse_bytes=0)
    featurizer.set_snapshot(snapshot, "adam_factored")
    assert set(featurizer.engine.weight_scales) == {"head.weight"} and featurizer.engine.row_sparse == {"emb.weight"}
    ours = featurizer.batch_features({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})[0]
    loop = _loop(toy, ids, labels)
    beta1, beta2 = snapshot.betas
    t, eps = snapshot.optimizer_step + 1, snapshot.eps
    c1, c2 = 1 - beta1**t, 1 - beta2**t
    expected = []
    for name in shapes:
        g = torch.stack([row[name] for row in loop]).double()
        m = snapshot.exp_avg[name].double() * beta1 / c1
        v = snapshot.exp_avg_sq[name].double() * beta2 / c2
        if g.dim() == 3:  # Adafactor's rank-one second moment, no per-sample g² term
            second = (v.sqrt() + eps) ** 2
            r, c, total = second.sum(1, keepdim=True), second.sum(0, keepdim=True), second.sum()
            u = ((1 - beta1) / c1 * g + m) * total.sqrt() / (r.sqrt() * c.sqrt())
        else:
            u = ((1 - beta1) / c1 * g + m) / (((1 - beta2) / c2 * g * g + v).sqrt() + eps)
        expected.append(u.reshape(len(g), -1))
    expected = torch.cat(expected, 1)
    error = (ours.double() - expected).norm(dim=1) / expected.norm(dim=1)
    assert float(error.max()) <= 1e-5


def test_output_gradients_are_handled_inside_the_backward_pass(tokenizer):
    """Each module's δ is turned into per-sample gradients as backward reaches it (last layer first), so only one
    is alive at a time; a model that writes into a module's output in place falls back to asking for all at once."""
    from hf_datasel.synthetic import build_model

    model = build_model(tokenizer, seed=0).eval()
    batch = pad_batch(tokenize_rows(make_pool(4, seed=2), tokenizer, 64), tokenizer.pad_token_id)
    order = []
    engine = PerSampleGradients(model)
    engine(**batch, consume=lambda name, grads: order.append((name, torch.is_grad_enabled())))
    layer = [int(n.split(".")[2]) for n, _ in order if n.startswith("model.layers.")]
    assert layer == sorted(layer, reverse=True) and layer[0] > layer[-1]  # backward order
    assert not any(enabled for name, enabled in order if name.startswith("model.layers."))  # inside autograd

    class InPlace(torch.nn.Module):  # writes into its Linear's output in place: Falcon's decoder layer adds; a
        # scale also changes the output's gradient, so δ must be that of the output before the write
        def __init__(self):
            super().__init__()
            self.emb, self.lin, self.head = torch.nn.Embedding(9, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 9)

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            h = self.emb(input_ids)
            out = self.lin(h)
            out *= 1.5
            out += h
            return SimpleNamespace(logits=self.head(torch.tanh(out)))

    torch.manual_seed(0)
    toy = InPlace()
    ids = torch.randint(0, 9, (3, 5))
    engine = PerSampleGradients(toy)
    grads, _, _ = engine(ids, torch.ones_like(ids), ids)
    assert engine._tap is False
    for i, ref in enumerate(_loop(toy, ids, ids)):
        for name, g in ref.items():
            torch.testing.assert_close(grads[name][i], g, rtol=1e-5, atol=1e-7)


def test_a_forward_that_fails_for_its_own_reasons_keeps_the_taps(tokenizer):
    """Only a forward that fails with the taps and runs without them turns them off; any other error is the model's
    own, raised as it is."""
    from hf_datasel.synthetic import build_model

    model = build_model(tokenizer, seed=0).eval()
    batch = pad_batch(tokenize_rows(make_pool(2, seed=2), tokenizer, 64), tokenizer.pad_token_id)
    engine = PerSampleGradients(model)
    calls = []

    def broken(module, args, output):
        calls.append(1)
        raise RuntimeError("the model's own failure")

    hook = model.model.layers[0].register_forward_hook(broken)
    with pytest.raises(RuntimeError, match="the model's own failure"):
        engine(**batch)
    hook.remove()
    assert engine._tap is True and len(calls) == 2  # tried once more without the taps
    engine(**batch)
    assert engine._tap is True


def test_a_write_into_one_output_of_a_tuple_leaves_its_gradient_exact():
    """A module with two outputs (as an MoE router has) whose first the model scales in place afterwards."""

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 4))

        def forward(self, h):
            return h * self.weight, torch.tanh(h * self.weight)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pair, self.head = torch.nn.Embedding(9, 4), Pair(), torch.nn.Linear(4, 9)

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            a, b = self.pair(self.emb(input_ids))
            a.mul_(1.5)
            return SimpleNamespace(logits=self.head(a + b))

    torch.manual_seed(0)
    toy = Toy()
    ids = torch.randint(0, 9, (3, 5))
    grads, _, _ = PerSampleGradients(toy)(ids, torch.ones_like(ids), ids)
    for i, ref in enumerate(_loop(toy, ids, ids)):
        for name, g in ref.items():
            torch.testing.assert_close(grads[name][i], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
@pytest.mark.parametrize("precond", ["none", "adam"])
def test_column_pair_scatter_on_other_layouts_gives_the_sketch_of_exact_features(tokenizer, family, precond):
    """GPT-2's Conv1D (in, out) and OPT's biased linears through the signed complex scatter == the tensor
    projection of their exact features (every weight formed; tied embeddings keep the plain path)."""
    from hf_datasel.synthetic.families import build_family_model

    model = build_family_model(family, tokenizer)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    rows = tokenize_rows(make_pool(6, seed=7), tokenizer, 48)
    batch = pad_batch(rows, tokenizer.pad_token_id)
    snapshot = _snapshot(model)
    exact = Featurizer(model, ProjectorSpec.create(shapes, None, dtype="float32"), "cpu")
    exact.set_snapshot(snapshot, precond)
    spec = ProjectorSpec.create(shapes, 512, seed=4, kind="tensor", dtype="float32")
    featurizer = Featurizer(model, spec, "cpu", fuse_bytes=0)
    featurizer.set_snapshot(snapshot, precond)
    assert featurizer._paired
    ours = featurizer.batch_features(batch)[0]
    expected = featurizer.projector.project_flat(exact.batch_features(batch)[0])
    error = (ours - expected).norm(dim=1) / expected.norm(dim=1)
    assert float(error.max()) <= 1e-5


def test_label_positions_are_each_rows_predicting_positions_in_order():
    from hf_datasel.record.per_sample_loss import label_positions

    labels = torch.full((3, 8), -100)
    labels[0, 5:7] = 1  # predicted at positions 4, 5
    labels[1, 3:8] = 2  # at 2..6: the most, so K = 5
    # row 2 has none: every one of its entries predicts no label
    kept = label_positions(labels)
    assert kept[0, :2].tolist() == [4, 5] and kept[1].tolist() == [2, 3, 4, 5, 6]
    shifted = labels[:, 1:]
    assert (torch.take_along_dim(shifted, kept, 1) != -100).sum(1).tolist() == [2, 5, 0]
    assert label_positions(torch.ones(2, 8, dtype=torch.long)) is None  # every position: nothing to leave out
    assert label_positions(torch.full((2, 8), -100)) is None


class IgnoresKeep(torch.nn.Module):
    """A causal LM that takes `logits_to_keep` but computes every position's logits anyway."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


@pytest.mark.parametrize("wrapped", [False, True], ids=["llama", "ignores-logits_to_keep"])
def test_the_lm_head_runs_only_where_a_label_is_predicted(wrapped):
    """Completion-only rows: the LM head sees the positions that predict a label (fewer than the row's tokens), and
    every per-sample gradient (the LM head's too) is still the one-row autograd gradient on full logits."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    llama = LlamaForCausalLM(config).eval()
    model = IgnoresKeep(llama) if wrapped else llama
    ids = torch.randint(1, 40, (3, 12))
    labels = ids.clone()
    labels[:, :8] = -100  # the prompt
    labels[2, 8:10] = -100
    seen = []
    llama.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    names = [n for n, _ in llama.named_parameters()]
    engine = PerSampleGradients(model, [("inner." if wrapped else "") + n for n in names])
    grads, loss, valid = engine(ids, torch.ones_like(ids), labels)
    assert valid.all() and seen == ([12] if wrapped else [4])  # 4 = the most label tokens a row has
    for i in range(3):
        llama.zero_grad()
        logits = llama(input_ids=ids[i : i + 1]).logits
        torch.nn.functional.cross_entropy(logits[0, :-1], labels[i, 1:], ignore_index=-100).backward()
        for n, p in llama.named_parameters():
            torch.testing.assert_close(grads[("inner." if wrapped else "") + n][i], p.grad, rtol=1e-4, atol=1e-6)


class OldStyleKeep(torch.nn.Module):
    """`logits_to_keep` the way transformers 5.0 took it: `hidden[:, logits_to_keep]`, so a (B, K) tensor gives
    every row every row's positions."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
        hidden = self.inner.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return SimpleNamespace(logits=self.inner.lm_head(hidden[:, keep, :]))


def test_per_row_logits_to_keep_only_where_transformers_slices_it(monkeypatch):
    """A transformers without `slice_logits_to_keep` gets every position's logits; a forward that indexes with the
    positions tensor the old way is refused with what to do, never read as per-row logits."""
    import transformers.modeling_utils

    from hf_datasel.record.per_sample_loss import forward_at_labels

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    llama = LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 40, (3, 12))
    labels = ids.clone()
    labels[:, :8] = -100
    old = OldStyleKeep(llama)
    with pytest.raises(ValueError, match="lm_head_at_labels=False"):
        PerSampleGradients(old)(ids, torch.ones_like(ids), labels)
    plain = PerSampleGradients(old, lm_head_at_labels=False)(ids, torch.ones_like(ids), labels)[0]
    monkeypatch.delattr(transformers.modeling_utils, "slice_logits_to_keep")  # as in transformers 5.0
    engine = PerSampleGradients(old)
    assert not engine._keep_logits
    for name, g in engine(ids, torch.ones_like(ids), labels)[0].items():
        torch.testing.assert_close(g, plain[name], rtol=0, atol=0)
    with torch.no_grad():
        outputs, kept = forward_at_labels(llama, {"input_ids": ids}, labels)
    assert kept is None and outputs.logits.shape[1] == 12
