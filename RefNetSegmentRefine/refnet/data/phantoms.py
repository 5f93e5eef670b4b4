"""Synthetic abdominal CT phantoms: RefNet's embedded default dataset.

:func:`make_phantom` draws one case from a seed: a portal-venous CT in Hounsfield units and its
13-class label map (:mod:`refnet.labels`) on an anisotropic grid. Organs are analytic shapes
(:mod:`.shapes`: superellipsoids, tubes swept along splines) laid out in millimetres in a template
body (:mod:`.anatomy`) and painted here, so they
keep their size at any spacing. Every case varies body size and fat, organ size and position, a
smooth random deformation, organ HU, noise and blur, and holds unlabelled distractors (bowel,
colon, mesenteric and renal vessels, diaphragmatic crura, ribs) so that small models make the
errors real ones make.

Axes: array (i, j, k) runs along world (R, A, S) with a positive diagonal affine: larger i is
further to the patient's right (liver), larger j anterior, larger k superior.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from refnet.io import save_volume, write_json
from refnet.labels import NUM_CLASSES

from .anatomy import Draw, Structure, anatomy

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

_MAX_VOXELS = 60_000_000  # about 1.5 GB of working arrays
_SLICE_BLUR = 0.45  # partial-volume blur along the slice axis, in slices
_FOV_CENTER_Z = 10.0  # template z (mm) at the centre of the field of view, on average
_DEFORM_CELL_MM = 60.0  # correlation length of the random deformation
_TEXTURE_CELL_MM = 5.0  # correlation length of organ texture and colon content

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
    missing_organs: float = 0.0  # chance a case has had its gallbladder removed; a third of it: one kidney
    lesions: float = 0.0  # mean number of hypodense lesions per case in liver, kidneys, spleen or pancreas,
    #                      labelled as their organ (as BTCV labels liver tumours); 0 keeps every case as before

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
        limits = (("hu_jitter", 100.0), ("blur_mm", 20.0), ("deform_mm", 30.0), ("shape_jitter", 2.0),
                  ("missing_organs", 1.0), ("lesions", 10.0))
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
# Painting
# ---------------------------------------------------------------------------------------------

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


def _paint(labels: np.ndarray, hu: np.ndarray, grid: _Grid, s: Structure, *, region: np.ndarray,
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
    structures, region = anatomy(Draw(rng, cfg, enhancement))
    # Pathology draws from its own stream, so turning it on leaves every other draw of the case as it was.
    pathology = np.random.default_rng([int(seed), 1])
    structures = _remove_organs(structures, pathology, cfg.missing_organs)
    region_level = region.level(grid.xyz)
    labels = np.zeros(shape, dtype=np.uint8)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    for structure in structures:
        _paint(labels, hu, grid, structure, region=region_level, texture=texture, fat_hu=cfg.organ_hu[0])
    _add_lesions(labels, hu, np.diag(affine)[:3], pathology, cfg.lesions)
    return Phantom(_acquire(rng, hu, np.diag(affine)[:3], cfg), labels, affine)


_LESION_ORGANS = (6, 6, 6, 2, 3, 1, 11)  # liver lesions most often, as in abdominal CT


def _remove_organs(structures: list[Structure], rng: np.random.Generator, chance: float) -> list[Structure]:
    """Drop the gallbladder (cholecystectomy) or one kidney (nephrectomy) at random: real cases lack organs."""
    if not chance:
        return structures
    gone = set()
    if rng.random() < chance:
        gone.add(4)
    if rng.random() < chance / 3:
        gone.add(int(rng.choice((2, 3))))
    return [s for s in structures if s.label not in gone]


def _add_lesions(labels: np.ndarray, hu: np.ndarray, spacing: Sequence[float], rng: np.random.Generator,
                 mean_count: float) -> None:
    """Hypodense round lesions (cysts, metastases) of 4-15 mm radius inside organs; labels stay the organ's."""
    if not mean_count:
        return
    for _ in range(int(rng.poisson(mean_count))):
        organ = int(rng.choice(_LESION_ORGANS))
        where = np.flatnonzero(labels == organ)
        if not where.size:
            continue
        centre = np.array(np.unravel_index(int(where[rng.integers(where.size)]), labels.shape))
        radius = float(rng.uniform(4.0, 15.0))
        half = np.ceil(radius / np.asarray(spacing)).astype(int)
        lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, labels.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        offsets = np.meshgrid(*[(np.arange(a, b) - c) * sp for a, b, c, sp in zip(lo, hi, centre, spacing)],
                              indexing="ij")
        inside = (sum(o**2 for o in offsets) <= radius**2) & (labels[box] == organ)
        hu[box][inside] -= np.float32(rng.uniform(40.0, 90.0))


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
    write_json(out / "dataset.json", meta)
    return out
