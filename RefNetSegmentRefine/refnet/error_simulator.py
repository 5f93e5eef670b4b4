"""Simulated segmentation errors: symmetric corruptions of a correct label map, for training RefNet.

A refiner trained only on one base model's predictions learns that model's direction of error
("grow the gallbladder") and applies it to every map, correct ones included. The errors drawn here
have no direction: every organ is as likely to grow as to shrink by the same amount, its boundary is
displaced by a smooth zero-mean random field, a slice is as likely to be dropped at an organ's end as
added, and holes come with islands. So the only thing a net can learn from them is to undo what is
implausible (ragged boundaries, holes, islands, missing slices), not to push organs one way.

Boundaries move through signed distances: each organ's signed distance (mm, negative inside) gets a
per-organ offset and a smooth random field, and every voxel takes the organ with the lowest perturbed
distance where that is negative (background otherwise). Touching organs thus trade voxels at their
interface, as confused neighbours do in real predictions. With no perturbation the map comes back
unchanged. No library offers label-map corruption of this kind, hence scipy building blocks here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["PLAUSIBLE_VARIATION", "ErrorConfig", "simulate_errors"]


@dataclass(frozen=True)
class ErrorConfig:
    """How strongly :func:`simulate_errors` corrupts a map; each map draws its own strength below these."""

    shift_mm: float = 3.0  # largest per-organ grow/shrink (offset drawn uniformly in [-shift, shift])
    shift_prob: float = 0.5  # chance that an organ gets an offset at all
    jitter_mm: float = 2.5  # largest SD of the smooth boundary displacement field
    jitter_cell_mm: tuple[float, float] = (4.0, 12.0)  # range of the field's correlation length
    hole_prob: float = 0.15  # chance per organ of a hole (a ball inside set to background)
    island_prob: float = 0.15  # chance per organ of an island (a ball nearby painted with the organ)
    blob_mm: tuple[float, float] = (2.0, 6.0)  # range of hole and island radii
    island_gap_mm: tuple[float, float] = (3.0, 20.0)  # range of an island's distance beyond its radius from an
    #                                                    organ voxel (base models' islands lie up to cm away)
    slice_prob: float = 0.1  # chance per organ of losing its end slice, and the same of gaining one
    clean_prob: float = 0.1  # chance that a map is left exactly as it is

    def __post_init__(self) -> None:
        for name in ("shift_mm", "jitter_mm"):
            if getattr(self, name) < 0:
                raise ValueError(f"ErrorConfig.{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("shift_prob", "hole_prob", "island_prob", "slice_prob", "clean_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ErrorConfig.{name} must be a probability in [0, 1], got {getattr(self, name)}.")
        for name in ("jitter_cell_mm", "blob_mm", "island_gap_mm"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"ErrorConfig.{name} must be (min, max) with 0 < min <= max, got {(lo, hi)}.")


PLAUSIBLE_VARIATION = ErrorConfig(shift_mm=1.5, jitter_mm=1.5, hole_prob=0.0, island_prob=0.0, slice_prob=0.0,
                                  clean_prob=0.0)
"""Boundary variation within what two careful annotators draw (about a voxel of a clinical CT): a map
changed this much is still a correct map, so RefNet must leave it alone (no holes, islands or slices)."""


def _bbox(mask: np.ndarray, pad: Sequence[int]) -> tuple[slice, ...]:
    nz = np.nonzero(mask)
    return tuple(slice(max(0, int(i.min()) - p), min(n, int(i.max()) + 1 + p))
                 for i, p, n in zip(nz, pad, mask.shape))


def _signed_distance(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """(…) float32 mm to the organ's surface: negative inside (at most -min spacing), positive outside."""
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    return np.where(mask, -inside, outside).astype(np.float32)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], spacing: Sequence[float],
                  cell_mm: float) -> np.ndarray:
    """Zero-mean, unit-SD random field correlated over about ``cell_mm``."""
    sigma = [cell_mm / s / 2.0 for s in spacing]
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _move_boundaries(labels, spacing, rng, config: ErrorConfig, strength: float) -> np.ndarray:
    """Every organ's boundary displaced by a random offset plus a smooth field; interfaces compete."""
    best = np.full(labels.shape, np.inf, dtype=np.float32)
    out = np.zeros_like(labels)
    for c in np.unique(labels):
        if c == 0:
            continue
        offset = strength * rng.uniform(-config.shift_mm, config.shift_mm) if rng.random() < config.shift_prob else 0.0
        sd = strength * rng.uniform(0.0, config.jitter_mm)
        reach = abs(offset) + 3.0 * sd + max(spacing)
        box = _bbox(labels == c, [int(np.ceil(reach / s)) + 1 for s in spacing])
        dist = _signed_distance(labels[box] == c, spacing) - np.float32(offset)
        if sd > 0:
            dist += np.float32(sd) * _smooth_field(rng, dist.shape, spacing, rng.uniform(*config.jitter_cell_mm))
        win = dist < best[box]
        best[box] = np.where(win, dist, best[box])
        out[box] = np.where(win, c, out[box])
    out[best >= 0] = 0
    return out


def _ball(shape, centre, radius_mm: float, spacing) -> tuple[tuple[slice, ...], np.ndarray]:
    """Box and mask of an ellipsoid of ``radius_mm`` (in mm) around voxel ``centre``."""
    half = [int(np.ceil(radius_mm / s)) for s in spacing]
    box = tuple(slice(max(0, c - h), min(n, c + h + 1)) for c, h, n in zip(centre, half, shape))
    grids = np.ogrid[tuple(box)]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing))
    return box, d2 <= radius_mm**2


def _blobs(labels, spacing, rng, config: ErrorConfig, strength: float) -> np.ndarray:
    """Holes inside organs and islands beside them, with equal chances."""
    out = labels.copy()
    for c in np.unique(labels):
        if c == 0:
            continue
        voxels = np.argwhere(labels == c)
        if rng.random() < strength * config.hole_prob:
            box, ball = _ball(labels.shape, voxels[rng.integers(len(voxels))], rng.uniform(*config.blob_mm), spacing)
            out[box] = np.where(ball & (out[box] == c), 0, out[box])
        if rng.random() < strength * config.island_prob:
            radius = rng.uniform(*config.blob_mm)
            direction = rng.normal(size=3)
            step = (radius + rng.uniform(*config.island_gap_mm)) * direction / np.linalg.norm(direction)
            centre = voxels[rng.integers(len(voxels))] + np.rint(step / np.asarray(spacing)).astype(int)
            centre = np.clip(centre, 0, np.asarray(labels.shape) - 1)
            box, ball = _ball(labels.shape, centre, radius, spacing)
            out[box] = np.where(ball & (out[box] == 0), c, out[box])
    return out


def _end_slices(labels, rng, config: ErrorConfig, strength: float) -> np.ndarray:
    """An organ loses its top or bottom slice, or gains a copy of it beyond, with equal chances."""
    out = labels.copy()
    for c in np.unique(labels):
        if c == 0:
            continue
        ks = np.flatnonzero((labels == c).any(axis=(0, 1)))
        if ks.size < 3 or rng.random() >= 2 * strength * config.slice_prob:
            continue
        end = int(ks[0] if rng.random() < 0.5 else ks[-1])
        if rng.random() < 0.5:  # drop the end slice
            out[:, :, end] = np.where(out[:, :, end] == c, 0, out[:, :, end])
        else:  # extend by one slice, over background only
            k = end - 1 if end == ks[0] else end + 1
            if 0 <= k < labels.shape[2]:
                out[:, :, k] = np.where((labels[:, :, end] == c) & (out[:, :, k] == 0), c, out[:, :, k])
    return out


def simulate_errors(labels: np.ndarray, spacing: Sequence[float], rng: np.random.Generator, *,
                    config: ErrorConfig | None = None) -> np.ndarray:
    """A plausible wrong segmentation of a correct map, with errors of no preferred direction.

    Args:
        labels: (I, J, K) integer classes in canonical layout (axial slices ``[:, :, k]``), a correct map.
        spacing: (3,) voxel size in mm along the axes.
        rng: the random stream (one seed fixes the corruption).
        config: error strengths; each map draws a strength in [0, 1] that scales them all.

    Returns:
        (I, J, K) new array of ``labels``' dtype; the input is not modified. With probability
        ``config.clean_prob`` it equals ``labels`` (a correct map stays a valid input).

    Raises:
        ValueError: ``labels`` is not 3D or ``spacing`` does not hold 3 positive numbers.
    """
    config = config or ErrorConfig()
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3D array, got shape {labels.shape}.")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers in mm, got {tuple(spacing)}.")
    spacing = tuple(float(s) for s in spacing)
    if rng.random() < config.clean_prob or not labels.any():
        return labels.copy()
    strength = float(rng.uniform(0.25, 1.0))
    out = _move_boundaries(labels, spacing, rng, config, strength)
    out = _blobs(out, spacing, rng, config, strength)
    return _end_slices(out, rng, config, strength).astype(labels.dtype, copy=False)
