"""The template anatomy of a phantom case: which structures to paint, where, and with what HU.

Template millimetres: x to the patient's right, y anterior, z superior; the field of view is
centred near z = 10. Every random draw goes through :class:`Draw`, so one generator stream (and
so one seed) fixes a whole case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .shapes import LONG, Csg, Ellipsoid, HalfSpace, Negate, Stripes, Tube, rotation

if TYPE_CHECKING:
    from .phantoms import PhantomConfig

__all__ = ["Draw", "Structure", "anatomy"]

# Unlabelled tissues (HU); each case shifts them by the same jitter as the organs.
TISSUE_HU: dict[str, float] = {
    "subcutaneous_fat": -100.0, "muscle": 55.0, "cortical_bone": 700.0, "marrow": 230.0,
    "disc": 90.0, "csf": 12.0, "lung": -850.0, "heart": 130.0, "bowel_wall": 82.0,
    "bowel_fluid": 25.0, "colon_wall": 50.0, "colon_content": -350.0, "oral_contrast": 250.0,
}
_ENHANCING = (1, 2, 3, 6, 8, 9, 10, 11)  # classes whose HU follows the contrast timing
_BASE_HU = 40.0  # unenhanced soft tissue


@dataclass(frozen=True, eq=False)
class Structure:
    """One painted tissue; later structures overwrite earlier ones."""

    shape: object  # a shape of refnet.data.shapes
    label: int  # class painted (0: unlabelled tissue)
    hu: float  # HU of the structure, or of its wall when inner_hu is set
    inner_hu: float | None = None  # HU deeper than wall_mm inside the surface
    wall_mm: float = 0.0
    texture_hu: float = 0.0  # amplitude of the random texture (of the inner part if inner_hu is set)
    halo_mm: float = 0.0  # fat gap cut into labelled organs around it
    within: tuple[int, ...] = ()  # paint only over these labels (empty: anywhere)
    clip: bool = True  # confine to the abdominal cavity minus the spine


@dataclass(frozen=True, eq=False)
class Draw:
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
        return float(TISSUE_HU[name] + self.rng.normal(0.0, self.config.hu_jitter))

    def uniform(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

def _random_path(d: Draw, lo: Sequence[float], hi: Sequence[float], *, n: int, step: float) -> np.ndarray:
    """(n, 3) random walk of control points reflected into the box [lo, hi] (a bowel loop)."""
    lo_, hi_ = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    points = [d.rng.uniform(lo_, hi_)]
    for direction in d.rng.standard_normal((n - 1, 3)):
        p = points[-1] + step * direction / max(float(np.linalg.norm(direction)), 1e-6)
        p = np.where(p < lo_, 2 * lo_ - p, p)
        points.append(np.clip(np.where(p > hi_, 2 * hi_ - p, p), lo_, hi_))
    return np.asarray(points)


def _body(d: Draw) -> tuple[list[Structure], object]:
    """Body wall, spine, ribs, crura, lungs, heart; also the organ region (cavity minus spine)."""
    fat = d.uniform(8.0, 30.0)
    muscle = Ellipsoid((0, 0, 0), (132, 97, LONG), power=2.4)
    cavity = Ellipsoid((0, 0, 0), (120, 85, LONG), power=2.6)
    spine = Csg((Ellipsoid((0, -78, 0), (46, 28, LONG)), Ellipsoid((0, -50, 0), (22, 19, LONG))))
    bone, marrow, mus = d.tissue("cortical_bone"), d.tissue("marrow"), d.tissue("muscle")
    ribs = Csg((muscle, Negate(cavity), HalfSpace((0, 0, 1), (0, 0, -40)),
                 Stripes(period=d.uniform(28, 36), width=11.0, slope=0.8, offset=d.uniform(0, 36)),
                 Negate(Ellipsoid((0, 97, 0), (45, 40, LONG)))), union=False)
    psoas = [d.path([(s * 30, -48, 30), (s * 36, -46, -30), (s * 42, -40, -140)]) for s in (-1, 1)]
    crura = [d.path([(s * 18 - 8, -30, 90), (s * 18 - 4, -38, 20), (s * 10, -42, -20)]) for s in (-1, 1)]
    out = [
        Structure(Ellipsoid((0, 0, 0), (132 + fat, 97 + 0.8 * fat, LONG), power=2.2), 0,
                   d.tissue("subcutaneous_fat"), texture_hu=10, clip=False),
        Structure(muscle, 0, mus, texture_hu=6, clip=False),
        Structure(cavity, 0, d.hu(0), texture_hu=20, clip=False),
        Structure(ribs, 0, bone, inner_hu=marrow, wall_mm=2, clip=False),
        *(Structure(Ellipsoid((s * 28, -81, 0), (22, 15, LONG)), 0, mus, clip=False) for s in (-1, 1)),
        *(Structure(Tube.through(p, [5, 14, 22]), 0, mus, clip=False) for p in psoas),
        *(Structure(Tube.through(p, 4.5), 0, mus, clip=False) for p in crura),
        Structure(Ellipsoid((0, -77, 0), (17, 13, LONG)), 0, 0.7 * bone, clip=False),
        Structure(Ellipsoid((0, -50, 0), (19, 16, LONG), power=2.3), 0, bone, inner_hu=marrow,
                   wall_mm=2.5, clip=False),
        *(Structure(Ellipsoid((0, -50, float(z)), (19.5, 16.5, 3.5)), 0, d.tissue("disc"), clip=False)
          for z in np.arange(-150.0, 150.0, 34.0) + d.uniform(0, 34)),
        Structure(Ellipsoid((0, -77, 0), (8, 7, LONG)), 0, d.tissue("csf"), clip=False),
        Structure(Ellipsoid((0, -92, 0), (5, 8, LONG)), 0, 0.7 * bone, clip=False),
        *(Structure(Ellipsoid(d.pos(s * 75, -30, 128, sd=6), (55, 62, 68)), 0, d.tissue("lung"),
                     texture_hu=40) for s in (-1, 1)),
        Structure(Ellipsoid(d.pos(-15, 25, 140, sd=6), (65, 52, 52)), 0, d.tissue("heart"), texture_hu=8),
    ]
    return out, Csg((cavity, Negate(spine)), union=False)


def _gut(d: Draw) -> list[Structure]:
    """Unlabelled colon, small-bowel loops and duodenum with organ-like walls (distractors)."""
    contrast = d.chance(0.2)  # positive oral contrast in the small bowel
    lumen = d.tissue("oral_contrast") if contrast else d.tissue("bowel_fluid")
    colon_ctrl = [(86, -10, -140), (86, -8, -70), (84, 0, -35), (72, 28, -20), (35, 62, -30), (-10, 66, -32),
                  (-55, 50, -20), (-85, 20, 5), (-95, -10, -20), (-95, -18, -140)]
    colon = Tube.through(d.path(colon_ctrl, sd=5),
                          np.array([22, 22, 22, 20, 18, 18, 18, 17, 16, 16]) * d.scale())
    out = [Structure(colon, 0, d.tissue("colon_wall"), inner_hu=d.tissue("colon_content"), wall_mm=3,
                      texture_hu=250)]
    for lo, hi, n in (((-70, -5, -140), (60, 60, -30), 14), ((-80, 0, -35), (-20, 40, 0), 6)):
        loop = Tube.through(_random_path(d, lo, hi, n=n, step=32.0), d.uniform(9.0, 12.0))
        wall = d.tissue("bowel_wall") + d.uniform(-12, 12)
        out.append(Structure(loop, 0, wall, inner_hu=lumen if contrast else d.uniform(5, 40),
                              wall_mm=d.uniform(2.5, 6.0)))
    duodenum = Tube.through(d.path([(24, 34, 4), (38, 22, 2), (48, 4, -6), (48, -4, -30), (44, -4, -52),
                                     (20, 2, -62), (-8, 4, -64), (-28, 4, -50), (-30, 10, -30)]), 10.5)
    out.append(Structure(duodenum, 0, d.tissue("bowel_wall"), inner_hu=lumen, wall_mm=3))
    return out


def _organs(d: Draw, kidneys: dict[int, tuple], hilum: tuple[float, float, float]) -> list[Structure]:
    """Liver (with intrahepatic veins), esophagus, stomach, spleen, gallbladder, kidneys."""
    liver = [Ellipsoid(d.pos(62, -4, 42), d.size(60, 70, 60), (d.uniform(-15, -5), -18, 0), power=2.3),
             Ellipsoid(d.pos(5, 38, 52), d.size(48, 30, 26), (15, 0, 0), power=2.2)]
    if d.chance(0.4):  # Riedel's lobe
        liver.append(Ellipsoid(d.pos(72, 5, -18), d.size(30, 38, 28)))
    ivc_top = d.pos(20, -10, 75)
    veins = [Tube.through([ivc_top, d.pos(*end, sd=8)], [5.0, 2.5]) for end in
             ((85, 5, 45), (50, 35, 50), (-15, 40, 60))]
    portal = [Tube.through([hilum, d.pos(*end, sd=8)], [5.0, 2.0]) for end in ((85, 0, 30), (0, 30, 40))]
    stomach = Tube.through(d.path([(-50, -8, 58), (-52, 12, 40), (-40, 38, 18), (-12, 52, 6), (12, 44, 4),
                                    (24, 34, 4)], sd=4), np.array([30, 30, 26, 20, 14, 10]) * d.scale())
    content = d.tissue("oral_contrast") if d.chance(0.15) else d.uniform(5, 50)
    air = Csg((Tube(stomach.points, stomach.radii - 5), HalfSpace((0, 1, 0), (0, d.uniform(20, 70), 0))),
               union=False)
    spleen_c, turn = d.pos(-88, -38, 42, sd=5), d.uniform(27, 43)
    notch = np.asarray(spleen_c) + 34 * rotation(turn)[:, 0]  # the concave hilar side faces medially
    spleen = Csg((Ellipsoid(spleen_c, d.size(22, 52, 48), (turn, 0, 0)),
                   Negate(Ellipsoid(tuple(notch), (22, 45, 45), (turn, 0, 0)))), union=False)
    eso_path = d.path([(-4, -14, 130), (-6, -12, 90), (-12, -7, 70), (-24, -4, 56), (-36, -5, 50)], sd=2)
    esophagus = Tube.through(eso_path, 9.0 * d.scale())
    pv = d.hu(10)
    out = [
        Structure(Csg(tuple(liver)), 6, d.hu(6), texture_hu=6),
        *(Structure(t, 6, d.hu(9) + 10, within=(6,)) for t in veins),
        *(Structure(t, 6, pv, within=(6,)) for t in portal),
        Structure(esophagus, 5, d.hu(5), inner_hu=-600.0 if d.chance(0.3) else None, wall_mm=5.5),
        Structure(stomach, 7, d.hu(7), inner_hu=content, wall_mm=5, texture_hu=25),
        Structure(air, 7, -1000.0, within=(7,)),
        Structure(spleen, 1, d.hu(1), texture_hu=4),
        Structure(Ellipsoid(d.pos(48, 38, -8), d.size(14, 16, 30), (d.uniform(-20, 20), 0, 35)), 4,
                   d.hu(4) + 25, inner_hu=d.hu(4), wall_mm=2),
    ]
    for label, (center, radii, side) in kidneys.items():
        hu, angles = d.hu(label), _kidney_angles(side)
        sinus = Ellipsoid(_kidney_point(center, side, (-side * (radii[0] - 3), 0, 0)), (10, 8, 16), angles)
        kidney = Csg((Ellipsoid(center, radii, angles), Negate(sinus)), union=False)
        out.append(Structure(kidney, label, hu + 15, inner_hu=hu - 20, wall_mm=6, texture_hu=5, halo_mm=8))
    return out


def _kidney_angles(side: float) -> tuple[float, float, float]:
    """Kidney rotation: hilum turned anteromedially, upper pole tilted medially (side +1: right)."""
    return (-side * 25.0, -side * 12.0, 0.0)


def _kidney_point(center: Sequence[float], side: float, local: Sequence[float]) -> tuple[float, float, float]:
    """Template position of a point given in the kidney's own frame."""
    return tuple((np.asarray(center) + rotation(*_kidney_angles(side)) @ np.asarray(local)).tolist())


def _retroperitoneum(d: Draw, kidneys: dict[int, tuple],
                     hilum: tuple[float, float, float]) -> list[Structure]:
    """Pancreas, unlabelled mesenteric/renal vessels, aorta, IVC, portal/splenic vein, adrenals."""
    pan = d.path([(30, 4, -24), (24, 8, -8), (8, 12, 0), (-15, 10, 8), (-42, 4, 15), (-64, -6, 22)])
    conf = pan[2] + (0, -12, 2)  # portal confluence, behind the pancreatic neck
    splenic = Tube.through([conf, pan[3] + (0, -11, 2), pan[4] + (0, -10, 2), pan[5] + (-6, -10, 4)],
                            5.0 * d.scale())
    portal = Tube.through([conf, (conf + np.asarray(hilum)) / 2 + (0, 2, 0), hilum], 7.0 * d.scale())
    art, vein = d.hu(8, 2.0), d.hu(10)
    ivc_hu = d.hu(9)
    renal_hila = {label: _kidney_point(c, side, (-side * (r[0] + 2), 0, 0))
                  for label, (c, r, side) in kidneys.items()}
    out = [Structure(Tube.through(pan, np.array([13, 15, 10, 11, 10, 8]) * d.scale()), 11, d.hu(11),
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
        out += [Structure(Tube.through(d.path(c, sd=2), r), 0, hu) for c, r, hu in unlabelled]
    aorta = [(-12, -22, -140), (-14, -22, -40), (-13, -24, 30), (-18, -30, 80), (-24, -34, 140)]
    ivc = [(20, -20, -140), (22, -18, -40), (24, -14, 20), (22, -10, 60), (18, -8, 130)]
    out += [
        Structure(Tube.through(d.path(aorta, sd=2), d.size(10, 10.5, 11, 12, 12.5)), 8, art, halo_mm=2),
        Structure(Tube.through(d.path(ivc, sd=2), d.size(11, 11, 11, 12, 12)), 9, ivc_hu),
        Structure(Csg((portal, splenic)), 10, vein),
    ]
    for center, radii, side in kidneys.values():
        top = _kidney_point(center, side, (0, 0, radii[2]))  # upper pole, medial and anterior of centre
        apex = np.asarray(d.pos(top[0] - side * 8, top[1] + 10, top[2] + 6, sd=4))
        turn, spread = d.uniform(-30, 30), d.uniform(15, 40)  # gland orientation, half-angle of the V
        limbs = []
        for s in (-1, 1):  # two thin limbs running back from an anterior apex (an inverted V or Y)
            radii, angle = (d.uniform(2.6, 3.4), d.uniform(9, 14), d.uniform(12, 20)), turn + s * spread
            center = apex - radii[1] * rotation(angle)[:, 1] + (0, 0, d.uniform(-4, 4))
            limbs.append(Ellipsoid(tuple(center), radii, (angle, 0, 0)))
        out.append(Structure(Csg(tuple(limbs)), 12, d.hu(12), halo_mm=3))
    return out


def anatomy(d: Draw) -> tuple[list[Structure], object]:
    """All structures of one case in painting order, and the organ region shape."""
    body, region = _body(d)
    gut = _gut(d) if d.config.distractors else []
    kidneys = {label: (d.pos(side * 60, -45, z), d.size(26, 21, 55), side)
               for label, side, z in ((2, 1.0, -24.0), (3, -1.0, -8.0))}  # right kidney (+x) lower
    hilum = d.pos(46, 2, 30)
    return [*body, *gut, *_organs(d, kidneys, hilum), *_retroperitoneum(d, kidneys, hilum)], region
