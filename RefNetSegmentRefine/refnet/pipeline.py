"""Whole jobs built from the library: train K segmenters, evaluate raw vs refined, and the demo.

The demo is Algorithm 1 end to end on generated phantoms: K base models are trained, their
predictions on the training cases become K x N RefNet training pairs, and RefNet is scored on the
held-out test cases against the primary base model's raw output.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import LoadedModel
from .evaluate import dice_per_class, false_positive_ml, format_table, save_montage, summarise, write_metrics
from .geometry import canonical_affine, to_canonical
from .io import read_affine, write_json
from .labels import CLASS_NAMES
from .model import RefNetConfig
from .refine import refine_labels
from .spacing import voxel_spacing
from .train import TrainConfig, train_refnet, validation_cases

__all__ = ["EXTRA_ANATOMY_IDS", "DemoConfig", "evaluate_refinement", "extra_anatomy_maps", "report", "run_demo",
           "train_segmenters"]

logger = logging.getLogger(__name__)


def _demo_segmenters() -> tuple[Any, ...]:
    from .segmenters import SegmenterConfig

    # K = 2 UNets differing in seed and training length (Algorithm 1 asks for K models); on 2 CPU cores
    # a SegResNet does not converge in the demo's time budget (see the segmenters benchmark notes).
    return (SegmenterConfig.demo("unet", seed=0),
            SegmenterConfig.demo("unet", seed=1, steps=400))


def _demo_train() -> TrainConfig:
    # RMSprop as in the paper, but lr 3e-3 instead of 1e-5 so it trains in minutes on CPU, and w = 0:
    # with w = 1 the CE terms towards S and GT cancel wherever they disagree, so the net can barely
    # move off the raw labels; the identity start and the per-class check keep it close to S instead.
    # Spacing 1.5 mm, identity pairs, guards and the threshold choice come from TrainConfig's defaults;
    # 5 held-out cases (of 15) pick the epoch, the per-class thresholds and the per-class check.
    # 3 simulated-error pairs per case and 20 extra correct maps of wider anatomy (DemoConfig.extra_anatomy):
    # chosen by benchmarks/preset_selection.py on held-out phantoms and 5 real development maps
    # (no harm first, then gain), before the demo's test split or the other real maps were scored.
    return TrainConfig(
        model=RefNetConfig(embed_dim=8, context=1, features=(8, 16, 32, 64, 128, 8)),
        optimizer="rmsprop", lr=3e-3, epochs=16, steps_per_epoch=60, batch_size=16, crop_size=96,
        raw_weight=0.0, val_cases=5, val_every=4, seed=0, simulated_pairs=3,
    )


@dataclass(frozen=True)
class DemoConfig:
    """The demo preset: about 10 minutes on 2 CPU cores (the bound is 15)."""

    # Phantom cases with BTCV training ids: the last ``train.val_cases`` are held out from base models and
    # RefNet alike and score the per-class check; the others train both.
    train_cases: int = 15
    test_cases: int = 6  # held-out phantom cases scored in metrics.json (BTCV test ids)
    seed: int = 0
    phantoms: Any = None  # PhantomConfig of the generated cases; None = PhantomConfig.demo()
    segmenters: tuple[Any, ...] = field(default_factory=_demo_segmenters)  # K base models; the first is "raw"
    train: TrainConfig = field(default_factory=_demo_train)
    # Extra correct maps (ground truth only: no CT is read, no base model runs) of phantoms with about
    # twice the anatomical variation of the others, trained on as identity and simulated-error pairs so
    # RefNet learns that anatomy unlike its template is correct; case ids from EXTRA_ANATOMY_IDS on.
    extra_anatomy: int = 20
    extra_phantoms: Any = None  # their PhantomConfig; None = PhantomConfig.demo(deform_mm=16, shape_jitter=1.6)
    device: str = "auto"


def train_segmenters(
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    configs: Sequence[Any],
    *,
    holdout: Collection[int] = (),
    folds: int = 0,
    device: str = "auto",
    progress: bool = False,
) -> list[Path]:
    """Algorithm 1, step 1: train each base model on the training split and predict every case.

    ``holdout`` lists training-split case ids the models do not train on (they are still predicted),
    e.g. the cases RefNet's per-class check will score. With ``folds`` >= 2 the other training cases
    are predicted out of fold, as nnU-Net's cross-validation does: fold model k trains on every fold
    but k and predicts fold k, so RefNet learns from the errors a model makes on cases it did not see
    (a model scores higher on its own training cases and makes other errors there). A model trained
    on all training cases predicts the held-out and test cases either way.

    Writes ``out_dir/segmenters/<name>.pt`` (and ``<name>-foldK.pt``) and
    ``out_dir/predictions/<name>/labelXXXX.nii.gz`` plus ``predictions.json`` (which model predicted
    each case). A model whose prediction folder is complete is skipped on re-run if it was made with
    the same settings; other settings are refused rather than silently reused.

    Returns:
        The prediction folders, in the order of ``configs``.

    Raises:
        ValueError: no training case left, ``folds`` out of range, or a folder made with other settings.
    """
    from .data.btcv import find_cases, load_case, split_cases
    from .distributed import setup
    from .segmenters import predict_segmenter, save_predictions, save_segmenter, train_segmenter

    ctx, _ = setup(device)  # under torchrun every process trains; the first one predicts and writes
    cases = find_cases(dataset_dir)
    held = set(holdout)
    train = [c for c in split_cases(cases, "train") if c.case_id not in held]
    if not train:
        raise ValueError(f"{dataset_dir}: no training case left after holding out {sorted(held)}.")
    if folds == 1 or folds < 0 or folds > len(train):
        raise ValueError(f"folds must be 0 (no cross-validation) or 2..{len(train)} (the training cases), "
                         f"got {folds}.")
    fold_of = {c.case_id: n % folds for n, c in enumerate(sorted(train, key=lambda c: c.case_id))} if folds else {}
    folders = []
    for config in configs:
        folder = Path(out_dir) / "predictions" / config.name
        record = {"segmenter": config.to_dict(), "trained_on": sorted(c.case_id for c in train),
                  "folds": folds, "fold_of": {str(k): v for k, v in sorted(fold_of.items())}}
        if folder.is_dir() and all((folder / f"label{c:04d}.nii.gz").exists() for c in cases):
            _check_record(folder, record)
            logger.info("%s: predictions complete, skipping", config.name)
            folders.append(folder)
            continue
        t0 = time.perf_counter()
        data = {c.case_id: _canonical_case(load_case(c)) for c in train}
        runs = [(config, list(data), [c for c in cases if c not in fold_of])]  # the full model
        runs += [(replace(config, name=f"{config.name}-fold{k}"), [c for c in data if fold_of[c] != k],
                  [c for c in fold_of if fold_of[c] == k]) for k in range(folds)]
        predictions = {}
        for run_config, fit_ids, predict_ids in runs:
            net = train_segmenter([data[c][:2] for c in fit_ids], run_config, device=device,
                                  spacings=[data[c][3] for c in fit_ids], progress=progress and ctx.main)
            if not ctx.main:
                continue
            save_segmenter(Path(out_dir) / "segmenters" / f"{run_config.name}.pt", net, run_config)
            for case_id in predict_ids:
                ct, _labels = load_case(cases[case_id])
                canon_ct, reo = to_canonical(ct.array.astype(np.float32), ct.affine)
                spacing = voxel_spacing(canonical_affine(ct.affine, ct.array.shape))
                pred = predict_segmenter(net, canon_ct, run_config, spacing=spacing, device=device)
                predictions[case_id] = (reo.backward(pred), ct.affine)
        if ctx.main:
            save_predictions(Path(out_dir) / "predictions", config.name, predictions)
            write_json(folder / "predictions.json", {**record, "predicted_by": {
                str(c): f"{config.name}-fold{fold_of[c]}" if c in fold_of else config.name for c in sorted(cases)}})
        ctx.barrier()
        folders.append(folder)
        logger.info("%s: trained %d model(s) and predicted %d cases in %.0f s", config.name, len(runs),
                    len(cases), time.perf_counter() - t0)
    return folders


def _check_record(folder: Path, record: dict[str, Any]) -> None:
    """Refuse to reuse predictions made with another model, training set or fold split."""
    path = folder / "predictions.json"
    if not path.exists():  # written before the record existed: nothing to compare
        return
    stored = json.loads(path.read_text())
    differs = [k for k in record if stored.get(k) != json.loads(json.dumps(record[k]))]
    if differs:
        raise ValueError(f"{folder} holds predictions made with other settings ({', '.join(differs)} differ); "
                         "pass a new output folder, or delete that one to retrain.")


def _canonical_case(case: tuple[Any, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, ...]]:
    ct, labels = case
    return (to_canonical(ct.array.astype(np.float32), ct.affine)[0], to_canonical(labels, ct.affine)[0], ct.affine,
            voxel_spacing(canonical_affine(ct.affine, ct.array.shape)))


def evaluate_refinement(
    dataset_dir: str | os.PathLike,
    prediction_dir: str | os.PathLike,
    model: LoadedModel,
    *,
    split: str = "test",
    scheme: str = "refnet",
    montage: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Dice of raw and refined predictions against ground truth on one split.

    Returns:
        metrics.json content: ``classes``, ``raw`` and ``refined`` (each ``{"dice": {class: v},
        "mean_dice": v, ...}``), ``cases`` and ``changed_voxels``.
    """
    from .data.btcv import find_cases, load_case, split_cases
    from .segmenters import load_prediction_folder

    cases = split_cases(find_cases(dataset_dir), split)
    if not cases:
        raise ValueError(f"{dataset_dir}: no cases in the {split!r} split to evaluate.")
    preds = load_prediction_folder(prediction_dir, [c.case_id for c in cases], scheme=scheme,
                                   affines={c.case_id: read_affine(c.image) for c in cases})
    raw_scores, ref_scores, raw_fp, ref_fp, changed = [], [], [], [], 0
    for n, case in enumerate(cases):
        ct, target = load_case(case)
        raw = preds[case.case_id]
        refined = refine_labels(raw, ct.affine, model, ct=ct.array if model.uses_ct else None)
        raw_scores.append(dice_per_class(raw, target))
        ref_scores.append(dice_per_class(refined, target))
        ml = float(np.prod(voxel_spacing(ct.affine))) / 1000.0
        raw_fp.append(false_positive_ml(raw, target, voxel_volume_ml=ml))
        ref_fp.append(false_positive_ml(refined, target, voxel_volume_ml=ml))
        changed += int((raw != refined).sum())
        if montage is not None and n == 0:
            canon = [to_canonical(a, ct.affine)[0] for a in (ct.array, raw, refined, target)]
            save_montage(montage, canon[0], {"raw": canon[1], "refined": canon[2], "ground truth": canon[3]})
    return {
        "classes": list(CLASS_NAMES),
        "raw": summarise(raw_scores, false_positive_ml=raw_fp),
        "refined": summarise(ref_scores, false_positive_ml=ref_fp),
        "cases": [c.case_id for c in cases],
        "changed_voxels": changed,
    }


def run_demo(out_dir: str | os.PathLike, config: DemoConfig | None = None, *, progress: bool = False) -> dict:
    """Algorithm 1 on generated phantoms; writes ``metrics.json``, ``montage.png`` and ``refnet.pt``.

    Steps already done in ``out_dir`` (phantoms, base-model predictions, RefNet checkpoints) are
    reused, so an interrupted demo resumes.

    Returns:
        The metrics dict (also written to ``out_dir/metrics.json``).
    """
    from .data.btcv import BTCV_TEST_IDS, BTCV_TRAIN_IDS
    from .data.phantoms import PhantomConfig, write_phantom_dataset
    from .pairs import load_training_pairs

    config = config or DemoConfig()
    out = Path(out_dir)
    t0 = time.perf_counter()
    data = out / "data"
    ids = list(BTCV_TRAIN_IDS[: config.train_cases]) + list(BTCV_TEST_IDS[: config.test_cases])
    phantoms = config.phantoms or PhantomConfig.demo()
    if (data / "dataset.json").exists():
        _check_resumed_data(data, config.seed, phantoms)
    else:
        write_phantom_dataset(data, ids, config=phantoms, seed=config.seed)
    timings = {"phantoms_s": time.perf_counter() - t0}
    holdout = validation_cases(ids[: config.train_cases], config.train.val_cases)
    folders = train_segmenters(data, out, config.segmenters, holdout=holdout, device=config.device,
                               progress=progress)
    timings["segmenters_s"] = time.perf_counter() - t0 - sum(timings.values())
    pairs = load_training_pairs(data, folders, with_ct=config.train.model.ct_channels > 0)
    extra = extra_anatomy_maps(config.extra_anatomy, seed=config.seed, config=config.extra_phantoms)
    model = train_refnet(pairs, config.train, work_dir=out / "refnet_work", output=out / "refnet.pt",
                         progress=progress, provenance={"data": "refnet phantoms (demo preset)",
                                                        "segmenters": [s.name for s in config.segmenters]},
                         extra_maps=extra)
    timings["refnet_s"] = time.perf_counter() - t0 - sum(timings.values())
    metrics = evaluate_refinement(data, folders[0], model, montage=out / "montage.png")
    metrics["raw_source"] = config.segmenters[0].name
    metrics["refine_classes"] = list(model.refine_classes)
    timings["evaluate_s"] = time.perf_counter() - t0 - sum(timings.values())
    metrics["timings"] = {k: round(v, 1) for k, v in timings.items()}
    write_metrics(out / "metrics.json", metrics)
    logger.info("demo finished in %.0f s", time.perf_counter() - t0)
    return metrics


EXTRA_ANATOMY_IDS = 10_000  # first case id of the extra-anatomy maps (no dataset uses such ids)


def extra_anatomy_maps(count: int, *, seed: int = 0, config: Any = None, with_ct: bool = False) -> list[Any]:
    """Ground-truth maps of ``count`` extra phantoms as identity :class:`~refnet.train.TrainingPair` s.

    Args:
        count: how many.
        seed: dataset seed (case ``EXTRA_ANATOMY_IDS + i`` uses ``case_seed(seed, EXTRA_ANATOMY_IDS + i)``).
        config: their PhantomConfig (default: the demo grid with wider anatomy, see :class:`DemoConfig`).
        with_ct: keep each phantom's CT too (for CT-conditioned RefNets).
    """
    from .data.phantoms import PhantomConfig, case_seed, make_phantom
    from .train import TrainingPair

    config = config or PhantomConfig.demo(deform_mm=16.0, shape_jitter=1.6)
    maps = []
    for i in range(count):
        ph = make_phantom(case_seed(seed, EXTRA_ANATOMY_IDS + i), config)
        maps.append(TrainingPair(raw=ph.labels, target=ph.labels, case_id=EXTRA_ANATOMY_IDS + i,
                                 source="extra_anatomy", affine=ph.affine,
                                 ct=ph.ct if with_ct else None))
    return maps


def _check_resumed_data(data: Path, seed: int, phantoms: Any) -> None:
    """Refuse to resume a demo folder whose phantoms were generated with another seed or config."""
    from dataclasses import asdict, fields

    meta = json.loads((data / "dataset.json").read_text())
    wanted = json.loads(json.dumps({"seed": seed, "config": asdict(phantoms)}))
    # A setting added after the folder was written reads as its default there (it did not exist, so it was off).
    defaults = json.loads(json.dumps({f.name: f.default for f in fields(phantoms)}))
    if isinstance(meta.get("config"), dict):
        meta["config"] = {**{k: v for k, v in defaults.items() if k not in meta["config"]}, **meta["config"]}
    if {k: meta.get(k) for k in wanted} != wanted:
        raise ValueError(f"{data.parent} holds a demo generated with another seed or phantom preset "
                         f"(seed {meta.get('seed')}); pass a new --out folder, or the same --seed to resume it.")


def report(metrics: dict) -> str:
    """The demo's printed table plus the headline change."""
    raw, ref = metrics["raw"]["mean_dice"], metrics["refined"]["mean_dice"]
    gain = 100.0 * (ref - raw) / raw if raw else float("nan")
    return f"{format_table(metrics)}\n\nmean Dice (13 classes): raw {raw:.4f} -> refined {ref:.4f} ({gain:+.2f}%)"
