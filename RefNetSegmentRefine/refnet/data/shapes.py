"""Analytic shapes of the phantom generator, laid out in template millimetres.

Each shape has ``bounds() -> (lo, hi)`` (an mm box) and ``level(xyz)``: an approximate signed
distance in mm, negative inside, evaluated on the deformed voxel positions. Signed distances (not
masks) let the painter cut fat halos and organ walls at a given depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np
from scipy.interpolate import make_interp_spline
from scipy.spatial import cKDTree

__all__ = ["LONG", "Csg", "Ellipsoid", "HalfSpace", "Negate", "Stripes", "Tube", "rotation"]

LONG = 1.0e4  # z radius (mm) that turns an ellipsoid into a cylinder along the body axis
_FAR = 1.0e3  # level (mm) reported far outside a tube
_REACH = 12.0  # how far outside a tube (mm) its level is computed exactly (halos, walls)

def rotation(z_deg: float = 0.0, y_deg: float = 0.0, x_deg: float = 0.0) -> np.ndarray:
    """(3, 3) rotation Rz @ Ry @ Rx (local -> template), angles in degrees."""
    (cz, sz), (cy, sy), (cx, sx) = ((math.cos(math.radians(a)), math.sin(math.radians(a)))
                                    for a in (z_deg, y_deg, x_deg))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


@dataclass(frozen=True, eq=False)
class Ellipsoid:
    """Rotated superellipsoid; with a ``LONG`` z radius, a cylinder along the body axis."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    angles: tuple[float, float, float] = (0.0, 0.0, 0.0)  # degrees about z, y, x
    power: float = 2.0  # 2: ellipsoid; larger: boxier

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        ext = np.abs(rotation(*self.angles)) @ np.asarray(self.radii, dtype=np.float64)
        return np.asarray(self.center) - ext, np.asarray(self.center) + ext

    def level(self, xyz: Sequence[np.ndarray]) -> np.ndarray:
        d = [c - float(c0) for c, c0 in zip(xyz, self.center)]
        rot = rotation(*self.angles).tolist()
        if any(self.angles):
            d = [rot[0][k] * d[0] + rot[1][k] * d[1] + rot[2][k] * d[2] for k in range(3)]
        u = [dk / float(r) for dk, r in zip(d, self.radii) if r < LONG]  # a cylinder ignores z
        if self.power == 2.0:
            norm = np.sqrt(sum(uk * uk for uk in u))
        else:
            norm = sum(np.abs(uk) ** self.power for uk in u) ** (1.0 / self.power)
        return (norm - 1.0) * float(min(self.radii))


@dataclass(frozen=True, eq=False)
class Tube:
    """Tube of varying radius around a densely sampled centre line."""

    points: np.ndarray  # (N, 3) centre line, ~1 mm apart
    radii: np.ndarray  # (N,) radius at each point, mm

    @classmethod
    def through(cls, ctrl: Sequence[Sequence[float]], radii: float | Sequence[float]) -> Tube:
        """Tube along the interpolating spline through ``ctrl`` (M, 3); radii per control point."""
        ctrl = np.asarray(ctrl, dtype=np.float64)
        t = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1))])
        ts = np.linspace(0.0, t[-1], max(2, math.ceil(t[-1]) + 1))
        points = make_interp_spline(t, ctrl, k=min(3, len(ctrl) - 1))(ts)
        return cls(points, np.interp(ts, t, np.broadcast_to(np.asarray(radii, dtype=np.float64), t.shape)))

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = float(self.radii.max())
        return self.points.min(axis=0) - r, self.points.max(axis=0) + r

    def level(self, xyz: Sequence[np.ndarray]) -> np.ndarray:
        reach = float(self.radii.max()) + _REACH
        lo, hi = self.points.min(axis=0) - reach, self.points.max(axis=0) + reach
        near = reduce(np.logical_and, ((c >= a) & (c <= b) for c, a, b in zip(xyz, lo.tolist(), hi.tolist())))
        level = np.full(near.shape, _FAR, dtype=np.float32)
        if not near.any():
            return level
        dist, idx = cKDTree(self.points).query(np.stack([c[near] for c in xyz], axis=1),
                                               distance_upper_bound=reach, workers=-1)
        level[near] = np.where(np.isfinite(dist), dist - np.append(self.radii, 0.0)[idx], _FAR)
        return level


@dataclass(frozen=True, eq=False)
class Csg:
    """Union (or intersection) of shapes."""

    parts: tuple[object, ...]
    union: bool = True

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        los, his = zip(*(p.bounds() for p in self.parts))
        if self.union:
            return np.min(los, axis=0), np.max(his, axis=0)
        return np.max(los, axis=0), np.min(his, axis=0)

    def level(self, xyz: Sequence[np.ndarray]) -> np.ndarray:
        return reduce(np.minimum if self.union else np.maximum, (p.level(xyz) for p in self.parts))


@dataclass(frozen=True, eq=False)
class Negate:
    """Everything outside a shape (use inside an intersection)."""

    shape: object

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(3, -np.inf), np.full(3, np.inf)

    def level(self, xyz: Sequence[np.ndarray]) -> np.ndarray:
        return -self.shape.level(xyz)


@dataclass(frozen=True, eq=False)
class HalfSpace:
    """Points p with normal . (p - point) >= 0."""

    normal: tuple[float, float, float]
    point: tuple[float, float, float]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(3, -np.inf), np.full(3, np.inf)

    def level(self, xyz: Sequence[np.ndarray]) -> np.ndarray:
        return sum(float(n) * (float(p) - c) for n, p, c in zip(self.normal, self.point, xyz))


@dataclass(frozen=True, eq=False)
class Stripes:
    """Bands ``width`` mm thick every ``period`` mm along z, sloping down anteriorly (ribs)."""

    period: float
    width: float
    slope: float
    offset: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(3, -np.inf), np.full(3, np.inf)

    def level(self, xyz: Sequence[np.ndarray]) -> np.ndarray:
        phase = np.mod(xyz[2] + float(self.slope) * xyz[1] - float(self.offset), float(self.period))
        return np.abs(phase - float(self.period) / 2) - float(self.width) / 2
