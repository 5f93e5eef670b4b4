"""Physical spacing: the in-plane grid RefNet runs on, resampling to it and back, context slices in mm.

A RefNet is trained at one in-plane spacing (e.g. 1.5 mm); a CT at 0.7 mm or 3 mm is resampled to
that spacing slice by slice, refined, and brought back. The model grid is anchored to the whole
slice (model pixel ``u`` is centred on native index ``(u + 0.5) * scale - 0.5``), never to a crop,
so what RefNet sees at a place does not depend on which box around it is processed.

Resampling uses ``torch.nn.functional.grid_sample`` (batched, bilinear); labels go through their
one-hot so a thin structure is averaged rather than dropped by nearest-neighbour sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["InPlaneGrid", "context_offsets", "resample_image", "resample_labels", "to_native", "voxel_spacing"]

_CHUNK = 16  # slices per grid_sample call: bounds the one-hot's memory
_ONEHOT_BYTES = 64 * 2**20  # and at most about this much float one-hot per call for label maps


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (the affine's column norms)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


@dataclass(frozen=True)
class InPlaneGrid:
    """The model grid over a whole canonical slice of ``native_shape`` pixels.

    Attributes:
        native_shape: (I, J) pixels of the native slice.
        scale: (model spacing / native spacing) per in-plane axis; 1.0 means no resampling.
    """

    native_shape: tuple[int, int]
    scale: tuple[float, float]

    @classmethod
    def for_spacing(cls, native_shape: tuple[int, int], native_mm: tuple[float, float],
                    model_mm: float | None) -> InPlaneGrid:
        """The grid at ``model_mm`` (None: the native grid itself)."""
        if model_mm is None:
            return cls(tuple(native_shape), (1.0, 1.0))
        if model_mm <= 0 or min(native_mm) <= 0:
            raise ValueError(f"spacings must be > 0, got native {native_mm} mm and model {model_mm} mm.")
        return cls(tuple(native_shape), tuple(float(model_mm) / float(n) for n in native_mm))

    @property
    def shape(self) -> tuple[int, int]:
        """(U, V) pixels of the whole slice on the model grid."""
        return tuple(max(1, math.ceil(n / s)) for n, s in zip(self.native_shape, self.scale))

    @property
    def identity(self) -> bool:
        return self.scale == (1.0, 1.0)

    def model_span(self, native_lo: tuple[int, int], native_hi: tuple[int, int]) -> tuple[tuple[int, int], ...]:
        """Model-pixel ranges ``[(u0, u1), (v0, v1)]`` whose interpolation covers native ``[lo, hi)``."""
        out = []
        for lo, hi, s in zip(native_lo, native_hi, self.scale):
            a = (lo + 0.5) / s - 0.5
            b = (hi - 0.5) / s - 0.5
            out.append((math.floor(a) - 1, math.ceil(b) + 2))
        return tuple(out)


def _coords(lo: int, hi: int, scale: float, *, to_model: bool) -> np.ndarray:
    """Centres of pixels lo..hi-1 of one grid, in index units of the other grid."""
    idx = np.arange(lo, hi, dtype=np.float64)
    return (idx + 0.5) / scale - 0.5 if to_model else (idx + 0.5) * scale - 0.5


def _grid(rows: np.ndarray, cols: np.ndarray, src_lo: tuple[int, int], src_shape: tuple[int, int]) -> torch.Tensor:
    """grid_sample grid (1, R, C, 2) sampling source index coordinates (rows, cols) of a source block."""
    r = (2.0 * (rows - src_lo[0]) + 1.0) / src_shape[0] - 1.0  # align_corners=False convention
    c = (2.0 * (cols - src_lo[1]) + 1.0) / src_shape[1] - 1.0
    rr, cc = np.meshgrid(r, c, indexing="ij")
    return torch.from_numpy(np.stack([cc, rr], axis=-1)[None].astype(np.float32))  # x = column, y = row


def _source_block(coords: np.ndarray, n: int) -> tuple[int, int]:
    """Native index range [a, b) holding every neighbour bilinear sampling at ``coords`` reads."""
    return max(0, int(np.floor(coords.min()))), min(n, int(np.floor(coords.max())) + 2)


def _sample(block: torch.Tensor, rows, cols, lo, mode: str, padding: str) -> torch.Tensor:
    grid = _grid(rows, cols, lo, tuple(block.shape[-2:]))
    return F.grid_sample(block, grid.expand(block.shape[0], -1, -1, -1).to(block.device), mode=mode,
                         padding_mode=padding, align_corners=False)


def resample_labels(volume: np.ndarray, grid: InPlaneGrid, span: tuple[tuple[int, int], ...], *,
                    num_classes: int) -> np.ndarray:
    """Labels of model pixels ``span`` (may reach outside the slice: background there).

    Args:
        volume: (I, J, K) integer classes on the native grid.
        grid: the model grid of this volume.
        span: ``((u0, u1), (v0, v1))`` model-pixel ranges.
        num_classes: classes 0..num_classes-1.

    Returns:
        (u1 - u0, v1 - v0, K) uint8; exactly ``volume`` where the grid is the native one.
    """
    (u0, u1), (v0, v1) = span
    out = np.zeros((u1 - u0, v1 - v0, volume.shape[2]), dtype=np.uint8)
    if grid.identity:
        src = (slice(max(u0, 0), min(u1, volume.shape[0])), slice(max(v0, 0), min(v1, volume.shape[1])))
        out[src[0].start - u0 : src[0].stop - u0, src[1].start - v0 : src[1].stop - v0] = volume[src]
        return out
    rows = _coords(u0, u1, grid.scale[0], to_model=False)
    cols = _coords(v0, v1, grid.scale[1], to_model=False)
    (a0, a1), (b0, b1) = _source_block(rows, volume.shape[0]), _source_block(cols, volume.shape[1])
    if a1 <= a0 or b1 <= b0:
        return out
    # slices per grid_sample call: the float one-hot of a chunk stays near _ONEHOT_BYTES whatever the slice size
    step = max(1, min(_CHUNK, _ONEHOT_BYTES // (4 * num_classes * (a1 - a0) * (b1 - b0))))
    for k0 in range(0, volume.shape[2], step):
        # (B, a, b) fresh C-order copy (ascontiguousarray may keep a negative stride of a length-1 axis)
        chunk = np.moveaxis(volume[a0:a1, b0:b1, k0 : k0 + step], 2, 0).astype(np.uint8, order="C")
        # Only the classes this chunk holds (background always first): an absent class has probability 0
        # everywhere, so it never wins the first-maximum argmax, and the result is the all-classes one.
        classes = np.union1d([0], np.flatnonzero(np.bincount(chunk.ravel(), minlength=num_classes) > 0))
        block = torch.from_numpy(chunk)[:, None]  # (B, 1, a, b) uint8, contiguous: the one-hot needs no copy
        onehot = (block == torch.from_numpy(classes.astype(np.uint8)).view(1, -1, 1, 1)).float()
        probs = _sample(onehot, rows, cols, (a0, b0), "bilinear", "zeros")  # (B, len(classes), U, V)
        # max(dim=1).indices: the same first-maximum argmax, several times faster on CPU than argmax(dim=1)
        best = probs.max(dim=1).indices.permute(1, 2, 0).numpy()
        out[:, :, k0 : k0 + step] = classes.astype(np.uint8)[best]
    return out


def resample_image(volume: np.ndarray, grid: InPlaneGrid, span: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Bilinear float32 intensities of model pixels ``span``; the slice's edge value outside it.

    Args:
        volume: (I, J, K) float image (e.g. windowed CT) on the native grid.

    Returns:
        (u1 - u0, v1 - v0, K) float32.
    """
    (u0, u1), (v0, v1) = span
    rows = np.clip(_coords(u0, u1, grid.scale[0], to_model=False), 0, volume.shape[0] - 1)
    cols = np.clip(_coords(v0, v1, grid.scale[1], to_model=False), 0, volume.shape[1] - 1)
    (a0, a1), (b0, b1) = _source_block(rows, volume.shape[0]), _source_block(cols, volume.shape[1])
    out = np.empty((u1 - u0, v1 - v0, volume.shape[2]), dtype=np.float32)
    for k0 in range(0, volume.shape[2], _CHUNK):
        block = torch.from_numpy(np.ascontiguousarray(volume[a0:a1, b0:b1, k0 : k0 + _CHUNK], dtype=np.float32))
        res = _sample(block.permute(2, 0, 1)[:, None], rows, cols, (a0, b0), "bilinear", "border")
        out[:, :, k0 : k0 + _CHUNK] = res[:, 0].permute(1, 2, 0).numpy()
    return out


def to_native(values: torch.Tensor, grid: InPlaneGrid, model_lo: tuple[int, int],
              native_lo: tuple[int, int], native_hi: tuple[int, int]) -> torch.Tensor:
    """Bilinear values at native pixels ``[lo, hi)`` from a model-grid block starting at ``model_lo``.

    Args:
        values: (B, C, U, V) float on the model grid; must cover :meth:`InPlaneGrid.model_span` of the box.

    Returns:
        (B, C, hi0 - lo0, hi1 - lo1) float on the native grid; ``values`` itself if the grid is native.
    """
    if grid.identity:
        r0, c0 = native_lo[0] - model_lo[0], native_lo[1] - model_lo[1]
        return values[:, :, r0 : r0 + native_hi[0] - native_lo[0], c0 : c0 + native_hi[1] - native_lo[1]]
    rows = _coords(native_lo[0], native_hi[0], grid.scale[0], to_model=True)
    cols = _coords(native_lo[1], native_hi[1], grid.scale[1], to_model=True)
    return _sample(values, rows, cols, model_lo, "bilinear", "border")


def context_offsets(context: int, slice_mm: float, context_mm: float | None) -> np.ndarray:
    """Slice offsets of the ``2*context+1`` label slices fed to RefNet, about ``context_mm`` apart.

    With ``context_mm`` None the neighbours are adjacent slices (the pre-spacing behaviour). Offsets
    grow by at least one slice per step, so thick slices still give distinct neighbours.

    Returns:
        (2*context+1,) int offsets, centre 0, e.g. ``[-4, 0, 4]`` at 1 mm slices with 4 mm context.
    """
    steps = np.arange(-context, context + 1)
    if context_mm is None:
        return steps
    if slice_mm <= 0:
        raise ValueError(f"slice spacing must be > 0, got {slice_mm} mm.")
    mag = np.maximum(np.abs(steps), np.rint(np.abs(steps) * context_mm / slice_mm)).astype(np.int64)
    return np.sign(steps) * mag
