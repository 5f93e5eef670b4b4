"""No-harm checks: refine label maps that are already correct and measure how much they change.

A refiner that damages a correct segmentation is worse than none, so every model is judged first on
correct maps (ground truth of phantoms at several spacings, real manual annotations), which must
come back essentially unchanged, and only then on its gains.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .checkpoint import LoadedModel
from .evaluate import dice_per_class
from .guards import new_pieces
from .labels import CLASS_NAMES, NUM_CLASSES, to_class_labels
from .refine import RefineConfig, refine_volume

__all__ = ["new_components", "no_harm_scores"]


def new_components(before: np.ndarray, after: np.ndarray) -> int:
    """Connected pieces (26-connectivity) of an organ in ``after`` that do not touch it in ``before``."""
    changed = before != after
    found = (new_pieces(before, after, int(c), changed) for c in np.unique(after[changed]) if 0 < c < NUM_CLASSES)
    return sum(f[2] for f in found if f is not None)


def no_harm_scores(labels: np.ndarray, affine: np.ndarray, model: LoadedModel, *, scheme: str = "refnet",
                   config: RefineConfig | None = None, pieces: Any = None,
                   ct: np.ndarray | None = None) -> dict[str, Any]:
    """Refine a correct label map and compare the result with it.

    Args:
        labels: (X, Y, Z) integer label map in ``scheme`` (e.g. a manual annotation).
        affine: (4, 4) voxel-to-RAS affine.
        model: the RefNet to check.
        scheme: label numbering of ``labels``; structures outside RefNet's classes are ignored.
        config: refinement settings (default: guards on, as users get them).
        pieces: a :class:`refnet.pieces.PieceDecider` applied after the refiner (None: the refiner alone).
        ct: the CT (HU, same grid), for a model or a decider that reads it.

    Returns:
        ``{"mean_dice": mean Dice over the organs present, "min_dice": the lowest organ's,
        "changed_fraction": changed voxels / labelled voxels, "invented_classes": [...],
        "new_components": n, "held_back": {...}, "warnings": [...], "dropped_pieces": {...} (the
        model file's decider), "pieces_dropped": n or None (``pieces``), "worst_organ": {"name", "voxels"
        (its voxels in the input), "dice"} or None}``.
    """
    classes, _ = to_class_labels(np.asarray(labels), scheme)
    result = refine_volume(classes, affine, model, config=config, ct=ct)
    refined, dropped = result.labels, None
    if pieces is not None:
        refined, dropped = pieces.apply_to(refined, affine, ct=ct if pieces.uses_ct else None)
    dice = dice_per_class(refined, classes)[1:]
    counts = np.bincount(classes.ravel(), minlength=NUM_CLASSES)[1:]
    present = counts > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        organs = dice[present]
    invented = sorted(int(c) for c in np.unique(refined) if c and not present[c - 1])
    labelled = max(1, int((classes > 0).sum()))
    worst = None
    if organs.size:  # which organ the min is, and how big it was: a sliver's Dice moves with one voxel
        c = int(np.flatnonzero(present)[np.argmin(organs)])
        worst = {"name": CLASS_NAMES[c + 1], "voxels": int(counts[c]), "dice": round(float(dice[c]), 5)}
    return {
        "mean_dice": round(float(np.mean(organs)), 5) if organs.size else None,
        "min_dice": round(float(np.min(organs)), 5) if organs.size else None,
        "changed_fraction": round(int((refined != classes).sum()) / labelled, 6),
        "invented_classes": invented,
        "new_components": new_components(classes, refined),
        "held_back": result.report.held_back,
        "warnings": result.report.warnings,
        "dropped_pieces": result.report.dropped_pieces,  # by the model file's own piece decider
        "pieces_dropped": dropped,  # by the ``pieces`` decider given here
        "worst_organ": worst,
    }
