"""Scoring raw vs refined segmentations: per-class Dice, the paper's means, a table, JSON and a montage.

``mean_dice`` averages all 13 classes including background, the convention of the paper's Table 2;
``mean_organ_dice`` averages the 12 organs only. A class absent from a case's ground truth scores 0
when the prediction has it (a false positive is harm, nnU-Net's convention) and is left out of that
case's average (NaN) when the prediction lacks it too.

Dice cannot see a false positive of a class that is absent from the ground truth beyond that 0, nor
how large it is; :func:`false_positive_ml` measures, per class, the volume in mL predicted as the class
where the ground truth is another class.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .labels import CLASS_NAMES, CLASSES, NUM_CLASSES

__all__ = [
    "dice_per_class",
    "false_positive_ml",
    "format_table",
    "save_figure",
    "save_montage",
    "summarise",
    "write_metrics",
]


def dice_per_class(pred: np.ndarray, target: np.ndarray, *, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Dice of every class between two label maps.

    Args:
        pred, target: integer label maps of the same shape (any dimensionality).
        num_classes: classes scored, 0..num_classes-1.

    Returns:
        (num_classes,) float64; 0.0 where ``target`` lacks the class but ``pred`` has it (nnU-Net's
        convention: a false positive of an absent structure is an error), NaN where both lack it.

    Raises:
        ValueError: ``pred`` and ``target`` differ in shape.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {target.shape}.")
    # Counts from bincount instead of monai's compute_dice: the same Dice (a test compares them), but a
    # 512 x 512 x 200 map needs no (13, N) one-hot (3 GB as float) and takes a second instead of a minute.
    p, t = np.ravel(pred), np.ravel(target)
    same = p == t
    inter = _counts(p[same], num_classes)
    p_sum, t_sum = _counts(p, num_classes), _counts(t, num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2.0 * inter / (p_sum + t_sum)
    dice[t_sum == 0] = np.nan  # absent from both: not scored
    dice[(t_sum == 0) & (p_sum > 0)] = 0.0  # a false positive of an absent structure is an error
    return dice


def _counts(values: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) float64 voxels of each class 0..num_classes-1; other values are not counted."""
    if values.dtype.kind == "i":
        values = values[(values >= 0) & (values < num_classes)]
    else:
        values = values[values < num_classes]
    return np.bincount(values.astype(np.intp, copy=False), minlength=num_classes)[:num_classes].astype(np.float64)


def false_positive_ml(
    pred: np.ndarray,
    target: np.ndarray,
    *,
    voxel_volume_ml: float,
    num_classes: int = NUM_CLASSES,
) -> np.ndarray:
    """Volume of every class predicted where the ground truth is another class.

    Counts the voxels with ``pred == c`` and ``target != c``, for each class ``c``, and converts
    them to mL. Unlike Dice this sees the size of the harm, also for classes the ground truth
    lacks (where Dice is a flat 0). Values outside 0..num_classes-1 are not counted.

    Args:
        pred: integer label map (prediction).
        target: integer label map (ground truth) of the same shape.
        voxel_volume_ml: volume of one voxel in mL (product of the spacing in mm / 1000).
        num_classes: classes measured, 0..num_classes-1.

    Returns:
        (num_classes,) float64 false-positive volume in mL per class (entry 0 is background
        predicted inside a labelled structure).

    Raises:
        ValueError: shapes differ, ``voxel_volume_ml`` is not a positive finite number, or
            ``num_classes`` < 1.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {target.shape}.")
    if not (np.isfinite(voxel_volume_ml) and voxel_volume_ml > 0):
        raise ValueError(f"voxel_volume_ml must be a positive finite number, got {voxel_volume_ml!r}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    wrong = pred.astype(np.int64)[pred != target]
    wrong = wrong[(wrong >= 0) & (wrong < num_classes)]
    counts = np.bincount(wrong, minlength=num_classes)
    return counts.astype(np.float64) * float(voxel_volume_ml)


def summarise(
    per_case: Sequence[np.ndarray],
    *,
    false_positive_ml: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Average per-case Dice (and optionally false-positive volume) vectors into the metrics.json form.

    Args:
        per_case: (C,) Dice vectors, one per case (NaN = class absent from prediction and ground truth).
        false_positive_ml: optional (C,) false-positive volumes in mL (see :func:`false_positive_ml`),
            one per case in the order of ``per_case``.

    Returns:
        ``{"dice": {class name: mean}, "mean_dice": mean over 13 classes, "mean_organ_dice": over 12,
        "cases": n}``; with ``false_positive_ml`` also ``"false_positive_ml": {class name: mean mL over
        cases}`` and ``"mean_false_positive_ml"``: the mean of the 12 organs' values.

    Raises:
        ValueError: ``false_positive_ml`` holds another number of cases than ``per_case`` or vectors
            of another shape.
    """
    stack = np.stack(per_case)  # (N, C)
    with warnings.catch_warnings():  # a class absent from every case stays NaN (reported as null)
        warnings.simplefilter("ignore", RuntimeWarning)
        per_class = np.nanmean(stack, axis=0)
    out: dict[str, Any] = {
        "dice": {name: _num(v) for name, v in zip(CLASS_NAMES, per_class)},
        "mean_dice": _num(np.nanmean(per_class)),
        "mean_organ_dice": _num(np.nanmean(per_class[1:])),
        "cases": len(per_case),
    }
    if false_positive_ml is not None:
        if len(false_positive_ml) != len(per_case):
            raise ValueError(f"false_positive_ml has {len(false_positive_ml)} cases, per_case has {len(per_case)}.")
        fp = np.stack([np.asarray(v, dtype=np.float64) for v in false_positive_ml])
        if fp.shape != stack.shape:
            raise ValueError(f"false_positive_ml vectors have shape {fp.shape[1:]}, the Dice vectors "
                             f"{stack.shape[1:]}.")
        fp_mean = fp.mean(axis=0)
        out["false_positive_ml"] = {name: _num(v) for name, v in zip(CLASS_NAMES, fp_mean)}
        out["mean_false_positive_ml"] = _num(fp_mean[1:].mean())
    return out


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 5)


def format_table(metrics: Mapping[str, Any], methods: Sequence[str] = ("raw", "refined")) -> str:
    """Per-class table of the given methods with the change of the last against the first."""
    methods = [m for m in methods if m in metrics]
    head = f"{'class':<26}" + "".join(f"{m:>10}" for m in methods)
    if len(methods) >= 2:
        head += f"{'change':>10}"
    lines = [head, "-" * len(head)]
    rows = [*CLASS_NAMES, "mean_dice (13 classes)", "mean_organ_dice (12)"]
    for row in rows:
        vals = [_lookup(metrics[m], row) for m in methods]
        line = f"{row:<26}" + "".join(f"{_fmt(v):>10}" for v in vals)
        if len(vals) >= 2 and None not in (vals[0], vals[-1]):
            line += f"{vals[-1] - vals[0]:>+10.4f}"
        lines.append(line)
    return "\n".join(lines)


def _lookup(method: Mapping[str, Any], row: str) -> float | None:
    if row.startswith("mean_dice"):
        return method["mean_dice"]
    if row.startswith("mean_organ_dice"):
        return method["mean_organ_dice"]
    return method["dice"].get(row)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def write_metrics(path: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics`` as indented JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _colour_table() -> np.ndarray:
    return np.array([c.color for c in CLASSES], dtype=np.float32) / 255.0


def save_montage(
    path: str | os.PathLike,
    ct: np.ndarray,
    panels: Mapping[str, np.ndarray],
    *,
    n_slices: int = 4,
    window: tuple[float, float] = (40.0, 400.0),
) -> Path:
    """PNG of a few axial slices: CT, then each label map overlaid on it, one column per panel.

    Args:
        path: output PNG.
        ct: (I, J, K) HU in canonical RAS layout.
        panels: title -> (I, J, K) class map, e.g. ``{"raw": ..., "refined": ..., "ground truth": ...}``.
        n_slices: rows; the slices where the first two panels differ most are shown.
        window: CT (level, width) in HU.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = list(panels.values())
    diff = (maps[0] != maps[1]).sum(axis=(0, 1)) if len(maps) > 1 else (maps[0] > 0).sum(axis=(0, 1))
    order = np.argsort(-diff, kind="stable")[:n_slices]
    rows = sorted(int(k) for k in order if diff[k] > 0) or [int(np.argmax((maps[0] > 0).sum(axis=(0, 1))))]
    level, width = window
    colours = _colour_table()
    fig, axes = plt.subplots(len(rows), len(panels) + 1, figsize=(3 * (len(panels) + 1), 3 * len(rows)),
                             squeeze=False)
    for r, k in enumerate(rows):
        # Anterior up, patient's right on the left (radiological convention).
        img = np.clip((ct[:, :, k] - (level - width / 2)) / width, 0, 1).T[::-1, ::-1]
        for c, (title, lab) in enumerate([("CT", None), *panels.items()]):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            if lab is not None:
                sl = lab[:, :, k].T[::-1, ::-1]
                rgba = np.zeros((*sl.shape, 4), dtype=np.float32)
                rgba[..., :3] = colours[sl]
                rgba[..., 3] = (sl > 0) * 0.55
                ax.imshow(rgba)
            ax.set_title(f"{title} (slice {k})", fontsize=8)
            ax.axis("off")
    return save_figure(fig, path, dpi=80)


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
