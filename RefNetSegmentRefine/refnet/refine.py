"""Refine one 3D label map with a trained RefNet: the function every front calls.

Layered as in nnU-Net: :func:`predict_logits` (net on a batch of slices), :func:`logits_to_labels`,
then the pure :func:`restrict_changes`; :func:`refine_labels` streams slices through them. Only the
labelled bounding box (plus a margin) is processed; everything else is copied through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import LoadedModel
from .geometry import check_affine, to_canonical
from .labels import check_class_labels

__all__ = [
    "ProgressCallback",
    "RefineConfig",
    "RefinementCancelled",
    "label_slab",
    "logits_to_labels",
    "predict_logits",
    "refine_labels",
    "restrict_changes",
    "window_ct",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], "bool | None"]
"""Called as ``progress(done_slices, total_slices)``; returning ``False`` cancels the run."""

_ALIGN = 16  # BasicUNet halves the image 4 times
_MIN_SIZE = 32  # so the bottleneck keeps more than one pixel for its instance norm


class RefinementCancelled(RuntimeError):
    """Raised when the progress callback asked to stop; no output was produced."""


@dataclass(frozen=True)
class RefineConfig:
    """How a volume is streamed through the net."""

    batch_size: int = 8  # axial slices per forward pass (memory vs speed)
    margin: int = 16  # in-plane voxels kept around the labelled bounding box
    slice_margin: int = 2  # extra slices refined above and below the labelled range

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.margin < 0 or self.slice_margin < 0:
            raise ValueError(f"margins must be >= 0, got margin={self.margin}, slice_margin={self.slice_margin}.")


def window_ct(ct: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip HU to ``[level - width/2, level + width/2]`` and scale to [0, 1] (float32)."""
    if width <= 0:
        raise ValueError(f"CT window width must be > 0, got {width}.")
    low = level - width / 2.0
    return np.clip((np.asarray(ct, dtype=np.float32) - low) / width, 0.0, 1.0)


def label_slab(volume: np.ndarray, centres: Sequence[int], context: int) -> np.ndarray:
    """Stack ``2*context+1`` neighbouring axial slices around each centre (edges repeat).

    Args:
        volume: (I, J, K) array in canonical layout (axial slices ``[:, :, k]``).
        centres: slice indices k.
        context: neighbours on each side.

    Returns:
        (B, 2*context+1, I, J) array of ``volume``'s dtype.
    """
    k = volume.shape[2]
    offsets = np.arange(-context, context + 1)
    idx = np.clip(np.asarray(centres)[:, None] + offsets[None, :], 0, k - 1)  # (B, S)
    return np.moveaxis(volume[:, :, idx], (2, 3), (0, 1))  # (B, S, I, J)


@torch.no_grad()
def predict_logits(model: LoadedModel, labels: np.ndarray, ct: np.ndarray | None = None) -> torch.Tensor:
    """Run the net on a batch of slices.

    Args:
        model: a loaded RefNet.
        labels: (B, S, H, W) integer classes.
        ct: (B, ct_channels, H, W) windowed CT in [0, 1], or None for label-only models.

    Returns:
        (B, C, H, W) float32 logits on the model's device.
    """
    x = torch.as_tensor(np.ascontiguousarray(labels), dtype=torch.long, device=model.device)
    c = None if ct is None else torch.as_tensor(np.ascontiguousarray(ct), dtype=torch.float32, device=model.device)
    return model.net(x, c).float()


def logits_to_labels(logits: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) logits -> (B, H, W) uint8 class indices."""
    return logits.argmax(dim=1).to(torch.uint8).cpu().numpy()


def restrict_changes(raw: np.ndarray, refined: np.ndarray, allowed: Sequence[int]) -> np.ndarray:
    """Keep the raw label wherever the refinement would touch a class outside ``allowed``.

    A voxel takes the refined label only if both its raw and refined classes are allowed, so a
    disallowed class keeps exactly its raw mask. Used for classes a model failed its per-class check on.

    Args:
        raw, refined: integer arrays of the same shape.
        allowed: class indices the refinement may change.

    Returns:
        New array of ``refined``'s dtype.
    """
    allowed = np.asarray(sorted(set(int(a) for a in allowed)))
    ok = np.isin(raw, allowed) & np.isin(refined, allowed)
    return np.where(ok, refined, raw).astype(refined.dtype)


def _check_inputs(labels: np.ndarray, ct: np.ndarray | None, model: LoadedModel) -> None:
    if not isinstance(labels, np.ndarray) or labels.ndim != 3:
        shape = getattr(labels, "shape", None)
        raise ValueError(f"label map must be a 3D array, got shape {shape}; refine one volume at a time.")
    check_class_labels(labels)
    if model.uses_ct and ct is None:
        raise ValueError("this RefNet model needs the CT as input; pass the CT volume (--ct).")
    if ct is not None and np.shape(ct) != labels.shape:
        raise ValueError(
            f"CT shape {np.shape(ct)} differs from label map shape {labels.shape}; "
            "resample the label map onto the CT grid first."
        )


def _crop_box(labels: np.ndarray, config: RefineConfig) -> tuple[slice, slice, slice]:
    nz = np.nonzero(labels)
    lo = [int(a.min()) for a in nz]
    hi = [int(a.max()) + 1 for a in nz]
    margins = (config.margin, config.margin, config.slice_margin)
    return tuple(slice(max(0, a - m), min(n, b + m)) for a, b, m, n in zip(lo, hi, margins, labels.shape))


def _pad_to(a: np.ndarray, align: int) -> np.ndarray:
    pads = [(0, 0)] * (a.ndim - 2) + [(0, max(_MIN_SIZE, n + (-n) % align) - n) for n in a.shape[-2:]]
    return np.pad(a, pads, mode="edge")


def refine_labels(
    labels: np.ndarray,
    affine: np.ndarray,
    model: LoadedModel,
    *,
    ct: np.ndarray | None = None,
    config: RefineConfig | None = None,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Refine a 3D label map slice by slice along its axial axis.

    Args:
        labels: (X, Y, Z) integer RefNet classes 0..12, any orientation.
        affine: (4, 4) voxel-to-world affine; the axial axis is found from it.
        model: a loaded RefNet (see :func:`refnet.checkpoint.load_model`).
        ct: (X, Y, Z) CT in HU on the same grid; required for CT-conditioned models.
        config: streaming settings.
        progress: ``progress(done, total)`` after each batch; return False to cancel.

    Returns:
        New label map of the same shape and dtype; the input is not modified.

    Raises:
        ValueError: bad shapes, values outside the classes, missing CT for a CT model.
        RefinementCancelled: the progress callback returned False.
    """
    config = config or RefineConfig()
    _check_inputs(labels, ct, model)
    affine = check_affine(affine)
    if not labels.any():
        logger.info("label map is empty; nothing to refine")
        return labels.copy()
    canon, reo = to_canonical(labels, affine)
    box = _crop_box(canon, config)
    raw = np.ascontiguousarray(canon[box]).astype(np.int64)  # (I, J, K) crop
    ct_crop = None
    if model.uses_ct:
        level, width = model.metadata.get("ct_window") or (40.0, 400.0)
        ct_crop = window_ct(reo.forward(np.asarray(ct))[box], level, width)
    out = _refine_crop(raw, ct_crop, model, config, progress)
    out = restrict_changes(raw, out, model.refine_classes)
    refined = np.array(canon, copy=True)
    refined[box] = out
    return reo.backward(refined).astype(labels.dtype, copy=False)


def _refine_crop(
    raw: np.ndarray, ct: np.ndarray | None, model: LoadedModel, config: RefineConfig,
    progress: ProgressCallback | None,
) -> np.ndarray:
    depth = raw.shape[2]
    context = model.config.context
    out = np.empty(raw.shape, dtype=np.int64)
    h, w = raw.shape[:2]
    for start in range(0, depth, config.batch_size):
        centres = list(range(start, min(depth, start + config.batch_size)))
        slab = _pad_to(label_slab(raw, centres, context), _ALIGN)  # (B, S, H', W')
        ct_slab = None if ct is None else _pad_to(label_slab(ct, centres, 0), _ALIGN)  # (B, 1, H', W')
        pred = logits_to_labels(predict_logits(model, slab, ct_slab))[:, :h, :w]  # (B, H, W)
        out[:, :, centres[0] : centres[-1] + 1] = np.moveaxis(pred, 0, 2)
        if progress is not None and progress(centres[-1] + 1, depth) is False:
            raise RefinementCancelled("refinement cancelled; the input was left unchanged.")
    return out
