"""Layer-wise gradient spectra: exact against autograd, metric formulas, report, store, `spectral` method."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset

from hf_datasel import DataSelector, GradientSpectra, RunStore, StoreError, gradient_spectra
from hf_datasel.data import tokenize_rows
from hf_datasel.spectra import Target, factored_singular_values, find_targets, layer_report, spectral_metrics


def _reference_sigmas(model, rows, names):
    """svdvals of the explicit autograd gradient, one unpadded row at a time (loss over completion tokens)."""
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in names]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        out = []
        for r in rows:
            ids, labels = torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])
            logits = model(input_ids=ids).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
            grads = torch.autograd.grad(loss, weights)
            out.append(([torch.linalg.svdvals(g.double()) for g in grads], loss.item()))
        return out
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)


def _check_against_autograd(model, spectra, rows, names):
    for i, (sigmas, loss) in enumerate(_reference_sigmas(model, rows, names)):
        assert spectra.loss[i] == pytest.approx(loss, rel=1e-5)
        for j, ref in enumerate(sigmas):
            ours = torch.from_numpy(spectra.singular_values[i, j]).double()
            ours = ours[~ours.isnan()]
            k = len(ours)
            assert k <= len(rows[i]["input_ids"])
            torch.testing.assert_close(ours, ref[:k], rtol=1e-4, atol=1e-6 * ref[0].item())
            assert ref[k:].abs().max().item() <= 1e-5 * ref[0].item() if k < len(ref) else True  # rank <= tokens
            assert spectra.metrics["nuclear_norm"][i, j] == pytest.approx(ref.sum().item(), rel=1e-4)
            assert spectra.metrics["top_sigma"][i, j] == pytest.approx(ref[0].item(), rel=1e-4)


@pytest.fixture(scope="module")
def rows6():
    from hf_datasel.synthetic import make_pool

    pool = make_pool(6, noise=0.3, seed=3)
    return pool


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_matches_autograd_full_model(tokenizer, tiny_model, rows6, padding_side):
    spectra = gradient_spectra(
        tiny_model,
        rows6,
        tokenizer,
        projections=("q", "k", "v", "o", "mlp.down_proj"),
        batch_size=4,
        padding_side=padding_side,
        keep_singular_values=True,
    )
    rows = tokenize_rows(rows6, tokenizer)
    assert len({len(r["input_ids"]) for r in rows}) > 1  # batches mix lengths: padding is exercised
    names = [t.name for t in spectra.targets]
    assert names[:5] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + ["model.layers.0.mlp.down_proj"]
    assert len(names) == 10
    _check_against_autograd(tiny_model, spectra, rows, names)
    assert not any(p.grad is not None for p in tiny_model.parameters())  # the user's model is left untouched


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_matches_autograd_lora_base_weights(tokenizer, tiny_model, rows6, padding_side):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_model, config)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    spectra = gradient_spectra(
        model, rows6, tokenizer, layers=[1], batch_size=3, padding_side=padding_side, keep_singular_values=True
    )
    assert [t.name for t in spectra.targets] == [f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"]
    assert spectra.info["peft"]
    modules = dict(model.named_modules())
    # LoRA-wrapped q/v: the frozen base_layer; k/o: plain Linear
    names = [
        f"base_model.model.model.layers.1.self_attn.{p}_proj" + (".base_layer" if p in "qv" else "") for p in "qkvo"
    ]
    assert all(isinstance(modules[n], torch.nn.Linear) for n in names)
    _check_against_autograd(model, spectra, tokenize_rows(rows6, tokenizer), names)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factored_singular_values_random_and_masked(dtype):
    gen = torch.Generator().manual_seed(0)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for T, d_in, d_out in [(5, 16, 12), (20, 6, 9), (20, 9, 6)]:  # fewer and more tokens than dimensions
        x = torch.randn(3, T, d_in, generator=gen, dtype=torch.float64)
        delta = torch.randn(3, T, d_out, generator=gen, dtype=torch.float64)
        mask = torch.ones(3, T, dtype=torch.bool)
        mask[1, :2] = False  # left padding
        mask[2, -3:] = False  # right padding
        x[~mask] = float("nan")  # padding must not leak, even as NaN
        ours = factored_singular_values(x, delta, mask, dtype=dtype)
        assert ours.shape == (3, min(T, d_in, d_out)) and ours.dtype == dtype
        for b in range(3):
            g = delta[b, mask[b]].T @ x[b, mask[b]]
            ref = torch.linalg.svdvals(g)
            torch.testing.assert_close(ours[b].double(), ref[: ours.shape[1]], rtol=tol, atol=tol * ref[0].item())


def test_metric_formulas_on_handmade_singular_values():
    sigma = np.array([[3.0, 1.0, 0.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0], [5.0, np.nan, np.nan]])
    m = spectral_metrics(sigma)
    np.testing.assert_allclose(m["nuclear_norm"], [4.0, 6.0, 0.0, 5.0])
    np.testing.assert_allclose(m["frobenius_norm"], [math.sqrt(10), math.sqrt(12), 0.0, 5.0])
    np.testing.assert_allclose(m["top_sigma"], [3.0, 2.0, 0.0, 5.0])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    np.testing.assert_allclose(m["effective_rank"][[0, 1, 3]], [math.exp(h), 3.0, 1.0])
    assert np.isnan(m["effective_rank"][2])  # all-zero gradient: undefined


def test_rows_without_response_tokens_are_nan_and_counted(tokenizer, tiny_model):
    ids = tokenizer("copy abc=abc", add_special_tokens=False)["input_ids"]
    data = Dataset.from_dict(
        {"input_ids": [ids, ids[:6]], "labels": [[-100] * 5 + ids[5:], [-100] * 6], "kind": ["ok", "empty"]}
    )
    spectra = gradient_spectra(tiny_model, data, projections=("v",), batch_size=2)
    assert np.isfinite(spectra.loss[0]) and np.isnan(spectra.loss[1])
    assert np.isfinite(spectra.metrics["effective_rank"][0]).all()
    assert np.isnan(spectra.metrics["effective_rank"][1]).all() and np.isnan(spectra.metrics["nuclear_norm"][1]).all()
    assert spectra.info["rows_without_response_tokens"] == 1
    assert list(spectra.num_tokens) == [len(ids) - 5, 0]


def test_find_targets_errors(tiny_model):
    with pytest.raises(ValueError, match="'nope' matches no linear layer in layers \\[0, 1\\]"):
        find_targets(tiny_model, projections=("nope",))
    with pytest.raises(ValueError, match="do not exist"):
        find_targets(tiny_model, layers=[7])
    (matrix,) = find_targets(tiny_model, modules=["model.layers.1.mlp.up_proj"])
    assert matrix.target == Target("model.layers.1.mlp.up_proj", 1, "up_proj") and matrix.rows is None


def _crafted(num_rows=6, hashes=None, columns=None) -> GradientSpectra:
    targets = [Target(f"model.layers.{layer}.self_attn.{p}_proj", layer, p) for layer in (0, 1) for p in ("q", "v")]
    erank = np.array(
        [  # layer0 q, layer0 v, layer1 q, layer1 v
            [1.0, 1.0, 9.0, 9.0],  # row 0: mean 5, high only in layer 1
            [6.0, 6.0, 6.0, 6.0],  # row 1: mean 6
            [9.0, 9.0, 2.0, 2.0],  # row 2: mean 5.5, high only in layer 0
            [2.0, 2.0, 2.0, 2.0],  # row 3: mean 2
            [np.nan] * 4,  # row 4: no response tokens
            [3.0, 3.0, 3.0, np.nan],  # row 5: one zero gradient
        ]
    )[:num_rows]
    nuclear = np.arange(num_rows * 4, dtype=float).reshape(num_rows, 4)
    metrics = {"effective_rank": erank, "nuclear_norm": nuclear, "frobenius_norm": nuclear, "top_sigma": nuclear}
    return GradientSpectra(
        targets=targets,
        metrics=metrics,
        loss=np.ones(num_rows),
        num_tokens=np.full(num_rows, 3),
        row_hash=np.zeros(num_rows, np.int64) if hashes is None else hashes,
        columns=columns,
    )


@pytest.fixture
def six_rows():
    return Dataset.from_dict({"prompt": [f"p{i}=" for i in range(6)], "completion": [str(i) for i in range(6)]})


def test_spectral_method_choice_on_crafted_table(six_rows):
    from hf_datasel.rows import row_hashes

    spectra = _crafted(hashes=row_hashes(six_rows))
    selector = DataSelector(six_rows)
    sel = selector.run("spectral", 2, spectra=spectra)  # effective rank: highest by default
    assert sel.indices.tolist() == [1, 2] and sel.params["direction"] == "highest"
    assert sel.info["rows_without_finite_score"] == 2 and sel.info["source"] == "argument"
    assert selector.run("spectral", 2, spectra=spectra, layers=[1]).indices.tolist() == [0, 1]
    assert selector.run("spectral", 2, spectra=spectra, layers=0, projections=["v"]).indices.tolist() == [1, 2]
    assert selector.run("spectral", 1, spectra=spectra, direction="lowest").indices.tolist() == [3]
    low_nuclear = selector.run("spectral", 2, spectra=spectra, metric="nuclear_norm")  # lowest by default
    assert low_nuclear.indices.tolist() == [0, 1] and low_nuclear.params["direction"] == "lowest"
    subset = selector.select("spectral", 0.5, spectra=spectra, metric="nuclear_norm", with_scores=True)
    assert subset["completion"] == ["0", "1", "2"] and subset["datasel_score"] == [1.5, 5.5, 9.5]
    with pytest.raises(ValueError, match="budget of 5 rows"):
        selector.run("spectral", 5, spectra=spectra)
    with pytest.raises(ValueError, match="unknown metric"):
        selector.run("spectral", 2, spectra=spectra, metric="rank")


def test_store_roundtrip_and_row_hash_mismatch(tmp_path, six_rows):
    from hf_datasel.rows import row_hashes

    spectra = _crafted(hashes=row_hashes(six_rows))
    store = spectra.save(tmp_path)
    assert store.path == tmp_path / "datasel" and store.has("spectra")
    loaded = GradientSpectra.load(tmp_path, dataset=six_rows)
    assert loaded.targets == spectra.targets
    np.testing.assert_array_equal(loaded.metrics["effective_rank"], spectra.metrics["effective_rank"])
    selector = DataSelector(six_rows, store=RunStore.for_output_dir(tmp_path))
    sel = selector.run("spectral", 2)
    assert sel.indices.tolist() == [1, 2] and sel.info["source"] == "store"
    assert DataSelector.from_run(tmp_path, six_rows).run("spectral", 2).indices.tolist() == [1, 2]

    edited = six_rows.map(lambda r, i: {"completion": "x" if i == 4 else r["completion"]}, with_indices=True)
    with pytest.raises(StoreError, match="1 of 6 rows differ"):
        DataSelector(edited, store=RunStore.for_output_dir(tmp_path)).run("spectral", 2)
    with pytest.raises(StoreError, match="cover 6 rows"):
        DataSelector(six_rows.select(range(5)), store=RunStore.for_output_dir(tmp_path)).run("spectral", 2)
    with pytest.raises(StoreError, match="needs gradient spectra"):
        DataSelector(six_rows).run("spectral", 2)
    with pytest.raises(StoreError, match="no 'other' record"):
        selector.run("spectral", 2, name="other")


def test_report_on_handmade_table():
    table = pd.DataFrame(
        {
            "layer": [0, 0, 0, 0, 1, 1, 1, 1],
            "projection": ["q"] * 8,
            "quality": ["good", "good", "bad", "bad"] * 2,
            "nuclear_norm": [1.0, 3.0, 10.0, 20.0, 2.0, 4.0, 6.0, 8.0],
            "effective_rank": [4.0, 6.0, np.nan, 2.0, 1.0, 1.0, 1.0, 3.0],
        }
    )
    report = layer_report(table, group_by="quality", metrics=("nuclear_norm", "effective_rank"))
    by = report.set_index(["quality", "layer"])
    assert by.loc[("good", 0), "nuclear_norm"] == 2.0 and by.loc[("bad", 0), "nuclear_norm"] == 15.0
    assert by.loc[("bad", 0), "effective_rank"] == 2.0 and by.loc[("bad", 0), "nan_effective_rank"] == 1
    assert by.loc[("bad", 1), "effective_rank"] == 2.0 and by.loc[("good", 1), "rows"] == 2
    overall = layer_report(table, metrics=("nuclear_norm",)).set_index("layer")
    assert overall.loc[1, "nuclear_norm"] == 5.0 and overall.loc[0, "rows"] == 4


def test_on_the_fly_spectra_report_and_plot(tmp_path, tokenizer, tiny_model, rows6):
    data = rows6.map(lambda r: {"quality": "noisy" if r["is_noisy"] else "clean"})
    selector = DataSelector(data)
    sel = selector.run("spectral", 3, model=tiny_model, tokenizer=tokenizer, batch_size=3)
    assert sel.info["source"] == "computed" and len(sel.indices) == 3

    spectra = gradient_spectra(tiny_model, data, tokenizer, store=tmp_path, batch_size=3)
    assert spectra.table.shape[0] == 6 * 8
    report = spectra.report(group_by="quality")
    assert set(report["quality"]) == set(data["quality"]) and len(report) == len(set(data["quality"])) * 8
    path = spectra.plot(tmp_path / "spectra.png", group_by="quality")
    assert (tmp_path / "spectra.png").read_bytes()[:4] == b"\x89PNG" and path.endswith("spectra.png")
    from_store = DataSelector(data, store=RunStore.for_output_dir(tmp_path)).run("spectral", 3)
    np.testing.assert_allclose(from_store.scores, sel.scores)
    assert from_store.indices.tolist() == sel.indices.tolist()


def test_text_rows_existing_manifest_and_checks(tmp_path, tokenizer, tiny_model):
    data = Dataset.from_dict({"text": ["copy abc=abc", "rev abcd=dcba"]})
    store = RunStore.for_output_dir(tmp_path)
    store.write_manifest({"model": {"name_or_path": "recorded"}})
    spectra = gradient_spectra(tiny_model, data, tokenizer, projections=("o",), store=tmp_path)
    assert store.manifest["model"] == {"name_or_path": "recorded"}  # a recorded run's manifest is left alone
    rows = tokenize_rows(data, tokenizer)
    assert spectra.num_tokens.tolist() == [len(r["input_ids"]) - 1 for r in rows]  # every token but the first
    assert GradientSpectra.load(tmp_path).targets == spectra.targets
    with pytest.raises(ValueError, match="dtype"):
        gradient_spectra(tiny_model, data, tokenizer, dtype=torch.float16)


# -- every family: fused q/k/v blocks, output projections, a model handed back as it came ----------------------------
def _qkv_rows_from_modeling_code(family: str, config) -> dict[str, torch.Tensor]:
    """q/k/v output rows of the fused weight, written the way each `modeling_<family>.py` splits its output.

    Kept apart from `hf_datasel.spectra.qkv_rows` on purpose (views of an arange, as the modeling code
    views the projection's output), so a wrong layout there cannot pass here.
    """
    heads = config.num_attention_heads
    if family == "gpt2":  # GPT2Attention.forward: self.c_attn(hidden_states).split(self.split_size, dim=2)
        qkv = torch.arange(3 * config.hidden_size).split(config.hidden_size)
        return dict(zip("qkv", qkv))
    if family == "gpt_neox":  # qkv.view(*input_shape, -1, 3 * self.head_size); qkv.chunk(3, dim=-1)
        head = config.hidden_size // heads
        per_head = torch.arange(3 * config.hidden_size).view(-1, 3 * head).chunk(3, dim=-1)
        return {p: x.flatten() for p, x in zip("qkv", per_head)}
    if family == "phi3":  # qkv[..., :query_pos], [query_pos : query_pos + kv * head_dim], the rest
        head = config.hidden_size // heads
        query_pos, kv = heads * head, config.num_key_value_heads * head
        out = torch.arange(query_pos + 2 * kv)
        return {"q": out[:query_pos], "k": out[query_pos : query_pos + kv], "v": out[query_pos + kv :]}
    if family == "falcon":  # FalconAttention.forward, new_decoder_architecture: per kv group [q_1 … q_g | k | v]
        assert config.new_decoder_architecture
        head, group = config.hidden_size // heads, heads // config.num_kv_heads
        out = torch.arange((heads + 2 * config.num_kv_heads) * head).view(-1, group + 2, head)
        return {"q": out[:, :-2].flatten(), "k": out[:, -2].flatten(), "v": out[:, -1].flatten()}
    if family == "bloom":  # BloomAttention._reshape: view(batch, seq_length, num_heads, 3, head_dim)
        out = torch.arange(3 * config.hidden_size).view(heads, 3, -1)
        return {p: out[:, i].flatten() for i, p in enumerate("qkv")}
    if family == "gpt_bigcode":  # multi_query: split((embed_dim, kv_dim, kv_dim), dim=3), kv_dim = head_dim
        head = config.hidden_size // heads
        if not config.multi_query:  # view(*hidden_states.shape[:2], num_heads, 3 * head_dim), split(3 * [head_dim])
            per_head = torch.arange(3 * config.hidden_size).view(heads, 3 * head).split(3 * [head], dim=-1)
            return {p: x.flatten() for p, x in zip("qkv", per_head)}
        return dict(zip("qkv", torch.arange(config.hidden_size + 2 * head).split((config.hidden_size, head, head))))
    if family == "mpt":  # mixed_qkv.chunk(3, dim=2)
        return dict(zip("qkv", torch.arange(3 * config.hidden_size).chunk(3)))
    if family == "codegen":  # view(*input_shape, -1, 3 * local_dim); query, value, key = qkv.split(local_dim, -1)
        local = config.hidden_size // 4  # CodeGenAttention.mp_num = 4
        query, value, key = torch.arange(3 * config.hidden_size).view(-1, 3 * local).split(local, dim=-1)
        return {"q": query.flatten(), "k": key.flatten(), "v": value.flatten()}
    raise AssertionError(family)


def _weight_module(model, name):
    """The module holding `name`'s weight (under PEFT: `base_model.model.<name>[.base_layer]`)."""
    modules = dict(model.named_modules())
    for prefix in ("", "base_model.model."):
        for suffix in (".base_layer", ""):
            if prefix + name + suffix in modules:
                return modules[prefix + name + suffix]
    raise KeyError(name)


def _autograd_block_sigmas(model, family, rows, targets):
    """Per row: (svdvals of each target's block of `model(...).loss.backward()`'s weight gradient, the loss)."""
    from transformers.pytorch_utils import Conv1D

    blocks = _qkv_rows_from_modeling_code(family, model.config) if family in FUSED_FAMILIES else {}
    weights = [_weight_module(model, t.name) for t in targets]
    flags = {id(m.weight): m.weight.requires_grad for m in weights}
    for m in weights:
        m.weight.requires_grad_(True)
    try:
        out = []
        for r in rows:
            for m in weights:
                m.weight.grad = None
            loss = model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss
            loss.backward()
            sigmas = []
            for t, m in zip(targets, weights):
                grad = m.weight.grad.T if isinstance(m, Conv1D) else m.weight.grad  # (out, in)
                grad = grad if t.block is None else grad[blocks[t.block]]
                sigmas.append(torch.linalg.svdvals(grad.double()))
            out.append((sigmas, loss.item()))
        return out
    finally:
        for m in weights:
            m.weight.grad = None
            m.weight.requires_grad_(flags[id(m.weight)])


FUSED_FAMILIES = ("gpt2", "gpt_neox", "phi3", "falcon", "bloom", "gpt_bigcode", "mpt", "codegen")
SIGMA_RTOL = 1e-4
"""|σ_ours − σ_autograd| ≤ SIGMA_RTOL · σ_max. By Weyl's inequality |Δσ_i| ≤ ‖ΔG‖₂, and the two G are fp32
computations of the same sum (a padded batch vs one row): a few hundred fp32 roundings (ε = 1.2e-7) of terms of
size ≤ σ_max, so ‖ΔG‖₂ is of order 1e-5 σ_max; 1e-4 leaves a margin. Small σ get no relative bound (none exists)."""


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FUSED_FAMILIES + ("opt", "phi"))  # OPT: out_proj, learned positions; Phi: dense
def test_qkvo_blocks_match_autograd(tokenizer, rows6, family, lora):
    from hf_datasel.synthetic.families import build_family_model, lora_targets

    model = build_family_model(family, tokenizer).eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets(family), init_lora_weights=False)
        model = get_peft_model(model, config)
    data = rows6.select(range(4))
    spectra = gradient_spectra(
        model, data, tokenizer, batch_size=4, padding_side="left" if lora else "right", keep_singular_values=True
    )
    fused = family in FUSED_FAMILIES
    assert [(t.layer, t.projection, t.block) for t in spectra.targets] == [
        (layer, p, p if fused and p != "o" else None) for layer in (0, 1) for p in "qkvo"
    ]
    rows = tokenize_rows(data, tokenizer)
    assert len({len(r["input_ids"]) for r in rows}) > 1  # the batch is padded
    worst = 0.0
    for i, (sigmas, loss) in enumerate(_autograd_block_sigmas(model, family, rows, spectra.targets)):
        assert spectra.loss[i] == pytest.approx(loss, rel=1e-5)
        for j, ref in enumerate(sigmas):
            ours = torch.from_numpy(spectra.singular_values[i, j]).double()
            ours = ours[~ours.isnan()]
            k = len(ours)
            assert 0 < k <= len(rows[i]["input_ids"])
            err = max((ours - ref[:k]).abs().max().item(), ref[k:].max().item() if k < len(ref) else 0.0)
            worst = max(worst, err / ref[0].item())
    assert worst <= SIGMA_RTOL, f"max |Δσ| / σ_max = {worst:.1e}"


def test_fused_layouts_of_other_settings_follow_the_modeling_code():
    """A setting the families' tiny models do not use: GPT-BigCode without multi-query."""
    from hf_datasel.spectra import qkv_rows
    from hf_datasel.synthetic.families import family_config

    config = family_config("gpt_bigcode", 40)
    config.multi_query = False
    for label, rows in _qkv_rows_from_modeling_code("gpt_bigcode", config).items():
        assert torch.equal(qkv_rows(config)[label], rows), label


def test_every_family_measures_qkvo_on_every_layer(tmp_path, tokenizer, rows6):
    from hf_datasel.synthetic.families import FAMILIES, build_family_model

    o_names = {
        "gpt2": "attn.c_proj", "gpt_neox": "attention.dense", "opt": "out_proj", "falcon": "attention.dense",
        "bloom": "self_attention.dense", "gpt_bigcode": "attn.c_proj", "mpt": "attn.out_proj",
        "codegen": "attn.out_proj", "phi": "self_attn.dense",
    }  # fmt: skip
    keys = [(layer, p) for layer in (0, 1) for p in "qkvo"]
    data = rows6.select(range(2))
    measured = {}
    for family in FAMILIES:
        model = build_family_model(family, tokenizer).eval()
        spectra = measured[family] = gradient_spectra(model, data, tokenizer, batch_size=2)
        assert [(t.layer, t.projection) for t in spectra.targets] == keys, family
        assert all(t.name.endswith(o_names.get(family, "o_proj")) for t in spectra.targets if t.projection == "o")
        fused = family in FUSED_FAMILIES
        assert all((t.block is not None) == fused for t in spectra.targets if t.projection != "o"), family
        assert np.isfinite(spectra.metrics["effective_rank"]).all(), family
        assert spectra.info["model_type"] == family
    fused = measured["falcon"]
    fused.save(tmp_path)
    assert GradientSpectra.load(tmp_path, dataset=data).targets == fused.targets  # blocks survive the store
    sel = DataSelector(data).run("spectral", 1, spectra=fused, projections=["k"])
    assert sel.info["matrices"][:3] == [f"transformer.h.0.self_attention.query_key_value[{p}]" for p in "qkv"]


def test_projection_missing_or_ambiguous_in_some_layer_raises(tokenizer, tiny_model):
    from hf_datasel.synthetic.families import build_family_model

    gpt2 = build_family_model("gpt2", tokenizer)
    with pytest.raises(ValueError, match="'mlp.down_proj' matches no linear layer in layers \\[0, 1\\]"):
        find_targets(gpt2, projections=("q", "mlp.down_proj"))
    assert len(find_targets(gpt2, projections=("c_attn",))) == 2  # the fused weight whole, by its own name
    gpt2.config.model_type = "my_own_gpt"  # the same `c_attn` name on a model type of unknown layout: never guessed
    with pytest.raises(ValueError, match="c_attn looks like a fused q/k/v weight"):
        find_targets(gpt2)
    assert len(find_targets(gpt2, projections=("o",))) == 2

    del tiny_model.model.layers[1].self_attn.k_proj  # present in layer 0 only: no partial table
    with pytest.raises(ValueError, match="'k' matches no linear layer in layers \\[1\\]"):
        find_targets(tiny_model)
    assert [m.target.layer for m in find_targets(tiny_model, layers=[0], projections=("k",))] == [0]
    tiny_model.model.layers[0].self_attn.out_proj = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="'o' matches 2 linear layers in layer 0"):
        find_targets(tiny_model, projections=("o",))


def _state(model):
    """Everything `gradient_spectra` must leave as it was."""
    return {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "checkpointing": {
            n: m.gradient_checkpointing for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")
        },
    }


def test_trainer_model_with_checkpointing_comes_back_identical(tmp_path, tokenizer, rows6):
    """TRL's default `gradient_checkpointing=True`, train mode after `trainer.train()`: measured, not refused."""
    from trl import SFTTrainer

    from hf_datasel.synthetic import make_pool
    from hf_datasel.synthetic.families import build_family_model
    from tests.conftest import sft_config

    model = build_family_model("gpt2", tokenizer)  # dropout on: a train-mode pass would differ
    trainer = SFTTrainer(
        model=model,
        args=sft_config(tmp_path, gradient_checkpointing=True, max_steps=1),
        train_dataset=make_pool(8, seed=5),
        processing_class=tokenizer,
    )
    trainer.train()
    model = trainer.model
    model.train()
    model.transformer.wpe.weight.requires_grad_(False)
    assert model.is_gradient_checkpointing and model.training
    before = _state(model)
    spectra = gradient_spectra(model, rows6, tokenizer, batch_size=3)
    after = _state(model)
    assert after["requires_grad"] == before["requires_grad"] and after["training"] == before["training"]
    assert after["checkpointing"] == before["checkpointing"] and any(before["checkpointing"].values())
    assert all(torch.equal(after["weights"][n], w) for n, w in before["weights"].items())  # bitwise
    assert all((g is None) == (after["grads"][n] is None) for n, g in before["grads"].items())
    assert all(g is None or torch.equal(after["grads"][n], g) for n, g in before["grads"].items())

    model.gradient_checkpointing_disable()
    model.eval()
    plain = gradient_spectra(model, rows6, tokenizer, batch_size=3)
    for metric in ("nuclear_norm", "effective_rank"):  # the same numbers as a plain eval-mode model gives
        np.testing.assert_allclose(spectra.metrics[metric], plain.metrics[metric], rtol=1e-12)


@pytest.mark.parametrize("new_decoder_architecture,multi_query", [(True, False), (False, False), (False, True)])
def test_falcon_layouts_follow_its_forward(new_decoder_architecture, multi_query):
    """All three Falcon layouts, read off `FalconAttention.forward` itself: the fused weight outputs its own
    positions (zero weight, bias = 0..width-1) and a registered attention function sees which land in q, k, v."""
    from transformers import AttentionInterface, FalconConfig
    from transformers.models.falcon.modeling_falcon import FalconAttention

    from hf_datasel.spectra import qkv_rows

    seen = {}

    def probe(module, query, key, value, attention_mask, **kwargs):
        seen.update(q=query, k=key, v=value)
        return query.transpose(1, 2), None

    AttentionInterface.register("hf_datasel_probe", probe)
    config = FalconConfig(
        vocab_size=16,
        hidden_size=32,
        num_attention_heads=4,
        num_kv_heads=2,
        num_hidden_layers=1,
        new_decoder_architecture=new_decoder_architecture,
        multi_query=multi_query,
        alibi=True,  # no rotary embedding: q and k reach the attention function as the fused weight wrote them
        bias=True,
    )
    config._attn_implementation = "hf_datasel_probe"
    attention = FalconAttention(config, layer_idx=0).double()
    width = attention.query_key_value.out_features
    with torch.no_grad():
        attention.query_key_value.weight.zero_()
        attention.query_key_value.bias.copy_(torch.arange(width, dtype=torch.float64))
        attention(torch.zeros(1, 1, config.hidden_size, dtype=torch.float64), attention_mask=None)
    ours = qkv_rows(config)
    assert sum(len(r) for r in ours.values()) == width
    for p in "qkv":
        assert sorted(ours[p].tolist()) == sorted(seen[p].flatten().long().tolist()), p
