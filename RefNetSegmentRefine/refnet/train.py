"""Training RefNet on (raw prediction, ground truth) pairs: the paper's Algorithm 1, step 2.

Reads top to bottom like nanoGPT's train.py: config, pairs, batch sampling, validation, the loop.
Two guards keep a refiner from silently destroying a class: held-out cases pick the best epoch, and
a per-class check on them lists the classes the model may change (``refine_classes`` in the model
file); a class that got worse keeps its raw mask at inference.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import EDGE_MM, LoadedModel, save_model
from .components import component_map, decode_component_map
from .device import resolve_device
from .error_simulator import PLAUSIBLE_VARIATION, ErrorConfig, simulate_errors
from .evaluate import dice_per_class, summarise
from .guards import GuardConfig
from .labels import NUM_CLASSES
from .losses import RefNetLoss
from .model import RefNet, RefNetConfig
from .pairs import TrainingPair
from .position import position_planes
from .refine import Proposal, apply_guards, label_slab, propose, window_ct
from .spacing import InPlaneGrid, context_offsets, resample_image, resample_labels, voxel_spacing

__all__ = ["TrainConfig", "TrainingPair", "sample_batch", "train_from_folders", "train_refnet", "validate",
           "validation_cases"]

logger = logging.getLogger(__name__)

_OPTIMIZERS = {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass(frozen=True)
class TrainConfig:
    """RefNet training settings; the defaults are the paper's where it gives one."""

    model: RefNetConfig = field(default_factory=RefNetConfig)
    optimizer: str = "rmsprop"  # paper: RMSprop
    lr: float = 1e-5  # paper: 1e-5 (slow from scratch on CPU; the demo preset uses a larger one)
    epochs: int = 10
    steps_per_epoch: int = 200
    batch_size: int = 16
    crop_size: int = 96  # square in-plane crops (multiple of 16)
    raw_weight: float = 1.0  # w of CE(P, S); paper: 1
    dice_weight: float = 1.0
    class_weight_power: float = 0.0  # CE class weights (1/frequency)^power; 0 = unweighted (paper)
    error_fraction: float = 0.0  # share of crops centred on a voxel where raw and ground truth disagree
    val_cases: int = 2  # cases held out (all their pairs) for epoch choice and the per-class check
    min_class_gain: float = 0.0  # held-out Dice gain a class needs to be refined (else it keeps raw labels)
    ct_window: tuple[float, float] = (40.0, 400.0)  # (level, width) HU for CT-conditioned models
    spacing_mm: float | None = 1.5  # in-plane spacing RefNet trains and refines at (TotalSegmentator's
    #                                 standard grid; None: the data's own, for pre-resampled data)
    context_mm: float | None = 5.0  # distance of the context slices (None: adjacent slices)
    identity_pairs: bool = True  # also train on (ground truth -> ground truth): correct maps stay as they are
    simulated_pairs: int = 0  # per training case, (simulated errors -> ground truth) pairs with no direction
    #                           of error (refnet.error_simulator), so no one base model's bias is learned
    errors: ErrorConfig = field(default_factory=ErrorConfig)  # strengths of the simulated errors
    plausible_pairs: int = 0  # per training case, (plausible variant -> itself) pairs: ground truth with its
    #                           boundaries moved within annotator variation stays as it is (do no harm)
    band_mm: float = 6.0  # the band guard's width stored in the model file
    edge_mm: float = EDGE_MM  # the edge guard's depth stored in the model file (chosen on development crops)
    max_volume_change: float = 0.5  # the volume guard's bound stored in the model file (set a priori, not tuned)
    thresholds: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)  # confidence thresholds tried on held-out cases
    max_harm: float = 0.002  # Dice a class may lose when held-out ground truth is refined (the no-harm bar 0.998)
    val_every: int = 1  # validate (and keep the best) every N epochs, and after the last
    channels_last: bool = False  # channels-last activations: about 1.3x faster epochs on CPU
    #                              (benchmarks/train_speed.py), the same training up to float rounding;
    #                              off by default so the demo's published run reproduces
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {self.optimizer!r}.")
        if self.lr <= 0 or self.epochs < 1 or self.steps_per_epoch < 1 or self.batch_size < 1:
            raise ValueError("lr, epochs, steps_per_epoch and batch_size must be positive.")
        if self.crop_size < 16 or self.crop_size % 16:
            raise ValueError(f"crop_size must be a multiple of 16 (>= 16), got {self.crop_size}.")
        if self.val_cases < 0:
            raise ValueError(f"val_cases must be >= 0, got {self.val_cases}.")
        if not 0.0 <= self.error_fraction <= 1.0:
            raise ValueError(f"error_fraction must be in [0, 1], got {self.error_fraction}.")
        if self.spacing_mm is not None and self.spacing_mm <= 0:
            raise ValueError(f"spacing_mm must be > 0 (or None for the data's own), got {self.spacing_mm}.")
        if not self.thresholds or any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must be probabilities in [0, 1], got {self.thresholds}.")
        if self.val_every < 1:
            raise ValueError(f"val_every must be >= 1, got {self.val_every}.")
        if self.simulated_pairs < 0 or self.plausible_pairs < 0:
            raise ValueError(f"simulated_pairs and plausible_pairs must be >= 0, got {self.simulated_pairs}, "
                             f"{self.plausible_pairs}.")


class _Sampler:
    """Class-balanced crop centres: pick a pair, then a class present in it, then one of its voxels.

    Balancing by class (like MONAI's RandCropByLabelClasses) lets thin and small structures be seen
    as often as the liver; written here because it has to draw from raw and target jointly. With
    ``error_fraction`` > 0 that share of centres is a voxel where raw and target disagree instead.
    """

    def __init__(self, pairs: Sequence[TrainingPair], error_fraction: float = 0.0, *, components: bool = False,
                 position: bool = False) -> None:
        self.pairs = pairs
        self.error_fraction = error_fraction
        # each raw map's component map (uint8), computed once: it needs the whole volume, not the crop
        self.components = [component_map(p.raw, NUM_CLASSES) if components else None for p in pairs]
        self.positions = [position_planes(p.raw, voxel_spacing(p.affine)) if position else None for p in pairs]
        self.errors = [np.flatnonzero((p.raw != p.target).ravel()) if error_fraction else None for p in pairs]
        self.coords: list[dict[int, np.ndarray]] = []
        for p in pairs:
            per_class = {}
            for c in range(1, NUM_CLASSES):
                idx = np.flatnonzero(((p.raw == c) | (p.target == c)).ravel())
                if idx.size:
                    per_class[c] = idx
            self.coords.append(per_class)

    def centre(self, rng: np.random.Generator) -> tuple[int, tuple[int, int, int]]:
        i = int(rng.integers(len(self.pairs)))
        shape = self.pairs[i].raw.shape
        errors = self.errors[i]
        if errors is not None and errors.size and rng.random() < self.error_fraction:
            return i, tuple(int(v) for v in np.unravel_index(errors[int(rng.integers(errors.size))], shape))
        per_class = self.coords[i]
        if not per_class:
            return i, tuple(int(rng.integers(s)) for s in shape)
        c = list(per_class)[int(rng.integers(len(per_class)))]
        flat = per_class[c][int(rng.integers(per_class[c].size))]
        return i, tuple(int(v) for v in np.unravel_index(flat, self.pairs[i].raw.shape))


def _crop(volume: np.ndarray, ci: int, cj: int, size: int) -> np.ndarray:
    """(I, J, ...) -> (size, size, ...) window centred at (ci, cj), edge-padded.

    Only the window is copied: near an edge its rows and columns are gathered with clamped indices
    (what edge padding gives) instead of padding the whole volume first (about 90x slower).
    """
    lo_i, lo_j = ci - size // 2, cj - size // 2
    if lo_i >= 0 and lo_j >= 0 and lo_i + size <= volume.shape[0] and lo_j + size <= volume.shape[1]:
        return volume[lo_i : lo_i + size, lo_j : lo_j + size]
    rows = np.clip(np.arange(lo_i, lo_i + size), 0, volume.shape[0] - 1)
    cols = np.clip(np.arange(lo_j, lo_j + size), 0, volume.shape[1] - 1)
    return volume[rows][:, cols]


def sample_batch(
    sampler: _Sampler, config: TrainConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Draw one training batch.

    Returns:
        ``(labels, target, raw, ct)``: (B, S, H, W) int64 raw label slabs, (B, H, W) int64 ground truth,
        (B, H, W) int64 raw centre slices, and (B, aux_channels, H, W) float32 channels (windowed CT, the
        component map, the position planes; see :class:`~refnet.model.RefNetConfig`) or None.
    """
    ctx, size = config.model.context, config.crop_size
    slabs, targets, cts = [], [], []
    for _ in range(config.batch_size):
        i, (ci, cj, ck) = sampler.centre(rng)
        p = sampler.pairs[i]
        offsets = context_offsets(ctx, voxel_spacing(p.affine)[2], config.context_mm)
        slab = label_slab(_crop(p.raw, ci, cj, size), [ck], offsets)[0]  # (S, H, W)
        slabs.append(slab)
        targets.append(_crop(p.target[:, :, ck], ci, cj, size))
        aux = []
        if config.model.ct_channels:
            aux.append(window_ct(_crop(p.ct[:, :, ck], ci, cj, size), *config.ct_window))
        if config.model.component_channel:
            aux.append(decode_component_map(_crop(sampler.components[i][:, :, ck], ci, cj, size)))
        if config.model.position_channels:
            aux.extend(np.moveaxis(_crop(sampler.positions[i], ci, cj, size), 2, 0))
        if aux:
            cts.append(np.stack(aux))
    labels = np.stack(slabs).astype(np.int64)
    raw = labels[:, ctx]
    ct = np.stack(cts).astype(np.float32) if cts else None
    return labels, np.stack(targets).astype(np.int64), raw, ct


def _proposals(model: LoadedModel, pairs: Sequence[TrainingPair]) -> list[Proposal]:
    """The net's candidates for each pair (canonical arrays), ready for any guard setting."""
    out = []
    for p in pairs:
        ct = None
        if model.net_uses_ct:
            ct = window_ct(p.ct, *(model.metadata.get("ct_window") or (40.0, 400.0)))
        out.append(propose(p.raw.astype(np.int64), voxel_spacing(p.affine), model, ct=ct))
    return out


def _guarded(pair: TrainingPair, proposal: Proposal, model: LoadedModel, guards: GuardConfig) -> np.ndarray:
    labels = np.array(pair.raw, copy=True)
    labels[proposal.box] = apply_guards(proposal, model, guards)[0]
    return labels


def _scores(model, pairs, proposals, guards) -> dict[str, Any]:
    raw_scores = [dice_per_class(p.raw, p.target) for p in pairs]
    ref_scores = [dice_per_class(_guarded(p, q, model, guards), p.target) for p, q in zip(pairs, proposals)]
    with warnings.catch_warnings():  # a class absent from every held-out case is NaN, on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        raw_pc, ref_pc = np.nanmean(raw_scores, axis=0), np.nanmean(ref_scores, axis=0)
    return {"raw": summarise(raw_scores), "refined": summarise(ref_scores),
            "raw_per_class": raw_pc.tolist(), "refined_per_class": ref_pc.tolist()}


def validate(model: LoadedModel, pairs: Sequence[TrainingPair], *, guards: GuardConfig | None = None
             ) -> dict[str, Any]:
    """Per-class Dice of raw and refined against ground truth on held-out pairs.

    Returns:
        ``{"raw": summary, "refined": summary, "raw_per_class": [...], "refined_per_class": [...]}``
        where summaries are :func:`refnet.evaluate.summarise` outputs.
    """
    return _scores(model, pairs, _proposals(model, pairs), guards or GuardConfig())


def _identity_pairs(pairs: Sequence[TrainingPair]) -> list[TrainingPair]:
    """One (ground truth -> ground truth) pair per case: a correct map must come back unchanged."""
    seen: dict[int, TrainingPair] = {}
    for p in pairs:
        seen.setdefault(p.case_id, replace(p, raw=p.target, source="ground_truth"))
    return list(seen.values())


def _simulated_pairs(pairs: Sequence[TrainingPair], count: int, config: ErrorConfig, seed: int, *,
                     plausible: bool = False) -> list[TrainingPair]:
    """``count`` (simulated errors -> ground truth) pairs per case, seeded by (seed, case, n).

    With ``plausible`` the corrupted map is its own target: a variant of a correct map that is still correct.
    """
    out = []
    for truth in _identity_pairs(pairs):
        spacing = voxel_spacing(truth.affine)
        for n in range(count):
            rng = np.random.default_rng([seed, truth.case_id, n, int(plausible)])
            raw = simulate_errors(truth.target, spacing, rng, config=config)
            out.append(replace(truth, raw=raw, target=raw if plausible else truth.target,
                               source=f"{'plausible' if plausible else 'simulated'}_{n}"))
    return out


def _per_class(model, pairs, proposals, guards, *, harm: bool) -> np.ndarray:
    """(C,) mean Dice gain over raw (or, with ``harm``, Dice lost against the target) per class."""
    scores = []
    for p, q in zip(pairs, proposals):
        refined = dice_per_class(_guarded(p, q, model, guards), p.target)
        scores.append(1.0 - refined if harm else refined - dice_per_class(p.raw, p.target))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nan_to_num(np.nanmean(scores, axis=0))


def _choose_thresholds(model, pairs, proposals, config: TrainConfig) -> tuple[list[float], list[dict[str, Any]]]:
    """A confidence threshold per class, chosen on held-out cases for gain without harm.

    For each class, among the thresholds whose Dice loss on the held-out ground truth refined as if it
    were a prediction stays within ``config.max_harm`` (correct maps must come back unchanged), the one
    with the largest held-out gain minus harm; ties go to the higher, more cautious threshold. A class
    no threshold keeps within the bound gets 1.0: it is never changed.
    """
    truth = _identity_pairs(pairs)
    truth_props = _proposals(model, truth)
    table = []
    for t in sorted(config.thresholds):
        guards = GuardConfig(class_check=False, threshold=t)
        gain = _per_class(model, pairs, proposals, guards, harm=False)
        harm = _per_class(model, truth, truth_props, guards, harm=True)
        table.append({"threshold": t, "gain": np.round(gain, 5).tolist(), "harm": np.round(harm, 5).tolist()})
    chosen = []
    for c in range(NUM_CLASSES):
        ok = [r for r in table if r["harm"][c] <= config.max_harm]
        best = max(ok, key=lambda r: (r["gain"][c] - r["harm"][c], r["threshold"]), default=None)
        chosen.append(1.0 if best is None else best["threshold"])
    return chosen, table


def _at_spacing(pair: TrainingPair, spacing_mm: float | None) -> TrainingPair:
    """The pair resampled in-plane to ``spacing_mm`` the way refinement resamples (labels via one-hot)."""
    if spacing_mm is None:
        return pair
    native = voxel_spacing(pair.affine)
    grid = InPlaneGrid.for_spacing(pair.raw.shape[:2], native[:2], spacing_mm)
    if grid.identity:
        return pair
    span = tuple((0, n) for n in grid.shape)
    affine = np.array(pair.affine, dtype=np.float64, copy=True)
    affine[:3, 0] *= grid.scale[0]
    affine[:3, 1] *= grid.scale[1]
    return replace(pair, raw=resample_labels(pair.raw, grid, span, num_classes=NUM_CLASSES),
                   target=resample_labels(pair.target, grid, span, num_classes=NUM_CLASSES),
                   ct=None if pair.ct is None else resample_image(pair.ct, grid, span), affine=affine)


def _class_weights(pairs: Sequence[TrainingPair], power: float) -> list[float] | None:
    if power == 0:
        return None
    counts = np.zeros(NUM_CLASSES)
    for p in pairs:
        counts += np.bincount(p.target.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
    weights = (counts.sum() / np.maximum(counts, 1)) ** power
    return (weights / weights.mean()).tolist()


def validation_cases(case_ids: Collection[int], val_cases: int) -> list[int]:
    """The case ids :func:`train_refnet` holds out for epoch choice and the per-class check: the last ones.

    Known before training, so the base models can be trained without these cases too; the check then
    sees base-model errors of the kind RefNet meets on new images, not those on the models' own training data.
    """
    ids = sorted(set(case_ids))
    if val_cases < 0:
        raise ValueError(f"the number of held-out cases must be >= 0, got {val_cases}.")
    if val_cases >= len(ids):
        raise ValueError(f"val_cases={val_cases} leaves no training case out of {len(ids)}; lower it.")
    return ids[len(ids) - val_cases :] if val_cases else []


def _split(pairs: Sequence[TrainingPair], val_cases: int) -> tuple[list[TrainingPair], list[TrainingPair]]:
    held = set(validation_cases({p.case_id for p in pairs}, val_cases))
    return [p for p in pairs if p.case_id not in held], [p for p in pairs if p.case_id in held]


def _gate(val: dict[str, Any], min_gain: float) -> list[int]:
    """Classes whose held-out Dice rose by at least ``min_gain`` (negative: fell by at most); background always."""
    allowed = [0]
    for c in range(1, NUM_CLASSES):
        raw, ref = val["raw_per_class"][c], val["refined_per_class"][c]
        if not (np.isfinite(raw) and np.isfinite(ref)) or ref >= raw + min_gain:
            allowed.append(c)
    return allowed


def train_refnet(
    pairs: Sequence[TrainingPair],
    config: TrainConfig,
    *,
    work_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    progress: bool = False,
    provenance: dict[str, Any] | None = None,
    extra_maps: Sequence[TrainingPair] = (),
) -> LoadedModel:
    """Train a RefNet on ``pairs``; checkpoint each epoch to ``work_dir`` and resume from there.

    Args:
        pairs: training pairs (K per case when K segmentation models were used).
        config: training settings.
        work_dir: holds ``last.pt`` (resume point), ``best.pt`` and ``train_log.jsonl``.
        output: where the final model file goes (default ``work_dir/refnet.pt``).
        progress: show a tqdm bar per epoch.
        provenance: extra builtin-typed facts stored under ``metadata["training"]``.
        extra_maps: correct label maps with no model prediction (other anatomy: phantoms, a user's own
            labelled cases; only ``target`` is read, case ids distinct from ``pairs``'): trained on as
            identity pairs and, with ``config.simulated_pairs``, simulated errors; never held out.

    Returns:
        The best model (by held-out mean Dice), with its per-class check applied.
    """
    from .distributed import setup

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train_pairs, val_pairs = _split(pairs, config.val_cases)
    if config.model.ct_channels and any(p.ct is None for p in pairs):
        raise ValueError("the model takes the CT as input but some training pairs have no CT.")
    ctx, device_name = setup(config.device)  # under torchrun: this process's rank and device
    if config.batch_size % ctx.world:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {ctx.world} processes "
                         "(each takes an equal share of every batch).")
    device = resolve_device(device_name)
    torch.manual_seed(config.seed)
    net = RefNet(config.model).to(device)
    optimiser = _OPTIMIZERS[config.optimizer](net.parameters(), lr=config.lr)
    if {p.case_id for p in extra_maps} & {p.case_id for p in pairs}:
        raise ValueError("extra_maps must use case ids that the training pairs do not use.")
    extra = [replace(p, raw=p.target, source="ground_truth") for p in _identity_pairs(extra_maps)]
    fit = train_pairs + (_identity_pairs(train_pairs) if config.identity_pairs else []) + extra
    fit = [_at_spacing(p, config.spacing_mm) for p in fit]
    fit += (_simulated_pairs(fit, config.simulated_pairs, config.errors, config.seed)  # at the model spacing
            + _simulated_pairs(fit, config.plausible_pairs, PLAUSIBLE_VARIATION, config.seed, plausible=True))
    loss_fn = RefNetLoss(raw_weight=config.raw_weight, dice_weight=config.dice_weight,
                         class_weights=_class_weights(fit, config.class_weight_power)).to(device)
    start, best = _resume(work, net, optimiser)  # every process: the checkpoint does not depend on their number
    sampler = _Sampler(fit, config.error_fraction, components=config.model.component_channel,
                       position=config.model.position_channels)
    meta = _metadata(config, pairs, train_pairs, val_pairs, {"extra_maps": len(extra), **(provenance or {})})
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        meta["training"]["processes"] = ctx.world
        trained = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        trained = net
    for epoch in range(start, config.epochs):
        losses = _run_epoch(trained, optimiser, loss_fn, sampler, config, epoch, device, progress and ctx.main, ctx)
        record: dict[str, Any] = {"epoch": epoch + 1, **losses}
        if ctx.main:  # one process validates and writes; the others wait at the barrier
            if val_pairs and ((epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs):
                val = validate(LoadedModel(net.eval(), meta, device), val_pairs, guards=GuardConfig(class_check=False))
                record.update(val_raw=val["raw"]["mean_dice"], val_refined=val["refined"]["mean_dice"])
                if best is None or val["refined"]["mean_dice"] > best["score"]:
                    best = {"score": val["refined"]["mean_dice"], "epoch": epoch + 1}
                    save_model(work / "best.pt", net, metadata={**meta, "validation": val})
            _log(work, record)
            _checkpoint(work, net, optimiser, epoch + 1, best)
        ctx.barrier()
    out = Path(output) if output is not None else work / "refnet.pt"
    model = _finish(work, net, meta, val_pairs, config, out, device) if ctx.main else None
    ctx.barrier()
    if model is None:
        from .checkpoint import load_model

        model = load_model(out, device=device)
    return model


def _run_epoch(net, optimiser, loss_fn, sampler, config, epoch, device, progress, ctx=None) -> dict[str, float]:
    """One epoch; under torchrun each process trains on its share (every world-th crop) of the same batches."""
    rng = np.random.default_rng([config.seed, epoch])  # per-epoch streams make resume exact
    torch.manual_seed(config.seed * 1000 + epoch)
    rank, world = (ctx.rank, ctx.world) if ctx is not None else (0, 1)
    net.train()
    names = ("loss", "ce_gt", "dice_gt", "ce_raw")
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)  # on the device: no host sync per step
    steps = range(config.steps_per_epoch)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False)
    dtype = _autocast_dtype(device)
    for _ in steps:
        labels, target, raw, ct = sample_batch(sampler, config, rng)
        if world > 1:  # every process draws the whole batch from the same stream and keeps its disjoint share
            labels, target, raw = labels[rank::world], target[rank::world], raw[rank::world]
            ct = None if ct is None else ct[rank::world]
        pin = device.type == "cuda"
        x = _to(torch.from_numpy(labels), device, pin)
        c = None if ct is None else _to(torch.from_numpy(ct), device, pin)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = net(x, c, channels_last=config.channels_last)
        terms = loss_fn.terms(logits.float(), _to(torch.from_numpy(target), device, pin),
                              _to(torch.from_numpy(raw), device, pin))
        loss = terms["ce_gt"] + loss_fn.dice_weight * terms["dice_gt"] + loss_fn.raw_weight * terms["ce_raw"]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        sums += torch.stack([loss.detach(), terms["ce_gt"].detach(), terms["dice_gt"].detach(),
                             terms["ce_raw"].detach()]).double()
    net.eval()
    totals = dict(zip(names, sums.tolist()))
    if ctx is not None:
        totals = ctx.all_mean(totals, device)
    return {k: round(v / config.steps_per_epoch, 5) for k, v in totals.items()}


def _to(tensor: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    """Host batch to the device; on a GPU through pinned memory, so the copy does not block the host."""
    return tensor.pin_memory().to(device, non_blocking=True) if pin else tensor.to(device)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that have it (no loss scaling needed); fp32 elsewhere (CPU autocast is slower)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _metadata(config, pairs, train_pairs, val_pairs, provenance) -> dict[str, Any]:
    cfg = asdict(replace(config, model=RefNetConfig()))
    cfg.pop("model")
    slices = [voxel_spacing(p.affine)[2] for p in pairs]
    return {
        "ct_window": list(config.ct_window) if config.model.ct_channels else None,
        "spacing": {"inplane_mm": config.spacing_mm, "slice_mm": [round(min(slices), 3), round(max(slices), 3)],
                    "context_mm": config.context_mm},
        "guards": {"band_mm": config.band_mm, "edge_mm": config.edge_mm, "threshold": min(config.thresholds),
                   "max_volume_change": config.max_volume_change},
        "training": {
            "config": json.loads(json.dumps(cfg)),
            "pairs": len(pairs),
            "identity_pairs": config.identity_pairs,
            "simulated_pairs": config.simulated_pairs,
            "plausible_pairs": config.plausible_pairs,
            "train_cases": sorted({p.case_id for p in train_pairs}),
            "val_cases": sorted({p.case_id for p in val_pairs}),
            "sources": sorted({p.source for p in pairs}),
            **(provenance or {}),
        },
    }


def _finish(work, net, meta, val_pairs, config, output, device) -> LoadedModel:
    """Best epoch, then on held-out pairs: the confidence threshold, the per-class check, the final scores."""
    from .checkpoint import load_model

    if val_pairs and (work / "best.pt").exists():
        best = load_model(work / "best.pt", device=device)
        net, meta = best.net, {**meta, "validation": best.metadata["validation"]}
    model = LoadedModel(net.eval(), meta, device)
    if val_pairs:
        proposals = _proposals(model, val_pairs)
        thresholds, table = _choose_thresholds(model, val_pairs, proposals, config)
        model.metadata["guards"] = {**meta["guards"], "class_thresholds": thresholds}
        model.metadata["threshold_choice"] = table
        logger.info("confidence thresholds per class %s chosen on %d held-out pairs", thresholds, len(val_pairs))
        allowed = _gate(_scores(model, val_pairs, proposals, GuardConfig(class_check=False)), config.min_class_gain)
        model.metadata["refine_classes"] = allowed
        dropped = sorted(set(range(NUM_CLASSES)) - set(allowed))
        if dropped:
            logger.warning("per-class check: classes %s got worse on held-out cases and keep raw labels", dropped)
        model.metadata["validation_gated"] = _scores(model, val_pairs, proposals, GuardConfig())
    out = Path(output) if output is not None else work / "refnet.pt"
    save_model(out, model.net, metadata=model.metadata)
    logger.info("saved RefNet model to %s", out)
    return model


def _log(work: Path, record: dict[str, Any]) -> None:
    logger.info("epoch %s: %s", record["epoch"], {k: v for k, v in record.items() if k != "epoch"})
    with open(work / "train_log.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _checkpoint(work: Path, net, optimiser, epoch: int, best: dict | None) -> None:
    tmp = work / ".last.pt.tmp"
    torch.save({"epoch": epoch, "net": net.state_dict(), "optimiser": optimiser.state_dict(),
                "best": best, "config": net.config.to_dict()}, tmp)
    os.replace(tmp, work / "last.pt")


def _resume(work: Path, net, optimiser) -> tuple[int, dict | None]:
    path = work / "last.pt"
    if not path.exists():
        return 0, None
    state = torch.load(path, map_location="cpu", weights_only=True)
    # a field added to RefNetConfig after the checkpoint was written reads as its default (it did not exist)
    if {**RefNetConfig().to_dict(), **(state.get("config") or {})} != net.config.to_dict():
        raise ValueError(f"{path} was written for another RefNet architecture; use a fresh work directory.")
    net.load_state_dict(state["net"])
    optimiser.load_state_dict(state["optimiser"])
    logger.info("resuming from %s at epoch %d", path, state["epoch"])
    return int(state["epoch"]), state.get("best")


def train_from_folders(
    dataset_dir: str | os.PathLike,
    prediction_dirs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    config: TrainConfig | None = None,
    work_dir: str | os.PathLike | None = None,
    scheme: str = "refnet",
    progress: bool = False,
    extra_label_dirs: Sequence[str | os.PathLike] = (),
    extra_scheme: str = "refnet",
    pieces: bool = False,
    pieces_ct: bool = False,
) -> Path:
    """Train from a BTCV-layout dataset and K folders of predictions on its training cases.

    Args:
        dataset_dir: images and ground truth (``img/imgXXXX.nii.gz``, ``label/labelXXXX.nii.gz``).
        prediction_dirs: one folder of label maps per segmentation model.
        output: model file to write.
        config: training settings.
        work_dir: checkpoints and log (default: beside ``output``).
        scheme: label scheme of the prediction files.
        extra_label_dirs: folders of extra correct label maps without CT (see
            :func:`refnet.pairs.load_label_maps`), for label-only models.
        extra_scheme: label scheme of those maps.
        pieces: also fit the keep/drop decision per connected piece (:mod:`refnet.pieces`) on the same
            pairs and store it in ``output``, as ``refnet pieces`` would afterwards: the shipped pipeline's
            second stage, so a model trained on your data refines the way the shipped one does.
        pieces_ct: the same with a decider that also reads the CT (``refnet pieces --ct``); the model then
            needs the CT wherever it refines.

    Returns:
        ``output``.
    """
    from .pairs import EXTRA_LABELS_IDS, load_label_maps, load_training_pairs

    config = config or TrainConfig()
    net_ct = config.model.ct_channels > 0
    pieces = pieces or pieces_ct
    pairs = load_training_pairs(dataset_dir, prediction_dirs, scheme=scheme, with_ct=net_ct or pieces_ct)
    extra: list[TrainingPair] = []
    for folder in extra_label_dirs:
        if config.model.ct_channels:
            raise ValueError("extra label maps have no CT; train a label-only model to use them (drop --ct).")
        extra += [replace(p, case_id=EXTRA_LABELS_IDS + len(extra) + i) for i, p in
                  enumerate(load_label_maps(folder, scheme=extra_scheme))]
    work = Path(work_dir) if work_dir is not None else Path(output).parent / f"{Path(output).stem}_work"
    net_pairs = pairs if net_ct else [replace(p, ct=None) for p in pairs]  # a label-only net reads no CT
    # With a decider, the net alone stays in the work folder and ``output`` is written once, net and decider.
    model = train_refnet(net_pairs, config, work_dir=work, output=None if pieces else output, progress=progress,
                         extra_maps=extra)
    if pieces:
        from .pieces import fit_on_pairs

        decider = fit_on_pairs(pairs, seed=config.seed, provenance={"data": str(dataset_dir)}, with_ct=pieces_ct)
        save_model(output, model.net, metadata=model.metadata, pieces=decider)
        logger.info("piece decider fitted on %d maps (cut-off %s, whole-class cut-off %s) and stored in %s",
                    decider.provenance["maps"], decider.threshold, decider.class_threshold, output)
    return Path(output)
