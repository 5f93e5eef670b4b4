"""One place that turns a device request ("auto", "cpu", "cuda", "cuda:N") into a torch device."""

from __future__ import annotations

import functools
import logging

import torch

__all__ = ["resolve_device"]

logger = logging.getLogger(__name__)


@functools.cache
def _note_cpu_fallback() -> None:
    logger.info("no CUDA GPU available; running on CPU")  # once per process, not once per call


def resolve_device(request: str | torch.device = "auto") -> torch.device:
    """Resolve a device request; ``auto`` falls back to CPU (with a log line) when CUDA is missing.

    An explicit ``cuda`` request on a machine without CUDA is an error, not a silent CPU run: whoever
    asked for the GPU (a cluster job, say) should learn at once that it is not there.

    Args:
        request: ``"auto"`` (GPU if available), ``"cpu"``, ``"cuda"``/``"gpu"`` or ``"cuda:N"``.

    Raises:
        ValueError: an unrecognised request, or a CUDA index that does not exist.
    """
    if isinstance(request, torch.device):
        return request
    text = str(request).strip().lower()
    if text == "gpu":
        text = "cuda"
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        _note_cpu_fallback()
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise ValueError(f"device {request!r} is not valid; use auto, cpu, cuda or cuda:N.")
        if not torch.cuda.is_available():
            raise ValueError(f"device {request!r} requested but no CUDA GPU is available here (torch "
                             f"{torch.__version__}); use --device auto (GPU if present, else CPU) or cpu.")
        if int(index_text) >= torch.cuda.device_count():
            raise ValueError(f"device {request!r}: only {torch.cuda.device_count()} CUDA device(s) present.")
        return torch.device(f"cuda:{index_text}")
    raise ValueError(f"device {request!r} is not valid; use auto, cpu, cuda or cuda:N.")
