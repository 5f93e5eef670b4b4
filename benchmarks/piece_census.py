"""Where does the piece decision's headroom go? A census of every raw piece of a quality.py seed.

The decider removes whole connected pieces (``refnet/pieces.py``). On a seed folder that
``benchmarks/quality.py`` left (its phantoms, the raw base model's test predictions and the fitted
``pieces.pt``; nothing is trained here) this script scores, on the same raw test maps:

- ``raw``; the decider ``as fitted``; ``piece by piece``: the same without its whole-class cut-off
  (as deciders were before it, so the census shows what scoring small classes as a whole adds);
- ``perfect scorer, gates on``: every piece whose removal alone raises its class's Dice is dropped
  (:func:`refnet.pieces.drop_helps`, the decider's own training target), then the no-harm gates apply:
  what a flawless scorer could reach with the shipped gates;
- ``perfect scorer, no gates``: the same without the gates (the most any keep/drop rule can reach);
- ``absent classes removed``: only the classes the truth lacks removed (the part of it that is a
  patient's missing organ).

and splits the helpful pieces the decider kept by why: its score was below the cut-off, or a gate held
them (the image's edge cuts them, or they are a main piece of a class that is not implausibly small).
A diagnosis on a development seed: run it where choices may be made (seed 10), never to pick anything
on test seeds.

    python benchmarks/quality.py --out q_dev --quick --seeds 10 --methods raw cleanup pieces
    python benchmarks/piece_census.py --runs q_dev/seed10 [q_clin/seed10 ...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

SETTINGS = ("raw", "as fitted", "piece by piece", "perfect scorer, gates on", "perfect scorer, no gates",
            "absent classes removed")


def _mean_dice(labels: np.ndarray, target: np.ndarray) -> float:
    from refnet.evaluate import dice_per_class

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(dice_per_class(labels, target)))


def _why_kept(pieces: Any, helps: np.ndarray, dropped: np.ndarray, scored: np.ndarray, gated: np.ndarray
              ) -> list[str]:
    """Per piece: '' (dropped, or no gain in dropping it) or why a helpful piece stayed (``gated``: the
    helpful pieces the gates let go)."""
    out = []
    for n in range(len(pieces.cls)):
        if dropped[n] or not helps[n]:
            out.append("")
        elif not gated[n]:
            out.append("edge gate" if pieces.cut[n] else "main piece of a plausible class")
        elif not scored[n]:
            out.append("score below cut-off")
        else:
            out.append("other")  # not expected: a scored, ungated helpful piece is dropped
    return out


def case_census(raw: np.ndarray, truth: np.ndarray, spacing: Any, decider: Any
                ) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, dict[str, list[str]]]]:
    """One canonical raw map against its truth: mean Dice per setting, a row per raw piece, and for the
    decider as fitted and piece by piece the organs it removed whole, split into absent and present."""
    from refnet.labels import CLASS_NAMES
    from refnet.pieces import drop_helps, find_pieces, remove_pieces

    pieces = find_pieces(raw, spacing)  # what decider.decide does, keeping its steps for the census
    volumes = _class_volumes(pieces, spacing, decider)
    prob = decider.scores(pieces, spacing)
    scored = decider.proposal(pieces, prob, *volumes)  # the cut-offs, before the gates
    dropped = decider.gates.allow(pieces, scored, *volumes)
    piecewise = decider.gates.allow(pieces, decider.proposal(pieces, prob, *volumes, class_threshold=1.0), *volumes)
    helps, weight = drop_helps(pieces, truth)
    perfect = decider.gates.allow(pieces, helps, *volumes)
    absent = ~np.isin(pieces.cls, np.unique(truth))
    scores = {name: _mean_dice(remove_pieces(raw, pieces, drop), truth)
              for name, drop in (("raw", np.zeros_like(helps)), ("as fitted", dropped), ("piece by piece", piecewise),
                                 ("perfect scorer, gates on", perfect), ("perfect scorer, no gates", helps),
                                 ("absent classes removed", absent))}
    why = _why_kept(pieces, helps, dropped, scored, perfect)
    ml = float(np.prod(spacing)) / 1000.0
    rows = [{"organ": CLASS_NAMES[int(pieces.cls[n])], "ml": round(float(pieces.voxels[n]) * ml, 2),
             "cut": bool(pieces.cut[n]), "helps": bool(helps[n]), "dice_change": round(float(weight[n]), 4),
             "dropped": bool(dropped[n]), "kept_because": why[n], "class_absent": bool(absent[n])}
            for n in range(len(pieces.cls))]
    return scores, rows, {"as fitted": _whole(pieces, dropped, absent),
                          "piece by piece": _whole(pieces, piecewise, absent)}


def _whole(pieces: Any, drop: np.ndarray, absent: np.ndarray) -> dict[str, list[str]]:
    """The organs ``drop`` removes whole: those the truth lacks (a gain) and those it has (a harm)."""
    from refnet.labels import CLASS_NAMES

    gone = [int(c) for c in np.unique(pieces.cls) if drop[pieces.cls == c].all()]
    return {kind: [CLASS_NAMES[c] for c in gone if absent[pieces.cls == c][0] == want]
            for kind, want in (("absent_removed", True), ("present_removed", False))}


def census(folder: Path) -> dict[str, Any]:
    """Per-case mean Dice per setting, and the raw pieces of one seed folder's test maps grouped by case,
    organ and fate (pieces, mL and summed Dice change per group)."""
    from refnet.data.btcv import find_cases, load_case, split_cases
    from refnet.geometry import canonical_affine, to_canonical
    from refnet.io import read_affine
    from refnet.pieces import PieceDecider
    from refnet.segmenters import load_prediction_folder
    from refnet.spacing import voxel_spacing

    run = json.loads((folder / "run.json").read_text())
    decider = PieceDecider.load(folder / "pieces.pt")
    test = split_cases(find_cases(folder / "data"), "test")
    raw_maps = load_prediction_folder(folder / "predictions" / run["raw_source"], [c.case_id for c in test],
                                      affines={c.case_id: read_affine(c.image) for c in test})
    scores: dict[str, list[float]] = {s: [] for s in SETTINGS}
    rows, spacings, whole = [], [], {}
    for case in test:
        ct, target = load_case(case)
        raw, reo = to_canonical(raw_maps[case.case_id], ct.affine)
        spacing = voxel_spacing(canonical_affine(ct.affine, raw_maps[case.case_id].shape))
        spacings.append([round(float(v), 2) for v in spacing])
        case_scores, case_rows, whole[case.case_id] = case_census(raw, reo.forward(np.asarray(target)), spacing,
                                                                  decider)
        for name, value in case_scores.items():
            scores[name].append(value)
        rows += _grouped(case.case_id, case_rows)
    return {"seed": run["seed"], "spacings_mm": spacings, "cases": [c.case_id for c in test],
            "threshold": decider.threshold, "class_threshold": decider.class_threshold,
            "cleanup_mean_dice": _run_mean(run, "cleanup"),
            "scores": scores, "pieces": rows, "whole_classes": whole}


def _grouped(case_id: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``case_census`` rows summed per (organ, dropped, helps, why kept, cut, class absent): thousands of
    specks per seed would otherwise fill the JSON."""
    groups: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["organ"], r["dropped"], r["helps"], r["kept_because"], r["cut"], r["class_absent"])
        g = groups.setdefault(key, {"case": case_id, **dict(zip(
            ("organ", "dropped", "helps", "kept_because", "cut", "class_absent"), key)),
            "pieces": 0, "ml": 0.0, "dice_change_sum": 0.0})
        g["pieces"] += 1
        g["ml"] = round(g["ml"] + r["ml"], 2)
        g["dice_change_sum"] = round(g["dice_change_sum"] + r["dice_change"], 4)
    return list(groups.values())


def _class_volumes(pieces: Any, spacing: Any, decider: Any) -> tuple[np.ndarray, np.ndarray]:
    """Each piece's class volume (mL) and that class's typical volume: what the gates read."""
    from refnet.pieces import _class_ml

    return _class_ml(pieces, spacing), np.asarray(decider.typical_ml)[pieces.cls]


def _run_mean(run: dict[str, Any], method: str) -> float | None:
    from refnet.quality import _case_means

    try:
        return float(np.mean(_case_means(run, method)))
    except (KeyError, TypeError, ValueError):
        return None


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Mean Dice per setting, its gain over raw, and the helpful pieces left, grouped by why they stayed."""
    raw = float(np.mean(result["scores"]["raw"]))
    table = {s: {"mean_dice": round(float(np.mean(v)), 5),
                 "gain_percent": round(100 * (float(np.mean(v)) - raw) / raw, 3)}
             for s, v in result["scores"].items()}
    if result["cleanup_mean_dice"] is not None:
        c = result["cleanup_mean_dice"]
        table["cleanup (run.json)"] = {"mean_dice": round(c, 5), "gain_percent": round(100 * (c - raw) / raw, 3)}
    kept: dict[str, dict[str, float]] = {}
    for r in result["pieces"]:
        if r["kept_because"]:
            k = kept.setdefault(r["kept_because"], {"pieces": 0, "dice_change_sum": 0.0, "ml": 0.0})
            k["pieces"] += r["pieces"]
            k["dice_change_sum"] = round(k["dice_change_sum"] + r["dice_change_sum"], 4)
            k["ml"] = round(k["ml"] + r["ml"], 2)
    events = {setting: {kind: sum(len(case[setting][kind]) for case in result["whole_classes"].values())
                        for kind in ("absent_removed", "present_removed")}
              for setting in ("as fitted", "piece by piece")}
    return {"settings": table, "helpful_pieces_kept": kept, "organs_removed_whole": events}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="seed folders of quality.py runs (development seeds)")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    results = []
    for folder in map(Path, args.runs):
        if not (folder / "run.json").exists() or not (folder / "pieces.pt").exists():
            raise SystemExit(f"{folder} holds no finished quality.py seed with a fitted decider (run.json, "
                             "pieces.pt); run benchmarks/quality.py first with the pieces method.")
        result = census(folder)
        result["summary"] = summarise(result)
        results.append(result)
        pixel = np.mean([s[0] for s in result["spacings_mm"]])
        print(f"\n{folder} (seed {result['seed']}, mean pixel {pixel:.2f} mm, cut-off {result['threshold']}, "
              f"class cut-off {result.get('class_threshold', 1.0)})")
        print(f"{'setting':<30}{'mean Dice':>11}{'gain':>9}")
        for name, row in result["summary"]["settings"].items():
            print(f"{name:<30}{row['mean_dice']:>11.4f}{row['gain_percent']:>+8.2f}%")
        print("helpful pieces the decider kept, by why (sum of each piece's own Dice change of its class):")
        for why, k in result["summary"]["helpful_pieces_kept"].items():
            print(f"  {why:<34}{k['pieces']:>4} pieces {k['ml']:>9.1f} mL   sum {k['dice_change_sum']:.3f}")
        for setting, e in result["summary"]["organs_removed_whole"].items():
            print(f"organs removed whole, {setting}: {e['absent_removed']} the patient lacks, "
                  f"{e['present_removed']} the patient has")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
