"""Base segmentation models: the K MONAI networks whose raw label maps RefNet learns to refine.

Algorithm 1, step 1: train K 3D models that differ in architecture, seed and training length
(:func:`train_segmenter`), predict every case with sliding-window inference
(:func:`predict_segmenter`) and store the label maps (:func:`save_predictions`). Predictions of any
*external* model (nnU-Net, TotalSegmentator, ...) enter through :func:`load_prediction_folder`.

Arrays are canonical RAS+ (I, J, K) volumes, K the axial axis; CTs are float HU, label maps uint8
RefNet classes 0..12 (:data:`refnet.labels.NUM_CLASSES`).
"""

from __future__ import annotations

import ast
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn

from .device import resolve_device
from .geometry import check_affine
from .io import load_volume, save_volume
from .labels import NUM_CLASSES, check_class_labels, to_class_labels
from .losses import BatchDiceCELoss
from .refine import window_ct as _window_level_width

__all__ = [
    "PREDICTION_NAME_PATTERNS",
    "SEGMENTER_ARCHITECTURES",
    "SEGMENTER_FORMAT",
    "SegmenterConfig",
    "build_segmenter",
    "load_prediction_folder",
    "load_segmenter",
    "predict_ensemble",
    "predict_segmenter",
    "predict_segmenter_logits",
    "save_predictions",
    "save_segmenter",
    "train_segmenter",
    "window_ct",
]

logger = logging.getLogger(__name__)

SEGMENTER_ARCHITECTURES: tuple[str, ...] = ("unet", "dynunet", "segresnet", "swinunetr")
SEGMENTER_FORMAT = "refnet-segmenter/1"
# Patch sides must be multiples of the network's total downsampling.
_DIVISOR = {"unet": 8, "dynunet": 8, "segresnet": 8, "swinunetr": 32}
# File names load_prediction_folder accepts (NNNN: the case id, any number of digits).
PREDICTION_NAME_PATTERNS: tuple[str, ...] = (
    "labelNNNN", "imgNNNN", "NNNN", "case_NNNN", "<letters>_NNNN (nnU-Net style, e.g. BTCV_0001)",
)
_PREDICTION_RE = re.compile(r"^(?:label|img|[A-Za-z]+_)?(\d+)\.(?:nii\.gz|nii|nrrd)$", re.IGNORECASE)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SegmenterConfig:
    """One base model: architecture, width, training and inference settings; stored in its checkpoint.

    Raises:
        ValueError: a field out of range; the message names it and the fix.
    """

    architecture: str = "unet"  # one of SEGMENTER_ARCHITECTURES
    seed: int = 0  # weight init and patch sampling
    steps: int = 300  # training iterations, one batch each
    patch_size: tuple[int, int, int] = (96, 96, 32)  # training patch and sliding window (I, J, K) voxels
    batch_size: int = 2  # patches per step
    lr: float = 3e-3  # AdamW peak learning rate, decayed polynomially to 0 (see demo() per architecture)
    weight_decay: float = 1e-5  # AdamW weight decay
    features: int = 16  # width: UNet/DynUNet first channels / SegResNet init_filters / SwinUNETR feature_size
    foreground_fraction: float = 0.67  # share of patches centred on an organ voxel (organ drawn uniformly)
    ct_window: tuple[float, float] = (-175.0, 250.0)  # HU clipped and scaled to [0, 1] (MONAI BTCV)
    sw_batch_size: int = 4  # windows per forward pass in sliding-window inference
    overlap: float = 0.25  # sliding-window overlap, in [0, 1)
    # The grid the model trains and predicts at, (I, J, K) mm in canonical RAS+ axes (nnU-Net's target
    # spacing): CT is resampled to it, predicted, and the logits are brought back to the CT's own voxels.
    # None: each case's own voxels (the demo's phantoms already have one coarse grid).
    spacing_mm: tuple[float, float, float] | None = None
    name: str | None = None  # folder/file name; None: f"{architecture}-s{seed}-{steps}"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.architecture not in SEGMENTER_ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; "
                             f"choose one of {list(SEGMENTER_ARCHITECTURES)}.")
        for key in ("seed", "steps", "batch_size", "features", "sw_batch_size"):
            value, low = getattr(self, key), 0 if key == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"SegmenterConfig.{key} must be an int >= {low}, got {value!r}.")
        patch, div = tuple(int(p) for p in self.patch_size), _DIVISOR[self.architecture]
        if len(patch) != 3 or any(p < div or p % div for p in patch):
            raise ValueError(f"patch_size of {self.architecture} must be 3 multiples of {div}, "
                             f"got {self.patch_size}; e.g. {(64, 64, 32) if div < 32 else (96, 96, 32)}.")
        if self.architecture == "swinunetr" and max(patch) < 64:
            raise ValueError(f"swinunetr needs a patch side >= 64 (its bottleneck is 1/32 of the patch), "
                             f"got {patch}; e.g. (96, 96, 32).")
        set_(self, "patch_size", patch)
        if self.architecture == "swinunetr" and self.features % 12:
            raise ValueError(f"swinunetr needs features divisible by 12 (e.g. 12, 24, 48), "
                             f"got {self.features}.")
        window = tuple(float(w) for w in self.ct_window)
        if len(window) != 2 or not window[0] < window[1]:
            raise ValueError(f"ct_window must be (low, high) HU with low < high, got {self.ct_window}.")
        set_(self, "ct_window", window)
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(f"need lr > 0 and weight_decay >= 0, "
                             f"got lr={self.lr}, weight_decay={self.weight_decay}.")
        if not (0 <= self.foreground_fraction <= 1 and 0 <= self.overlap < 1):
            raise ValueError(f"need foreground_fraction in [0, 1] and overlap in [0, 1), got "
                             f"{self.foreground_fraction} and {self.overlap}.")
        if self.spacing_mm is not None:
            spacing = tuple(float(v) for v in np.ravel(self.spacing_mm))
            if len(spacing) != 3 or not all(np.isfinite(v) and v > 0 for v in spacing):
                raise ValueError(f"spacing_mm must be 3 positive mm values (I, J, K) or None, "
                                 f"got {self.spacing_mm}; e.g. (2.2, 2.2, 4.4).")
            set_(self, "spacing_mm", spacing)
        name = self.name or f"{self.architecture}-s{self.seed}-{self.steps}"
        if not _NAME_RE.match(name) or ".." in name:
            raise ValueError(f"name {name!r} must be a plain file name (letters, digits, '.', '_', '-'), "
                             "e.g. 'unet-s0-300'.")
        set_(self, "name", name)

    @classmethod
    def demo(cls, architecture: str = "unet", seed: int = 0, **changes: Any) -> SegmenterConfig:
        """The preset of an architecture for the demo phantoms (~150 x 125 x 40 voxels, 10-12 train cases).

        Measured on 2 idle CPU cores (mean Dice over the 13 classes on 6 held-out phantoms):
        ``unet`` (width 16, 64 x 64 x 32 patches, lr 1e-2, 600 steps): 6.5 steps/s, ~90 s, Dice
        0.82-0.83 (400 steps: 0.70, 900 steps: 0.86), 0.5 s per case to predict. ``segresnet``
        (width 8, lr 3e-3, 300 steps): 1.3 steps/s, ~230 s, Dice 0.63, 1.8 s per case.
        ``swinunetr``: a GPU preset, untuned.

        Args:
            architecture: one of :data:`SEGMENTER_ARCHITECTURES`.
            seed: init and sampling seed.
            **changes: fields to override, e.g. ``steps=100``.
        """
        presets = {
            "unet": {"features": 16, "patch_size": (64, 64, 32), "steps": 600, "lr": 1e-2},
            "dynunet": {"features": 8, "patch_size": (64, 64, 32), "steps": 600, "lr": 1e-2},
            "segresnet": {"features": 8, "patch_size": (64, 64, 32), "steps": 300, "lr": 3e-3},
            "swinunetr": {"features": 24, "patch_size": (96, 96, 32), "steps": 1500, "lr": 5e-4},
        }
        if architecture not in presets:
            raise ValueError(f"unknown architecture {architecture!r}; "
                             f"choose one of {list(SEGMENTER_ARCHITECTURES)}.")
        return cls(**{"architecture": architecture, "seed": seed, **presets[architecture], **changes})

    @classmethod
    def parse(cls, text: str) -> SegmenterConfig:
        """``ARCH[:key=value,...]``: the architecture's :meth:`demo` preset with those fields changed.

        For command lines, e.g. ``dynunet:seed=1,steps=600`` or ``unet:patch_size=(64,64,32)``.

        Raises:
            ValueError: an unknown architecture or field, a value that is not a Python literal, or a
                value out of range; the message names it.
        """
        arch, _, rest = text.strip().partition(":")
        known = {f.name for f in fields(cls)} - {"architecture"}
        changes: dict[str, Any] = {}
        for item in filter(None, (i.strip() for i in _split_top_level(rest))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in known:
                raise ValueError(f"segmenter preset {text!r}: {item!r} is not field=value with a field of "
                                 f"{sorted(known)}; e.g. 'dynunet:seed=1,steps=600'.")
            try:
                changes[key] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                changes[key] = value.strip()  # a bare word, e.g. name=my-model
        return cls.demo(arch, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-types form (tuples as lists) for checkpoints and JSON."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmenterConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: unknown keys (the message lists them) or invalid values.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SegmenterConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses (a patch size "(64,64,32)" stays one item)."""
    items, depth, start = [], 0, 0
    for n, ch in enumerate(text):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:n])
            start = n + 1
    return [*items, text[start:]]


def build_segmenter(config: SegmenterConfig) -> nn.Module:
    """The MONAI network of ``config``: 1 input channel (windowed CT), NUM_CLASSES output logits.

    ``unet``: MONAI UNet, channels (f, 2f, 4f, 8f), strides 2, plain conv blocks (``num_res_units=0``;
    its first conv has stride 2 and its last is transposed, so no 3x3x3 conv runs at full resolution:
    about 5x faster per step than the SegResNet on CPU).
    ``dynunet``: MONAI DynUNet, nnU-Net's architecture: filters (f, 2f, 4f, 8f), a full-resolution first
    stage (stride 1, then 2, 2, 2), two 3x3x3 conv + instance norm + leaky ReLU per stage, no deep
    supervision. A different family from ``unet`` (whose first conv has stride 2 and which has no norm),
    at about a quarter of its speed per step on CPU with f = 8.
    ``segresnet``: MONAI SegResNetDS (the Auto3DSeg SegResNet), ``init_filters=f``, blocks (1, 2, 2, 4),
    instance norm, transposed-conv upsampling. (The older ``SegResNet`` barely learned in a few
    hundred steps: mean Dice 0.14 after 300 steps where SegResNetDS reached 0.63 on the phantoms.)
    ``swinunetr``: MONAI SwinUNETR, ``feature_size=f`` (needs einops; meant for a GPU).
    """
    from monai.networks.nets import DynUNet, SegResNetDS, SwinUNETR, UNet

    f = config.features
    if config.architecture == "unet":
        return UNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES,
                    channels=(f, 2 * f, 4 * f, 8 * f), strides=(2, 2, 2), num_res_units=0)
    if config.architecture == "dynunet":
        return DynUNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES, kernel_size=(3, 3, 3, 3),
                       strides=(1, 2, 2, 2), upsample_kernel_size=(2, 2, 2), filters=(f, 2 * f, 4 * f, 8 * f),
                       norm_name="instance")
    if config.architecture == "segresnet":
        return SegResNetDS(spatial_dims=3, init_filters=f, in_channels=1, out_channels=NUM_CLASSES,
                           norm="instance", blocks_down=(1, 2, 2, 4))
    return SwinUNETR(in_channels=1, out_channels=NUM_CLASSES, feature_size=f, spatial_dims=3)


def window_ct(ct: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip HU to ``window`` = (low, high) and scale to [0, 1]; the (low, high) form of refine's window."""
    low, high = window
    return _window_level_width(ct, (low + high) / 2.0, high - low)


def _check_ct(ct: np.ndarray, what: str = "ct") -> np.ndarray:
    ct = np.asarray(ct)
    if ct.ndim != 3 or not np.issubdtype(ct.dtype, np.number) or ct.dtype == bool:
        raise ValueError(f"{what} must be a 3D numeric (I, J, K) HU array, got {ct.ndim}D {ct.dtype}.")
    return ct


@dataclass(frozen=True)
class _TrainCase:
    image: np.ndarray  # (I, J, K) float32 windowed CT, padded to at least the patch
    labels: np.ndarray  # (I, J, K) uint8 classes, same shape
    organ_voxels: tuple[np.ndarray, ...]  # flat indices of each organ present


def _model_shape(shape: tuple[int, ...], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """The array shape of a volume of ``shape`` voxels of ``spacing`` mm on a grid of ``target`` mm."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target))


def _resize(volume: torch.Tensor, shape: tuple[int, ...], mode: str) -> torch.Tensor:
    """(C, I, J, K) -> (C, *shape): trilinear for images and logits, nearest for label maps.

    ``F.interpolate`` with a target size and ``align_corners=False`` maps voxel centres the way a
    resampling to a new spacing over the same field of view does (nnU-Net resamples by shape too).
    """
    if tuple(volume.shape[1:]) == tuple(shape):
        return volume
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(volume[None], size=shape, mode=mode, **kwargs)[0]


def _check_spacing(spacing: Sequence[float] | None, config: SegmenterConfig, what: str) -> tuple[float, ...]:
    if spacing is None:
        raise ValueError(f"{config.name} runs at {config.spacing_mm} mm: pass {what} (the CT's voxel size in mm "
                         "along its canonical axes: refnet.spacing.voxel_spacing(canonical_affine(affine, shape))).")
    values = tuple(float(v) for v in np.ravel(spacing))
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{what} must be 3 positive mm values, got {spacing}.")
    return values


def _prepare_case(ct: np.ndarray, labels: np.ndarray, config: SegmenterConfig, n: int,
                  spacing: Sequence[float] | None = None) -> _TrainCase:
    ct = _check_ct(ct, f"cases[{n}] ct")
    if np.shape(labels) != ct.shape:
        raise ValueError(f"cases[{n}]: labels shape {np.shape(labels)} differs from ct shape {ct.shape}.")
    check_class_labels(np.asarray(labels), what=f"cases[{n}] labels")
    if config.spacing_mm is not None:  # to the model's grid: CT trilinear, labels nearest (nnU-Net's order 0)
        shape = _model_shape(ct.shape, _check_spacing(spacing, config, f"spacings[{n}]"), config.spacing_mm)
        ct = _resize(torch.from_numpy(np.asarray(ct, dtype=np.float32))[None], shape, "trilinear")[0].numpy()
        labels = _resize(torch.from_numpy(np.asarray(labels, dtype=np.uint8))[None], shape, "nearest")[0].numpy()
    pad = [(0, max(0, p - s)) for p, s in zip(config.patch_size, ct.shape)]
    image = np.pad(window_ct(ct, config.ct_window), pad)  # padding = lowest HU of the window
    lab = np.pad(np.asarray(labels, dtype=np.uint8), pad)
    flat = lab.ravel()
    organs = tuple(np.flatnonzero(flat == c) for c in range(1, NUM_CLASSES))
    return _TrainCase(image, lab, tuple(v for v in organs if v.size))


def _sample_batch(cases: Sequence[_TrainCase], config: SegmenterConfig,
                  rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch: (B, 1, *patch) float32 images and (B, 1, *patch) int64 labels."""
    images, labels = [], []
    patch = np.array(config.patch_size)
    for _ in range(config.batch_size):
        case = cases[rng.integers(len(cases))]
        shape = np.array(case.labels.shape)
        if case.organ_voxels and rng.random() < config.foreground_fraction:
            voxels = case.organ_voxels[rng.integers(len(case.organ_voxels))]
            centre = np.array(np.unravel_index(voxels[rng.integers(voxels.size)], case.labels.shape))
        else:
            centre = np.array([rng.integers(s) for s in shape])
        start = np.clip(centre - patch // 2, 0, shape - patch)
        box = tuple(slice(a, a + p) for a, p in zip(start, patch))
        images.append(case.image[box])
        labels.append(case.labels[box])
    x = torch.from_numpy(np.stack(images)[:, None].copy())
    y = torch.from_numpy(np.stack(labels)[:, None].astype(np.int64))
    return x, y


def train_segmenter(
    cases: Sequence[tuple[np.ndarray, np.ndarray]],
    config: SegmenterConfig,
    *,
    spacings: Sequence[Sequence[float]] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train one base model on whole volumes with foreground-biased random patches and DiceCE loss.

    Each step draws ``batch_size`` patches: with probability ``foreground_fraction`` centred on a
    random voxel of an organ drawn uniformly among those present (so small organs are seen as often
    as the liver), otherwise anywhere. Volumes smaller than the patch are padded (after windowing).
    AdamW with polynomial learning-rate decay. Bit-identical for a given ``config.seed`` on CPU with
    a given thread count (CUDA kernels may not be); the caller's global torch RNG is left untouched.

    Args:
        cases: ``(ct, labels)`` pairs in canonical RAS+ layout: (I, J, K) float HU and (I, J, K)
            uint8 class indices 0..12 of the same shape.
        config: architecture and training settings.
        spacings: each case's voxel size in mm along its canonical axes; needed when
            ``config.spacing_mm`` is set (every case is resampled to it first).
        device: ``"cpu"``, ``"cuda"``, ``"auto"``...; see :func:`refnet.device.resolve_device`.
        progress: show a tqdm bar.
        on_step: called as ``on_step(step, loss)`` after every step (e.g. to record losses).

    Returns:
        The trained network, in eval mode, on ``device``.

    Raises:
        ValueError: no cases, a non-3D CT, shapes that differ, labels outside 0..12, or no
            ``spacings`` for a model with ``spacing_mm``.
    """
    from .distributed import setup

    if len(cases) == 0:
        raise ValueError("cases is empty; pass at least one (ct, labels) pair.")
    if spacings is not None and len(spacings) != len(cases):
        raise ValueError(f"spacings has {len(spacings)} entries for {len(cases)} cases; give one per case.")
    data = [_prepare_case(ct, lab, config, n, None if spacings is None else spacings[n])
            for n, (ct, lab) in enumerate(cases)]
    ctx, device = setup(str(device))  # under torchrun: this process's rank and device
    if config.batch_size % ctx.world:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {ctx.world} processes "
                         "(each takes an equal share of every batch).")
    dev = resolve_device(device)
    rng = np.random.default_rng(config.seed)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(config.seed)
        net = build_segmenter(config).to(dev)
    trained: nn.Module = net
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    loss_fn = BatchDiceCELoss(ctx.world)  # the whole batch's Dice in every process (exact under torchrun)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: (1 - s / config.steps) ** 0.9)
    steps: Any = range(config.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=config.name, leave=False)
    start = time.perf_counter()
    trained.train()
    for step in steps:
        x, y = _sample_batch(data, config, rng)  # every process draws the same batch and keeps its share
        x, y = x[ctx.rank::ctx.world], y[ctx.rank::ctx.world]
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(trained(x.to(dev)), y.to(dev))  # logits (B, C, I, J, K) vs labels (B, 1, I, J, K)
        loss.backward()
        optimiser.step()
        schedule.step()
        value = float(loss.detach())
        if on_step is not None:  # under torchrun: the whole batch's loss, what one process would report
            on_step(step, ctx.all_mean({"loss": value}, dev)["loss"] if ctx.world > 1 else value)
        if step % 50 == 0 or step == config.steps - 1:
            logger.debug("%s step %d/%d loss %.4f", config.name, step + 1, config.steps, value)
    logger.info("%s: %d steps on %d cases in %.0f s, last loss %.3f", config.name, config.steps, len(data),
                time.perf_counter() - start, value)
    return net.eval()


def _model_logits(net: nn.Module, ct: np.ndarray, config: SegmenterConfig, spacing: Sequence[float] | None,
                  device: str | torch.device) -> torch.Tensor:
    """(C, ...) float32 sliding-window logits on the model's grid (the CT's own voxels without ``spacing_mm``)."""
    ct = _check_ct(ct)
    dev = resolve_device(device)
    net = net.to(dev).eval()
    x = torch.from_numpy(window_ct(ct, config.ct_window))[None, None].to(dev)  # (1, 1, I, J, K)
    if config.spacing_mm is not None:
        shape = _model_shape(ct.shape, _check_spacing(spacing, config, "spacing"), config.spacing_mm)
        x = _resize(x[0], shape, "trilinear")[None]
    with torch.inference_mode():
        return sliding_window_inference(x, config.patch_size, config.sw_batch_size, net,
                                        overlap=config.overlap, mode="gaussian")[0].float()


def _native_slices(logits: torch.Tensor, shape: tuple[int, ...], chunk: int = 8):
    """Yield ``(k0, (C, I, J, k) logits)`` on the CT's voxels, a few K-slices at a time.

    Trilinear resizing is separable, so this is ``_resize(logits, shape, "trilinear")`` cut along K:
    bilinear in-plane per model slice, then linear along K with ``F.interpolate``'s own source
    coordinates (``align_corners=False``, clamped at the ends). Written out because torch has no
    chunked resize, and the whole 13-class volume at CT resolution is gigabytes (512 x 512 x 300 voxels:
    4 GB) where one chunk is tens of MB.
    """
    if tuple(logits.shape[1:]) == tuple(shape):
        for k0 in range(0, shape[2], chunk):
            yield k0, logits[..., k0 : k0 + chunk]
        return
    depth, planes = logits.shape[3], {}
    src = np.clip((np.arange(shape[2]) + 0.5) * depth / shape[2] - 0.5, 0.0, depth - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, depth - 1)
    w = src - lo
    for k0 in range(0, shape[2], chunk):
        ks = range(k0, min(k0 + chunk, shape[2]))
        for m in sorted(({int(lo[k]) for k in ks} | {int(hi[k]) for k in ks}) - set(planes)):
            # model slice m, bilinear to the CT's in-plane grid; kept while later chunks still need it
            planes[m] = F.interpolate(logits[None, :, :, :, m], size=tuple(shape[:2]), mode="bilinear",
                                      align_corners=False)[0]
        yield k0, torch.stack([planes[lo[k]] * float(1.0 - w[k]) + planes[hi[k]] * float(w[k]) for k in ks], dim=-1)
        for m in [m for m in planes if m < lo[ks[-1]]]:
            del planes[m]


def predict_segmenter_logits(net: nn.Module, ct: np.ndarray, config: SegmenterConfig, *,
                             spacing: Sequence[float] | None = None,
                             device: str | torch.device = "cpu") -> np.ndarray:
    """Sliding-window logits of a base model (Gaussian-weighted windows of ``config.patch_size``).

    With ``config.spacing_mm`` the CT is resampled to the model's grid, predicted there, and the
    logits are resampled back (trilinear) to the CT's voxels, as nnU-Net does. This holds every class
    at CT resolution (13 x 4 bytes a voxel); :func:`predict_segmenter` and :func:`predict_ensemble`
    do not.

    Args:
        net: a network from :func:`build_segmenter` / :func:`train_segmenter`; it is put in eval mode.
        ct: (I, J, K) float HU CT, canonical RAS+; any size (small volumes are padded internally).
        config: the model's config (window, patch, overlap, sw_batch_size, spacing_mm).
        spacing: the CT's voxel size in mm along its canonical axes; needed with ``config.spacing_mm``.
        device: where to run.

    Returns:
        (NUM_CLASSES, I, J, K) float32 logits, on the CT's own voxels.

    Raises:
        ValueError: ``ct`` is not a 3D numeric array, or no ``spacing`` for a model with ``spacing_mm``.
    """
    logits = _model_logits(net, ct, config, spacing, device)
    with torch.inference_mode():
        return _resize(logits, np.shape(ct), "trilinear").cpu().numpy()


def predict_segmenter(net: nn.Module, ct: np.ndarray, config: SegmenterConfig, *,
                      spacing: Sequence[float] | None = None,
                      device: str | torch.device = "cpu") -> np.ndarray:
    """Label map of a base model: argmax of :func:`predict_segmenter_logits`, taken a few slices at a time
    so that memory stays at the model grid's logits plus one chunk at CT resolution.

    Returns:
        (I, J, K) uint8 class indices 0..12, same shape as ``ct``.
    """
    return predict_ensemble([(net, config)], ct, spacing=spacing, device=device, probabilities=False)


def predict_ensemble(models: Sequence[tuple[nn.Module, SegmenterConfig]], ct: np.ndarray, *,
                     spacing: Sequence[float] | None = None,
                     device: str | torch.device = "cpu", probabilities: bool = True) -> np.ndarray:
    """Label map of several base models: argmax of their softmax probabilities averaged (nnU-Net's ensemble).

    Each model's logits stay on its own grid; they are brought to the CT's voxels and combined a few
    slices at a time. ``probabilities=False`` sums raw logits instead (one model: its plain argmax).

    Returns:
        (I, J, K) uint8 class indices 0..12, same shape as ``ct``.

    Raises:
        ValueError: no models, or ``ct`` is not a 3D numeric array.
    """
    if not models:
        raise ValueError("predict_ensemble needs at least one (net, config) pair.")
    grids = [_model_logits(net, ct, config, spacing, device) for net, config in models]
    shape = np.shape(ct)
    out = np.empty(shape, dtype=np.uint8)
    with torch.inference_mode():
        for chunks in zip(*(_native_slices(g, shape) for g in grids)):
            k0 = chunks[0][0]
            total = sum(c.softmax(dim=0) if probabilities else c for _, c in chunks)
            out[..., k0 : k0 + total.shape[-1]] = total.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return out


def save_segmenter(path: str | os.PathLike, net: nn.Module, config: SegmenterConfig) -> Path:
    """Write a base model (state_dict + config dict, plain types only) atomically to ``path``.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": SEGMENTER_FORMAT, "config": config.to_dict(), "num_classes": NUM_CLASSES,
               "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_segmenter(path: str | os.PathLike, *,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, SegmenterConfig]:
    """Read a file of :func:`save_segmenter` with ``torch.load(weights_only=True)`` (never runs code).

    Returns:
        ``(net, config)``: the network in eval mode on ``device``, and its config.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a RefNet segmenter file, or one made for another number of classes.
    """
    from .checkpoint import read_payload

    payload = read_payload(Path(path), SEGMENTER_FORMAT, what="segmenter", title="segmenter",
                           hint="check the path or run `refnet train-segmenters`")
    if payload.get("num_classes") != NUM_CLASSES:
        raise ValueError(f"{path}: segmenter predicts {payload.get('num_classes')} classes, "
                         f"RefNet uses {NUM_CLASSES}; retrain it with this version of refnet.")
    config = SegmenterConfig.from_dict(payload["config"])
    net = build_segmenter(config)
    net.load_state_dict(payload["state_dict"])
    return net.to(resolve_device(device)).eval(), config


def save_predictions(out_dir: str | os.PathLike, name: str,
                     predictions: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write one model's label maps as ``out_dir/<name>/labelNNNN.nii.gz`` (uint8), each atomically.

    Args:
        out_dir: parent folder of the per-model folders.
        name: model name, a plain file name (e.g. ``config.name``).
        predictions: case id -> ((I, J, K) class labels 0..12, (4, 4) voxel-to-RAS affine).

    Returns:
        The folder ``out_dir/<name>``.

    Raises:
        ValueError: a bad name, case id, label map or affine.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(f"name {name!r} must be a plain file name (letters, digits, '.', '_', '-').")
    checked = {}
    for case_id, (labels, affine) in predictions.items():  # check all before writing any
        if isinstance(case_id, bool) or not isinstance(case_id, (int, np.integer)) or not 0 <= case_id < 1e4:
            raise ValueError(f"case id must be an int in 0..9999, got {case_id!r}.")
        labels = np.asarray(labels)
        if labels.ndim != 3:
            raise ValueError(f"case {case_id}: label map must be 3D (I, J, K), got shape {labels.shape}.")
        check_class_labels(labels, what=f"case {case_id} label map")
        checked[int(case_id)] = (labels.astype(np.uint8), check_affine(affine))
    folder = Path(out_dir) / name
    for case_id, (labels, affine) in sorted(checked.items()):
        save_volume(folder / f"label{case_id:04d}.nii.gz", labels, affine)
    folder.mkdir(parents=True, exist_ok=True)  # also when predictions is empty
    return folder


def _index_folder(folder: Path) -> dict[int, list[Path]]:
    found: dict[int, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        match = _PREDICTION_RE.match(path.name)
        if match and path.is_file():
            found.setdefault(int(match.group(1)), []).append(path)
    return found


_AFFINE_TOL_MM = 1e-3


def _check_affine_matches(path: Path, affine: np.ndarray, expected: np.ndarray) -> None:
    if not np.allclose(affine, expected, rtol=0.0, atol=_AFFINE_TOL_MM):
        raise ValueError(f"{path}: its affine differs from the CT's by up to {np.abs(affine - expected).max():.4g} mm "
                         f"(orientation, spacing or origin):\n{np.array2string(affine, precision=4)}\nvs the CT's\n"
                         f"{np.array2string(np.asarray(expected), precision=4)}\nsave the prediction on the CT's "
                         "grid (same orientation and origin), e.g. with 3D Slicer or SimpleITK.")


def load_prediction_folder(
    folder: str | os.PathLike,
    case_ids: Sequence[int],
    *,
    scheme: str = "refnet",
    shapes: Mapping[int, Sequence[int]] | None = None,
    affines: Mapping[int, np.ndarray] | None = None,
) -> dict[int, np.ndarray]:
    """Load label maps of any model from one folder, mapped to RefNet classes.

    File names (case-insensitive; ``.nii.gz``, ``.nii`` or ``.nrrd``): ``labelNNNN``, ``imgNNNN``,
    ``NNNN``, ``case_NNNN`` or any ``<letters>_NNNN`` such as nnU-Net's ``BTCV_0001``; leading zeros
    are optional. Arrays are returned in the file's voxel layout (not reoriented).

    Args:
        folder: the folder of label maps (not searched recursively).
        case_ids: the cases to load.
        scheme: label values of the files: ``"refnet"``, ``"btcv"`` or ``"totalsegmentator"``
            (see :data:`refnet.labels.LABEL_SCHEMES`); unmapped values become background.
        shapes: optional case id -> expected (I, J, K) shape (e.g. of the CT).
        affines: optional case id -> expected (4, 4) affine (of the CT): a prediction saved in another
            orientation with the same shape would otherwise be read mirrored.

    Returns:
        Case id -> (I, J, K) uint8 RefNet classes 0..12.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: missing or ambiguous cases (the message lists them and the accepted names), an
            unknown scheme, fractional or out-of-range values, or a shape or affine that differs from
            ``shapes`` or ``affines``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of predictions; check the path.")
    found = _index_folder(folder)
    wanted = [int(c) for c in case_ids]
    missing = [c for c in wanted if c not in found]
    if missing:
        raise ValueError(f"{folder}: no prediction for case ids {missing} (found ids {sorted(found)[:20]}); "
                         f"name files {', '.join(PREDICTION_NAME_PATTERNS)} "
                         "with suffix .nii.gz, .nii or .nrrd.")
    clashes = {c: [p.name for p in found[c]] for c in wanted if len(found[c]) > 1}
    if clashes:
        raise ValueError(f"{folder}: several files for the same case {clashes}; keep one file per case id.")
    out = {}
    for case_id in wanted:
        path = found[case_id][0]
        volume = load_volume(path)
        array = volume.array
        if affines is not None and case_id in affines:
            _check_affine_matches(path, volume.affine, affines[case_id])
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
            if not np.all(np.isfinite(array)) or np.any(np.mod(array, 1) != 0):
                raise ValueError(f"{path}: holds fractional values (dtype {array.dtype}); "
                                 "pass a label map, not an image.")
            array = array.astype(np.int64)
        if shapes is not None and case_id in shapes and tuple(array.shape) != tuple(shapes[case_id]):
            raise ValueError(f"{path}: shape {array.shape} differs from the expected "
                             f"{tuple(shapes[case_id])}; resample the prediction onto the CT grid "
                             "(nearest neighbour).")
        classes, unmapped = to_class_labels(array, scheme)
        if unmapped.any():
            logger.debug("%s: %d voxels with labels outside scheme %r set to background",
                         path, int(unmapped.sum()), scheme)
        out[case_id] = classes
    return out
