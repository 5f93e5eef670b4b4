"""Choose the demo's RefNet training preset on development data only, then freeze it.

Trains RefNet variants on the base-model predictions of a finished (or interrupted after the base
models) ``refnet demo`` folder and scores each on data that no reported figure uses:
- the 5 held-out training phantoms (unseen by base models and RefNet): gain over raw, guards on;
- correct maps that must come back unchanged: the held-out phantoms' ground truth, development
  phantoms generated at clinical spacing (seeds 500+, none used by a test or benchmark), and
  development phantoms of atypical anatomy (twice the usual deformation and size variation, seeds 600+),
  a stand-in for real anatomy that is unlike the template;
- real manual label maps as a development set: the first 5 FLARE22 cases (FLARE22_Tr_0001-0005) of
  ../shared/data/real_labels, read there, never copied or trained on. Phantom ground truth alone
  cannot tell the variants apart: every variant passed it, including the previous model that fails
  on real WORD maps.
It never reads the demo's test split, WORD, or FLARE22 cases 0006-0050: those are the tests the
chosen preset is reported on (``refnet demo``, ``benchmarks/no_harm.py``).

The rule is "do no harm first, then gains" (the brief's order): among the variants with a positive
held-out gain that keep every phantom map >= 0.998 and every real development map >= 0.995 (the
no-harm bars), the one whose worst organ on the real development maps changes least; variants within
0.001 of that are equal, and among them the larger held-out gain wins. History, so the choice can be
judged: a first comparison used phantom maps alone and every variant passed; the real development
maps were added, and this rule written, after seeing the previous model's row on them (it passes the
bars, as it passed all 50 FLARE22 maps before, while failing on WORD) and before any other variant's.

    python benchmarks/preset_selection.py --demo-dir demo_out [--variants NAME ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
from refnet.data.phantoms import PhantomConfig, make_phantom
from refnet.io import load_volume
from refnet.no_harm import no_harm_scores
from refnet.pairs import load_training_pairs
from refnet.pipeline import DemoConfig, extra_anatomy_maps
from refnet.train import train_refnet

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_labels"
DEV_SPACINGS = ((0.8, 3.0), (0.8, 2.5), (1.0, 5.0))  # (in-plane, slice) mm of the development phantoms


# Extra anatomy at the slice spacings of clinical CT (the demo's own phantoms have 4-5 mm slices).
THIN = PhantomConfig(inplane_spacing_mm=(1.4, 1.6), slice_spacing_mm=(2.5, 3.5), deform_mm=16.0, shape_jitter=1.6)


def _variants() -> dict[str, tuple[object, int, object]]:
    """name -> (TrainConfig, extra-anatomy maps, their PhantomConfig or None for the default)."""
    base = replace(DemoConfig().train, simulated_pairs=0)  # the preset before this selection
    return {
        "previous": (base, 0, None),
        "simulated": (replace(base, simulated_pairs=3), 0, None),
        "simulated_w05": (replace(base, simulated_pairs=3, raw_weight=0.5), 0, None),
        "simulated_anatomy": (replace(base, simulated_pairs=3), 20, None),
        "simulated_anatomy_w05": (replace(base, simulated_pairs=3, raw_weight=0.5), 20, None),
        "simulated_plausible": (replace(base, simulated_pairs=3, plausible_pairs=2), 0, None),
        "simulated_anatomy_plausible": (replace(base, simulated_pairs=3, plausible_pairs=2), 20, None),
        "anatomy_thin": (replace(base, simulated_pairs=0), 20, THIN),
        "simulated_anatomy_thin": (replace(base, simulated_pairs=3), 20, THIN),
    }


def _dev_maps() -> list[tuple[str, np.ndarray, np.ndarray]]:
    maps = []
    for i, (s, z) in enumerate(DEV_SPACINGS):
        ph = make_phantom(500 + i, PhantomConfig(inplane_spacing_mm=(s, s), slice_spacing_mm=(z, z)))
        maps.append((f"dev phantom {s:g}x{z:g}", ph.labels, ph.affine))
    for i, (s, z) in enumerate(DEV_SPACINGS[:2]):
        ph = make_phantom(600 + i, PhantomConfig(inplane_spacing_mm=(s, s), slice_spacing_mm=(z, z),
                                                 deform_mm=16.0, shape_jitter=1.6))
        maps.append((f"dev atypical {s:g}x{z:g}", ph.labels, ph.affine))
    return maps


def _real_dev_maps(real_dir: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    files = [real_dir / "flare22" / f"FLARE22_Tr_{i:04d}.nii.gz" for i in range(1, 6)]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise SystemExit(f"{missing[0]} not found; pass --real-dir (the folder with flare22/).")
    return [(f.name.replace(".nii.gz", ""), *_flare(f)) for f in files]


def _flare(path: Path) -> tuple[np.ndarray, np.ndarray]:
    vol = load_volume(path)
    return vol.array, vol.affine


def choose(rows: list[dict]) -> str | None:
    """The variant the rule in the module docstring picks (None if no variant passes)."""
    ok = [r for r in rows if r["held_out_gain_percent"] > 0 and r["correct_min_dice"] >= 0.998
          and r["real_dev_min_dice"] >= 0.995]
    if not ok:
        return None
    best = max(r["real_dev_min_organ"] for r in ok)
    tied = [r for r in ok if r["real_dev_min_organ"] >= best - 0.001]
    return max(tied, key=lambda r: r["held_out_gain_percent"])["variant"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", required=True, help="a `refnet demo` folder with data/ and predictions/")
    parser.add_argument("--variants", nargs="*", help=f"which (default all): {sorted(_variants())}")
    parser.add_argument("--real-dir", default=str(REAL_DIR), help="folder with flare22/ (default ../shared/...)")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    demo = Path(args.demo_dir)
    folders = sorted((demo / "predictions").iterdir())
    pairs = load_training_pairs(demo / "data", folders)
    dev = _dev_maps()
    real_dev = _real_dev_maps(Path(args.real_dir))
    rows = []
    for name, (config, extra, extra_config) in _variants().items():
        if args.variants and name not in args.variants:
            continue
        model = train_refnet(pairs, config, work_dir=demo / f"selection_{name}", output=demo / f"selection_{name}.pt",
                             extra_maps=extra_anatomy_maps(extra, config=extra_config))
        gated = model.metadata["validation_gated"]
        val_pairs = {p.case_id: p for p in pairs if p.case_id in model.metadata["training"]["val_cases"]}
        truth = [(f"held-out {c}", p.target, p.affine) for c, p in val_pairs.items()]
        harm = {n: no_harm_scores(lab, aff, model) for n, lab, aff in truth + dev}
        real = {n: no_harm_scores(lab, aff, model, scheme="flare22") for n, lab, aff in real_dev}
        raw, ref = gated["raw"]["mean_dice"], gated["refined"]["mean_dice"]
        row = {"variant": name, "held_out_raw": raw, "held_out_refined": ref,
               "held_out_gain_percent": round(100 * (ref - raw) / raw, 2),
               "thresholds": model.metadata["guards"]["class_thresholds"],
               "correct_min_dice": min(h["mean_dice"] for h in harm.values()),
               "correct_min_organ": min(h["min_dice"] for h in harm.values()),
               "correct_mean_dice": round(float(np.mean([h["mean_dice"] for h in harm.values()])), 5),
               "real_dev_min_dice": min(h["mean_dice"] for h in real.values()),
               "real_dev_min_organ": min(h["min_dice"] for h in real.values()),
               "real_dev_mean_dice": round(float(np.mean([h["mean_dice"] for h in real.values()])), 5),
               "real_dev_changed_percent": round(100 * float(np.mean([h["changed_fraction"]
                                                                     for h in real.values()])), 4),
               "correct_maps": {n: h["mean_dice"] for n, h in {**harm, **real}.items()}}
        rows.append(row)
        Path(args.out).write_text(json.dumps({"dev_spacings": DEV_SPACINGS, "rows": rows}, indent=2) + "\n")
        print(f"{name:<16} held-out {raw:.4f} -> {ref:.4f} ({row['held_out_gain_percent']:+.2f}%); correct maps: "
              f"min {row['correct_min_dice']:.4f}, worst organ {row['correct_min_organ']:.4f}, "
              f"mean {row['correct_mean_dice']:.4f}; real dev: min {row['real_dev_min_dice']:.4f}, worst organ "
              f"{row['real_dev_min_organ']:.4f}, mean {row['real_dev_mean_dice']:.4f}, changed "
              f"{row['real_dev_changed_percent']:.3f}%", flush=True)
    chosen = choose(rows)
    print(f"chosen by the rule: {chosen}")
    Path(args.out).write_text(json.dumps({"dev_spacings": DEV_SPACINGS, "rows": rows, "chosen": chosen},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
