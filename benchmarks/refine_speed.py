"""Refinement speed at real resolution: slice batch sizes, guards, and the model's spacing.

Runs on a default-resolution phantom (about 390 x 320 x 45 voxels, 0.7-1.0 mm pixels) with the demo
RefNet architecture (speed does not depend on the weights): at the demo's 1.5 mm model spacing and,
for comparison, at the phantom's own spacing. Prints a table and writes JSON; figures
are measured side by side in one run and reported as ratios to the first row.

    python benchmarks/refine_speed.py [--device cpu|cuda] [--repeats 2] [--out benchmarks/refine_speed.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from refnet.checkpoint import LoadedModel
from refnet.data.phantoms import PhantomConfig, make_phantom
from refnet.device import resolve_device
from refnet.guards import GuardConfig
from refnet.model import RefNet
from refnet.pipeline import DemoConfig
from refnet.refine import RefineConfig, refine_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    device = resolve_device(args.device)
    phantom = make_phantom(0, PhantomConfig())
    train = DemoConfig().train
    net = RefNet(train.model).to(device).eval()
    spacing = {"spacing": {"inplane_mm": train.spacing_mm, "context_mm": train.context_mm}}
    model = LoadedModel(net, spacing, device)
    native = LoadedModel(net, {"spacing": {"context_mm": train.context_mm}}, device)
    settings = [
        (f"{train.spacing_mm} mm (default)", model, RefineConfig()),
        (f"{train.spacing_mm} mm, batch 2", model, RefineConfig(batch_size=2)),
        (f"{train.spacing_mm} mm, batch 16", model, RefineConfig(batch_size=16)),
        (f"{train.spacing_mm} mm, guards off", model, RefineConfig(guards=GuardConfig.off())),
        ("native spacing", native, RefineConfig()),
    ]
    rows = []
    for name, mod, config in settings:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            refine_labels(phantom.labels, phantom.affine, mod, config=config)
            times.append(time.perf_counter() - t0)
        rows.append({"setting": name, "seconds": min(times)})
    base = rows[0]["seconds"]
    print(f"phantom {phantom.labels.shape}, device {device}, torch threads {torch.get_num_threads()}")
    print(f"{'setting':<32}{'seconds':>10}{'vs default':>12}")
    for r in rows:
        r["ratio_to_default"] = r["seconds"] / base
        print(f"{r['setting']:<32}{r['seconds']:>10.2f}{r['ratio_to_default']:>11.2f}x")
    Path(args.out).write_text(json.dumps({"shape": list(phantom.labels.shape), "device": str(device),
                                          "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
