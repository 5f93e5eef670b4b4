"""Slicer segmentation files (``.seg.nrrd``) in and out of the core, keeping every segment's metadata.

A ``.seg.nrrd`` is not a label map: its voxels hold per-layer segment values (segment 1, 2, ... of each
layer, in the order the segments were made), so reading it as a label volume gives wrong classes
without any error. Here each segment is read on its own (through ``slicerio``, the Slicer developers'
reader), matched to a RefNet class by name or terminology as the Slicer module does, and written back
with its ID, name, colour and terminology; segments that match no class are copied unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_path
from .segments import compose_class_map, match_segments, split_class_map

__all__ = ["SEGMENTATION_SUFFIX", "SegmentationFile", "is_segmentation_file", "read_segmentation_file",
           "write_segmentation_file"]

SEGMENTATION_SUFFIX = ".seg.nrrd"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_segmentation_file(path: str | os.PathLike) -> bool:
    """True for a Slicer segmentation file (``*.seg.nrrd``)."""
    return str(path).lower().endswith(SEGMENTATION_SUFFIX)


def _slicerio() -> Any:
    try:
        import slicerio
    except ImportError as err:
        raise RuntimeError("reading .seg.nrrd files needs the slicerio package: pip install slicerio "
                           "(or save the segmentation as a label map, e.g. .nii.gz).") from err
    return slicerio


@dataclass
class SegmentationFile:
    """The segments of a ``.seg.nrrd``: metadata, (I, J, K) masks and the RefNet class each one matches."""

    segments: list[dict[str, Any]]  # slicerio segment fields (id, name, color, terminology, tags, ...)
    masks: list[np.ndarray]  # (I, J, K) bool, one per segment
    affine: np.ndarray  # (4, 4) voxel-to-RAS
    classes: list[int | None] = field(default_factory=list)  # matched RefNet class per segment, or None

    def class_map(self) -> np.ndarray:
        """(I, J, K) uint8 RefNet class map of the matched segments (later segments win on overlap).

        Raises:
            ValueError: no segment matches a RefNet class (the message lists the names).
        """
        matched = [(m, c) for m, c in zip(self.masks, self.classes) if c]
        if not matched:
            names = ", ".join(s.get("name", "?") for s in self.segments)
            raise ValueError(f"none of the segments ({names}) matches a RefNet class; rename them (e.g. 'Liver', "
                             "TotalSegmentator's 'kidney_right') or set their terminology.")
        return compose_class_map([m for m, _ in matched], [c for _, c in matched])

    @property
    def unmatched(self) -> list[str]:
        """Names of the segments copied unchanged."""
        return [s.get("name", "") for s, c in zip(self.segments, self.classes) if not c]


def read_segmentation_file(path: str | os.PathLike) -> SegmentationFile:
    """Read a ``.seg.nrrd`` segment by segment and match each segment to a RefNet class.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a segmentation file (the message says what it is).
    """
    sio = _slicerio()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        seg = sio.read_segmentation(str(path))
    except Exception as err:  # slicerio/pynrrd raise many kinds on a damaged or foreign file
        raise ValueError(f"{path}: not a readable Slicer segmentation file ({type(err).__name__}: {err}).") from err
    segments = list(seg.get("segments") or [])
    if not segments or seg.get("voxels") is None:
        raise ValueError(f"{path}: holds no segments; is it a plain label volume? Then name it .nrrd or .nii.gz.")
    masks = [np.asarray(sio.segment_mask(seg, s), dtype=bool) for s in segments]
    to_text = sio.segmentation.terminology_entry_to_string
    terms = [to_text(s["terminology"]) if s.get("terminology") else "" for s in segments]
    classes = match_segments([(s.get("name", ""), t) for s, t in zip(segments, terms)])
    affine = _LPS_TO_RAS @ np.asarray(seg["ijkToLPS"], dtype=np.float64)
    return SegmentationFile(segments, masks, affine, classes)


def write_segmentation_file(path: str | os.PathLike, source: SegmentationFile, refined: np.ndarray) -> Path:
    """Write ``source`` with its matched segments replaced by the refined class map, atomically.

    Every segment keeps its ID, name, colour, terminology and order; a voxel new to a class goes to the
    nearest segment of that class (:func:`refnet.segments.split_class_map`); unmatched segments are
    copied unchanged.

    Returns:
        The written path.
    """
    sio = _slicerio()
    matched = [i for i, c in enumerate(source.classes) if c]
    spacing = np.linalg.norm(source.affine[:3, :3], axis=0)
    new_masks = list(source.masks)
    for i, mask in zip(matched, split_class_map(refined, [source.masks[i] for i in matched],
                                                [source.classes[i] for i in matched], spacing=spacing)):
        new_masks[i] = mask
    out = sio.create_segmentation(refined.shape, _LPS_TO_RAS @ source.affine)
    for segment, mask in zip(source.segments, new_masks):
        keep = {k: v for k, v in segment.items() if k not in ("labelValue", "layer", "extent")}
        sio.add_segment(out, mask, keep)
    tmp, path = atomic_path(path)
    try:
        sio.write_segmentation(str(tmp), out)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
