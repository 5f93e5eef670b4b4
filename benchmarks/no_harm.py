"""No-harm check: refine correct label maps and measure how much the refiner changes them.

(a) Phantom ground truth generated at 0.75, 1.5 and 3 mm in-plane and 1, 2.5 and 5 mm slices;
(b) real manual label maps (FLARE22, WORD) in ../shared/data/real_labels, at their native spacing,
read through the flare22 / word label schemes (structures RefNet lacks pass through); FLARE22 cases
0001-0005 are reported apart as ``flare22_dev`` (the preset was chosen on them). Bars (issue
"Do no harm"): mean organ Dice against the input >= 0.998 (phantoms) and >= 0.995 (real), no
invented class, no new component. Optionally the same with every guard off, for the ablation.

``--crops`` adds, per real map, parts of it as a user may load them (each again a correct map, with the
same bars, reported as ``<group>_crops``): the top and bottom 4 labelled slices, 4-slice slabs at 20, 40,
60 and 80% of the labelled range (a short scan range that cuts organs) and the right and left halves
(an in-plane region of interest cut through the midline). ``--random-crops N`` adds N seeded random parts
per map (a slab of 1-8 slices, an in-plane cut at 20-80% along x or y, or both), reported as
``<group>_random``; with ``--dev-only`` only the development maps run (to choose a rule on them).

    python benchmarks/no_harm.py [--model FILE] [--pieces FILE] [--real-dir DIR] [--limit N]
        [--phantoms-only] [--guards-off] [--crops] [--random-crops N] [--dev-only]
        [--out benchmarks/no_harm.json]

``--pieces`` applies a piece decider (refnet.pieces, e.g. a quality benchmark seed's ``pieces.pt``) after
the refiner, as the pipeline would. A decider (or model) that reads the CT gets the phantoms' CT; the real
maps have none, so it runs with ``--phantoms-only``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import zlib
from pathlib import Path

import numpy as np
from refnet.checkpoint import load_model
from refnet.data.phantoms import PhantomConfig, make_phantom
from refnet.geometry import canonical_affine, to_canonical
from refnet.guards import GuardConfig
from refnet.io import load_volume
from refnet.labels import to_class_labels
from refnet.no_harm import no_harm_scores
from refnet.pieces import PieceDecider
from refnet.refine import RefineConfig

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_labels"
INPLANE_MM = (0.75, 1.5, 3.0)
SLICE_MM = (1.0, 2.5, 5.0)
BARS = {"phantom": 0.998, "flare22_dev": 0.995, "flare22": 0.995, "word": 0.995}
BARS.update({f"{group}_{kind}": bar for group, bar in list(BARS.items()) for kind in ("crops", "random")})
SLAB = 4  # slices of each slab crop
# benchmarks/preset_selection.py chose the demo preset on these; reported apart from the untouched rest.
DEV_CASES = {f"FLARE22_Tr_{i:04d}" for i in range(1, 6)}


def _cases(args):
    for i, (s, z) in enumerate((s, z) for s in INPLANE_MM for z in SLICE_MM):
        yield "phantom", f"phantom {s:g} mm x {z:g} mm", "refnet", lambda s=s, z=z, i=i: _phantom(i, s, z)
    if args.phantoms_only:
        return
    for scheme in ("flare22", "word"):
        files = sorted((Path(args.real_dir) / scheme).glob("*.nii.gz"))[: args.limit or None]
        for f in files:
            name = f.name.replace(".nii.gz", "")
            group = "flare22_dev" if name in DEV_CASES else scheme  # seen while choosing the preset
            if args.dev_only and group != "flare22_dev":
                continue
            yield group, name, scheme, lambda f=f: _file(f)
            if args.crops:
                for part in CROPS:
                    yield (f"{group}_crops", f"{name} {part}", scheme,
                           lambda f=f, part=part, scheme=scheme: _crop(*_file(f), part, scheme))
            for k in range(args.random_crops):
                yield (f"{group}_random", f"{name} rand{k}", scheme,
                       lambda f=f, k=k, name=name, scheme=scheme: _crop(*_file(f), _random_part(name, k), scheme))


CROPS = ("top", "bottom", "z20", "z40", "z60", "z80", "right", "left")


def _random_part(name: str, k: int) -> dict:
    """The k-th random part of map ``name`` (seeded by both, so every run cuts the same parts)."""
    rng = np.random.default_rng([zlib.crc32(name.encode()), k])
    kind = rng.choice(("slab", "cut", "both"))
    part: dict = {}
    if kind in ("slab", "both"):
        part["slices"] = int(rng.integers(1, 9))
        part["at"] = float(rng.uniform(0, 1))
    if kind in ("cut", "both"):
        part["axis"] = int(rng.integers(0, 2))
        part["cut"] = float(rng.uniform(0.2, 0.8))
        part["side"] = str(rng.choice(("low", "high")))
    return part


def _crop(labels: np.ndarray, affine: np.ndarray, part: str | dict, scheme: str = "refnet"):
    """A part of a map (canonical RAS, :data:`CROPS` or a :func:`_random_part`) with the affine of its first
    voxel; the slabs are placed in the range of RefNet's organs (WORD's lowest slices hold only bladder and
    femoral heads)."""
    canon, _ = to_canonical(np.asarray(labels), affine)
    ca = canonical_affine(affine, np.shape(labels))
    z = np.flatnonzero(to_class_labels(canon, scheme)[0].any(axis=(0, 1)))
    lo, hi = int(z[0]), int(z[-1]) + 1
    box = [slice(None)] * 3
    if isinstance(part, dict):
        if "slices" in part:
            width = min(part["slices"], hi - lo)
            start = lo + int(part["at"] * (hi - lo - width))
            box[2] = slice(start, start + width)
        if "axis" in part:
            n = canon.shape[part["axis"]]
            cut = int(part["cut"] * n)
            box[part["axis"]] = slice(0, cut) if part["side"] == "low" else slice(cut, n)
    elif part == "top":
        box[2] = slice(max(lo, hi - SLAB), hi)
    elif part == "bottom":
        box[2] = slice(lo, min(hi, lo + SLAB))
    elif part.startswith("z"):
        start = lo + int(int(part[1:]) / 100 * (hi - lo))
        box[2] = slice(start, min(hi, start + SLAB))
    else:  # RAS+: the index along axis 0 grows towards the patient's right
        mid = canon.shape[0] // 2
        box[0] = slice(mid, canon.shape[0]) if part == "right" else slice(0, mid)
    crop = np.ascontiguousarray(canon[tuple(box)])
    starts = np.array([b.start or 0 for b in box], dtype=np.float64)
    out = ca.copy()
    out[:3, 3] = ca[:3, 3] + ca[:3, :3] @ starts
    return crop, out


def _phantom(seed: int, inplane: float, slices: float):
    config = PhantomConfig(inplane_spacing_mm=(inplane, inplane), slice_spacing_mm=(slices, slices))
    ph = make_phantom(100 + seed, config)
    return ph.labels, ph.affine, ph.ct


@functools.lru_cache(maxsize=1)  # a map's crops read it once
def _file(path: Path):
    vol = load_volume(path)
    return vol.array, vol.affine


def _dropped(scores: dict) -> int:
    """Pieces a case lost to the model's own decider and to a ``--pieces`` one."""
    return sum(d["pieces"] for d in scores["dropped_pieces"].values()) + (scores["pieces_dropped"] or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="RefNet model file (default: the shipped model)")
    parser.add_argument("--real-dir", default=str(REAL_DIR), help="folder with flare22/ and word/")
    parser.add_argument("--limit", type=int, default=0, help="real cases per dataset (0: all)")
    parser.add_argument("--phantoms-only", action="store_true")
    parser.add_argument("--guards-off", action="store_true", help="every guard off (ablation)")
    parser.add_argument("--pieces", help="piece decider file applied after the refiner (refnet.pieces)")
    parser.add_argument("--crops", action="store_true",
                        help="also refine parts of each real map: slabs and halves (see above)")
    parser.add_argument("--random-crops", type=int, default=0, metavar="N",
                        help="also refine N seeded random parts of each real map (see above)")
    parser.add_argument("--dev-only", action="store_true", help="real maps: only the development cases")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    model = load_model(args.model, device=args.device)
    config = RefineConfig(guards=GuardConfig.off() if args.guards_off else GuardConfig())
    decider = PieceDecider.load(args.pieces) if args.pieces else None
    if (model.uses_ct or (decider is not None and decider.uses_ct)) and not args.phantoms_only:
        parser.error("this model or decider reads the CT, and the real label maps come without one; "
                     "add --phantoms-only (the phantoms have their CT).")
    rows = []
    print(f"{'group':<12}{'case':<26}{'mean Dice':>10}{'min Dice':>10}{'changed %':>10}{'invented':>9}"
          f"{'new comp':>9}{'dropped':>8}{'s':>6}  worst organ (voxels)")
    for group, name, scheme, load in _cases(args):
        labels, affine, *ct = load()
        t0 = time.perf_counter()
        scores = no_harm_scores(labels, affine, model, scheme=scheme, config=config, pieces=decider,
                                ct=ct[0] if ct else None)
        seconds = time.perf_counter() - t0
        if scores["mean_dice"] is None:  # none of RefNet's organs in it: nothing to score
            print(f"{group:<12}{name:<26} no RefNet organ, skipped", flush=True)
            continue
        rows.append({"group": group, "case": name, "seconds": round(seconds, 1), **scores})
        dropped, worst = _dropped(scores), scores["worst_organ"]
        print(f"{group:<12}{name:<26}{scores['mean_dice']:>10.4f}{scores['min_dice']:>10.4f}"
              f"{100 * scores['changed_fraction']:>10.3f}{len(scores['invented_classes']):>9}"
              f"{scores['new_components']:>9}{dropped:>8}{seconds:>6.1f}  {worst['name']} ({worst['voxels']})",
              flush=True)
    summary = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        sel = [r for r in rows if r["group"] == group]
        worst = min(r["mean_dice"] for r in sel)
        summary[group] = {"cases": len(sel), "worst_mean_dice": worst, "mean_mean_dice": round(float(np.mean(
            [r["mean_dice"] for r in sel])), 5), "invented": sum(len(r["invented_classes"]) for r in sel),
            "new_components": sum(r["new_components"] for r in sel), "bar": BARS[group],
            "pieces_dropped": sum(_dropped(r) for r in sel),
            "passes": worst >= BARS[group] and not any(r["invented_classes"] or r["new_components"] for r in sel)}
    print()
    for group, s in summary.items():
        print(f"{group:<12} {s['cases']:>3} cases: worst mean Dice {s['worst_mean_dice']:.4f} (bar {s['bar']}), "
              f"average {s['mean_mean_dice']:.4f}, invented {s['invented']}, new components {s['new_components']}, "
              f"pieces dropped {s['pieces_dropped']}: "
              f"{'PASS' if s['passes'] else 'FAIL'}")
    Path(args.out).write_text(json.dumps({"model": args.model or "shipped", "pieces": args.pieces,
                                          "model_has_piece_decider": model.pieces is not None,
                                          "guards_off": args.guards_off, "crops": args.crops,
                                          "random_crops": args.random_crops, "dev_only": args.dev_only,
                                          "summary": summary, "cases": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
