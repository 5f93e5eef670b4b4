from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from refnet.io import load_volume
from refnet.labels import (
    CLASS_NAMES,
    CLASSES,
    FLARE22_TO_CLASS,
    LABEL_SCHEMES,
    NUM_CLASSES,
    WORD_TO_CLASS,
    check_class_labels,
    class_index_for_name,
    from_class_labels,
    scheme_mapping,
    slicer_terminology,
    to_class_labels,
)


def test_table_has_13_classes_in_order():
    assert NUM_CLASSES == 13
    assert [c.index for c in CLASSES] == list(range(13))
    assert CLASS_NAMES[0] == "Background" and CLASS_NAMES[12] == "Adrenal glands"
    assert len({c.color for c in CLASSES}) == 13


@pytest.mark.parametrize(
    ("name", "index"),
    [("kidney_right", 2), ("Right kidney", 2), ("LIVER", 6), ("adrenal_gland_left", 12),
     ("adrenal_gland_right", 12), ("portal_vein_and_splenic_vein", 10), ("Portal and splenic vein", 10),
     ("inferior vena cava", 9), ("IVC", 9), ("tumour", None), ("", None)],
)
def test_class_index_for_name(name, index):
    assert class_index_for_name(name) == index


def test_btcv_merges_adrenals():
    btcv = np.array([0, 1, 11, 12, 13])
    classes, unmapped = to_class_labels(btcv, "btcv")
    assert classes.tolist() == [0, 1, 11, 12, 12]
    assert not unmapped.any()


def test_totalsegmentator_maps_organs_and_flags_others():
    ts = np.array([0, 5, 52, 63, 64, 15, 27])  # liver, aorta, IVC, portal vein, esophagus, vertebra L5
    classes, unmapped = to_class_labels(ts, "totalsegmentator")
    assert classes.tolist() == [0, 6, 8, 9, 10, 5, 0]
    assert unmapped.tolist() == [False] * 6 + [True]


def test_from_class_labels_round_trip_and_keeps_unmapped():
    ts = np.array([[0, 5, 27], [8, 9, 0]])
    classes, _ = to_class_labels(ts, "totalsegmentator")
    refined = classes.copy()
    refined[0, 0] = 6  # grows the liver
    refined[1, 0] = 12  # right adrenal stays adrenal
    back = from_class_labels(refined, ts, "totalsegmentator")
    assert back.tolist() == [[5, 5, 27], [8, 9, 0]]
    assert back.dtype == ts.dtype


def test_new_adrenal_voxels_take_the_side_of_the_nearest_adrenal():
    # BTCV: 12 right adrenal, 13 left adrenal, merged into class 12 for RefNet.
    btcv = np.zeros((12, 3, 2), np.uint8)
    btcv[1:3, 1, :] = 12  # right adrenal at low i
    btcv[9:11, 1, :] = 13  # left adrenal at high i
    refined, _ = to_class_labels(btcv, "btcv")
    refined[3, 1, :] = 12  # grows next to the right adrenal
    refined[8, 1, 0] = 12  # and next to the left one
    back = from_class_labels(refined, btcv, "btcv")
    assert back[3, 1, 0] == 12 and back[8, 1, 0] == 13
    np.testing.assert_array_equal(back[btcv > 0], btcv[btcv > 0])


def test_new_adrenal_voxels_without_any_original_adrenal_get_the_lowest_value():
    assert from_class_labels(np.array([12, 12, 0]), np.array([0, 0, 0]), "btcv").tolist() == [12, 12, 0]


def test_check_class_labels_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside the 13 RefNet classes.*label-scheme btcv, totalsegmentator, "
                                         "flare22 or word"):
        check_class_labels(np.array([0, 3, 14]))
    with pytest.raises(ValueError, match="integer class values"):
        check_class_labels(np.array([0.5, 1.0]))
    check_class_labels(np.array([0.0, 12.0]))


def test_unknown_scheme():
    with pytest.raises(ValueError, match="unknown label scheme 'nnunet'.*btcv"):
        scheme_mapping("nnunet")


def test_slicer_terminology_strings():
    assert slicer_terminology(0) == ""
    s = slicer_terminology(2)
    assert "SCT^64033007^Kidney" in s and "SCT^24028007^Right" in s
    assert s.count("~") == 6


# Real label maps kept beside the checkout (never in the repository); see their README for the terms.
REAL_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_labels"


def test_flare22_and_word_schemes_are_registered():
    assert LABEL_SCHEMES["flare22"] is FLARE22_TO_CLASS
    assert LABEL_SCHEMES["word"] is WORD_TO_CLASS
    for mapping in (FLARE22_TO_CLASS, WORD_TO_CLASS):
        assert mapping[0] == 0
        assert set(mapping.values()) <= set(range(NUM_CLASSES))
    # FLARE22 has every RefNet class but the portal/splenic vein; WORD lacks aorta, IVC and the veins too.
    assert set(FLARE22_TO_CLASS.values()) == set(range(NUM_CLASSES)) - {10}
    assert set(WORD_TO_CLASS.values()) == set(range(NUM_CLASSES)) - {8, 9, 10}


@pytest.mark.parametrize(
    ("scheme", "values", "expected"),
    [
        # liver, right kidney, spleen, pancreas, aorta, IVC, r/l adrenal, gallbladder, esophagus, stomach,
        # duodenum (none), left kidney
        ("flare22", list(range(14)), [0, 6, 2, 1, 11, 8, 9, 12, 12, 4, 5, 7, 0, 3]),
        # liver, spleen, left kidney, right kidney, stomach, gallbladder, esophagus, pancreas, duodenum,
        # colon, intestine (none), adrenal, rectum, bladder, femoral heads (none)
        ("word", list(range(17)), [0, 6, 1, 3, 2, 7, 4, 5, 11, 0, 0, 0, 12, 0, 0, 0, 0]),
    ],
)
def test_flare22_word_to_class(scheme, values, expected):
    classes, unmapped = to_class_labels(np.array(values, dtype=np.uint8), scheme)
    assert classes.tolist() == expected
    none = {"flare22": {12}, "word": {9, 10, 11, 13, 14, 15, 16}}[scheme]
    assert unmapped.tolist() == [v in none for v in values]


@pytest.mark.parametrize(("scheme", "top"), [("flare22", 13), ("word", 16)])
def test_flare22_word_round_trip_unrefined(scheme, top):
    labels = np.arange(top + 1, dtype=np.uint16).reshape(1, -1).repeat(3, axis=0)
    classes, _ = to_class_labels(labels, scheme)
    back = from_class_labels(classes, labels, scheme)
    assert back.dtype == labels.dtype
    np.testing.assert_array_equal(back, labels)


def test_flare22_unmapped_duodenum_keeps_its_value_through_a_refinement():
    flare = np.array([0, 12, 12, 1, 3])  # background, duodenum x2, liver, spleen
    classes, unmapped = to_class_labels(flare, "flare22")
    assert classes.tolist() == [0, 0, 0, 6, 1] and unmapped.tolist() == [False, True, True, False, False]
    refined = classes.copy()
    refined[0] = 6  # the liver grows into the background
    refined[4] = 0  # the spleen voxel is removed
    assert from_class_labels(refined, flare, "flare22").tolist() == [1, 12, 12, 1, 0]


def test_word_unmapped_structures_keep_their_values_through_a_refinement():
    word = np.array([0, 9, 10, 11, 13, 14, 15, 16, 1, 4])  # ..., duodenum, colon, ..., femoral heads, liver, r kidney
    classes, unmapped = to_class_labels(word, "word")
    assert classes.tolist() == [0] * 8 + [6, 2]
    assert unmapped.tolist() == [False] + [True] * 7 + [False, False]
    refined = classes.copy()
    refined[0] = 2  # the right kidney grows into the background
    refined[8] = 7  # a liver voxel becomes stomach
    assert from_class_labels(refined, word, "word").tolist() == [4, 9, 10, 11, 13, 14, 15, 16, 5, 4]


def test_flare22_adrenals_merge_and_come_back_with_their_own_values():
    flare = np.array([[7, 7, 8], [8, 0, 0]], dtype=np.uint16)  # right adrenal 7, left adrenal 8
    classes, unmapped = to_class_labels(flare, "flare22")
    assert classes.tolist() == [[12, 12, 12], [12, 0, 0]] and not unmapped.any()
    np.testing.assert_array_equal(from_class_labels(classes, flare, "flare22"), flare)
    refined = classes.copy()
    refined[1, 2] = 12  # a new adrenal voxel takes the value of the nearest one (left adrenal, 8)
    refined[0, 0] = 0
    assert from_class_labels(refined, flare, "flare22").tolist() == [[0, 7, 8], [8, 0, 8]]


def _world_x(classes: np.ndarray, affine: np.ndarray, index: int) -> float:
    """World (RAS) x of the centroid of a class: larger is further to the patient's right."""
    mask = classes == index
    centre = [np.dot(mask.sum(axis=tuple(a for a in range(3) if a != axis)), np.arange(mask.shape[axis]))
              for axis in range(3)]
    return float((affine @ np.r_[np.array(centre) / mask.sum(), 1.0])[0])


@pytest.mark.parametrize(("scheme", "pattern"), [("flare22", "flare22/FLARE22_Tr_*.nii.gz"),
                                                 ("word", "word/word_*.nii.gz")])
def test_real_label_maps_round_trip_and_map_plausibly(scheme, pattern):
    files = sorted(REAL_LABELS.glob(pattern)) if REAL_LABELS.is_dir() else []
    if not files:
        pytest.skip(f"no real label maps under {REAL_LABELS}")
    volume = load_volume(files[0])
    original = volume.array
    classes, _ = to_class_labels(original, scheme)
    back = from_class_labels(classes, original, scheme)
    assert back.dtype == original.dtype
    assert np.array_equal(back, original)  # no refinement: exactly the input again
    counts = np.array([np.count_nonzero(classes == index) for index in range(NUM_CLASSES)])
    assert int(np.argmax(counts[1:])) + 1 == 6  # the liver is the largest organ
    assert counts[[1, 2, 3, 6, 7, 11]].min() > 0  # spleen, kidneys, liver, stomach, pancreas
    absent = {"flare22": [10], "word": [8, 9, 10]}[scheme]
    assert counts[absent].sum() == 0
    # Liver and right kidney on the patient's right of spleen and left kidney (RAS world x).
    assert _world_x(classes, volume.affine, 6) > _world_x(classes, volume.affine, 1)
    assert _world_x(classes, volume.affine, 2) > _world_x(classes, volume.affine, 3)
