"""Where does each method's gain come from: the organs the patient has, or organs drawn where there are none?

Reads finished per-seed run files of ``benchmarks/quality.py`` (``OUT/seedN/run.json`` or the kept
``benchmarks/quality_runs/...``; nothing is trained or predicted) and splits each method's gain of mean
Dice over raw in two. A class-case counts as a **whole-organ event** when raw scores Dice 0 or NaN there:
the truth lacks the organ and raw drew it (Dice 0 until every voxel of it is gone, then NaN and left out
of the mean), the truth and raw both lack it, or raw missed a present organ entirely (run files that
record ``truth_ml``, the truth's volume per class, also count the first kind apart). The
rest are the **organs the truth has and raw found**, where the refiner's and cleanup's boundary and
island work shows. Prints per method the gain on all classes, on those organs alone, and the whole-organ
events each method fixed, per seed and pooled, and writes JSON.

    python benchmarks/gain_sources.py --runs benchmarks/quality_runs/seed*.json [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def _mean(dice: np.ndarray) -> float:
    """The benchmark's mean Dice: per case over its scored classes, then over cases."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(np.nanmean(dice, axis=1)))


def gain_sources(run: dict[str, Any]) -> dict[str, Any]:
    """One seed's split of each method's gain (raw and its refinements; unseen_* against unseen_raw)."""
    out: dict[str, Any] = {"seed": run.get("seed"), "methods": {}}
    truth_ml = run.get("truth_ml")  # run files from before it was recorded: the Dice-0 reading alone
    absent = None if truth_ml is None else np.array(truth_ml, dtype=float) == 0
    for method, scores in run["methods"].items():
        base_name = "unseen_raw" if method.startswith("unseen_") else "raw"
        if base_name not in run["methods"] or method == base_name:
            continue
        base = np.array(run["methods"][base_name]["dice"], dtype=float)
        dice = np.array(scores["dice"], dtype=float)
        whole = (base == 0) | np.isnan(base)
        whole[:, 0] = False  # background is always scored
        b_all, b_found = _mean(base), _mean(np.where(whole, np.nan, base))
        out["methods"][method] = {
            "against": base_name,
            "gain_percent": round(100 * (_mean(dice) - b_all) / b_all, 3),
            "gain_percent_on_found_organs": round(100 * (_mean(np.where(whole, np.nan, dice)) - b_found) / b_found, 3),
            "whole_organ_events": int((base[:, 1:] == 0).sum()),  # raw drew an absent organ (or missed one)
            "whole_organ_events_fixed": int(((base == 0) & (np.isnan(dice) | (dice > 0)))[:, 1:].sum()),
        }
        if absent is not None:  # of those events, organs drawn in a patient who lacks them
            out["methods"][method]["absent_organs_drawn"] = int((absent & (base == 0))[:, 1:].sum())
            out["methods"][method]["absent_organs_removed"] = int((absent & (base == 0) & np.isnan(dice))[:, 1:].sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="per-seed run.json files of quality.py")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    seeds = []
    for path in args.runs:
        try:
            seeds.append(gain_sources(json.loads(Path(path).read_text())))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise SystemExit(f"{path}: not a quality.py run file ({err}); pass OUT/seedN/run.json files.") from None
    methods = list(seeds[0]["methods"])
    pooled = {}
    print(f"{'method':<24}{'gain':>9}{'on found organs':>17}{'events fixed':>14}   per seed (found organs)")
    for m in methods:
        rows = [s["methods"][m] for s in seeds if m in s["methods"]]
        pooled[m] = {"gain_percent_mean": round(float(np.mean([r["gain_percent"] for r in rows])), 3),
                     "gain_percent_on_found_organs_mean":
                         round(float(np.mean([r["gain_percent_on_found_organs"] for r in rows])), 3),
                     "whole_organ_events": sum(r["whole_organ_events"] for r in rows),
                     "whole_organ_events_fixed": sum(r["whole_organ_events_fixed"] for r in rows)}
        p = pooled[m]
        print(f"{m:<24}{p['gain_percent_mean']:>+8.2f}%{p['gain_percent_on_found_organs_mean']:>+16.2f}%"
              f"{p['whole_organ_events_fixed']:>8} of {p['whole_organ_events']:<3}  "
              + " ".join(f"{r['gain_percent_on_found_organs']:+.2f}" for r in rows))
    Path(args.out).write_text(json.dumps({"runs": [str(p) for p in args.runs], "pooled": pooled, "seeds": seeds},
                                         indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
