"""Orientation handling: find the axial axis from the affine and reorient to a canonical layout.

RefNet is trained on slices laid out as RAS+ arrays (axes i, j, k along R, A, S; axial slices are
``[:, :, k]``). Any input is transposed and flipped to that layout before refinement and back after,
so a file stored LPS, PIR or sagittally still gets axial slices the way the net saw them in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel import orientations

__all__ = ["Reorientation", "axial_axis", "canonical_affine", "check_affine", "to_canonical"]


def check_affine(affine: np.ndarray) -> np.ndarray:
    """Validate a 4x4 voxel-to-world affine and return it as float64.

    Raises:
        ValueError: wrong shape, non-finite values, or a singular 3x3 part.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be a 4x4 matrix, got shape {affine.shape}.")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError("affine is singular or not finite; check the image header (spacing of 0?).")
    return affine


def axial_axis(affine: np.ndarray) -> int:
    """Index of the array axis closest to the world S (superior-inferior) axis."""
    ornt = orientations.io_orientation(check_affine(affine))
    return int(np.flatnonzero(ornt[:, 0] == 2)[0])


@dataclass(frozen=True)
class Reorientation:
    """How an array maps to canonical RAS+ layout, and back.

    Attributes:
        ornt: nibabel orientation (3, 2) from the input's axes to RAS+.
        shape: the input array's shape.
    """

    ornt: np.ndarray
    shape: tuple[int, ...]

    def forward(self, array: np.ndarray) -> np.ndarray:
        """(input layout) -> (R, A, S) layout; a view where possible."""
        return orientations.apply_orientation(array, self.ornt)

    def backward(self, array: np.ndarray) -> np.ndarray:
        """(R, A, S) layout -> the input's layout, a contiguous copy."""
        inverse = orientations.ornt_transform(orientations.axcodes2ornt("RAS"),
                                              orientations.io_orientation(self._affine_like()))
        return np.ascontiguousarray(orientations.apply_orientation(array, inverse))

    def _affine_like(self) -> np.ndarray:
        # An affine with exactly this orientation, to reuse nibabel's inverse logic.
        affine = np.zeros((4, 4))
        affine[3, 3] = 1
        for axis, (world, flip) in enumerate(self.ornt):
            affine[int(world), axis] = flip
        return affine


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, Reorientation]:
    """Reorient ``array`` (3D) so that its axes run along R, A, S.

    Returns:
        ``(canonical, reorientation)``; ``reorientation.backward`` undoes it exactly.
    """
    ornt = orientations.io_orientation(check_affine(affine))
    reo = Reorientation(ornt=ornt, shape=tuple(array.shape))
    return reo.forward(array), reo


def canonical_affine(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Affine of the array :func:`to_canonical` returns for an array of ``shape`` with ``affine``."""
    ornt = orientations.io_orientation(check_affine(affine))
    return check_affine(affine) @ orientations.inv_ornt_aff(ornt, shape[:3])
