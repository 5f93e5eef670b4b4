"""The classical post-processing baseline: per-class largest component and hole filling, chosen on data.

nnU-Net keeps only the largest connected component of a class when that raises the class's Dice on
its cross-validation predictions, and leaves the class alone otherwise. :func:`choose_cleanup` makes the
same decision per class and per step on training predictions (out-of-fold ones, when available);
:func:`apply_cleanup` applies it to new predictions. Hole filling is MONAI's ``FillHoles``; the largest
component is scipy's ``ndimage.label`` because MONAI's ``KeepLargestConnectedComponent`` needs
scikit-image, which RefNet does not otherwise depend on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from monai.transforms import FillHoles
from scipy import ndimage

from .labels import NUM_CLASSES

__all__ = ["CLEANUP_STEPS", "apply_cleanup", "choose_cleanup", "clean_class"]

CLEANUP_STEPS = ("largest_component", "fill_holes")  # in the order they are tried and applied


def clean_class(labels: np.ndarray, cls: int, step: str) -> np.ndarray:
    """``labels`` with one step applied to class ``cls``; other classes are untouched.

    ``largest_component``: voxels of other components of ``cls`` become background.
    ``fill_holes``: background voxels enclosed by ``cls`` alone become ``cls``.

    Raises:
        ValueError: an unknown step.
    """
    if step not in CLEANUP_STEPS:
        raise ValueError(f"unknown cleanup step {step!r}; choose one of {list(CLEANUP_STEPS)}.")
    where = np.nonzero(labels == cls)
    if not where[0].size:
        return labels
    # Work in the class's bounding box padded by one voxel: every component of the class lies inside,
    # and a hole of the class cannot reach the box's border, so the result equals the whole-volume one.
    box = tuple(slice(max(int(w.min()) - 1, 0), int(w.max()) + 2) for w in where)
    out = labels.copy()
    crop = out[box]
    if step == "largest_component":
        parts, count = ndimage.label(crop == cls, structure=np.ones((3, 3, 3)))  # 26-connected, as MONAI's
        if count > 1:
            sizes = np.bincount(parts.ravel())[1:]
            crop[(parts > 0) & (parts != 1 + int(np.argmax(sizes)))] = 0
    else:
        crop[...] = np.asarray(FillHoles(applied_labels=[cls])(crop[None]))[0].astype(labels.dtype)
    return out


def _class_dice(pred: np.ndarray, target: np.ndarray, cls: int) -> float:
    p, t = pred == cls, target == cls
    total = p.sum() + t.sum()
    return float("nan") if total == 0 else 2.0 * float((p & t).sum()) / float(total)


def choose_cleanup(predictions: Sequence[np.ndarray], targets: Sequence[np.ndarray], *,
                   num_classes: int = NUM_CLASSES) -> dict[int, list[str]]:
    """Per organ class, the steps that raise its mean Dice over these cases (nnU-Net's rule).

    Each step is tried after the ones already kept for the class, in :data:`CLEANUP_STEPS` order.

    Args:
        predictions, targets: label maps of the same cases, pairwise of one shape.

    Returns:
        class -> kept steps (classes that keep none are left out).
    """
    if len(predictions) != len(targets) or not predictions:
        raise ValueError("choose_cleanup needs one target per prediction and at least one case.")
    plan: dict[int, list[str]] = {}
    for cls in range(1, num_classes):
        current = list(predictions)
        scores = [_class_dice(p, t, cls) for p, t in zip(current, targets)]
        if all(np.isnan(scores)):  # absent everywhere: nothing to decide on
            continue
        score = np.nanmean(scores)
        for step in CLEANUP_STEPS:
            trial = [clean_class(p, cls, step) for p in current]
            trial_score = np.nanmean([_class_dice(p, t, cls) for p, t in zip(trial, targets)])
            if trial_score > score:
                plan.setdefault(cls, []).append(step)
                current, score = trial, trial_score
    return plan


def apply_cleanup(labels: np.ndarray, plan: Mapping[int, Sequence[str]]) -> np.ndarray:
    """``labels`` with each class's chosen steps applied (a copy; the input is not changed)."""
    out = labels.copy()
    for cls, steps in sorted(plan.items()):
        for step in steps:
            out = clean_class(out, int(cls), step)
    return out
