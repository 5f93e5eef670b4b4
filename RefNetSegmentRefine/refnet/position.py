"""Where a pixel lies relative to the labelled anatomy: the body side, which a translation-equivariant net cannot see.

RefNet's convolutions give the same answer wherever a pattern sits in the slice, so a kidney-shaped piece
labelled "left kidney" looks right on either side of the body; base models confuse the two kidneys and
the spleen exactly so (``benchmarks/refnet_variants.py``'s census). :func:`position_planes` hands the net
each pixel's in-plane offset in mm from the centroid of every labelled voxel of the volume, divided by
:data:`POSITION_SCALE_MM` and clipped to [-1, 1], as two input channels (first and second canonical axes:
patient left-right and front-back). It depends only on the label map, not on a crop or the field of view,
so refinement and training compute the same planes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["POSITION_SCALE_MM", "position_planes"]

POSITION_SCALE_MM = 200.0  # offsets this far from the centroid read +-1 (an abdomen is about 350 mm wide)


def position_planes(labels: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """(I, J, K) classes and the in-plane pixel size -> (I, J, 2) float32 offsets from the labelled centroid.

    An empty map has no centroid: its planes are zero.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"position_planes needs a 3D label map, got shape {labels.shape}.")
    planes = np.zeros((*labels.shape[:2], 2), dtype=np.float32)
    for axis, step in enumerate(spacing_mm[:2]):
        other = tuple(a for a in range(3) if a != axis)
        counts = np.count_nonzero(labels, axis=other).astype(np.float64)  # labelled voxels per row
        if not counts.any():
            return planes
        centre = float((counts * np.arange(counts.size)).sum() / counts.sum())
        offset = np.clip((np.arange(labels.shape[axis]) - centre) * float(step) / POSITION_SCALE_MM, -1.0, 1.0)
        planes[..., axis] = offset[:, None] if axis == 0 else offset[None, :]
    return planes
