"""Share a selection: local export and Hub push in one layout, with a card that says how it was chosen.

Layout (what `Dataset.push_to_hub` writes, and what `datasets.load_dataset(folder)` reads back):

    data/train-00000-of-00001.parquet    the selected raw rows
    README.md                            dataset card: YAML metadata + an explanation in words
    assets/scores.png                    histogram of the selected rows' scores (methods with scores)

The push goes through `huggingface_hub.HfApi` (`create_repo`, `list_repo_files`,
`create_commit`) in one commit; the token is handed to `HfApi` only and never appears in
logs, cards or error messages.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from huggingface_hub import DatasetCard, DatasetCardData

from . import __version__
from .rows import row_hashes
from .store import broken_file, library_versions

if TYPE_CHECKING:
    from .selector import DataSelector, SelectionRecord

DATA_DIR = "data"
SPLIT = "train"
PLOT_PATH = "assets/scores.png"
MAX_SHARD_BYTES = 500 * 2**20
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

METHOD_DESCRIPTIONS = {
    "s2l": (
        "S2L (SmallToLarge, Yang et al. 2024) clusters the loss trajectories that a small proxy model traced "
        "for every row while it trained, then samples the clusters evenly (smallest first), so the subset keeps "
        "what the whole pool teaches while dropping redundant rows."
    ),
    "less": (
        "LESS (Xia et al. 2024) scores each training row by the cosine similarity between its Adam-preconditioned "
        "gradient and the gradients of target examples, summed over warmup checkpoints weighted by learning rate, "
        "and keeps the top-scoring rows."
    ),
    "g2is": (
        "G2IS builds a gradient graph over training rows and walks it from the target task's core-knowledge "
        "directions (PCA of target gradients), adding rows whose gradients agree with what is already selected."
    ),
    "spectral": (
        "Spectral selection scores rows by the singular-value spectra of their layer-wise attention gradients "
        "(nuclear norm and effective rank) and keeps rows by that score."
    ),
    "loss": "Loss-based selection ranks rows by the proxy model's final loss and keeps one end of the ranking.",
    "random": "A uniform random sample of the pool (a baseline), drawn under a fixed seed.",
}


class HubError(RuntimeError):
    """A push to the Hub failed (the message never contains the token)."""


# -- reading local datasets ------------------------------------------------------------------
def load_local_dataset(path: str | os.PathLike, split: str = SPLIT) -> Dataset:
    """A dataset from a local path: a `save_to_disk` folder, a data folder, or a json/jsonl/parquet/csv file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}")
    builder = None
    if not path.is_dir():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"cannot read {path.name}: give a save_to_disk folder or a {'/'.join(sorted(_FILE_BUILDERS))} file"
            )
        if path.stat().st_size == 0:
            raise ValueError(f"{path} is empty: a dataset needs at least one row")
    try:
        if builder is not None:
            loaded = load_dataset(builder, data_files=str(path))
        elif (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            loaded = load_from_disk(str(path))
        else:
            loaded = load_dataset(str(path))
    except (FileNotFoundError, NotADirectoryError):
        raise
    except Exception as err:  # datasets reports a bad file from deep inside its builders: say which file
        cause = err.__cause__ or err.__context__ or err
        detail = " ".join(str(cause).split()) or type(cause).__name__
        if "corresponds to no data" in detail or isinstance(cause, StopIteration):
            raise ValueError(f"{path} has no rows: a dataset needs at least one row") from None
        raise ValueError(f"cannot read {path}: {detail[:300]}") from None
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path} has splits {sorted(loaded)}, not {split!r}")
        loaded = loaded[split]
    if len(loaded) == 0:
        raise ValueError(f"{path} has no rows: a dataset needs at least one row")
    return loaded


# -- which selection made this subset -----------------------------------------------------------
def find_record(selector: DataSelector, subset: Dataset) -> SelectionRecord:
    """The `selector.history` entry whose `select` call returned `subset` (newest first).

    Matched by the subset's fingerprint (as `select` derives it), else by row content, so a card
    never describes a different selection that happened to have the same size.
    """
    from .selector import SCORE_COLUMN

    if not isinstance(subset, Dataset):
        raise TypeError(f"subset must be a datasets.Dataset, not {type(subset).__name__}")
    if not selector.history:
        raise ValueError("this selector has made no selection yet; call selector.select(...) first.")
    candidates = [r for r in reversed(selector.history) if len(r.selection.indices) == len(subset)]
    for record in candidates:
        plain = selector.dataset.select(record.selection.indices)
        fingerprints = {plain._fingerprint}
        if record.selection.scores is not None:
            fingerprints.add(plain.add_column(SCORE_COLUMN, record.selection.scores.tolist())._fingerprint)
        if subset._fingerprint in fingerprints:
            return record
    if candidates:
        content = subset.remove_columns([c for c in subset.column_names if c not in selector.dataset.column_names])
        if content.column_names == selector.dataset.column_names:
            hashes = row_hashes(content)
            source = row_hashes(selector.dataset)
            for record in candidates:
                if np.array_equal(source[record.selection.indices], hashes):
                    return record
    raise ValueError(
        "this subset was not returned by this selector's select(); pass record=selector.history[i] explicitly."
    )


# -- the card -----------------------------------------------------------------------------------
def _plain(value: Any, depth: int = 0) -> Any:
    """`value` as YAML/JSON-safe builtins (numpy scalars unwrapped, long arrays summarised)."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, np.generic):
        return _plain(value.item(), depth)
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), depth) if value.size <= 32 else f"array{list(value.shape)}"
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()} if depth < 4 else str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value[:32]] if depth < 4 else str(value)
    return str(value)


def score_statistics(scores: np.ndarray | None) -> dict[str, Any] | None:
    """count, finite count, min / max / mean / std and quartiles of the selected rows' scores."""
    if scores is None:
        return None
    scores = np.asarray(scores, np.float64)
    finite = scores[np.isfinite(scores)]
    stats: dict[str, Any] = {"count": int(len(scores)), "finite": int(len(finite))}
    if len(finite):
        q25, median, q75 = np.quantile(finite, [0.25, 0.5, 0.75])
        stats.update(
            min=float(finite.min()),
            q25=float(q25),
            median=float(median),
            q75=float(q75),
            max=float(finite.max()),
            mean=float(finite.mean()),
            std=float(finite.std()),
        )
    return stats


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"


def model_name(name_or_path: str | None) -> str | None:
    """A model as a card names it: a Hub id or name stays, a local path becomes its folder's name.

    A card is public; the path of a folder on the recording machine means nothing to its readers.
    """
    if not name_or_path:
        return name_or_path
    text = str(name_or_path)
    local = (
        os.path.isabs(text)
        or text.startswith((".", "~"))
        or "\\" in text
        or text.count("/") > 1
        or os.path.exists(text)
    )
    return Path(text.rstrip("/\\")).name if local else text


def card_metadata(record: SelectionRecord, subset: Dataset, source_dataset: str | None = None) -> dict[str, Any]:
    """The `datasel` block of the card's YAML: method, parameters, budget, source, proxy model, versions, scores."""
    selection, manifest = record.selection, record.store_manifest or {}
    model = dict(manifest.get("model", {}))
    if "name_or_path" in model:
        model["name_or_path"] = model_name(model["name_or_path"])
    return {
        "method": selection.method,
        "parameters": _plain(selection.params),
        "budget": {
            "rows": int(record.budget),
            "requested": _plain(record.budget_requested),
            "fraction": round(record.budget / record.source_num_rows, 6),
            "selected": int(len(selection.indices)),
        },
        "source": {
            "dataset": source_dataset or "unknown",
            "fingerprint": record.source_fingerprint,
            "num_rows": int(record.source_num_rows),
        },
        "proxy_model": _plain(
            {k: model[k] for k in ("name_or_path", "class", "peft", "trainable_parameters") if k in model}
        )
        or None,
        "recording": _plain(manifest.get("recorded")),
        "training": _plain(manifest.get("training")),
        "library": {"name": "hf_datasel", "version": __version__, "versions": library_versions()},
        "scores": score_statistics(selection.scores),
        "warnings": list(selection.warnings),
        "num_rows": len(subset),
        "columns": list(subset.column_names),
    }


def render_card(
    record: SelectionRecord, subset: Dataset, source_dataset: str | None = None, plot_path: str | None = None
) -> DatasetCard:
    """A `DatasetCard` whose YAML holds the selection metadata and whose body explains the selection in words."""
    from .selector import SCORE_COLUMN

    meta = card_metadata(record, subset, source_dataset)
    # no `configs:` block: datasets 5.2 caches a local folder whose card has one under the folder's *name*
    # (two exports called "subset" would read each other's rows); data/train-* is found without it
    data = DatasetCardData(
        size_categories=[_size_category(len(subset))],
        tags=["hf-datasel", "data-selection", meta["method"]],
        source_datasets=[source_dataset] if source_dataset else None,
        datasel=meta,
    )
    method = meta["method"]
    budget, source = meta["budget"], meta["source"]
    proxy = (meta["proxy_model"] or {}).get("name_or_path")
    lines = [
        f"# {method} selection of {source['dataset']}",
        "",
        f"This dataset holds **{budget['selected']:,} of the {source['num_rows']:,} rows** "
        f"({budget['fraction']:.1%}) of `{source['dataset']}` (fingerprint `{source['fingerprint']}`), "
        f"chosen with the **{method}** method of hf_datasel {__version__}. "
        "The rows are the source's raw rows, unchanged, in their original order"
        + (f" (plus the `{SCORE_COLUMN}` column)." if SCORE_COLUMN in subset.column_names else "."),
        "",
        METHOD_DESCRIPTIONS.get(method, f"The rows were chosen by the `{method}` selection method."),
        "",
    ]
    if proxy:
        lines += [
            f"What the method knows about each row was recorded while the proxy model `{proxy}` trained on the "
            "full source dataset (per-row losses from its own forward passes, and gradients at snapshots where "
            "the method uses them).",
            "",
        ]
    if meta["warnings"]:  # what the method itself found doubtful about this selection
        lines += ["## Caveats", "", *[f"* {w}" for w in meta["warnings"]], ""]
    lines += ["## Parameters", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in sorted(meta["parameters"].items())] or ["| (none) | |"]
    lines += [f"| budget | {budget['rows']} rows (requested: `{budget['requested']}`) |", ""]
    scores = meta["scores"]
    if scores and scores.get("finite"):
        lines += ["## Scores of the selected rows", "", "| statistic | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in scores.items() if isinstance(v, float)]
        lines += [f"| rows with a finite score | {scores['finite']} of {scores['count']} |", ""]
        if plot_path:
            lines += [f"![Histogram of the selected rows' {method} scores]({plot_path})", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'subset = load_dataset("<this repo or folder>", split="train")',
        "```",
        "",
        "The YAML header's `datasel` block has the full record: method, parameters, budget, source fingerprint, "
        "proxy model, library versions and score statistics.",
    ]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _plot_scores(scores: np.ndarray, method: str, path: Path) -> bool:
    finite = np.asarray(scores, np.float64)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(finite, bins=min(50, max(5, len(finite) // 5)), color="#4c72b0")
    ax.set_xlabel(f"{method} score")
    ax.set_ylabel("selected rows")
    ax.set_title(f"{method}: scores of the {len(finite)} selected rows")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -- export and push ------------------------------------------------------------------------------
def write_selection_folder(
    subset: Dataset, directory: str | os.PathLike, record: SelectionRecord, source_dataset: str | None = None
) -> list[str]:
    """Write the shared layout into `directory` (must be empty or absent); returns the relative file paths."""
    if not isinstance(subset, Dataset):
        raise TypeError(f"subset must be a datasets.Dataset, not {type(subset).__name__}")
    if len(subset) == 0:
        raise ValueError("the subset is empty; there is nothing to save.")
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; choose a new folder for the selection.")
    with _partial_folder(directory) as work:
        (work / DATA_DIR).mkdir(parents=True)
        num_shards = max(1, math.ceil(subset.data.nbytes / MAX_SHARD_BYTES))
        files = []
        for i in range(num_shards):
            name = f"{DATA_DIR}/{SPLIT}-{i:05d}-of-{num_shards:05d}.parquet"
            subset.shard(num_shards, i, contiguous=True).to_parquet(str(work / name))
            files.append(name)
        plot = None
        scores = record.selection.scores
        if scores is not None and _plot_scores(scores, record.selection.method, work / PLOT_PATH):
            plot = PLOT_PATH
            files.append(PLOT_PATH)
        render_card(record, subset, source_dataset, plot).save(str(work / "README.md"))
        files.append("README.md")
    return files


@contextmanager
def _partial_folder(directory: Path) -> Iterator[Path]:
    """A hidden sibling folder to write into, renamed to `directory` on success.

    A process killed while exporting leaves no `directory`, so running the same export again
    just works. Its hidden leftover (and its owner file) is removed by the next export to the
    same place once its owner is gone.
    """
    from .locks import LockOwner

    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{directory.name}.partial-"
    for sidecar in parent.glob(f"{prefix}*.owner"):
        owner = LockOwner.parse(sidecar.read_bytes()) if sidecar.exists() else None
        if owner is not None and owner.alive() is False:
            shutil.rmtree(sidecar.with_suffix(""), ignore_errors=True)
            sidecar.unlink(missing_ok=True)
    owner = LockOwner.current()
    work = parent / f"{prefix}{owner.token}"
    sidecar = parent / f"{work.name}.owner"
    sidecar.write_bytes(owner.to_bytes())
    work.mkdir()
    try:
        yield work
        os.replace(work, directory)  # an absent or empty `directory` is replaced in one step
    except OSError as err:
        if directory.exists() and any(directory.iterdir()):
            raise FileExistsError(f"{directory} is not empty; choose a new folder for the selection.") from err
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        sidecar.unlink(missing_ok=True)


def save_selection(
    subset: Dataset, directory: str | os.PathLike, record: SelectionRecord, source_dataset: str | None = None
) -> Path:
    """Export `subset` with its card to a local folder that `datasets.load_dataset(directory)` reads back."""
    write_selection_folder(subset, directory, record, source_dataset)
    return Path(directory)


def check_selection_files(folder: Path, parquet_files: list[str]) -> None:
    """Raise a `StoreError` naming the first shard of a saved selection that is truncated or not parquet."""
    import pyarrow.parquet as pq

    for name in parquet_files:
        try:
            pq.read_metadata(folder / name)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a torn file
            raise broken_file(
                folder / name, f"truncated or not parquet: {err}", "export the selection again into a new folder"
            ) from None


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Push a folder written by `save_selection` to the dataset repo `repo_id` in one commit; returns the commit URL.

    Earlier `data/train-*` shards that this push does not rewrite are deleted in the same commit,
    as `Dataset.push_to_hub` does. Errors are re-raised as `HubError` with the token redacted.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    if "README.md" not in files or not any(f.startswith(f"{DATA_DIR}/{SPLIT}-") for f in files):
        raise FileNotFoundError(f"{folder} is not a saved selection (no README.md and {DATA_DIR}/{SPLIT}-* files)")
    check_selection_files(folder, [f for f in files if f.endswith(".parquet")])
    api = HfApi(token=token, library_name="hf_datasel", library_version=__version__)
    try:
        repo_id = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True).repo_id
        existing = api.list_repo_files(repo_id, repo_type="dataset")
        stale = [f for f in existing if f.startswith(f"{DATA_DIR}/{SPLIT}-") and f not in files]
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
        operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or "Upload a selection made with hf_datasel",
            repo_type="dataset",
        )
    except Exception as err:  # re-raised without the token, and without the chained original
        message = _redact(f"{type(err).__name__}: {err}", token)
        raise HubError(f"pushing {folder} to {repo_id} failed: {message}") from None
    return str(getattr(info, "commit_url", info))


def push_selection(
    subset: Dataset,
    repo_id: str,
    record: SelectionRecord,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    source_dataset: str | None = None,
) -> str:
    """Push `subset` and its card (the `save_selection` layout) to the dataset repo `repo_id`; returns the URL."""
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    workdir = Path(tempfile.mkdtemp(prefix="hf_datasel_push_"))
    try:
        write_selection_folder(subset, workdir / "selection", record, source_dataset)
        message = commit_message or f"hf_datasel: {record.selection.method} selection of {len(subset)} rows"
        return push_folder(workdir / "selection", repo_id, private=private, token=token, commit_message=message)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
