"""Which RefNet training change could close the gap to cleanup? Variants of the preset on one dev seed.

The quality benchmark's RefNets gain a few tenths of a percent where per-class largest component gains
over one percent (README, "Quality"). This script tries training changes aimed at that gap on a
*development* seed's base-model predictions (seed 10 by default: never one of the quality benchmark's
test seeds 11-15), each variant trained from scratch on the same out-of-fold pairs, and scores each on
that seed's test cases with all guards on. It also measures what the gap is made of: the "island oracle"
(raw with every connected component that does not touch its organ's ground truth removed: the most any
component-level cleanup could gain) and, per variant, the share of those island voxels the net removes
with its guards on and with all of them off.

    python benchmarks/quality.py --out q_dev --quick --seeds 10 --methods raw cleanup refnet_label
    python benchmarks/refnet_variants.py --base q_dev/seed10 --out variants_out [--variants NAME ...]

Each variant works in ``OUT/NAME`` (copies of the base folder's phantoms, base models and predictions; a
rerun reuses finished variants: ``OUT/NAME/variant.json``). Prints a table and writes
``OUT/refnet_variants.json`` (every variant finished in OUT, so parallel invocations on disjoint
``--variants`` add up, and the largest islands of the raw test maps).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ISLANDS = {"island_prob": 0.5, "hole_prob": 0.3, "blob_mm": (3.0, 15.0), "island_gap_mm": (10.0, 60.0)}
VARIANTS: dict[str, dict[str, Any]] = {  # training overrides of the quality preset (--quick: 10 epochs)
    "preset": {},
    "components": {"model": {"component_channel": True}},
    "error_crops": {"error_fraction": 0.5},
    "components_error_crops": {"error_fraction": 0.5, "model": {"component_channel": True}},
    "error_crops_far_islands": {"error_fraction": 0.5, "errors": ISLANDS},
    "components_error_crops_far_islands": {"error_fraction": 0.5, "errors": ISLANDS,
                                           "model": {"component_channel": True}},
    "crop160": {"crop_size": 160, "batch_size": 8},
    "components_crop160": {"crop_size": 160, "batch_size": 8, "model": {"component_channel": True}},
    # added after the census above found kidney pieces on the wrong side: the body side as input
    "position": {"model": {"position_channels": True}},
    "components_position": {"model": {"component_channel": True, "position_channels": True}},
}


def train_config(base: Any, overrides: dict[str, Any]) -> Any:
    """The preset's TrainConfig with a variant's overrides (``errors`` and ``model`` merged field-wise)."""
    from refnet.error_simulator import ErrorConfig

    over = dict(overrides)
    model = replace(base.model, **over.pop("model", {}))
    if "errors" in over:
        over["errors"] = ErrorConfig(**over["errors"])
    return replace(base, model=model, **over)


def _islands(raw: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Voxels of raw components (26-connected, per organ) that share no voxel with that organ's ground truth."""
    from scipy import ndimage

    out = np.zeros(raw.shape, bool)
    for cls in np.unique(raw[raw > 0]):
        parts, count = ndimage.label(raw == cls, structure=np.ones((3, 3, 3)))
        touches = np.bincount(parts[(target == cls) & (parts > 0)], minlength=count + 1) > 0
        bad = ~touches
        bad[0] = False
        out |= bad[parts]
    return out


def _raw_test_maps(folder: Path) -> tuple[list[Any], dict[int, np.ndarray]]:
    """A quality.py seed folder's test cases and its raw base model's predictions of them."""
    from refnet.data.btcv import find_cases, split_cases
    from refnet.io import read_affine
    from refnet.segmenters import load_prediction_folder

    run = json.loads((folder / "run.json").read_text())
    test = split_cases(find_cases(folder / "data"), "test")
    raw = load_prediction_folder(folder / "predictions" / run["raw_source"], [c.case_id for c in test],
                                 affines={c.case_id: read_affine(c.image) for c in test})
    return test, raw


def island_census(folder: Path, top: int = 6) -> list[dict[str, Any]]:
    """The largest islands of the raw test maps: organ, what the ground truth has there, size."""
    from refnet.data.btcv import load_case
    from refnet.labels import CLASS_NAMES
    from scipy import ndimage

    test, raw = _raw_test_maps(folder)
    found = []
    for case in test:
        target = load_case(case)[1]
        pred = raw[case.case_id]
        for cls in np.unique(pred[pred > 0]):
            parts, count = ndimage.label(pred == cls, structure=np.ones((3, 3, 3)))
            sizes = np.bincount(parts.ravel())[1:]
            for n in range(1, count + 1):
                under = target[parts == n]
                if not (under == cls).any():
                    found.append({"case": case.case_id, "organ": CLASS_NAMES[cls],
                                  "truth_there": CLASS_NAMES[int(np.bincount(under).argmax())],
                                  "voxels": int(sizes[n - 1]),
                                  "of_largest_piece": round(float(sizes[n - 1] / sizes.max()), 3)})
    return sorted(found, key=lambda r: -r["voxels"])[:top]


def diagnose(folder: Path) -> dict[str, Any]:
    """Island oracle Dice and the share of island voxels the variant's model removes, guards on and off."""
    from refnet.checkpoint import load_model
    from refnet.data.btcv import load_case
    from refnet.evaluate import dice_per_class
    from refnet.guards import GuardConfig
    from refnet.refine import RefineConfig, refine_labels

    test, raw = _raw_test_maps(folder)
    model = load_model(folder / "refnet_label.pt")
    raw_d, oracle_d, off_d, islands, removed = [], [], [], 0, {"guards on": 0, "guards off": 0}
    for case in test:
        ct, target = load_case(case)
        pred = raw[case.case_id]
        isl = _islands(pred, target)
        oracle = np.where(isl, 0, pred)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            raw_d.append(float(np.nanmean(dice_per_class(pred, target))))
            oracle_d.append(float(np.nanmean(dice_per_class(oracle, target))))
            islands += int(isl.sum())
            for name, guards in (("guards on", GuardConfig()), ("guards off", GuardConfig.off())):
                out = refine_labels(pred, ct.affine, model, config=RefineConfig(guards=guards))
                removed[name] += int((isl & (out != pred)).sum())
                if name == "guards off":
                    off_d.append(float(np.nanmean(dice_per_class(out, target))))
    return {"island_voxels": islands,
            "island_oracle_gain_percent": round(100 * (np.mean(oracle_d) - np.mean(raw_d)) / np.mean(raw_d), 3),
            "unguarded_gain_percent": round(100 * (np.mean(off_d) - np.mean(raw_d)) / np.mean(raw_d), 3),
            "islands_removed": {k: round(v / max(1, islands), 4) for k, v in removed.items()}}


def run_variant(base: Path, out: Path, name: str) -> dict[str, Any]:
    """Train one variant on the base folder's pairs and score it (reused when ``OUT/NAME/run.json`` exists)."""
    from refnet.quality import QualityConfig, run_quality, summarise_quality

    folder = out / name
    result = folder / "variant.json"
    if result.exists():
        return json.loads(result.read_text())
    done = folder / "run.json"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        for sub in ("data", "predictions", "segmenters"):
            if not (folder / sub).exists():
                shutil.copytree(base / sub, folder / sub)
        config = QualityConfig.quick()
        tc = train_config(config.demo.train, VARIANTS[name])
        config = replace(config, demo=replace(config.demo, train=tc), methods=("raw", "cleanup", "refnet_label"))
        seed = json.loads((base / "run.json").read_text())["seed"]
        done.write_text(json.dumps(run_quality(folder, config, seed=seed)) + "\n")
    run = json.loads(done.read_text())
    summary = summarise_quality([run])
    scores = {"seed": run["seed"], "overrides": VARIANTS[name],
              "mean_dice": {m: summary[m]["mean_dice"] for m in ("raw", "cleanup", "refnet_label")},
              "gain_percent": {m: summary["gains"][m]["gain_percent_mean"] for m in ("cleanup", "refnet_label")},
              "worst_organ_change": summary["gains"]["refnet_label"]["worst_organ_change"],
              **diagnose(folder)}
    result.write_text(json.dumps(scores) + "\n")
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a seed folder of a quality.py run (a development seed)")
    parser.add_argument("--out", required=True, help="working and output folder")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="a subset (default all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    base, out = Path(args.base), Path(args.out)
    if not (base / "run.json").exists():
        raise SystemExit(f"{base} holds no finished quality.py seed (run.json); run benchmarks/quality.py first.")
    results = {name: run_variant(base, out, name) for name in (args.variants or VARIANTS)}
    path = out / "refnet_variants.json"  # every finished variant in OUT, also those of other invocations
    finished = {n: json.loads((out / n / "variant.json").read_text()) for n in VARIANTS
                if (out / n / "variant.json").exists()}
    census = island_census(base)
    path.write_text(json.dumps({"largest_islands": census, "variants": finished}, indent=2) + "\n")
    first = next(iter(results.values()))
    print(f"seed {first['seed']}: raw {first['mean_dice']['raw']:.4f}, cleanup"
          f" {first['gain_percent']['cleanup']:+.2f}%, island oracle {first['island_oracle_gain_percent']:+.2f}%")
    print(f"{'variant':<38}{'gain':>8}{'unguarded':>11}{'worst organ':>13}{'islands removed':>17}{'(off)':>8}")
    for name, r in results.items():
        print(f"{name:<38}{r['gain_percent']['refnet_label']:>+7.2f}%{r['unguarded_gain_percent']:>+10.2f}%"
              f"{r['worst_organ_change']:>+13.4f}{r['islands_removed']['guards on']:>17.1%}"
              f"{r['islands_removed']['guards off']:>8.1%}")
    print("largest raw islands (organ drawn where the ground truth has another):")
    for r in census:
        print(f"  case {r['case']}: {r['organ']} on {r['truth_there']}, {r['voxels']} voxels "
              f"({r['of_largest_piece']:.0%} of the organ's largest piece)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
