"""Train a RefNet model headlessly through the RefNetSegmentRefine Logic (or, without Slicer, the core).

Usage::

    Slicer --no-main-window --python-script RefNetTrain.py -- --data DIR --predictions DIR [DIR ...]
        --out MODEL.pt [--preset demo|paper] [--ct] [--pieces | --pieces-ct] [--epochs N] [--device auto|cpu|cuda] [...]
    python RefNetTrain.py --data DIR --predictions DIR [DIR ...] --out MODEL.pt [...]

The arguments are ``refnet train``'s (``--help`` lists them). Inside Slicer the training runs through
``RefNetSegmentRefineLogic.train``, so it is the module's own code path; in plain Python the same core
function is called directly. Then choose ``MODEL.pt`` under Model in the module (untick *Shipped model*).
Exit status: 0 trained, 1 failed (message logged), 2 bad arguments.
"""

from __future__ import annotations

import logging
import os
import sys

_SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(_SCRIPTS_DIR), _SCRIPTS_DIR):  # refnet/ + the module, and RefNetBatchRefine
    if _path not in sys.path:
        sys.path.insert(0, _path)

from RefNetBatchRefine import exitApplication, missingPackages, scriptArguments  # noqa: E402

_OVERRIDES = ("optimizer", "lr", "epochs", "steps_per_epoch", "batch_size", "raw_weight", "val_cases", "seed",
              "device", "simulated_pairs", "channels_last")


def main(argv: list[str]) -> int:
    """Parse ``refnet train``'s arguments and train; returns the exit status."""
    missing = missingPackages()
    if missing:
        logging.error("RefNet training: these Python packages are missing: %s. Open the RefNet Segment Refine "
                      "module once in Slicer and accept the installation, or pip install them.", ", ".join(missing))
        return 1
    from refnet.cli import _parser

    try:
        args = _parser().parse_args(["train", *scriptArguments(argv)])
    except SystemExit as done:  # --help (0) or bad arguments (2), message already printed
        return int(done.code or 0)
    overrides = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k, None) is not None}
    try:
        import importlib.util

        if importlib.util.find_spec("slicer") is None:  # plain Python: no Slicer, the same core function
            from refnet.cli import _train_config
            from refnet.train import train_from_folders

            out = train_from_folders(args.data, args.predictions, args.out, config=_train_config(args),
                                     work_dir=args.work_dir, scheme=args.label_scheme, progress=args.progress,
                                     extra_label_dirs=args.extra_labels or (), extra_scheme=args.extra_labels_scheme,
                                     pieces=args.pieces, pieces_ct=args.pieces_ct)
        else:
            from RefNetSegmentRefine import RefNetSegmentRefineLogic

            out = RefNetSegmentRefineLogic().train(
                args.data, args.predictions, args.out, preset=args.preset, useCt=args.ct,
                labelScheme=args.label_scheme, extraLabelDirs=tuple(args.extra_labels or ()),
                extraLabelsScheme=args.extra_labels_scheme, workDir=args.work_dir, progress=args.progress,
                pieces=args.pieces, piecesCt=args.pieces_ct, **overrides)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        logging.error("RefNet training: %s", err)
        return 1
    logging.info("RefNet model written: %s", out)
    print(out)
    return 0


if __name__ == "__main__":
    _status = 1
    try:
        _status = main(sys.argv)
    except Exception:  # Slicer must exit with a failure status instead of hanging
        logging.exception("RefNet training failed")
    finally:
        exitApplication(_status)
