"""Spacing-aware refinement and its guards: identity round trips, crop independence, each guard."""

import numpy as np
import pytest
import torch
from refnet.checkpoint import load_model, save_model
from refnet.guards import GUARD_NAMES, GuardConfig, limit_to_band, limit_to_confident, remove_new_components
from refnet.model import RefNet, RefNetConfig
from refnet.refine import RefineConfig, refine_volume
from refnet.spacing import InPlaneGrid, context_offsets, resample_image, resample_labels
from scipy import ndimage

from .conftest import TINY_FEATURES, make_model_file

SPACING_META = {"spacing": {"inplane_mm": 1.5, "slice_mm": [2.0, 5.0], "context_mm": 5.0}}


def _anatomy(shape=(72, 64, 14)):
    """Liver, spleen, a one-voxel-thin vessel and a small adrenal: thin structures must survive."""
    lab = np.zeros(shape, np.uint8)
    lab[10:40, 8:50, 2:12] = 6
    lab[45:62, 30:52, 3:11] = 1
    lab[41, 5:60, 1:13] = 10  # one voxel wide
    lab[50:53, 12:15, 5:8] = 12
    return lab


def _affine(inplane, slices=2.5):
    return np.diag([inplane, inplane, slices, 1.0])


def _biased_model(tmp_path, cls, bias=5.0, **meta):
    torch.manual_seed(0)
    net = RefNet(RefNetConfig(features=TINY_FEATURES))
    with torch.no_grad():
        net.unet.final_conv.bias[cls] = bias
    # a liver grown far beyond half its volume: allowed here so the other guards have work (volume guard: below)
    meta["guards"] = {"max_volume_change": 1e6, **meta.get("guards", {})}
    return load_model(save_model(tmp_path / f"bias{cls}.pt", net, metadata={**SPACING_META, **meta}))


@pytest.mark.parametrize("inplane", [0.7, 1.5, 3.0])
def test_identity_round_trip_at_three_spacings(tmp_path, inplane):
    model = load_model(make_model_file(tmp_path / "id.pt", perturb=False, metadata=SPACING_META))
    lab = _anatomy()
    result = refine_volume(lab, _affine(inplane), model)
    np.testing.assert_array_equal(result.labels, lab)
    assert result.report.model_spacing_mm == 1.5 and result.report.changed == {}


@pytest.mark.parametrize("guards", [GuardConfig(), GuardConfig.off()])
def test_output_does_not_depend_on_the_margin(tmp_path, guards):
    model = load_model(make_model_file(tmp_path / "t.pt", metadata=SPACING_META))
    lab, affine = _anatomy(), _affine(0.8)
    outs = [refine_volume(lab, affine, model, config=RefineConfig(margin_mm=m, guards=guards)).labels
            for m in (0.0, 12.0, 1000.0)]
    assert not np.array_equal(outs[0], lab)
    nz = np.nonzero(lab)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in nz)  # the smallest processed box
    for out in outs[1:]:
        np.testing.assert_array_equal(out[box], outs[0][box])
    if guards.band:  # with the band guard every margin covers all allowed changes: identical everywhere
        for out in outs[1:]:
            np.testing.assert_array_equal(out, outs[0])


def test_absent_class_guard(tmp_path):
    model = _biased_model(tmp_path, cls=4)  # pushes everything towards the gallbladder, absent from the input
    lab = _anatomy()
    on = refine_volume(lab, _affine(1.0), model)
    assert not (on.labels == 4).any() and on.report.held_back["absent_classes"] > 0
    off = refine_volume(lab, _affine(1.0), model, config=RefineConfig(guards=GuardConfig.off()))
    assert (off.labels == 4).sum() > 100 and off.report.held_back == dict.fromkeys(GUARD_NAMES, 0)


def test_confidence_guard(tmp_path):
    model = _biased_model(tmp_path, cls=6)  # liver logit +5 over an identity of +4: p(liver) about 0.7
    lab = _anatomy()
    strict = refine_volume(lab, _affine(1.0), model, config=RefineConfig(guards=GuardConfig(threshold=0.95)))
    np.testing.assert_array_equal(strict.labels, lab)
    assert strict.report.held_back["confidence"] > 0
    loose = refine_volume(lab, _affine(1.0), model, config=RefineConfig(guards=GuardConfig(threshold=0.5)))
    assert (loose.labels != lab).sum() > 0 and loose.report.held_back["confidence"] == 0


def test_class_check_guard(tmp_path):
    model = _biased_model(tmp_path, cls=6, refine_classes=[0, 6])
    lab = _anatomy()
    out = refine_volume(lab, _affine(1.0), model)
    for c in (1, 10, 12):
        np.testing.assert_array_equal(out.labels == c, lab == c)
    assert out.report.held_back["class_check"] > 0


@pytest.mark.parametrize("band_mm", [1.0, 4.0])
def test_band_guard_keeps_changes_near_input_boundaries(tmp_path, band_mm):
    model = _biased_model(tmp_path, cls=6)
    lab, spacing = _anatomy(), (0.8, 0.8, 2.5)
    result = refine_volume(lab, np.diag([*spacing, 1.0]), model,
                           config=RefineConfig(guards=GuardConfig(band_mm=band_mm, new_components=False)))
    changed = result.labels != lab
    assert changed.any() and result.report.held_back["band"] > 0
    edge = np.zeros(lab.shape, bool)  # voxels on either side of an interface, computed independently
    for axis in range(3):
        diff = np.diff(lab.astype(int), axis=axis) != 0
        edge[tuple(slice(None, -1) if a == axis else slice(None) for a in range(3))] |= diff
        edge[tuple(slice(1, None) if a == axis else slice(None) for a in range(3))] |= diff
    dist = ndimage.distance_transform_edt(~edge, sampling=spacing)
    assert dist[changed].max() <= band_mm


def test_new_component_guard_unit():
    raw = np.zeros((20, 20, 5), np.uint8)
    raw[2:8, 2:8, 1:4] = 6
    refined = raw.copy()
    refined[8, 2:8, 1:4] = 6  # growth attached to the liver: kept
    refined[14:17, 14:17, 2] = 6  # an island far from it: undone
    out, held = remove_new_components(raw, refined)
    assert held == 9 and not out[14:17, 14:17, 2].any() and (out[8, 2:8, 1:4] == 6).all()
    assert np.array_equal(refined[14:17, 14:17, 2], np.full((3, 3), 6))  # input untouched


def test_no_component_or_class_is_created_by_default(tmp_path):
    model = load_model(make_model_file(tmp_path / "t.pt", metadata=SPACING_META))
    lab = _anatomy()
    out = refine_volume(lab, _affine(0.8), model).labels
    assert set(np.unique(out)) <= set(np.unique(lab))
    for c in np.unique(out)[1:]:
        comps, n = ndimage.label(out == c, structure=np.ones((3, 3, 3)))
        assert set(np.unique(comps[lab == c])) - {0} == set(range(1, n + 1))


def test_report_counts_match_the_output(tmp_path):
    model = load_model(make_model_file(tmp_path / "t.pt", metadata=SPACING_META))
    lab = _anatomy()
    result = refine_volume(lab, _affine(0.8), model)
    added = sum(a for a, _ in result.report.changed.values())
    assert added == int((result.labels != lab).sum()) > 0
    assert set(result.report.held_back) == set(GUARD_NAMES)
    assert "voxels changed" in result.report.summary()


def test_spacing_warnings(tmp_path):
    model = load_model(make_model_file(tmp_path / "id.pt", perturb=False, metadata=SPACING_META))
    thin = refine_volume(_anatomy(), _affine(0.8, slices=0.5), model).report.warnings
    assert any("slice spacing 0.50 mm is outside" in w for w in thin)
    assert refine_volume(_anatomy(), _affine(0.8, slices=3.0), model).report.warnings == []
    legacy = load_model(make_model_file(tmp_path / "old.pt", perturb=False))
    assert any("records no training spacing" in w for w in refine_volume(_anatomy(), _affine(1.0), legacy)
               .report.warnings)


@pytest.mark.parametrize(("slice_mm", "context_mm", "expected"),
                         [(1.0, 5.0, [-5, 0, 5]), (2.5, 5.0, [-2, 0, 2]), (5.0, 5.0, [-1, 0, 1]),
                          (8.0, 5.0, [-1, 0, 1]), (1.0, None, [-1, 0, 1])])
def test_context_offsets(slice_mm, context_mm, expected):
    assert context_offsets(1, slice_mm, context_mm).tolist() == expected


def test_resampling_keeps_shapes_and_values():
    lab = _anatomy()
    grid = InPlaneGrid.for_spacing(lab.shape[:2], (0.75, 0.75), 1.5)
    assert grid.shape == (36, 32)
    down = resample_labels(lab, grid, ((0, 36), (0, 32)), num_classes=13)
    assert down.shape == (36, 32, lab.shape[2]) and (down == 6).sum() * 4 == pytest.approx((lab == 6).sum(), rel=0.1)
    same = InPlaneGrid.for_spacing(lab.shape[:2], (1.5, 1.5), 1.5)
    np.testing.assert_array_equal(resample_labels(lab, same, ((0, 72), (0, 64)), num_classes=13), lab)
    flat = resample_image(np.full(lab.shape, 7.0, np.float32), grid, ((-3, 40), (0, 32)))
    np.testing.assert_allclose(flat, 7.0)


@pytest.mark.parametrize(("kwargs", "match"), [({"band_mm": -1.0}, "band_mm must be >= 0, got -1.0"),
                                               ({"threshold": 1.5}, r"threshold must be in \[0, 1\], got 1.5")])
def test_guard_config_ill_opts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuardConfig(**kwargs)


def test_per_class_thresholds_use_the_stricter_class():
    raw = np.array([0, 0, 6, 6, 1])
    refined = np.array([6, 1, 0, 1, 1])
    conf = np.full(5, 0.7, np.float32)
    thresholds = np.full(13, 0.5)
    thresholds[1] = 0.8  # spleen: cautious
    thresholds[6] = 1.0  # liver: never changes
    out, held = limit_to_confident(raw, refined, conf, thresholds)
    assert out.tolist() == [0, 0, 6, 6, 1] and held == 4
    thresholds[6] = 0.6
    assert limit_to_confident(raw, refined, conf, thresholds)[0].tolist() == [6, 0, 0, 6, 1]


def test_model_file_class_thresholds_and_override(tmp_path):
    per_class = [0.5] * 13
    per_class[6] = 1.0
    model = _biased_model(tmp_path, cls=6, guards={"band_mm": 6.0, "threshold": 0.5, "class_thresholds": per_class})
    lab = _anatomy()
    frozen = refine_volume(lab, _affine(1.0), model)  # liver may never change: the liver-growing net does nothing
    np.testing.assert_array_equal(frozen.labels, lab)
    assert model.class_thresholds(GuardConfig(threshold=0.5)) == [0.5] * 13  # a caller's single value wins
    grown = refine_volume(lab, _affine(1.0), model, config=RefineConfig(guards=GuardConfig(threshold=0.5)))
    assert (grown.labels == 6).sum() > (lab == 6).sum()


def test_band_guard_unit_leaves_input_alone():
    raw = np.zeros((10, 10, 3), np.uint8)
    raw[2:5, 2:5, 1] = 6
    refined = raw.copy()
    refined[9, 9, 1] = 6
    out, held = limit_to_band(raw, refined, (1.0, 1.0, 1.0), 2.0)
    assert held == 1 and out[9, 9, 1] == 0 and refined[9, 9, 1] == 6


def test_volume_guard_unit_keeps_an_organ_that_would_be_halved_or_doubled():
    from refnet.guards import limit_volume_change

    raw = np.zeros((20, 20, 40), np.uint8)
    raw[2:10, 2:10, 2:38] = 6  # liver, 2304 voxels
    raw[12:16, 12:16, 5:9] = 12  # adrenal, 64 voxels
    refined = raw.copy()
    refined[2:10, 2:10, 30:38] = 0  # liver loses 22%: allowed at 0.5
    refined[12:17, 11:17, 4:10] = 12  # adrenal grows to 180 voxels (+181%): undone
    out, held = limit_volume_change(raw, refined, 0.5)
    np.testing.assert_array_equal(out == 6, refined == 6)
    np.testing.assert_array_equal(out == 12, raw == 12)
    assert held == 180 - 64
    strict, _ = limit_volume_change(raw, refined, 0.1)  # at 0.1 the liver's 22% is too much as well
    np.testing.assert_array_equal(strict, raw)


def test_volume_guard_in_refinement_and_its_override(tmp_path):
    model = _biased_model(tmp_path, cls=6, guards={"max_volume_change": 0.5})  # grows the liver a lot
    lab = _anatomy()
    free = refine_volume(lab, _affine(1.0), model, config=RefineConfig(guards=GuardConfig(volume_change=False)))
    grown = ((free.labels == 6).sum() - (lab == 6).sum()) / (lab == 6).sum()
    assert grown > 0.5  # without the guard the liver grows by more than half
    guarded = refine_volume(lab, _affine(1.0), model)
    np.testing.assert_array_equal(guarded.labels == 6, lab == 6)
    assert guarded.report.held_back["volume_change"] > 0
    loose = refine_volume(lab, _affine(1.0), model, config=RefineConfig(guards=GuardConfig(max_volume_change=100.0)))
    assert (loose.labels == 6).sum() > (lab == 6).sum() and loose.report.held_back["volume_change"] == 0


def test_max_volume_change_option(tmp_path):
    from refnet.batch import guard_config
    from refnet.cli import _parser

    args = _parser().parse_args(["refine", "--labels", "a.nii.gz", "--out", "b.nii.gz", "--max-volume-change", "0.3"])
    assert guard_config(args).max_volume_change == 0.3
    off = _parser().parse_args(["refine", "--labels", "a.nii.gz", "--out", "b.nii.gz", "--max-volume-change", "0.3",
                                "--disable-guard", "volume_change"])
    with pytest.raises(ValueError, match="--max-volume-change sets the volume_change guard"):
        guard_config(off)
    with pytest.raises(SystemExit):
        _parser().parse_args(["refine", "--labels", "a.nii.gz", "--out", "b.nii.gz", "--max-volume-change", "0"])
    with pytest.raises(ValueError, match="max_volume_change must be > 0"):
        GuardConfig(max_volume_change=-1.0)


def test_edge_guard_unit_freezes_only_edges_that_cut_an_organ():
    from refnet.guards import limit_at_cut_edges

    raw = np.zeros((12, 10, 8), np.uint8)
    raw[0:5, 3:7, 2:6] = 6  # the liver lies on the low-x face: the image edge cuts it
    raw[8:11, 3:7, 2:6] = 1  # the spleen is inside: no other face holds an organ
    refined = raw.copy()
    refined[0:5, 3:7, 2:6] = 0  # the liver erased, from the face inwards
    refined[8:11, 3:7, 2] = 0  # a spleen slice erased, away from every cut edge
    every = (True,) * 6
    out, held = limit_at_cut_edges(raw, refined, (2.0, 1.0, 1.0), 5.0, every)
    # x spacing 2 mm, 5 mm deep: the layers at 0, 2 and 4 mm go back, the ones at 6 and 8 mm stay changed
    np.testing.assert_array_equal(out[0:3], raw[0:3])
    assert not out[3:5].any() and held == 3 * 4 * 4
    np.testing.assert_array_equal(out[8:11], refined[8:11])
    assert (refined[0:5, 3:7, 2:6] == 0).all()  # input untouched
    # the same face, not an edge of the image (a box inside it): nothing held back
    np.testing.assert_array_equal(limit_at_cut_edges(raw, refined, (2.0, 1.0, 1.0), 5.0, (False,) * 6)[0], refined)
    np.testing.assert_array_equal(limit_at_cut_edges(raw, refined, (2.0, 1.0, 1.0), 0.0, every)[0], refined)


def test_edge_guard_in_refinement_keeps_an_organ_the_edge_cuts(tmp_path):
    model = _biased_model(tmp_path, cls=0)  # erodes every organ
    lab = _anatomy()
    cut = np.ascontiguousarray(lab[20:])  # a region of interest through the liver: it starts at the edge
    spacing = (0.8, 0.8, 2.5)
    affine = np.diag([*spacing, 1.0])
    free = refine_volume(cut, affine, model, config=RefineConfig(guards=GuardConfig(edge=False)))
    assert (free.labels[0] != cut[0]).any()  # without the guard the net rounds the cut off
    guarded = refine_volume(cut, affine, model, config=RefineConfig(guards=GuardConfig(edge_mm=4.0)))
    np.testing.assert_array_equal(guarded.labels[:5], cut[:5])  # 0, 0.8, ... 3.2 mm from the edge
    assert guarded.report.held_back["edge"] > 0
    assert (guarded.labels[5:] != cut[5:]).any()  # deeper in, the guard holds nothing back
    whole = refine_volume(lab, affine, model)  # no organ on any face: the guard holds nothing back
    assert whole.report.held_back["edge"] == 0


def test_edge_mm_option(tmp_path):
    from refnet.batch import guard_config, guard_settings
    from refnet.cli import _parser

    args = _parser().parse_args(["refine", "--labels", "a.nii.gz", "--out", "b.nii.gz", "--edge-mm", "3"])
    assert guard_config(args).edge_mm == 3.0
    off = _parser().parse_args(["refine", "--labels", "a.nii.gz", "--out", "b.nii.gz", "--edge-mm", "3",
                                "--disable-guard", "edge"])
    with pytest.raises(ValueError, match="--edge-mm sets the edge guard"):
        guard_config(off)
    with pytest.raises(ValueError, match="edge_mm must be >= 0"):
        GuardConfig(edge_mm=-1.0)
    model = load_model(make_model_file(tmp_path / "t.pt", metadata=SPACING_META))
    from refnet.checkpoint import GUARD_DEFAULTS

    assert guard_settings(GuardConfig(), model)["edge_mm"] == GUARD_DEFAULTS["edge_mm"]  # files without one
