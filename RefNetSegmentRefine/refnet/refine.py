"""Refine one 3D label map with a trained RefNet: the function every front calls.

The pipeline (see DESIGN.md): canonical orientation -> each axial slice resampled in-plane to the
model's spacing on a grid anchored to the whole slice -> the net on the whole slice (batch norm with
fixed statistics, so the output at a voxel depends on neither a crop nor the image size) -> back to
the native grid inside the labelled box plus a margin in mm, where a voxel may change only if the
net changed its label on the model grid -> guards (:mod:`refnet.guards`) -> the input's orientation.
Whole slices instead of nnU-Net-style overlapping tiles: with batch norm they give the same
crop independence at a third of the compute (tiles must overlap and cover the box's surroundings).

Layered as in nnU-Net: :func:`propose` (the net's candidate labels and confidences, no guard but
the absent-class one) then :func:`apply_guards`; :func:`refine_volume` chains them and reports.
"""

from __future__ import annotations

import copy
import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .checkpoint import LoadedModel
from .components import component_map, decode_component_map
from .geometry import canonical_affine, check_affine, to_canonical
from .guards import (
    GUARD_NAMES,
    GuardConfig,
    class_counts,
    keep_classes,
    labelled_extent,
    limit_at_cut_edges,
    limit_to_band,
    limit_to_confident,
    limit_volume_change,
    remove_new_components,
)
from .labels import CLASS_NAMES, check_class_labels
from .position import position_planes
from .spacing import InPlaneGrid, context_offsets, resample_image, resample_labels, to_native, voxel_spacing

__all__ = [
    "PRECISIONS",
    "ProgressCallback",
    "Proposal",
    "RefineConfig",
    "RefineReport",
    "RefineResult",
    "RefinementCancelled",
    "apply_guards",
    "auto_batch_size",
    "label_slab",
    "labelled_extent",
    "logits_to_labels",
    "predict_logits",
    "present_classes",
    "propose",
    "refine_labels",
    "refine_volume",
    "resolve_precision",
    "restrict_changes",
    "window_ct",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], "bool | None"]
"""Called as ``progress(done_slices, total_slices)``; returning ``False`` cancels the run."""



class RefinementCancelled(RuntimeError):
    """Raised when the progress callback asked to stop; no output was produced."""


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class RefineConfig:
    """How a volume is streamed through the net, and which guards run.

    The speed settings were each kept because ``benchmarks/speed.py`` showed they pay (or, for the GPU
    ones, are what GPUs need); on CPU the defaults give the same output as plain fp32 inference.
    """

    batch_size: int | None = None  # axial slices per forward pass; None: chosen from free memory (GPU) or 4 (CPU)
    margin_mm: float = 12.0  # processed around the labelled box; raised to the guard band if smaller
    guards: GuardConfig = field(default_factory=GuardConfig)
    precision: str = "auto"  # "auto": bf16 (fp16 without bf16) autocast on a GPU, fp32 on CPU
    compile: bool | str = False  # torch.compile the UNet (True: inductor; or a backend name); eager if it fails

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.margin_mm < 0:
            raise ValueError(f"margin_mm must be >= 0, got {self.margin_mm}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")


@dataclass
class RefineReport:
    """What a refinement did: changes per class, voxels each guard held back, warnings.

    Attributes:
        changed: class name -> ``[added, removed]`` voxels, for classes that changed.
        held_back: guard name -> voxels it put back to their raw label (0 when off or idle).
        warnings: e.g. a slice spacing outside the range the model was trained on.
        native_spacing_mm: voxel size of the input (canonical R, A, S axes).
        model_spacing_mm: in-plane spacing the net ran at (None: the input's own).
        dropped_pieces: class name -> ``{"pieces", "voxels", "whole_class"}`` for the pieces the model's piece
            decider removed (:mod:`refnet.pieces`); empty when it removed none, is off, or the model has none.
    """

    changed: dict[str, list[int]] = field(default_factory=dict)
    held_back: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GUARD_NAMES, 0))
    warnings: list[str] = field(default_factory=list)
    native_spacing_mm: list[float] = field(default_factory=list)
    model_spacing_mm: float | None = None
    dropped_pieces: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain-types form for JSON (batch summaries, metrics)."""
        return {"changed": self.changed, "held_back": self.held_back, "warnings": self.warnings,
                "native_spacing_mm": self.native_spacing_mm, "model_spacing_mm": self.model_spacing_mm,
                "dropped_pieces": self.dropped_pieces}

    def summary(self) -> str:
        """One line for a status bar or log: voxels changed and held back."""
        added = sum(a for a, _ in self.changed.values())
        removed = sum(r for _, r in self.changed.values())
        held = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.held_back.items() if v)
        text = f"{added + removed} voxels changed in {len(self.changed)} classes"
        text += f"; guards held back: {held}" if held else "; guards held back nothing"
        if self.dropped_pieces:
            text += f"; {self.dropped_text()}"
        return text + "".join(f". Warning: {w}" for w in self.warnings)

    def dropped_text(self) -> str:
        """What the piece decision removed: ``dropped pieces: Liver 3 (41 voxels), Gallbladder whole (15 voxels)``."""
        if not self.dropped_pieces:
            return "dropped no pieces"
        parts = [f"{name} {'whole' if d['whole_class'] else d['pieces']} ({d['voxels']} voxels)"
                 for name, d in self.dropped_pieces.items()]
        return "dropped pieces: " + ", ".join(parts)


@dataclass
class RefineResult:
    """The refined label map (input's shape, dtype and layout) and its report."""

    labels: np.ndarray
    report: RefineReport


def window_ct(ct: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip HU to ``[level - width/2, level + width/2]`` and scale to [0, 1] (float32)."""
    if width <= 0:
        raise ValueError(f"CT window width must be > 0, got {width}.")
    low = level - width / 2.0
    return np.clip((np.asarray(ct, dtype=np.float32) - low) / width, 0.0, 1.0)


def label_slab(volume: np.ndarray, centres, offsets) -> np.ndarray:
    """Stack the slices at ``centre + offsets`` around each centre (indices clamp at the edges).

    Args:
        volume: (I, J, K) array in canonical layout (axial slices ``[:, :, k]``).
        centres: slice indices k.
        offsets: (S,) int slice offsets, centre 0 in the middle (see :func:`refnet.spacing.context_offsets`).

    Returns:
        (B, S, I, J) array of ``volume``'s dtype.
    """
    k = volume.shape[2]
    idx = np.clip(np.asarray(centres)[:, None] + np.asarray(offsets)[None, :], 0, k - 1)  # (B, S)
    return np.moveaxis(volume[:, :, idx], (2, 3), (0, 1))  # (B, S, I, J)


def predict_logits(model: LoadedModel, labels: np.ndarray, ct: np.ndarray | None = None, *,
                   index: np.ndarray | None = None, precision: str = "fp32", unet=None) -> torch.Tensor:
    """Run the net on a batch of label slabs.

    Args:
        model: a loaded RefNet.
        labels: (B, S, H, W) integer classes; or, with ``index``, (N, H, W) distinct slices.
        ct: (B, ct_channels, H, W) windowed CT in [0, 1], or None for label-only models.
        index: (B, S) indices into ``labels`` forming each sample's slab: each slice is embedded once.
        precision: "fp32", "bf16" or "fp16" (autocast; see :class:`RefineConfig`).
        unet: a compiled UNet to run instead of the model's own.

    Returns:
        (B, C, H, W) float32 logits on the model's device.
    """
    dev = model.device
    # uint8 to the device, widened there: a label costs 1 byte on the way instead of 8
    x = torch.from_numpy(np.asarray(labels).astype(np.uint8, order="C")).to(dev)  # fresh strides: torch
    c = None if ct is None else torch.from_numpy(np.asarray(ct).astype(np.float32, order="C")).to(dev)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        if index is None:
            out = model.net(x, c)
        else:
            out = model.net.forward_slices(x, torch.as_tensor(index, device=dev), c, unet=unet,
                                           channels_last=True)
    return out.float()


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> bf16 on a GPU that has it, fp16 on other GPUs, fp32 on CPU (where autocast is slower)."""
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("fp16 runs only on a CUDA GPU; use precision fp32 or bf16 on CPU.")
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def auto_batch_size(plane: tuple[int, int], model: LoadedModel, free_bytes: int | None) -> int:
    """Slices per forward pass: 4 on CPU (``benchmarks/speed.py --batch-sizes``: larger batches are slower
    there), on a GPU as many as fit in half its free memory by a generous estimate of the activations
    (every UNet level's features, kept for the skip connections, twice over, in fp32), at most 64."""
    if free_bytes is None:
        return 4
    feats = model.config.features
    levels = sum(f / 4**i for i, f in enumerate(feats[:5])) + feats[5]
    per_slice = 4 * plane[0] * plane[1] * (4 * levels + model.config.slices * model.config.embed_dim
                                            + 3 * model.config.num_classes)
    return int(max(1, min(64, free_bytes // 2 // max(1, per_slice))))


def logits_to_labels(logits: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) logits -> (B, H, W) uint8 class indices."""
    return logits.argmax(dim=1).to(torch.uint8).cpu().numpy()


def restrict_changes(raw: np.ndarray, refined: np.ndarray, allowed) -> np.ndarray:
    """Keep the raw label wherever the refinement would touch a class outside ``allowed``."""
    return keep_classes(raw, refined, allowed)[0]


def _check_inputs(labels: np.ndarray, ct: np.ndarray | None, model: LoadedModel, drop_pieces: bool = True) -> None:
    if not isinstance(labels, np.ndarray) or labels.ndim != 3:
        shape = getattr(labels, "shape", None)
        raise ValueError(f"label map must be a 3D array, got shape {shape}; refine one volume at a time.")
    check_class_labels(labels)
    if model.net_uses_ct and ct is None:
        raise ValueError("this RefNet model needs the CT as input; pass the CT volume (--ct).")
    if _decider_reads_ct(model, drop_pieces) and ct is None:
        raise ValueError("this model's piece decider reads the CT; pass the CT volume (--ct), or skip the piece "
                         "decision (--keep-pieces).")
    if ct is not None and np.shape(ct) != labels.shape:
        raise ValueError(
            f"CT shape {np.shape(ct)} differs from label map shape {labels.shape}; "
            "resample the label map onto the CT grid first."
        )
    if ct is not None and (model.net_uses_ct or _decider_reads_ct(model, drop_pieces)):
        bad = np.size(ct) - int(np.count_nonzero(np.isfinite(ct)))
        if bad:  # NaN would silently turn whole slices into background
            raise ValueError(f"the CT holds {bad} NaN or infinite values; fill them (e.g. with -1024 HU, air) "
                             "before refining.")


def _decider_reads_ct(model: LoadedModel, drop_pieces: bool) -> bool:
    return drop_pieces and model.pieces is not None and bool(getattr(model.pieces, "uses_ct", False))


_ALIGN = 16  # BasicUNet halves the image 4 times


def present_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) bool: classes that occur in ``labels`` (counted slab by slab)."""
    return class_counts(labels, num_classes) > 0


@dataclass(frozen=True)
class _Plan:
    """Where the net runs: whole slices of the model grid, written back into a native box."""

    box: tuple[slice, slice, slice]  # native canonical box that may change
    grid: InPlaneGrid
    span: tuple[tuple[int, int], tuple[int, int]]  # model pixels run through the net: the whole slice
    zwork: tuple[int, int]  # slices resampled (box slices plus the context reach)
    offsets: np.ndarray


def _plan(labels: np.ndarray, spacing, model: LoadedModel, config: RefineConfig, band_mm: float) -> _Plan:
    extent = labelled_extent(labels)
    margin_mm = max(config.margin_mm, band_mm + max(spacing)) if config.guards.band else config.margin_mm
    box = tuple(slice(max(0, lo - math.ceil(margin_mm / s)), min(n, hi + math.ceil(margin_mm / s)))
                for (lo, hi), s, n in zip(extent, spacing, labels.shape))
    grid = InPlaneGrid.for_spacing(labels.shape[:2], spacing[:2], model.inplane_mm)
    # The whole slice (padded with background to a multiple of 16) goes through the net, so what it
    # predicts at a voxel never depends on the box; with batch norm it does not depend on the size either.
    span = tuple((0, max(2 * _ALIGN, n + (-n) % _ALIGN)) for n in grid.shape)
    offsets = context_offsets(model.config.context, spacing[2], model.context_mm)
    reach = int(np.abs(offsets).max())
    zwork = (max(0, box[2].start - reach), min(labels.shape[2], box[2].stop + reach))
    return _Plan(box, grid, span, zwork, offsets)


@dataclass
class Proposal:
    """The net's candidate for the box, before the guards (except the absent-class one).

    Attributes:
        box: canonical native box the arrays cover.
        raw: (X, Y, Z) uint8 input labels in the box (classes fit a byte: 8x less memory than int64).
        candidate: (X, Y, Z) uint8 proposed labels; equal to ``raw`` wherever the net changed nothing.
        confidence: (X, Y, Z) float32 probability of the candidate label.
        absent_held: voxels the absent-class guard kept from taking a class the input lacks.
        spacing: (3,) voxel size in mm of the canonical axes.
        edges: 6 bools, (low, high) per axis: which faces of the box are the image's own edges.
    """

    box: tuple[slice, slice, slice]
    raw: np.ndarray
    candidate: np.ndarray
    confidence: np.ndarray
    absent_held: int
    spacing: tuple[float, float, float]
    edges: tuple[bool, ...] = (False,) * 6


def propose(canon: np.ndarray, spacing, model: LoadedModel, *, ct: np.ndarray | None = None,
            config: RefineConfig | None = None, progress: ProgressCallback | None = None) -> Proposal:
    """Run the net over the labelled box of a canonical volume and return its candidate labels.

    Args:
        canon: (I, J, K) int classes in canonical RAS layout, with at least one labelled voxel.
        spacing: (3,) voxel size in mm of ``canon``'s axes.
        ct: (I, J, K) windowed CT in [0, 1], same layout, for CT models.

    Returns:
        The :class:`Proposal`.
    """
    config = config or RefineConfig()
    plan = _plan(canon, spacing, model, config, model.guard_setting("band_mm", config.guards))
    z0, z1 = plan.zwork
    work = resample_labels(canon[:, :, z0:z1], plan.grid, plan.span, num_classes=model.config.num_classes)
    work_ct = None if ct is None else resample_image(ct[:, :, z0:z1], plan.grid, plan.span)
    # the work volume holds every labelled voxel with background around it: its component map is the whole map's
    work_comp = component_map(work, model.config.num_classes) if model.config.component_channel else None
    work_pos = (position_planes(work, [s * g for s, g in zip(spacing[:2], plan.grid.scale)])
                if model.config.position_channels else None)
    present = present_classes(canon, model.config.num_classes)
    if not config.guards.absent_classes:
        present[:] = True
    keep = torch.as_tensor(present, device=model.device).view(1, -1, 1, 1)
    box = plan.box
    raw = np.ascontiguousarray(canon[box]).astype(np.uint8)
    candidate, confidence = raw.copy(), np.ones(raw.shape, dtype=np.float32)
    absent_held, total = 0, box[2].stop - box[2].start
    precision = resolve_precision(config.precision, model.device)
    unet = _compiled_unet(model, config.compile)
    batch = config.batch_size or auto_batch_size(work.shape[:2], model, _free_memory(model.device))
    for start in range(box[2].start, box[2].stop, batch):
        centres = np.arange(start, min(box[2].stop, start + batch))
        # each slice the batch reads is embedded once and gathered into every slab it serves
        # (B, S) work-volume slices of each slab, clamped at the edges as label_slab does
        idx = np.clip(centres[:, None] - z0 + plan.offsets[None, :], 0, work.shape[2] - 1)
        needed, index = np.unique(idx, return_inverse=True)
        index = index.reshape(idx.shape)
        slices = np.moveaxis(work[:, :, needed], 2, 0)  # (N, U, V) uint8
        ct_slab = _aux_slab(work_ct, work_comp, work_pos, centres - z0)
        probs = _probabilities(model, slices, index, ct_slab, precision, unet)  # (B, C, U, V)
        k = slice(start - box[2].start, centres[-1] + 1 - box[2].start)
        centre = torch.as_tensor(slices[index[:, idx.shape[1] // 2]]).to(probs.device)
        absent_held += _to_box(probs, keep, centre, plan, raw[:, :, k], candidate[:, :, k], confidence[:, :, k])
        if progress is not None and progress(int(centres[-1] + 1 - box[2].start), total) is False:
            raise RefinementCancelled("refinement cancelled; the input was left unchanged.")
    edges = tuple(e for b, n in zip(box, canon.shape) for e in (b.start == 0, b.stop == n))
    return Proposal(box, raw, candidate, confidence, absent_held, tuple(spacing), edges)


def _aux_slab(ct: np.ndarray | None, components: np.ndarray | None, position: np.ndarray | None,
              centres: np.ndarray) -> np.ndarray | None:
    """(B, aux, U, V) float channels of the centre slices: windowed CT, decoded component map, position planes."""
    parts = [label_slab(ct, centres, [0])] if ct is not None else []
    if components is not None:
        parts.append(decode_component_map(label_slab(components, centres, [0])))
    if position is not None:  # (U, V, 2), the same for every slice
        parts.append(np.broadcast_to(np.moveaxis(position, 2, 0)[None], (len(centres), 2, *position.shape[:2])))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _free_memory(device: torch.device) -> int | None:
    """Free bytes on a GPU (None on CPU, where the batch size does not follow memory)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


class _CompiledUNet:
    """A model's UNet through ``torch.compile``; the first call that fails to compile (no C++ compiler,
    an unsupported platform) is a warning and every call after it runs eagerly: compiling only buys speed."""

    def __init__(self, unet: torch.nn.Module, backend: str) -> None:
        self.eager, self.backend = unet, backend
        self.compiled = torch.compile(unet, backend=backend, dynamic=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as err:
                if _is_out_of_memory(err):
                    raise
                logger.warning("torch.compile (%s) failed here (%s); running eagerly", self.backend,
                               str(err).splitlines()[0] if str(err) else type(err).__name__)
                self.compiled = None
        return self.eager(x)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # net -> {backend: _CompiledUNet}


def _compiled_unet(model: LoadedModel, request: bool | str) -> _CompiledUNet | None:
    """The model's compiled UNet, made once per net and backend; None when not asked for."""
    if not request:
        return None
    backend = "inductor" if request is True else str(request)
    per_net = _COMPILED.setdefault(model.net, {})
    if backend not in per_net:
        per_net[backend] = _CompiledUNet(model.net.unet, backend)
    return per_net[backend]


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError from torch 2.5


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, _OOM)) or "out of memory" in str(err).lower()


def _probabilities(model: LoadedModel, slices: np.ndarray, index: np.ndarray, ct_slab: np.ndarray | None,
                   precision: str = "fp32", unet=None) -> torch.Tensor:
    """Softmax of the net over a batch; out of memory, the batch is split in halves (down to one slice).

    ``slices`` (N, U, V) are the distinct label slices and ``index`` (B, S) the slab of each sample. A
    slice that does not fit even alone is an error naming the fix (a smaller machine than the volume).
    """
    try:
        return torch.softmax(predict_logits(model, slices, ct_slab, index=index, precision=precision, unet=unet),
                             dim=1)
    except (RuntimeError, MemoryError) as err:
        if not _is_out_of_memory(err):
            raise
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
            if len(index) == 1:  # the GPU cannot hold even one slice: this slice on the CPU
                logger.warning("out of GPU memory for a single slice; running it on the CPU")
                cpu = LoadedModel(copy.deepcopy(model.net).cpu(), model.metadata, torch.device("cpu"))
                return _probabilities(cpu, slices, index, ct_slab).to(model.device)
        if len(index) == 1:
            raise MemoryError(f"one slice of {slices.shape[-2]} x {slices.shape[-1]} pixels does not fit in memory "
                              f"on {model.device}; free memory (close other programs) or use --device cpu.") from err
    half = len(index) // 2
    logger.warning("out of memory on %s with %d slices at once; retrying in batches of %d", model.device,
                   len(index), half)
    parts = [_probabilities(model, slices, index[a:b], None if ct_slab is None else ct_slab[a:b], precision, unet)
             for a, b in ((0, half), (half, len(index)))]
    return torch.cat(parts)


def _to_box(probs, keep, raw_model, plan: _Plan, raw, candidate, confidence) -> int:
    """Write the candidate and confidence of a slice chunk into the native box; returns absent-class holds.

    ``probs`` (B, C, U, V) and ``raw_model`` (B, U, V) are on the model grid; a native voxel may change
    only where the net changed the label of the model pixels it is interpolated from.
    """
    changed_model = ((probs * keep).max(dim=1).indices != raw_model).float()[:, None]  # (B, 1, U, V)
    box = plan.box
    lo, hi = (box[0].start, box[1].start), (box[0].stop, box[1].stop)
    native = to_native(torch.cat([probs, changed_model], dim=1), plan.grid, (0, 0), lo, hi)
    p = native[:, :-1]  # (B, C, X, Y)
    conf, best = (p * keep).max(dim=1)  # (B, X, Y); max(dim=1) is several times faster than argmax on CPU
    raw_t = torch.as_tensor(np.moveaxis(raw, 2, 0), device=p.device)
    changed = (native[:, -1] > 0.5) & (best != raw_t)
    absent = keep[0, :, 0, 0].logical_not().nonzero()[:, 0]
    held = int((p[:, absent].amax(dim=1) > conf).sum()) if absent.numel() else 0  # an absent class would win
    candidate[:] = np.moveaxis(torch.where(changed, best, raw_t).cpu().numpy(), 0, 2)
    confidence[:] = np.moveaxis(torch.where(changed, conf, torch.ones_like(conf)).cpu().numpy(), 0, 2)
    return held


def apply_guards(proposal: Proposal, model: LoadedModel, guards: GuardConfig | None = None
                 ) -> tuple[np.ndarray, dict[str, int]]:
    """Undo the proposal's changes that a guard forbids, in the order of :data:`GUARD_NAMES`.

    Returns:
        ``(labels, held_back)``: (X, Y, Z) uint8 labels of the box and voxels held back per guard.
    """
    guards = guards or GuardConfig()
    raw, out = proposal.raw, proposal.candidate
    held = dict.fromkeys(GUARD_NAMES, 0)
    held["absent_classes"] = proposal.absent_held
    if guards.class_check:
        out, held["class_check"] = keep_classes(raw, out, model.refine_classes)
    if guards.confidence:
        out, held["confidence"] = limit_to_confident(raw, out, proposal.confidence, model.class_thresholds(guards))
    if guards.band:
        out, held["band"] = limit_to_band(raw, out, proposal.spacing, model.guard_setting("band_mm", guards))
    if guards.edge:
        out, held["edge"] = limit_at_cut_edges(raw, out, proposal.spacing, model.guard_setting("edge_mm", guards),
                                               proposal.edges)
    if guards.new_components:
        out, held["new_components"] = remove_new_components(raw, out)
    if guards.volume_change:
        out, held["volume_change"] = limit_volume_change(raw, out, model.guard_setting("max_volume_change", guards),
                                                         model.config.num_classes)
    return out, held


def _warnings(spacing, model: LoadedModel) -> list[str]:
    notes = []
    lo, hi = model.slice_range_mm or (None, None)
    if lo is not None and not lo * 0.8 <= spacing[2] <= hi * 1.25:
        notes.append(f"slice spacing {spacing[2]:.2f} mm is outside the {lo:g}-{hi:g} mm the model was trained on; "
                     "check the result closely")
    if model.inplane_mm is None:
        notes.append("the model file records no training spacing; refined at the input's own spacing")
    elif max(spacing[:2]) > 2.0 * model.inplane_mm:
        notes.append(f"in-plane spacing {max(spacing[:2]):.2f} mm is much coarser than the model's "
                     f"{model.inplane_mm:g} mm; boundaries cannot be finer than the input")
    return notes


def refine_volume(
    labels: np.ndarray,
    affine: np.ndarray,
    model: LoadedModel,
    *,
    ct: np.ndarray | None = None,
    config: RefineConfig | None = None,
    progress: ProgressCallback | None = None,
) -> RefineResult:
    """Refine a 3D label map slice by slice along its axial axis, at the model's physical spacing.

    Args:
        labels: (X, Y, Z) integer RefNet classes 0..12, any orientation.
        affine: (4, 4) voxel-to-world affine; the axial axis and the spacing come from it.
        model: a loaded RefNet (see :func:`refnet.checkpoint.load_model`).
        ct: (X, Y, Z) CT in HU on the same grid; required for CT-conditioned models.
        config: streaming and guard settings.
        progress: ``progress(done, total)`` after each group of slices; return False to cancel.

    Returns:
        The refined map (same shape and dtype; the input is not modified) and its report.

    Raises:
        ValueError: bad shapes, values outside the classes, missing CT for a CT model.
        RefinementCancelled: the progress callback returned False.
    """
    config = config or RefineConfig()
    _check_inputs(labels, ct, model, config.guards.drop_pieces)
    affine = check_affine(affine)
    canon, reo = to_canonical(labels, affine)
    spacing = voxel_spacing(canonical_affine(affine, labels.shape))
    report = RefineReport(native_spacing_mm=[round(s, 4) for s in spacing], model_spacing_mm=model.inplane_mm,
                          warnings=_warnings(spacing, model))
    for note in report.warnings:
        logger.warning(note)
    if not labels.any():
        logger.info("label map is empty; nothing to refine")
        return RefineResult(labels.copy(), report)
    ct_canon = None
    if model.net_uses_ct:
        level, width = model.metadata.get("ct_window") or (40.0, 400.0)
        ct_canon = window_ct(reo.forward(np.asarray(ct)), level, width)
    canon = np.asarray(canon).astype(np.int64) if canon.dtype.kind not in "ui" else np.asarray(canon)
    proposal = propose(canon, spacing, model, ct=ct_canon, config=config, progress=progress)
    out, report.held_back = apply_guards(proposal, model, config.guards)
    if config.guards.drop_pieces and model.pieces is not None:
        # The box holds every labelled voxel with background around it: the pieces are the volume's own.
        # Its faces that are the image's own edges tell which pieces the edge cuts (those are kept).
        ct_box = reo.forward(np.asarray(ct))[proposal.box] if _decider_reads_ct(model, True) else None
        out, report.dropped_pieces = _drop_pieces(out, spacing, model.pieces, list(proposal.edges), ct_box)
    diff = out != proposal.raw
    added = np.bincount(out[diff], minlength=len(CLASS_NAMES))
    removed = np.bincount(proposal.raw[diff], minlength=len(CLASS_NAMES))
    for c, name in enumerate(CLASS_NAMES):
        if added[c] or removed[c]:
            report.changed[name] = [int(added[c]), int(removed[c])]
    refined = np.array(canon, copy=True)
    refined[proposal.box] = out
    return RefineResult(reo.backward(refined).astype(labels.dtype, copy=False), report)


def _drop_pieces(labels: np.ndarray, spacing: tuple[float, float, float], decider: Any,
                 edges: Any = None, ct: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """``labels`` without the pieces ``decider`` rejects, and per class what went (``ct``: HU on the same
    grid, for a decider that reads it)."""
    from .pieces import remove_pieces

    pieces, drop = decider.decide(labels, spacing, edges, ct=ct)
    if not drop.any():
        return labels, {}
    dropped = {}
    for c in np.unique(pieces.cls[drop]):
        mine = pieces.cls == c
        dropped[CLASS_NAMES[int(c)]] = {"pieces": int((drop & mine).sum()),
                                        "voxels": int(pieces.voxels[drop & mine].sum()),
                                        "whole_class": bool(drop[mine].all())}
    logger.info("piece decision dropped %s", dropped)
    return remove_pieces(labels, pieces, drop), dropped


def refine_labels(
    labels: np.ndarray,
    affine: np.ndarray,
    model: LoadedModel,
    *,
    ct: np.ndarray | None = None,
    config: RefineConfig | None = None,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """:func:`refine_volume` without the report: the refined label map alone."""
    return refine_volume(labels, affine, model, ct=ct, config=config, progress=progress).labels
