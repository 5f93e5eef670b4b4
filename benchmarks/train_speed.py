"""What one RefNet training epoch of the demo preset costs, and where its time goes: sampling vs the net.

The demo's training set, without its base models (their predictions take minutes to make and do not
change the cost of an epoch): 15 demo phantoms, each as a (simulated errors -> ground truth) pair plus
its identity pair, with the demo's 3 simulated-error pairs per case, at the model's 1.5 mm, as
:func:`refnet.train.train_refnet` prepares them. Times, in one process on the same pairs: drawing one
epoch's batches alone, a crop at the edge of a volume against one at its centre, and whole epochs of
the demo preset (60 steps of 16 crops) with the default and with channels-last activations, the first
epoch of each not counted (warm-up).

    python benchmarks/train_speed.py [--epochs 3] [--cases 15] [--steps N] [--out DIR]   # writes DIR/train_speed.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def _pairs(cases: int, config) -> list:
    from refnet.data.phantoms import PhantomConfig, case_seed, make_phantom
    from refnet.error_simulator import simulate_errors
    from refnet.spacing import voxel_spacing
    from refnet.train import TrainingPair, _at_spacing, _identity_pairs, _simulated_pairs

    pairs = []
    for i in range(cases):
        ph = make_phantom(case_seed(0, i + 1), PhantomConfig.demo())
        raw = simulate_errors(ph.labels, voxel_spacing(ph.affine), np.random.default_rng(i))
        pairs.append(TrainingPair(raw=raw, target=ph.labels, case_id=i + 1, affine=ph.affine, ct=ph.ct))
    fit = [_at_spacing(p, config.spacing_mm) for p in pairs + _identity_pairs(pairs)]
    return fit + _simulated_pairs(fit, config.simulated_pairs, config.errors, config.seed)


def measure(epochs: int, cases: int, steps: int | None = None) -> dict:
    """Seconds per epoch, per batch drawn, per crop at an edge and at the centre (demo preset, CPU;
    ``steps`` per epoch instead of the preset's, for a smoke run)."""
    import torch
    from refnet.losses import RefNetLoss
    from refnet.model import RefNet
    from refnet.pipeline import DemoConfig
    from refnet.train import _OPTIMIZERS, _crop, _run_epoch, _Sampler, sample_batch

    config = replace(DemoConfig().train, device="cpu")
    if steps is not None:
        config = replace(config, steps_per_epoch=steps)
    fit = _pairs(cases, config)
    sampler = _Sampler(fit, config.error_fraction)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(config.steps_per_epoch):
        sample_batch(sampler, config, rng)
    sampling_s = time.perf_counter() - t0
    vol = fit[0].raw
    crop_s = {}
    for where, (ci, cj) in {"edge": (0, 0), "centre": (vol.shape[0] // 2, vol.shape[1] // 2)}.items():
        t0 = time.perf_counter()
        for _ in range(200):
            _crop(vol, ci, cj, config.crop_size)
        crop_s[where] = (time.perf_counter() - t0) / 200
    epoch_s = {}
    for layout in ("default", "channels_last"):
        cfg = replace(config, channels_last=layout == "channels_last")
        torch.manual_seed(0)
        net = RefNet(cfg.model)
        optimiser = _OPTIMIZERS[cfg.optimizer](net.parameters(), lr=cfg.lr)
        loss_fn = RefNetLoss(raw_weight=cfg.raw_weight, dice_weight=cfg.dice_weight)
        times, losses = [], []
        for epoch in range(epochs + 1):
            t0 = time.perf_counter()
            losses.append(_run_epoch(net, optimiser, loss_fn, sampler, cfg, epoch, torch.device("cpu"), False))
            times.append(time.perf_counter() - t0)
        epoch_s[layout] = (times[1:], losses[-1]["loss"])
    times, last = epoch_s["default"]
    cl_times, cl_last = epoch_s["channels_last"]
    return {"epoch_s": round(float(np.mean(times)), 3), "epoch_s_each": [round(t, 3) for t in times],
            "epoch_s_channels_last": round(float(np.mean(cl_times)), 3), "last_loss_channels_last": cl_last,
            "sampling_s_per_epoch": round(sampling_s, 3), "crop_ms_edge": round(1e3 * crop_s["edge"], 3),
            "crop_ms_centre": round(1e3 * crop_s["centre"], 3), "pairs": len(fit),
            "steps_per_epoch": config.steps_per_epoch, "batch_size": config.batch_size,
            "last_loss": last, "torch_threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    parser.add_argument("--cases", type=int, default=15, help="phantom cases (the demo trains on 15)")
    parser.add_argument("--steps", type=int, help="steps per epoch (default: the demo preset's 60)")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder for train_speed.json")
    args = parser.parse_args()
    row = measure(args.epochs, args.cases, args.steps)
    out = Path(args.out) / "train_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"{'epoch s':>9}{'channels-last s':>17}{'sampling s/epoch':>18}{'edge crop ms':>14}{'centre crop ms':>16}"
          f"{'pairs':>7}")
    print(f"{row['epoch_s']:>9.2f}{row['epoch_s_channels_last']:>17.2f}{row['sampling_s_per_epoch']:>18.2f}"
          f"{row['crop_ms_edge']:>14.3f}{row['crop_ms_centre']:>16.3f}{row['pairs']:>7}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
