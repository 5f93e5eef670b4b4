"""Property tests: random label maps, shapes, affines and class subsets never break refinement.

Whatever the input, ``refine_labels`` returns the input's shape and dtype, leaves the input alone,
keeps every value the model cannot refine, and an identity model (correction head zero) returns its
input exactly at any spacing and orientation.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refnet.checkpoint import load_model
from refnet.refine import refine_labels

from .conftest import make_model_file

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    at_spacing = {"spacing": {"inplane_mm": 1.5, "slice_mm": [2.0, 5.0], "context_mm": 5.0}}
    return (load_model(make_model_file(folder / "identity.pt", perturb=False)),
            load_model(make_model_file(folder / "identity15.pt", perturb=False, metadata=at_spacing)),
            load_model(make_model_file(folder / "busy.pt")),
            load_model(make_model_file(folder / "busy15.pt", metadata=at_spacing)))


@st.composite
def cases(draw):
    shape = tuple(draw(st.integers(1, 24)) for _ in range(3))
    classes = draw(st.lists(st.integers(0, 12), min_size=1, max_size=5, unique=True))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    labels = np.asarray(classes, dtype=np.uint8)[rng.integers(0, len(classes), shape)]
    if draw(st.booleans()):  # blobs instead of salt-and-pepper
        labels = np.zeros(shape, np.uint8)
        for c in classes:
            lo = [int(rng.integers(0, n)) for n in shape]
            labels[tuple(slice(a, a + max(1, n // 2)) for a, n in zip(lo, shape))] = c
    dtype = draw(st.sampled_from([np.uint8, np.int16, np.int32, np.int64, np.uint16]))
    spacing = [draw(st.floats(0.3, 6.0)) for _ in range(3)]
    perm = draw(st.permutations([0, 1, 2]))
    flips = [draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)]
    affine = np.eye(4)
    for col, (axis, flip, s) in enumerate(zip(perm, flips, spacing)):
        affine[:3, col] = 0.0
        affine[axis, col] = flip * s
    affine[:3, 3] = [draw(st.floats(-200, 200)) for _ in range(3)]
    return labels.astype(dtype), affine


@SETTINGS
@given(case=cases())
def test_refine_never_crashes_and_keeps_shape_dtype_and_input(models, case):
    labels, affine = case
    before = labels.copy()
    for model in models:
        out = refine_labels(labels, affine, model)
        assert out.shape == labels.shape and out.dtype == labels.dtype
        assert set(np.unique(out)) <= set(range(13))
        assert set(np.unique(out)) <= set(np.unique(labels)) | {0}  # never a class the input lacks
        np.testing.assert_array_equal(labels, before)


@SETTINGS
@given(case=cases())
def test_identity_model_returns_its_input_exactly(models, case):
    labels, affine = case
    for identity in models[:2]:  # at the input's own spacing, and resampled to 1.5 mm and back
        np.testing.assert_array_equal(refine_labels(labels, affine, identity), labels)
