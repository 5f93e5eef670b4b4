"""Synthetic abdominal CT phantoms: RefNet's embedded default dataset.

:func:`make_phantom` draws one case from a seed: a portal-venous CT in Hounsfield units and its
13-class label map (:mod:`refnet.labels`) on an anisotropic grid. Organs are analytic shapes
(superellipsoids, tubes swept along splines) laid out in millimetres in a template body, so they
keep their size at any spacing. Every case varies body size and fat, organ size and position, a
smooth random deformation, organ HU, noise and blur, and holds unlabelled distractors (bowel,
colon, mesenteric and renal vessels, diaphragmatic crura, ribs) so that small models make the
errors real ones make.

Axes: array (i, j, k) runs along world (R, A, S) with a positive diagonal affine: larger i is
further to the patient's right (liver), larger j anterior, larger k superior.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import reduce
from pathlib import Path

import numpy as np
from scipy.interpolate import make_interp_spline
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from refnet.io import save_volume
from refnet.labels import NUM_CLASSES

__all__ = ["ORGAN_HU", "Phantom", "PhantomConfig", "case_seed", "make_phantom", "write_phantom_dataset"]

logger = logging.getLogger(__name__)

# Nominal portal-venous HU per RefNet class; index 0 is the visceral (intra-abdominal) fat.
ORGAN_HU: tuple[float, ...] = (
    -90.0,  # 0 visceral fat (unlabelled)
    110.0,  # 1 spleen
    160.0,  # 2 right kidney (cortex +15, medulla -20)
    160.0,  # 3 left kidney
    10.0,  # 4 gallbladder (bile; 2 mm wall +25)
    45.0,  # 5 esophagus
    100.0,  # 6 liver (hepatic and portal branches inside are brighter)
    60.0,  # 7 stomach wall (contents: fluid, food or oral contrast, plus air)
    180.0,  # 8 aorta
    130.0,  # 9 inferior vena cava
    160.0,  # 10 portal and splenic vein
    90.0,  # 11 pancreas
    50.0,  # 12 adrenal glands
)

# Unlabelled tissues (HU); each case shifts them by the same jitter as the organs.
_TISSUE_HU: dict[str, float] = {
    "subcutaneous_fat": -100.0, "muscle": 55.0, "cortical_bone": 700.0, "marrow": 230.0,
    "disc": 90.0, "csf": 12.0, "lung": -850.0, "heart": 130.0, "bowel_wall": 82.0,
    "bowel_fluid": 25.0, "colon_wall": 50.0, "colon_content": -350.0, "oral_contrast": 250.0,
}
_LONG = 1.0e4  # z radius (mm) that turns an ellipsoid into a cylinder along the body axis
_FAR = 1.0e3  # level (mm) reported far outside a tube
_REACH = 12.0  # how far outside a tube (mm) its level is computed exactly (halos, walls)
_MAX_VOXELS = 60_000_000  # about 1.5 GB of working arrays
_SLICE_BLUR = 0.45  # partial-volume blur along the slice axis, in slices
_FOV_CENTER_Z = 10.0  # template z (mm) at the centre of the field of view, on average
_DEFORM_CELL_MM = 60.0  # correlation length of the random deformation
_TEXTURE_CELL_MM = 5.0  # correlation length of organ texture and colon content
_ENHANCING = (1, 2, 3, 6, 8, 9, 10, 11)  # classes whose HU follows the contrast timing
_BASE_HU = 40.0  # unenhanced soft tissue


# ---------------------------------------------------------------------------------------------
# Configuration and result
# ---------------------------------------------------------------------------------------------


def _floats(value: object) -> tuple[float, ...]:
    """``value`` as a tuple of floats; empty when it is not a sequence of numbers."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        return ()
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return ()


def _check_range(name: str, value: object, *, low: float, example: str) -> tuple[float, float]:
    pair = _floats(value)
    if len(pair) != 2 or not all(math.isfinite(v) and v >= low for v in pair) or pair[0] > pair[1]:
        bound = "positive" if low > 0 else "non-negative"
        raise ValueError(f"PhantomConfig.{name} must be two {bound} numbers (min, max) with min <= max, "
                         f"got {value!r}; e.g. {example}.")
    return pair  # type: ignore[return-value]


def _check_values(name: str, value: object, count: int, *, positive: bool, hint: str) -> tuple[float, ...]:
    values = _floats(value)
    if len(values) != count or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        raise ValueError(f"PhantomConfig.{name} must hold {count} finite{' positive' if positive else ''} "
                         f"numbers, got {value!r}; {hint}.")
    return values


@dataclass(frozen=True)
class PhantomConfig:
    """Settings of the phantom generator, passed whole to :func:`make_phantom`.

    The array shape derives from ``fov_mm`` and the spacing drawn for each case. Sequences are
    stored as tuples, so ``PhantomConfig(**json.load(...)["config"])`` round-trips.

    Raises:
        ValueError: a field is out of range; the message names the field, the value and the fix.
    """

    inplane_spacing_mm: tuple[float, float] = (0.7, 1.0)  # range of the square in-plane voxel size
    slice_spacing_mm: tuple[float, float] = (2.5, 5.0)  # range of the slice spacing (and thickness)
    fov_mm: tuple[float, float, float] = (340.0, 280.0, 180.0)  # R-L, A-P, S-I extent of the array
    organ_hu: tuple[float, ...] = ORGAN_HU  # nominal HU per class (index 0: visceral fat)
    hu_jitter: float = 8.0  # SD (HU) of each tissue's per-case HU shift (arteries x2); also sets
    #                         the contrast-timing spread (enhancement x N(1, hu_jitter / 80))
    noise_hu: tuple[float, float] = (15.0, 25.0)  # range of the image noise SD (HU)
    blur_mm: float = 1.0  # in-plane partial-volume blur SD; across slices it is 0.45 slice
    deform_mm: float = 8.0  # SD of the smooth random deformation
    shape_jitter: float = 1.0  # scale of the per-case organ size/position jitter (0: none)
    distractors: bool = True  # unlabelled bowel, colon, duodenum and mesenteric/renal vessels

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "inplane_spacing_mm", _check_range("inplane_spacing_mm", self.inplane_spacing_mm,
                                                      low=1e-3, example="(0.7, 1.0)"))
        set_(self, "slice_spacing_mm", _check_range("slice_spacing_mm", self.slice_spacing_mm,
                                                    low=1e-3, example="(2.5, 5.0)"))
        set_(self, "noise_hu", _check_range("noise_hu", self.noise_hu, low=0.0, example="(15, 25)"))
        set_(self, "fov_mm", _check_values(
            "fov_mm", self.fov_mm, 3, positive=True,
            hint="give the R-L, A-P, S-I extent in mm, e.g. (340, 280, 180)"))
        set_(self, "organ_hu", _check_values(
            "organ_hu", self.organ_hu, NUM_CLASSES, positive=False,
            hint="one HU per class (index 0 = visceral fat); start from ORGAN_HU"))
        limits = (("hu_jitter", 100.0), ("blur_mm", 20.0), ("deform_mm", 30.0), ("shape_jitter", 2.0))
        for name, top in limits:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= top:
                raise ValueError(f"PhantomConfig.{name} must be a number in [0, {top:g}], got {value!r}.")
        if not isinstance(self.distractors, bool):
            raise ValueError(f"PhantomConfig.distractors must be True or False, got {self.distractors!r}.")

    @classmethod
    def demo(cls, **changes: object) -> PhantomConfig:
        """The coarse preset of the demo: 2.0-2.4 mm pixels, 4-5 mm slices (~155 x 127 x 40 voxels).

        Args:
            **changes: fields to override, e.g. ``noise_hu=(0, 0)``.
        """
        return cls(**{"inplane_spacing_mm": (2.0, 2.4), "slice_spacing_mm": (4.0, 5.0), **changes})


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic case.

    Attributes:
        ct: (I, J, K) float32 CT in Hounsfield units, clipped to [-1024, 3071].
        labels: (I, J, K) uint8 RefNet class indices 0..12.
        affine: (4, 4) float64 voxel (i, j, k) -> RAS mm, diagonal and positive.
    """

    ct: np.ndarray
    labels: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


# ---------------------------------------------------------------------------------------------
# Shapes: bounds() -> (lo, hi) mm boxes, level(xyz) -> approximate signed distance (mm, < 0 inside)
# ---------------------------------------------------------------------------------------------


def _rotation(z_deg: float = 0.0, y_deg: float = 0.0, x_deg: float = 0.0) -> np.ndarray:
    """(3, 3) rotation Rz @ Ry @ Rx (local -> template), angles in degrees."""
    (cz, sz), (cy, sy), (cx, sx) = ((math.cos(math.radians(a)), math.sin(math.radians(a)))
                                    for a in (z_deg, y_deg, x_deg))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


@dataclass(frozen=True, eq=False)
class _Ellipsoid:
    """Rotated superellipsoid; with a ``_LONG`` z radius, a cylinder along the body axis."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    angles: tuple[float, float, float] = (0.0, 0.0, 0.0)  # degrees about z, y, x
    power: float = 2.0  # 2: ellipsoid; larger: boxier

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        ext = np.abs(_rotation(*self.angles)) @ np.asarray(self.radii, dtype=np.float64)
        return np.asarray(self.center) - ext, np.asarray(self.center) + ext

    def level(self, xyz: Sequence[np.ndarray]) -> np.ndarray:
        d = [c - float(c0) for c, c0 in zip(xyz, self.center)]
        rot = _rotation(*self.angles).tolist()
        if any(self.angles):
            d = [rot[0][k] * d[0] + rot[1][k] * d[1] + rot[2][k] * d[2] for k in range(3)]
        u = [dk / float(r) for dk, r in zip(d, self.radii) if r < _LONG]  # a cylinder ignores z
        if self.power == 2.0:
            norm = np.sqrt(sum(uk * uk for uk in u))
        else:
            norm = sum(np.abs(uk) ** self.power for uk in u) ** (1.0 / self.power)
        return (norm - 1.0) * float(min(self.radii))


@dataclass(frozen=True, eq=False)
class _Tube:
    """Tube of varying radius around a densely sampled centre line."""

    points: np.ndarray  # (N, 3) centre line, ~1 mm apart
    radii: np.ndarray  # (N,) radius at each point, mm

    @classmethod
    def through(cls, ctrl: Sequence[Sequence[float]], radii: float | Sequence[float]) -> _Tube:
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
class _Csg:
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
class _Negate:
    """Everything outside a shape (use inside an intersection)."""

    shape: object

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(3, -np.inf), np.full(3, np.inf)

    def level(self, xyz: Sequence[np.ndarray]) -> np.ndarray:
        return -self.shape.level(xyz)


@dataclass(frozen=True, eq=False)
class _HalfSpace:
    """Points p with normal . (p - point) >= 0."""

    normal: tuple[float, float, float]
    point: tuple[float, float, float]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(3, -np.inf), np.full(3, np.inf)

    def level(self, xyz: Sequence[np.ndarray]) -> np.ndarray:
        return sum(float(n) * (float(p) - c) for n, p, c in zip(self.normal, self.point, xyz))


@dataclass(frozen=True, eq=False)
class _Stripes:
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


# ---------------------------------------------------------------------------------------------
# Painting
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Structure:
    """One painted tissue; later structures overwrite earlier ones."""

    shape: object  # one of the shapes above
    label: int  # class painted (0: unlabelled tissue)
    hu: float  # HU of the structure, or of its wall when inner_hu is set
    inner_hu: float | None = None  # HU deeper than wall_mm inside the surface
    wall_mm: float = 0.0
    texture_hu: float = 0.0  # amplitude of the random texture (of the inner part if inner_hu is set)
    halo_mm: float = 0.0  # fat gap cut into labelled organs around it
    within: tuple[int, ...] = ()  # paint only over these labels (empty: anywhere)
    clip: bool = True  # confine to the abdominal cavity minus the spine


@dataclass(frozen=True, eq=False)
class _Grid:
    """Voxel positions in the template body (mm), after the case's scaling and deformation."""

    axes: tuple[np.ndarray, np.ndarray, np.ndarray]  # undeformed positions along i, j, k
    xyz: tuple[np.ndarray, np.ndarray, np.ndarray]  # deformed positions, each (I, J, K) float32
    margin: np.ndarray  # (3,) largest displacement per axis

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box of the voxels whose deformed position may lie in [lo, hi]; None if empty."""
        out = []
        for ax, a, b, m in zip(self.axes, lo, hi, self.margin):
            i0, i1 = int(np.searchsorted(ax, a - m)), int(np.searchsorted(ax, b + m, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)  # type: ignore[return-value]

    def at(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(c[box] for c in self.xyz)  # type: ignore[return-value]


def _paint(labels: np.ndarray, hu: np.ndarray, grid: _Grid, s: _Structure, *, region: np.ndarray,
           texture: np.ndarray, fat_hu: float) -> None:
    """Paint one structure into the generator's own ``labels``/``hu`` canvases, in place."""
    lo, hi = s.shape.bounds()
    box = grid.box(np.asarray(lo) - s.halo_mm, np.asarray(hi) + s.halo_mm)
    if box is None:
        return
    level = s.shape.level(grid.at(box))
    if s.clip:
        level = np.maximum(level, region[box])
    lab, val = labels[box], hu[box]  # views into the canvases
    if s.halo_mm > 0:
        halo = (level > 0) & (level <= s.halo_mm) & (lab > 0)
        lab[halo], val[halo] = 0, fat_hu
    inside = level <= 0
    if s.within:
        inside &= np.isin(lab, s.within)
    if not inside.any():
        return
    value = np.full(level.shape, s.hu, dtype=np.float32)
    deep = level < -s.wall_mm if s.inner_hu is not None else np.ones(level.shape, dtype=bool)
    if s.inner_hu is not None:
        value[deep] = s.inner_hu
    if s.texture_hu:
        value += np.where(deep, np.float32(s.texture_hu) * texture[box], np.float32(0.0))
    lab[inside] = s.label
    val[inside] = value[inside]


@dataclass(frozen=True, eq=False)
class _Draw:
    """The random draws of one case: jittered positions, sizes, paths and HU."""

    rng: np.random.Generator
    config: PhantomConfig
    enhancement: float = 1.0  # contrast timing: scales every enhancing organ's HU above _BASE_HU

    def pos(self, x: float, y: float, z: float, sd: float = 5.0) -> tuple[float, float, float]:
        j = self.rng.normal(0.0, sd * self.config.shape_jitter, 3)
        return (float(x + j[0]), float(y + j[1]), float(z + j[2]))

    def scale(self, rel: float = 0.15) -> float:
        return float(self.rng.uniform(1 - rel * self.config.shape_jitter, 1 + rel * self.config.shape_jitter))

    def size(self, *radii: float, rel: float = 0.15) -> tuple[float, ...]:
        a = rel * self.config.shape_jitter
        f = self.rng.uniform(1 - a, 1 + a) * self.rng.uniform(1 - a / 2, 1 + a / 2, len(radii))
        return tuple(float(r * x) for r, x in zip(radii, f))

    def path(self, ctrl: Sequence[Sequence[float]], sd: float = 3.0) -> np.ndarray:
        ctrl = np.asarray(ctrl, dtype=np.float64)
        return ctrl + self.rng.normal(0.0, sd * self.config.shape_jitter, ctrl.shape)

    def hu(self, label: int, spread: float = 1.0) -> float:
        nominal = self.config.organ_hu[label]
        if label in _ENHANCING:
            nominal = _BASE_HU + (nominal - _BASE_HU) * self.enhancement
        return float(nominal + self.rng.normal(0.0, spread * self.config.hu_jitter))

    def tissue(self, name: str) -> float:
        return float(_TISSUE_HU[name] + self.rng.normal(0.0, self.config.hu_jitter))

    def uniform(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)


# ---------------------------------------------------------------------------------------------
# Random fields, geometry, scanner
# ---------------------------------------------------------------------------------------------


def _smooth_fields(rng: np.random.Generator, axes: Sequence[np.ndarray], cell_mm: float,
                   count: int) -> np.ndarray:
    """(count, I, J, K) float32 random fields, smooth over ~cell_mm, zero mean and unit SD.

    A coarse random grid interpolated with separable Gaussian weights: a tensor product, so it
    costs a few matrix products instead of a per-voxel interpolation.
    """
    weights = []
    for ax in axes:
        nodes = np.arange(ax[0] - 2 * cell_mm, ax[-1] + 2 * cell_mm + 1e-6, cell_mm)
        w = np.exp(-0.5 * ((ax[:, None] - nodes[None, :]) / cell_mm) ** 2)
        weights.append((w / w.sum(axis=1, keepdims=True)).astype(np.float32))
    coarse = rng.standard_normal((count, *(w.shape[1] for w in weights)), dtype=np.float32)
    fields = np.einsum("nabc,ia,jb,kc->nijk", coarse, *weights, optimize=True)
    fields -= fields.mean(axis=(1, 2, 3), keepdims=True)
    fields /= fields.std(axis=(1, 2, 3), keepdims=True) + np.float32(1e-6)
    return fields.astype(np.float32, copy=False)


def _sample_geometry(rng: np.random.Generator, cfg: PhantomConfig) -> tuple[tuple[int, int, int], np.ndarray]:
    """Draw the spacing; return the array shape and the (4, 4) affine centred on the FOV."""
    inplane, thick = rng.uniform(*cfg.inplane_spacing_mm), rng.uniform(*cfg.slice_spacing_mm)
    spacing = np.array([inplane, inplane, thick])
    shape = tuple(max(1, round(float(f / s))) for f, s in zip(cfg.fov_mm, spacing))
    if math.prod(shape) > _MAX_VOXELS:
        raise ValueError(f"PhantomConfig gives {shape} = {math.prod(shape):,} voxels (over {_MAX_VOXELS:,}); "
                         "increase inplane_spacing_mm / slice_spacing_mm or reduce fov_mm.")
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * spacing
    return shape, affine  # type: ignore[return-value]


def _make_grid(rng: np.random.Generator, shape: Sequence[int], affine: np.ndarray,
               cfg: PhantomConfig) -> _Grid:
    """Template-body positions of the voxels: world mm, shifted, scaled and smoothly deformed."""
    jit = cfg.shape_jitter
    scale = (1 + jit * rng.uniform(-0.07, 0.06)) * (1 + jit * rng.uniform(-0.03, 0.03, 3))
    shift = jit * rng.uniform([-8.0, -6.0, -8.0], [8.0, 6.0, 8.0]) - (0.0, 0.0, _FOV_CENTER_Z)
    axes = tuple((affine[a, 3] + np.arange(n) * affine[a, a] - shift[a]) / scale[a]
                 for a, n in enumerate(shape))
    disp = _smooth_fields(rng, axes, _DEFORM_CELL_MM, 3) * np.float32(cfg.deform_mm)
    xyz = (disp[0] + axes[0][:, None, None].astype(np.float32),
           disp[1] + axes[1][None, :, None].astype(np.float32),
           disp[2] + axes[2][None, None, :].astype(np.float32))
    return _Grid(axes, xyz, np.abs(disp).reshape(3, -1).max(axis=1))  # type: ignore[arg-type]


def _acquire(rng: np.random.Generator, hu: np.ndarray, spacing: Sequence[float],
             cfg: PhantomConfig) -> np.ndarray:
    """Scanner model: partial-volume blur (stronger across slices) plus correlated Gaussian noise."""
    sigma = (cfg.blur_mm / spacing[0], cfg.blur_mm / spacing[1], _SLICE_BLUR)  # in voxels
    ct = gaussian_filter(hu, sigma, mode="nearest")
    noise_sd = rng.uniform(*cfg.noise_hu)
    noise = gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), (0.7, 0.7, 0.0))
    noise *= np.float32(noise_sd / max(float(noise.std()), 1e-6))
    return np.clip(ct + noise, -1024.0, 3071.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Anatomy (template mm: x to the patient's right, y anterior, z superior; FOV centre near z = 10)
# ---------------------------------------------------------------------------------------------


def _random_path(d: _Draw, lo: Sequence[float], hi: Sequence[float], *, n: int, step: float) -> np.ndarray:
    """(n, 3) random walk of control points reflected into the box [lo, hi] (a bowel loop)."""
    lo_, hi_ = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    points = [d.rng.uniform(lo_, hi_)]
    for direction in d.rng.standard_normal((n - 1, 3)):
        p = points[-1] + step * direction / max(float(np.linalg.norm(direction)), 1e-6)
        p = np.where(p < lo_, 2 * lo_ - p, p)
        points.append(np.clip(np.where(p > hi_, 2 * hi_ - p, p), lo_, hi_))
    return np.asarray(points)


def _body(d: _Draw) -> tuple[list[_Structure], object]:
    """Body wall, spine, ribs, crura, lungs, heart; also the organ region (cavity minus spine)."""
    fat = d.uniform(8.0, 30.0)
    muscle = _Ellipsoid((0, 0, 0), (132, 97, _LONG), power=2.4)
    cavity = _Ellipsoid((0, 0, 0), (120, 85, _LONG), power=2.6)
    spine = _Csg((_Ellipsoid((0, -78, 0), (46, 28, _LONG)), _Ellipsoid((0, -50, 0), (22, 19, _LONG))))
    bone, marrow, mus = d.tissue("cortical_bone"), d.tissue("marrow"), d.tissue("muscle")
    ribs = _Csg((muscle, _Negate(cavity), _HalfSpace((0, 0, 1), (0, 0, -40)),
                 _Stripes(period=d.uniform(28, 36), width=11.0, slope=0.8, offset=d.uniform(0, 36)),
                 _Negate(_Ellipsoid((0, 97, 0), (45, 40, _LONG)))), union=False)
    psoas = [d.path([(s * 30, -48, 30), (s * 36, -46, -30), (s * 42, -40, -140)]) for s in (-1, 1)]
    crura = [d.path([(s * 18 - 8, -30, 90), (s * 18 - 4, -38, 20), (s * 10, -42, -20)]) for s in (-1, 1)]
    out = [
        _Structure(_Ellipsoid((0, 0, 0), (132 + fat, 97 + 0.8 * fat, _LONG), power=2.2), 0,
                   d.tissue("subcutaneous_fat"), texture_hu=10, clip=False),
        _Structure(muscle, 0, mus, texture_hu=6, clip=False),
        _Structure(cavity, 0, d.hu(0), texture_hu=20, clip=False),
        _Structure(ribs, 0, bone, inner_hu=marrow, wall_mm=2, clip=False),
        *(_Structure(_Ellipsoid((s * 28, -81, 0), (22, 15, _LONG)), 0, mus, clip=False) for s in (-1, 1)),
        *(_Structure(_Tube.through(p, [5, 14, 22]), 0, mus, clip=False) for p in psoas),
        *(_Structure(_Tube.through(p, 4.5), 0, mus, clip=False) for p in crura),
        _Structure(_Ellipsoid((0, -77, 0), (17, 13, _LONG)), 0, 0.7 * bone, clip=False),
        _Structure(_Ellipsoid((0, -50, 0), (19, 16, _LONG), power=2.3), 0, bone, inner_hu=marrow,
                   wall_mm=2.5, clip=False),
        *(_Structure(_Ellipsoid((0, -50, float(z)), (19.5, 16.5, 3.5)), 0, d.tissue("disc"), clip=False)
          for z in np.arange(-150.0, 150.0, 34.0) + d.uniform(0, 34)),
        _Structure(_Ellipsoid((0, -77, 0), (8, 7, _LONG)), 0, d.tissue("csf"), clip=False),
        _Structure(_Ellipsoid((0, -92, 0), (5, 8, _LONG)), 0, 0.7 * bone, clip=False),
        *(_Structure(_Ellipsoid(d.pos(s * 75, -30, 128, sd=6), (55, 62, 68)), 0, d.tissue("lung"),
                     texture_hu=40) for s in (-1, 1)),
        _Structure(_Ellipsoid(d.pos(-15, 25, 140, sd=6), (65, 52, 52)), 0, d.tissue("heart"), texture_hu=8),
    ]
    return out, _Csg((cavity, _Negate(spine)), union=False)


def _gut(d: _Draw) -> list[_Structure]:
    """Unlabelled colon, small-bowel loops and duodenum with organ-like walls (distractors)."""
    contrast = d.chance(0.2)  # positive oral contrast in the small bowel
    lumen = d.tissue("oral_contrast") if contrast else d.tissue("bowel_fluid")
    colon_ctrl = [(86, -10, -140), (86, -8, -70), (84, 0, -35), (72, 28, -20), (35, 62, -30), (-10, 66, -32),
                  (-55, 50, -20), (-85, 20, 5), (-95, -10, -20), (-95, -18, -140)]
    colon = _Tube.through(d.path(colon_ctrl, sd=5),
                          np.array([22, 22, 22, 20, 18, 18, 18, 17, 16, 16]) * d.scale())
    out = [_Structure(colon, 0, d.tissue("colon_wall"), inner_hu=d.tissue("colon_content"), wall_mm=3,
                      texture_hu=250)]
    for lo, hi, n in (((-70, -5, -140), (60, 60, -30), 14), ((-80, 0, -35), (-20, 40, 0), 6)):
        loop = _Tube.through(_random_path(d, lo, hi, n=n, step=32.0), d.uniform(9.0, 12.0))
        wall = d.tissue("bowel_wall") + d.uniform(-12, 12)
        out.append(_Structure(loop, 0, wall, inner_hu=lumen if contrast else d.uniform(5, 40),
                              wall_mm=d.uniform(2.5, 6.0)))
    duodenum = _Tube.through(d.path([(24, 34, 4), (38, 22, 2), (48, 4, -6), (48, -4, -30), (44, -4, -52),
                                     (20, 2, -62), (-8, 4, -64), (-28, 4, -50), (-30, 10, -30)]), 10.5)
    out.append(_Structure(duodenum, 0, d.tissue("bowel_wall"), inner_hu=lumen, wall_mm=3))
    return out


def _organs(d: _Draw, kidneys: dict[int, tuple], hilum: tuple[float, float, float]) -> list[_Structure]:
    """Liver (with intrahepatic veins), esophagus, stomach, spleen, gallbladder, kidneys."""
    liver = [_Ellipsoid(d.pos(62, -4, 42), d.size(60, 70, 60), (d.uniform(-15, -5), -18, 0), power=2.3),
             _Ellipsoid(d.pos(5, 38, 52), d.size(48, 30, 26), (15, 0, 0), power=2.2)]
    if d.chance(0.4):  # Riedel's lobe
        liver.append(_Ellipsoid(d.pos(72, 5, -18), d.size(30, 38, 28)))
    ivc_top = d.pos(20, -10, 75)
    veins = [_Tube.through([ivc_top, d.pos(*end, sd=8)], [5.0, 2.5]) for end in
             ((85, 5, 45), (50, 35, 50), (-15, 40, 60))]
    portal = [_Tube.through([hilum, d.pos(*end, sd=8)], [5.0, 2.0]) for end in ((85, 0, 30), (0, 30, 40))]
    stomach = _Tube.through(d.path([(-50, -8, 58), (-52, 12, 40), (-40, 38, 18), (-12, 52, 6), (12, 44, 4),
                                    (24, 34, 4)], sd=4), np.array([30, 30, 26, 20, 14, 10]) * d.scale())
    content = d.tissue("oral_contrast") if d.chance(0.15) else d.uniform(5, 50)
    air = _Csg((_Tube(stomach.points, stomach.radii - 5), _HalfSpace((0, 1, 0), (0, d.uniform(20, 70), 0))),
               union=False)
    spleen_c, turn = d.pos(-88, -38, 42, sd=5), d.uniform(27, 43)
    notch = np.asarray(spleen_c) + 34 * _rotation(turn)[:, 0]  # the concave hilar side faces medially
    spleen = _Csg((_Ellipsoid(spleen_c, d.size(22, 52, 48), (turn, 0, 0)),
                   _Negate(_Ellipsoid(tuple(notch), (22, 45, 45), (turn, 0, 0)))), union=False)
    eso_path = d.path([(-4, -14, 130), (-6, -12, 90), (-12, -7, 70), (-24, -4, 56), (-36, -5, 50)], sd=2)
    esophagus = _Tube.through(eso_path, 9.0 * d.scale())
    pv = d.hu(10)
    out = [
        _Structure(_Csg(tuple(liver)), 6, d.hu(6), texture_hu=6),
        *(_Structure(t, 6, d.hu(9) + 10, within=(6,)) for t in veins),
        *(_Structure(t, 6, pv, within=(6,)) for t in portal),
        _Structure(esophagus, 5, d.hu(5), inner_hu=-600.0 if d.chance(0.3) else None, wall_mm=5.5),
        _Structure(stomach, 7, d.hu(7), inner_hu=content, wall_mm=5, texture_hu=25),
        _Structure(air, 7, -1000.0, within=(7,)),
        _Structure(spleen, 1, d.hu(1), texture_hu=4),
        _Structure(_Ellipsoid(d.pos(48, 38, -8), d.size(14, 16, 30), (d.uniform(-20, 20), 0, 35)), 4,
                   d.hu(4) + 25, inner_hu=d.hu(4), wall_mm=2),
    ]
    for label, (center, radii, side) in kidneys.items():
        hu, angles = d.hu(label), _kidney_angles(side)
        sinus = _Ellipsoid(_kidney_point(center, side, (-side * (radii[0] - 3), 0, 0)), (10, 8, 16), angles)
        kidney = _Csg((_Ellipsoid(center, radii, angles), _Negate(sinus)), union=False)
        out.append(_Structure(kidney, label, hu + 15, inner_hu=hu - 20, wall_mm=6, texture_hu=5, halo_mm=8))
    return out


def _kidney_angles(side: float) -> tuple[float, float, float]:
    """Kidney rotation: hilum turned anteromedially, upper pole tilted medially (side +1: right)."""
    return (-side * 25.0, -side * 12.0, 0.0)


def _kidney_point(center: Sequence[float], side: float, local: Sequence[float]) -> tuple[float, float, float]:
    """Template position of a point given in the kidney's own frame."""
    return tuple((np.asarray(center) + _rotation(*_kidney_angles(side)) @ np.asarray(local)).tolist())


def _retroperitoneum(d: _Draw, kidneys: dict[int, tuple],
                     hilum: tuple[float, float, float]) -> list[_Structure]:
    """Pancreas, unlabelled mesenteric/renal vessels, aorta, IVC, portal/splenic vein, adrenals."""
    pan = d.path([(30, 4, -24), (24, 8, -8), (8, 12, 0), (-15, 10, 8), (-42, 4, 15), (-64, -6, 22)])
    conf = pan[2] + (0, -12, 2)  # portal confluence, behind the pancreatic neck
    splenic = _Tube.through([conf, pan[3] + (0, -11, 2), pan[4] + (0, -10, 2), pan[5] + (-6, -10, 4)],
                            5.0 * d.scale())
    portal = _Tube.through([conf, (conf + np.asarray(hilum)) / 2 + (0, 2, 0), hilum], 7.0 * d.scale())
    art, vein = d.hu(8, 2.0), d.hu(10)
    ivc_hu = d.hu(9)
    renal_hila = {label: _kidney_point(c, side, (-side * (r[0] + 2), 0, 0))
                  for label, (c, r, side) in kidneys.items()}
    out = [_Structure(_Tube.through(pan, np.array([13, 15, 10, 11, 10, 8]) * d.scale()), 11, d.hu(11),
                      texture_hu=14)]
    if d.config.distractors:
        unlabelled = [  # (control points, radius, HU)
            ([(-11, -13, 16), (-8, -6, 4), (-6, 6, -20), (-4, 22, -60), (-2, 30, -140)], 3.5, art),  # SMA
            ([conf, np.add(conf, (2, 8, -22)), (12, 24, -60), (14, 30, -140)], 5.0, vein),  # SMV
            ([renal_hila[3], (-26, -20, -4), (-12, -7, -3), (4, -10, -3), (20, -16, -4)], 4.5, ivc_hu + 15),
            ([renal_hila[2], (22, -20, -18)], 4.5, ivc_hu + 15),  # right renal vein
            ([(-13, -24, 0), np.add(renal_hila[3], (0, -4, 2))], 2.8, art),  # left renal artery
            ([(-13, -24, -2), (10, -32, -8), np.add(renal_hila[2], (0, -4, 2))], 2.8, art),
            ([(-13, -12, 22), (-12, -2, 24), (-30, -6, 26), (-50, -12, 30), (-70, -20, 32)], 2.8, art),
            ([(-12, -2, 24), (15, 0, 22), np.add(hilum, (0, 4, -4))], 2.5, art),  # common hepatic artery
        ]
        out += [_Structure(_Tube.through(d.path(c, sd=2), r), 0, hu) for c, r, hu in unlabelled]
    aorta = [(-12, -22, -140), (-14, -22, -40), (-13, -24, 30), (-18, -30, 80), (-24, -34, 140)]
    ivc = [(20, -20, -140), (22, -18, -40), (24, -14, 20), (22, -10, 60), (18, -8, 130)]
    out += [
        _Structure(_Tube.through(d.path(aorta, sd=2), d.size(10, 10.5, 11, 12, 12.5)), 8, art, halo_mm=2),
        _Structure(_Tube.through(d.path(ivc, sd=2), d.size(11, 11, 11, 12, 12)), 9, ivc_hu),
        _Structure(_Csg((portal, splenic)), 10, vein),
    ]
    for center, radii, side in kidneys.values():
        top = _kidney_point(center, side, (0, 0, radii[2]))  # upper pole, medial and anterior of centre
        apex = np.asarray(d.pos(top[0] - side * 8, top[1] + 10, top[2] + 6, sd=4))
        turn, spread = d.uniform(-30, 30), d.uniform(15, 40)  # gland orientation, half-angle of the V
        limbs = []
        for s in (-1, 1):  # two thin limbs running back from an anterior apex (an inverted V or Y)
            radii, angle = (d.uniform(2.6, 3.4), d.uniform(9, 14), d.uniform(12, 20)), turn + s * spread
            center = apex - radii[1] * _rotation(angle)[:, 1] + (0, 0, d.uniform(-4, 4))
            limbs.append(_Ellipsoid(tuple(center), radii, (angle, 0, 0)))
        out.append(_Structure(_Csg(tuple(limbs)), 12, d.hu(12), halo_mm=3))
    return out


def _anatomy(d: _Draw) -> tuple[list[_Structure], object]:
    """All structures of one case in painting order, and the organ region shape."""
    body, region = _body(d)
    gut = _gut(d) if d.config.distractors else []
    kidneys = {label: (d.pos(side * 60, -45, z), d.size(26, 21, 55), side)
               for label, side, z in ((2, 1.0, -24.0), (3, -1.0, -8.0))}  # right kidney (+x) lower
    hilum = d.pos(46, 2, 30)
    return [*body, *gut, *_organs(d, kidneys, hilum), *_retroperitoneum(d, kidneys, hilum)], region


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_seed(seed: object, what: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(seed).__name__} {seed!r}.")
    if seed < 0:
        raise ValueError(f"{what} must be >= 0, got {seed}.")
    return int(seed)


def make_phantom(seed: int, config: PhantomConfig | None = None) -> Phantom:
    """Generate one synthetic abdominal CT case and its labels, deterministically from ``seed``.

    Args:
        seed: non-negative int; the same seed and config always give identical arrays.
        config: generator settings; ``None`` uses :class:`PhantomConfig` defaults
            (0.7-1.0 mm pixels, 2.5-5 mm slices). :meth:`PhantomConfig.demo` is the coarse preset.

    Returns:
        A :class:`Phantom`: (I, J, K) float32 HU CT, (I, J, K) uint8 class labels 0..12 and the
        (4, 4) float64 RAS affine (i -> patient right, j -> anterior, k -> superior).

    Raises:
        TypeError: ``seed`` is not an int or ``config`` not a PhantomConfig.
        ValueError: negative seed, or a config that gives too many voxels.
    """
    cfg = PhantomConfig() if config is None else config
    if not isinstance(cfg, PhantomConfig):
        raise TypeError(f"config must be a PhantomConfig or None, got {type(config).__name__}.")
    rng = np.random.default_rng(_check_seed(seed))
    shape, affine = _sample_geometry(rng, cfg)
    grid = _make_grid(rng, shape, affine, cfg)
    texture = _smooth_fields(rng, grid.axes, _TEXTURE_CELL_MM, 1)[0]
    enhancement = float(np.clip(1.0 + rng.normal(0.0, cfg.hu_jitter / 80.0), 0.7, 1.3))
    structures, region = _anatomy(_Draw(rng, cfg, enhancement))
    region_level = region.level(grid.xyz)
    labels = np.zeros(shape, dtype=np.uint8)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    for structure in structures:
        _paint(labels, hu, grid, structure, region=region_level, texture=texture, fat_hu=cfg.organ_hu[0])
    return Phantom(_acquire(rng, hu, np.diag(affine)[:3], cfg), labels, affine)


def case_seed(seed: int, case_id: int) -> int:
    """The phantom seed of case ``case_id`` in a dataset generated with ``seed`` (stable across runs)."""
    key = (_check_seed(seed), _check_seed(case_id, "case_id"))
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def _check_case_ids(case_ids: object) -> list[int]:
    if isinstance(case_ids, (str, bytes)) or not isinstance(case_ids, Sequence) or not case_ids:
        raise ValueError(f"case_ids must be a non-empty sequence of ints, got {case_ids!r}; "
                         "e.g. range(1, 41).")
    ids = [_check_seed(c, "case id") for c in case_ids]
    if max(ids) > 9999:
        raise ValueError(f"case ids must be <= 9999 (4-digit BTCV file names), got {max(ids)}.")
    duplicates = sorted({c for c in ids if ids.count(c) > 1})
    if duplicates:
        raise ValueError(f"case_ids holds duplicates {duplicates}; list each case once.")
    return ids


def _write_json(path: Path, payload: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_phantom_dataset(out_dir: str | os.PathLike, case_ids: Sequence[int], *,
                          config: PhantomConfig | None = None, seed: int = 0) -> Path:
    """Write phantoms in the BTCV/Synapse layout, with a ``dataset.json`` describing them.

    Files: ``out_dir/img/imgNNNN.nii.gz`` (int16 HU) and ``out_dir/label/labelNNNN.nii.gz``
    (uint8 RefNet classes), written atomically; existing files of these cases are overwritten.
    Case ``c`` uses seed ``case_seed(seed, c)``, so a case does not depend on the other ids.

    Args:
        out_dir: output folder (created if missing).
        case_ids: distinct case numbers 0..9999, e.g. ``BTCV_TRAIN_IDS``.
        config: generator settings; ``None`` uses :class:`PhantomConfig` defaults.
        seed: dataset seed.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: empty, duplicate, negative or too large case ids; bad seed.
    """
    cfg = PhantomConfig() if config is None else config
    ids, seed = _check_case_ids(case_ids), _check_seed(seed)
    out = Path(out_dir)
    for cid in ids:
        phantom = make_phantom(case_seed(seed, cid), cfg)
        ct = np.round(phantom.ct).astype(np.int16)
        save_volume(out / "img" / f"img{cid:04d}.nii.gz", ct, phantom.affine)
        save_volume(out / "label" / f"label{cid:04d}.nii.gz", phantom.labels, phantom.affine)
        logger.info("phantom case %04d written (%s voxels, spacing %s mm)", cid, phantom.labels.shape,
                    tuple(round(s, 2) for s in phantom.spacing))
    meta = {"label_scheme": "refnet", "generator": "refnet phantoms", "seed": seed, "config": asdict(cfg)}
    _write_json(out / "dataset.json", meta)
    return out
