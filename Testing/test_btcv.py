import json

import numpy as np
import pytest
from refnet.data.btcv import (
    BTCV_TEST_IDS,
    BTCV_TRAIN_IDS,
    Case,
    dataset_label_scheme,
    find_cases,
    load_case,
    split_cases,
)
from refnet.data.phantoms import PhantomConfig, write_phantom_dataset
from refnet.io import save_volume

TINY = PhantomConfig(inplane_spacing_mm=(8.0, 8.0), slice_spacing_mm=(10.0, 10.0))
AFFINE = np.diag([0.8, 0.8, 3.0, 1.0])


def _write(root, cid, *, layout="flat", suffix=".nii.gz", label=True, labels=None, label_affine=AFFINE,
           label_shape=(4, 5, 3)):
    img_dir, lab_dir = (root, root) if layout == "flat" else (root / "img", root / "label")
    rng = np.random.default_rng(cid)
    ct = rng.integers(-1000, 1000, (4, 5, 3)).astype(np.int16)
    save_volume(img_dir / f"img{cid:04d}{suffix}", ct, AFFINE)
    if label:
        values = labels if labels is not None else rng.integers(0, 13, label_shape).astype(np.uint8)
        save_volume(lab_dir / f"label{cid:04d}{suffix}", values, label_affine)


def test_btcv_split_ids_are_the_standard_18_12():
    assert len(BTCV_TRAIN_IDS) == 18 and len(BTCV_TEST_IDS) == 12
    assert not set(BTCV_TRAIN_IDS) & set(BTCV_TEST_IDS)
    assert sorted(BTCV_TRAIN_IDS + BTCV_TEST_IDS) == [*range(1, 11), *range(21, 41)]


@pytest.mark.parametrize("layout", ["flat", "subfolders"])
def test_find_cases_both_layouts(tmp_path, layout):
    _write(tmp_path, 1, layout=layout)
    _write(tmp_path, 5, layout=layout, suffix=".nii")
    cases = find_cases(tmp_path)
    assert list(cases) == [1, 5]
    img_dir, lab_dir = (tmp_path, tmp_path) if layout == "flat" else (tmp_path / "img", tmp_path / "label")
    assert cases[5] == Case(5, img_dir / "img0005.nii", lab_dir / "label0005.nii")
    assert cases[1].image.name == "img0001.nii.gz"


def test_find_cases_without_labels(tmp_path):
    _write(tmp_path, 3, layout="subfolders", label=False)
    expected = {3: Case(3, tmp_path / "img" / "img0003.nii.gz", None)}
    assert find_cases(tmp_path, require_labels=False) == expected


def test_find_cases_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_cases(tmp_path / "nowhere")


def test_find_cases_no_images(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no images found .*img0001\.nii\.gz"):
        find_cases(tmp_path)
    save_volume(tmp_path / "label" / "label0001.nii.gz", np.zeros((4, 5, 3), np.uint8), AFFINE)
    with pytest.raises(FileNotFoundError, match=r"no images found .*\(but 1 label maps\)"):
        find_cases(tmp_path)


def test_find_cases_lists_every_problem(tmp_path):
    _write(tmp_path, 1, layout="subfolders")
    _write(tmp_path, 3, layout="subfolders", label=False)
    _write(tmp_path, 4, layout="subfolders", label=False)
    save_volume(tmp_path / "label" / "label0009.nii.gz", np.zeros((4, 5, 3), np.uint8), AFFINE)
    with pytest.raises(ValueError, match="3 problem") as info:
        find_cases(tmp_path)
    message = str(info.value)
    assert "img0003.nii.gz has no label map" in message and "label/label0003.nii.gz" in message
    assert "img0004.nii.gz has no label map" in message
    assert "label0009.nii.gz has no image (expected " in message and "img/img0009.nii.gz" in message
    assert "require_labels=False" in message


def test_find_cases_stray_label_fails_even_without_required_labels(tmp_path):
    _write(tmp_path, 1)
    save_volume(tmp_path / "label0002.nii.gz", np.zeros((4, 5, 3), np.uint8), AFFINE)
    with pytest.raises(ValueError, match="label0002.nii.gz has no image"):
        find_cases(tmp_path, require_labels=False)


def test_find_cases_duplicate_id(tmp_path):
    _write(tmp_path, 1)
    _write(tmp_path, 1, suffix=".nii", label=False)
    with pytest.raises(ValueError, match="case 1 has two files"):
        find_cases(tmp_path)


def _cases(ids):
    return {i: Case(i, f"img{i:04d}.nii.gz", f"label{i:04d}.nii.gz") for i in ids}


@pytest.mark.parametrize(
    ("split", "ids", "expected"),
    [("train", None, [5, 6]), ("test", None, [1]), ("all", None, [1, 5, 6, 41]), ("train", [6, 1], [6, 1]),
     ("test", [99], [])],
)
def test_split_cases(split, ids, expected):
    assert [c.case_id for c in split_cases(_cases([1, 5, 6, 41]), split, ids=ids)] == expected


def test_split_cases_accepts_a_list_of_cases():
    assert [c.case_id for c in split_cases(list(_cases([2, 7, 8]).values()), "test")] == [2, 8]


def test_split_cases_strict_lists_missing_ids():
    with pytest.raises(ValueError, match=r"wants case ids \[7, 9, 10, 21"):
        split_cases(_cases([5, 6]), "train", strict=True)
    assert len(split_cases(_cases(BTCV_TEST_IDS), "test", strict=True)) == 12


def test_split_cases_unknown_split():
    with pytest.raises(ValueError, match=r"unknown split 'val'; choose one of \['train', 'test', 'all'\]"):
        split_cases(_cases([1]), "val")


def test_dataset_label_scheme(tmp_path):
    assert dataset_label_scheme(tmp_path) == "btcv"
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "BTCV", "labels": {}}))
    assert dataset_label_scheme(tmp_path) == "btcv"
    (tmp_path / "dataset.json").write_text(json.dumps({"label_scheme": "refnet"}))
    assert dataset_label_scheme(tmp_path) == "refnet"


@pytest.mark.parametrize(("text", "match"), [("{not json", "not readable JSON"),
                                             ('{"label_scheme": "amos"}', "label_scheme 'amos'")])
def test_dataset_label_scheme_errors(tmp_path, text, match):
    (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        dataset_label_scheme(tmp_path)


def test_load_case_maps_btcv_labels(tmp_path):
    btcv = np.arange(60).reshape(4, 5, 3) % 15  # 0..14; 14 is not a BTCV organ
    _write(tmp_path, 2, labels=btcv.astype(np.uint8))
    ct, classes = load_case(find_cases(tmp_path)[2])
    assert ct.array.dtype == np.float32 and classes.dtype == np.uint8 and classes.shape == (4, 5, 3)
    np.testing.assert_allclose(ct.affine, AFFINE)
    assert np.all(classes[btcv == 13] == 12) and np.all(classes[btcv == 12] == 12)
    assert np.all(classes[btcv == 14] == 0) and np.all(classes[btcv == 6] == 6)


def test_load_case_explicit_scheme_overrides_dataset_json(tmp_path):
    _write(tmp_path, 2, labels=np.full((4, 5, 3), 13, np.uint8))
    (tmp_path / "dataset.json").write_text(json.dumps({"label_scheme": "refnet"}))
    with pytest.raises(ValueError, match="outside the 13 RefNet classes"):
        load_case(find_cases(tmp_path)[2])
    assert load_case(find_cases(tmp_path)[2], scheme="btcv")[1].max() == 12


def test_load_case_shape_mismatch(tmp_path):
    _write(tmp_path, 1, label_shape=(4, 5, 2))
    with pytest.raises(ValueError, match=r"shape \(4, 5, 3\).*label0001.nii.gz has shape \(4, 5, 2\).*resa"):
        load_case(find_cases(tmp_path)[1])


def test_load_case_affine_mismatch(tmp_path):
    shifted = AFFINE.copy()
    shifted[2, 3] = 1.5
    _write(tmp_path, 1, label_affine=shifted)
    match = r"(?s)img0001.nii.gz and label map .*label0001.nii.gz have different affines .*1\.5 mm.*resample"
    with pytest.raises(ValueError, match=match):
        load_case(find_cases(tmp_path)[1])


def test_load_case_tolerates_tiny_affine_difference(tmp_path):
    nudged = AFFINE.copy()
    nudged[0, 3] = 4e-4
    _write(tmp_path, 1, label_affine=nudged)
    load_case(find_cases(tmp_path)[1])


def test_load_case_without_label(tmp_path):
    _write(tmp_path, 3, label=False)
    with pytest.raises(ValueError, match="case 3 .* has no label map"):
        load_case(find_cases(tmp_path, require_labels=False)[3])


def test_load_case_fractional_labels(tmp_path):
    _write(tmp_path, 1, labels=np.full((4, 5, 3), 0.5, np.float32))
    with pytest.raises(ValueError, match="fractional values"):
        load_case(find_cases(tmp_path)[1])


def test_phantom_dataset_loads_as_refnet(tmp_path):
    root = write_phantom_dataset(tmp_path / "phantoms", [5, 1, 41], config=TINY)
    cases = find_cases(root)
    assert list(cases) == [1, 5, 41] and dataset_label_scheme(root) == "refnet"
    train, test = split_cases(cases, "train"), split_cases(cases, "test")
    assert [c.case_id for c in train] == [5] and [c.case_id for c in test] == [1]
    ct, classes = load_case(train[0])
    assert classes.shape == ct.array.shape and classes.dtype == np.uint8
    assert set(np.unique(classes)) <= set(range(13)) and len(np.unique(classes)) > 8
