"""How the edge guard's depth was chosen: cropped correct maps of the development cases only.

The edge guard (``refnet.guards.limit_at_cut_edges``) freezes the voxels within ``edge_mm`` of an image
edge that cuts an organ. Its depth is chosen here on FLARE22 0001-0005 (the development maps of the
no-harm check, ``benchmarks/no_harm.py``): the whole maps, their eight fixed crops and 40 seeded random
crops each. The net runs once per map; each candidate depth is then applied to the same proposal, so
the rows differ only by the guard. Rule, fixed before the run: the smallest depth with which every
development map and crop meets the no-harm bar (mean organ Dice against the input >= 0.995). The
untouched maps (FLARE22 0006-0050, WORD) are scored afterwards with ``benchmarks/no_harm.py --crops
--random-crops 40``, with the chosen depth frozen.

    python benchmarks/edge_guard_selection.py [--random-crops 40] [--out benchmarks/edge_guard_selection.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from no_harm import BARS, CROPS, DEV_CASES, REAL_DIR, _crop, _file, _random_part
from refnet.checkpoint import load_model
from refnet.geometry import canonical_affine, to_canonical
from refnet.guards import GuardConfig
from refnet.labels import NUM_CLASSES, to_class_labels
from refnet.refine import RefineConfig, _drop_pieces, apply_guards, propose
from refnet.spacing import voxel_spacing

CANDIDATES_MM = (0.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0)  # 0: the guard off


def _scores(labels: np.ndarray, affine: np.ndarray, model, depths) -> dict[float, tuple[float, float]] | None:
    """Mean and min organ Dice against the input per candidate depth (None: no RefNet organ)."""
    canon, _ = to_canonical(labels, affine)
    canon = np.asarray(canon)
    counts = np.bincount(canon.ravel(), minlength=NUM_CLASSES)
    present = counts[1:] > 0
    if not present.any():
        return None
    spacing = voxel_spacing(canonical_affine(affine, labels.shape))
    proposal = propose(canon, spacing, model, config=RefineConfig())
    out = {}
    for depth in depths:
        guards = replace(GuardConfig(), edge=depth > 0, edge_mm=depth or None)
        box, _ = apply_guards(proposal, model, guards)
        if model.pieces is not None:
            box, _ = _drop_pieces(box, spacing, model.pieces, list(proposal.edges))
        # Dice from the changes alone (outside the box nothing changes): a one-hot Dice of the whole
        # volume per candidate would cost more than the net
        diff = box != proposal.raw
        lost = np.bincount(proposal.raw[diff], minlength=NUM_CLASSES)
        gained = np.bincount(box[diff], minlength=NUM_CLASSES)
        dice = 2 * (counts - lost) / np.maximum(1, 2 * counts - lost + gained)
        organs = dice[1:][present]
        out[depth] = (float(np.mean(organs)), float(np.min(organs)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-crops", type=int, default=40)
    parser.add_argument("--real-dir", default=str(REAL_DIR))
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    model = load_model(None)
    rows = []
    for f in sorted((Path(args.real_dir) / "flare22").glob("*.nii.gz")):
        name = f.name.replace(".nii.gz", "")
        if name not in DEV_CASES:
            continue
        parts = [None, *CROPS, *(_random_part(name, k) for k in range(args.random_crops))]
        for k, part in enumerate(parts):
            labels, affine = _file(f) if part is None else _crop(*_file(f), part, "flare22")
            classes, _ = to_class_labels(np.asarray(labels), "flare22")
            got = _scores(classes, affine, model, CANDIDATES_MM)
            if got is None:
                continue
            label = "whole" if part is None else part if isinstance(part, str) else f"rand{k - 1 - len(CROPS)}"
            rows.append({"case": f"{name} {label}", "part": part,
                         "mean_dice": {str(d): round(v[0], 5) for d, v in got.items()},
                         "min_dice": {str(d): round(v[1], 5) for d, v in got.items()}})
            print(f"{name} {label:<8}" + "".join(f"{got[d][0]:>9.4f}" for d in CANDIDATES_MM), flush=True)
    bar = BARS["flare22_dev"]
    summary = {}
    print(f"\n{'edge_mm':>8}{'cases':>7}{'below bar':>10}{'worst':>9}{'average':>9}")
    for d in CANDIDATES_MM:
        means = np.array([r["mean_dice"][str(d)] for r in rows])
        summary[str(d)] = {"cases": len(rows), "below_bar": int((means < bar).sum()),
                           "worst_mean_dice": float(means.min()), "average_mean_dice": round(float(means.mean()), 5)}
        s = summary[str(d)]
        print(f"{d:>8g}{s['cases']:>7}{s['below_bar']:>10}{s['worst_mean_dice']:>9.4f}{s['average_mean_dice']:>9.4f}")
    passing = [d for d in CANDIDATES_MM if summary[str(d)]["below_bar"] == 0]
    chosen = min(passing) if passing else None
    print(f"\nchosen edge_mm (smallest with every development map and crop at the bar {bar}): {chosen}")
    Path(args.out).write_text(json.dumps({"rule": "smallest depth with no development map or crop below the bar",
                                          "bar": bar, "candidates_mm": CANDIDATES_MM, "chosen_mm": chosen,
                                          "summary": summary, "cases": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
