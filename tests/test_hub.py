"""Sharing a selection: local export read back by `load_dataset`, the card's metadata, and the Hub push up to HfApi."""

from __future__ import annotations

import dataclasses
import io
import logging
import traceback

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset, load_dataset
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, DatasetCard, HfApi

import hf_datasel
from hf_datasel import DataSelector, RunStore
from hf_datasel.hub import HubError, find_record, model_name
from hf_datasel.locks import LockOwner
from hf_datasel.rows import row_hashes

TOKEN = "hf_SECRETtoken0123456789abcdefXYZ"


def write_fake_store(output_dir, dataset: Dataset, seed: int = 0) -> RunStore:
    """A store as a 2-epoch recording run would leave it (no training: arrays written directly)."""
    store = RunStore.for_output_dir(output_dir)
    n = len(dataset)
    rng = np.random.default_rng(seed)
    store.save_arrays("rows", {"row_id": np.arange(n, dtype=np.int64), "row_hash": row_hashes(dataset)})
    rows = np.concatenate([np.arange(n), np.arange(n)]).astype(np.int64)
    store.save_arrays(
        "losses",
        {
            "row_id": rows,
            "step": (rows // 8 + np.repeat([0, 12], n)).astype(np.int64),
            "epoch": np.repeat([0, 1], n).astype(np.int64),
            "loss": rng.uniform(0.5, 3.0, 2 * n).astype(np.float32),
        },
    )
    store.write_manifest(
        {
            "model": {"name_or_path": "tiny/proxy-llama", "class": "LlamaForCausalLM", "peft": True},
            "training": {"world_size": 2, "seed": 0},
            "recorded": {"loss_records": 2 * n, "sweep_steps": []},
        }
    )
    return store


@pytest.fixture
def selector(tmp_path, pool):
    write_fake_store(tmp_path / "run", pool)
    return DataSelector.from_run(tmp_path / "run", dataset=pool)


def test_save_selection_layout_card_and_round_trip(tmp_path, selector, pool):
    subset = selector.select("loss", budget=0.25, which="highest")
    folder = selector.save_selection(subset, tmp_path / "export", source_dataset="me/pool")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["README.md", "assets/scores.png", "data/train-00000-of-00001.parquet"]

    back = load_dataset(str(folder), split="train")
    assert back.to_list() == subset.to_list()

    card = DatasetCard.load(folder / "README.md")
    meta = card.data.to_dict()["datasel"]
    expected_scores = np.sort(RunStore.for_output_dir(tmp_path / "run").final_losses()[1])[::-1][:24]
    assert meta["method"] == "loss" and meta["parameters"] == {"which": "highest"}
    assert meta["budget"] == {"rows": 24, "requested": 0.25, "fraction": 0.25, "selected": 24}
    assert meta["source"] == {"dataset": "me/pool", "fingerprint": pool._fingerprint, "num_rows": 96}
    assert meta["proxy_model"]["name_or_path"] == "tiny/proxy-llama"
    assert meta["library"]["version"] == hf_datasel.__version__
    assert meta["scores"]["count"] == 24
    assert meta["scores"]["mean"] == pytest.approx(float(np.mean(expected_scores.astype(np.float64))), rel=1e-6)
    assert meta["scores"]["min"] == pytest.approx(float(expected_scores.min()), rel=1e-6)
    assert card.data.to_dict()["source_datasets"] == ["me/pool"]
    assert "**24 of the 96 rows**" in card.text and "loss" in card.text and "assets/scores.png" in card.text


def test_card_describes_the_selection_that_made_the_subset(selector):
    first = selector.select("random", budget=10, seed=1)
    second = selector.select("random", budget=10, seed=2)
    assert find_record(selector, first).selection.params == {"seed": 1}
    assert find_record(selector, second).selection.params == {"seed": 2}
    rebuilt = Dataset.from_list(first.to_list())  # same rows, a fresh fingerprint: matched by content
    assert find_record(selector, rebuilt).selection.params == {"seed": 1}
    with pytest.raises(ValueError, match="not returned by this selector"):
        find_record(selector, selector.dataset.select(range(10)).map(lambda r: {"task": "x"}))


def test_a_selections_warnings_are_on_its_card(tmp_path, selector):
    """What a method warned about when it chose the rows (e.g. LESS: the warmup never learnt a target task) travels
    with the subset: listed under "Caveats" in the card's body and in its YAML; a card without any has neither."""
    subset = selector.select("random", budget=10, seed=1)
    plain = DatasetCard.load(selector.save_selection(subset, tmp_path / "plain") / "README.md")
    assert plain.data.to_dict()["datasel"]["warnings"] == [] and "## Caveats" not in plain.text
    record = find_record(selector, subset)
    caveat = "less: the recorded model's loss on the target rows of ['val'] did not fall over the run"
    record.selection.warnings.append(caveat)  # as `select_less` leaves it when the targets were not learnt
    card = DatasetCard.load(selector.save_selection(subset, tmp_path / "warned") / "README.md")
    assert card.data.to_dict()["datasel"]["warnings"] == [caveat]
    body = card.text.split("## Caveats", 1)[1]
    assert body.lstrip().startswith(f"* {caveat}") and body.index(caveat) < body.index("## Parameters")


def test_cards_name_the_model_not_a_local_path(tmp_path, pool):
    store = write_fake_store(tmp_path / "run", pool)
    local = tmp_path / "runs" / "demo" / "proxy-init"
    store.update_manifest(model={"name_or_path": str(local), "class": "LlamaForCausalLM", "peft": False})
    selector = DataSelector.from_run(tmp_path / "run", dataset=pool)
    folder = selector.save_selection(selector.select("random", 8), tmp_path / "export")
    card = (folder / "README.md").read_text()
    assert str(tmp_path) not in card and "name_or_path: proxy-init" in card and "`proxy-init`" in card
    for given, named in (
        ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
        ("gpt2", "gpt2"),
        ("./models/proxy/", "proxy"),
        ("/abs/checkpoints/m", "m"),
        ("runs/demo/proxy-init", "proxy-init"),
        (None, None),
    ):
        assert model_name(given) == named, given


def test_a_dead_exports_leftover_is_cleaned_and_a_live_ones_kept(tmp_path, selector):
    from tests.test_locks import dead_pid

    subset = selector.select("random", budget=5)
    out = tmp_path / "out"
    leftover = out / ".sel.partial-dead"  # what a process killed while exporting leaves
    (leftover / "data").mkdir(parents=True)
    (leftover / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 half")
    owner = LockOwner.current()
    (out / ".sel.partial-dead.owner").write_bytes(dataclasses.replace(owner, pid=dead_pid()).to_bytes())
    busy = out / ".sel.partial-busy"  # a live export to the same place is left alone
    busy.mkdir()
    (out / ".sel.partial-busy.owner").write_bytes(owner.to_bytes())
    selector.save_selection(subset, out / "sel")
    assert load_dataset(str(out / "sel"), split="train").to_list() == subset.to_list()
    assert sorted(p.name for p in out.iterdir()) == [".sel.partial-busy", ".sel.partial-busy.owner", "sel"]


def test_save_selection_refuses_a_non_empty_folder(tmp_path, selector):
    subset = selector.select("random", budget=5)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        selector.save_selection(subset, tmp_path / "busy")


class FakeHub:
    """Stands in for the HfApi methods that would send requests; records what would have been sent."""

    def __init__(self, existing=(), fail_with: Exception | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.files: dict[str, bytes] = {}
        self.existing = list(existing)
        self.fail_with = fail_with

    def install(self, monkeypatch):
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", {"repo_id": repo_id, "token": api.token, **kwargs}))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def list_repo_files(api, repo_id, **kwargs):
            hub.calls.append(("list_repo_files", {"repo_id": repo_id, **kwargs}))
            return hub.existing

        def create_commit(api, repo_id, operations, **kwargs):
            hub.calls.append(("create_commit", {"repo_id": repo_id, "operations": operations, **kwargs}))
            for op in operations:
                if isinstance(op, CommitOperationAdd):
                    with open(op.path_or_fileobj, "rb") as f:
                        hub.files[op.path_in_repo] = f.read()
            if hub.fail_with is not None:
                raise hub.fail_with
            return type("CommitInfo", (), {"commit_url": f"https://hub.test/datasets/{repo_id}/commit/abc"})()

        def refuse(api, *args, **kwargs):
            raise AssertionError("a request would have left the machine")

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "list_repo_files", list_repo_files)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        for name in ("preupload_lfs_files", "upload_file", "upload_folder", "repo_info", "whoami"):
            monkeypatch.setattr(HfApi, name, refuse)
        return self


def test_push_sends_data_card_and_private_flag_in_one_commit(tmp_path, selector, monkeypatch, caplog, capsys):
    hub = FakeHub(existing=["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"])
    hub.install(monkeypatch)
    subset = selector.select("loss", budget=0.25, which="lowest")
    caplog.set_level(logging.DEBUG)
    url = selector.push_to_hub(subset, "me/pool-loss", private=True, token=TOKEN, source_dataset="me/pool")
    assert url == "https://hub.test/datasets/me/pool-loss/commit/abc"

    names = [name for name, _ in hub.calls]
    assert names == ["create_repo", "list_repo_files", "create_commit"]
    create = hub.calls[0][1]
    assert create["repo_type"] == "dataset" and create["private"] is True and create["exist_ok"] is True
    assert create["token"] == TOKEN, "the token goes to HfApi, nowhere else"
    commit = hub.calls[2][1]
    assert commit["repo_type"] == "dataset" and "loss selection of 24 rows" in commit["commit_message"]
    adds = sorted(op.path_in_repo for op in commit["operations"] if isinstance(op, CommitOperationAdd))
    deletes = sorted(op.path_in_repo for op in commit["operations"] if isinstance(op, CommitOperationDelete))
    assert adds == ["README.md", "assets/scores.png", "data/train-00000-of-00001.parquet"]
    assert deletes == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]

    sent = pd.read_parquet(io.BytesIO(hub.files["data/train-00000-of-00001.parquet"]))
    assert sent.to_dict("records") == subset.to_list()
    card = DatasetCard(hub.files["README.md"].decode())
    assert card.data.to_dict()["datasel"]["parameters"] == {"which": "lowest"}
    assert "configs" not in card.data.to_dict()

    local = selector.save_selection(subset, tmp_path / "same", source_dataset="me/pool")
    assert (local / "README.md").read_bytes() == hub.files["README.md"], "local export == what is pushed"
    out = capsys.readouterr()
    everything = caplog.text + out.out + out.err + b"".join(hub.files.values()).decode("latin-1")
    assert TOKEN not in everything


def test_push_failure_never_shows_the_token(selector, monkeypatch, caplog):
    FakeHub(fail_with=RuntimeError(f"401 Unauthorized for token {TOKEN}")).install(monkeypatch)
    subset = selector.select("random", budget=5)
    with pytest.raises(HubError) as info:
        selector.push_to_hub(subset, "me/pool-random", token=TOKEN)
    shown = "".join(traceback.format_exception(info.value)) + caplog.text
    assert "401 Unauthorized" in shown and "***" in shown
    assert TOKEN not in shown and info.value.__cause__ is None


def test_push_rejects_a_bad_repo_id_before_any_request(selector, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    subset = selector.select("random", budget=5)
    with pytest.raises(ValueError):
        selector.push_to_hub(subset, "not a/valid/repo id", token=TOKEN)
    assert hub.calls == []


def test_two_exports_with_the_same_folder_name_read_back_their_own_rows(tmp_path, selector):
    """`load_dataset(folder)` must not serve one export's cached rows for another folder of the same name."""
    small, large = selector.select("random", budget=7, seed=3), selector.select("loss", budget=30)
    selector.save_selection(small, tmp_path / "a" / "subset")
    selector.save_selection(large, tmp_path / "b" / "subset")
    assert load_dataset(str(tmp_path / "a" / "subset"), split="train").to_list() == small.to_list()
    assert load_dataset(str(tmp_path / "b" / "subset"), split="train").to_list() == large.to_list()
