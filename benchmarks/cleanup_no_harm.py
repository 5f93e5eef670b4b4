"""Would the classical cleanup harm correct real anatomy? Each step, per organ, on real manual label maps.

The quality benchmark shows per-class largest-component and hole filling (nnU-Net's post-processing,
:mod:`refnet.cleanup`) gaining more than the guarded RefNet on phantom base models, whose organs are
one piece each. Real manual maps are not always: both adrenals share one class, and a pancreas or a
vein can be drawn in pieces. Before cleanup may join the shipped pipeline it must pass the no-harm bar
on correct maps, as RefNet does. This applies each step alone to each organ of each real map in
``../shared/data/real_labels`` (FLARE22, WORD; read through their label schemes) and reports per organ
and step the worst Dice of the cleaned map against the map itself and how many maps it changed.
Nothing here trains on those maps (their terms allow testing only).

    python benchmarks/cleanup_no_harm.py [--limit N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from refnet.cleanup import CLEANUP_STEPS, clean_class
from refnet.guards import labelled_extent
from refnet.io import load_volume
from refnet.labels import CLASS_NAMES, NUM_CLASSES, to_class_labels

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_labels"
BAR = 0.995  # the no-harm bar of a real map (benchmarks/no_harm.py)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def score_map(classes: np.ndarray) -> dict[str, dict[str, float]]:
    """Per step and present organ: Dice of the organ after the step against before (1.0: unchanged)."""
    out: dict[str, dict[str, float]] = {step: {} for step in CLEANUP_STEPS}
    for cls in range(1, NUM_CLASSES):
        mask = classes == cls
        if not mask.any():
            continue
        # the organ's box plus one voxel, as clean_class itself works: the same result, without whole-volume copies
        box = tuple(slice(max(0, lo - 1), hi + 1) for lo, hi in labelled_extent(mask))
        crop, before = classes[box], mask[box]
        for step in CLEANUP_STEPS:
            out[step][CLASS_NAMES[cls]] = round(_dice(before, clean_class(crop, cls, step) == cls), 5)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-dir", default=str(REAL_DIR), help="folder with flare22/ and word/")
    parser.add_argument("--limit", type=int, default=0, help="maps per dataset (0: all)")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    cases = []
    for scheme in ("flare22", "word"):
        for f in sorted((Path(args.real_dir) / scheme).glob("*.nii.gz"))[: args.limit or None]:
            classes, _ = to_class_labels(np.asarray(load_volume(f).array), scheme)
            cases.append({"dataset": scheme, "case": f.name.replace(".nii.gz", ""), "dice": score_map(classes)})
            print(f"{cases[-1]['case']}: " + ", ".join(
                f"{step} {min(d.values(), default=1.0):.4f}" for step, d in cases[-1]["dice"].items()), flush=True)
    if not cases:
        raise SystemExit(f"no real label maps under {args.real_dir} (flare22/*.nii.gz, word/*.nii.gz)")
    summary: dict[str, dict[str, dict]] = {}
    for step in CLEANUP_STEPS:
        for name in CLASS_NAMES[1:]:
            values = [c["dice"][step][name] for c in cases if name in c["dice"][step]]
            if values:
                summary.setdefault(step, {})[name] = {
                    "maps": len(values), "changed_maps": int(sum(v < 1.0 for v in values)),
                    "worst_dice": min(values), "passes": min(values) >= BAR}
    Path(args.out).write_text(json.dumps({"bar": BAR, "maps": len(cases), "summary": summary, "cases": cases},
                                         indent=2) + "\n")
    print(f"\n{'organ':<26}" + "".join(f"{s + ' worst':>24}{'changed':>9}" for s in CLEANUP_STEPS))
    for name in CLASS_NAMES[1:]:
        cells = []
        for step in CLEANUP_STEPS:
            s = summary.get(step, {}).get(name)
            cells.append(f"{'n/a':>24}{'':>9}" if s is None else
                         f"{s['worst_dice']:>23.4f}{'' if s['passes'] else '!'}{s['changed_maps']:>5}/{s['maps']:<3}")
        print(f"{name:<26}" + "".join(cells))
    print(f"(! = below the no-harm bar {BAR}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
