import numpy as np
import pytest
from refnet.error_simulator import ErrorConfig, simulate_errors

SPACING = (1.5, 1.5, 3.0)


def _map(shape=(48, 48, 12)):
    """A liver-like ball touching a smaller kidney-like ball, on an anisotropic grid."""
    i, j, k = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    labels = np.zeros(shape, np.uint8)
    labels[((i - 20) * 1.5) ** 2 + ((j - 24) * 1.5) ** 2 + ((k - 6) * 3.0) ** 2 < 15.0**2] = 6
    labels[((i - 34) * 1.5) ** 2 + ((j - 24) * 1.5) ** 2 + ((k - 6) * 3.0) ** 2 < 9.0**2] = 2
    return labels


NONE = dict(shift_prob=0.0, jitter_mm=0.0, hole_prob=0.0, island_prob=0.0, slice_prob=0.0, clean_prob=0.0)


def test_no_perturbation_returns_the_map_unchanged_and_leaves_the_input_alone():
    labels = _map()
    before = labels.copy()
    out = simulate_errors(labels, SPACING, np.random.default_rng(0), config=ErrorConfig(**NONE))
    np.testing.assert_array_equal(out, labels)
    np.testing.assert_array_equal(labels, before)
    assert out is not labels and out.dtype == labels.dtype


def test_seeded_and_actually_corrupts():
    labels = _map()
    a = simulate_errors(labels, SPACING, np.random.default_rng(3), config=ErrorConfig(clean_prob=0.0))
    b = simulate_errors(labels, SPACING, np.random.default_rng(3), config=ErrorConfig(clean_prob=0.0))
    np.testing.assert_array_equal(a, b)
    assert (a != labels).any()
    assert set(np.unique(a)) <= {0, 2, 6}


def test_grow_and_shrink_are_equally_likely():
    """The errors have no direction: over many draws an organ grows about as often as it shrinks."""
    labels = _map()
    config = ErrorConfig(**{**NONE, "shift_prob": 1.0, "jitter_mm": 1.0})
    change = []
    for seed in range(200):
        out = simulate_errors(labels, SPACING, np.random.default_rng(seed), config=config)
        change.append((out == 2).sum() / (labels == 2).sum() - 1.0)
    change = np.array(change)
    moved = change[change != 0]
    assert moved.size > 50 and 0.3 < (moved > 0).mean() < 0.7
    assert abs(change.mean()) < 0.03 and change.std() > 0.05


def test_touching_organs_trade_voxels_at_their_interface():
    labels = _map()
    config = ErrorConfig(**{**NONE, "jitter_mm": 2.5})
    traded = sum(int(((labels == 6) & (out == 2)).sum() + ((labels == 2) & (out == 6)).sum())
                 for out in (simulate_errors(labels, SPACING, np.random.default_rng(s), config=config)
                             for s in range(5)))
    assert traded > 0


def test_islands_lie_as_far_from_their_organ_as_asked():
    """Islands are detached pieces of the organ whose centres lie island_gap_mm beyond their radius."""
    from scipy import ndimage

    labels = np.zeros((80, 80, 40), np.uint8)
    labels[38:42, 38:42, 19:21] = 2  # a 6 mm organ in a field big enough that no island is clipped to it
    config = ErrorConfig(**{**NONE, "island_prob": 1.0, "blob_mm": (3.0, 3.0), "island_gap_mm": (30.0, 40.0)})
    gaps = []
    for seed in range(20):
        out = simulate_errors(labels, SPACING, np.random.default_rng(seed), config=config)
        parts, count = ndimage.label(out == 2, structure=np.ones((3, 3, 3)))
        far = ndimage.distance_transform_edt(labels != 2, sampling=SPACING)
        gaps += [far[parts == n].min() for n in range(1, count + 1) if not (labels[parts == n] == 2).any()]
    assert len(gaps) >= 10  # most draws leave a detached island (the strength scales the chance)
    # centres 33-43 mm from an organ voxel: at least 33 - 10 (the organ's diagonal) - 3 (radius) - 3 (rounding)
    assert min(gaps) > 17.0


def test_clean_probability_one_gives_the_map_back():
    labels = _map()
    out = simulate_errors(labels, SPACING, np.random.default_rng(0), config=ErrorConfig(clean_prob=1.0))
    np.testing.assert_array_equal(out, labels)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"shift_mm": -1.0}, "shift_mm must be >= 0"),
    ({"hole_prob": 1.5}, "hole_prob must be a probability"),
    ({"blob_mm": (5.0, 2.0)}, "blob_mm must be"),
    ({"island_gap_mm": (0.0, 2.0)}, "island_gap_mm must be"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ErrorConfig(**kwargs)


@pytest.mark.parametrize(("labels", "spacing", "match"), [
    (np.zeros((4, 4), np.uint8), SPACING, "3D array"),
    (np.zeros((4, 4, 4), np.uint8), (1.0, 0.0, 1.0), "3 positive numbers"),
])
def test_bad_input(labels, spacing, match):
    with pytest.raises(ValueError, match=match):
        simulate_errors(labels, spacing, np.random.default_rng(0))
