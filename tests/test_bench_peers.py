"""The `featurize-vs-peers` bench part at tiny settings: JSON fields and sane values (no timing goals),
with and without bergson installed."""

from __future__ import annotations

import json
import math
import sys

import pytest

from hf_datasel.bench import peers
from hf_datasel.bench.perf import PARTS, PEERS, PerfConfig, run_part, summary_line

TINY = dict(
    rows=32, rounds=1, k=256, fidelity_rows=12, memory=False, train_steps=2, hidden_size=32, num_hidden_layers=2,
    num_attention_heads=2, intermediate_size=64,
)  # fmt: skip


def _check(result: dict, with_bergson: bool, models: tuple[str, ...] = ("lora", "full")) -> None:
    assert result["benchmark"] == PEERS and result["device"]
    assert set(result["variants"]) == set(models)
    assert all(v["params"] > 0 and v["rows"] == TINY["rows"] for v in result["variants"].values())
    families = {(m["model"], m["family"]) for m in result["methods"]}
    for model in models:
        for family in ("train step", "train pass", "library engine", "library end to end", "naive bs=1"):
            assert (model, family) in families
        assert ((model, "bergson") in families) == with_bergson
    for m in result["methods"]:
        assert m["rows_per_s"] > 0 and math.isfinite(m["rows_per_s"])
        assert m["vs_train_step"] > 0 and len(m["seconds_per_round"]) == 1
        if m["family"] in ("train step", "train pass"):  # each the reference of its kind of method
            assert m["vs_train_step"] == 1.0
        end_to_end = m["family"] in ("train pass", "library end to end", "bergson")
        ref = next(r for r in result["methods"] if r["model"] == m["model"] and r["family"] == (
            "train pass" if end_to_end else "train step"))  # fmt: skip
        assert m["vs_train_step"] == pytest.approx(ref["seconds_per_round"][0] / m["seconds_per_round"][0])
    engines = [m for m in result["methods"] if m["family"] == "library engine"]
    assert {m["preconditioner"] for m in engines} >= {"none", "adam"}
    assert {m["projection"] for m in engines} >= ({"identity", "sparse"} if "lora" in models else {"sparse"})
    assert not any(m["model"] == "full" and m["projection"] == "identity" for m in engines)  # exact: LoRA only
    for m in result["methods"]:
        projected = m["family"] in ("library engine", "library end to end") and m["projection"] != "identity"
        if projected or m["family"] == "bergson":
            f = m["fidelity"]
            assert f is not None, m["name"]
            assert 0 <= f["mean_abs_error"] <= f["p99_abs_error"] <= f["max_abs_error"] <= 2
            assert f["pairs"] == TINY["fidelity_rows"] * (TINY["fidelity_rows"] - 1) // 2
    assert result["errors"] == []
    table = peers.markdown_table(result)
    assert "| train step (fwd+bwd+AdamW) |" in table and "mean abs error" in table


def test_cosine_errors_are_zero_for_the_same_features_and_scale_free():
    import numpy as np

    x = np.random.default_rng(0).standard_normal((6, 20))
    same = peers.cosine_errors(x, 3.0 * x)
    assert same["mean_abs_error"] < 1e-12 and same["pairs"] == 15
    assert peers.cosine_errors(x, x[:, :10])["mean_abs_error"] > 0


def test_peers_without_bergson(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bergson", None)  # `import bergson` raises ImportError
    assert peers.bergson_version() is None
    result = peers.run_peers(peers.PeersConfig(**TINY, models=("full",), vocab_size=300, workdir=str(tmp_path)))
    assert result["bergson"] is None
    _check(result, with_bergson=False, models=("full",))
    assert "vocabulary padded to 300" in peers.markdown_table(result)
    hidden, layers, ffn = TINY["hidden_size"], TINY["num_hidden_layers"], TINY["intermediate_size"]
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden  # attention, MLP, two norms
    assert result["variants"]["full"]["params"] == 300 * hidden + layers * per_layer + hidden  # tied embedding


def test_peers_with_bergson(tmp_path):
    pytest.importorskip("bergson")
    result = peers.run_peers(peers.PeersConfig(**TINY, workdir=str(tmp_path)))
    _check(result, with_bergson=True)
    bergson = [m for m in result["methods"] if m["family"] == "bergson"]
    assert {m["projection_dim"] for m in bergson} == {16}
    # LoRA: A and B of q/v in 2 layers; full: the 7 Linear layers of 2 decoder layers; 16×16 each
    assert {m["model"]: m["k"] for m in bergson} == {"lora": 8 * 16 * 16, "full": 14 * 16 * 16}


def test_perf_part_writes_peers_json_and_table(tmp_path):
    assert PEERS in PARTS
    out = tmp_path / "docs" / "peers.json"
    config = PerfConfig(
        parts=(PEERS,), peers_rows=16, peers_rounds=1, peers_k=128, peers_fidelity_rows=6, peers_memory=False,
        peers_out=str(out), workdir=str(tmp_path),
        peers_overrides={"models": ("lora",), **{key: TINY[key] for key in ("train_steps", "hidden_size",
                         "num_hidden_layers", "num_attention_heads", "intermediate_size")}},
    )  # fmt: skip
    r = run_part(PEERS, config)
    assert "error" not in r, r
    on_disk = json.loads(out.read_text())
    assert on_disk["benchmark"] == PEERS and on_disk["settings"]["rows"] == 16
    assert out.with_suffix(".md").read_text().startswith("Device: ")
    assert {m["model"] for m in r["methods"]} == {"lora"}
    line = summary_line(PEERS, r)
    assert "lora: library end to end" in line and "bs=1" in line
