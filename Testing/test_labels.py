import numpy as np
import pytest
from refnet.labels import (
    CLASS_NAMES,
    CLASSES,
    NUM_CLASSES,
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


def test_from_class_labels_new_adrenal_voxels_get_lowest_source_value():
    btcv = np.array([0, 13, 0])
    refined = np.array([12, 12, 0])
    assert from_class_labels(refined, btcv, "btcv").tolist() == [12, 13, 0]


def test_check_class_labels_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside the 13 RefNet classes.*label-scheme"):
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
