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

Guards (:mod:`refnet.guards`) are on by default; ``--disable-guard NAME ...`` turns some off and
``--band-mm`` / ``--threshold`` override the model file's values (:func:`add_guard_arguments`,
:func:`guard_config`; ``refnet refine`` takes the same options). Every run (re)writes
``--output/refnet_batch_summary.json`` atomically after each case: the guard settings used and, per
case, its status (done, skipped, failed), the reason, the run time and the refinement report
(voxels changed per class, held back per guard, warnings). A skipped case keeps the report of the
run that refined it when the earlier summary has one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .guards import GUARD_NAMES, GuardConfig
from .io import load_volume, save_volume, stop_on_sigterm, sweep_temporaries, volume_suffix, write_json
from .labels import LABEL_SCHEMES, from_class_labels, to_class_labels
from .segfile import is_segmentation_file, read_segmentation_file, write_segmentation_file

if TYPE_CHECKING:  # the checkpoint and refine modules import torch; only load them when refining
    from .checkpoint import LoadedModel
    from .refine import ProgressCallback, RefineConfig, RefineResult

__all__ = [
    "SUMMARY_FILE",
    "BatchSummary",
    "Case",
    "SettingsMismatch",
    "add_guard_arguments",
    "build_parser",
    "find_cases",
    "guard_config",
    "guard_settings",
    "load_case_files",
    "main",
    "parse_args",
    "refine_label_map",
    "refine_label_map_with_report",
    "run_batch",
    "run_settings",
    "write_json",
]

logger = logging.getLogger(__name__)

LoadedCase = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]
"""``(labels (I, J, K), affine (4, 4), ct (I, J, K) or None)`` as returned by a case loader."""
# refine_case(labels, affine, ct) in the run's label scheme, or with scheme="refnet" for the class map of a
# segmentation file (whose segments are matched to classes by name).
RefineCase = Callable[..., "RefineResult | np.ndarray"]
"""``refine_case(labels, affine, ct) -> RefineResult`` (refined labels in the input's shape, dtype and
label scheme, plus the report), e.g. :func:`refine_label_map_with_report`; a bare array of refined
labels is accepted too (the summary then has no report for the case)."""

SUMMARY_FILE = "refnet_batch_summary.json"
"""Name of the JSON summary :func:`run_batch` writes into the output folder."""

DISABLE_ALL = "all"
"""``--disable-guard all``: every guard off (the net's raw refinement, for ablations)."""


@dataclass(frozen=True)
class Case:
    """One label map to refine and, where found, its CT."""

    name: str  # file name of the label map, also the output file name
    labels: Path
    ct: Path | None = None


@dataclass
class BatchSummary:
    """What a batch run did, case by case.

    Attributes:
        done, skipped: case names refined now / skipped because their output exists.
        failed: ``(case, reason)`` pairs.
        cases: one JSON-ready entry per case, in order: ``case``, ``status`` (done, skipped, failed),
            ``reason`` (None when done), ``seconds``, ``guards`` (settings the case was refined with)
            and ``report`` (:meth:`refnet.refine.RefineReport.to_dict`, or None).
        guards: guard settings of this run (see :func:`guard_settings`), or None when unknown.
    """

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case, reason)
    cases: list[dict[str, Any]] = field(default_factory=list)
    guards: dict[str, Any] | None = None
    settings: dict[str, Any] | None = None  # what made the outputs: model hash, label scheme, guards

    @property
    def exit_code(self) -> int:
        """0 when no case failed, else 1."""
        return 1 if self.failed else 0

    def held_back(self) -> dict[str, int]:
        """Voxels each guard held back, summed over the cases refined in this run."""
        total = dict.fromkeys(GUARD_NAMES, 0)
        for entry in self.cases:
            if entry["status"] == "done" and entry.get("report"):
                for name, count in entry["report"].get("held_back", {}).items():
                    total[name] = total.get(name, 0) + int(count)
        return total

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary: counts, guard settings, and one entry per case."""
        return {"done": len(self.done), "skipped": len(self.skipped), "failed": len(self.failed),
                "guards": self.guards, "settings": self.settings, "cases": self.cases}

    def format(self) -> str:
        """Multi-line summary: counts, what the guards held back, warnings, then each failure with its reason."""
        lines = [f"RefNet batch: {len(self.done)} done, {len(self.skipped)} skipped (output exists), "
                 f"{len(self.failed)} failed."]
        if any(e["status"] == "done" and e.get("report") for e in self.cases):
            off = {n for n in GUARD_NAMES if self.guards is not None and self.guards.get(n) is False}
            held = ", ".join(f"{n.replace('_', ' ')} {'off' if n in off else v}" for n, v in self.held_back().items())
            lines.append(f"  Guards held back (voxels, cases refined now): {held}.")
            warned = [e["case"] for e in self.cases
                      if e["status"] == "done" and e.get("report") and e["report"].get("warnings")]
            if warned:
                lines.append(f"  Warnings for {len(warned)} case(s): {', '.join(warned)} (see {SUMMARY_FILE}).")
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


def load_case_files(case: Case, *, needs_ct: bool, affine: np.ndarray | None = None,
                    shape: tuple[int, ...] | None = None) -> LoadedCase:
    """Read a case with :func:`refnet.io.load_volume`; the CT only when ``needs_ct``.

    With ``case.labels`` None only the CT is read, checked against ``affine`` and ``shape`` (the grid of
    a segmentation file read elsewhere).

    Raises:
        ValueError: CT needed but missing, or on another grid than the label map.
    """
    labels = load_volume(case.labels) if case.labels is not None else None
    if labels is not None:
        affine, shape = labels.affine, labels.array.shape
    if not needs_ct:
        return labels.array, labels.affine, None
    if case.ct is None:
        raise ValueError("the model needs the CT but none was found (imgXXXX beside labelXXXX, or --ct DIR).")
    ct = load_volume(case.ct)
    if ct.array.shape != tuple(shape) or not np.allclose(ct.affine, affine, atol=1e-3):
        raise ValueError(f"CT {case.ct.name} is on another voxel grid than the label map "
                         f"(shape {ct.array.shape} vs {tuple(shape)}); resample one onto the other.")
    return (None if labels is None else labels.array), affine, ct.array


def refine_label_map_with_report(
    labels: np.ndarray,
    affine: np.ndarray,
    ct: np.ndarray | None = None,
    *,
    model: LoadedModel,
    scheme: str = "refnet",
    config: RefineConfig | None = None,
    progress: ProgressCallback | None = None,
) -> RefineResult:
    """Refine one label map given in any known label scheme, with the report; the path every front shares.

    Args:
        labels: (I, J, K) integer label map in ``scheme`` (see :data:`refnet.labels.LABEL_SCHEMES`).
        affine: (4, 4) voxel-to-RAS affine.
        ct: (I, J, K) CT in HU, required by CT-conditioned models.
        model: a :class:`refnet.checkpoint.LoadedModel`.
        scheme: label scheme of ``labels`` and of the result.
        config: streaming and guard settings (default: every guard on, the model file's values).
        progress: ``progress(done, total)``; returning False cancels.

    Returns:
        A :class:`refnet.refine.RefineResult`: the refined label map (same shape, dtype and scheme;
        values with no RefNet class are kept) and its report (changes per class, voxels held back
        per guard, warnings).
    """
    from .refine import RefineResult, refine_volume  # torch is imported only when a case is refined

    classes, _ = to_class_labels(np.asarray(labels), scheme)
    result = refine_volume(classes, affine, model, ct=ct, config=config, progress=progress)
    return RefineResult(from_class_labels(result.labels, np.asarray(labels), scheme), result.report)


def refine_label_map(
    labels: np.ndarray,
    affine: np.ndarray,
    ct: np.ndarray | None = None,
    *,
    model: LoadedModel,
    scheme: str = "refnet",
    config: RefineConfig | None = None,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """:func:`refine_label_map_with_report` without the report: the refined label map alone.

    Returns:
        Refined label map, same shape, dtype and scheme; values with no RefNet class are kept.
    """
    return refine_label_map_with_report(labels, affine, ct, model=model, scheme=scheme, config=config,
                                        progress=progress).labels


def _earlier_entries(path: Path) -> dict[str, dict[str, Any]]:
    """Case entries of an earlier run's summary, by case name; empty when there is none or it is unreadable."""
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("cases", [])
        return {e["case"]: e for e in entries if isinstance(e, dict) and "case" in e}
    except (OSError, ValueError, AttributeError, TypeError) as err:
        logger.warning("%s from an earlier run is unreadable (%s); it is replaced.", path.name, err)
        return {}


def run_batch(
    cases: Sequence[Case],
    output_dir: str | os.PathLike,
    refine_case: RefineCase,
    *,
    needs_ct: bool = False,
    load_case: Callable[..., LoadedCase] = load_case_files,
    guards: Mapping[str, Any] | None = None,
    summary_file: str | None = SUMMARY_FILE,
    settings: Mapping[str, Any] | None = None,
) -> BatchSummary:
    """Refine each case whose output is missing, writing ``output_dir/<case name>`` atomically.

    Args:
        cases: from :func:`find_cases`.
        output_dir: created if needed.
        refine_case: ``refine_case(labels, affine, ct) -> RefineResult`` (e.g. the Slicer Logic's array
            path, or :func:`refine_label_map_with_report`); a bare refined array is accepted too.
        needs_ct: pass the CT to ``refine_case`` (the model takes it as input).
        load_case: ``load_case(case, needs_ct=...) -> (labels, affine, ct)``.
        guards: the guard settings ``refine_case`` uses (see :func:`guard_settings`), for the summary.
        summary_file: name of the JSON summary in ``output_dir``, rewritten atomically after every case;
            None writes none.
        settings: what makes the outputs (see :func:`run_settings`: model hash, label scheme, guards),
            recorded in the summary; a re-run whose settings differ from the recorded ones is refused,
            since skipping the finished cases would mix two kinds of output in one folder.

    Returns:
        The summary; a case's exception becomes a failure with its message, and the run goes on.

    Raises:
        SettingsMismatch: ``output_dir`` holds outputs made with other settings.
    """
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in sweep_temporaries(out_dir):
        logger.info("removed %s, left by an interrupted earlier run", stale.name)
    summary_path = out_dir / summary_file if summary_file else None
    earlier = _earlier_entries(summary_path) if summary_path else {}
    if summary_path is not None and settings is not None:
        _check_settings(summary_path, dict(settings), [c for c in cases if (out_dir / c.name).exists()])
    summary = BatchSummary(guards=None if guards is None else dict(guards),
                           settings=None if settings is None else dict(settings))
    for number, case in enumerate(cases, start=1):
        target = out_dir / case.name
        entry: dict[str, Any] = {"case": case.name, "status": "done", "reason": None, "seconds": None,
                                 "guards": summary.guards, "report": None}
        if target.exists():
            summary.skipped.append(case.name)
            entry.update(status="skipped", reason="output exists", guards=None)
            previous = earlier.get(case.name) or {}
            if previous.get("status") in ("done", "skipped") and previous.get("report") is not None:
                entry.update(reason="output exists; report from the run that refined it",
                             seconds=previous.get("seconds"), guards=previous.get("guards"),
                             report=previous["report"])
        else:
            _refine_one(case, target, refine_case, needs_ct, load_case, entry)
            if entry["status"] == "failed":
                summary.failed.append((case.name, entry["reason"]))
                logger.warning("case %d/%d %s failed: %s", number, len(cases), case.name, entry["reason"])
            else:
                summary.done.append(case.name)
                note = _report_note(entry["report"])
                logger.info("case %d/%d %s refined in %.1f s%s", number, len(cases), case.name,
                            entry["seconds"], note)
        summary.cases.append(entry)
        if summary_path is not None:
            _write_summary(summary_path, summary)
    return summary


class SettingsMismatch(ValueError):
    """The output folder holds results of a run with another model, label scheme or guard settings."""


def run_settings(model_path: str | os.PathLike, *, label_scheme: str, guards: Mapping[str, Any]) -> dict[str, Any]:
    """What makes a batch's outputs (for :func:`run_batch`'s ``settings``): model file SHA-256, scheme, guards."""
    digest = hashlib.sha256()
    with open(model_path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"model_sha256": digest.hexdigest(), "model": os.fspath(model_path), "label_scheme": label_scheme,
            "guards": json.loads(json.dumps(dict(guards)))}


def _check_settings(summary_path: Path, settings: dict[str, Any], finished: Sequence[Case]) -> None:
    if not finished or not summary_path.is_file():
        return
    try:
        recorded = json.loads(summary_path.read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError):
        recorded = None
    if recorded is None:
        logger.warning("%s records no settings (an older run?): the %d existing outputs are kept as they are",
                       summary_path, len(finished))
        return
    differ = sorted(k for k in settings if k != "model" and recorded.get(k) != settings[k])
    if differ:
        raise SettingsMismatch(
            f"{summary_path.parent} holds {len(finished)} outputs made with another {', '.join(differ)} "
            f"(recorded: {', '.join(f'{k}={recorded.get(k)!r}' for k in differ)}); skipping them would mix two "
            "kinds of output. Use a new --output folder, or delete the old outputs to redo them.")


def _refine_one(case: Case, target: Path, refine_case: RefineCase, needs_ct: bool,
                load_case: Callable[..., LoadedCase], entry: dict[str, Any]) -> None:
    """Load, refine and save one case; fills ``entry`` (status, reason, seconds, report)."""
    start = time.perf_counter()
    try:
        segments = read_segmentation_file(case.labels) if is_segmentation_file(case.labels) else None
        if segments is not None:  # segments matched by name, refined as RefNet classes
            ct = load_case_files(dataclasses.replace(case, labels=None), needs_ct=True, affine=segments.affine,
                                 shape=segments.masks[0].shape)[2] if needs_ct else None
            labels, affine = segments.class_map(), segments.affine
            result = refine_case(labels, affine, ct, scheme="refnet")
        else:
            labels, affine, ct = load_case(case, needs_ct=needs_ct)
            result = refine_case(labels, affine, ct)
        refined, report = (result, None) if isinstance(result, np.ndarray) else (result.labels, result.report)
        if segments is not None:
            write_segmentation_file(target, segments, refined)
        else:
            save_volume(target, refined, affine)
    except Exception as err:  # one bad case must not stop the dataset; the reason is reported
        entry.update(status="failed", reason=f"{type(err).__name__}: {err}")
        return
    finally:
        entry["seconds"] = round(time.perf_counter() - start, 3)
    entry["report"] = None if report is None else report.to_dict()


def _report_note(report: Mapping[str, Any] | None) -> str:
    if not report:
        return ""
    held = {k: v for k, v in report.get("held_back", {}).items() if v}
    changed = sum(a + r for a, r in report.get("changed", {}).values())
    text = f"; {changed} voxel changes"
    text += f", guards held back {', '.join(f'{k} {v}' for k, v in held.items())}" if held else ""
    return text  # warnings were logged by refine_volume itself


def _write_summary(path: Path, summary: BatchSummary) -> None:
    try:
        write_json(path, summary.to_dict())
    except OSError as err:  # the refined files matter more than the summary; say so and go on
        logger.warning("could not write %s: %s", path, err)


def _non_negative_mm(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of millimetres, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite distance >= 0 mm, got {text}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a probability between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a probability between 0 and 1, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a fraction of the organ's volume (e.g. 0.5), got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a fraction > 0 of the organ's volume (e.g. 0.5), got {text}")
    return value


def add_guard_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the guard options shared by ``refnet refine`` and the batch command lines.

    ``--disable-guard NAME [NAME ...]`` (repeatable; names from :data:`refnet.guards.GUARD_NAMES` or
    ``all``), ``--band-mm MM``, ``--edge-mm MM``, ``--threshold P`` and ``--max-volume-change F``; read them
    back with :func:`guard_config`.
    """
    group = parser.add_argument_group("guards", "Every guard is on by default and reported in the output.")
    group.add_argument("--disable-guard", nargs="+", action="extend", default=[], metavar="NAME",
                       choices=(*GUARD_NAMES, DISABLE_ALL),
                       help=f"turn guards off: {', '.join(GUARD_NAMES)}, or {DISABLE_ALL} (the net's raw output)")
    group.add_argument("--band-mm", type=_non_negative_mm, default=None, metavar="MM",
                       help="band guard: change only voxels within MM of an input boundary (default: the model's)")
    group.add_argument("--edge-mm", type=_non_negative_mm, default=None, metavar="MM",
                       help="edge guard: change no voxel within MM of an image edge that cuts an organ "
                            "(default: the model's)")
    group.add_argument("--threshold", type=_probability, default=None, metavar="P",
                       help="confidence guard: change a voxel only where the net's probability >= P "
                            "(default: the model's)")
    group.add_argument("--max-volume-change", type=_fraction, default=None, metavar="F",
                       help="volume guard: an organ whose volume would change by more than F (a fraction of it) "
                            "keeps its input mask (default: the model's, 0.5)")
    group.add_argument("--keep-pieces", action="store_true",
                       help="skip the model's piece decision (which drops the connected pieces it judges to be "
                            "errors, e.g. a speck of liver on the spleen); models without one are not affected")


def guard_config(args: argparse.Namespace) -> GuardConfig:
    """The :class:`refnet.guards.GuardConfig` of parsed :func:`add_guard_arguments` options.

    Raises:
        ValueError: ``--band-mm`` or ``--threshold`` given for a guard that is disabled.
    """
    off = set(args.disable_guard or ())
    if DISABLE_ALL in off:
        off = set(GUARD_NAMES)
    for option, guard, value in (("--band-mm", "band", args.band_mm), ("--threshold", "confidence", args.threshold),
                                 ("--edge-mm", "edge", getattr(args, "edge_mm", None)),
                                 ("--max-volume-change", "volume_change", getattr(args, "max_volume_change", None))):
        if value is not None and guard in off:
            raise ValueError(f"{option} sets the {guard} guard, which --disable-guard turns off; drop one of them.")
    return GuardConfig(**{name: name not in off for name in GUARD_NAMES}, band_mm=args.band_mm,
                       edge_mm=getattr(args, "edge_mm", None), threshold=args.threshold,
                       max_volume_change=getattr(args, "max_volume_change", None),
                       drop_pieces=not getattr(args, "keep_pieces", False))


def guard_settings(guards: GuardConfig, model: LoadedModel | None = None) -> dict[str, Any]:
    """Guard settings as plain values for reports: on/off per guard and each guard's value.

    Args:
        guards: the configuration used.
        model: resolves the values left at None to the model file's.
    """
    settings = dataclasses.asdict(guards)
    if model is not None:
        for name in ("band_mm", "threshold", "max_volume_change", "edge_mm"):
            settings[name] = model.guard_setting(name, guards)
    return settings


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)``: this process takes shard K (0-based) of N, e.g. ``$SLURM_ARRAY_TASK_ID/4``.

    Raises:
        argparse.ArgumentTypeError: not two integers with 0 <= K < N.
    """
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must be K/N, e.g. 0/4 for the first of 4 shards; "
                                         f"got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text}: K must be 0..N-1 (shards are numbered from 0)")
    return index, count


def shard_from_environment(shard: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The shard to take: ``--shard`` if given, else torchrun's ``RANK``/``WORLD_SIZE``, else None (all cases).

    Raises:
        ValueError: a half-set torchrun environment (one of the two variables, or values out of range).
    """
    if shard is not None:
        return shard
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None and world is None:
        return None
    if rank is None or world is None:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world}: torchrun sets both; set both or neither "
                         "(or pass --shard K/N).")
    try:
        index, count = int(rank), int(world)
    except ValueError:
        raise ValueError(f"RANK={rank!r} and WORLD_SIZE={world!r} must be integers.") from None
    if not 0 <= index < count:
        raise ValueError(f"RANK={index} must be 0..WORLD_SIZE-1 (WORLD_SIZE={count}).")
    return (index, count) if count > 1 else None


def shard_cases(cases: Sequence[Case], shard: tuple[int, int] | None) -> list[Case]:
    """This shard's share: every N-th case by name, starting at K (disjoint; N shards cover every case once)."""
    ordered = sorted(cases, key=lambda c: c.name)
    return ordered if shard is None else ordered[shard[0]::shard[1]]


def summary_name(shard: tuple[int, int] | None) -> str:
    """The summary file of a run: one per shard, so shards never write the same file."""
    return SUMMARY_FILE if shard is None else SUMMARY_FILE.replace(".json", f".shard{shard[0]}of{shard[1]}.json")


def add_batch_arguments(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    """The dataset-refinement options shared by ``refnet-batch``, ``refnet refine-dataset`` and the Slicer script.

    ``device=False`` leaves out ``--device`` for a parser that has it already (the ``refnet`` command).
    """
    parser.add_argument("--input", required=True, type=Path,
                        help="folder of label maps (or a BTCV root with label/ and img/)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the refined label maps")
    parser.add_argument("--model", type=Path, default=None, help="RefNet model file (default: the shipped model)")
    parser.add_argument("--ct", type=Path, default=None, help="folder of CTs named like the label maps")
    if device:
        parser.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda or cuda:N")
    parser.add_argument("--label-scheme", default="refnet", choices=sorted(LABEL_SCHEMES),
                        help="numbering of the input label maps (default: refnet)")
    parser.add_argument("--shard", type=parse_shard, default=None, metavar="K/N",
                        help="take shard K (0-based) of N: every N-th case by name from K, for job arrays; under "
                             "torchrun RANK/WORLD_SIZE set it")
    add_guard_arguments(parser)


def build_parser(prog: str = "refnet-batch") -> argparse.ArgumentParser:
    """The batch command line shared by plain Python and the Slicer batch script."""
    parser = argparse.ArgumentParser(prog=prog, description="Refine every label map of a folder with RefNet.")
    add_batch_arguments(parser)
    return parser


def parse_args(argv: Sequence[str], *, prog: str = "refnet-batch") -> argparse.Namespace:
    """Parse and cross-check batch arguments; exits with status 2 on bad input (argparse)."""
    parser = build_parser(prog)
    args = parser.parse_args(list(argv))
    try:
        check_batch_args(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def check_batch_args(args: argparse.Namespace) -> None:
    """Cross-check parsed batch arguments before any work.

    Raises:
        ValueError: the input is not a folder, the output is the input, no model file, bad guard values.
    """
    if args.input.is_file():
        raise ValueError(f"--input {args.input}: is a file, not a folder; give the folder that holds the label maps "
                         "(for one file use `refnet refine`).")
    if not args.input.is_dir():
        raise ValueError(f"--input {args.input}: no such folder.")
    inputs = {args.input.resolve(), (args.input / "label").resolve()}
    if args.output.resolve() in inputs:
        raise ValueError("--output must differ from --input: RefNet never writes over the input label maps.")
    if args.model is not None and not args.model.is_file():
        raise ValueError(f"--model {args.model}: no such file.")
    guard_config(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Plain-Python batch entry point: ``python -m refnet.batch --input DIR --output DIR``.

    Returns:
        0 when every case was refined or skipped, 1 when a case (or the model) failed; bad
        arguments exit with 2.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_from_args(parse_args(sys.argv[1:] if argv is None else argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Refine the dataset the parsed batch arguments name (this process's shard of it); the exit status."""
    stop_on_sigterm()
    try:
        from .checkpoint import default_model_path, load_model

        shard = shard_from_environment(args.shard)
        model = load_model(args.model, device=args.device)
        cases = shard_cases(find_cases(args.input, ct_dir=args.ct), shard)
    except ImportError as err:
        logger.error("RefNet batch: %s. Install PyTorch first (pip install torch; in Slicer: the PyTorch "
                     "extension), then run again.", err)
        return 1
    except (FileNotFoundError, ValueError) as err:
        logger.error("RefNet batch: %s", err)
        return 1
    if not cases:
        if shard is not None and find_cases(args.input, ct_dir=args.ct):
            logger.info("RefNet batch: shard %d of %d has no case (fewer cases than shards).", *shard)
            return 0
        logger.error("RefNet batch: no label maps (.nii, .nii.gz, .nrrd) found in %s.", args.input)
        return 1

    from .refine import RefineConfig

    guards = guard_config(args)
    config = RefineConfig(guards=guards)

    def refine_case(labels, affine, ct, scheme=None):  # scheme: "refnet" for a segmentation file's class map
        return refine_label_map_with_report(labels, affine, ct, model=model, scheme=scheme or args.label_scheme,
                                            config=config)

    settings = guard_settings(guards, model)
    try:
        if shard is not None:
            logger.info("shard %d of %d: %d cases", shard[0], shard[1], len(cases))
        summary = run_batch(cases, args.output, refine_case, needs_ct=model.uses_ct, guards=settings,
                            summary_file=summary_name(shard),
                            settings=run_settings(args.model or default_model_path(), label_scheme=args.label_scheme,
                                                  guards=settings))
    except SettingsMismatch as err:
        logger.error("RefNet batch: %s", err)
        return 2
    except KeyboardInterrupt:
        logger.error("RefNet batch: interrupted; finished cases are complete, a re-run refines the rest.")
        return 130
    logger.info("%s", summary.format())
    logger.info("Summary with the report of every case: %s", args.output / SUMMARY_FILE)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
