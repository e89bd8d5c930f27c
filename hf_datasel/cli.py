"""`hf-datasel`: the command line, one subcommand per step of the flow.

    record → featurize → select → push        (report: what a run store holds; demo: all of it on CPU)

User errors (bad paths, a store that does not match the dataset, a budget out of range, a
broken store file) end with one line `error: ...` on stderr and exit status 2, never a Python
traceback; the library's warnings are `warning: ...` lines.

This module imports only the standard library and typer: `--help`, `--version` and argument
errors answer at once, and each command imports what it needs (torch, datasets, ...) when it runs.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__

app = typer.Typer(
    name="hf-datasel",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

USER_ERROR = 2


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's errors about its inputs into `error: <reason>` and exit status 2.

    `StoreError` (a broken or mismatched store file, a lock timeout) and `SpecMismatchError` are
    `ValueError`s; `HubError` is looked up only when `hf_datasel.hub` was imported (it raised then).
    """
    user_types: list[type[BaseException]] = [
        ValueError,
        TypeError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    ]
    try:
        yield
    except Exception as err:
        hub = sys.modules.get("hf_datasel.hub")
        if hub is not None:
            user_types.append(hub.HubError)
        if not isinstance(err, tuple(user_types)):
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        typer.echo(f"error: {reason}", err=True)
        raise typer.Exit(USER_ERROR) from None


class _StderrLines(logging.Handler):
    """Each log record as one `warning: ...` line on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"{record.levelname.lower()}: {' '.join(record.getMessage().split())}", err=True)


def _library_messages_on_stderr() -> None:
    """Show the library's warnings (stale lock taken over, waiting for a lock, ...) as `warning: ...` lines."""
    logger = logging.getLogger("hf_datasel")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines(logging.WARNING))


def _load(path: str, split: str = "train"):
    from .hub import load_local_dataset

    return load_local_dataset(path, split=split)


def _parse_params(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; a value is read as JSON when it parses (numbers, true/false, lists), else as text."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param expects key=value, got {pair!r}")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


def _formatting_func(text: str | None):
    """The recorded run's `formatting_func`, named `module:function` or `path/to/file.py:function`.

    A store cannot keep a function, so rows the trainer never saw are formatted again with the same one; the
    module is imported (its code runs) as `python -c "from module import function"` would, from this folder.
    """
    if not text:
        return None
    import importlib
    import importlib.util

    where, sep, name = text.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"--formatting-func expects module:function or file.py:function, got {text!r}")
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise FileNotFoundError(f"--formatting-func: no file {where}")
        spec = importlib.util.spec_from_file_location(f"_hf_datasel_formatting_{Path(where).stem}", where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as err:
            raise ValueError(f"--formatting-func: cannot import {where!r} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--formatting-func: {where} has no function {name!r}")
    return fn


FORMATTING_FUNC_HELP = (
    "The recorded run's SFTTrainer formatting_func, as module:function or file.py:function "
    "(needed when it used one: a store cannot keep a function)."
)


def _steps(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--steps expects comma-separated integers, got {text!r}") from None


def _shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    index, sep, count = text.partition("/")
    if not (sep and index.strip().isdigit() and count.strip().isdigit()) or not 0 <= int(index) < int(count):
        raise ValueError(f"--shard expects i/n with 0 <= i < n, got {text!r}")
    return int(index), int(count)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"hf-datasel {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Instruction-tuning data selection for Hugging Face training runs: record → select → train.

    A typical session (run any step with --help for its options):

    \b
      hf-datasel record -- --tiny --output_dir runs/warmup --max_steps 12 --sweep_steps 6,12
      hf-datasel report runs/warmup
      hf-datasel select runs/warmup pool.jsonl --method s2l --budget 0.2 --out subsets/s2l
      hf-datasel push subsets/s2l me/pool-s2l --private

    A budget (-b) is a fraction when it is written with a decimal point (0.2, 1.0 = the whole dataset)
    and a row count when it is a whole number (500).
    """
    _library_messages_on_stderr()


# -- record -----------------------------------------------------------------------------------------
def default_recipe() -> Path:
    """The warmup recording recipe: shipped in the package (`hf_datasel/recipes/`, from a wheel), else the
    checkout's `recipes/record_warmup.py`."""
    here = Path(__file__).resolve().parent
    for folder in (here / "recipes", here.parent / "recipes"):
        if (folder / "record_warmup.py").exists():
            return folder / "record_warmup.py"
    return here / "recipes" / "record_warmup.py"


def launch_command(recipe: Path, args: list[str], num_processes: int, cpu: bool, config_file: str | None) -> list[str]:
    """The command that runs `recipe`: plain python, torchrun (several CPU processes) or `accelerate launch`."""
    if num_processes < 1:
        raise ValueError("--num-processes must be at least 1")
    if num_processes == 1 and config_file is None:
        return [sys.executable, str(recipe), *args]
    if cpu:  # accelerate's multi-CPU launcher needs MPI; torchrun runs gloo processes directly
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(num_processes), str(recipe), *args,
        ]  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if config_file is not None:
        launch += ["--config_file", config_file]
    return [*launch, str(recipe), *args]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def record(
    ctx: typer.Context,
    recipe: Annotated[
        Path | None, typer.Option(help="Recipe script (default: record_warmup.py, shipped with hf_datasel).")
    ] = None,
    num_processes: int = typer.Option(1, "--num-processes", "-n", help="Processes (GPUs) to record with."),
    cpu: bool = typer.Option(False, help="Several CPU processes (torchrun, gloo) instead of GPUs."),
    config_file: str = typer.Option(None, help="An accelerate config file (e.g. recipes/accelerate/multi_gpu.yaml)."),
    dry_run: bool = typer.Option(False, help="Print the launch command and stop."),
) -> None:
    """Record a training run through a recipe; arguments after `--` go to the recipe.

    Example: hf-datasel record -n 8 -- --model_name_or_path Qwen/Qwen2.5-0.5B --dataset pool.jsonl
    --output_dir runs/warmup --sweep_steps saves --snapshot_steps saves --save_steps 200
    """
    with user_errors():
        recipe = recipe or default_recipe()
        if not recipe.exists():
            raise FileNotFoundError(f"no recipe at {recipe}; pass --recipe path/to/recipe.py")
        command = launch_command(recipe, list(ctx.args), num_processes, cpu, config_file)
    typer.echo("$ " + shlex.join(command), err=dry_run is False)
    if dry_run:
        return
    done = subprocess.run(command)
    if done.returncode != 0:
        typer.echo(f"error: the recipe exited with status {done.returncode}", err=True)
        raise typer.Exit(done.returncode)


# -- featurize --------------------------------------------------------------------------------------
@app.command()
def featurize(
    run_dir: str = typer.Argument(..., help="The recorded run's output_dir (holds datasel/ with snapshots)."),
    dataset: str = typer.Argument(..., help="Rows to featurize: save_to_disk folder or json/jsonl/parquet/csv."),
    preconditioner: str = typer.Option("none", help="none (plain gradients), adam, or adam_reference."),
    k: int = typer.Option(8192, help="Projection dimension."),
    exact: bool = typer.Option(False, help="No projection: the full per-sample gradient (small models)."),
    seed: int = typer.Option(0, help="Projector seed (train and target features must share it)."),
    steps: str = typer.Option(None, help="Snapshot steps, comma-separated (default: all)."),
    batch_size: int = typer.Option(16, min=1),
    max_length: int = typer.Option(None, min=1, help="Truncation (default: the recorded trainer's own)."),
    split: str = typer.Option("train", help="Split, when the dataset has several."),
    shard: str = typer.Option(None, help="i/n: compute shard i of n (e.g. one per machine); the last one merges."),
    formatting_func: str = typer.Option(None, help=FORMATTING_FUNC_HELP),
) -> None:
    """Per-sample gradient features of a dataset at every snapshot, cached in the run store."""
    with user_errors():
        if not Path(run_dir).is_dir():
            raise FileNotFoundError(f"no run at {run_dir}")
        if not Path(dataset).exists():
            raise FileNotFoundError(f"no dataset at {dataset}")
        from .featurize import gradient_features
        from .store import RunStore, StoreError

        store = RunStore.for_output_dir(run_dir)
        rows = _load(dataset, split)
        sets = gradient_features(
            store,
            rows,
            preconditioner=preconditioner,
            k=None if exact else k,
            seed=seed,
            steps=_steps(steps),
            batch_size=batch_size,
            max_length=max_length,
            shard=_shard(shard),
            progress=True,
            formatting_func=_formatting_func(formatting_func),
        )
        if sets is None and shard is None:  # an unsharded call always finishes (or raises)
            raise StoreError(f"features of {dataset} were not merged; run the same command again")
    if sets is None:
        typer.echo(f"shard {shard} done; the features are merged when the last shard finishes")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"features of {len(rows)} rows ({preconditioner})")
    for column in ("snapshot", "weight", "dim", "undefined rows"):
        table.add_column(column)
    for fs in sets:
        undefined = int((~fs.valid_rows()).sum())  # NaN norm: no label tokens or a non-finite loss
        table.add_row(str(fs.step), f"{fs.weight:.3f}", str(fs.spec.k), str(undefined))
    Console().print(table)
    for fs in sets:
        typer.echo(f"step {fs.step}: {fs.path}")


# -- select -----------------------------------------------------------------------------------------
@app.command()
def select(
    run_dir: str = typer.Argument(..., help="The recorded run's output_dir (holds datasel/)."),
    dataset: str = typer.Argument(..., help="The raw dataset the run trained on: folder or json/jsonl/parquet/csv."),
    method: str = typer.Option(..., "--method", "-m", help="s2l, loss, random, less, g2is, spectral, ..."),
    budget: str = typer.Option(
        ...,
        "--budget",
        "-b",
        help="A fraction in (0, 1] written with a decimal point (0.2; 1.0 is the whole dataset), "
        "or a whole number of rows (500).",
    ),
    out: str = typer.Option(..., "--out", "-o", help="New folder for the subset (data/train-*.parquet + README)."),
    seed: int = typer.Option(0),
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="A method parameter, key=value (repeatable).")
    ] = None,
    targets: str = typer.Option(None, help="Target rows for less / g2is: folder or json/jsonl/parquet/csv."),
    with_scores: bool = typer.Option(False, help="Add a datasel_score column."),
    source_name: str = typer.Option(None, help="Name of the source dataset for the card (e.g. a Hub id)."),
    split: str = typer.Option("train", help="Split, when the dataset has several."),
    allow_unrecorded_rows: bool = typer.Option(
        False,
        help="Select even when the dataset differs from the recorded one (changed or appended rows): "
        "those rows count as never recorded.",
    ),
    formatting_func: str = typer.Option(None, help=FORMATTING_FUNC_HELP + " For less and g2is."),
) -> None:
    """Choose a subset of a raw dataset from a recorded run and write it with its dataset card."""
    from rich.console import Console

    console = Console(stderr=True)
    out = Path(out)
    with user_errors():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"{out} is not empty; choose a new folder for the subset")
        for path in (dataset, targets):
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"no dataset at {path}")
        from .store import RunStore

        RunStore.for_output_dir(run_dir).manifest  # noqa: B018 - no or a broken store: said before the slow imports
        from .methods import get_method
        from .methods.base import method_parameters, required_parameters
        from .selector import DataSelector, parse_budget

        count = parse_budget(budget)
        params = _parse_params(param or [])
        needed = required_parameters(get_method(method))
        if "targets" in needed and targets is None:
            raise ValueError(f"method {method!r} needs --targets: the target rows (folder or json/jsonl/parquet/csv)")
        missing = [n for n in needed if n not in params and n != "targets"]
        if missing:
            raise ValueError(f"method {method!r} needs -p {missing[0]}=VALUE")
        raw = _load(dataset, split)
        if targets is not None:
            params["targets"] = _load(targets, split)
        if formatting_func is not None:
            if "formatting_func" not in method_parameters(get_method(method)):
                raise ValueError(f"method {method!r} takes no --formatting-func (it reads no rows' text)")
            params["formatting_func"] = _formatting_func(formatting_func)
        selector = DataSelector.from_run(run_dir, dataset=raw, allow_unrecorded_rows=allow_unrecorded_rows)
        with console.status(f"selecting with {method}…"), warnings.catch_warnings(record=True) as raised:
            subset = selector.select(method, budget=count, seed=seed, with_scores=with_scores, **params)
        caveats = selector.last.selection.warnings
        for w in raised:  # the method's own caveats are said once, below; anything else as Python shows it
            if str(w.message) not in caveats:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        selector.save_selection(subset, out, source_dataset=source_name or Path(dataset).name)
    typer.echo(f"{method}: {len(subset)} of {len(raw)} rows -> {out}")
    for caveat in caveats:  # also under "Caveats" on the dataset card
        typer.echo(f"warning: {' '.join(caveat.split())}", err=True)


# -- swift --------------------------------------------------------------------------------------------
@app.command()
def swift(
    run_dir: str = typer.Argument(..., help="The recorded run's output_dir (with snapshots)."),
    probes: str = typer.Argument(..., help="Probe rows with task and strategy columns."),
    evals: str = typer.Argument(..., help="Evaluation rows with a task column."),
    out_dir: str = typer.Argument(..., help="Where the table, scores and plot go."),
    steps: str = typer.Option(None, help="Snapshot steps, comma-separated (default: all)."),
    projection_dim: int = typer.Option(None, help="Project gradients to this many dims (default: exact)."),
    batch_size: int = typer.Option(16, min=1),
    task_column: str = typer.Option("task"),
    strategy_column: str = typer.Option("strategy"),
    formatting_func: str = typer.Option(None, help=FORMATTING_FUNC_HELP),
) -> None:
    """Swift Study: RelInf of strategy probes on evaluation rows over training, as a table and a plot."""
    from rich.console import Console

    with user_errors():
        from .swift import run_swift_cli

        with Console(stderr=True).status("scoring probes at every snapshot…"):
            paths = run_swift_cli(
                run_dir,
                probes,
                evals,
                out_dir,
                steps=_steps(steps),
                projection_dim=projection_dim,
                batch_size=batch_size,
                task_column=task_column,
                strategy_column=strategy_column,
                formatting_func=_formatting_func(formatting_func),
            )
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


# -- spectral -------------------------------------------------------------------------------------------
@app.command()
def spectral(
    model: str = typer.Argument(..., help="Model path or Hub id (its tokenizer is loaded from the same place)."),
    dataset: str = typer.Argument(..., help="Rows to measure: folder or json/jsonl/parquet/csv."),
    out_dir: str = typer.Argument(..., help="Where the layer report (CSV) and plot go."),
    run_dir: str = typer.Option(None, help="Also store the spectra in this run store (for `select -m spectral`)."),
    layers: str = typer.Option("all", help="'all', or comma-separated layer indices."),
    projections: str = typer.Option("q,k,v,o", help="Attention projections to measure."),
    group_by: str = typer.Option(None, help="A dataset column to compare groups by (e.g. task)."),
    batch_size: int = typer.Option(8, min=1),
    max_length: int = typer.Option(None, min=1, help="Truncation (default: the recorded trainer's own)."),
    split: str = typer.Option("train"),
    formatting_func: str = typer.Option(None, help=FORMATTING_FUNC_HELP),
) -> None:
    """Layer-wise gradient spectra (nuclear norm, effective rank) of every row, with a report and a plot."""
    with user_errors():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .spectra import gradient_spectra

        rows = _load(dataset, split)
        if not Path(model).exists():
            raise FileNotFoundError(f"no model at {model} (give a local folder saved with save_pretrained)")
        tokenizer = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model)
        chosen_layers: Any = "all" if layers == "all" else [int(x) for x in layers.split(",")]
        spectra = gradient_spectra(
            lm,
            rows,
            tokenizer,
            layers=chosen_layers,
            projections=tuple(p.strip() for p in projections.split(",") if p.strip()),
            batch_size=batch_size,
            max_length=max_length,
            store=run_dir,
            progress=True,
            formatting_func=_formatting_func(formatting_func),
        )
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        spectra.report(group_by=group_by).to_csv(out_dir / "spectra_layers.csv")
        spectra.plot(out_dir / "spectra.png", group_by=group_by)
    typer.echo(f"report: {Path(out_dir) / 'spectra_layers.csv'}\nplot: {Path(out_dir) / 'spectra.png'}")


# -- report -----------------------------------------------------------------------------------------------
def store_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What a run store holds: model, training, loss records, sweeps, snapshots, features, spectra.

    Read from the store's JSON files alone (no torch), so it answers at once.
    """
    from .store import RunStore, read_json

    store = RunStore.for_output_dir(run_dir)
    manifest = store.manifest
    index = store.path / "snapshots" / "index.json"
    snapshot_entries = []
    if index.exists():
        snapshot_entries = read_json(index, "record the run again with SnapshotCallback").get("snapshots", [])
    summary: dict[str, Any] = {
        "store": str(store.path),
        "model": manifest.get("model", {}).get("name_or_path"),
        "rows": manifest.get("dataset", {}).get("rows_trained"),
        "world_size": manifest.get("training", {}).get("world_size"),
        "loss_records": manifest.get("recorded", {}).get("loss_records"),
        "nonfinite_losses": manifest.get("recorded", {}).get("nonfinite_losses"),
        "last_step": manifest.get("recorded", {}).get("last_step"),
        "sweep_steps": manifest.get("recorded", {}).get("sweep_steps", []),
        "snapshot_steps": [e["step"] for e in snapshot_entries],
        "feature_sets": sorted(
            str(p.parent.relative_to(store.path)) for p in (store.path / "features").rglob("meta.json")
        )
        if (store.path / "features").exists()
        else [],
        "records": sorted(p.stem for p in store.path.glob("*.safetensors")),
        "versions": manifest.get("versions", {}),
    }
    return summary


@app.command()
def report(
    run_dir: str = typer.Argument(..., help="The recorded run's output_dir (or its datasel/ folder)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show what a recorded run's store holds."""
    with user_errors():
        summary = store_summary(run_dir)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run store {summary['store']}", show_header=False)
    for key, value in summary.items():
        if key in ("store", "versions"):
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        table.add_row(key.replace("_", " "), shown or "—")
    table.add_row("versions", ", ".join(f"{k} {v}" for k, v in summary["versions"].items()))
    Console().print(table)


# -- push -------------------------------------------------------------------------------------------------
@app.command()
def push(
    selection_dir: str = typer.Argument(..., help="A folder written by `hf-datasel select` (or save_selection)."),
    repo_id: str = typer.Argument(..., help="Dataset repo on the Hub, e.g. me/pool-s2l."),
    private: bool = typer.Option(True, "--private/--public", help="Create the repo private (default) or public."),
    token: str = typer.Option(None, envvar="HF_TOKEN", show_envvar=True, help="Hub token (default: your login)."),
    message: str = typer.Option(None, help="Commit message."),
) -> None:
    """Push a saved selection (parquet shards + dataset card) to a dataset repo on the Hub."""
    with user_errors():
        from .hub import push_folder

        selection_dir = Path(selection_dir)
        if not selection_dir.is_dir():
            raise FileNotFoundError(f"no selection folder at {selection_dir}")
        url = push_folder(selection_dir, repo_id, private=private, token=token, commit_message=message)
    typer.echo(f"pushed {selection_dir} -> {url}")


# -- demo -------------------------------------------------------------------------------------------------
@app.command()
def demo(
    output_dir: str = typer.Option("runs/demo", help="Where the runs, the store and results.json go."),
    pool_size: int = typer.Option(2000, min=50, help="Rows in the synthetic pool."),
    budget: float = typer.Option(0.05, min=0.0, max=1.0, help="Fraction of the pool to select, in (0, 1]."),
    large_steps: int = typer.Option(300, min=1, help="Training steps of the large model on each subset."),
    seed: int = typer.Option(0),
) -> None:
    """Record with a tiny proxy model, select 5 % with LESS, S2L and at random, fine-tune a larger model on each."""
    with user_errors():
        from .demo import DemoConfig, run_demo

        run_demo(
            DemoConfig(output_dir=output_dir, pool_size=pool_size, budget=budget, large_steps=large_steps, seed=seed)
        )


# -- bench (owned by hf_datasel/bench) -----------------------------------------------------------------
def _mount_bench() -> None:
    from .bench.app import bench_app

    app.add_typer(bench_app, name="bench")


_mount_bench()


def main() -> None:
    """The `hf-datasel` console script."""
    app()


if __name__ == "__main__":
    main()
