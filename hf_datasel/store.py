"""The run store: one folder under a run's `output_dir` that every step reads and writes.

Arrays are safetensors (never pickles), the manifest is JSON, and every write goes to a
temporary file that is renamed into place, so an interrupted run leaves either the old
file or the new one, never half of one.
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
from safetensors.numpy import load_file, save_file

STORE_DIRNAME = "datasel"
FORMAT_VERSION = 1


class StoreError(ValueError):
    """A store is missing, incomplete, or does not match what it is used with."""


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
        manifest = json.loads((self.path / self.MANIFEST).read_text())
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise StoreError(
                f"The store at {self.path} has format {manifest['format_version']}; this hf_datasel reads up to "
                f"{FORMAT_VERSION}. Upgrade hf_datasel."
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
        contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        with atomic_path(self.array_path(name)) as tmp:
            save_file(contiguous, str(tmp))

    def load_arrays(self, name: str) -> dict[str, np.ndarray]:
        if not self.has(name):
            raise StoreError(f"The store at {self.path} has no '{name}' record.")
        return load_file(str(self.array_path(name)))

    # -- readers for the methods ------------------------------------------------------
    def final_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """(row_id, loss): each row's latest loss, from the last sweep if any, else from training."""
        if self.has(self.SWEEP):
            sweep = self.load_arrays(self.SWEEP)
            return sweep["row_id"], sweep["loss"][-1]
        records = self.load_arrays(self.LOSSES)
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
            sweep = self.load_arrays(self.SWEEP)
            return sweep["row_id"], sweep["loss"].T.copy(), "sweep"
        records = self.load_arrays(self.LOSSES)
        order = np.lexsort((records["step"], records["row_id"]))
        row_id, loss = records["row_id"][order], records["loss"][order]
        rows, starts, counts = np.unique(row_id, return_index=True, return_counts=True)
        T = int(counts.max()) if len(counts) else 0
        out = np.full((len(rows), T), np.nan, np.float32)
        occurrence = np.arange(len(row_id)) - np.repeat(starts, counts)
        out[np.repeat(np.arange(len(rows)), counts), occurrence] = loss
        return rows, out, "training"
