"""refnet.segments (and labels.class_index_for_terminology): segment <-> class arrays, no Slicer."""

import numpy as np
import pytest
from refnet.guards import GUARD_NAMES, GuardConfig
from refnet.labels import CLASS_NAMES, class_index_for_terminology, slicer_terminology
from refnet.refine import RefineReport
from refnet.segments import (
    ClassChange,
    changed_mask,
    check_segmentation_grid,
    class_changes,
    compose_class_map,
    format_guards,
    format_report,
    match_segment,
    match_segments,
    pack_layers,
    parse_image_geometry,
    split_class_map,
    unassigned_voxels,
)

KIDNEY = "SCT^64033007^Kidney"


def _entry(type_field, modifier="^^"):
    return (f"Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~"
            f"{type_field}~{modifier}~Anatomic codes - DICOM master list~^^~^^")


@pytest.mark.parametrize(("name", "terminology", "expected"), [
    ("Liver", "", 6),
    ("liver", "", 6),
    ("kidney_right", "", 2),  # TotalSegmentator
    ("Right kidney", "", 2),
    ("adrenal_gland_left", "", 12),
    ("Portal vein and splenic vein", "", 10),
    ("Segment_1", _entry(KIDNEY, "SCT^7771000^Left"), 3),  # terminology when the name says nothing
    ("Segment_1", _entry(KIDNEY), None),  # kidney without laterality: ambiguous
    ("Spleen", _entry("SCT^10200004^Liver"), 1),  # the name wins over the terminology
    ("Background", "", None),  # background is never refined
    ("Tumor", "", None),
    ("Tumor", _entry("SCT^85756007^Tissue"), None),  # Slicer's default terminology for new segments
])
def test_match_segment(name, terminology, expected):
    assert match_segment(name, terminology) == expected


def test_match_segments_keeps_order():
    assert match_segments([("spleen", ""), ("x", ""), ("aorta", "")]) == [1, None, 8]


@pytest.mark.parametrize("index", range(1, 13))
def test_terminology_round_trip(index):
    assert class_index_for_terminology(slicer_terminology(index)) == index


@pytest.mark.parametrize("entry", ["", "garbage", "a~b", "a~b~DCM^123^x~^^", "a~b~SCT^^~^^"])
def test_terminology_rejects_malformed(entry):
    assert class_index_for_terminology(entry) is None


def _box(shape, sl):
    mask = np.zeros(shape, bool)
    mask[sl] = True
    return mask


def test_compose_last_segment_wins_on_overlap():
    a, b = _box((4, 4, 2), np.s_[0:3, 0:3]), _box((4, 4, 2), np.s_[2:4, 2:4])
    out = compose_class_map([a, b], [6, 1])
    assert out.dtype == np.uint8
    assert out[2, 2, 0] == 1 and out[0, 0, 0] == 6 and out[3, 0, 0] == 0
    assert compose_class_map([b, a], [1, 6])[2, 2, 0] == 6


@pytest.mark.parametrize(("masks", "classes", "match"), [
    ([], [], "no segment masks"),
    ([np.zeros((2, 2, 2))], [1, 2], "one class per mask"),
    ([np.zeros((2, 2, 2)), np.zeros((2, 2, 3))], [1, 2], "one shape"),
    ([np.zeros((2, 2))], [1], "3D"),
    ([np.zeros((2, 2, 2))], [0], "classes must be 1..12"),
    ([np.zeros((2, 2, 2))], [13], "classes must be 1..12"),
])
def test_compose_rejects_bad_input(masks, classes, match):
    with pytest.raises(ValueError, match=match):
        compose_class_map(masks, classes)


def test_split_single_segment_class_takes_whole_class():
    liver = _box((6, 6, 3), np.s_[1:4, 1:4])
    refined = np.zeros((6, 6, 3), np.uint8)
    refined[1:5, 1:4] = 6
    (out,) = split_class_map(refined, [liver], [6])
    np.testing.assert_array_equal(out, refined == 6)


def test_split_shared_class_keeps_own_voxels_and_gives_new_ones_to_nearest():
    shape = (12, 4, 1)
    right, left = _box(shape, np.s_[0:3]), _box(shape, np.s_[9:12])  # two adrenals, class 12
    refined = np.zeros(shape, np.uint8)
    refined[1:11] = 12  # grows towards each other; voxel 0 and 11 are lost
    out_right, out_left = split_class_map(refined, [right, left], [12, 12])
    np.testing.assert_array_equal(out_right[:, 0, 0], [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out_left[:, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
    assert not (out_right & out_left).any()


def test_split_nearest_uses_spacing():
    shape = (5, 5, 1)
    a, b = _box(shape, np.s_[0, 0]), _box(shape, np.s_[4, 4])
    refined = np.zeros(shape, np.uint8)
    refined[0, 0] = refined[4, 4] = refined[0, 3] = 12  # (0, 3): 3 steps along axis 1 from a, 4 along axis 0 from b
    near_a, _ = split_class_map(refined, [a, b], [12, 12])
    assert near_a[0, 3, 0]
    _, near_b = split_class_map(refined, [a, b], [12, 12], spacing=(1.0, 10.0, 1.0))  # axis 1 now far
    assert near_b[0, 3, 0]


def test_split_overlapping_same_class_segments_both_keep_voxels():
    shape = (6, 1, 1)
    a, b = _box(shape, np.s_[0:4]), _box(shape, np.s_[2:6])
    refined = np.full(shape, 6, np.uint8)
    out_a, out_b = split_class_map(refined, [a, b], [6, 6])
    assert out_a[2:4].all() and out_b[2:4].all()


def test_split_empty_members_get_new_voxels_in_first_segment():
    shape = (3, 3, 1)
    empty = np.zeros(shape, bool)
    refined = np.zeros(shape, np.uint8)
    refined[1, 1] = 12
    first, second = split_class_map(refined, [empty, empty], [12, 12])
    assert first[1, 1, 0] and not second.any()


def test_split_drops_classes_without_segment_and_counts_them():
    refined = np.zeros((3, 3, 1), np.uint8)
    refined[0, 0] = 6
    refined[2, 2] = 8
    (liver,) = split_class_map(refined, [np.zeros((3, 3, 1), bool)], [6])
    assert liver.sum() == 1
    assert unassigned_voxels(refined, [6]) == {8: 1}


def test_split_rejects_other_shape():
    with pytest.raises(ValueError, match="differs from the mask shape"):
        split_class_map(np.zeros((2, 2, 2), np.uint8), [np.zeros((2, 2, 3), bool)], [1])


def test_class_changes_and_changed_mask():
    raw = np.array([[[0, 6, 6, 1]]], np.uint8)
    refined = np.array([[[6, 6, 1, 0]]], np.uint8)
    np.testing.assert_array_equal(changed_mask(raw, refined), [[[True, False, True, True]]])
    assert class_changes(raw, refined) == {1: ClassChange(1, 1), 6: ClassChange(1, 1)}
    assert class_changes(raw, raw) == {}
    with pytest.raises(ValueError, match="differs"):
        changed_mask(raw, refined[..., :2])


def test_pack_layers_separates_overlaps_only():
    shape = (4, 1, 1)
    a, b, c = _box(shape, np.s_[0:2]), _box(shape, np.s_[2:4]), _box(shape, np.s_[1:3])
    layers = pack_layers([a, b, c])
    assert [members for _, members in layers] == [[0, 1], [2]]
    np.testing.assert_array_equal(layers[0][0][:, 0, 0], [1, 1, 2, 2])
    np.testing.assert_array_equal(layers[1][0][:, 0, 0], [0, 1, 1, 0])


def _geometry_text(matrix, extent):
    return "".join(f"{float(v)!r};" for v in np.ravel(matrix)) + "".join(f"{e};" for e in extent)


def test_parse_image_geometry_reads_slicer_format():
    matrix = np.array([[-0.8, 0, 0, 10.5], [0, -0.8, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    parsed, extent = parse_image_geometry(_geometry_text(matrix, (0, 35, 0, 39, 0, 9)))
    np.testing.assert_array_equal(parsed, matrix)
    assert extent == (0, 35, 0, 39, 0, 9)


@pytest.mark.parametrize(("text", "match"), [("1;2;3;", "22 numbers"), ("a;" * 22, "not a Slicer image geometry")])
def test_parse_image_geometry_rejects_bad_text(text, match):
    with pytest.raises(ValueError, match=match):
        parse_image_geometry(text)


CT = np.array([[0.8, 0, 0, -10.0], [0, 0.8, 0, 5.0], [0, 0, 2.5, 100.0], [0, 0, 0, 1]])
CT_EXTENT = (0, 35, 0, 39, 0, 9)


def _shifted(di, dj, dk):
    m = CT.copy()
    m[:3, 3] += CT[:3, :3] @ np.array([di, dj, dk])
    return m


@pytest.mark.parametrize(("matrix", "extent"), [
    (CT, CT_EXTENT),  # the same grid
    (_shifted(2, 3, 1), (0, 10, 0, 10, 0, 5)),  # a crop of the CT grid
    (CT, (4, 10, 0, 39, 2, 9)),  # an extent that does not start at 0
    (CT + 1e-5, CT_EXTENT),  # float noise from file headers
])
def test_check_segmentation_grid_accepts_the_ct_grid(matrix, extent):
    assert check_segmentation_grid(matrix, extent, CT, CT_EXTENT) is True


@pytest.mark.parametrize(("matrix", "extent"), [
    (_shifted(0.5, 0, 0), CT_EXTENT),  # half a voxel off
    (CT @ np.diag([0.5, 1.0, 1.0, 1.0]), CT_EXTENT),  # finer spacing (an oversampled segmentation)
    (np.array([[-0.8, 0, 0, 18.0], [0, -0.8, 0, 36.2], [0, 0, 2.5, 100.0], [0, 0, 0, 1]]), CT_EXTENT),  # flipped
    (_shifted(30, 0, 0), CT_EXTENT),  # reaches outside the CT
])
def test_check_segmentation_grid_resamples_other_overlapping_grids(matrix, extent):
    assert check_segmentation_grid(matrix, extent, CT, CT_EXTENT) is False


@pytest.mark.parametrize("matrix", [_shifted(40, 0, 0), _shifted(0, 0, -11)])
def test_check_segmentation_grid_refuses_a_segmentation_beside_the_ct(matrix):
    with pytest.raises(ValueError, match="does not overlap the selected CT"):
        check_segmentation_grid(matrix, CT_EXTENT, CT, CT_EXTENT)


def test_format_report_lists_everything():
    text = format_report({6: ClassChange(120, 30)}, seconds=2.04, device="cpu", unmatched=["Tumor"],
                         unassigned={8: 5})
    assert "2.0 s on cpu" in text
    assert "Liver +120 -30" in text
    assert "Tumor" in text and "Aorta 5" in text
    assert "No voxel changed" in format_report({}, seconds=0.1, device="cuda")
    assert CLASS_NAMES[6] == "Liver"


def test_format_guards_lists_every_guard_and_the_warnings():
    report = RefineReport(held_back={"absent_classes": 0, "class_check": 7, "confidence": 12, "band": 0,
                                     "new_components": 3},
                          warnings=["slice spacing 9.00 mm is outside the 1-5 mm the model was trained on."])
    lines = format_guards(report, GuardConfig(band=False))
    assert lines == [
        "Guards held back (voxels): absent classes 0, class check 7, confidence 12, band off, edge 0, "
        "new components 3, volume change 0.",
        "Warning: slice spacing 9.00 mm is outside the 1-5 mm the model was trained on.",
    ]
    assert format_guards(RefineReport(), GuardConfig.off())[0].count(" off") == len(GUARD_NAMES)


def test_format_report_includes_the_guards_when_given_a_report():
    report = RefineReport(held_back={"absent_classes": 4, "class_check": 0, "confidence": 0, "band": 9,
                                     "new_components": 0}, warnings=["check the result closely"])
    text = format_report({6: ClassChange(1, 2)}, seconds=1.0, device="cpu", report=report)
    assert ("Guards held back (voxels): absent classes 4, class check 0, confidence 0, band 9, edge 0, "
            "new components 0, volume change 0.") in text
    assert text.endswith("Warning: check the result closely.")
    assert "Guards" not in format_report({6: ClassChange(1, 2)}, seconds=1.0, device="cpu")
