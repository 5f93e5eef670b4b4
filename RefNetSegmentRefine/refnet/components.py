"""How big each voxel's 3D connected component is: the one thing about a label map a 2D net cannot see.

RefNet reads a few axial slices at a time, so a stray island of the spleen looks, slice by slice, just
like the spleen's own tip; only the volume tells them apart. Classical cleanup uses exactly that
(nnU-Net's largest-component step). :func:`component_map` hands the same fact to the net as an input
channel, per voxel: the size of its component relative to the largest component of its class, on a log
scale. A class's largest component reads 1; a piece a tenth as big 2/3; a hundredth 1/3; a thousandth or
less 0. Background that reaches the volume's border (the outside) reads 1; an enclosed hole reads its size
relative to all labelled voxels on the same scale, so holes read small too. The net then *learns*, per
class and per place, what cleanup decides with one rule per class: e.g. that two adrenal glands of one
class are both right, and a detached speck of liver is not.

Written with scipy's ``ndimage.label`` (26-connected, as :mod:`refnet.cleanup` and MONAI's
``KeepLargestConnectedComponent``): no library gives per-voxel component sizes.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["COMPONENT_DECADES", "component_map", "decode_component_map"]

COMPONENT_DECADES = 3.0  # components this many factors of ten smaller than the largest read 0
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)  # 26-connected


def component_map(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(X, Y, Z) classes -> (X, Y, Z) uint8 relative component size, 255 = the class's largest component.

    Depends only on the label map's voxels (not on a crop around them, as long as the crop holds every
    labelled voxel and some background around them), so refinement and training compute the same map.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"component_map needs a 3D label map, got shape {labels.shape}.")
    out = np.full(labels.shape, 255, dtype=np.uint8)
    boxes = ndimage.find_objects(labels, max_label=num_classes - 1)  # any integer dtype: no copy
    for cls, box in enumerate(boxes, start=1):
        if box is None:
            continue
        mask = labels[box] == cls
        parts, count = ndimage.label(mask, structure=_STRUCTURE)
        if count > 1:
            sizes = np.bincount(parts.ravel())[1:]
            _write(out[box], mask, parts, sizes / sizes.max())
    # Background: relative to all labelled voxels, not to the outside (whose size depends on the field of
    # view), so the map is the same for the whole volume and for a box with background all around the labels.
    background = labels == 0
    parts, count = ndimage.label(background, structure=_STRUCTURE)
    if count > 1:
        sizes = np.bincount(parts.ravel())[1:].astype(np.float64)
        ratio = sizes / max(1, labels.size - int(background.sum()))
        faces = [parts[i] for i in (0, -1)] + [parts[:, i] for i in (0, -1)] + [parts[:, :, i] for i in (0, -1)]
        outside = np.unique(np.concatenate([f.ravel() for f in faces]))
        ratio[outside[outside > 0] - 1] = 1.0
        _write(out, background, parts, ratio)
    return out


def _write(view: np.ndarray, mask: np.ndarray, parts: np.ndarray, ratio: np.ndarray) -> None:
    """Set ``view[mask]`` to each component's encoded ``ratio`` (component k is ``parts == k + 1``)."""
    level = np.clip(1.0 + np.log10(np.maximum(ratio, 1e-12)) / COMPONENT_DECADES, 0.0, 1.0)
    lut = np.concatenate([[255], np.rint(255 * level)]).astype(np.uint8)
    view[mask] = lut[parts[mask]]


def decode_component_map(values: np.ndarray) -> np.ndarray:
    """uint8 map (any shape) -> float32 in [0, 1], the net's input channel."""
    return np.asarray(values, dtype=np.float32) / 255.0
