"""Why do the quality benchmark's RefNets gain so little: the net, or the guards holding it back?

Reads the seed folders a ``benchmarks/quality.py`` run left (its trained ``refnet_label.pt``,
``refnet_ct.pt`` and ``refnet_components.pt``, phantoms and raw predictions; nothing is trained here) and
refines each seed's test cases with every guard on (as shipped), each guard off in turn, and all guards
off. Prints the mean Dice gain over raw per setting and model and writes JSON. A diagnosis, not a choice: no setting is
picked from it (the test seeds' figures must not choose presets).

    python benchmarks/quality_guard_ablation.py --runs OUT/seed11 OUT/seed12 ... [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

MODELS = ("refnet_label", "refnet_ct", "refnet_components")  # those a run trained are ablated


def _settings():
    from refnet.guards import GUARD_NAMES, GuardConfig

    out = {"all guards on": GuardConfig()}
    for name in GUARD_NAMES:
        out[f"{name} off"] = replace(GuardConfig(), **{name: False})
    out["all guards off"] = GuardConfig.off()
    return out


def ablate(folder: Path) -> dict:
    """Per model and setting, the per-case mean Dice of one seed's test cases (and raw's)."""
    from refnet.checkpoint import load_model
    from refnet.data.btcv import find_cases, load_case, split_cases
    from refnet.evaluate import dice_per_class
    from refnet.io import read_affine
    from refnet.refine import RefineConfig, refine_labels
    from refnet.segmenters import load_prediction_folder

    run = json.loads((folder / "run.json").read_text())
    test = split_cases(find_cases(folder / "data"), "test")
    ids = [c.case_id for c in test]
    raw = load_prediction_folder(folder / "predictions" / run["raw_source"], ids,
                                 affines={c.case_id: read_affine(c.image) for c in test})
    models = {m: load_model(folder / f"{m}.pt") for m in MODELS if (folder / f"{m}.pt").exists()}
    scores: dict[str, dict[str, list[float]]] = {"raw": {"raw": []}}
    for case in test:
        ct, target = load_case(case)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            scores["raw"]["raw"].append(float(np.nanmean(dice_per_class(raw[case.case_id], target))))
            for m, model in models.items():
                for name, guards in _settings().items():
                    out = refine_labels(raw[case.case_id], ct.affine, model, ct=ct.array if model.uses_ct else None,
                                        config=RefineConfig(guards=guards))
                    scores.setdefault(m, {}).setdefault(name, []).append(
                        float(np.nanmean(dice_per_class(out, target))))
    return {"seed": run["seed"], "scores": scores}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="seed folders of a quality.py run")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    runs = [ablate(Path(f)) for f in args.runs]
    raw = np.concatenate([r["scores"]["raw"]["raw"] for r in runs])
    table = {}
    for m in MODELS:
        if not all(m in r["scores"] for r in runs):
            continue
        for name in _settings():
            after = np.concatenate([r["scores"][m][name] for r in runs])
            per_seed = [100 * (np.mean(r["scores"][m][name]) - np.mean(r["scores"]["raw"]["raw"]))
                        / np.mean(r["scores"]["raw"]["raw"]) for r in runs]
            table.setdefault(m, {})[name] = {"gain_percent_mean": round(float(np.mean(per_seed)), 3),
                                             "gain_percent_per_seed": [round(float(g), 3) for g in per_seed],
                                             "worst_case_change": round(float(np.min(after - raw)), 4)}
    Path(args.out).write_text(json.dumps({"seeds": [r["seed"] for r in runs], "cases": len(raw), "gains": table,
                                          "runs": runs}, indent=2) + "\n")
    print(f"{'setting':<24}" + "".join(f"{m + ' gain':>20}{'worst case':>12}" for m in table))
    for name in _settings():
        print(f"{name:<24}" + "".join(f"{table[m][name]['gain_percent_mean']:>+19.2f}%"
                                      f"{table[m][name]['worst_case_change']:>+12.4f}" for m in table))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
