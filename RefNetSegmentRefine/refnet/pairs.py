"""RefNet training pairs: the pair type, and assembling pairs from files (ground truth plus K folders of predictions).

Every array is brought to canonical RAS layout here, once, so training never has to think about
orientation; refinement does the same through :mod:`refnet.geometry`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .geometry import canonical_affine, to_canonical
from .io import read_affine

__all__ = ["EXTRA_LABELS_IDS", "TrainingPair", "load_label_maps", "load_training_pairs"]

EXTRA_LABELS_IDS = 20_000  # case id of the first extra label map (datasets and extra phantoms use lower ids)


@dataclass(frozen=True)
class TrainingPair:
    """One training pair, all arrays in canonical RAS layout (axial slices ``[:, :, k]``).

    Attributes:
        raw: (I, J, K) uint8 classes from a segmentation model (S).
        target: (I, J, K) uint8 ground-truth classes (GT).
        case_id: the case, so all pairs of a case go to the same side of the validation split.
        source: which segmentation model made ``raw``.
        ct: (I, J, K) float32 HU, needed for CT-conditioned models.
        affine: (4, 4) voxel-to-world affine.
    """

    raw: np.ndarray
    target: np.ndarray
    case_id: int
    source: str = ""
    ct: np.ndarray | None = None
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))

    def __post_init__(self) -> None:
        if self.raw.shape != self.target.shape or self.raw.ndim != 3:
            raise ValueError(f"case {self.case_id}: raw {self.raw.shape} and target {self.target.shape} "
                             "must be 3D arrays of one shape.")
        if self.ct is not None and self.ct.shape != self.raw.shape:
            raise ValueError(f"case {self.case_id}: CT shape {self.ct.shape} differs from labels {self.raw.shape}.")


def load_training_pairs(
    dataset_dir: str | os.PathLike,
    prediction_dirs: Sequence[str | os.PathLike],
    *,
    split: str = "train",
    scheme: str = "refnet",
    with_ct: bool = False,
) -> list[TrainingPair]:
    """One pair per (case, prediction folder): K folders give K pairs per case (Algorithm 1, step 1).

    Args:
        dataset_dir: BTCV-layout dataset with ground truth.
        prediction_dirs: folders of predicted label maps named by case (see
            :func:`refnet.segmenters.load_prediction_folder`).
        split: which cases: ``train``, ``test`` or ``all``.
        scheme: label scheme of the prediction files.
        with_ct: also keep the CT (for CT-conditioned RefNets).

    Raises:
        ValueError: no prediction folders, or predictions whose shape differs from the image.
    """
    from .data.btcv import find_cases, load_case, split_cases
    from .segmenters import load_prediction_folder

    if not prediction_dirs:
        raise ValueError("no prediction folders given; pass one folder of label maps per segmentation model.")
    cases = split_cases(find_cases(dataset_dir), split)
    if not cases:
        raise ValueError(f"{dataset_dir}: no cases of the {split!r} split found.")
    ids = [c.case_id for c in cases]
    affines = {c.case_id: read_affine(c.image) for c in cases}  # headers only
    predictions = {Path(d).name: load_prediction_folder(d, ids, scheme=scheme, affines=affines)
                   for d in prediction_dirs}
    pairs = []
    for case in cases:
        ct, target = load_case(case)
        canon_target, _ = to_canonical(target, ct.affine)
        canon_ct = to_canonical(ct.array, ct.affine)[0].astype(np.float32) if with_ct else None
        affine = canonical_affine(ct.affine, ct.array.shape)
        for source, preds in predictions.items():
            raw = preds[case.case_id]
            if raw.shape != target.shape:
                raise ValueError(f"{source}: prediction of case {case.case_id} has shape {raw.shape}, "
                                 f"image has {target.shape}; resample predictions onto the image grid.")
            pairs.append(TrainingPair(raw=np.ascontiguousarray(to_canonical(raw, ct.affine)[0]),
                                      target=np.ascontiguousarray(canon_target), case_id=case.case_id,
                                      source=source, ct=canon_ct, affine=affine))
    return pairs


def load_label_maps(folder: str | os.PathLike, *, scheme: str = "refnet") -> list[TrainingPair]:
    """Correct label maps without CT or predictions (e.g. manual annotations) as identity training pairs.

    Every NIfTI/NRRD file in ``folder`` (sorted by name, not recursive) becomes one pair with
    ``raw = target``, in canonical layout, case ids from :data:`EXTRA_LABELS_IDS` on; pass them to
    :func:`refnet.train.train_refnet` as ``extra_maps`` (with ``simulated_pairs`` they also give
    simulated-error pairs). Only train on maps whose licence allows it.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: no label map in it, or a file that is not a valid label map of ``scheme``.
    """
    from .io import load_volume, volume_suffix
    from .labels import to_class_labels

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder of label maps.")
    files = []
    for path in sorted(root.iterdir()):
        try:
            volume_suffix(path)
        except ValueError:
            continue
        if path.is_file() and not path.name.startswith("."):
            files.append(path)
    if not files:
        raise ValueError(f"{root}: no label maps (.nii.gz, .nii, .nrrd) found.")
    pairs = []
    for n, path in enumerate(files):
        vol = load_volume(path)
        classes, _ = to_class_labels(vol.array, scheme)
        canon = np.ascontiguousarray(to_canonical(classes, vol.affine)[0])
        pairs.append(TrainingPair(raw=canon, target=canon, case_id=EXTRA_LABELS_IDS + n, source=path.name,
                                  affine=canonical_affine(vol.affine, vol.array.shape)))
    return pairs
