"""Is the refiner worth it? Every method a reviewer would ask for, on the same base-model predictions.

One run per dataset (a phantom seed, or any BTCV-layout folder): K base models are trained with
out-of-fold predictions on the training cases (RefNet learns from errors on unseen cases), and on the
test cases these methods are scored against the ground truth:

- ``raw``: the first base model (trained on all training cases);
- ``cleanup``: raw with per-class largest component / hole filling where it helped on the training
  cases' out-of-fold predictions (nnU-Net's post-processing rule, :mod:`refnet.cleanup`);
- ``average``: the K base models' softmax probabilities averaged (nnU-Net's ensemble);
- ``refnet_label``: the paper's label-only RefNet (the demo's frozen preset) on raw;
- ``refnet_ct``: the same with the CT as an input channel (the paper's future work);
- ``refnet_paper``: the label-only RefNet with the paper's loss weight w = 1 on CE(P, S);
- ``refnet_label_cleanup``: ``refnet_label``'s output with ``cleanup``'s steps applied after it (are the two
  complementary? added after the first seed showed cleanup ahead of RefNet);
- ``refnet_components`` (opt-in, not in :data:`DEFAULT_METHODS`): ``refnet_label`` with each voxel's 3D
  component size as an input channel
  (:mod:`refnet.components`): the connectivity cleanup decides on, which a 2D net cannot see (added after
  the five seeds showed cleanup ahead of RefNet; its preset is ``refnet_label``'s, nothing else changed);
- ``pieces``: raw with the pieces a learned keep/drop decision rejects removed (:mod:`refnet.pieces`;
  trained on the K models' out-of-fold training predictions and the training truths; added after the
  five seeds showed cleanup ahead of RefNet, frozen on development seed 10 before any test seed ran it);
- ``refnet_label_pieces``: ``refnet_label``'s output with the same decision after it;
- ``pieces_ct`` / ``refnet_label_pieces_ct`` (opt-in): the same with a decider that also reads the CT (each
  piece's HU against its organ's in the training truth; :data:`refnet.pieces.CT_FEATURE_NAMES`): can it tell
  an organ the patient lacks from a small real one, which the label map alone cannot;
- ``unseen_raw`` / ``unseen_refnet_label`` / ``unseen_pieces``: a base model of an architecture RefNet and
  the decider never trained on, before and after ``refnet_label`` and ``pieces``;
- ``average_refnet_label`` / ``average_pieces`` / ``average_refnet_label_pieces``: ``refnet_label``, the
  piece decision and both applied to ``average``'s map, scored against ``average`` (added after the first
  seed with two architectures among the K models put ``average`` ahead of every refinement of raw: does
  refining the ensemble still help? Nothing is trained or chosen for them: the same net and decider, on
  another input).

Metrics per class and case: Dice (the paper's 13-class mean), NSD with FLARE22's tolerances and HD95
(:mod:`refnet.surface`), false-positive volume. :func:`summarise_quality` pools seeds and gives the
gain with a paired 95% interval over cases.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .labels import CLASS_NAMES, NUM_CLASSES
from .pipeline import DemoConfig, extra_anatomy_maps, train_segmenters
from .stats import paired_interval

__all__ = ["DEFAULT_METHODS", "METHODS", "QualityConfig", "add_methods", "quality_table", "run_quality",
           "save_gain_chart", "summarise_quality"]

logger = logging.getLogger(__name__)

METHODS = ("raw", "cleanup", "average", "refnet_label", "refnet_ct", "refnet_paper", "refnet_label_cleanup",
           "refnet_components", "pieces", "refnet_label_pieces", "unseen_raw", "unseen_refnet_label", "unseen_pieces",
           "pieces_ct", "refnet_label_pieces_ct", "average_refnet_label", "average_pieces",
           "average_refnet_label_pieces")
# What a run scores unless told otherwise: refnet_components is opt-in (--methods), because a fourth RefNet
# would take the --quick seed past its 30 minutes on 2 cores and it gained nothing on development data
# (benchmarks/refnet_variants.py); the CT-reading decider is opt-in as it was added after the published runs.
DEFAULT_METHODS = tuple(m for m in METHODS if m not in ("refnet_components", "pieces_ct", "refnet_label_pieces_ct"))
BASELINE = {m: "unseen_raw" if m.startswith("unseen_") else "average" if m.startswith("average_") else "raw"
            for m in METHODS}  # what a method is compared with: the map it refines
REFNETS = ("refnet_label", "refnet_ct", "refnet_paper", "refnet_components")
NEEDS = {"unseen_refnet_label": "unseen_raw", "unseen_pieces": "unseen_raw", "refnet_label_cleanup": "cleanup",
         "average_refnet_label": "average", "average_pieces": "average", "average_refnet_label_pieces": "average"}
# The piece-decision methods and the map each one decides on (label-only decider, and the one reading the CT).
PIECE_SOURCES = {"pieces": "raw", "refnet_label_pieces": "refnet_label", "unseen_pieces": "unseen_raw",
                 "average_pieces": "average", "average_refnet_label_pieces": "average_refnet_label"}
PIECE_CT_SOURCES = {"pieces_ct": "raw", "refnet_label_pieces_ct": "refnet_label"}


# Clinical resolution (QualityConfig.at_clinical_resolution): the phantoms' pixel and slice ranges, and the
# base models' grid (the middle of the demo phantoms' 2.0-2.4 mm pixels and 4-5 mm slices).
CLINICAL_INPLANE_MM = (0.7, 1.0)
CLINICAL_SLICE_MM = (1.5, 5.0)
MODEL_SPACING_MM = (2.2, 2.2, 4.5)


def _varied_demo() -> DemoConfig:
    from .data.phantoms import PhantomConfig

    # The demo's grid with anatomy that varies more between cases (1.5x the deformation, 1.3x the size and
    # position jitter), a missing gallbladder or kidney in about 1 case in 5, and lesions (1 per case on
    # average): harder and more varied than the phantoms the frozen RefNet preset was chosen on.
    return DemoConfig(phantoms=PhantomConfig.demo(deform_mm=12.0, shape_jitter=1.3, missing_organs=0.15,
                                                  lesions=1.0))


def _unseen() -> Any:
    from .segmenters import SegmenterConfig

    return SegmenterConfig.demo("segresnet", seed=0)


@dataclass(frozen=True)
class QualityConfig:
    """The benchmark's preset: the demo's base models and RefNet preset on more varied phantoms.

    ``refnet_label`` is trained with ``demo.train`` unchanged (frozen by benchmarks/preset_selection.py
    on seed-0 development data); ``refnet_ct`` and ``refnet_paper`` change one thing each.
    """

    demo: DemoConfig = field(default_factory=_varied_demo)  # data, base models, RefNet preset
    folds: int = 2  # cross-validation folds of each base model's training-case predictions
    unseen: Any = field(default_factory=_unseen)  # SegmenterConfig of the architecture RefNet never sees
    methods: tuple[str, ...] = DEFAULT_METHODS
    decider_epochs: int = 400  # training epochs of each MLP of the piece decider (refnet.pieces)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}.")
        for method, needed in NEEDS.items():
            if method in self.methods and needed not in self.methods:
                raise ValueError(f"{method} needs {needed} (its baseline or its plan) in methods.")
        trained_on = {s.architecture for s in self.demo.segmenters}
        if "unseen_raw" in self.methods and self.unseen.architecture in trained_on:
            raise ValueError(f"the unseen architecture {self.unseen.architecture!r} is one of the base models "
                             f"RefNet trains on ({sorted(trained_on)}); choose another "
                             "(benchmarks/quality.py --unseen PRESET), or leave out unseen_raw.")

    def train_config(self, method: str) -> Any:
        """The RefNet training preset of a RefNet method."""
        base = self.demo.train
        if method == "refnet_ct":
            return replace(base, model=replace(base.model, ct_channels=1))
        if method == "refnet_paper":
            return replace(base, raw_weight=1.0)
        if method == "refnet_components":
            return replace(base, model=replace(base.model, component_channel=True))
        return base

    def at_clinical_resolution(self) -> QualityConfig:
        """The same preset on CT at clinical resolution: 0.7-1.0 mm pixels and 1.5-5 mm slices.

        The base models train and predict on the demo's coarse grid (:data:`MODEL_SPACING_MM`, their
        ``spacing_mm``: CT resampled to it, logits brought back to the CT's voxels, as nnU-Net does), so
        their errors are those of a coarse model seen at fine resolution. RefNet refines at its own
        1.5 mm through the spacing-aware engine; nothing of its preset changes.
        """
        phantoms = replace(self.demo.phantoms, inplane_spacing_mm=CLINICAL_INPLANE_MM,
                           slice_spacing_mm=CLINICAL_SLICE_MM)
        at = {"spacing_mm": MODEL_SPACING_MM}
        segmenters = tuple(s if s.spacing_mm else replace(s, **at) for s in self.demo.segmenters)
        unseen = self.unseen if self.unseen.spacing_mm else replace(self.unseen, **at)
        return replace(self, demo=replace(self.demo, phantoms=phantoms, segmenters=segmenters), unseen=unseen)

    @classmethod
    def quick(cls) -> QualityConfig:
        """One seed within 30 minutes on 2 CPU cores: the RefNets train 10 epochs instead of 16."""
        demo = _varied_demo()
        return cls(demo=replace(demo, train=replace(demo.train, epochs=10, val_every=5)))


def run_quality(
    out_dir: str | os.PathLike,
    config: QualityConfig | None = None,
    *,
    seed: int = 0,
    dataset: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train what the methods need and score every method on the test cases of one dataset.

    Args:
        out_dir: working folder (phantoms, base models, predictions, RefNets); a rerun resumes.
        config: the preset (default :class:`QualityConfig`).
        seed: phantom seed; also the seed of every model trained here (base models and RefNets).
        dataset: a BTCV-layout folder to use instead of generated phantoms.
        progress: tqdm bars while training.

    Returns:
        ``{"seed", "cases", "methods": {method: {"dice"|"nsd"|"hd95"|"fp_ml": per-case (C,) lists}},
        "cleanup": plan, "timings"}``.
    """
    from .data.btcv import BTCV_TEST_IDS, BTCV_TRAIN_IDS, find_cases, split_cases
    from .data.phantoms import PhantomConfig, write_phantom_dataset
    from .pairs import load_training_pairs
    from .train import train_refnet, validation_cases

    config = config or QualityConfig()
    demo = config.demo
    out = Path(out_dir)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if dataset is None:
        data = out / "data"
        if not (data / "dataset.json").exists():
            ids = list(BTCV_TRAIN_IDS[: demo.train_cases]) + list(BTCV_TEST_IDS[: demo.test_cases])
            write_phantom_dataset(data, ids, config=demo.phantoms or PhantomConfig.demo(), seed=seed)
    else:
        data = Path(dataset)
    cases = find_cases(data)
    train_ids = [c.case_id for c in split_cases(cases, "train")]
    holdout = validation_cases(train_ids, demo.train.val_cases)
    segmenters = tuple(replace(s, seed=s.seed + 100 * seed, name=None) for s in demo.segmenters)
    folders = train_segmenters(data, out, segmenters, holdout=holdout, folds=config.folds, device=demo.device,
                               progress=progress)
    unseen = None
    if "unseen_raw" in config.methods:
        unseen_config = replace(config.unseen, seed=config.unseen.seed + 100 * seed, name=None)
        unseen, = train_segmenters(data, out, [unseen_config], holdout=holdout, device=demo.device,
                                   progress=progress)
    timings["segmenters_s"] = time.perf_counter() - t0
    wanted = [m for m in REFNETS if m in config.methods or (m == "refnet_label" and _needs_refnet_label(config))]
    needs_ct = "refnet_ct" in wanted or _needs_ct_decider(config)
    pairs = load_training_pairs(data, folders, with_ct=needs_ct)
    models = {}
    for method in wanted:
        tc = replace(config.train_config(method), seed=seed, device=demo.device)
        ct_model = tc.model.ct_channels > 0
        extra = extra_anatomy_maps(demo.extra_anatomy, seed=seed, config=demo.extra_phantoms, with_ct=ct_model)
        fit = pairs if ct_model else [replace(p, ct=None) for p in pairs]
        models[method] = train_refnet(fit, tc, work_dir=out / f"{method}_work", output=out / f"{method}.pt",
                                      progress=progress, extra_maps=extra,
                                      provenance={"data": "quality benchmark", "method": method})
    timings["refnets_s"] = time.perf_counter() - t0 - sum(timings.values())
    plan = _cleanup_plan(pairs, folders[0].name) if "cleanup" in config.methods else {}
    decider = _fit_decider(pairs, out, seed, config.decider_epochs) if _needs_decider(config) else None
    ct_decider = _fit_decider(pairs, out, seed, config.decider_epochs, with_ct=True) \
        if _needs_ct_decider(config) else None
    scores, truth_ml = _score_test_cases(data, cases, config, folders, unseen, models, plan, out, decider,
                                         ct_decider)
    timings["evaluate_s"] = time.perf_counter() - t0 - sum(timings.values())
    return {"seed": seed, "dataset": str(data), "cases": [c for c in sorted(cases) if c not in set(train_ids)],
            "truth_ml": truth_ml, "methods": scores,
            "cleanup": {CLASS_NAMES[c]: steps for c, steps in plan.items()},
            "raw_source": folders[0].name, "sources": [f.name for f in folders],
            "unseen_source": unseen.name if unseen else None,
            "timings": {k: round(v, 1) for k, v in timings.items()}}


def _needs_refnet_label(config: QualityConfig) -> bool:
    return any(m in config.methods for m in ("unseen_refnet_label", "refnet_label_cleanup", "refnet_label_pieces",
                                             "refnet_label_pieces_ct", "average_refnet_label",
                                             "average_refnet_label_pieces"))


def _needs_decider(config: QualityConfig) -> bool:
    return any(m in config.methods for m in PIECE_SOURCES)


def _needs_ct_decider(config: QualityConfig) -> bool:
    return any(m in config.methods for m in PIECE_CT_SOURCES)


def _cleanup_plan(pairs: list[Any], source: str) -> dict[int, list[str]]:
    """Cleanup's per-class steps, chosen on the raw model's out-of-fold training predictions."""
    from .cleanup import choose_cleanup

    oof = [p for p in pairs if p.source == source]
    return choose_cleanup([p.raw for p in oof], [p.target for p in oof])


def _fit_decider(pairs: list[Any], out: Path, seed: int, epochs: int, with_ct: bool = False) -> Any:
    """The piece decider, trained on every model's out-of-fold maps and the training truths; saved as
    pieces.pt (pieces_ct.pt for the one that reads the CT)."""
    from .pieces import fit_on_pairs

    decider = fit_on_pairs(pairs, seed=seed, epochs=epochs, with_ct=with_ct,
                           provenance={"data": "quality benchmark out-of-fold maps and training truths"})
    decider.save(out / ("pieces_ct.pt" if with_ct else "pieces.pt"))
    logger.info("piece decider: cut-off %.2f, class cut-off %.2f, %s", decider.threshold, decider.class_threshold,
                decider.provenance["cross_validation"])
    return decider


def add_methods(out_dir: str | os.PathLike, run: dict[str, Any], config: QualityConfig) -> dict[str, Any]:
    """Score ``config.methods`` on a finished run's folder and return the run with them added.

    For methods added after a seed was run: the base models' predictions and ``refnet_label.pt`` are
    read from the folder (nothing is retrained but what the new methods need: the piece decider,
    the cleanup plan), the test cases are the same, and the methods already there are kept as they are.
    """
    from .checkpoint import load_model
    from .data.btcv import find_cases
    from .pairs import load_training_pairs

    out = Path(out_dir)
    data = Path(run["dataset"])
    predictions = out / "predictions"
    # The K training models: recorded by runs since "sources" existed, else every other prediction folder.
    others = sorted(p.name for p in predictions.iterdir()
                    if p.is_dir() and p.name not in (run["raw_source"], run["unseen_source"]))
    names = run.get("sources") or [run["raw_source"], *others]
    folders = [predictions / name for name in names]
    unseen = predictions / run["unseen_source"] if run.get("unseen_source") else None
    if any(m.startswith("unseen_") for m in config.methods) and unseen is None:
        raise ValueError(f"{out}: this run has no unseen architecture to score {list(config.methods)} on.")
    pairs = load_training_pairs(data, folders, with_ct=_needs_ct_decider(config))
    models = {"refnet_label": load_model(out / "refnet_label.pt", device=config.demo.device)} \
        if _needs_refnet_label(config) else {}
    plan = _cleanup_plan(pairs, folders[0].name) if "cleanup" in config.methods else {}
    decider = _fit_decider(pairs, out, run["seed"], config.decider_epochs) if _needs_decider(config) else None
    ct_decider = _fit_decider(pairs, out, run["seed"], config.decider_epochs, with_ct=True) \
        if _needs_ct_decider(config) else None
    scores, truth_ml = _score_test_cases(data, find_cases(data), config, folders, unseen, models, plan, out, decider,
                                         ct_decider)
    return {**run, "truth_ml": truth_ml, "methods": {**run["methods"], **scores}}


def _score_test_cases(data, cases, config, folders, unseen, models, plan, out, decider=None,
                      ct_decider=None) -> tuple[dict[str, dict[str, list]], list[list[float]]]:
    """Per method, per test case: Dice, NSD, HD95 and false-positive mL vectors; and per test case the
    truth's volume (mL) of every class, which organs the patient has (``benchmarks/gain_sources.py``)."""
    from .cleanup import apply_cleanup
    from .data.btcv import load_case, split_cases
    from .evaluate import dice_per_class, false_positive_ml
    from .geometry import canonical_affine, to_canonical
    from .io import read_affine
    from .refine import refine_labels
    from .segmenters import load_prediction_folder, load_segmenter, predict_ensemble
    from .spacing import voxel_spacing
    from .surface import surface_scores

    test = split_cases(cases, "test")
    if not test:
        raise ValueError(f"{data}: no test cases to score.")
    ids = [c.case_id for c in test]
    affines = {c.case_id: read_affine(c.image) for c in test}
    raw_preds = load_prediction_folder(folders[0], ids, affines=affines)
    unseen_preds = load_prediction_folder(unseen, ids, affines=affines) if unseen else {}
    ensemble = ([load_segmenter(out / "segmenters" / f"{f.name}.pt", device=config.demo.device) for f in folders]
                if "average" in config.methods else [])
    scores: dict[str, dict[str, list]] = {m: {"dice": [], "nsd": [], "hd95": [], "fp_ml": []}
                                          for m in config.methods}
    truth_ml = []
    for case in test:
        ct, target = load_case(case)
        raw = raw_preds[case.case_id]
        maps: dict[str, np.ndarray] = {"raw": raw}
        if "cleanup" in config.methods:
            canon, reo = to_canonical(raw, ct.affine)
            maps["cleanup"] = reo.backward(apply_cleanup(canon, plan))
        if "average" in config.methods:
            canon_ct, reo = to_canonical(ct.array.astype(np.float32), ct.affine)
            grid = voxel_spacing(canonical_affine(ct.affine, ct.array.shape))
            maps["average"] = reo.backward(predict_ensemble(ensemble, canon_ct, spacing=grid,
                                                            device=config.demo.device))
        for method, model in models.items():
            if method in config.methods or method == "refnet_label":
                maps[method] = refine_labels(raw, ct.affine, model, ct=ct.array if model.uses_ct else None)
        if "refnet_label_cleanup" in config.methods:
            canon, reo = to_canonical(maps["refnet_label"], ct.affine)
            maps["refnet_label_cleanup"] = reo.backward(apply_cleanup(canon, plan))
        if unseen:
            maps["unseen_raw"] = unseen_preds[case.case_id]
            if "unseen_refnet_label" in config.methods:
                maps["unseen_refnet_label"] = refine_labels(unseen_preds[case.case_id], ct.affine,
                                                            models["refnet_label"])
        if {"average_refnet_label", "average_refnet_label_pieces"} & set(config.methods):
            maps["average_refnet_label"] = refine_labels(maps["average"], ct.affine, models["refnet_label"])
        for method, source in PIECE_SOURCES.items():
            if method in config.methods:
                maps[method] = decider.apply_to(maps[source], ct.affine)[0]
        for method, source in PIECE_CT_SOURCES.items():
            if method in config.methods:
                maps[method] = ct_decider.apply_to(maps[source], ct.affine, ct=ct.array)[0]
        spacing = voxel_spacing(ct.affine)
        ml = float(np.prod(spacing)) / 1000.0
        truth_ml.append([round(float(v) * ml, 3) for v in np.bincount(np.ravel(target), minlength=NUM_CLASSES)])
        for method in config.methods:
            nsd, hd = surface_scores(maps[method], target, spacing)
            for key, value in (("dice", dice_per_class(maps[method], target)), ("nsd", nsd), ("hd95", hd),
                               ("fp_ml", false_positive_ml(maps[method], target, voxel_volume_ml=ml))):
                scores[method][key].append([None if not np.isfinite(v) else float(v) for v in value])
        logger.info("scored case %d", case.case_id)
    return scores, truth_ml


def _array(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)


def _nanmean(a: np.ndarray, axis: int | None = None) -> Any:
    with warnings.catch_warnings():  # a class absent from every case stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def _case_means(run: dict[str, Any], method: str) -> np.ndarray:
    """Per test case, the mean Dice over the classes scored in that case (the paper's 13-class mean)."""
    return _nanmean(_array(run["methods"][method]["dice"]), axis=1)


def summarise_quality(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the runs (seeds) into quality.json: methods as keys, plus gains with paired intervals.

    Per method: ``dice``, ``nsd``, ``hd95``, ``false_positive_ml`` per class (means over all cases),
    ``mean_dice`` (13 classes, the paper's convention), ``mean_nsd`` and ``mean_hd95`` (12 organs),
    ``hd95_undefined`` (organ-case pairs where one map lacks the organ). Under ``gains``: per method
    against its baseline, the relative mean-Dice gain per seed, its mean and SD over seeds, the paired
    95% interval over all cases of the per-case mean-Dice difference, the per-organ change, and the NSD
    change.
    """
    if not runs:
        raise ValueError("summarise_quality needs at least one run.")
    methods = [m for m in METHODS if all(m in r["methods"] for r in runs)]
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "cases": sum(len(r["cases"]) for r in runs),
                           "classes": list(CLASS_NAMES)}
    pooled: dict[str, dict[str, np.ndarray]] = {}
    for m in methods:
        pooled[m] = {k: np.concatenate([_array(r["methods"][m][k]) for r in runs])
                     for k in ("dice", "nsd", "hd95", "fp_ml")}
        p = pooled[m]
        dice, nsd, hd = _nanmean(p["dice"], 0), _nanmean(p["nsd"], 0), _nanmean(p["hd95"], 0)
        both = np.isfinite(p["nsd"][:, 1:])  # the organ is in the prediction or the ground truth
        out[m] = {
            "dice": _by_class(dice), "nsd": _by_class(nsd), "hd95": _by_class(hd),
            "false_positive_ml": _by_class(p["fp_ml"].mean(axis=0)),
            "mean_dice": _round(_nanmean(dice)), "mean_organ_dice": _round(_nanmean(dice[1:])),
            "mean_nsd": _round(_nanmean(nsd[1:])), "mean_hd95": _round(_nanmean(hd[1:])),
            "hd95_undefined": int((both & ~np.isfinite(p["hd95"][:, 1:])).sum()),
            "mean_false_positive_ml": _round(p["fp_ml"][:, 1:].mean()),
        }
    gains = {}
    for m in methods:
        base = BASELINE[m]
        if m == base or base not in pooled:
            continue
        per_seed = []
        for r in runs:
            b, a = _nanmean(_case_means(r, base)), _nanmean(_case_means(r, m))
            per_seed.append(100.0 * (a - b) / b)
        after = np.concatenate([_case_means(r, m) for r in runs])
        before = np.concatenate([_case_means(r, base) for r in runs])
        organ = _nanmean(pooled[m]["dice"], 0)[1:] - _nanmean(pooled[base]["dice"], 0)[1:]
        gains[m] = {
            "against": base,
            "gain_percent_per_seed": [_round(g, 3) for g in per_seed],
            "gain_percent_mean": _round(float(np.mean(per_seed)), 3),
            "gain_percent_sd": _round(float(np.std(per_seed, ddof=1)), 3) if len(per_seed) > 1 else None,
            "case_dice_diff": {k: _round(v) for k, v in paired_interval(after, before).items()},
            "organ_change": {name: _round(v) for name, v in zip(CLASS_NAMES[1:], organ)},
            "worst_organ_change": _round(float(np.nanmin(organ))),
            "nsd_change": _round(out[m]["mean_nsd"] - out[base]["mean_nsd"])
            if None not in (out[m]["mean_nsd"], out[base]["mean_nsd"]) else None,
        }
    out["gains"] = gains
    out["runs"] = [{k: r[k] for k in ("seed", "cases", "cleanup", "raw_source", "unseen_source", "timings")}
                   for r in runs]
    return out


def _round(v: Any, digits: int = 5) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), digits)


def _by_class(values: np.ndarray) -> dict[str, float | None]:
    return {name: _round(v) for name, v in zip(CLASS_NAMES, values[:NUM_CLASSES])}


def quality_table(summary: dict[str, Any]) -> str:
    """Markdown table: one row per method, its means and its gain against its baseline."""
    head = ("| method | mean Dice | against | gain | 95% CI of case Dice diff | worst organ | mean NSD "
            "| mean HD95 mm | FP mL/organ |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for m in METHODS:
        if m not in summary:
            continue
        s, g = summary[m], summary["gains"].get(m)
        if g:
            d = g["case_dice_diff"]
            sd = g["gain_percent_sd"]
            gain = f"{g['gain_percent_mean']:+.2f}%" + (f" ± {sd:.2f}" if sd is not None else "")
            ci = "n/a" if d["low"] is None else f"[{d['low']:+.4f}, {d['high']:+.4f}]"
            worst = f"{g['worst_organ_change']:+.4f}"
            against = g["against"]
        else:
            against, gain, ci, worst = "", "(baseline)", "", ""
        lines.append(f"| {m} | {s['mean_dice']:.4f} | {against} | {gain} | {ci} | {worst} | {_f(s['mean_nsd'])} "
                     f"| {_f(s['mean_hd95'], 2)} | {_f(s['mean_false_positive_ml'], 2)} |")
    return "\n".join(lines)


def _f(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def save_gain_chart(path: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """PNG bar chart: per-organ Dice change of each method against raw (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import save_figure

    shown = [m for m in METHODS if m in summary["gains"] and summary["gains"][m]["against"] == "raw"]
    organs = list(CLASS_NAMES[1:])
    width = 0.8 / max(len(shown), 1)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for n, m in enumerate(shown):
        change = [summary["gains"][m]["organ_change"][o] or 0.0 for o in organs]
        ax.bar(np.arange(len(organs)) + (n - (len(shown) - 1) / 2) * width, change, width, label=m)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(organs)), organs, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("Dice change vs raw")
    ax.set_title(f"Per-organ Dice change against raw ({summary['cases']} test cases, seeds {summary['seeds']})")
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=90)
