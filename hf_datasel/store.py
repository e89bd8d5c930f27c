"""The run store: one folder under a run's `output_dir` that every step reads and writes.

Arrays are safetensors (never pickles), the manifest is JSON, and every write goes to a
temporary file that is renamed into place, so an interrupted run leaves either the old
file or the new one, never half of one. A file that is broken anyway (truncated by a full
disk, copied half-way, written by another version) is reported as a `StoreError` that names
the file and the step that writes it again; nothing reads past such a file.

Layout of `<output_dir>/datasel/` (format 1):

    manifest.json                    format_version, versions, model, dataset (rows trained, largest row id),
                                     training settings, what was recorded (counts, last step, sweep steps),
                                     snapshots (steps and learning-rate weights)
    rows.safetensors                 row_id, row_hash: every trained raw row and its content hash
    losses.safetensors               row_id, step, epoch, loss: one record per trained row and epoch
    sweep.safetensors                steps (T,), row_id (N,), loss (T, N): every row's loss at each sweep step
    snapshots/step-000010.safetensors, index.json, model.json, model/, adapter/, tokenizer/
                                     trainable weights and Adam moments at chosen steps (SnapshotCallback)
    features/<dataset key>/step-000010/<preconditioner>-<spec id>/meta.json, unit.npy, norms.npy, loss.npy
                                     gradient features (see `featurize/features.py`; merge.lock while merging)
    spectra.safetensors              layer-wise gradient spectra (`hf-datasel spectral --run-dir`)

Steps, everywhere in the store: **step t means "computed with the weights after t optimizer
updates"**. A training loss record with step t comes from the forward pass of update t + 1
(the first update's losses have step 0); a sweep or a snapshot at step t is taken after update
t (t >= 1). So a loss record and a sweep with the same step saw the same weights. Gradient
accumulation gives every forward pass of one update the same step.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

STORE_DIRNAME = "datasel"
FORMAT_VERSION = 1
ROWS_KEYS = ("row_id", "row_hash")
LOSS_KEYS = ("row_id", "step", "loss")
SWEEP_KEYS = ("steps", "row_id", "loss")


class StoreError(ValueError):
    """A store is missing, incomplete, broken, or does not match what it is used with."""


RECORD_AGAIN = "record the run again (LossRecorderCallback writes it as the run trains)"
REMEDIES = {
    "manifest.json": RECORD_AGAIN,
    "rows": RECORD_AGAIN,
    "losses": RECORD_AGAIN,
    "sweep": RECORD_AGAIN,
    "snapshots": "record the run again with SnapshotCallback",
    "spectra": "compute the spectra again (hf-datasel spectral MODEL ROWS OUT --run-dir RUN replaces the file)",
}


def remedy_for(name: str) -> str:
    """What to do when the store file `name` (a record name, or a file name) is broken."""
    return REMEDIES.get(name) or REMEDIES.get(name.split("/")[0]) or "run again the step that wrote it"


def broken_file(path: str | os.PathLike, reason: str, remedy: str) -> StoreError:
    """The one error for a file the library wrote that cannot be read back: which file, why, and what to do."""
    reason = " ".join(str(reason).split())  # one line, whatever the underlying library said
    return StoreError(f"{path} is unreadable ({reason}); {remedy}.")


def read_json(path: str | os.PathLike, remedy: str) -> Any:
    """The JSON object in `path`; a `StoreError` naming the file and `remedy` when it is missing or broken."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} is missing; {remedy}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise broken_file(path, f"truncated or not JSON: {err}", remedy) from None
    if not isinstance(obj, dict):
        raise broken_file(path, f"a JSON {type(obj).__name__}, not an object", remedy)
    return obj


def load_npy(path: str | os.PathLike, remedy: str, mmap_mode: str | None = None) -> np.ndarray:
    """`np.load(path)` (no pickles); a `StoreError` naming the file and `remedy` when it is missing or broken."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise StoreError(f"{path} is missing; {remedy}.") from None
    except (ValueError, OSError, EOFError) as err:
        raise broken_file(path, f"truncated or not a .npy array: {err}", remedy) from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("hf_datasel", "torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


class RunStore:
    """Read and write the files of one recorded run."""

    MANIFEST = "manifest.json"
    ROWS = "rows"
    LOSSES = "losses"
    SWEEP = "sweep"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def for_output_dir(cls, output_dir: str | os.PathLike) -> RunStore:
        """The store of a run whose `TrainingArguments.output_dir` is `output_dir` (or the store folder itself)."""
        output_dir = Path(output_dir)
        if (output_dir / cls.MANIFEST).exists():
            return cls(output_dir)
        return cls(output_dir / STORE_DIRNAME)

    # -- manifest -----------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / self.MANIFEST).exists()

    @property
    def manifest(self) -> dict[str, Any]:
        if not self.exists():
            raise StoreError(
                f"No hf_datasel store at {self.path}: record a run with LossRecorderCallback first "
                "(and point to the run's output_dir)."
            )
        path = self.path / self.MANIFEST
        manifest = read_json(path, REMEDIES[self.MANIFEST])
        version = manifest.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise StoreError(
                f"{path} has no known format_version ({version!r}): it was not written by this hf_datasel; "
                f"{RECORD_AGAIN}."
            )
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{path} has format {version}; this hf_datasel reads up to {FORMAT_VERSION}: upgrade hf_datasel "
                "(pip install -U hf_datasel)."
            )
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = {**manifest, "format_version": FORMAT_VERSION, "versions": library_versions()}
        manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_json(self.path / self.MANIFEST, manifest)

    def update_manifest(self, **updates: Any) -> None:
        manifest = self.manifest if self.exists() else {}
        manifest.update(updates)
        self.write_manifest(manifest)

    # -- arrays -------------------------------------------------------------------
    def array_path(self, name: str) -> Path:
        return self.path / f"{name}.safetensors"

    def has(self, name: str) -> bool:
        return self.array_path(name).exists()

    def save_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        from safetensors.numpy import save_file

        contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        with atomic_path(self.array_path(name)) as tmp:
            save_file(contiguous, str(tmp))

    def load_arrays(self, name: str, keys: tuple[str, ...] = (), as_torch: bool = False) -> dict[str, Any]:
        """The arrays of record `name`, which must hold at least `keys` (`as_torch`: torch tensors, not numpy).

        A file that is absent, truncated, corrupt or lacks one of `keys` (another format) is a
        `StoreError` that names it and what to do.
        """
        from safetensors import SafetensorError

        if as_torch:
            from safetensors.torch import load_file
        else:
            from safetensors.numpy import load_file

        if not self.has(name):
            raise StoreError(f"The store at {self.path} has no '{name}' record.")
        path = self.array_path(name)
        try:
            arrays = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise broken_file(path, f"truncated or not safetensors: {err}", remedy_for(name)) from None
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise broken_file(path, f"no {missing} arrays: written by another format", remedy_for(name))
        return arrays

    def array_shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        """The shape of every array of record `name`, from the file's header alone (nothing else is read)."""
        from safetensors import SafetensorError, safe_open

        if not self.has(name):
            raise StoreError(f"The store at {self.path} has no '{name}' record.")
        path = self.array_path(name)
        try:
            with safe_open(str(path), "np") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise broken_file(path, f"truncated or not safetensors: {err}", remedy_for(name)) from None

    # -- readers for the methods ------------------------------------------------------
    def final_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """(row_id, loss): each row's latest loss, from the last sweep if any, else from training."""
        if self.has(self.SWEEP):
            sweep = self.load_arrays(self.SWEEP, SWEEP_KEYS)
            return sweep["row_id"], sweep["loss"][-1]
        records = self.load_arrays(self.LOSSES, LOSS_KEYS)
        order = np.lexsort((records["step"], records["row_id"]))
        row_id, loss = records["row_id"][order], records["loss"][order]
        last = np.r_[np.diff(row_id) != 0, True] if len(row_id) else np.zeros(0, bool)
        return row_id[last], loss[last]

    def trajectories(self) -> tuple[np.ndarray, np.ndarray, str]:
        """(row_id, losses of shape (rows, T), source): S2L's loss trajectories.

        From the checkpoint sweeps when recorded (T = number of sweeps), else from training
        records (T = times each row was trained on, i.e. epochs). Missing values are NaN.
        """
        if self.has(self.SWEEP):
            sweep = self.load_arrays(self.SWEEP, SWEEP_KEYS)
            return sweep["row_id"], sweep["loss"].T.copy(), "sweep"
        records = self.load_arrays(self.LOSSES, LOSS_KEYS)
        order = np.lexsort((records["step"], records["row_id"]))
        row_id, loss = records["row_id"][order], records["loss"][order]
        rows, starts, counts = np.unique(row_id, return_index=True, return_counts=True)
        T = int(counts.max()) if len(counts) else 0
        out = np.full((len(rows), T), np.nan, np.float32)
        occurrence = np.arange(len(row_id)) - np.repeat(starts, counts)
        out[np.repeat(np.arange(len(rows)), counts), occurrence] = loss
        return rows, out, "training"
