from __future__ import annotations

import json

import numpy as np
import pytest
from refnet.evaluate import (
    dice_per_class,
    false_positive_ml,
    format_table,
    save_montage,
    summarise,
    write_metrics,
)
from refnet.labels import CLASS_NAMES


def test_dice_per_class_hand_computed():
    gt = np.array([0, 0, 1, 1, 1, 2, 2, 0])
    pred = np.array([0, 1, 1, 1, 0, 2, 0, 0])
    d = dice_per_class(pred, gt, num_classes=4)
    # class 0: gt {0,1,7}, pred {0,4,6,7}: 2*2/(3+4); class 1: 2*2/(3+3); class 2: 2*1/(2+1); class 3 absent.
    np.testing.assert_allclose(d[:3], [4 / 7, 4 / 6, 2 / 3])
    assert np.isnan(d[3])


def test_dice_is_zero_for_a_class_only_the_prediction_has():
    gt = np.array([0, 0, 1, 1, 0, 0])
    pred = np.array([0, 3, 1, 1, 0, 0])  # class 3: a false positive of a structure the case lacks
    d = dice_per_class(pred, gt, num_classes=5)
    assert d[3] == 0.0  # nnU-Net's convention: harm, not "skipped"
    assert np.isnan(d[2]) and np.isnan(d[4])  # absent from both: left out of the averages
    assert d[1] == 1.0 and d[0] == pytest.approx(2 * 3 / (4 + 3))


def test_dice_zero_counts_in_the_case_average():
    gt = np.zeros((4, 4), np.uint8)
    gt[:2] = 6
    pred = gt.copy()
    pred[3, 3] = 12  # one stray adrenal voxel in a case without adrenals
    clean = summarise([dice_per_class(gt, gt)])
    harmed = summarise([dice_per_class(pred, gt)])
    assert clean["dice"][CLASS_NAMES[12]] is None
    assert harmed["dice"][CLASS_NAMES[12]] == 0.0
    assert harmed["mean_organ_dice"] < clean["mean_organ_dice"]


def test_false_positive_ml_by_hand():
    gt = np.array([[0, 0, 1, 1],
                   [0, 2, 2, 1]])
    pred = np.array([[1, 0, 1, 2],
                     [3, 2, 0, 1]])
    fp = false_positive_ml(pred, gt, voxel_volume_ml=0.5, num_classes=4)
    # class 0: (1,2) where gt is 2 -> 1 voxel; class 1: (0,0) -> 1; class 2: (0,3) -> 1; class 3: (1,0) -> 1.
    np.testing.assert_allclose(fp, [0.5, 0.5, 0.5, 0.5])
    assert fp.dtype == np.float64 and fp.shape == (4,)
    pred2 = np.full_like(gt, 1)
    np.testing.assert_allclose(false_positive_ml(pred2, gt, voxel_volume_ml=0.5, num_classes=4),
                               [0.0, 2.5, 0.0, 0.0])  # five non-spleen voxels labelled 1
    assert not false_positive_ml(gt, gt, voxel_volume_ml=0.5).any()
    assert false_positive_ml(gt, gt, voxel_volume_ml=0.5).shape == (13,)


@pytest.mark.parametrize(
    ("pred", "gt", "volume", "match"),
    [
        (np.zeros((2, 2)), np.zeros((2, 3)), 1.0, "differs from ground-truth shape"),
        (np.zeros(3), np.zeros(3), 0.0, "voxel_volume_ml must be a positive finite number"),
        (np.zeros(3), np.zeros(3), float("nan"), "voxel_volume_ml must be a positive finite number"),
    ],
)
def test_false_positive_ml_rejects_bad_input(pred, gt, volume, match):
    with pytest.raises(ValueError, match=match):
        false_positive_ml(pred, gt, voxel_volume_ml=volume)


def test_summarise_with_false_positives():
    dice = [np.full(13, 0.8), np.full(13, 0.6)]
    fp_a = np.zeros(13)
    fp_a[0], fp_a[6] = 100.0, 4.0  # background entry is not an organ: left out of the organ mean
    fp_b = np.zeros(13)
    fp_b[6], fp_b[12] = 2.0, 1.2
    without = summarise(dice)
    with_fp = summarise(dice, false_positive_ml=[fp_a, fp_b])
    assert set(without) == {"dice", "mean_dice", "mean_organ_dice", "cases"}
    assert {k: with_fp[k] for k in without} == without  # the Dice keys do not change
    assert with_fp["false_positive_ml"][CLASS_NAMES[6]] == pytest.approx(3.0)
    assert with_fp["false_positive_ml"][CLASS_NAMES[12]] == pytest.approx(0.6)
    assert with_fp["false_positive_ml"][CLASS_NAMES[0]] == pytest.approx(50.0)
    assert with_fp["mean_false_positive_ml"] == pytest.approx((3.0 + 0.6) / 12, abs=1e-5)
    json.dumps(with_fp)  # still JSON-serialisable


def test_summarise_false_positives_must_match_the_cases():
    with pytest.raises(ValueError, match="false_positive_ml has 1 cases, per_case has 2"):
        summarise([np.ones(13), np.ones(13)], false_positive_ml=[np.zeros(13)])
    with pytest.raises(ValueError, match="false_positive_ml vectors have shape"):
        summarise([np.ones(13)], false_positive_ml=[np.zeros(12)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_per_class_matches_monai(seed):
    import torch
    from monai.metrics import compute_dice

    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 13, (20, 18, 6)).astype(np.uint8)
    gt[gt == 5] = 0  # one class absent from both maps
    pred = np.where(rng.random(gt.shape) < 0.3, rng.integers(0, 13, gt.shape), gt).astype(np.uint8)
    pred[pred == 5] = 0
    expected = compute_dice(torch.as_tensor(pred.astype(np.int64))[None, None],
                            torch.as_tensor(gt.astype(np.int64))[None, None],
                            include_background=True, ignore_empty=True, num_classes=13)[0].double().numpy()
    np.testing.assert_allclose(dice_per_class(pred, gt), expected, rtol=1e-6)
    assert np.isnan(dice_per_class(pred, gt)[5])


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match="differs from ground-truth shape"):
        dice_per_class(np.zeros((2, 2)), np.zeros((2, 3)))


def test_summarise_means_include_background_and_skip_absent():
    a = np.full(13, 0.5)
    a[0] = 1.0
    b = np.full(13, 0.7)
    b[0] = 1.0
    b[12] = np.nan
    s = summarise([a, b])
    assert s["dice"][CLASS_NAMES[0]] == 1.0
    assert s["dice"][CLASS_NAMES[12]] == 0.5
    per_class = np.array([1.0] + [0.6] * 11 + [0.5])
    assert s["mean_dice"] == pytest.approx(per_class.mean(), abs=1e-5)
    assert s["mean_organ_dice"] == pytest.approx(per_class[1:].mean(), abs=1e-5)


def test_table_and_json(tmp_path):
    raw = summarise([np.full(13, 0.8)])
    ref = summarise([np.full(13, 0.9)])
    table = format_table({"raw": raw, "refined": ref})
    assert "Adrenal glands" in table and "+0.1000" in table
    path = write_metrics(tmp_path / "m.json", {"classes": list(CLASS_NAMES), "raw": raw, "refined": ref})
    assert json.loads(path.read_text())["refined"]["mean_dice"] == pytest.approx(0.9)


def test_montage_writes_png(tmp_path):
    ct = np.random.default_rng(0).normal(0, 100, (24, 20, 6))
    a = np.zeros((24, 20, 6), np.uint8)
    a[5:15, 5:15, 2:4] = 6
    b = a.copy()
    b[5:8, 5:15, 3] = 0
    path = save_montage(tmp_path / "m.png", ct, {"raw": a, "refined": b, "ground truth": a}, n_slices=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
