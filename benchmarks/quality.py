"""Raw vs cleanup vs averaging vs RefNet (label, label + CT, paper loss) on the same predictions, over fresh seeds.

Each seed generates its own phantoms and trains everything from scratch (base models with out-of-fold
training predictions, an unseen architecture, three RefNets); see refnet.quality for the methods.
The RefNet preset is the demo's, frozen by benchmarks/preset_selection.py on seed-0 development data
before any seed here was run; the default seeds (11-15) were never used to choose anything.

    python benchmarks/quality.py --out quality_out                 # 5 fresh seeds, the demo's preset
    python benchmarks/quality.py --out quality_out --quick         # one fresh seed, < 30 min on 2 cores
    python benchmarks/quality.py --out q_btcv --dataset BTCV_DIR   # any BTCV-layout folder
    python benchmarks/quality.py --out q_arch --quick --seeds 21 --segmenters unet dynunet:seed=1
                                                                   # K = two architectures
    python benchmarks/quality.py --out q_arch --quick --seeds 34 --segmenters unet segresnet:seed=1,steps=600 \
        --unseen dynunet:lr=0.03                                   # UNet + SegResNet; unseen: nnU-Net's DynUNet
                                                                   # (average_* rows: RefNet on the K models' average)
    python benchmarks/quality.py --out q_clin --quick --clinical   # CT at 0.7-1.0 mm, 1.5-5 mm slices
    python benchmarks/quality.py --out quality_out --add-methods pieces refnet_label_pieces unseen_pieces
                                                                   # score methods added since a run finished
    python benchmarks/quality.py --out q_again --from-runs benchmarks/quality_runs/seed*.json
                                                                   # the tables again from kept per-case scores

Writes ``OUT/quality.json`` (methods as keys; gains with paired 95% intervals under ``gains``),
``OUT/quality_gain.png`` (per-organ change against raw), ``OUT/quality.md`` (the table) and, per seed,
``OUT/seed<N>/run.json`` (per-case scores; a rerun reuses finished seeds and resumes the others). The
run files of the published tables are kept in ``benchmarks/quality_runs/``: ``--from-runs`` pools any of
them (no training, seconds), so every figure can be recomputed and other seeds pooled in later.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from refnet.io import write_json
from refnet.quality import (
    DEFAULT_METHODS,
    METHODS,
    NEEDS,
    QualityConfig,
    add_methods,
    quality_table,
    run_quality,
    save_gain_chart,
    summarise_quality,
)
from refnet.segmenters import SegmenterConfig

FRESH_SEEDS = (11, 12, 13, 14, 15)


def acceptance(summary: dict) -> list[str]:
    """The issue's bars, each as a line saying whether it holds (read off the summary, never asserted)."""
    g, lines = summary["gains"], []

    def check(ok: bool, text: str) -> None:
        lines.append(f"[{'met' if ok else 'NOT met'}] {text}")

    if "refnet_label" in g:
        lab = g["refnet_label"]
        check(lab["gain_percent_mean"] >= 2.0 and (lab["case_dice_diff"]["low"] or -1) > 0,
              f"refnet_label gain {lab['gain_percent_mean']:+.2f}% >= +2% with the 95% interval above 0 "
              f"(low {lab['case_dice_diff']['low']})")
        worst = lab["worst_organ_change"]
        check(worst >= -0.005, f"no organ worse than -0.005 (worst {worst:+.4f})")
        for other in ("cleanup", "average"):
            if other in summary:
                check(summary["refnet_label"]["mean_dice"] > summary[other]["mean_dice"],
                      f"refnet_label beats {other} ({summary['refnet_label']['mean_dice']:.4f} vs "
                      f"{summary[other]['mean_dice']:.4f})")
        check((lab["nsd_change"] or 0) > 0, f"refnet_label raises mean NSD ({lab['nsd_change']})")
        if "refnet_ct" in g:
            ct = g["refnet_ct"]["gain_percent_mean"]
            check(ct >= 2 * lab["gain_percent_mean"] > 0, f"refnet_ct gain {ct:+.2f}% >= twice refnet_label's")
    if "unseen_refnet_label" in g:
        u = g["unseen_refnet_label"]
        check(u["gain_percent_mean"] >= 0, f"unseen architecture not lowered ({u['gain_percent_mean']:+.2f}%)")
    # The same bars for the learned piece decision, after RefNet and alone (refnet.pieces).
    for m in ("refnet_label_pieces", "pieces"):
        if m in g:
            p = g[m]
            check(p["gain_percent_mean"] >= 2.0 and (p["case_dice_diff"]["low"] or -1) > 0,
                  f"{m} gain {p['gain_percent_mean']:+.2f}% >= +2% with the 95% interval above 0 "
                  f"(low {p['case_dice_diff']['low']}); worst organ {p['worst_organ_change']:+.4f}")
            for other in ("cleanup", "average", "refnet_label_cleanup"):
                if other in summary:
                    check(summary[m]["mean_dice"] > summary[other]["mean_dice"],
                          f"{m} beats {other} ({summary[m]['mean_dice']:.4f} vs {summary[other]['mean_dice']:.4f})")
    if "unseen_pieces" in g:
        u = g["unseen_pieces"]
        check(u["gain_percent_mean"] >= 0, f"pieces on the unseen architecture: {u['gain_percent_mean']:+.2f}%")
    # Not an issue bar: does refining the K models' average still help (the strongest baseline with K
    # architectures)? Read against average, with the same interval.
    for m in ("average_refnet_label", "average_pieces", "average_refnet_label_pieces"):
        if m in g:
            a = g[m]
            check(a["gain_percent_mean"] > 0 and (a["case_dice_diff"]["low"] or -1) > 0,
                  f"{m} gain over average {a['gain_percent_mean']:+.2f}% with the 95% interval above 0 "
                  f"(low {a['case_dice_diff']['low']}); worst organ {a['worst_organ_change']:+.4f}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="working and output folder")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"phantom seeds (default {list(FRESH_SEEDS)}; "
                        f"--quick: {FRESH_SEEDS[0]})")
    parser.add_argument("--quick", action="store_true", help="one seed, RefNets trained 10 epochs (< 30 min)")
    parser.add_argument("--dataset", help="a BTCV-layout folder instead of generated phantoms (one run)")
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        help="the methods (default all but refnet_components)")
    parser.add_argument("--add-methods", nargs="+", choices=METHODS, metavar="METHOD",
                        help="score these methods on the seeds already finished under --out (their base models "
                             "and refnet_label.pt are reused) and add them to each run.json")
    parser.add_argument("--from-runs", nargs="+", metavar="RUN_JSON",
                        help="pool these finished per-seed run files (OUT/seed<N>/run.json) instead of running "
                             "seeds: nothing is trained; --quick only labels the preset")
    parser.add_argument("--segmenters", nargs="+", metavar="PRESET",
                        help="the K base models RefNet and the decider train on, ARCH[:key=value,...] each "
                             "(SegmenterConfig.parse); the first is raw. Default: the demo's two UNets "
                             "(unet unet:seed=1,steps=400); e.g. unet dynunet:seed=1 for two architectures")
    parser.add_argument("--unseen", metavar="PRESET",
                        help="the base model of an architecture RefNet never trains on, for the unseen_* methods, "
                             "ARCH[:key=value,...] (default segresnet); it must not be one of --segmenters")
    parser.add_argument("--clinical", action="store_true",
                        help="phantoms at clinical resolution (0.7-1.0 mm pixels, 1.5-5 mm slices); the base models "
                             "run on the demo's 2.2 x 2.2 x 4.5 mm grid and hand back logits on the CT's voxels")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()
    if args.from_runs and (args.seeds or args.dataset or args.add_methods):
        parser.error("--from-runs pools finished runs; it takes no --seeds, --dataset or --add-methods.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = QualityConfig.quick() if args.quick else QualityConfig()
    try:
        segmenters = tuple(SegmenterConfig.parse(p) for p in args.segmenters or ())
    except ValueError as err:
        parser.error(f"--segmenters: {err}")
    try:
        unseen = SegmenterConfig.parse(args.unseen) if args.unseen else config.unseen
    except ValueError as err:
        parser.error(f"--unseen: {err}")
    if segmenters and len(segmenters) < 2:
        parser.error("--segmenters: give K >= 2 base models (Algorithm 1 trains on several).")
    try:
        config = replace(config, demo=replace(config.demo, device=args.device,
                                              segmenters=segmenters or config.demo.segmenters),
                         unseen=unseen, methods=tuple(args.methods or DEFAULT_METHODS))
        if args.clinical:
            config = config.at_clinical_resolution()
    except ValueError as err:
        parser.error(str(err))
    seeds = args.seeds or (FRESH_SEEDS[:1] if args.quick else FRESH_SEEDS)
    out = Path(args.out)
    runs, t0 = [], time.perf_counter()
    for name in args.from_runs or ():
        try:
            run = json.loads(Path(name).read_text())
        except (OSError, ValueError) as err:
            parser.error(f"--from-runs {name}: not a readable run file ({err}); give OUT/seed<N>/run.json files.")
        if not isinstance(run, dict) or not {"seed", "methods"} <= set(run):
            parser.error(f"--from-runs {name}: not a run file (no per-case 'methods'); give OUT/seed<N>/run.json "
                         "files, not quality.json.")
        if any(r["seed"] == run["seed"] and r.get("dataset") == run.get("dataset") for r in runs):
            parser.error(f"--from-runs {name}: seed {run['seed']} is given twice; each seed counts once.")
        runs.append(run)
    for seed in ([] if args.from_runs else [0] if args.dataset else seeds):
        folder = out / ("dataset" if args.dataset else f"seed{seed}")
        done = folder / "run.json"
        if done.exists():
            run = json.loads(done.read_text())
            if args.add_methods:
                wanted = set(args.add_methods) | {NEEDS[m] for m in args.add_methods if m in NEEDS}
                run = add_methods(folder, run, replace(config, methods=tuple(m for m in METHODS if m in wanted)))
                write_json(done, run)
                print(f"seed {seed}: added {sorted(wanted)}", flush=True)
            runs.append(run)
            continue
        if args.add_methods:
            parser.error(f"--add-methods: {done} does not exist; run the seed first (without --add-methods).")
        run = run_quality(folder, config, seed=seed, dataset=args.dataset)
        write_json(done, run)
        runs.append(run)
        print(f"seed {seed}: {run['timings']}", flush=True)
    summary = summarise_quality(runs)
    summary["preset"] = "quick" if args.quick else "full"
    if segmenters:
        summary["segmenters"] = list(args.segmenters)
    if args.unseen:
        summary["unseen"] = args.unseen
    if args.clinical:
        summary["resolution"] = "clinical"
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.from_runs:
        summary["from_runs"] = list(args.from_runs)
    write_json(out / "quality.json", summary)
    save_gain_chart(out / "quality_gain.png", summary)
    table = quality_table(summary)
    (out / "quality.md").write_text(table + "\n")
    print(table)
    print("\n".join(acceptance(summary)))
    print(f"wrote {out / 'quality.json'}, {out / 'quality_gain.png'}, {out / 'quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
