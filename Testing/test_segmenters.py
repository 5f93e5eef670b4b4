"""Tests of refnet.segmenters: build, train, predict, checkpoints and prediction folders."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import numpy as np
import pytest
import torch
from refnet.io import load_volume, save_volume
from refnet.labels import NUM_CLASSES
from refnet.segmenters import (
    SEGMENTER_ARCHITECTURES,
    SegmenterConfig,
    build_segmenter,
    load_prediction_folder,
    load_segmenter,
    predict_segmenter,
    predict_segmenter_logits,
    save_predictions,
    save_segmenter,
    train_segmenter,
    window_ct,
)

AFFINE = np.diag([2.0, 2.0, 4.0, 1.0])
TINY_UNET = SegmenterConfig(architecture="unet", features=4, patch_size=(16, 16, 16), steps=4, batch_size=2)


def _volume(seed: int = 0, shape: tuple[int, int, int] = (24, 20, 12)) -> tuple[np.ndarray, np.ndarray]:
    """A tiny CT (float32 HU) with two ellipsoid organs (liver 6, spleen 1) and its uint8 labels."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij"))
    labels = np.zeros(shape, dtype=np.uint8)
    labels[((grid[0] + 0.4) / 0.4) ** 2 + (grid[1] / 0.5) ** 2 + (grid[2] / 0.6) ** 2 < 1] = 6
    labels[((grid[0] - 0.5) / 0.3) ** 2 + (grid[1] / 0.3) ** 2 + (grid[2] / 0.5) ** 2 < 1] = 1
    hu = np.select([labels == 6, labels == 1], [60.0, 120.0], -100.0)
    return (hu + rng.normal(0, 10, shape)).astype(np.float32), labels


@pytest.mark.parametrize("architecture", SEGMENTER_ARCHITECTURES)
def test_build_forward(architecture):
    if architecture == "swinunetr" and importlib.util.find_spec("einops") is None:
        pytest.skip("SwinUNETR needs einops")
    features = 12 if architecture == "swinunetr" else 4
    patch = (64, 32, 32) if architecture == "swinunetr" else (32, 32, 32)
    config = SegmenterConfig(architecture=architecture, features=features, patch_size=patch)
    net = build_segmenter(config).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *patch))
    assert out.shape == (1, NUM_CLASSES, *patch)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"architecture": "vnet"},
         r"unknown architecture 'vnet'; choose one of \['unet', 'dynunet', 'segresnet', 'swinunetr'\]"),
        ({"patch_size": (20, 16, 16)}, r"patch_size of unet must be 3 multiples of 8"),
        ({"patch_size": (16, 16)}, r"patch_size"),
        ({"architecture": "swinunetr", "patch_size": (64, 32, 32)}, r"features divisible by 12"),
        ({"architecture": "swinunetr", "features": 12, "patch_size": (32, 32, 32)}, r"patch side >= 64"),
        ({"steps": 0}, r"SegmenterConfig.steps must be an int >= 1, got 0"),
        ({"ct_window": (250.0, -175.0)}, r"ct_window must be \(low, high\)"),
        ({"overlap": 1.0}, r"overlap in \[0, 1\)"),
        ({"name": "../evil"}, r"must be a plain file name"),
    ],
)
def test_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        SegmenterConfig(**changes)


def test_config_name_and_dict_round_trip():
    config = SegmenterConfig.demo("segresnet", seed=3)
    assert config.name == f"segresnet-s3-{config.steps}"
    assert replace(config, steps=7, name=None).name == "segresnet-s3-7"
    assert SegmenterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown SegmenterConfig fields \['bogus'\]"):
        SegmenterConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown architecture 'nnunet'"):
        SegmenterConfig.demo("nnunet")


def test_parse_preset_from_command_line_text():
    config = SegmenterConfig.parse("dynunet:seed=1,steps=50,patch_size=(32, 32, 16)")
    assert config == SegmenterConfig.demo("dynunet", seed=1, steps=50, patch_size=(32, 32, 16))
    assert config.name == "dynunet-s1-50"
    assert SegmenterConfig.parse(" unet ") == SegmenterConfig.demo("unet")
    assert SegmenterConfig.parse("unet:name=my-unet").name == "my-unet"  # a bare word stays a string
    with pytest.raises(ValueError, match=r"'bogus=1' is not field=value with a field of"):
        SegmenterConfig.parse("unet:bogus=1")
    with pytest.raises(ValueError, match=r"'architecture=unet' is not field=value"):
        SegmenterConfig.parse("dynunet:architecture=unet")
    with pytest.raises(ValueError, match=r"'steps' is not field=value"):
        SegmenterConfig.parse("unet:steps")
    with pytest.raises(ValueError, match="unknown architecture 'vnet'"):
        SegmenterConfig.parse("vnet:steps=3")
    with pytest.raises(ValueError, match="SegmenterConfig.steps must be an int >= 1, got 0"):
        SegmenterConfig.parse("unet:steps=0")


def test_dynunet_trains_and_predicts_at_full_resolution():
    """nnU-Net's DynUNet: a full-resolution first stage, so its output has the patch's own size."""
    cases = [_volume(0), _volume(1)]
    config = SegmenterConfig(architecture="dynunet", features=4, patch_size=(16, 16, 8), steps=3)
    net = train_segmenter(cases, config)
    pred = predict_segmenter(net, cases[0][0], config)
    assert pred.shape == cases[0][0].shape and pred.dtype == np.uint8


def test_window_ct_range():
    out = window_ct(np.array([-1000.0, -175.0, 37.5, 250.0, 3000.0]), (-175.0, 250.0))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    assert out.dtype == np.float32


def test_train_is_seeded_and_finite():
    cases = [_volume(0), _volume(1, (12, 10, 8))]  # the second is smaller than the patch: padded
    losses: list[float] = []
    before = torch.random.get_rng_state()
    net_a = train_segmenter(cases, TINY_UNET, on_step=lambda step, loss: losses.append(loss))
    assert torch.equal(before, torch.random.get_rng_state())  # caller's RNG untouched
    net_b = train_segmenter(cases, TINY_UNET)
    assert len(losses) == TINY_UNET.steps and all(np.isfinite(losses))
    assert not net_a.training
    for (key, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(a, b), key
    net_c = train_segmenter(cases, replace(TINY_UNET, seed=1))
    pairs = zip(net_a.state_dict().values(), net_c.state_dict().values())
    assert any(not torch.equal(a, c) for a, c in pairs)


def test_training_lowers_loss():
    losses: list[float] = []
    config = replace(TINY_UNET, steps=30, lr=1e-2)
    train_segmenter([_volume(0)], config, on_step=lambda step, loss: losses.append(loss))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


@pytest.mark.parametrize(
    ("cases", "match"),
    [
        ([], "cases is empty"),
        ([(np.zeros((8, 8)), np.zeros((8, 8), np.uint8))], r"cases\[0\] ct must be a 3D"),
        ([(np.zeros((8, 8, 8)), np.zeros((8, 8, 4), np.uint8))], r"labels shape \(8, 8, 4\) differs"),
        ([(np.zeros((8, 8, 8)), np.full((8, 8, 8), 14, np.uint8))], r"outside the 13 RefNet classes"),
    ],
)
def test_train_rejects_bad_cases(cases, match):
    with pytest.raises(ValueError, match=match):
        train_segmenter(cases, TINY_UNET)


def test_predict_shape_dtype():
    net = build_segmenter(TINY_UNET)
    ct, _ = _volume(0, (20, 17, 9))  # not a multiple of the patch, and thinner than it
    labels = predict_segmenter(net, ct, TINY_UNET)
    assert labels.shape == ct.shape and labels.dtype == np.uint8 and labels.max() < NUM_CLASSES
    logits = predict_segmenter_logits(net, ct, TINY_UNET)
    assert logits.shape == (NUM_CLASSES, *ct.shape) and logits.dtype == np.float32
    with pytest.raises(ValueError, match="ct must be a 3D numeric"):
        predict_segmenter(net, ct[0], TINY_UNET)


def test_checkpoint_round_trip(tmp_path, monkeypatch):
    net = build_segmenter(TINY_UNET)
    path = save_segmenter(tmp_path / "models" / "tiny.pt", net, TINY_UNET)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    loaded, config = load_segmenter(path)
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert config == TINY_UNET and not loaded.training
    for a, b in zip(net.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such segmenter file"):
        load_segmenter(tmp_path / "missing.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a RefNet segmenter file"):
        load_segmenter(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable segmenter file"):
        load_segmenter(tmp_path / "junk.pt")


def test_save_and_load_predictions(tmp_path):
    preds = {3: (_volume(0)[1], AFFINE), 12: (_volume(1)[1], AFFINE)}
    folder = save_predictions(tmp_path, "unet-s0-4", preds)
    assert folder == tmp_path / "unet-s0-4"
    assert sorted(p.name for p in folder.iterdir()) == ["label0003.nii.gz", "label0012.nii.gz"]
    vol = load_volume(folder / "label0003.nii.gz")
    assert vol.array.dtype == np.uint8
    np.testing.assert_allclose(vol.affine, AFFINE)
    loaded = load_prediction_folder(folder, [12, 3])
    assert list(loaded) == [12, 3]
    for case_id, (labels, _) in preds.items():
        np.testing.assert_array_equal(loaded[case_id], labels)
    with pytest.raises(ValueError, match="must be a plain file name"):
        save_predictions(tmp_path, "a/b", preds)
    with pytest.raises(ValueError, match="outside the 13 RefNet classes"):
        save_predictions(tmp_path, "bad", {1: (np.full((4, 4, 4), 20), AFFINE)})


@pytest.mark.parametrize("filename", ["label0007.nii.gz", "img0007.nii.gz", "0007.nii.gz", "case_0007.nii.gz",
                                      "BTCV_0007.nii.gz", "7.nii", "LABEL0007.NII.GZ"])
def test_external_folder_patterns(tmp_path, filename):
    labels = _volume(0)[1]
    save_volume(tmp_path / filename, labels.astype(np.int16), AFFINE)
    save_volume(tmp_path / "notes0007.txt.nii.gz", labels, AFFINE)  # no accepted pattern: ignored
    loaded = load_prediction_folder(tmp_path, [7], shapes={7: labels.shape})
    np.testing.assert_array_equal(loaded[7], labels)
    assert loaded[7].dtype == np.uint8


def test_external_folder_schemes(tmp_path):
    ts = np.zeros((4, 4, 4), np.int16)
    ts[0], ts[1, 0], ts[2, 0, 0] = 5, 52, 90  # TotalSegmentator liver, aorta, and a non-organ label
    save_volume(tmp_path / "case_0001.nii.gz", ts, AFFINE)
    classes = load_prediction_folder(tmp_path, [1], scheme="totalsegmentator")[1]
    assert classes[0, 0, 0] == 6 and classes[1, 0, 0] == 8 and classes[2, 0, 0] == 0
    btcv = np.full((4, 4, 4), 13, np.uint8)
    save_volume(tmp_path / "0002.nii.gz", btcv, AFFINE)
    assert np.all(load_prediction_folder(tmp_path, [2], scheme="btcv")[2] == 12)
    with pytest.raises(ValueError, match="unknown label scheme 'nnunet'"):
        load_prediction_folder(tmp_path, [1], scheme="nnunet")


def test_external_folder_errors(tmp_path):
    labels = _volume(0)[1]
    save_volume(tmp_path / "label0001.nii.gz", labels, AFFINE)
    accepted = r"no prediction for case ids \[2, 5\].*labelNNNN, imgNNNN, NNNN, case_NNNN"
    with pytest.raises(ValueError, match=accepted):
        load_prediction_folder(tmp_path, [1, 2, 5])
    with pytest.raises(ValueError, match=r"shape \(24, 20, 12\) differs from the expected \(24, 20, 13\)"):
        load_prediction_folder(tmp_path, [1], shapes={1: (24, 20, 13)})
    save_volume(tmp_path / "img0001.nii.gz", labels, AFFINE)
    with pytest.raises(ValueError, match="several files for the same case"):
        load_prediction_folder(tmp_path, [1])
    save_volume(tmp_path / "0003.nii.gz", np.full((4, 4, 4), 0.5, np.float32), AFFINE)
    with pytest.raises(ValueError, match="fractional values"):
        load_prediction_folder(tmp_path, [3])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_prediction_folder(tmp_path / "nope", [1])


def test_prediction_in_another_orientation_with_the_same_shape_is_refused(tmp_path):
    """Matching by shape alone would read a mirrored prediction as if it lay on the CT grid."""
    from refnet.io import read_affine

    labels = _volume(0)[1]
    mirrored = AFFINE @ np.diag([-1.0, 1.0, 1.0, 1.0])
    mirrored[0, 3] = AFFINE[0, 3] + AFFINE[0, 0] * (labels.shape[0] - 1)
    save_volume(tmp_path / "label0001.nii.gz", labels[::-1], mirrored)
    np.testing.assert_allclose(read_affine(tmp_path / "label0001.nii.gz"), mirrored)
    with pytest.raises(ValueError, match=r"(?s)label0001.nii.gz: its affine differs from the CT.s.*same orientation"):
        load_prediction_folder(tmp_path, [1], affines={1: AFFINE})
    np.testing.assert_array_equal(load_prediction_folder(tmp_path, [1], affines={1: mirrored})[1], labels[::-1])


def test_read_affine_of_nrrd_matches_load_volume(tmp_path):
    from refnet.io import read_affine

    path = save_volume(tmp_path / "x.nrrd", _volume(0)[1], AFFINE)
    np.testing.assert_allclose(read_affine(path), load_volume(path).affine)


def test_model_spacing_resamples_the_ct_and_brings_the_logits_back():
    """A model at spacing_mm predicts a fine CT as if given the CT on its own grid, then back on the CT's voxels."""
    import torch.nn.functional as F

    fine_ct, fine_labels = _volume(0, (32, 24, 16))  # 1 x 1 x 2 mm voxels
    coarse = replace(TINY_UNET, patch_size=(16, 16, 8))
    at_2mm = replace(coarse, spacing_mm=(2.0, 2.0, 4.0))
    net = train_segmenter([(fine_ct, fine_labels)], at_2mm, spacings=[(1.0, 1.0, 2.0)])
    logits = predict_segmenter_logits(net, fine_ct, at_2mm, spacing=(1.0, 1.0, 2.0))
    assert logits.shape == (NUM_CLASSES, 32, 24, 16)
    # The same net on the CT resampled by hand to 16 x 12 x 8 voxels, logits resampled back by hand.
    small = F.interpolate(torch.from_numpy(fine_ct)[None, None], size=(16, 12, 8), mode="trilinear",
                          align_corners=False)[0, 0].numpy()
    by_hand = F.interpolate(torch.from_numpy(predict_segmenter_logits(net, small, coarse))[None], size=(32, 24, 16),
                            mode="trilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(logits, by_hand, atol=1e-5)
    # Training resampled the case the same way: the same weights as training on the hand-resampled case.
    small_labels = F.interpolate(torch.from_numpy(fine_labels)[None, None], size=(16, 12, 8),
                                 mode="nearest")[0, 0].numpy()
    twin = train_segmenter([(small, small_labels)], coarse)
    for a, b in zip(net.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b)
    # The label map is taken a few slices at a time, and is the argmax of those very logits.
    labels = predict_segmenter(net, fine_ct, at_2mm, spacing=(1.0, 1.0, 2.0))
    np.testing.assert_array_equal(labels, logits.argmax(axis=0))


@pytest.mark.parametrize("model_shape, shape", [((5, 4, 3), (17, 9, 20)), ((6, 6, 11), (12, 12, 4)),
                                                ((4, 4, 1), (8, 8, 9)), ((4, 4, 7), (4, 4, 7))])
def test_logits_come_back_to_the_ct_a_chunk_at_a_time_as_one_trilinear_resize(model_shape, shape):
    from refnet.segmenters import _native_slices, _resize

    logits = torch.randn(NUM_CLASSES, *model_shape, generator=torch.Generator().manual_seed(0))
    chunks = list(_native_slices(logits, shape, chunk=3))
    assert [k0 for k0, _ in chunks] == list(range(0, shape[2], 3))
    whole = torch.cat([c for _, c in chunks], dim=-1)
    torch.testing.assert_close(whole, _resize(logits, shape, "trilinear"), atol=1e-5, rtol=1e-5)


def test_model_spacing_needs_the_ct_spacing():
    ct, labels = _volume(0)
    config = replace(TINY_UNET, spacing_mm=(2.0, 2.0, 4.0))
    with pytest.raises(ValueError, match=r"runs at \(2.0, 2.0, 4.0\) mm: pass spacings\[0\]"):
        train_segmenter([(ct, labels)], config)
    with pytest.raises(ValueError, match="spacings has 2 entries for 1 cases"):
        train_segmenter([(ct, labels)], config, spacings=[(1, 1, 1), (1, 1, 1)])
    net = build_segmenter(config)
    with pytest.raises(ValueError, match=r"runs at \(2.0, 2.0, 4.0\) mm: pass spacing"):
        predict_segmenter(net, ct, config)
    with pytest.raises(ValueError, match="spacing must be 3 positive mm values"):
        predict_segmenter(net, ct, config, spacing=(1.0, 0.0, 1.0))
    for bad in ((2.0, 2.0), (2.0, -1.0, 4.0), (2.0, float("nan"), 4.0)):
        with pytest.raises(ValueError, match=r"spacing_mm must be 3 positive mm values"):
            replace(TINY_UNET, spacing_mm=bad)
    assert SegmenterConfig.from_dict(config.to_dict()) == config  # through a checkpoint's dict
    old = {k: v for k, v in TINY_UNET.to_dict().items() if k != "spacing_mm"}  # a checkpoint from before the field
    assert SegmenterConfig.from_dict(old).spacing_mm is None
