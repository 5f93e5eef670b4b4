"""Guard ablation: what each guard costs in gain on phantoms and what it saves on correct maps.

For each setting (all guards off, all on, and all on but one), on the same model and predictions:
mean Dice of raw vs refined on the demo's phantom test split (the gain), and the no-harm scores of
correct label maps (phantom ground truth at 3 spacings, and real FLARE22/WORD slabs if present).

    python benchmarks/guard_ablation.py --demo-dir demo_out [--model FILE] [--real N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from refnet.checkpoint import load_model
from refnet.data.btcv import find_cases, load_case, split_cases
from refnet.data.phantoms import PhantomConfig, make_phantom
from refnet.evaluate import dice_per_class, summarise
from refnet.guards import GUARD_NAMES, GuardConfig
from refnet.io import load_volume
from refnet.no_harm import no_harm_scores
from refnet.refine import RefineConfig, refine_labels
from refnet.segmenters import load_prediction_folder

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_labels"


def _settings() -> list[tuple[str, GuardConfig]]:
    rows = [("all off", GuardConfig.off()), ("all on (default)", GuardConfig())]
    rows += [(f"all on but {name.replace('_', ' ')}", replace(GuardConfig(), **{name: False})) for name in GUARD_NAMES]
    return rows


def _correct_maps(real: int) -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    maps = []
    for i, (s, z) in enumerate(((0.75, 2.5), (1.5, 1.0), (3.0, 5.0))):
        ph = make_phantom(200 + i, PhantomConfig(inplane_spacing_mm=(s, s), slice_spacing_mm=(z, z)))
        maps.append((f"phantom {s:g}x{z:g}", ph.labels, ph.affine, "refnet"))
    for scheme in ("flare22", "word"):
        for f in sorted((REAL_DIR / scheme).glob("*.nii.gz"))[:real]:
            vol = load_volume(f)
            maps.append((f.name, vol.array, vol.affine, scheme))
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", required=True, help="a finished `refnet demo` folder")
    parser.add_argument("--model", help="model file (default: DEMO_DIR/refnet.pt)")
    parser.add_argument("--real", type=int, default=2, help="real label maps per dataset (0: none)")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    demo = Path(args.demo_dir)
    model = load_model(args.model or demo / "refnet.pt")
    metrics = json.loads((demo / "metrics.json").read_text())
    cases = split_cases(find_cases(demo / "data"), "test")
    preds = load_prediction_folder(demo / "predictions" / metrics["raw_source"], [c.case_id for c in cases])
    data = [(load_case(c), preds[c.case_id]) for c in cases]
    correct = _correct_maps(args.real)
    raw = summarise([dice_per_class(p, t) for (_, t), p in data])["mean_dice"]
    print(f"phantom test split: raw mean Dice {raw:.4f} ({len(data)} cases); correct maps: {len(correct)}")
    print(f"{'setting':<34}{'refined':>9}{'gain %':>8}{'worst class':>12}"
          f"{'correct: min Dice':>19}{'mean':>8}{'invented':>9}{'new comp':>9}")
    rows = []
    for name, guards in _settings():
        config = RefineConfig(guards=guards)
        ref = [dice_per_class(refine_labels(p, ct.affine, model, config=config), t) for (ct, t), p in data]
        raws = [dice_per_class(p, t) for (_, t), p in data]
        summary = summarise(ref)
        worst = float(np.nanmin(np.nanmean(ref, axis=0) - np.nanmean(raws, axis=0)))
        harm = [no_harm_scores(lab, aff, model, scheme=sch, config=config) for _, lab, aff, sch in correct]
        row = {"setting": name, "refined_mean_dice": summary["mean_dice"],
               "gain_percent": round(100 * (summary["mean_dice"] - raw) / raw, 2),
               "worst_class_change": round(worst, 4),
               "correct_min_dice": min(h["mean_dice"] for h in harm),
               "correct_mean_dice": round(float(np.mean([h["mean_dice"] for h in harm])), 5),
               "invented": sum(len(h["invented_classes"]) for h in harm),
               "new_components": sum(h["new_components"] for h in harm)}
        rows.append(row)
        print(f"{name:<34}{row['refined_mean_dice']:>9.4f}{row['gain_percent']:>+8.2f}{worst:>+12.4f}"
              f"{row['correct_min_dice']:>19.4f}{row['correct_mean_dice']:>8.4f}{row['invented']:>9}"
              f"{row['new_components']:>9}", flush=True)
    Path(args.out).write_text(json.dumps({"raw_mean_dice": raw, "correct_maps": [c[0] for c in correct],
                                          "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
