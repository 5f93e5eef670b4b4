"""Data: the generated phantom dataset and loaders for the BTCV/Synapse folder layout."""

from __future__ import annotations

from refnet.data.btcv import (
    BTCV_TEST_IDS,
    BTCV_TRAIN_IDS,
    SPLITS,
    Case,
    dataset_label_scheme,
    find_cases,
    load_case,
    split_cases,
)
from refnet.data.phantoms import (
    ORGAN_HU,
    Phantom,
    PhantomConfig,
    case_seed,
    make_phantom,
    write_phantom_dataset,
)

__all__ = [
    "BTCV_TEST_IDS",
    "BTCV_TRAIN_IDS",
    "ORGAN_HU",
    "SPLITS",
    "Case",
    "Phantom",
    "PhantomConfig",
    "case_seed",
    "dataset_label_scheme",
    "find_cases",
    "load_case",
    "make_phantom",
    "split_cases",
    "write_phantom_dataset",
]
