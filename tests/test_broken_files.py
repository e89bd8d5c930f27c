"""Every file the library writes, when truncated, corrupt or of another format: one `error:` line naming it, exit 2."""

from __future__ import annotations

import json

import pytest

from hf_datasel.store import RunStore
from tests.test_cli import assert_user_error, invoke
from tests.test_hub import FakeHub, write_fake_store


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def run(tmp_path, pool):
    write_fake_store(tmp_path / "run", pool)
    pool.to_json(tmp_path / "pool.jsonl")
    return tmp_path


def select(run, method="loss"):
    return invoke("select", run / "run", run / "pool.jsonl", "-m", method, "-b", "0.2", "-o", run / "out")


@pytest.mark.parametrize(
    "name, damage, fragment",
    [
        ("manifest.json", truncate, "truncated or not JSON"),
        ("manifest.json", lambda p: p.write_text("[1, 2]"), "not an object"),
        ("manifest.json", lambda p: p.write_text('{"format_version": 99}'), "upgrade hf_datasel"),
        ("manifest.json", lambda p: p.write_text('{"model": {}}'), "no known format_version"),
        ("rows.safetensors", truncate, "truncated or not safetensors"),
        ("losses.safetensors", truncate, "truncated or not safetensors"),
        ("sweep.safetensors", lambda p: p.write_bytes(b"\x00" * 64), "truncated or not safetensors"),
    ],
)
def test_a_broken_store_file_is_one_line_naming_it(run, name, damage, fragment):
    path = run / "run" / "datasel" / name
    damage(path)
    result = select(run)
    assert_user_error(result, str(path), fragment)
    remedy = "upgrade" if "99" in path.read_text(errors="ignore") else "record the run again"
    assert remedy in result.stderr
    if name == "manifest.json":
        assert_user_error(invoke("report", run / "run"), str(path))


def test_a_record_of_another_format_names_the_missing_arrays(run):
    store = RunStore.for_output_dir(run / "run")
    losses = store.load_arrays("losses")
    store.save_arrays("losses", {"row_id": losses["row_id"], "loss": losses["loss"]})  # no step
    assert_user_error(select(run), str(store.array_path("losses")), "no ['step'] arrays")


def test_broken_spectra_name_the_command_that_rewrites_them(run):
    path = run / "run" / "datasel" / "spectra.safetensors"
    path.write_bytes(b"not safetensors at all")
    assert_user_error(select(run, "spectral"), str(path), "hf-datasel spectral")


def test_a_broken_snapshot_names_the_file(tmp_path, tokenizer, pool):
    from tests.gradient_store import make_snapshot_store

    rows = pool.select(range(8))
    make_snapshot_store(tmp_path, tokenizer, rows, steps=(2,))
    rows.to_json(tmp_path / "rows.jsonl")
    (path,) = (tmp_path / "run" / "datasel" / "snapshots").glob("step-*.safetensors")
    truncate(path)
    result = invoke("featurize", tmp_path / "run", tmp_path / "rows.jsonl", "--k", "16")
    assert_user_error(result, str(path), "SnapshotCallback")


def test_a_truncated_selection_is_not_pushed(run, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    made = invoke("select", run / "run", run / "pool.jsonl", "-m", "random", "-b", "12", "-o", run / "sel")
    assert made.exit_code == 0, made.output
    (shard,) = (run / "sel" / "data").glob("*.parquet")
    truncate(shard)
    assert_user_error(invoke("push", run / "sel", "me/x", "--token", "t"), str(shard), "export the selection again")
    assert hub.calls == []


def test_a_manifest_written_by_a_newer_version_says_so(run):
    path = run / "run" / "datasel" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format_version": 2}))
    assert_user_error(invoke("report", run / "run"), "has format 2", "upgrade hf_datasel")
