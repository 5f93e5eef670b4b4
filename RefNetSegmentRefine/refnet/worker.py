"""Refine one job folder in a process of its own: the Slicer module's background run.

Run in-process, a refinement can only be cancelled between slice batches and the GUI is redrawn only
there; in a separate process (as SlicerMONAIAuto3DSeg and SlicerTotalSegmentator run their models) the
GUI stays live, Cancel kills the process at any moment, and nothing in the scene changes until the
result is read back. The job folder is the whole interface:

- ``job.json``: ``{"model": path or null (the shipped model), "device": "auto"|"cpu"|"cuda", "guards":
  GuardConfig fields}``;
- ``input.npz``: ``labels`` ((I, J, K) RefNet classes), ``affine`` ((4, 4) voxel-to-RAS), optional ``ct``;
- the worker prints ``progress DONE TOTAL`` lines (flushed) and, on success, writes ``output.npz``
  (``labels``) and ``report.json`` (the refinement report) atomically, then exits 0; on failure it prints
  ``error: <message>`` and exits 1, writing nothing.

    python -m refnet.worker JOB_DIR
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["PROGRESS_PREFIX", "main", "parse_progress", "read_result", "run_job", "write_job"]

PROGRESS_PREFIX = "progress "


def write_job(folder: str | os.PathLike, labels: np.ndarray, affine: np.ndarray, ct: np.ndarray | None = None, *,
              model_path: str | None = None, device: str = "auto", guards: Any = None) -> Path:
    """Write a job folder for :func:`run_job` (``guards``: a GuardConfig, None = every guard on)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"labels": np.asarray(labels, dtype=np.uint8), "affine": np.asarray(affine, dtype=np.float64)}
    if ct is not None:
        arrays["ct"] = np.asarray(ct, dtype=np.float32)
    np.savez(folder / "input.npz", **arrays)
    job = {"model": None if model_path is None else str(model_path), "device": device,
           "guards": None if guards is None else asdict(guards)}
    (folder / "job.json").write_text(json.dumps(job, indent=2) + "\n")
    return folder


def parse_progress(line: str) -> tuple[int, int] | None:
    """``(done, total)`` from a worker's progress line, else None (any other output line)."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        done, total = (int(v) for v in line[len(PROGRESS_PREFIX):].split())
    except ValueError:
        return None
    return done, total


def run_job(folder: str | os.PathLike, *, out: IO[str] | None = None) -> int:
    """Refine the job in ``folder``; returns the exit status (0 done, 1 failed: message on ``out``)."""
    from .checkpoint import load_model
    from .guards import GuardConfig
    from .io import write_json
    from .refine import RefineConfig, refine_volume

    out = out or sys.stdout
    folder = Path(folder)
    try:
        job = json.loads((folder / "job.json").read_text())
        data = np.load(folder / "input.npz")
        guards = GuardConfig(**job["guards"]) if job.get("guards") else GuardConfig()
        model = load_model(job.get("model"), device=job.get("device", "auto"))
        ct = data["ct"] if "ct" in data.files and model.uses_ct else None  # the GUI sends it for any model

        def progress(done: int, total: int) -> bool:
            print(f"{PROGRESS_PREFIX}{done} {total}", file=out, flush=True)
            return True

        result = refine_volume(data["labels"], data["affine"], model, ct=ct, config=RefineConfig(guards=guards),
                               progress=progress)
        tmp = folder / ".output.tmp.npz"
        np.savez(tmp, labels=result.labels)
        write_json(folder / "report.json", {**result.report.to_dict(), "device": str(model.device)})
        os.replace(tmp, folder / "output.npz")  # last: its presence means the job is complete
    except Exception as err:  # the parent shows the message; it must never see a partial result
        print(f"error: {type(err).__name__}: {err}", file=out, flush=True)
        return 1
    return 0


def read_result(folder: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """``(refined labels, report dict)`` of a finished job.

    Raises:
        FileNotFoundError: the job did not finish (no ``output.npz``).
    """
    folder = Path(folder)
    labels = np.load(folder / "output.npz")["labels"]
    return labels, json.loads((folder / "report.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """``python -m refnet.worker JOB_DIR``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m refnet.worker JOB_DIR", file=sys.stderr)
        return 2
    return run_job(args[0])


if __name__ == "__main__":
    sys.exit(main())
