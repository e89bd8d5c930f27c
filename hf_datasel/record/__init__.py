"""Step 1 of the flow: callbacks that record what a training run reveals about each row."""

from .loss_recorder import LossRecorderCallback
from .per_sample_loss import per_sample_loss
from .snapshot import SnapshotCallback

__all__ = ["LossRecorderCallback", "SnapshotCallback", "per_sample_loss"]
