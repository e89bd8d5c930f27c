"""`hf-datasel`: each subcommand's help, happy paths on a small store, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from datasets import concatenate_datasets, load_dataset
from typer.testing import CliRunner

from hf_datasel import DataSelector
from hf_datasel.cli import app
from hf_datasel.hub import load_local_dataset
from hf_datasel.synthetic import make_pool
from tests.test_hub import TOKEN, FakeHub, write_fake_store

runner = CliRunner()
COMMANDS = ("record", "featurize", "select", "swift", "spectral", "report", "push", "demo", "bench")


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # others: progress bars
    assert len(lines) == 1 and result.stderr.strip().endswith(lines[0]), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def run(tmp_path, pool):
    """A recorded run (fake store) and the raw pool as jsonl, parquet, csv and a save_to_disk folder."""
    write_fake_store(tmp_path / "run", pool)
    pool.to_json(tmp_path / "pool.jsonl")
    pool.to_parquet(tmp_path / "pool.parquet")
    pool.to_csv(tmp_path / "pool.csv", index=False)
    pool.save_to_disk(tmp_path / "pool_disk")
    return tmp_path


def test_every_subcommand_has_readable_help():
    top = invoke("--help")
    assert top.exit_code == 0 and "hf-datasel select" in top.output
    for command in COMMANDS:
        result = invoke(command, "--help")
        assert result.exit_code == 0, command
        assert "Usage:" in result.output and len(result.output.splitlines()) > 5


@pytest.mark.parametrize("source", ["pool.jsonl", "pool.parquet", "pool.csv", "pool_disk"])
def test_select_writes_the_subset_and_card(run, pool, source):
    out = run / f"subset-{source}"
    result = invoke(
        "select", run / "run", run / source, "-m", "loss", "-b", "0.25", "-o", out, "-p", "which=highest",
        "--source-name", "me/pool",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "loss: 24 of 96 rows" in result.stdout
    expected = DataSelector.from_run(run / "run", pool).select("loss", budget=0.25, which="highest")
    assert load_dataset(str(out), split="train").to_list() == expected.to_list()
    card = (out / "README.md").read_text()
    loaded = load_local_dataset(run / source)
    assert "method: loss" in card and "dataset: me/pool" in card and f"fingerprint: {loaded._fingerprint}" in card


def test_select_row_count_budget_and_scores(run):
    out = run / "random10"
    result = invoke("select", run / "run", run / "pool.jsonl", "-m", "loss", "-b", "10", "-o", out, "--with-scores")
    assert result.exit_code == 0, result.output
    subset = load_dataset(str(out), split="train")
    assert len(subset) == 10 and "datasel_score" in subset.column_names
    assert np.all(np.diff(sorted(subset["datasel_score"])) >= 0)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["{run}/run", "{run}/missing.jsonl", "-m", "loss", "-b", "0.2"], ["no dataset at"]),
        (["{run}/run", "{run}/pool.jsonl", "-m", "loss", "-b", "5000"], ["budget of 5000 rows is out of range"]),
        (["{run}/run", "{run}/pool.jsonl", "-m", "nope", "-b", "0.2"], ["unknown selection method 'nope'"]),
        (["{run}/run", "{run}/pool.jsonl", "-m", "loss", "-b", "0.2", "-p", "which"], ["key=value"]),
        (["{run}/run", "{run}/pool.jsonl", "-m", "loss", "-b", "0.2", "-p", "colour=1"], ["takes no parameter"]),
        (["{run}/nowhere", "{run}/pool.jsonl", "-m", "loss", "-b", "0.2"], ["No hf_datasel store"]),
        (["{run}/run", "{run}/other.jsonl", "-m", "loss", "-b", "0.2"], ["does not match this dataset"]),
        (["{run}/run", "{run}/pool.txt", "-m", "loss", "-b", "0.2"], ["cannot read pool.txt"]),
    ],
)
def test_select_bad_input_is_one_line_and_exit_2(run, args, fragments):
    make_pool(96, noise=0.2, seed=5).to_json(run / "other.jsonl")
    (run / "pool.txt").write_text("hello")
    result = invoke("select", *[a.format(run=run) for a in args], "-o", run / "out")
    assert_user_error(result, *fragments)
    assert not (run / "out").exists() or not any((run / "out").iterdir())


def test_select_refuses_a_non_empty_output_folder(run):
    (run / "out").mkdir()
    (run / "out" / "x").write_text("keep")
    result = invoke("select", run / "run", run / "pool.jsonl", "-m", "random", "-b", "5", "-o", run / "out")
    assert_user_error(result, "not empty")


def test_report_shows_the_store(run):
    result = invoke("report", run / "run", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["loss_records"] == 192 and summary["world_size"] == 2 and summary["model"] == "tiny/proxy-llama"
    assert summary["records"] == ["losses", "rows"] and summary["snapshot_steps"] == []
    table = invoke("report", run / "run")
    assert table.exit_code == 0 and "loss records" in table.stdout
    assert_user_error(invoke("report", run / "nowhere"), "No hf_datasel store")


def test_push_a_saved_selection_with_the_token_from_the_environment(run, monkeypatch):
    hub = FakeHub(existing=["data/train-00000-of-00003.parquet"]).install(monkeypatch)
    made = invoke("select", run / "run", run / "pool.jsonl", "-m", "random", "-b", "12", "-o", run / "sel")
    assert made.exit_code == 0, made.output
    result = invoke("push", run / "sel", "me/pool-random", env={"HF_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    assert "https://hub.test/datasets/me/pool-random/commit/abc" in result.stdout
    create = hub.calls[0][1]
    assert create["private"] is True and create["token"] == TOKEN
    sent = sorted(hub.files)
    assert sent == ["README.md", "data/train-00000-of-00001.parquet"]  # random has no scores: no plot
    assert hub.files["README.md"] == (run / "sel" / "README.md").read_bytes()
    assert TOKEN not in result.output

    public = invoke("push", run / "sel", "me/pool-random", "--public", "--token", TOKEN)
    assert public.exit_code == 0 and hub.calls[-3][1]["private"] is False and TOKEN not in public.output


def test_push_errors_never_show_the_token(run, monkeypatch):
    FakeHub(fail_with=RuntimeError(f"401 for {TOKEN}")).install(monkeypatch)
    invoke("select", run / "run", run / "pool.jsonl", "-m", "random", "-b", "12", "-o", run / "sel")
    result = invoke("push", run / "sel", "me/pool-random", "--token", TOKEN)
    assert_user_error(result, "401")
    assert TOKEN not in result.output
    assert_user_error(invoke("push", run / "missing", "me/x"), "no selection folder")
    assert_user_error(invoke("push", run / "sel", "bad repo/id/x", "--token", TOKEN))


def test_record_builds_the_launch_command(tmp_path):
    one = invoke("record", "--dry-run", "--", "--tiny", "--output_dir", tmp_path / "r")
    assert one.exit_code == 0 and "record_warmup.py --tiny --output_dir" in one.stdout
    cpu = invoke("record", "--dry-run", "-n", "2", "--cpu", "--", "--tiny")
    assert "torch.distributed.run --standalone --nproc_per_node 2" in cpu.stdout
    gpu = invoke("record", "--dry-run", "-n", "8", "--config-file", "recipes/accelerate/multi_gpu.yaml", "--", "--x")
    assert "accelerate.commands.launch --num_processes 8 --config_file recipes/accelerate/multi_gpu.yaml" in gpu.stdout
    assert_user_error(invoke("record", "--recipe", tmp_path / "nope.py", "--dry-run"), "no recipe at")


def test_featurize_through_the_cli(tmp_path, tokenizer, pool):
    from hf_datasel.featurize import gradient_features
    from tests.gradient_store import make_snapshot_store

    rows = pool.select(range(10))
    store, _ = make_snapshot_store(tmp_path, tokenizer, rows, steps=(2,))
    rows.to_json(tmp_path / "rows.jsonl")
    result = invoke("featurize", tmp_path / "run", tmp_path / "rows.jsonl", "--preconditioner", "adam", "--k", "32")
    assert result.exit_code == 0, result.output
    (features,) = gradient_features(store, rows, preconditioner="adam", k=32, progress=False)  # cached by the CLI
    assert features.unit.shape == (10, 32) and f"step 2: {features.path}" in result.stdout
    assert_user_error(invoke("featurize", tmp_path / "nowhere", tmp_path / "rows.jsonl"), "no run at")
    assert_user_error(invoke("featurize", tmp_path / "run", tmp_path / "rows.jsonl", "--steps", "7"), "no snapshot")


def test_no_traceback_from_the_installed_entry_point(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "hf_datasel.cli", "select", str(tmp_path), str(tmp_path / "x.jsonl"), "-m", "s2l",
         "-b", "0.2", "-o", str(tmp_path / "o")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: ") and len(done.stderr.strip().splitlines()) == 1


def test_swift_through_the_cli(tmp_path, tokenizer, pool):
    from hf_datasel.swift import run_swift_cli
    from tests.gradient_store import make_snapshot_store

    make_snapshot_store(tmp_path, tokenizer, pool.select(range(16)), steps=(2, 4))
    probes = pool.select(range(16, 24)).map(lambda r, i: {"strategy": "cot" if i % 2 else "direct"}, with_indices=True)
    probes.to_json(tmp_path / "probes.jsonl")
    pool.select(range(24, 30)).to_json(tmp_path / "evals.jsonl")
    result = invoke("swift", tmp_path / "run", tmp_path / "probes.jsonl", tmp_path / "evals.jsonl", tmp_path / "sw")
    assert result.exit_code == 0, result.output
    for name in ("swift_table.csv", "swift_table.json", "swift_scores.npz", "swift.png"):
        assert (tmp_path / "sw" / name).exists(), name
    direct = run_swift_cli(tmp_path / "run", tmp_path / "probes.jsonl", tmp_path / "evals.jsonl", tmp_path / "again")
    assert (tmp_path / "sw" / "swift_table.csv").read_text() == direct["csv"].read_text()
    bad = invoke("swift", tmp_path / "run", tmp_path / "evals.jsonl", tmp_path / "evals.jsonl", tmp_path / "x")
    assert_user_error(bad, "strategy")


def test_spectral_then_select_through_the_cli(tmp_path, tokenizer, pool):
    from hf_datasel.spectra import gradient_spectra
    from hf_datasel.synthetic import build_model, save_and_reload

    model, tok = save_and_reload(build_model(tokenizer, seed=0), tokenizer, tmp_path / "model")
    rows = pool.select(range(12))
    rows.to_json(tmp_path / "rows.jsonl")
    args = ["--layers", "0", "--projections", "q,v", "--group-by", "task", "--max-length", "32"]
    result = invoke(
        "spectral", tmp_path / "model", tmp_path / "rows.jsonl", tmp_path / "sp", "--run-dir", tmp_path / "run", *args
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sp" / "spectra.png").exists()
    direct = gradient_spectra(model, rows, tok, layers=[0], projections=("q", "v"), max_length=32)
    direct.report(group_by="task").to_csv(tmp_path / "direct.csv")
    assert (tmp_path / "sp" / "spectra_layers.csv").read_text() == (tmp_path / "direct.csv").read_text()

    chose = invoke(
        "select", tmp_path / "run", tmp_path / "rows.jsonl", "-m", "spectral", "-b", "4", "-o", tmp_path / "sel"
    )
    assert chose.exit_code == 0, chose.output
    loaded = load_local_dataset(tmp_path / "rows.jsonl")
    expected = DataSelector.from_run(tmp_path / "run", loaded).select("spectral", budget=4)
    assert load_dataset(str(tmp_path / "sel"), split="train").to_list() == expected.to_list()
    assert_user_error(
        invoke("spectral", tmp_path / "nomodel", tmp_path / "rows.jsonl", tmp_path / "sp2"), "no model at"
    )


def test_record_through_the_recipe_then_report(tmp_path):
    out = tmp_path / "warm"
    result = invoke("record", "--", "--tiny", "--output_dir", out, "--pool_size", "16", "--max_steps", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads(invoke("report", out, "--json").stdout)
    assert summary["loss_records"] == 16 and summary["world_size"] == 1 and summary["last_step"] == 2


def test_featurize_in_shards_equals_one_pass(tmp_path, tokenizer, pool):
    import shutil

    from tests.gradient_store import make_snapshot_store

    rows = pool.select(range(12))
    make_snapshot_store(tmp_path / "a", tokenizer, rows, steps=(2,))
    shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run")
    rows.to_json(tmp_path / "rows.jsonl")
    common = [tmp_path / "rows.jsonl", "--k", "16", "--batch-size", "4"]
    assert invoke("featurize", tmp_path / "a" / "run", *common).exit_code == 0
    first = invoke("featurize", tmp_path / "b" / "run", *common, "--shard", "1/2")
    assert first.exit_code == 0 and "shard 1/2 done" in first.stdout
    second = invoke("featurize", tmp_path / "b" / "run", *common, "--shard", "0/2")
    assert second.exit_code == 0 and "step 2:" in second.stdout
    (a,) = (tmp_path / "a" / "run").rglob("unit.npy")
    (b,) = (tmp_path / "b" / "run").rglob("unit.npy")
    np.testing.assert_array_equal(np.load(a), np.load(b))
    assert_user_error(invoke("featurize", tmp_path / "b" / "run", *common, "--shard", "2/2"), "--shard expects i/n")


def test_the_cli_starts_without_torch_transformers_trl_or_datasets():
    heavy = ("torch", "transformers", "trl", "datasets")
    code = (
        "import sys\n"
        "import hf_datasel, hf_datasel.cli as cli\n"
        "for argv in (['--help'], ['--version'], ['select', '--help']):\n"
        "    try:\n"
        "        cli.app(argv, prog_name='hf-datasel')\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0, (argv, done.code)\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("[]"), done.stdout
    assert "hf-datasel 0.1.0" in done.stdout and "whole number of rows" in done.stdout


def test_budget_one_point_zero_is_the_whole_dataset_and_one_is_one_row(run):
    whole = invoke("select", run / "run", run / "pool.jsonl", "-m", "random", "-b", "1.0", "-o", run / "all")
    assert whole.exit_code == 0 and "random: 96 of 96 rows" in whole.stdout, whole.output
    one = invoke("select", run / "run", run / "pool.jsonl", "-m", "random", "-b", "1", "-o", run / "one")
    assert one.exit_code == 0 and "random: 1 of 96 rows" in one.stdout, one.output
    for budget, fragment in (("5.0", "give the whole number 5"), ("abc", "--budget must be"), ("0", "out of range")):
        bad = invoke("select", run / "run", run / "pool.jsonl", "-m", "random", "-b", budget, "-o", run / "x")
        assert_user_error(bad, fragment)


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["-m", "s2l", "-p", "num_clusters=abc"], ["parameter num_clusters must be a whole number, not 'abc'"]),
        (
            ["-m", "loss", "-p", "which=sideways"],
            ["parameter which must be one of 'highest', 'lowest', 'middle', not 'sideways'"],
        ),
        (["-m", "less"], ["method 'less' needs --targets"]),
        (["-m", "g2is"], ["method 'g2is' needs --targets"]),
    ],
)
def test_bad_method_parameters_name_the_parameter(run, extra, fragments):
    result = invoke("select", run / "run", run / "pool.jsonl", "-b", "0.2", "-o", run / "out", *extra)
    assert_user_error(result, *fragments)


def test_an_empty_dataset_file_is_one_line(run):
    (run / "empty.jsonl").write_text("")
    (run / "header.csv").write_text("prompt,completion\n")
    for name, fragment in (("empty.jsonl", "is empty"), ("header.csv", "has no rows")):
        result = invoke("select", run / "run", run / name, "-m", "random", "-b", "0.2", "-o", run / "out")
        assert_user_error(result, name, fragment)


def test_rows_appended_after_recording_are_refused_unless_allowed(run, pool):
    longer = concatenate_datasets([pool, pool.select([0])])
    longer.to_json(run / "longer.jsonl")
    common = ["select", run / "run", run / "longer.jsonl", "-m", "random", "-b", "1.0"]
    assert_user_error(invoke(*common, "-o", run / "refused"), "row 96 was never recorded", "--allow-unrecorded")
    allowed = invoke(*common, "-o", run / "allowed", "--allow-unrecorded-rows")
    assert allowed.exit_code == 0, allowed.output
    assert "warning: " in allowed.stderr and "1 row(s) count as never recorded" in allowed.stderr
    caveat = "1 of the dataset's 97 rows did not match the recording run's rows and counted as never recorded"
    assert f"warning: {caveat}" in allowed.stderr  # the selection's caveat, said once and kept on its card
    assert allowed.stderr.count(caveat) == 1 and caveat in (run / "allowed" / "README.md").read_text()
    loss = invoke(*common[:3], "-m", "loss", "-b", "97", "-o", run / "loss", "--allow-unrecorded-rows")
    assert_user_error(loss, "96 rows")  # the appended row has no loss: loss-based methods cannot pick it


def test_a_methods_caveat_is_said_once_and_other_warnings_still_show(run, monkeypatch):
    """A caveat a method both raises and keeps (as LESS does for targets the warmup never learnt) is one
    `warning:` line after the result; a warning that is not a caveat still reaches stderr as Python shows it."""
    import warnings

    from hf_datasel.methods import METHODS, Selection

    caveat = "doubtful: the warmup never learnt task 'x'"

    def doubtful(ctx):
        warnings.warn(caveat, stacklevel=2)
        warnings.warn("something else entirely", RuntimeWarning, stacklevel=2)
        return Selection(indices=list(range(ctx.budget)), method="doubtful", params={}, warnings=[caveat])

    monkeypatch.setitem(METHODS, "doubtful", doubtful)
    with pytest.warns(RuntimeWarning, match="something else entirely") as other:  # (not the caveat)
        result = invoke("select", run / "run", run / "pool.jsonl", "-m", "doubtful", "-b", "4", "-o", run / "out")
    assert result.exit_code == 0, result.output
    assert result.stderr.count(caveat) == 1 and f"warning: {caveat}" in result.stderr
    assert [str(w.message) for w in other] == ["something else entirely"]
    assert caveat in (run / "out" / "README.md").read_text()


@pytest.mark.parametrize(
    ("flag", "family", "unseen"),
    [
        ([], "bench", "unseen"),
        (["--no-unseen"], "bench", None),
        (["--family", "heldout", "--unseen-family", "bench"], "heldout", "bench"),
    ],
)
def test_bench_quality_flags_reach_its_config(monkeypatch, flag, family, unseen):
    """`bench quality` passes its options to the benchmark's config (the run itself is the bench's test)."""
    import hf_datasel.bench.quality as quality

    seen = []
    monkeypatch.setattr(quality, "run_quality", lambda config: seen.append(config) or {"goals": {}})
    monkeypatch.setattr(quality, "markdown_table", lambda result: "")
    result = invoke("bench", "quality", "--seed", 7, "--variant", "less", *flag)
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert config.unseen == unseen and config.seeds == (7,) and config.variants == ("less",)
    assert config.family == family
    # the module's own entry point takes the same choices
    main_flags = [f.replace("--unseen-family", "--unseen") for f in flag]
    quality.main(["--seeds", "7", "--variants", "less", *main_flags])
    assert (seen[1].family, seen[1].unseen, seen[1].seeds) == (family, unseen, (7,))


def test_bench_quality_refuses_an_unknown_family():
    result = invoke("bench", "quality", "--family", "nope")
    assert result.exit_code != 0 and "heldout" in result.output + result.stderr
