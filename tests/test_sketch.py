"""Full-model features without forming per-sample gradients: the "tensor" sketch, factored paths, adam_factored."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from hf_datasel.data import pad_batch, tokenize_rows
from hf_datasel.featurize import Featurizer, Projector, ProjectorSpec, Snapshot
from hf_datasel.featurize import features as features_module
from hf_datasel.featurize.features import AdamConstants
from hf_datasel.featurize.grads import PerSampleGradients
from hf_datasel.featurize.projector import PAIRED_MIN_COLUMNS
from hf_datasel.synthetic import TinyLlamaSpec, build_model, make_pool

SPEC = TinyLlamaSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


@pytest.fixture(scope="module")
def setup(tokenizer):
    """A tiny full Llama after two AdamW steps (non-zero moments), its snapshot, and padded batches."""
    model = build_model(tokenizer, SPEC, seed=0)
    rows = tokenize_rows(make_pool(48, seed=3), tokenizer, 48)
    batches = [pad_batch(rows[i : i + 16], tokenizer.pad_token_id) for i in range(0, 48, 16)]
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for b in batches[:2]:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    snapshot = Snapshot(
        step=2, lr=1e-3, lr_mean=1e-3, betas=(0.9, 0.999), eps=1e-8, optimizer_step=2,
        params={n: p.detach().clone() for n, p in params.items()},
        exp_avg={n: opt.state[p]["exp_avg"].clone() for n, p in params.items()},
        exp_avg_sq={n: opt.state[p]["exp_avg_sq"].clone() for n, p in params.items()},
        entry={},
    )  # fmt: skip
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    return model, snapshot, batches, shapes


def _exact_gradients(model, batches) -> torch.Tensor:
    engine = PerSampleGradients(model)
    out = []
    for b in batches:
        grads, _, _ = engine(b["input_ids"], b["attention_mask"], b["labels"])
        out.append(torch.cat([grads[n].reshape(len(b["input_ids"]), -1) for n in engine.param_names], 1))
    return torch.cat(out).double()


def _pair_cosines(x: torch.Tensor) -> torch.Tensor:
    x = x / x.norm(dim=1, keepdim=True)
    upper = torch.triu_indices(len(x), len(x), 1)
    return (x @ x.T)[upper[0], upper[1]]


def test_tensor_sketch_keeps_pairwise_cosines_as_well_as_countsketch(setup):
    """Mean and p99 |cos error| over seeds: "tensor" within the seeds' own spread of "sparse" (or better)."""
    model, _, batches, shapes = setup
    exact = _exact_gradients(model, batches)
    truth = _pair_cosines(exact)
    k, seeds = 1024, range(8)
    errors = {"sparse": [], "tensor": []}
    for kind in errors:
        for seed in seeds:
            projector = Projector(ProjectorSpec.create(shapes, k, seed=seed, kind=kind, dtype="float32"))
            sketch = projector.project_flat(exact.float()).double()
            errors[kind].append((_pair_cosines(sketch) - truth).abs())
    for stat in ("mean", "p99"):
        values = {
            kind: np.array([float(e.mean() if stat == "mean" else e.quantile(0.99)) for e in errs])
            for kind, errs in errors.items()
        }
        spread = 3 * math.sqrt((values["sparse"].var(ddof=1) + values["tensor"].var(ddof=1)) / len(seeds))
        assert values["tensor"].mean() <= values["sparse"].mean() + spread, (stat, values)
        # and both are the projection noise the spec states (std of a cosine error ≤ sqrt(2/k))
        assert values["tensor"].mean() <= 4 * math.sqrt(2 / k)


def test_factored_sketch_equals_the_formed_gradients_sketch():
    """`Projector.add_factored(a, b)` == `add(Σ_t a_t b_tᵀ)`, for Linear's and Conv1D's layouts alike, with
    and without column pairs."""
    torch.manual_seed(0)
    wide = PAIRED_MIN_COLUMNS
    shapes = {"w": (24, 40), "c": (40, 24), "pw": (24, wide), "pc": (wide, 24)}
    projector = Projector(ProjectorSpec.create(shapes, 256, kind="tensor"))
    assert [projector.paired(n) for n in shapes] == [False, False, True, False]
    formed, factored = projector.new_output(3), projector.new_output(3)
    for name, (d0, d1) in shapes.items():
        a, b = torch.randn(3, 7, d0), torch.randn(3, 7, d1)
        projector.add(formed, name, a.transpose(1, 2) @ b)
        projector.add_factored(factored, name, a, b)
    torch.testing.assert_close(factored, formed, rtol=0, atol=1e-5 * float(formed.abs().max()))


def test_tensor_hash_pairs_columns_into_complex_buckets():
    """Version 2: columns 2m, 2m+1 share bucket (h1 + h2[m]) mod k/2 as outputs 2c, 2c+1; odd or narrow
    widths and version-1 specs keep the plain (h1 + h2) mod k; the complex scatter of signed blocks equals `add`."""
    torch.manual_seed(0)
    wide = PAIRED_MIN_COLUMNS
    shapes = {"w": (3, wide), "odd": (3, wide + 1), "narrow": (3, 8)}
    spec = ProjectorSpec.create(shapes, 16, seed=3, kind="tensor")
    projector = Projector(spec)
    assert spec.version == 2 and projector.paired("w")
    assert not projector.paired("odd") and not projector.paired("narrow")
    h1, s1, h2, s2 = projector.factor_hashes("w")
    assert h1.max() < 8 and h2.shape == (wide // 2,) and s2.shape == (wide,)
    target, sign = projector.chunk("w", 0)
    for i in range(3):
        for j in range(wide):
            assert target[i * wide + j] == 2 * ((h1[i] + h2[j // 2]) % 8) + j % 2
            assert sign[i * wide + j] == s1[i] * s2[j]

    def plain_hash(p: Projector, name: str, width: int) -> bool:
        h1, _, h2, _ = p.factor_hashes(name)
        target, _ = p.chunk(name, 0)
        return all(target[i * width + j] == (h1[i] + h2[j]) % 16 for i in range(3) for j in range(width))

    assert plain_hash(projector, "odd", wide + 1) and plain_hash(projector, "narrow", 8)
    old = Projector(replace(spec, version=1))
    assert not old.paired("w") and plain_hash(old, "w", wide)
    grads = torch.randn(3, 3, wide)
    plain, paired = projector.new_output(3), projector.paired_output(3)
    projector.add(plain, "w", grads)
    s1, s2 = projector.sign_factors("w")
    projector.add_paired(paired, "w", grads * s1[:, None] * s2[None, :])
    torch.testing.assert_close(projector.finish_paired(paired), plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("preconditioner", ["none", "adam", "adam_reference", "adam_factored"])
def test_formed_weights_signed_on_their_factors_give_the_sketch_of_the_exact_features(setup, preconditioner):
    """Features through the complex column-pair scatter == the projection of exact features (fp32 rounding);
    exact Adam signs the moments as the factors sign the gradient."""
    model, snapshot, batches, shapes = setup
    exact = Featurizer(model, ProjectorSpec.create(shapes, None, dtype="float32"), "cpu")
    exact.set_snapshot(snapshot, preconditioner)
    spec = ProjectorSpec.create(shapes, 512, seed=5, kind="tensor", dtype="float32")
    featurizer = Featurizer(model, spec, "cpu", fuse_bytes=0)
    featurizer.set_snapshot(snapshot, preconditioner)
    assert featurizer._paired and not featurizer.engine.factored  # every even-width linear weight, formed
    for batch in batches[:2]:
        ours = featurizer.batch_features(batch)[0]
        expected = featurizer.projector.project_flat(exact.batch_features(batch)[0])
        error = (ours - expected).norm(dim=1) / expected.norm(dim=1)
        assert float(error.max()) <= 1e-5


@pytest.mark.parametrize("preconditioner", ["none", "adam_factored"])
def test_featurizer_factored_path_equals_formed_path(setup, monkeypatch, preconditioner):
    """Every linear weight sketched from its factors gives the features of forming it (fp32 rounding)."""
    model, snapshot, batches, shapes = setup
    spec = ProjectorSpec.create(shapes, 512, kind="tensor", dtype="float32")
    results = {}
    for ratio in (0.0, math.inf):  # 0: every linear weight factored; inf: none
        monkeypatch.setattr(features_module, "FACTOR_RATIO", ratio)
        featurizer = Featurizer(model, spec, "cpu", fuse_bytes=0)
        featurizer.set_snapshot(snapshot, preconditioner)
        assert bool(featurizer.engine.factored) == (ratio == 0.0)
        results[ratio] = torch.cat([featurizer.batch_features(b)[0] for b in batches])
    factored, formed = results[0.0], results[math.inf]
    error = (factored - formed).norm(dim=1) / formed.norm(dim=1)
    assert float(error.max()) <= 1e-4  # FFT vs scatter rounding over k = 512 outputs


def test_adam_factored_is_adafactor_scaled_adam(setup):
    """Exact features under "adam_factored" == the documented formula, computed here from the moments."""
    model, snapshot, batches, shapes = setup
    spec = ProjectorSpec.create(shapes, None, dtype="float32")
    featurizer = Featurizer(model, spec, "cpu")
    featurizer.set_snapshot(snapshot, "adam_factored")
    ours = featurizer.batch_features(batches[0])[0].double()
    grads, _, _ = PerSampleGradients(model)(
        batches[0]["input_ids"], batches[0]["attention_mask"], batches[0]["labels"]
    )
    beta1, beta2 = snapshot.betas
    t, eps = snapshot.optimizer_step + 1, snapshot.eps
    c1, c2 = 1 - beta1**t, 1 - beta2**t
    expected = []
    for name in spec.param_names:
        g = grads[name].double()
        m = snapshot.exp_avg[name].double() * beta1 / c1
        v = snapshot.exp_avg_sq[name].double() * beta2 / c2
        if g.dim() == 3:  # 2-D weight: V = (sqrt(v)+eps)² ≈ r cᵀ / ΣV, no per-sample g² term
            second = (v.sqrt() + eps) ** 2
            r, c, total = second.sum(1, keepdim=True), second.sum(0, keepdim=True), second.sum()
            u = ((1 - beta1) / c1 * g + m) * total.sqrt() / (r.sqrt() * c.sqrt())
        else:  # 1-D: exact Adam
            u = ((1 - beta1) / c1 * g + m) / (((1 - beta2) / c2 * g * g + v).sqrt() + eps)
        expected.append(u.reshape(len(g), -1))
    expected = torch.cat(expected, 1)
    error = (ours - expected).norm(dim=1) / expected.norm(dim=1)
    assert float(error.max()) <= 1e-5


def test_adam_factored_scale_is_exact_for_rank_one_second_moments():
    v = (torch.rand(6, 1) + 0.1) * (torch.rand(1, 9) + 0.1)
    constants = AdamConstants(1.0, torch.zeros(6, 9), 1.0, 0.0, v.square(), 1.0, 0.0, 0.0)  # sqrt(v_s) = v: rank one
    rho, gamma = constants.factored_scale()
    torch.testing.assert_close(rho[:, None] * gamma[None, :], 1 / v, rtol=1e-5, atol=0)
