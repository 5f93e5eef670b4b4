import numpy as np
import pytest
import torch
from nibabel import orientations as o
from refnet.checkpoint import load_model
from refnet.geometry import canonical_affine, to_canonical
from refnet.guards import GuardConfig
from refnet.refine import (
    RefineConfig,
    RefinementCancelled,
    label_slab,
    logits_to_labels,
    predict_logits,
    refine_labels,
    restrict_changes,
    window_ct,
)

from .conftest import make_model_file


def _labels(shape=(40, 36, 12)):
    lab = np.zeros(shape, np.uint8)
    lab[8:20, 6:30, 3:9] = 6
    lab[22:30, 10:16, 2:6] = 12
    lab[25:34, 20:30, 4:10] = 1
    return lab


def _full_net_reference(model, labels):
    """The same refinement by brute force: every whole slice (background-padded) through the net."""
    k = labels.shape[2]
    slab = label_slab(labels.astype(np.int64), list(range(k)), [-1, 0, 1])
    pad = [(0, 0), (0, 0)] + [(0, max(32, n + (-n) % 16) - n) for n in labels.shape[:2]]
    pred = logits_to_labels(predict_logits(model, np.pad(slab, pad)))
    return np.moveaxis(pred[:, : labels.shape[0], : labels.shape[1]], 0, 2)


def test_identity_model_returns_input(identity_model):
    lab = _labels()
    out = refine_labels(lab, np.eye(4), identity_model)
    np.testing.assert_array_equal(out, lab)


def test_unguarded_refinement_is_the_net_inside_the_box_and_copies_outside(tiny_model):
    lab = _labels()
    config = RefineConfig(margin_mm=2, guards=GuardConfig.off())
    out = refine_labels(lab, np.eye(4), tiny_model, config=config)
    assert out.shape == lab.shape and out.dtype == lab.dtype
    assert not np.array_equal(out, lab)  # the perturbed net does change things
    box = (slice(6, 36), slice(4, 32), slice(0, 12))  # label extent plus 2 mm, by hand
    np.testing.assert_array_equal(out[box], _full_net_reference(tiny_model, lab)[box])
    outside = np.ones(lab.shape, bool)
    outside[box] = False
    np.testing.assert_array_equal(out[outside], lab[outside])


def test_refine_never_modifies_input(tiny_model):
    lab = _labels()
    before = lab.copy()
    refine_labels(lab, np.eye(4), tiny_model)
    np.testing.assert_array_equal(lab, before)


@pytest.mark.parametrize(
    "affine",
    [np.diag([-0.8, -0.8, 3.0, 1.0]),
     np.array([[0, 0, 1.0, 0], [-1.0, 0, 0, 0], [0, -2.5, 0, 0], [0, 0, 0, 1]])],
)
def test_orientation_is_handled(tiny_model, affine):
    """Refining a re-oriented file equals re-orienting the refinement of the canonical one."""
    canon = _labels()
    # Build an array in `affine`'s layout holding the same anatomy as the canonical array.
    ornt = o.io_orientation(affine)
    to_file = o.ornt_transform(o.axcodes2ornt("RAS"), ornt)
    stored = o.apply_orientation(canon, to_file)
    assert to_canonical(stored, affine)[0].shape == canon.shape
    out = refine_labels(stored, affine, tiny_model)
    expected = refine_labels(canon, canonical_affine(affine, stored.shape), tiny_model)  # same spacing, RAS
    np.testing.assert_array_equal(to_canonical(out, affine)[0], expected)


def test_empty_label_map_refines_to_itself(tiny_model):
    lab = np.zeros((8, 8, 4), np.int16)
    out = refine_labels(lab, np.eye(4), tiny_model)
    np.testing.assert_array_equal(out, lab)
    assert out is not lab


def test_progress_and_cancel(tiny_model):
    calls = []
    refine_labels(_labels(), np.eye(4), tiny_model, config=RefineConfig(batch_size=4),
                  progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] and len(calls) >= 2
    lab = _labels()
    with pytest.raises(RefinementCancelled, match="cancelled"):
        refine_labels(lab, np.eye(4), tiny_model, progress=lambda d, t: False)
    np.testing.assert_array_equal(lab, _labels())


@pytest.mark.parametrize(
    ("labels", "ct", "match"),
    [(np.zeros((4, 4)), None, "must be a 3D array"),
     (np.zeros((2, 4, 4, 4)), None, "must be a 3D array"),
     (np.full((4, 4, 4), 20), None, "outside the 13 RefNet classes"),
     (np.ones((4, 4, 4), np.uint8), np.zeros((4, 4, 5)), "CT shape .* differs")],
)
def test_bad_input(tiny_model, labels, ct, match):
    with pytest.raises(ValueError, match=match):
        refine_labels(labels, np.eye(4), tiny_model, ct=ct)


def test_ct_model_requires_ct_and_uses_it(tmp_path):
    model = load_model(make_model_file(tmp_path / "ct.pt", ct_channels=1, metadata={"ct_window": [40, 400]}))
    lab = _labels()
    with pytest.raises(ValueError, match="needs the CT"):
        refine_labels(lab, np.eye(4), model)
    ct_a = np.full(lab.shape, -1000.0)
    ct_b = np.full(lab.shape, 1000.0)
    torch.nn.init.normal_(model.net.unet.conv_0.conv_0.conv.weight, std=5.0)
    a = refine_labels(lab, np.eye(4), model, ct=ct_a)
    b = refine_labels(lab, np.eye(4), model, ct=ct_b)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_ct_is_refused_not_turned_into_background(tmp_path, bad):
    model = load_model(make_model_file(tmp_path / "ct.pt", ct_channels=1, metadata={"ct_window": [40, 400]}))
    lab = _labels()
    ct = np.zeros(lab.shape, np.float32)
    ct[:, :, 1] = bad
    with pytest.raises(ValueError, match=rf"CT holds {ct[:, :, 1].size} NaN or infinite values; fill them"):
        refine_labels(lab, np.eye(4), model, ct=ct)


def test_restrict_changes_keeps_disallowed_class_mask():
    raw = np.array([0, 1, 1, 2, 2, 0])
    refined = np.array([1, 0, 2, 2, 0, 2])
    out = restrict_changes(raw, refined, allowed=[0, 1])
    assert out.tolist() == [1, 0, 1, 2, 2, 0]
    np.testing.assert_array_equal(out == 2, raw == 2)


def test_refine_classes_metadata_is_applied(tmp_path):
    model = load_model(make_model_file(tmp_path / "g.pt", metadata={"refine_classes": [0, 6]}))
    lab = _labels()
    out = refine_labels(lab, np.eye(4), model)
    for c in (1, 12):
        np.testing.assert_array_equal(out == c, lab == c)


def test_window_ct():
    np.testing.assert_allclose(window_ct(np.array([-1000.0, 40.0, 1000.0]), 40, 400), [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="width must be > 0"):
        window_ct(np.zeros(2), 0, 0)


def test_refine_config_ill_opts():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        RefineConfig(batch_size=0)


def test_tiny_in_plane_volume(tiny_model):
    lab = np.zeros((6, 5, 3), np.uint8)
    lab[2:4, 1:4, 1] = 6
    out = refine_labels(lab, np.eye(4), tiny_model, config=RefineConfig(margin_mm=0))
    assert out.shape == lab.shape


def test_out_of_memory_splits_the_batch_and_gives_the_same_result(tiny_model, monkeypatch, caplog):
    import refnet.refine as refine_module

    lab = _labels()
    expected = refine_labels(lab, np.eye(4), tiny_model, config=RefineConfig(batch_size=8))
    real = refine_module.predict_logits

    def small_memory(model, labels, ct=None, **kw):
        if len(kw["index"]) > 2:  # more than 2 samples in the batch
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, labels, ct, **kw)

    monkeypatch.setattr(refine_module, "predict_logits", small_memory)
    np.testing.assert_array_equal(refine_labels(lab, np.eye(4), tiny_model, config=RefineConfig(batch_size=8)),
                                  expected)
    assert "out of memory" in caplog.text and "retrying in batches of" in caplog.text


def test_a_slice_that_never_fits_is_a_clear_memory_error(tiny_model, monkeypatch):
    import refnet.refine as refine_module

    def no_memory(model, labels, ct=None, **kw):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB: out of memory")

    monkeypatch.setattr(refine_module, "predict_logits", no_memory)
    with pytest.raises(MemoryError, match="does not fit in memory"):
        refine_labels(_labels(), np.eye(4), tiny_model)
