"""Paired confidence intervals for gains measured on the same cases (refined vs raw of one prediction)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = ["paired_interval"]


def paired_interval(after: Sequence[float], before: Sequence[float], *, confidence: float = 0.95) -> dict[str, float]:
    """Mean of ``after - before`` over paired cases with its Student-t interval.

    Pairing removes the case-to-case spread that both methods share (a hard case is hard for both),
    which is what a gain over raw on the same predictions needs.

    Returns:
        ``{"mean", "sd", "low", "high", "n"}``; ``low`` and ``high`` are NaN with fewer than 2 cases.

    Raises:
        ValueError: the sequences differ in length or are empty, or ``confidence`` is not in (0, 1).
    """
    a, b = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equally long, non-empty sequences of paired values, got {a.shape} and {b.shape}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    diff = a - b
    mean = float(diff.mean())
    sd = float(diff.std(ddof=1)) if diff.size > 1 else float("nan")
    if diff.size < 2:
        low = high = float("nan")
    elif sd == 0.0:
        low = high = mean
    else:
        low, high = (float(v) for v in stats.t.interval(confidence, diff.size - 1, loc=mean,
                                                         scale=sd / np.sqrt(diff.size)))
    return {"mean": mean, "sd": sd, "low": low, "high": high, "n": int(diff.size)}
