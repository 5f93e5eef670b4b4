"""Refine every case of a dataset folder inside 3D Slicer, through the RefNetSegmentRefine Logic.

Usage::

    Slicer --no-main-window --python-script RefNetBatchRefine.py -- --input DIR --output DIR
        [--model FILE] [--ct DIR] [--device auto|cpu|cuda] [--label-scheme refnet|btcv|totalsegmentator|flare22|word]
        [--disable-guard NAME ...] [--band-mm MM] [--edge-mm MM] [--threshold P] [--max-volume-change F]

Each label map (and, for models that take the CT, its CT) is read with Slicer's readers, refined with
``RefNetSegmentRefineLogic.refineArraysWithReport`` (the same array path as plain Python's
``python -m refnet.batch``) and written atomically to ``--output`` under the same file name; a re-run
skips cases whose output exists. Case discovery, resume, the guard options and the summary (logged,
and written with every case's report to ``--output/refnet_batch_summary.json``) are :mod:`refnet.batch`'s.
The script always ends with ``slicer.util.exit(status)``: 0 when every case was refined or skipped,
1 when a case (or the model) failed, 2 for bad arguments.

Only :func:`loadCaseWithSlicer` and the part of :func:`main` after argument parsing need Slicer;
the rest imports in plain Python (see Testing/test_batch.py).
"""

from __future__ import annotations

import logging
import os
import sys

_MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _MODULE_DIR not in sys.path:  # the module folder holds refnet/ and RefNetSegmentRefine.py
    sys.path.insert(0, _MODULE_DIR)


REQUIREMENTS_PATH = os.path.join(_MODULE_DIR, "Resources", "requirements.txt")


def missingPackages(requirementsPath: str = REQUIREMENTS_PATH) -> list[str]:
    """The packages the core needs that this Python cannot import, found without importing the core.

    A fresh Slicer has no nibabel or monai (the module installs them on first use), and importing
    :mod:`refnet` there would end in a ModuleNotFoundError traceback instead of a hint.
    """
    import importlib.util
    import re

    names = ["torch"]
    with open(requirementsPath, encoding="utf-8") as file:
        for line in file:
            text = line.split("#", 1)[0].strip()
            if text:
                names.append(re.split(r"[<>=!~; \[]", text, maxsplit=1)[0])
    imports = {"pynrrd": "nrrd"}  # distribution name -> import name where they differ
    return [n for n in names if importlib.util.find_spec(imports.get(n, n)) is None]


def scriptArguments(argv: list[str]) -> list[str]:
    """The script's own arguments: those after the first ``--``, else all after the script name.

    Slicer passes ``sys.argv = [script, *arguments after --python-script script]``.
    """
    args = list(argv[1:])
    return args[args.index("--") + 1:] if "--" in args else args


def loadCaseWithSlicer(case, *, needs_ct: bool):
    """Read a case with Slicer's readers into (I, J, K) arrays; the loaded nodes are removed again.

    Returns:
        ``(labels, affine, ct or None)`` like :func:`refnet.batch.load_case_files`.
    """
    import numpy as np
    import slicer

    from RefNetSegmentRefine import RefNetSegmentRefineLogic

    nodes = []
    try:
        labelNode = slicer.util.loadLabelVolume(str(case.labels), {"show": False})
        nodes.append(labelNode)
        labels = np.array(slicer.util.arrayFromVolume(labelNode)).transpose(2, 1, 0)
        affine = RefNetSegmentRefineLogic.ijkToRas(labelNode)
        if not needs_ct:
            return labels, affine, None
        if case.ct is None:
            raise ValueError("the model needs the CT but none was found (imgXXXX beside labelXXXX, or --ct DIR).")
        ctNode = slicer.util.loadVolume(str(case.ct), {"show": False})
        nodes.append(ctNode)
        ct = np.array(slicer.util.arrayFromVolume(ctNode), dtype=np.float32).transpose(2, 1, 0)
        if ct.shape != labels.shape or not np.allclose(RefNetSegmentRefineLogic.ijkToRas(ctNode), affine, atol=1e-3):
            raise ValueError(f"CT {case.ct.name} is on another voxel grid than the label map; resample it first.")
        return labels, affine, ct
    finally:
        for node in nodes:
            slicer.mrmlScene.RemoveNode(node)


def main(argv: list[str]) -> int:
    """Parse arguments, refine the dataset through the module Logic, log the summary; returns the exit status."""
    missing = missingPackages()
    if missing:
        logging.error("RefNet batch: these Python packages are missing: %s. Open the RefNet Segment Refine "
                      "module once in Slicer and accept the installation (PyTorch comes from the PyTorch "
                      "extension), or in Slicer's Python console run slicer.util.pip_install(%r).",
                      ", ".join(missing), " ".join(m for m in missing if m != "torch"))
        return 1
    from refnet import batch

    try:
        args = batch.parse_args(scriptArguments(argv), prog="RefNetBatchRefine")
    except SystemExit as done:  # argparse: --help (0) or bad arguments (2), message already printed
        return int(done.code or 0)
    try:
        from RefNetSegmentRefine import RefNetSegmentRefineLogic
    except ImportError as err:
        logging.error("RefNet batch: run this script inside Slicer (%s); in plain Python use "
                      "`python -m refnet.batch`.", err)
        return 1
    logic = RefNetSegmentRefineLogic()
    guards = batch.guard_config(args)  # checked by parse_args
    try:
        model = logic.loadModel(str(args.model) if args.model else None, args.device)
        shard = batch.shard_from_environment(args.shard)  # --shard K/N for job arrays
        cases = batch.shard_cases(batch.find_cases(args.input, ct_dir=args.ct), shard)
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        logging.error("RefNet batch: %s", err)
        return 1
    if not cases:
        if shard is not None and batch.find_cases(args.input, ct_dir=args.ct):
            logging.info("RefNet batch: shard %d of %d has no case (fewer cases than shards).", *shard)
            return 0
        logging.error("RefNet batch: no label maps (.nii, .nii.gz, .nrrd) found in %s.", args.input)
        return 1

    def refineCase(labels, affine, ct, scheme=None):  # scheme "refnet": a .seg.nrrd's class map
        return logic.refineArraysWithReport(labels, affine, ct, model=model, labelScheme=scheme or args.label_scheme,
                                            guards=guards)

    from refnet.checkpoint import default_model_path

    settings = batch.guard_settings(guards, model)
    try:
        summary = batch.run_batch(cases, args.output, refineCase, needs_ct=model.uses_ct, load_case=loadCaseWithSlicer,
                                  guards=settings, summary_file=batch.summary_name(shard), settings=batch.run_settings(
                                      args.model or default_model_path(), label_scheme=args.label_scheme,
                                      guards=settings))
    except batch.SettingsMismatch as err:
        logging.error("RefNet batch: %s", err)
        return 2
    logging.info("%s", summary.format())
    logging.info("Summary with the report of every case: %s", args.output / batch.SUMMARY_FILE)
    return summary.exit_code


def exitApplication(status: int) -> None:
    """End Slicer with ``status`` (it does not exit by itself after --python-script); plain Python: sys.exit."""
    try:
        import slicer
    except ImportError:
        sys.exit(status)
    slicer.util.exit(status)


if __name__ == "__main__":
    _status = 1
    try:
        _status = main(sys.argv)
    except Exception:  # whatever happens, Slicer must exit with a failure status instead of hanging
        logging.exception("RefNet batch failed")
    finally:
        exitApplication(_status)
