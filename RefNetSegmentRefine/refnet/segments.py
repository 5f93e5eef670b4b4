"""Segments <-> RefNet classes: the Slicer-free array part of the Slicer module.

A Slicer segmentation is a list of named segments, each a binary mask. RefNet works on one class
map. This module matches segments to classes, composes their masks into a class map, splits the
refined class map back into one mask per segment, and measures what changed. Plain functions on
numpy arrays; the Slicer module only moves arrays in and out of MRML nodes.

Layout: every mask and class map passed together must share one shape (any 3D layout; the module
uses (I, J, K) with ``spacing`` in the same axis order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from .guards import GUARD_NAMES, GuardConfig
from .labels import CLASSES, NUM_CLASSES, class_index_for_name, class_index_for_terminology

if TYPE_CHECKING:  # refnet.refine imports torch
    from .refine import RefineReport

__all__ = [
    "ClassChange",
    "changed_mask",
    "check_segmentation_grid",
    "class_changes",
    "compose_class_map",
    "format_guards",
    "format_report",
    "match_segment",
    "match_segments",
    "pack_layers",
    "parse_image_geometry",
    "split_class_map",
    "unassigned_voxels",
]


@dataclass(frozen=True)
class ClassChange:
    """Voxels that entered (``added``) and left (``removed``) one class."""

    added: int
    removed: int


def match_segment(name: str, terminology: str = "") -> int | None:
    """RefNet class (1..12) of one segment, or None when it matches no organ class.

    The name is tried first (case, spaces, underscores ignored; synonyms such as TotalSegmentator's
    ``kidney_right`` included), then the terminology entry. A segment that matches the background
    class counts as unmatched: it is passed through, never refined.
    """
    index = class_index_for_name(name)
    if index is None and terminology:
        index = class_index_for_terminology(terminology)
    return index if index else None


def match_segments(segments: Sequence[tuple[str, str]]) -> list[int | None]:
    """:func:`match_segment` for each ``(name, terminology)`` pair, in order."""
    return [match_segment(name, terminology) for name, terminology in segments]


def _check_masks(masks: Sequence[np.ndarray], classes: Sequence[int]) -> tuple[int, ...]:
    if len(masks) == 0:
        raise ValueError("no segment masks given; at least one segment must match a RefNet class.")
    if len(masks) != len(classes):
        raise ValueError(f"got {len(masks)} masks but {len(classes)} classes; give one class per mask.")
    shape = tuple(np.shape(masks[0]))
    if len(shape) != 3 or any(tuple(np.shape(m)) != shape for m in masks):
        raise ValueError(f"masks must be 3D arrays of one shape, got {[np.shape(m) for m in masks]}.")
    bad = [c for c in classes if not 1 <= int(c) < NUM_CLASSES]
    if bad:
        raise ValueError(f"segment classes must be 1..{NUM_CLASSES - 1}, got {bad}.")
    return shape


def compose_class_map(masks: Sequence[np.ndarray], classes: Sequence[int]) -> np.ndarray:
    """Paint segment masks into one class map.

    Overlap rule: where masks overlap, the mask listed last wins, as in Slicer's own export of a
    segmentation to a labelmap (later segments are painted over earlier ones).

    Args:
        masks: N arrays of one 3D shape; nonzero = inside the segment.
        classes: N class indices 1..12, one per mask.

    Returns:
        uint8 class map of that shape, 0 outside every mask.

    Raises:
        ValueError: no masks, mismatched shapes or counts, classes outside 1..12.
    """
    shape = _check_masks(masks, classes)
    out = np.zeros(shape, dtype=np.uint8)
    for mask, index in zip(masks, classes):
        out[np.asarray(mask) != 0] = int(index)
    return out


def _nearest_segment(new: np.ndarray, owners: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Owner (1..n) of the nearest owned voxel for every ``new`` voxel, within their bounding box."""
    box = tuple(slice(a.min(), a.max() + 1) for a in np.nonzero(new | (owners > 0)))
    sub_owners = owners[box]
    _, idx = ndimage.distance_transform_edt(sub_owners == 0, sampling=spacing, return_indices=True)
    nearest = sub_owners[tuple(idx)]  # owner of the closest owned voxel, per voxel of the box
    return nearest[new[box]]


def split_class_map(
    refined: np.ndarray,
    masks: Sequence[np.ndarray],
    classes: Sequence[int],
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> list[np.ndarray]:
    """Split a refined class map back into one mask per input segment.

    A voxel of class c goes to the segments of class c: it stays in every segment of class c that
    held it before (so left and right adrenal keep their own voxels); a voxel new to class c goes to
    the nearest segment of class c (Euclidean distance in mm, from ``spacing``), or to the first one
    when none of them held a voxel. Refined voxels of a class no segment maps to are dropped (count
    them with :func:`unassigned_voxels`).

    Args:
        refined: (X, Y, Z) integer class map, e.g. the output of :func:`refnet.refine.refine_labels`.
        masks: N input masks of the same shape (nonzero = inside).
        classes: N class indices 1..12, one per mask.
        spacing: voxel size along the three axes, for the nearest-segment distance.

    Returns:
        N bool masks of ``refined``'s shape, in input order; new arrays.

    Raises:
        ValueError: shapes or counts disagree, classes outside 1..12.
    """
    shape = _check_masks(masks, classes)
    if tuple(refined.shape) != shape:
        raise ValueError(f"refined map shape {refined.shape} differs from the mask shape {shape}.")
    out = [np.zeros(shape, dtype=bool) for _ in masks]
    for index in sorted(set(int(c) for c in classes)):
        members = [i for i, c in enumerate(classes) if int(c) == index]
        in_class = np.asarray(refined) == index
        if len(members) == 1:
            out[members[0]] = in_class
            continue
        owners = np.zeros(shape, dtype=np.int32)  # 1 + position in members; overlap: last one
        for rank, i in enumerate(members, start=1):
            owners[np.asarray(masks[i]) != 0] = rank
        for i in members:
            out[i] = in_class & (np.asarray(masks[i]) != 0)
        new = in_class & (owners == 0)
        if not new.any():
            continue
        nearest = _nearest_segment(new, owners, spacing) if owners.any() else np.ones(int(new.sum()), np.int32)
        coords = np.nonzero(new)
        for rank, i in enumerate(members, start=1):
            pick = nearest == rank
            out[i][tuple(c[pick] for c in coords)] = True
    return out


def unassigned_voxels(refined: np.ndarray, classes: Sequence[int]) -> dict[int, int]:
    """Voxel count per refined class that no segment maps to (these voxels have no segment to go to)."""
    counts = np.bincount(np.asarray(refined, dtype=np.intp).ravel(), minlength=NUM_CLASSES)
    known = {int(c) for c in classes}
    return {c: int(n) for c, n in enumerate(counts) if c and n and c not in known}


def changed_mask(raw: np.ndarray, refined: np.ndarray) -> np.ndarray:
    """Bool mask of voxels whose class RefNet changed (same shape as the inputs)."""
    if raw.shape != refined.shape:
        raise ValueError(f"raw shape {raw.shape} differs from refined shape {refined.shape}.")
    return np.asarray(raw) != np.asarray(refined)


def class_changes(raw: np.ndarray, refined: np.ndarray) -> dict[int, ClassChange]:
    """Voxels added to and removed from each organ class by the refinement.

    Args:
        raw, refined: integer class maps 0..12 of one shape.

    Returns:
        ``{class index: ClassChange}`` for every organ class (1..12) that changed, by index.
    """
    diff = changed_mask(raw, refined)
    added = np.bincount(np.asarray(refined)[diff].astype(np.intp), minlength=NUM_CLASSES)
    removed = np.bincount(np.asarray(raw)[diff].astype(np.intp), minlength=NUM_CLASSES)
    return {c: ClassChange(int(added[c]), int(removed[c]))
            for c in range(1, NUM_CLASSES) if added[c] or removed[c]}


def pack_layers(masks: Sequence[np.ndarray]) -> list[tuple[np.ndarray, list[int]]]:
    """Pack masks into as few non-overlapping label layers as possible (first fit).

    Each layer is a uint8 label map where the j-th mask in its index list has value j + 1, which is
    how Slicer imports several segments from one labelmap volume.

    Args:
        masks: N bool arrays of one shape.

    Returns:
        ``[(layer, [mask indices]), ...]``; every mask is in exactly one layer.
    """
    layers: list[tuple[np.ndarray, list[int]]] = []
    for i, mask in enumerate(masks):
        mask = np.asarray(mask, dtype=bool)
        for layer, members in layers:
            if len(members) < 255 and not (layer[mask] != 0).any():
                layer[mask] = len(members) + 1
                members.append(i)
                break
        else:
            layer = np.zeros(mask.shape, dtype=np.uint8)
            layer[mask] = 1
            layers.append((layer, [i]))
    return layers


def parse_image_geometry(text: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """Parse a Slicer serialized image geometry (a segmentation's "Reference image geometry").

    The format (vtkSegmentationConverter::SerializeImageGeometry) is the 16 elements of the 4x4
    IJK-to-RAS matrix row by row, then the 6 extent values, each followed by ``;``.

    Returns:
        ``((4, 4) float64 IJK-to-RAS, (i0, i1, j0, j1, k0, k1) extent)``.

    Raises:
        ValueError: not 22 numbers.
    """
    parts = [p for p in text.split(";") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError as err:
        raise ValueError(f"not a Slicer image geometry: {text[:80]!r}.") from err
    if len(values) != 22:
        raise ValueError(f"a Slicer image geometry has 22 numbers (16 matrix, 6 extent), got {len(values)}.")
    return np.array(values[:16]).reshape(4, 4), tuple(round(v) for v in values[16:])


def _describe(ijk_to_ras: np.ndarray, extent: Sequence[int]) -> str:
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    size = [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)]
    return (f"size {size}, spacing {np.round(spacing, 3).tolist()} mm, "
            f"origin {np.round(ijk_to_ras[:3, 3], 2).tolist()} mm")


def check_segmentation_grid(
    seg_ijk_to_ras: np.ndarray,
    seg_extent: Sequence[int],
    ct_ijk_to_ras: np.ndarray,
    ct_extent: Sequence[int],
    *,
    tolerance: float = 1e-2,
) -> bool:
    """Whether a segmentation's voxel grid lies on the CT's grid, inside it; refuse one that misses the CT.

    On the CT grid (same axes and spacing, coinciding voxel centres; a crop is fine) the export onto the
    CT grid is exact. Any other grid that overlaps the CT (a model writing on a resampled grid, an
    oversampled Segment Editor geometry) is resampled onto the CT grid by Slicer's export (nearest voxel;
    parts outside the CT are lost), and the caller should say so.

    Args:
        seg_ijk_to_ras, ct_ijk_to_ras: (4, 4) IJK-to-RAS matrices.
        seg_extent, ct_extent: (i0, i1, j0, j1, k0, k1) inclusive voxel extents.
        tolerance: allowed mismatch, in voxels.

    Returns:
        True: on the CT grid, no resampling. False: another grid, resampled.

    Raises:
        ValueError: the segmentation's box does not overlap the CT at all; the message gives both geometries.
    """
    seg_in_ct = np.linalg.solve(np.asarray(ct_ijk_to_ras, float), np.asarray(seg_ijk_to_ras, float))
    offset = seg_in_ct[:3, 3]
    if np.allclose(seg_in_ct[:3, :3], np.eye(3), atol=tolerance) and np.allclose(offset, np.round(offset),
                                                                                 atol=tolerance):
        shift = np.round(offset).astype(int)
        if all(seg_extent[2 * a] + shift[a] >= ct_extent[2 * a] and seg_extent[2 * a + 1] + shift[a]
               <= ct_extent[2 * a + 1] for a in range(3)):
            return True
    # The segmentation's box (voxel edges) in CT voxel coordinates, against the CT's box.
    corners = np.array([[seg_extent[2 * a + c] + (0.5 if c else -0.5) for a, c in enumerate(bits)]
                        for bits in np.ndindex(2, 2, 2)])
    in_ct = (seg_in_ct @ np.c_[corners, np.ones(8)].T)[:3].T
    lo, hi = in_ct.min(axis=0), in_ct.max(axis=0)
    if all(lo[a] < ct_extent[2 * a + 1] + 0.5 and hi[a] > ct_extent[2 * a] - 0.5 for a in range(3)):
        return False
    raise ValueError(
        "The segmentation does not overlap the selected CT at all "
        f"(segmentation: {_describe(np.asarray(seg_ijk_to_ras), seg_extent)}; "
        f"CT: {_describe(np.asarray(ct_ijk_to_ras), ct_extent)}). Select the CT the segmentation was made on."
    )


def format_guards(report: RefineReport, guards: GuardConfig | None = None) -> list[str]:
    """Lines on what the guards did and the refinement's warnings, for status texts and summaries.

    Args:
        report: a :class:`refnet.refine.RefineReport` (its ``held_back`` and ``warnings`` are read).
        guards: the guard settings used; guards it turns off are shown as "off" instead of a count.

    Returns:
        ``["Guards held back (voxels): absent classes 0, ..., new components 3.", "Warning: ...", ...]``:
        every guard of :data:`refnet.guards.GUARD_NAMES` is listed, then what the piece decision dropped
        (when it dropped something, or "off"), then one line per warning.
    """
    guards = guards or GuardConfig()
    parts = []
    for name in GUARD_NAMES:
        value = "off" if not getattr(guards, name) else str(int(report.held_back.get(name, 0)))
        parts.append(f"{name.replace('_', ' ')} {value}")
    lines = [f"Guards held back (voxels): {', '.join(parts)}."]
    if not guards.drop_pieces:
        lines.append("Piece decision: off.")
    elif report.dropped_pieces:
        lines.append(f"Piece decision: {report.dropped_text()}.")
    return [*lines, *(f"Warning: {w.rstrip('.')}." for w in report.warnings)]


def format_report(
    changes: Mapping[int, ClassChange],
    *,
    seconds: float,
    device: str,
    unmatched: Sequence[str] = (),
    unassigned: Mapping[int, int] | None = None,
    report: RefineReport | None = None,
    guards: GuardConfig | None = None,
) -> str:
    """One status text: run time, changed voxels per organ, guards and warnings, passed-through segments,
    dropped voxels.

    Args:
        changes: ``{class index: ClassChange}`` (see :func:`class_changes`).
        seconds: run time.
        device: where the net ran.
        unmatched: names of the segments copied unchanged.
        unassigned: voxels per refined class that no segment maps to.
        report: the core's :class:`refnet.refine.RefineReport`; adds the :func:`format_guards` lines.
        guards: the guard settings used (guards turned off are shown as "off").
    """
    lines = [f"Refined in {seconds:.1f} s on {device}."]
    if changes:
        per_class = ", ".join(f"{CLASSES[c].name} +{ch.added} -{ch.removed}" for c, ch in sorted(changes.items()))
        lines.append(f"Changed voxels: {per_class}.")
    else:
        lines.append("No voxel changed.")
    if report is not None:
        lines += format_guards(report, guards)
    if unmatched:
        lines.append(f"Copied unchanged (no matching RefNet class): {', '.join(unmatched)}.")
    if unassigned:
        dropped = ", ".join(f"{CLASSES[c].name} {n}" for c, n in sorted(unassigned.items()))
        lines.append(f"Left out (no segment of that class in the input): {dropped} voxels.")
    return "\n".join(lines)
