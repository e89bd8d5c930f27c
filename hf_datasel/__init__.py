"""hf_datasel: instruction-tuning data selection as a Hugging Face Trainer plugin.

record (callbacks) -> store (a folder) -> methods (registry) -> DataSelector -> datasets.Dataset
"""

__version__ = "0.1.0"

from .methods import METHODS, Selection
from .record import LossRecorderCallback, SnapshotCallback
from .rows import with_row_ids
from .selector import DataSelector
from .spectra import GradientSpectra as GradientSpectra
from .spectra import gradient_spectra as gradient_spectra
from .store import RunStore, StoreError
from .swift import SwiftReport as SwiftReport
from .swift import swift_study as swift_study

__all__ = [
    "METHODS",
    "DataSelector",
    "LossRecorderCallback",
    "RunStore",
    "Selection",
    "SnapshotCallback",
    "StoreError",
    "with_row_ids",
]
