import json

import numpy as np
import pytest
from refnet.evaluate import dice_per_class, format_table, save_montage, summarise, write_metrics
from refnet.labels import CLASS_NAMES


def test_dice_per_class_hand_computed():
    gt = np.array([0, 0, 1, 1, 1, 2, 2, 0])
    pred = np.array([0, 1, 1, 1, 0, 2, 0, 0])
    d = dice_per_class(pred, gt, num_classes=4)
    # class 0: gt {0,1,7}, pred {0,4,6,7}: 2*2/(3+4); class 1: 2*2/(3+3); class 2: 2*1/(2+1); class 3 absent.
    np.testing.assert_allclose(d[:3], [4 / 7, 4 / 6, 2 / 3])
    assert np.isnan(d[3])


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
