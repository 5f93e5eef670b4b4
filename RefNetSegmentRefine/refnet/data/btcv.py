"""Datasets in the BTCV/Synapse layout: ``imgNNNN.nii.gz`` CTs with ``labelNNNN.nii.gz`` label maps.

The files lie either flat in one folder or in ``img/`` and ``label/`` subfolders (``.nii`` works
too). A ``dataset.json`` beside them may name the label scheme: generated phantoms say
``"refnet"``; without it the labels are real BTCV values 0..13 (adrenals 12 and 13 merge).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refnet.io import Volume, load_volume
from refnet.labels import LABEL_SCHEMES, to_class_labels

__all__ = [
    "BTCV_TEST_IDS",
    "BTCV_TRAIN_IDS",
    "SPLITS",
    "Case",
    "dataset_label_scheme",
    "find_cases",
    "load_case",
    "split_cases",
]

logger = logging.getLogger(__name__)

# The standard 18/12 split of the 30 labelled BTCV training cases (as in TransUNet / Synapse).
BTCV_TRAIN_IDS: tuple[int, ...] = (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40)
BTCV_TEST_IDS: tuple[int, ...] = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)
SPLITS: tuple[str, ...] = ("train", "test", "all")

_IMAGE = re.compile(r"^img(\d+)\.nii(\.gz)?$")
_LABEL = re.compile(r"^label(\d+)\.nii(\.gz)?$")
_AFFINE_TOL_MM = 1e-3


@dataclass(frozen=True)
class Case:
    """One case of a BTCV-layout dataset.

    Attributes:
        case_id: the number in the file names (``img0005`` -> 5).
        image: path of the CT.
        label: path of the label map, or None for an unlabelled case.
    """

    case_id: int
    image: Path
    label: Path | None = None


def _scan(folders: Iterable[Path], pattern: re.Pattern[str]) -> tuple[dict[int, Path], list[str]]:
    """Files matching ``pattern`` in ``folders`` by case id, and problems (the same id twice)."""
    found: dict[int, Path] = {}
    problems = []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            match = pattern.match(path.name)
            if not match or not path.is_file():
                continue
            cid = int(match.group(1))
            if cid in found:
                problems.append(f"case {cid} has two files, {found[cid]} and {path}; keep one.")
            else:
                found[cid] = path
    return found, problems


def _partner(path: Path, kind: str, case_id: int) -> Path:
    """Where the ``kind`` ("img" or "label") file of ``path``'s case is expected."""
    folder = path.parent.parent / kind if path.parent.name in ("img", "label") else path.parent
    return folder / f"{kind}{case_id:04d}.nii.gz"


def find_cases(root: str | os.PathLike, *, require_labels: bool = True) -> dict[int, Case]:
    """Discover the cases of a BTCV-layout dataset.

    Args:
        root: folder holding ``imgNNNN.nii[.gz]`` and ``labelNNNN.nii[.gz]``, flat or in ``img/`` and
            ``label/`` subfolders (e.g. BTCV's ``RawData/Training``).
        require_labels: when True, every image must have a label map.

    Returns:
        ``{case_id: Case}`` sorted by case id.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no images.
        ValueError: images without labels (when required), labels without images, or a case id
            with two files; one message lists every problem.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist or is not a folder; check the path.")
    images, problems = _scan([f for f in (root, root / "img") if f.is_dir()], _IMAGE)
    labels, label_problems = _scan([f for f in (root, root / "label") if f.is_dir()], _LABEL)
    if not images:
        stray = f" (but {len(labels)} label maps)" if labels else ""
        raise FileNotFoundError(
            f"no images found in {root} or {root / 'img'}{stray}: expected files named img0001.nii.gz "
            "(or .nii); point to the folder that holds img/ and label/ (e.g. BTCV RawData/Training)."
        )
    problems += label_problems
    if require_labels:
        problems += [f"image {images[c].name} has no label map (expected {_partner(images[c], 'label', c)})."
                     for c in sorted(set(images) - set(labels))]
    problems += [f"label map {labels[c].name} has no image (expected {_partner(labels[c], 'img', c)})."
                 for c in sorted(set(labels) - set(images))]
    if problems:
        raise ValueError(
            f"dataset {root} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems)
            + "\nAdd the missing files or remove the strays"
            + ("; pass require_labels=False to use images without labels." if require_labels else ".")
        )
    return {c: Case(c, images[c], labels.get(c)) for c in sorted(images)}


def dataset_label_scheme(root: str | os.PathLike) -> str:
    """The label scheme of a dataset: ``dataset.json``'s ``label_scheme``, else ``"btcv"``.

    Raises:
        ValueError: ``dataset.json`` is not valid JSON or names an unknown scheme.
    """
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return "btcv"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}); fix or delete it.") from err
    scheme = meta.get("label_scheme", "btcv") if isinstance(meta, dict) else "btcv"
    if scheme not in LABEL_SCHEMES:
        raise ValueError(f"{path} names label_scheme {scheme!r}; use one of {sorted(LABEL_SCHEMES)}.")
    return scheme


def split_cases(cases: Mapping[int, Case] | Iterable[Case], split: str, *, ids: Sequence[int] | None = None,
                strict: bool = False) -> list[Case]:
    """The cases of a split, in the split's id order.

    Args:
        cases: ``find_cases`` output, or any iterable of Case.
        split: ``"train"`` (:data:`BTCV_TRAIN_IDS`), ``"test"`` (:data:`BTCV_TEST_IDS`) or ``"all"``
            (every case present).
        ids: case ids to use instead of the split's standard ids.
        strict: when True, every wanted id must be present; when False (default) the missing ones
            are skipped, so phantom datasets generated with a subset of ids work.

    Returns:
        The selected cases; possibly empty when ``strict`` is False (logged as a warning).

    Raises:
        ValueError: unknown split, or (strict) missing ids; the message lists them.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}.")
    by_id = dict(cases) if isinstance(cases, Mapping) else {c.case_id: c for c in cases}
    if ids is not None:
        wanted = [int(i) for i in ids]
    else:
        wanted = {"train": list(BTCV_TRAIN_IDS), "test": list(BTCV_TEST_IDS), "all": sorted(by_id)}[split]
    missing = [i for i in wanted if i not in by_id]
    if missing and strict:
        raise ValueError(f"split {split!r} wants case ids {missing} that are not in the dataset (present: "
                         f"{sorted(by_id)}); add those cases, pass ids=..., or use strict=False.")
    selected = [by_id[i] for i in wanted if i in by_id]
    if not selected:
        logger.warning("split %r selects no case: wanted ids %s, present %s", split, wanted, sorted(by_id))
    return selected


def _integer_labels(array: np.ndarray, path: Path) -> np.ndarray:
    """The label map as integers; raise when it holds fractional values (an image, not labels)."""
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return array
    if not np.all(np.isfinite(array)) or not np.all(np.mod(array, 1) == 0):
        raise ValueError(f"{path}: label map holds fractional values (dtype {array.dtype}); "
                         "pass a label map, not an image, or round it to integers.")
    return array.astype(np.int32)


def load_case(case: Case, *, scheme: str | None = None) -> tuple[Volume, np.ndarray]:
    """Load a case's CT and its label map converted to RefNet classes.

    Args:
        case: a labelled case from :func:`find_cases`.
        scheme: label scheme of the label map; None reads it with :func:`dataset_label_scheme`
            from the dataset folder (the parent of ``img/``, or the flat folder).

    Returns:
        ``(ct, classes)``: the CT as a Volume with an (I, J, K) float32 HU array and its (4, 4)
        affine, and the (I, J, K) uint8 RefNet class map (0..12) on the same grid.

    Raises:
        ValueError: no label map, different shapes or affines (beyond 1e-3 mm), a fractional label
            map, or an unknown scheme.
        FileNotFoundError: a file is missing.
    """
    if case.label is None:
        raise ValueError(f"case {case.case_id} ({case.image}) has no label map; load it with "
                         f"refnet.io.load_volume, or add label{case.case_id:04d}.nii.gz.")
    if scheme is None:
        parent = case.image.parent
        scheme = dataset_label_scheme(parent.parent if parent.name == "img" else parent)
    image, label = load_volume(case.image), load_volume(case.label)
    fix = "resample the label map onto the image grid (nearest neighbour), e.g. with 3D Slicer or SimpleITK."
    if image.array.shape != label.array.shape:
        raise ValueError(f"case {case.case_id}: image {case.image} has shape {image.array.shape} but "
                         f"label map {case.label} has shape {label.array.shape}; {fix}")
    if not np.allclose(image.affine, label.affine, rtol=0.0, atol=_AFFINE_TOL_MM):
        raise ValueError(f"case {case.case_id}: image {case.image} and label map {case.label} have different "
                         f"affines (differ by up to {np.abs(image.affine - label.affine).max():.4g} mm):\n"
                         f"{np.array2string(image.affine, precision=4)}\nvs\n"
                         f"{np.array2string(label.affine, precision=4)}\n{fix}")
    classes, unmapped = to_class_labels(_integer_labels(label.array, case.label), scheme)
    if unmapped.any():
        values = np.unique(label.array[unmapped])[:10].tolist()
        logger.warning("%s: %d voxels hold values %s outside the %r scheme; set to background",
                       case.label, int(unmapped.sum()), values, scheme)
    return Volume(np.asarray(image.array, dtype=np.float32), image.affine), classes
