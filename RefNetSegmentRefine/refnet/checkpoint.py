"""The RefNet model file: weights plus everything needed to use them, in one artefact.

The file is a plain dict of tensors and builtin types, saved with ``torch.save`` and always read
with ``torch.load(..., weights_only=True)`` so a user-supplied file can never run code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .device import resolve_device
from .labels import CLASS_NAMES, NUM_CLASSES
from .model import RefNet, RefNetConfig

__all__ = ["EDGE_MM", "GUARD_DEFAULTS", "MODEL_FORMAT", "LoadedModel", "default_model_path", "load_model",
           "read_payload", "save_model"]

MODEL_FORMAT = "refnet-model/1"
# The edge guard's depth: the smallest candidate with which every cropped development map (FLARE22
# 0001-0005, 229 maps and crops) stays at the no-harm bar (benchmarks/edge_guard_selection.py)
EDGE_MM = 7.5
# for model files that do not record their own; max_volume_change 0.5 was set a priori (an organ may not be
# halved or grown by half), not tuned on any result
GUARD_DEFAULTS = {"band_mm": 6.0, "threshold": 0.5, "max_volume_change": 0.5, "edge_mm": EDGE_MM}
_DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "refnet_phantom.pt"


def default_model_path() -> Path:
    """Path of the model shipped with the package (trained on the generated phantoms by ``refnet demo``)."""
    return _DEFAULT_MODEL


@dataclass
class LoadedModel:
    """A RefNet ready for inference.

    Attributes:
        net: the network, in eval mode, on ``device``.
        metadata: the file's metadata: ``classes``, ``inputs`` (``["labels"]`` or ``["labels", "ct"]``),
            ``ct_window`` ([level, width] HU or None), ``refine_classes`` (class indices the model
            may change; the others are kept as they were), ``training``, ``metrics``.
        device: where ``net`` lives.
        pieces: the file's :class:`refnet.pieces.PieceDecider` (keep/drop per connected piece, applied
            after the net and its guards), or None for files without one.
    """

    net: RefNet
    metadata: dict[str, Any]
    device: torch.device
    pieces: Any = None  # a refnet.pieces.PieceDecider the file carries (run after the net), or None

    @property
    def config(self) -> RefNetConfig:
        return self.net.config

    @property
    def uses_ct(self) -> bool:
        """True if the model needs the CT as input: its net, or its piece decider (one fitted with the CT)."""
        return self.net_uses_ct or bool(getattr(self.pieces, "uses_ct", False))

    @property
    def net_uses_ct(self) -> bool:
        """True if the net itself reads the CT (a CT channel)."""
        return self.net.config.ct_channels > 0

    @property
    def refine_classes(self) -> tuple[int, ...]:
        """Classes this model is allowed to change (all by default)."""
        return tuple(int(c) for c in self.metadata.get("refine_classes", range(NUM_CLASSES)))

    @property
    def inplane_mm(self) -> float | None:
        """In-plane spacing (mm) the model was trained at; None for files that predate it (native grid)."""
        value = (self.metadata.get("spacing") or {}).get("inplane_mm")
        return None if value is None else float(value)

    @property
    def slice_range_mm(self) -> tuple[float, float] | None:
        """(min, max) slice spacing in mm of the training data, or None if unknown."""
        value = (self.metadata.get("spacing") or {}).get("slice_mm")
        return None if value is None else (float(value[0]), float(value[1]))

    @property
    def context_mm(self) -> float | None:
        """Physical distance of the context slices; None: adjacent slices."""
        value = (self.metadata.get("spacing") or {}).get("context_mm")
        return None if value is None else float(value)

    def class_thresholds(self, guards: Any = None) -> list[float]:
        """Confidence threshold per class: the caller's single override, else the file's per-class
        values (chosen on held-out cases), else its single threshold."""
        if getattr(guards, "threshold", None) is None and (self.metadata.get("guards") or {}).get("class_thresholds"):
            return [float(t) for t in self.metadata["guards"]["class_thresholds"]]
        return [self.guard_setting("threshold", guards)] * NUM_CLASSES

    def guard_setting(self, name: str, guards: Any = None) -> float:
        """``band_mm``, ``threshold``, ``max_volume_change`` or ``edge_mm``: the caller's override, else the
        model file's, else the default."""
        override = getattr(guards, name, None) if guards is not None else None
        if override is not None:
            return float(override)
        return float((self.metadata.get("guards") or {}).get(name, GUARD_DEFAULTS[name]))


def save_model(path: str | os.PathLike, net: RefNet, *, metadata: dict[str, Any] | None = None,
               pieces: Any = None) -> Path:
    """Write ``net``, ``metadata`` and an optional piece decider to ``path`` atomically (temp file, then rename).

    ``metadata`` must hold only builtin types (dict, list, str, int, float, bool, None); ``pieces`` is a
    :class:`refnet.pieces.PieceDecider`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"classes": list(CLASS_NAMES), "inputs": ["labels"] + (["ct"] if net.config.ct_channels else []),
            "ct_window": None, **(metadata or {})}
    payload = {
        "format": MODEL_FORMAT,
        "config": net.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "metadata": meta,
    }
    if pieces is not None:
        payload["pieces"] = pieces.to_payload()
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_payload(path: Path, fmt: str, *, what: str, title: str, hint: str) -> dict[str, Any]:
    """Read a weights-only ``.pt`` dict and check its ``format`` tag; shared by model and segmenter files.

    Raises:
        FileNotFoundError: no file at ``path`` (the message ends with ``hint``).
        ValueError: unreadable, or not a file of format ``fmt``.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file; {hint}.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or damaged files
        raise ValueError(f"{path}: not a readable {title} file ({type(err).__name__}).") from err
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{path}: not a RefNet {what} file (expected format {fmt!r}).")
    return payload


def load_model(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a RefNet model file (the shipped default when ``path`` is None).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a RefNet model file, or a model made for other classes.
    """
    path = Path(path) if path is not None else default_model_path()
    hint = "run `refnet demo` or `refnet train` to make one" if path == _DEFAULT_MODEL else "check the path"
    payload = read_payload(path, MODEL_FORMAT, what="model", title="RefNet model", hint=hint)
    metadata = dict(payload.get("metadata", {}))
    classes = list(metadata.get("classes", []))
    if classes != list(CLASS_NAMES):
        raise ValueError(
            f"{path}: model was made for {len(classes)} classes {classes[:4]}..., but this RefNet uses "
            f"the {NUM_CLASSES} classes {list(CLASS_NAMES[:4])}...; use a model trained for these classes."
        )
    try:
        config = RefNetConfig(**{"norm": "instance", **payload["config"]})  # files without "norm" predate batch norm
        if config.num_classes != NUM_CLASSES:
            raise ValueError(f"its network has {config.num_classes} classes but it lists {len(classes)} names")
        net = RefNet(config)
        net.load_state_dict(payload["state_dict"])
    except (TypeError, KeyError, ValueError, RuntimeError) as err:  # a damaged or hand-edited file
        raise ValueError(f"{path}: the model file is inconsistent ({err}); re-export it with `refnet train`, or "
                         "use the shipped model.") from err
    decider = None
    if payload.get("pieces") is not None:
        from .pieces import PieceDecider

        decider = PieceDecider.from_payload(payload["pieces"], f"{path}: its piece decider")
    dev = resolve_device(device)
    return LoadedModel(net=net.to(dev).eval(), metadata=metadata, device=dev, pieces=decider)
