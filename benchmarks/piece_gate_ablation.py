"""What does each no-harm gate of the piece decision cost on the quality benchmark's test maps?

Reads the seed folders a ``benchmarks/quality.py`` run left (its fitted ``pieces.pt``, phantoms and the raw
and unseen predictions; nothing is trained here) and applies the decider to each seed's raw test maps
with its gates as fitted, and with one gate off at a time: the edge gate (a piece the image's edge
cuts is kept), the two-adrenal rule, the whole-class floor. Prints the mean Dice per setting and seed and
writes JSON. A diagnosis, not a choice: the gates were fixed on development data before these seeds
ran, and no gate is picked from this (the test seeds' figures must not choose presets).

    python benchmarks/piece_gate_ablation.py --runs OUT/seed16 OUT/seed17 ... [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np


def _settings(gates):
    return {"gates as fitted": gates, "edge gate off": replace(gates, keep_cut=False),
            "two-adrenal rule off": replace(gates, main_pieces=()),
            "whole-class floor off (never a whole class)": replace(gates, class_floor=0.0)}


def ablate(folder: Path) -> dict:
    """Per source (raw, unseen) and setting, the per-case mean Dice of one seed's test cases."""
    from refnet.data.btcv import find_cases, load_case, split_cases
    from refnet.evaluate import dice_per_class
    from refnet.io import read_affine
    from refnet.pieces import PieceDecider
    from refnet.segmenters import load_prediction_folder

    run = json.loads((folder / "run.json").read_text())
    decider = PieceDecider.load(folder / "pieces.pt")
    test = split_cases(find_cases(folder / "data"), "test")
    ids, affines = [c.case_id for c in test], {c.case_id: read_affine(c.image) for c in test}
    sources = {"raw": run["raw_source"], "unseen": run.get("unseen_source")}
    preds = {s: load_prediction_folder(folder / "predictions" / name, ids, affines=affines)
             for s, name in sources.items() if name}
    scores: dict[str, dict[str, list[float]]] = {s: {"no decision": []} for s in preds}
    for case in test:
        ct, target = load_case(case)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for s, maps in preds.items():
                raw = maps[case.case_id]
                scores[s]["no decision"].append(float(np.nanmean(dice_per_class(raw, target))))
                for name, gates in _settings(decider.gates).items():
                    out, _ = replace(decider, gates=gates).apply_to(raw, ct.affine)
                    scores[s].setdefault(name, []).append(float(np.nanmean(dice_per_class(out, target))))
    return {"seed": run["seed"], "cases": ids, "threshold": decider.threshold, "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="seed folders of a quality.py run")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    runs = [ablate(Path(f)) for f in args.runs]
    settings = list(runs[0]["scores"]["raw"])
    print(f"{'source':<8}{'setting':<46}" + "".join(f"{'seed ' + str(r['seed']):>10}" for r in runs) + f"{'all':>10}")
    summary: dict[str, dict[str, float]] = {}
    for source in runs[0]["scores"]:
        for name in settings:
            per_seed = [float(np.mean(r["scores"][source][name])) for r in runs]
            pooled = float(np.mean([v for r in runs for v in r["scores"][source][name]]))
            summary.setdefault(source, {})[name] = round(pooled, 5)
            print(f"{source:<8}{name:<46}" + "".join(f"{v:>10.4f}" for v in per_seed) + f"{pooled:>10.4f}")
    Path(args.out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
