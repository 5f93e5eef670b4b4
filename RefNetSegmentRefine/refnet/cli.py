"""The ``refnet`` command: thin argparse subcommands over the library, one library call each."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

logger = logging.getLogger("refnet")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _scheme(text: str) -> str:
    from .labels import scheme_mapping

    try:
        scheme_mapping(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def _cmd_phantoms(args: argparse.Namespace) -> int:
    from .data.btcv import BTCV_TEST_IDS, BTCV_TRAIN_IDS
    from .data.phantoms import PhantomConfig, write_phantom_dataset

    config = PhantomConfig.demo() if args.preset == "demo" else PhantomConfig()
    ids = list(BTCV_TRAIN_IDS[: args.train]) + list(BTCV_TEST_IDS[: args.test])
    out = write_phantom_dataset(args.out, ids, config=config, seed=args.seed)
    logger.info("wrote %d phantom cases to %s", len(ids), out)
    return 0


def _cmd_train_segmenters(args: argparse.Namespace) -> int:
    from .pipeline import train_segmenters
    from .segmenters import SegmenterConfig

    configs = [SegmenterConfig.demo(a, seed=i) for i, a in enumerate(args.architectures)]
    if args.steps or args.spacing:
        from dataclasses import replace

        configs = [replace(c, steps=args.steps or c.steps, spacing_mm=args.spacing and tuple(args.spacing),
                           name=None) for c in configs]
    holdout = []
    if args.hold_out:
        from .data.btcv import find_cases, split_cases
        from .train import validation_cases

        holdout = validation_cases([c.case_id for c in split_cases(find_cases(args.data), "train")], args.hold_out)
    folders = train_segmenters(args.data, args.out, configs, holdout=holdout, folds=args.folds, device=args.device,
                               progress=args.progress)
    for f in folders:
        print(f)
    return 0


def _train_config(args: argparse.Namespace):
    from dataclasses import replace

    from .pipeline import DemoConfig
    from .train import TrainConfig

    config = DemoConfig().train if args.preset == "demo" else TrainConfig()
    overrides = {k: getattr(args, k) for k in ("optimizer", "lr", "epochs", "steps_per_epoch", "batch_size",
                                               "raw_weight", "val_cases", "seed", "device", "simulated_pairs")
                 if getattr(args, k) is not None}
    model: dict = {}
    if args.ct:
        model["ct_channels"] = 1
    if getattr(args, "components", False):
        model["component_channel"] = True
    if getattr(args, "position", False):
        model["position_channels"] = True
    if model:
        overrides["model"] = replace(config.model, **model)
    if getattr(args, "channels_last", False):
        overrides["channels_last"] = True
    return replace(config, **overrides) if overrides else config


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train_from_folders

    out = train_from_folders(args.data, args.predictions, args.out, config=_train_config(args),
                             work_dir=args.work_dir, scheme=args.label_scheme, progress=args.progress,
                             extra_label_dirs=args.extra_labels or (), extra_scheme=args.extra_labels_scheme,
                             pieces=args.pieces, pieces_ct=args.pieces_ct)
    print(out)
    return 0


def _cmd_pieces(args: argparse.Namespace) -> int:
    from .checkpoint import load_model, save_model
    from .pairs import load_training_pairs
    from .pieces import fit_on_pairs

    out = Path(args.out)
    if args.model and out.resolve() == Path(args.model).resolve():
        raise ValueError(f"--out {out} is the --model file; choose a new file so the model you have is kept.")
    if out.suffix != ".pt":
        raise ValueError(f"--out {out}: a model file ends in .pt; name it e.g. {out.with_suffix('.pt').name}.")
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {out} exists; choose a new file, or pass --overwrite to replace it.")
    model = load_model(args.model)
    pairs = load_training_pairs(args.data, args.predictions, scheme=args.label_scheme, with_ct=args.ct)
    decider = fit_on_pairs(pairs, seed=args.seed, provenance={"data": str(args.data)}, with_ct=args.ct)
    save_model(out, model.net, metadata=model.metadata, pieces=decider)
    cv = decider.provenance["cross_validation"]
    print(f"piece decider fitted on {decider.provenance['maps']} maps ({decider.provenance['pieces']} pieces); "
          f"cut-off {decider.threshold} by cross-validation (held-out mean organ Dice gain per cut-off: "
          f"{cv.get('mean_organ_dice_gain_sum')}); whole-class cut-off for classes under the floor "
          f"{decider.class_threshold} (gain per cut-off: {cv.get('class_gain_sum')})")
    print(out)
    return 0


def _cmd_refine(args: argparse.Namespace) -> int:
    from .batch import guard_config, guard_settings, refine_label_map_with_report, write_json
    from .checkpoint import load_model
    from .io import Volume, check_output_path, check_writable, load_volume, save_volume
    from .refine import RefineConfig
    from .segfile import is_segmentation_file, read_segmentation_file, write_segmentation_file
    from .segments import format_guards

    guards = guard_config(args)
    out = Path(args.out)
    inputs = {Path(args.labels).resolve(), *([Path(args.ct).resolve()] if args.ct else [])}
    if out.resolve() in inputs:
        raise ValueError(f"--out {out} is one of the inputs; choose a new file so the input is kept.")
    if args.report and Path(args.report).resolve() in {*inputs, out.resolve()}:
        raise ValueError(f"--report {args.report} is one of the volumes; choose a new .json file.")
    check_output_path(out, overwrite=args.overwrite)  # before minutes of work, not after
    if args.report:
        check_writable(args.report)
    segments = None
    if is_segmentation_file(args.labels) != is_segmentation_file(out):
        raise ValueError(f"--labels {args.labels} and --out {out} must both be Slicer segmentations (.seg.nrrd) or "
                         "both label maps, so every segment's name and colour survive.")
    if is_segmentation_file(args.labels):  # segments matched to classes by name; refined as RefNet classes
        segments = read_segmentation_file(args.labels)
        labels = Volume(segments.class_map(), segments.affine)
        if segments.unmatched:
            print(f"Copied unchanged (no RefNet class): {', '.join(segments.unmatched)}.")
    else:
        labels = load_volume(args.labels)
    ct = load_volume(args.ct) if args.ct else None
    if ct is not None and (ct.array.shape != labels.array.shape or not _same_grid(ct.affine, labels.affine)):
        raise ValueError(f"{args.ct} and {args.labels} are on different grids ({_grid_difference(ct, labels)}); "
                         "resample the label map onto the CT first.")
    model = load_model(args.model, device=args.device)
    if ct is not None and not model.uses_ct:
        logger.warning("this model reads only the label map; --ct %s is not used", args.ct)
    bar = _slice_bar(args.progress)
    result = refine_label_map_with_report(labels.array, labels.affine, None if ct is None else ct.array,
                                          model=model, scheme="refnet" if segments else args.label_scheme,
                                          config=RefineConfig(batch_size=args.batch_size, guards=guards,
                                                              precision=args.precision, compile=args.compile),
                                          progress=bar)
    if bar is not None:
        bar.close()
    if segments is not None:
        write_segmentation_file(out, segments, result.labels)
    else:
        save_volume(out, result.labels, labels.affine)
    report = result.report
    changed = ", ".join(f"{name} +{a} -{r}" for name, (a, r) in report.changed.items()) or "none"
    print(f"refined {args.labels} -> {out} ({int((result.labels != labels.array).sum())} voxels changed)")
    print(f"Changed voxels per class: {changed}.")
    print("\n".join(format_guards(report, guards)))
    if args.report:
        write_json(args.report, {**report.to_dict(), "guards": guard_settings(guards, model)})
        print(f"report written to {args.report}")
    return 0


class _SliceBar:
    """A tqdm bar over the slices, fed by refinement's ``progress(done, total)`` callback."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(unit="slice", desc="refining")

    def __call__(self, done: int, total: int) -> None:
        self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def _slice_bar(enabled: bool) -> _SliceBar | None:
    return _SliceBar() if enabled else None


def _grid_difference(a, b) -> str:
    """What differs between two volumes' grids: shape, spacing, origin or axis directions."""
    import numpy as np

    if a.array.shape != b.array.shape:
        return f"shape {a.array.shape} vs {b.array.shape}"
    sa, sb = np.linalg.norm(a.affine[:3, :3], axis=0), np.linalg.norm(b.affine[:3, :3], axis=0)
    if not np.allclose(sa, sb, atol=1e-3):
        return f"spacing {np.round(sa, 4).tolist()} vs {np.round(sb, 4).tolist()} mm"
    if not np.allclose(a.affine[:3, 3], b.affine[:3, 3], atol=1e-3):
        return f"origin {np.round(a.affine[:3, 3], 3).tolist()} vs {np.round(b.affine[:3, 3], 3).tolist()} mm"
    return f"axis directions\n{np.round(a.affine[:3, :3] / sa, 4)}\nvs\n{np.round(b.affine[:3, :3] / sb, 4)}"


def _same_grid(a, b) -> bool:
    import numpy as np

    return bool(np.allclose(a, b, atol=1e-3))


def _cmd_refine_dataset(args: argparse.Namespace) -> int:
    from .batch import check_batch_args, run_from_args

    check_batch_args(args)
    return run_from_args(args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .evaluate import write_metrics
    from .pipeline import evaluate_refinement, report

    model = load_model(args.model, device=args.device)
    out = Path(args.out)
    metrics = evaluate_refinement(args.data, args.predictions, model, split=args.split, scheme=args.label_scheme,
                                  montage=out / "montage.png")
    write_metrics(out / "metrics.json", metrics)
    print(report(metrics))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .pipeline import DemoConfig, report, run_demo

    config = replace(DemoConfig(), device=args.device, seed=args.seed)
    metrics = run_demo(args.out, config, progress=args.progress)
    print(report(metrics))
    print(f"\nwrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'montage.png'}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .batch import add_guard_arguments

    p = argparse.ArgumentParser(prog="refnet", description="Refine 3D segmentations with RefNet.")
    p.add_argument("--version", action="version", version=f"refnet {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    progress = argparse.ArgumentParser(add_help=False)  # only where a bar is shown
    progress.add_argument("--progress", action="store_true", help="show progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("phantoms", parents=[common], help="generate synthetic abdominal CT phantoms (BTCV layout)")
    s.add_argument("--out", required=True, help="output dataset folder")
    s.add_argument("--train", type=_positive_int, default=15, help="training cases (default 15, as the demo)")
    s.add_argument("--test", type=_positive_int, default=6, help="test cases (default 6, as the demo)")
    s.add_argument("--preset", choices=("demo", "full"), default="demo", help="demo: coarse grid for CPU")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_phantoms)

    s = sub.add_parser("train-segmenters", parents=[common, progress],
                       help="train K base models and predict every case")
    s.add_argument("--data", required=True, help="BTCV-layout dataset folder")
    s.add_argument("--out", required=True, help="folder for segmenters/ and predictions/")
    s.add_argument("--architectures", nargs="+", default=["unet", "segresnet"],
                   choices=("unet", "dynunet", "segresnet", "swinunetr"),
                   help="one model per entry (default: unet segresnet)")
    s.add_argument("--steps", type=_positive_int, help="training steps per model (default: demo preset)")
    s.add_argument("--spacing", type=_positive_float, nargs=3, metavar="MM",
                   help="train and predict on this grid, mm along R, A, S (nnU-Net's target spacing, e.g. 1.5 1.5 "
                        "3): each CT is resampled to it and the predictions come back on its own voxels "
                        "(default: each case's own voxels)")
    s.add_argument("--hold-out", type=int, default=0, metavar="N",
                   help="leave the last N training cases out of base-model training (still predicted); pass "
                        "the same N to `refnet train --val-cases` so its per-class check sees unseen cases")
    s.add_argument("--folds", type=int, default=0, metavar="K",
                   help="predict the training cases out of fold: K models each trained without one K-th of them "
                        "(nnU-Net's cross-validation), so RefNet learns from errors on unseen cases (default 0: off)")
    s.set_defaults(func=_cmd_train_segmenters)

    s = sub.add_parser("train", parents=[common, progress],
                       help="train RefNet on K folders of predictions (Algorithm 1)")
    s.add_argument("--data", required=True, help="BTCV-layout dataset with ground truth")
    s.add_argument("--predictions", nargs="+", required=True, help="one folder of label maps per model")
    s.add_argument("--out", required=True, help="model file to write (.pt)")
    s.add_argument("--work-dir", help="checkpoints and loss log (default: beside --out); re-run to resume")
    s.add_argument("--preset", choices=("paper", "demo"), default="demo",
                   help="paper: RMSprop lr 1e-5, w=1; demo: settings that train in minutes on CPU")
    s.add_argument("--ct", action="store_true", help="also feed the windowed CT to RefNet")
    s.add_argument("--components", action="store_true",
                   help="also feed each voxel's 3D component size (islands, holes) to RefNet")
    s.add_argument("--position", action="store_true",
                   help="also feed each pixel's offset from the labelled centroid (the body side) to RefNet")
    s.add_argument("--channels-last", action="store_true",
                   help="channels-last activations: faster epochs (about 1.3x on CPU), same training up to rounding")
    s.add_argument("--label-scheme", type=_scheme, default="refnet", help="label values of the predictions")
    for name, typ in (("optimizer", str), ("lr", float), ("epochs", int), ("steps-per-epoch", int),
                      ("batch-size", int), ("raw-weight", float), ("val-cases", int), ("seed", int)):
        s.add_argument(f"--{name}", type=typ, help="override the preset")
    s.add_argument("--extra-labels", nargs="+", metavar="DIR",
                   help="folders of extra correct label maps without CT (e.g. manual annotations you may train "
                        "on): identity and simulated-error pairs for a label-only model")
    s.add_argument("--extra-labels-scheme", type=_scheme, default="refnet", help="label values of --extra-labels")
    s.add_argument("--simulated-pairs", type=int, metavar="N",
                   help="also train on N pairs per case of simulated, direction-free errors of the ground truth "
                        "(override the preset)")
    s.add_argument("--pieces", action="store_true",
                   help="also fit the keep/drop decision per connected piece on the same pairs and store it in "
                        "the model file (as 'refnet pieces' does; use out-of-fold predictions)")
    s.add_argument("--pieces-ct", action="store_true",
                   help="as --pieces, with a decider that also reads each piece's CT intensities (read from --data, "
                        "as 'refnet pieces --ct'); the model then needs the CT wherever it refines")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("pieces", parents=[common],
                       help="fit the keep/drop decision per connected piece and write a model file that carries it")
    s.add_argument("--data", required=True, help="BTCV-layout dataset with ground truth")
    s.add_argument("--predictions", nargs="+", required=True,
                   help="one folder of label maps per model (out-of-fold: refnet train-segmenters --folds K)")
    s.add_argument("--model", help="RefNet model file to add the decider to (default: the shipped model)")
    s.add_argument("--out", required=True, help="new model file (.pt): the model plus the decider")
    s.add_argument("--label-scheme", type=_scheme, default="refnet", help="label values of the predictions")
    s.add_argument("--seed", type=int, default=0, help="seed of the decider's nets (default 0)")
    s.add_argument("--ct", action="store_true",
                   help="fit a decider that also reads each piece's CT intensities (read from --data); the model "
                        "then needs the CT wherever it refines (--ct, or --keep-pieces to skip the decider)")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s.set_defaults(func=_cmd_pieces)

    s = sub.add_parser("refine", parents=[common, progress], help="refine one label map")
    s.add_argument("--labels", required=True,
                   help="label map to refine (.nii, .nii.gz, .nrrd) or Slicer segmentation (.seg.nrrd)")
    s.add_argument("--ct", help="the CT on the same grid (needed by CT-conditioned models)")
    s.add_argument("--model", help="RefNet model file (default: the shipped phantom model)")
    s.add_argument("--out", required=True, help="new file for the refined label map")
    s.add_argument("--label-scheme", type=_scheme, default="refnet",
                   help="label values of --labels: refnet, btcv, totalsegmentator, flare22 or word (default refnet)")
    s.add_argument("--batch-size", type=_positive_int, help="slices per forward pass (default: 4 on CPU, "
                   "chosen from free memory on a GPU)")
    s.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 (or fp16) autocast on a GPU, fp32 on CPU")
    s.add_argument("--compile", action="store_true", help="torch.compile the net (eager if it fails)")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s.add_argument("--report", metavar="FILE.json",
                   help="also write the report (changes per class, voxels held back per guard, warnings, "
                        "guard settings) as JSON")
    add_guard_arguments(s)
    s.set_defaults(func=_cmd_refine)

    s = sub.add_parser("refine-dataset", parents=[common],
                       help="refine every label map of a folder (the batch engine); sharded under torchrun or --shard")
    from .batch import add_batch_arguments

    s.set_defaults(func=_cmd_refine_dataset)
    add_batch_arguments(s, device=False)  # --device comes with the common options

    s = sub.add_parser("evaluate", parents=[common], help="Dice of raw vs refined on a dataset split")
    s.add_argument("--data", required=True, help="BTCV-layout dataset with ground truth")
    s.add_argument("--predictions", required=True, help="folder of raw predictions")
    s.add_argument("--model", help="RefNet model file (default: the shipped phantom model)")
    s.add_argument("--out", required=True, help="folder for metrics.json and montage.png")
    s.add_argument("--split", choices=("train", "test", "all"), default="test")
    s.add_argument("--label-scheme", type=_scheme, default="refnet")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("demo", parents=[common, progress], help="Algorithm 1 end to end on generated phantoms")
    s.add_argument("--out", default="demo_out", help="output folder (default demo_out); re-run to resume")
    s.add_argument("--seed", type=int, default=0,
                   help="seed of the generated phantoms (default 0); the models' seeds stay fixed")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``refnet`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        from .device import resolve_device
        from .io import stop_on_sigterm

        stop_on_sigterm()  # a killed run leaves no temporary file behind
        resolve_device(args.device)  # a bad or absent device fails now, not after minutes of work
        return args.func(args)
    except KeyboardInterrupt:
        print(f"refnet {args.command}: interrupted; finished files are complete, unfinished ones were not "
              "written.", file=sys.stderr)
        return 130
    except (ValueError, OSError, MemoryError) as err:  # OSError: missing files, permissions, a full disk
        print(f"refnet {args.command}: error: {_describe(err)}", file=sys.stderr)
        return 2


def _describe(err: BaseException) -> str:
    """The user-facing text of an error that ends a command."""
    if isinstance(err, PermissionError):
        return f"{err.filename or err}: permission denied; choose a file or folder you can read and write."
    if isinstance(err, MemoryError):
        return f"{err or 'out of memory'}; try a smaller --batch-size, or a machine with more memory."
    return str(err)

if __name__ == "__main__":
    sys.exit(main())
