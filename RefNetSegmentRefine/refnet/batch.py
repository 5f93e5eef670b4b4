"""Refine every case of a dataset folder: the Slicer-free core of the batch scripts.

Used twice with the same rules: by ``Scripts/RefNetBatchRefine.py`` inside Slicer (which passes the
module Logic's array path and Slicer's file readers) and from plain Python
(``python -m refnet.batch --input DIR --output DIR``).

Case discovery (documented in :func:`find_cases`):

- label maps are the NIfTI/NRRD files in ``--input``, or in ``--input/label`` when that folder exists
  (the BTCV/Synapse layout ``img/imgXXXX.nii.gz`` + ``label/labelXXXX.nii.gz``);
- files whose name starts with ``img`` are CTs, never label maps;
- the CT of ``labelXXXX.ext`` is ``imgXXXX.*`` beside it or in the sibling ``img`` folder; the CT of
  any other ``NAME.ext`` is ``NAME.*`` in the ``--ct`` folder (same-name files). The CT is read
  only when the model takes it as input.

Each output has the input's file name in ``--output``, is written atomically (temporary file, then
rename), and a re-run skips cases whose output exists. A failing case is recorded with its reason
and the run goes on; the exit code is 1 when any case failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .io import load_volume, save_volume, volume_suffix
from .labels import LABEL_SCHEMES, from_class_labels, to_class_labels

if TYPE_CHECKING:  # the checkpoint and refine modules import torch; only load them when refining
    from .checkpoint import LoadedModel
    from .refine import ProgressCallback

__all__ = [
    "BatchSummary",
    "Case",
    "build_parser",
    "find_cases",
    "load_case_files",
    "main",
    "parse_args",
    "refine_label_map",
    "run_batch",
]

logger = logging.getLogger(__name__)

LoadedCase = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]
"""``(labels (I, J, K), affine (4, 4), ct (I, J, K) or None)`` as returned by a case loader."""
RefineCase = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]
"""``refine_case(labels, affine, ct) -> refined labels`` (same shape, dtype and label scheme)."""


@dataclass(frozen=True)
class Case:
    """One label map to refine and, where found, its CT."""

    name: str  # file name of the label map, also the output file name
    labels: Path
    ct: Path | None = None


@dataclass
class BatchSummary:
    """What a batch run did, case by case."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case, reason)

    @property
    def exit_code(self) -> int:
        """0 when no case failed, else 1."""
        return 1 if self.failed else 0

    def format(self) -> str:
        """Multi-line summary: counts, then each failure with its reason."""
        lines = [f"RefNet batch: {len(self.done)} done, {len(self.skipped)} skipped (output exists), "
                 f"{len(self.failed)} failed."]
        lines += [f"  FAILED {name}: {reason}" for name, reason in self.failed]
        return "\n".join(lines)


def _is_volume(path: Path) -> bool:
    if not path.is_file() or path.name.startswith("."):
        return False
    try:
        volume_suffix(path)
    except ValueError:
        return False
    return True


def _stem(path: Path) -> str:
    return path.name[: -len(volume_suffix(path))]


def _find_volume(folder: Path | None, stem: str) -> Path | None:
    if folder is None or not folder.is_dir():
        return None
    matches = sorted(p for p in folder.iterdir() if _is_volume(p) and _stem(p) == stem)
    return matches[0] if matches else None


def find_cases(input_dir: str | os.PathLike, *, ct_dir: str | os.PathLike | None = None) -> list[Case]:
    """List the label maps of a dataset folder with their CTs (rules in the module docstring).

    Raises:
        FileNotFoundError: ``input_dir`` is not a folder.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder; --input must be a folder of label maps.")
    label_dir = root / "label" if (root / "label").is_dir() else root
    cases = []
    for path in sorted(p for p in label_dir.iterdir() if _is_volume(p) and not p.name.startswith("img")):
        stem = _stem(path)
        ct = None
        if stem.startswith("label"):
            ct_stem = "img" + stem[len("label"):]
            ct = _find_volume(label_dir, ct_stem) or _find_volume(label_dir.parent / "img", ct_stem)
        if ct is None and ct_dir is not None:
            ct = _find_volume(Path(ct_dir), stem)
        cases.append(Case(name=path.name, labels=path, ct=ct))
    return cases


def load_case_files(case: Case, *, needs_ct: bool) -> LoadedCase:
    """Read a case with :func:`refnet.io.load_volume`; the CT only when ``needs_ct``.

    Raises:
        ValueError: CT needed but missing, or on another grid than the label map.
    """
    labels = load_volume(case.labels)
    if not needs_ct:
        return labels.array, labels.affine, None
    if case.ct is None:
        raise ValueError("the model needs the CT but none was found (imgXXXX beside labelXXXX, or --ct DIR).")
    ct = load_volume(case.ct)
    if ct.array.shape != labels.array.shape or not np.allclose(ct.affine, labels.affine, atol=1e-3):
        raise ValueError(f"CT {case.ct.name} is on another voxel grid than the label map "
                         f"(shape {ct.array.shape} vs {labels.array.shape}); resample one onto the other.")
    return labels.array, labels.affine, ct.array


def refine_label_map(
    labels: np.ndarray,
    affine: np.ndarray,
    ct: np.ndarray | None = None,
    *,
    model: LoadedModel,
    scheme: str = "refnet",
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Refine one label map given in any known label scheme; the array path shared by every front.

    Args:
        labels: (I, J, K) integer label map in ``scheme`` (see :data:`refnet.labels.LABEL_SCHEMES`).
        affine: (4, 4) voxel-to-RAS affine.
        ct: (I, J, K) CT in HU, required by CT-conditioned models.
        model: a :class:`refnet.checkpoint.LoadedModel`.
        scheme: label scheme of ``labels`` and of the result.
        progress: ``progress(done, total)``; returning False cancels.

    Returns:
        Refined label map, same shape, dtype and scheme; values with no RefNet class are kept.
    """
    from .refine import refine_labels  # torch is imported only when a case is refined

    classes, _ = to_class_labels(np.asarray(labels), scheme)
    refined = refine_labels(classes, affine, model, ct=ct, progress=progress)
    return from_class_labels(refined, np.asarray(labels), scheme)


def run_batch(
    cases: Sequence[Case],
    output_dir: str | os.PathLike,
    refine_case: RefineCase,
    *,
    needs_ct: bool = False,
    load_case: Callable[..., LoadedCase] = load_case_files,
) -> BatchSummary:
    """Refine each case whose output is missing, writing ``output_dir/<case name>`` atomically.

    Args:
        cases: from :func:`find_cases`.
        output_dir: created if needed.
        refine_case: ``refine_case(labels, affine, ct) -> refined`` (e.g. the Slicer Logic's array path).
        needs_ct: pass the CT to ``refine_case`` (the model takes it as input).
        load_case: ``load_case(case, needs_ct=...) -> (labels, affine, ct)``.

    Returns:
        The summary; a case's exception becomes a failure with its message, and the run goes on.
    """
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = BatchSummary()
    for number, case in enumerate(cases, start=1):
        target = out_dir / case.name
        if target.exists():
            summary.skipped.append(case.name)
            continue
        start = time.perf_counter()
        try:
            labels, affine, ct = load_case(case, needs_ct=needs_ct)
            refined = refine_case(labels, affine, ct)
            save_volume(target, refined, affine)
        except Exception as err:  # one bad case must not stop the dataset; the reason is reported
            reason = f"{type(err).__name__}: {err}"
            summary.failed.append((case.name, reason))
            logger.warning("case %d/%d %s failed: %s", number, len(cases), case.name, reason)
            continue
        summary.done.append(case.name)
        logger.info("case %d/%d %s refined in %.1f s", number, len(cases), case.name, time.perf_counter() - start)
    return summary


def build_parser(prog: str = "refnet-batch") -> argparse.ArgumentParser:
    """The batch command line shared by plain Python and the Slicer batch script."""
    parser = argparse.ArgumentParser(prog=prog, description="Refine every label map of a folder with RefNet.")
    parser.add_argument("--input", required=True, type=Path,
                        help="folder of label maps (or a BTCV root with label/ and img/)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the refined label maps")
    parser.add_argument("--model", type=Path, default=None, help="RefNet model file (default: the shipped model)")
    parser.add_argument("--ct", type=Path, default=None, help="folder of CTs named like the label maps")
    parser.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda or cuda:N")
    parser.add_argument("--label-scheme", default="refnet", choices=sorted(LABEL_SCHEMES),
                        help="numbering of the input label maps (default: refnet)")
    return parser


def parse_args(argv: Sequence[str], *, prog: str = "refnet-batch") -> argparse.Namespace:
    """Parse and cross-check batch arguments; exits with status 2 on bad input (argparse)."""
    parser = build_parser(prog)
    args = parser.parse_args(list(argv))
    if not args.input.is_dir():
        parser.error(f"--input {args.input}: no such folder.")
    inputs = {args.input.resolve(), (args.input / "label").resolve()}
    if args.output.resolve() in inputs:
        parser.error("--output must differ from --input: RefNet never writes over the input label maps.")
    if args.model is not None and not args.model.is_file():
        parser.error(f"--model {args.model}: no such file.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Plain-Python batch entry point: ``python -m refnet.batch --input DIR --output DIR``.

    Returns:
        0 when every case was refined or skipped, 1 when a case (or the model) failed; bad
        arguments exit with 2.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from .checkpoint import load_model

        model = load_model(args.model, device=args.device)
        cases = find_cases(args.input, ct_dir=args.ct)
    except ImportError as err:
        logger.error("RefNet batch: %s. Install PyTorch first (pip install torch; in Slicer: the PyTorch "
                     "extension), then run again.", err)
        return 1
    except (FileNotFoundError, ValueError) as err:
        logger.error("RefNet batch: %s", err)
        return 1
    if not cases:
        logger.error("RefNet batch: no label maps (.nii, .nii.gz, .nrrd) found in %s.", args.input)
        return 1

    def refine_case(labels, affine, ct):
        return refine_label_map(labels, affine, ct, model=model, scheme=args.label_scheme)

    summary = run_batch(cases, args.output, refine_case, needs_ct=model.uses_ct)
    logger.info("%s", summary.format())
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
