"""Guards: pure label-map steps that stop a refinement from doing harm.

Each guard takes the raw labels and a candidate refinement and returns a new candidate in which some
changes are undone, plus how many voxels it held back. A refiner that invents organs, moves voxels
far from any boundary the base model drew, or flips voxels it is unsure about is worse than none;
these steps make such changes impossible whatever the net predicts. Each can be switched off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "GUARD_NAMES",
    "GuardConfig",
    "class_counts",
    "keep_classes",
    "labelled_extent",
    "limit_at_cut_edges",
    "limit_to_band",
    "limit_to_confident",
    "limit_volume_change",
    "new_pieces",
    "remove_new_components",
]

GUARD_NAMES = ("absent_classes", "class_check", "confidence", "band", "edge", "new_components", "volume_change")


@dataclass(frozen=True)
class GuardConfig:
    """Which guards run (all by default); None values come from the model file."""

    absent_classes: bool = True  # never introduce a class the input does not have
    class_check: bool = True  # classes that failed the per-class check keep their raw mask
    confidence: bool = True  # change a voxel only where the net's probability >= threshold
    band: bool = True  # change only voxels within band_mm of an input boundary
    edge: bool = True  # never change voxels within edge_mm of an image edge that cuts an organ
    new_components: bool = True  # never create a new disconnected piece of an organ
    volume_change: bool = True  # an organ whose volume would change by more than max_volume_change keeps its mask
    band_mm: float | None = None  # width of the band; None: the model file's value
    edge_mm: float | None = None  # depth of the edge guard; None: the model file's value
    threshold: float | None = None  # probability threshold; None: the model file's value
    max_volume_change: float | None = None  # relative volume change allowed per organ; None: the model file's
    # Not a guard (it removes, never puts back): drop the pieces the model file's piece decider rejects
    # (refnet.pieces), when it has one. Off: the net and its guards alone.
    drop_pieces: bool = True

    def __post_init__(self) -> None:
        if self.band_mm is not None and self.band_mm < 0:
            raise ValueError(f"band_mm must be >= 0, got {self.band_mm}.")
        if self.edge_mm is not None and self.edge_mm < 0:
            raise ValueError(f"edge_mm must be >= 0, got {self.edge_mm}.")
        if self.max_volume_change is not None and not self.max_volume_change > 0:
            raise ValueError(f"max_volume_change must be > 0 (a fraction of the organ), got {self.max_volume_change}.")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}.")

    @classmethod
    def off(cls) -> GuardConfig:
        """Every guard off: the net's raw refinement (for ablations). The piece decision is a stage after
        the guards, not a guard: ``drop_pieces`` stays on (pass ``drop_pieces=False`` to ``replace`` it off)."""
        return cls(**{name: False for name in GUARD_NAMES})


_SLAB = 32  # slices per step of the voxel-wise guards: their temporaries then follow a slab, not the volume


def labelled_extent(labels: np.ndarray) -> list[tuple[int, int]]:
    """``[lo, hi)`` per axis of the nonzero voxels, from per-axis projections: no index arrays (np.nonzero
    would hold 24 bytes per labelled voxel)."""
    out = []
    for axis in range(labels.ndim):
        hit = np.flatnonzero(np.any(labels, axis=tuple(a for a in range(labels.ndim) if a != axis)))
        out.append((int(hit[0]), int(hit[-1]) + 1))
    return out


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) int64 voxels per class, counted slab by slab (np.bincount would widen the whole
    volume to int64 at once)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for k in range(0, max(1, labels.shape[-1]), _SLAB):
        counts += np.bincount(labels[..., k : k + _SLAB].ravel(), minlength=num_classes)[:num_classes]
    return counts


def _revert(raw: np.ndarray, refined: np.ndarray, undo: np.ndarray) -> tuple[np.ndarray, int]:
    undo = undo & (raw != refined)
    return np.where(undo, raw, refined).astype(refined.dtype), int(undo.sum())


def _slabwise(raw: np.ndarray, refined: np.ndarray, undo_of, *extra: np.ndarray) -> tuple[np.ndarray, int]:
    """:func:`_revert` with ``undo_of(raw, refined, *extra)`` evaluated slab by slab along the last axis."""
    out = np.empty_like(refined)
    held = 0
    for k in range(0, max(1, raw.shape[-1]), _SLAB):
        part = (Ellipsis, slice(k, k + _SLAB))
        a, b = raw[part], refined[part]
        out[part], n = _revert(a, b, undo_of(a, b, *(e[part] for e in extra)))
        held += n
    return out, held


def keep_classes(raw: np.ndarray, refined: np.ndarray, allowed: Sequence[int]) -> tuple[np.ndarray, int]:
    """Undo every change that touches a class outside ``allowed`` (per-class check).

    Args:
        raw, refined: integer label maps of one shape.
        allowed: class indices that may gain or lose voxels.

    Returns:
        ``(labels, held_back)``: new array of ``refined``'s dtype and the voxels put back.
    """
    allowed = list(allowed)
    return _slabwise(raw, refined, lambda a, b: ~(np.isin(a, allowed) & np.isin(b, allowed)))


def limit_to_confident(raw: np.ndarray, refined: np.ndarray, confidence: np.ndarray,
                       threshold: float | Sequence[float]) -> tuple[np.ndarray, int]:
    """Undo changes where the net's probability of the new label is below the threshold.

    Args:
        confidence: float array of ``raw``'s shape, the probability of ``refined``'s label.
        threshold: one probability, or one per class; a change from class a to b then needs
            ``max(threshold[a], threshold[b])``, so a class both keeps and gives up voxels cautiously.
            A threshold of 1 means the class never changes.
    """
    t = np.asarray(threshold, dtype=np.float32)

    def undo(a, b, conf):
        need = t if t.ndim == 0 else np.maximum(t[a], t[b])
        return (conf < need) | (need >= 1.0)  # 1: never change

    return _slabwise(raw, refined, undo, confidence)


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour of another label (both sides of every interface)."""
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        diff = labels[tuple(lo)] != labels[tuple(hi)]
        edge[tuple(lo)] |= diff
        edge[tuple(hi)] |= diff
    return edge


def limit_to_band(raw: np.ndarray, refined: np.ndarray, spacing: Sequence[float],
                  band_mm: float) -> tuple[np.ndarray, int]:
    """Undo changes farther than ``band_mm`` from every boundary of ``raw`` (3D, in mm).

    The distance transform runs only over the box of changed voxels plus the band, and over that box
    slab by slab along the last axis (each slab padded by the band: a boundary beyond the pad is farther
    than the band anyway, so the decision is exact), so its memory follows a slab, not the volume.

    Args:
        spacing: voxel size in mm along each axis of the arrays.
    """
    changed = raw != refined
    if not changed.any():
        return refined.copy(), 0
    pad = [int(np.ceil(band_mm / s)) + 1 for s in spacing]
    box = [slice(max(0, lo - p), min(n, hi + p)) for (lo, hi), p, n in zip(labelled_extent(changed), pad, raw.shape)]
    far = np.ones(raw.shape, dtype=bool)
    last = box[-1]
    for k0 in range(last.start, last.stop, _SLAB):
        k1 = min(last.stop, k0 + _SLAB)
        lo, hi = max(last.start, k0 - pad[-1]), min(last.stop, k1 + pad[-1])  # the slab and its pad
        region = (*box[:-1], slice(lo, hi))
        edge = _boundary(raw[region])
        if edge.any():
            dist = ndimage.distance_transform_edt(~edge, sampling=spacing)[..., k0 - lo : k1 - lo]
            far[(*box[:-1], slice(k0, k1))] = dist > band_mm
    return _revert(raw, refined, far)


def limit_at_cut_edges(raw: np.ndarray, refined: np.ndarray, spacing: Sequence[float], edge_mm: float,
                       edges: Sequence[bool]) -> tuple[np.ndarray, int]:
    """Undo changes within ``edge_mm`` of an image edge where the edge cuts an organ.

    Past the image's edge the net sees padding, so an organ the edge cuts (a scan range that starts in
    the liver, a region of interest through the aorta) looks to it as if it ended there, and it rounds the
    cut off: on cropped correct maps this removed up to a sixth of an organ sliver. What lies past the
    edge is unknown, so next to such an edge nothing changes. Edges no organ touches (background only) do
    not hold anything back.

    Args:
        spacing: voxel size in mm along each axis of the arrays.
        edge_mm: depth of the frozen layer: voxels whose centre lies less than this from the edge's
            voxel centres (the edge layer itself always, when > 0).
        edges: 6 bools, (low, high) per axis: which faces of the arrays are the image's own edges.
    """
    out = refined.copy()
    held = 0
    if edge_mm <= 0:
        return out, held
    for face, is_edge in enumerate(edges):
        axis, high = divmod(face, 2)
        n = raw.shape[axis]
        layer = [slice(None)] * raw.ndim
        layer[axis] = slice(n - 1, n) if high else slice(0, 1)
        if not is_edge or not raw[tuple(layer)].any():
            continue
        depth = min(n, math.ceil(edge_mm / spacing[axis]))
        layer[axis] = slice(n - depth, n) if high else slice(0, depth)
        part = tuple(layer)
        out[part], n = _revert(raw[part], out[part], np.True_)  # every change in the layer goes back
        held += n
    return out, held


def new_pieces(before: np.ndarray, after: np.ndarray, cls: int, changed: np.ndarray | None = None
               ) -> tuple[tuple[slice, ...], np.ndarray, int] | None:
    """Connected pieces (26-connectivity) of class ``cls`` in ``after`` that touch no ``cls`` voxel of ``before``.

    Only the box of the voxels that became ``cls`` (plus one voxel) is labelled: a new piece lies wholly
    in it, and a piece reaching its edge meets an old ``cls`` voxel there. So the cost follows the
    changes, not the volume.

    Args:
        before, after: integer label maps of one shape.
        cls: the class.
        changed: ``before != after`` if already computed.

    Returns:
        ``(box, mask, count)``: the box, a bool mask of the new pieces inside it and their number; None
        when no voxel became ``cls``.
    """
    changed = before != after if changed is None else changed
    gained = changed & (after == cls)
    if not gained.any():
        return None
    nz = np.nonzero(gained)
    box = tuple(slice(max(0, int(i.min()) - 1), min(n, int(i.max()) + 2)) for i, n in zip(nz, after.shape))
    comps, n = ndimage.label(after[box] == cls, structure=np.ones((3,) * after.ndim, dtype=bool))
    touching = np.unique(comps[(before[box] == cls) & (comps > 0)])
    touching = touching[touching > 0]
    return box, np.isin(comps, touching, invert=True) & (comps > 0), n - touching.size


def remove_new_components(raw: np.ndarray, refined: np.ndarray) -> tuple[np.ndarray, int]:
    """Undo every connected piece of an organ (26-connectivity) that does not touch its raw mask.

    Background is left alone: a refinement may still open a gap, but never adds an island.
    """
    out = refined.copy()
    held = 0
    changed = raw != refined
    for c in np.unique(refined[changed]):
        if c == 0:
            continue
        found = new_pieces(raw, refined, int(c), changed)
        if found is not None and found[2]:
            box, new, _ = found
            out[box], count = _revert(raw[box], out[box], new)
            held += count
    return out, held


def limit_volume_change(raw: np.ndarray, refined: np.ndarray, max_fraction: float,
                        num_classes: int = 13) -> tuple[np.ndarray, int]:
    """Undo every change of an organ whose volume would change by more than ``max_fraction`` of its raw volume.

    A refiner that deletes half of a pancreas or doubles the adrenals (both seen on real CT before the
    guards) does harm however confident it is; refinement corrects boundaries, it does not redraw organs.
    Such an organ keeps its raw mask: the voxels it would gain or lose go back. Background is not judged.

    Args:
        max_fraction: e.g. 0.5: an organ may shrink to half or grow by half, no more.
    """
    before, after = class_counts(raw, num_classes), class_counts(refined, num_classes)
    too_much = np.abs(after - before) > max_fraction * before
    too_much[0] = False
    if not too_much.any():
        return refined.copy(), 0
    return _slabwise(raw, refined, lambda a, b: too_much[a] | too_much[b])
