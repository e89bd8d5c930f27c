"""Step 2 of the flow: per-sample gradient features of any dataset at any snapshot.

The API other methods use (stable):

    from hf_datasel.featurize import gradient_features

    # LESS / G2IS: Adam-preconditioned train features and plain target features, per snapshot
    train = gradient_features(store, train_ds, preconditioner="adam", k=8192, seed=0)
    target = gradient_features(store, target_ds, preconditioner="none", k=8192, seed=0)
    for tr, tg in zip(train, target):           # same snapshots, ascending step
        check_same_space(tr, tg)                # same projector spec, or SpecMismatchError
        tr.weight                               # learning-rate weight of the snapshot (sums to 1)
        tr.unit, tr.norms                       # (rows, k) fp16 unit rows (memmap), (rows,) float32 norms
        tr.raw()                                # float32 unit * norm; NaN rows: undefined gradient

    # Swift Study: plain per-sample gradients of arbitrary datasets, exact (k=None) or projected
    probes = gradient_features(store, probe_ds, k=None)

Features are computed inside the call when missing and cached in the store (keyed by the
tokenized rows, the snapshot, the preconditioner and the projector spec); see `features.py`
for the storage layout, resuming and sharding, `grads.py` for the exact per-sample gradients,
`projector.py` for the seeded projections.
"""

from .features import (
    PRECONDITIONERS,
    FeatureSet,
    Featurizer,
    adam_precondition,
    check_same_space,
    dataset_key,
    featurize_rows,
    gradient_features,
    merge_shards,
    plan_batches,
    shard_batches,
)
from .grads import PerSampleGradientError, PerSampleGradients
from .projector import Projector, ProjectorSpec, SpecMismatchError
from .snapshots import Snapshot, assign_snapshot, load_model, load_snapshot, load_tokenizer, snapshot_steps

__all__ = [
    "PRECONDITIONERS",
    "FeatureSet",
    "Featurizer",
    "PerSampleGradientError",
    "PerSampleGradients",
    "Projector",
    "ProjectorSpec",
    "Snapshot",
    "SpecMismatchError",
    "adam_precondition",
    "assign_snapshot",
    "check_same_space",
    "dataset_key",
    "featurize_rows",
    "gradient_features",
    "load_model",
    "load_snapshot",
    "load_tokenizer",
    "merge_shards",
    "plan_batches",
    "shard_batches",
    "snapshot_steps",
]
