import numpy as np
import pytest
from refnet.stats import paired_interval


def test_paired_interval_matches_the_t_formula():
    before = np.array([0.70, 0.80, 0.60, 0.90, 0.75])
    gain = np.array([0.01, 0.03, 0.02, 0.00, 0.04])
    out = paired_interval(before + gain, before)
    # Hand-computed: mean 0.02, sd 0.015811, t(0.975, 4) = 2.776445.
    half = 2.776445 * 0.0158114 / np.sqrt(5)
    assert out["mean"] == pytest.approx(0.02) and out["sd"] == pytest.approx(0.0158114, rel=1e-5)
    assert out["low"] == pytest.approx(0.02 - half, rel=1e-4) and out["high"] == pytest.approx(0.02 + half, rel=1e-4)
    assert out["n"] == 5


def test_paired_interval_edge_cases():
    assert np.isnan(paired_interval([1.0], [0.5])["low"])
    same = paired_interval([0.6, 0.7], [0.5, 0.6])
    assert same["low"] == same["high"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="equally long"):
        paired_interval([1.0, 2.0], [1.0])
