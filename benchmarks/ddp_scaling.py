"""How RefNet training scales with processes under torchrun, against one process, on the same work.

Trains the demo preset (batch 16 crops, 60 steps per epoch, no held-out validation so only training is
timed) on the pairs of ``benchmarks/train_speed.py`` in three ways, one after the other in one run:
one process with every core's thread, one process with one thread, and ``torchrun --nproc_per_node N``
processes of one thread each (gloo on CPU, NCCL on GPUs), each taking 16/N crops of every batch. Prints
seconds per epoch and the speed-up over one process; writes JSON.

    python benchmarks/ddp_scaling.py [--processes 2] [--epochs 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def child(out: Path, threads: int, epochs: int, cases: int) -> None:
    """One training run (under torchrun: this process's share); the main process writes its time."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(Path(__file__).parent))
    from refnet.pipeline import DemoConfig
    from refnet.train import train_refnet
    from train_speed import _pairs

    config = replace(DemoConfig().train, device="cpu", val_cases=0, epochs=epochs, simulated_pairs=0)
    pairs = _pairs(cases, config)
    work = out.parent / f"{out.stem}_work"  # one folder for every process of the run: the model file is shared
    t0 = time.perf_counter()
    train_refnet(pairs, config, work_dir=work)
    seconds = time.perf_counter() - t0
    if os.environ.get("RANK", "0") == "0":
        out.write_text(json.dumps({"seconds": seconds, "epoch_s": seconds / epochs}))


def _run(cmd: list[str], out: Path) -> float:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())["epoch_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cases", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    parser.add_argument("--child", nargs=2, metavar=("OUT", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), int(args.child[1]), args.epochs, args.cases)
        return 0
    cores = os.cpu_count() or 1
    me = [__file__, "--epochs", str(args.epochs), "--cases", str(args.cases)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, (name, launcher, threads) in enumerate((
            (f"1 process, {cores} threads", [sys.executable], cores),
            ("1 process, 1 thread", [sys.executable], 1),
            (f"{args.processes} processes (torchrun), 1 thread each",
             [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}"], 1),
        )):
            out = Path(tmp) / f"run{n}.json"
            epoch_s = _run([*launcher, *me, "--child", str(out), str(threads)], out)
            rows.append({"setting": name, "epoch_s": round(epoch_s, 2)})
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["epoch_s"]
    for r in rows:
        r["speedup_vs_first"] = round(base / r["epoch_s"], 2)
    Path(args.out).write_text(json.dumps({"cpu_count": cores, "rows": rows}, indent=2) + "\n")
    print(f"\n{'setting':<44}{'epoch s':>9}{'speed-up':>10}")
    for r in rows:
        print(f"{r['setting']:<44}{r['epoch_s']:>9.2f}{r['speedup_vs_first']:>9.2f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
