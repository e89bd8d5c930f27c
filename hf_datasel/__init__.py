"""hf_datasel: instruction-tuning data selection as a Hugging Face Trainer plugin.

record (callbacks) -> store (a folder) -> features -> methods (registry) -> DataSelector -> datasets.Dataset
"""

__version__ = "0.1.0"

from .methods import METHODS, Selection
from .record import LossRecorderCallback, SnapshotCallback
from .rows import with_row_ids
from .selector import DataSelector
from .spectra import GradientSpectra, gradient_spectra
from .store import RunStore, StoreError
from .swift import SwiftReport, swift_study

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
