"""hf_datasel: instruction-tuning data selection as a Hugging Face Trainer plugin.

record (callbacks) -> store (a folder) -> features -> methods (registry) -> DataSelector -> datasets.Dataset

The public names below are imported on first use (PEP 562), so `import hf_datasel` and the
command line's `--help` start at once without torch, transformers, trl or datasets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "METHODS": ".methods",
    "Selection": ".methods",
    "LossRecorderCallback": ".record",
    "SnapshotCallback": ".record",
    "with_row_ids": ".rows",
    "DataSelector": ".selector",
    "GradientSpectra": ".spectra",
    "gradient_spectra": ".spectra",
    "RunStore": ".store",
    "StoreError": ".store",
    "SwiftReport": ".swift",
    "swift_study": ".swift",
}

__all__ = [
    "METHODS",
    "DataSelector",
    "GradientSpectra",
    "LossRecorderCallback",
    "RunStore",
    "Selection",
    "SnapshotCallback",
    "StoreError",
    "SwiftReport",
    "gradient_spectra",
    "swift_study",
    "with_row_ids",
]

if TYPE_CHECKING:
    from .methods import METHODS, Selection
    from .record import LossRecorderCallback, SnapshotCallback
    from .rows import with_row_ids
    from .selector import DataSelector
    from .spectra import GradientSpectra, gradient_spectra
    from .store import RunStore, StoreError
    from .swift import SwiftReport, swift_study


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_datasel' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
