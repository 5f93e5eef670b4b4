"""What refinement costs next to the segmentation it refines: seconds, slices/s and peak memory per volume size.

For each volume size a phantom label map + CT at clinical spacing (0.8 mm pixels, 2.5 mm slices; the
larger sizes tile one phantom along the slices, which leaves the per-slice work realistic) is refined
with the shipped model (every guard on), and a MONAI SwinUNETR with the BTCV settings (feature size 48,
96^3 sliding window, overlap 0.5, 4 windows per batch; untrained weights: only the time matters) runs on
the same CT, in the same run, so the cost is a ratio. Each measurement runs in a fresh subprocess so its
peak RSS is its own (``torch.cuda.max_memory_allocated`` on a GPU).

    python benchmarks/speed.py [--quick] [--device cpu|cuda] [--shapes 256x256x100 ...] [--no-base-model]
        [--base-model-shapes 512x512x200 ...] [--batch-sizes 2 4 8 16] [--out DIR]   # writes DIR/speed.json

Rows of speed.json: ``shape``, ``device``, ``refine_s``, ``slices_per_s``, ``base_model_s``, ``peak_mem_mb``
(the refining process's peak: Python, torch, the model, the input and the refinement), ``refine_extra_mb``
(that peak minus the memory before refining: what the refinement itself adds), ``base_peak_mem_mb``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = ((256, 256, 100), (512, 512, 200), (512, 512, 400))


def _volume(shape: tuple[int, int, int], cache: Path, what: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """(``what`` array, affine) of ``shape``: the label map or the CT of a phantom of a 41 cm field of view
    with ``shape``'s in-plane size (0.8 mm pixels at 512) and up to 100 slices of 2.5 mm, tiled along the
    slices beyond that. Generated once per in-plane size into ``cache`` (an .npz), so every measurement
    reads the same arrays; only the array asked for is read, into its final buffer (no transient
    copies), so the peak memory measured afterwards is the refinement's and the input's."""
    file = cache / f"phantom_{shape[0]}x{shape[1]}.npz"
    if not file.exists():
        from refnet.data.phantoms import PhantomConfig, make_phantom

        fov = (409.6, 409.6 * shape[1] / shape[0], 2.5 * min(shape[2], 100))
        config = PhantomConfig(inplane_spacing_mm=(fov[0] / shape[0],) * 2, slice_spacing_mm=(2.5, 2.5), fov_mm=fov)
        ph = make_phantom(0, config)
        np.savez(file, labels=ph.labels, ct=ph.ct, affine=ph.affine)
    data = np.load(file)
    src = data[what]
    out = np.empty(shape, dtype=src.dtype)
    for k0 in range(0, shape[2], src.shape[2]):
        n = min(src.shape[2], shape[2] - k0)
        out[:, :, k0 : k0 + n] = src[: shape[0], : shape[1], :n]
    return out, data["affine"]


def _status_mb(key: str) -> float | None:
    """A memory line of Linux's /proc/self/status (``VmRSS``, ``VmHWM``) in MB; None elsewhere."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else ():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return None


def _rss_mb() -> float:
    """Resident memory now, in MB."""
    rss = _status_mb("VmRSS")
    return float("nan") if rss is None else rss


def _peak_mb(device: str) -> float:
    """Peak memory of this process: CUDA memory allocated on a GPU, else the resident set's high-water mark.

    VmHWM from /proc, not ``getrusage``'s ru_maxrss: Linux carries ru_maxrss across exec, so a child would
    report its parent's peak (here the phantom generation's) whenever that was higher.
    """
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def measure_refine(shape: tuple[int, int, int], device: str, cache: Path, batch_size: int | None = None) -> dict:
    """Refine one volume with the shipped model (child process body); the engine's default batch size
    unless given."""
    from refnet.checkpoint import load_model
    from refnet.refine import RefineConfig, refine_labels

    labels, affine = _volume(shape, cache)
    model = load_model(device=device)
    before = _rss_mb()
    t0 = time.perf_counter()
    refine_labels(labels, affine, model, config=RefineConfig(batch_size=batch_size))
    seconds = time.perf_counter() - t0
    peak = _peak_mb(str(model.device))
    extra = round(peak - before, 1) if model.device.type == "cpu" else None  # on a GPU peak is CUDA memory
    return {"refine_s": round(seconds, 2), "slices_per_s": round(shape[2] / seconds, 2),
            "peak_mem_mb": round(peak, 1), "refine_extra_mb": extra, "device": str(model.device)}


def measure_base_model(shape: tuple[int, int, int], device: str, cache: Path) -> dict:
    """SwinUNETR (BTCV settings) sliding-window inference on the same CT (child process body)."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SwinUNETR
    from refnet.device import resolve_device

    ct, _ = _volume(shape, cache, "ct")
    dev = resolve_device(device)
    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=48).to(dev).eval()
    x = torch.from_numpy(np.clip((ct + 175.0) / 425.0, 0, 1).astype(np.float32))[None, None].to(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(x, (96, 96, 96), 4, net, overlap=0.5, mode="gaussian")
        logits.argmax(dim=1)
    return {"base_model_s": round(time.perf_counter() - t0, 2), "base_peak_mem_mb": round(_peak_mb(str(dev)), 1)}


def _child(kind: str, shape: tuple[int, int, int], device: str, cache: Path, batch_size: int | None = None) -> dict:
    extra = [] if batch_size is None else ["--batch-sizes", str(batch_size)]
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--shapes", "x".join(map(str, shape)),
                          "--device", device, "--cache", str(cache), *extra], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{kind} on {shape} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_child(repeat: int, *args) -> dict:
    """The refine child run ``repeat`` times (fresh processes): the run of median time, with every time.

    This VM's repeated runs differ by 10-25%; the median of a few is steadier than one. For even counts
    the lower middle run is taken, so every figure in the row comes from one real run.
    """
    runs = sorted((_child("refine", *args) for _ in range(repeat)), key=lambda r: r["refine_s"])
    return {**runs[(len(runs) - 1) // 2], "refine_s_runs": [r["refine_s"] for r in runs]}


def _shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.lower().split("x"))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"a shape is IxJxK, e.g. 256x256x100; got {text!r}")
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the smallest volume")
    parser.add_argument("--shapes", type=_shape, nargs="+", help="volume sizes (default 256x256x100 512x512x200 "
                        "512x512x400)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-base-model", action="store_true", help="skip the SwinUNETR timing")
    parser.add_argument("--base-model-shapes", type=_shape, nargs="+",
                        help="time SwinUNETR only on these shapes (default: every shape; on 2 CPU cores it takes "
                        "about 75 minutes on 512x512x200 and twice that on 512x512x400)")
    parser.add_argument("--batch-sizes", type=int, nargs="+",
                        help="also refine the first shape at each of these batch sizes (how the default was chosen)")
    parser.add_argument("--repeat", type=int, default=1, help="refine each volume N times (fresh processes) "
                        "and report the median run (default 1)")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder for speed.json")
    parser.add_argument("--child", choices=("refine", "base"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    shapes = args.shapes or (SHAPES[:1] if args.quick else SHAPES)
    if args.child:
        if args.child == "refine":
            row = measure_refine(shapes[0], args.device, Path(args.cache), (args.batch_sizes or [None])[0])
        else:
            row = measure_base_model(shapes[0], args.device, Path(args.cache))
        print(json.dumps(row))
        return 0
    base_shapes = set(args.base_model_shapes or shapes) if not args.no_base_model else set()
    rows = []
    with tempfile.TemporaryDirectory(prefix="refnet_speed_") as cache:
        for shape in shapes:
            _volume(shape, Path(cache))  # generate outside the timed children
            row = {"shape": list(shape), **_median_child(args.repeat, shape, args.device, Path(cache))}
            if shape in base_shapes:
                row.update(_child("base", shape, args.device, Path(cache)))
                row["refine_vs_base"] = round(row["refine_s"] / row["base_model_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
        batches = []
        for b in args.batch_sizes or ():
            _volume(shapes[0], Path(cache))
            batches.append({"shape": list(shapes[0]), "batch_size": b,
                            **_median_child(args.repeat, shapes[0], args.device, Path(cache), b)})
            print(json.dumps(batches[-1]), flush=True)
    import torch

    meta = {"torch_threads": torch.get_num_threads(), "cpu_count": __import__("os").cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    out = Path(args.out) / "speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": meta, "rows": rows, "batch_sizes": batches}, indent=2) + "\n")
    print(f"\n{'shape':<14}{'device':<8}{'refine s':>10}{'slices/s':>10}{'peak MB':>10}{'SwinUNETR s':>13}"
          f"{'refine/base':>13}")
    for r in rows:
        base = r.get("base_model_s")
        print(f"{'x'.join(map(str, r['shape'])):<14}{r['device']:<8}{r['refine_s']:>10.2f}{r['slices_per_s']:>10.2f}"
              f"{r['peak_mem_mb']:>10.0f}{base if base is not None else float('nan'):>13.2f}"
              f"{r.get('refine_vs_base', float('nan')):>13.3f}")
    if batches:
        print(f"\n{'batch size':>10}{'refine s':>10}{'peak MB':>10}  ({'x'.join(map(str, shapes[0]))})")
        for r in batches:
            print(f"{r['batch_size']:>10}{r['refine_s']:>10.2f}{r['peak_mem_mb']:>10.0f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
