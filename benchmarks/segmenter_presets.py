"""Base-model presets on a development seed: how good and how slow is each architecture?

Trains each named preset on the training cases of one quality-benchmark seed (its phantoms, less the
cases RefNet holds out, exactly what the quality run's full base model trains on) and scores it on that
seed's test cases. For choosing a base-model preset that reaches a realistic level in the CPU budget,
on a development seed only (seed 10 by default: never one of the quality benchmark's test seeds).

    python benchmarks/segmenter_presets.py --out seg_presets --presets unet unet:seed=1,steps=400 \
        dynunet:features=8,steps=600,lr=0.01

A preset is ``ARCH[:key=value,...]`` over :meth:`refnet.segmenters.SegmenterConfig.demo`. Prints a
table (steps/s, training seconds, mean Dice over the 13 classes and over the 12 organs) and writes
``OUT/segmenter_presets.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from refnet.data.btcv import BTCV_TEST_IDS, BTCV_TRAIN_IDS, find_cases, load_case, split_cases
from refnet.data.phantoms import write_phantom_dataset
from refnet.evaluate import dice_per_class
from refnet.geometry import canonical_affine, to_canonical
from refnet.io import write_json
from refnet.quality import QualityConfig
from refnet.segmenters import SegmenterConfig, predict_segmenter, train_segmenter
from refnet.spacing import voxel_spacing
from refnet.train import validation_cases


def parse_preset(text: str, seed: int) -> SegmenterConfig:
    """``ARCH[:key=value,...]`` with the quality run's seed offset (what ``run_quality`` trains for ``seed``)."""
    config = SegmenterConfig.parse(text)
    return replace(config, seed=config.seed + 100 * seed, name=None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="working and output folder")
    parser.add_argument("--seed", type=int, default=10, help="phantom seed (default 10, the development seed)")
    parser.add_argument("--presets", nargs="+", required=True, help="ARCH[:key=value,...] each")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    demo = QualityConfig().demo
    out = Path(args.out)
    data = out / "data"
    if not (data / "dataset.json").exists():
        ids = list(BTCV_TRAIN_IDS[: demo.train_cases]) + list(BTCV_TEST_IDS[: demo.test_cases])
        write_phantom_dataset(data, ids, config=demo.phantoms, seed=args.seed)
    cases = find_cases(data)
    train_ids = [c.case_id for c in split_cases(cases, "train")]
    held = set(validation_cases(train_ids, demo.train.val_cases))
    fit, test = [], []  # (canonical CT, canonical labels, canonical spacing)
    for case in split_cases(cases, "train") + split_cases(cases, "test"):
        if case.case_id not in held:
            ct, labels = load_case(case)
            (test if case.case_id in BTCV_TEST_IDS else fit).append(
                (to_canonical(ct.array.astype(np.float32), ct.affine)[0], to_canonical(labels, ct.affine)[0],
                 voxel_spacing(canonical_affine(ct.affine, ct.array.shape))))
    rows = []
    for text in args.presets:
        config = parse_preset(text, args.seed)
        t0 = time.perf_counter()
        net = train_segmenter([f[:2] for f in fit], config, spacings=[f[2] for f in fit])
        train_s = time.perf_counter() - t0
        dice = np.array([dice_per_class(predict_segmenter(net, ct, config, spacing=sp), lab) for ct, lab, sp in test])
        rows.append({"preset": text, "config": config.to_dict(), "train_s": round(train_s, 1),
                     "steps_per_s": round(config.steps / train_s, 2),
                     "mean_dice": round(float(np.nanmean(np.nanmean(dice, axis=1))), 4),
                     "organ_dice": round(float(np.nanmean(np.nanmean(dice[:, 1:], axis=1))), 4)})
        print(json.dumps(rows[-1]), flush=True)
        write_json(out / "segmenter_presets.json", {"seed": args.seed, "training_cases": len(fit),  # kept if stopped
                                                    "test_cases": len(test), "rows": rows})
    print(f"\nseed {args.seed}: {len(fit)} training cases, {len(test)} test cases\n")
    print("| preset | steps/s | train s | mean Dice | organ Dice |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['steps_per_s']} | {r['train_s']} | {r['mean_dice']:.4f} | {r['organ_dice']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
