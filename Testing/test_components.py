"""The component-size channel: what it encodes, that refinement and training compute it alike, and that it
carries 3D connectivity a 2D slab cannot show."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from refnet.checkpoint import load_model, save_model
from refnet.components import component_map, decode_component_map
from refnet.guards import GuardConfig
from refnet.model import RefNet, RefNetConfig
from refnet.refine import RefineConfig, refine_labels
from refnet.train import TrainConfig, TrainingPair, _Sampler, sample_batch, train_refnet

from .conftest import TEST_MODEL_GUARDS, TINY_FEATURES


def _scene() -> np.ndarray:
    labels = np.zeros((40, 40, 20), np.uint8)
    labels[5:20, 5:20, 4:16] = 6  # liver, 2700 voxels
    labels[10:12, 10:12, 8:10] = 0  # an enclosed hole of 8 voxels
    labels[30:32, 30:32, 8:10] = 6  # a detached liver speck of 8 voxels
    labels[25:35, 5:13, 5:13] = 12  # one adrenal gland, 640 voxels
    labels[25:35, 20:28, 5:13] = 12  # and the other, as big
    return labels


def test_component_map_reads_largest_pieces_high_and_specks_and_holes_low():
    m = decode_component_map(component_map(_scene(), 13))
    assert m[6, 6, 6] == 1.0  # the liver itself
    assert m[30, 30, 8] == pytest.approx(1 + np.log10(8 / 2700) / 3, abs=1 / 255)  # the speck: about 0.16
    assert m[26, 6, 6] == 1.0 and m[26, 21, 6] == 1.0  # two glands of one size: both read as a largest piece
    labelled = int((_scene() > 0).sum())
    assert m[10, 10, 8] == pytest.approx(1 + np.log10(8 / labelled) / 3, abs=1 / 255)  # the hole
    assert m[0, 0, 0] == 1.0 and m[39, 39, 19] == 1.0  # the outside


def test_component_map_is_the_same_in_a_box_with_background_around_the_labels():
    labels = _scene()
    whole = component_map(labels, 13)
    box = (slice(3, 38), slice(2, 36), slice(3, 17))  # one background voxel or more on every side
    np.testing.assert_array_equal(component_map(labels[box], 13), whole[box])
    padded = np.pad(labels, 7)  # a bigger field of view: the outside grows, nothing else changes
    np.testing.assert_array_equal(component_map(padded, 13)[7:-7, 7:-7, 7:-7], whole)


def test_component_map_refuses_a_2d_array():
    with pytest.raises(ValueError, match="3D label map"):
        component_map(np.zeros((4, 4), np.uint8), 13)


def _component_model(path, perturb=True):
    torch.manual_seed(0)
    # perturbed: no identity start, a random last layer, so every input channel moves the labels
    net = RefNet(RefNetConfig(features=TINY_FEATURES, component_channel=True, identity_scale=0.0 if perturb else 4.0))
    assert net.unet.conv_0.conv_0.conv.in_channels == 3 * 8 + 1
    if perturb:
        torch.nn.init.normal_(net.unet.final_conv.weight, std=2.0)
        with torch.no_grad():
            net.unet.conv_0.conv_0.conv.weight[:, -1] *= 100.0  # the component channel weighs heavily
    save_model(path, net, metadata={"guards": TEST_MODEL_GUARDS})
    return load_model(path)


def test_untrained_component_model_returns_its_input(tmp_path):
    model = _component_model(tmp_path / "m.pt", perturb=False)
    labels = _scene()
    np.testing.assert_array_equal(refine_labels(labels, np.eye(4), model), labels)


def test_component_model_sees_connectivity_beyond_its_slab(tmp_path):
    """Two maps equal on slices 0-9, differing only above: the speck on slices 8-9 is detached in one
    and part of a large liver in the other. Only a net given the component map can tell them apart there."""
    detached = _scene()
    joined = detached.copy()
    joined[30:32, 30:32, 10:20] = 6  # the speck now runs up to a big block of liver on slices 16-19
    joined[24:38, 24:38, 16:20] = 6
    assert np.array_equal(detached[:, :, :10], joined[:, :, :10])
    config = RefineConfig(guards=GuardConfig.off())
    affine = np.diag([1.0, 1.0, 5.0, 1.0])  # 5 mm slices: the context slices are the adjacent ones
    model = _component_model(tmp_path / "c.pt")
    a = refine_labels(detached, affine, model, config=config)
    b = refine_labels(joined, affine, model, config=config)
    assert not np.array_equal(a[:, :, 8], b[:, :, 8])
    torch.manual_seed(0)
    plain = RefNet(RefNetConfig(features=TINY_FEATURES, identity_scale=0.0))
    torch.nn.init.normal_(plain.unet.final_conv.weight, std=2.0)
    save_model(tmp_path / "p.pt", plain, metadata={"guards": TEST_MODEL_GUARDS})
    label_only = load_model(tmp_path / "p.pt")
    # slice 8's slab reads slices 7-9, equal in both maps: a label-only net gives slice 8 the same labels
    np.testing.assert_array_equal(refine_labels(detached, affine, label_only, config=config)[:, :, 8],
                                  refine_labels(joined, affine, label_only, config=config)[:, :, 8])


def test_component_model_without_its_channel_says_what_is_missing():
    net = RefNet(RefNetConfig(features=TINY_FEATURES, component_channel=True))
    with pytest.raises(ValueError, match="component map"):
        net(torch.zeros((1, 3, 16, 16), dtype=torch.long))


def _pair(seed):
    labels = _scene()
    raw = labels.copy()
    raw[2:4, 30:33, 2:4] = 6  # a speck the model made up
    return TrainingPair(raw=raw, target=labels, case_id=seed, source="m")


def test_training_batches_carry_the_raw_maps_component_channel():
    cfg = TrainConfig(model=RefNetConfig(features=TINY_FEATURES, component_channel=True), batch_size=32,
                      crop_size=16, spacing_mm=None, device="cpu")
    pairs = [_pair(0)]
    sampler = _Sampler(pairs, components=True)
    np.testing.assert_array_equal(sampler.components[0], component_map(pairs[0].raw, 13))
    _labels, _target, raw, aux = sample_batch(sampler, cfg, np.random.default_rng(0))
    assert aux.shape == (32, 1, 16, 16) and aux.dtype == np.float32
    assert aux.min() >= 0.0 and aux.max() == 1.0
    specks = (raw == 6) & (aux[:, 0] < 0.5)  # speck voxels read low; the liver reads 1
    assert specks.any() and not ((raw == 6) & (aux[:, 0] < 1.0) & ~specks).any()


def test_a_component_model_trains_and_keeps_its_channel_in_the_model_file(tmp_path):
    cfg = TrainConfig(model=RefNetConfig(features=TINY_FEATURES, component_channel=True), optimizer="adam",
                      lr=1e-3, epochs=1, steps_per_epoch=2, batch_size=4, crop_size=16, val_cases=1,
                      spacing_mm=None, device="cpu")
    model = train_refnet([_pair(0), _pair(1)], cfg, work_dir=tmp_path / "w")
    assert load_model(tmp_path / "w" / "refnet.pt").net.config.component_channel
    assert refine_labels(_pair(1).raw, np.eye(4), model).shape == (40, 40, 20)


def test_training_resumes_a_checkpoint_written_before_the_channel_existed(tmp_path):
    cfg = TrainConfig(model=RefNetConfig(features=TINY_FEATURES), optimizer="adam", lr=1e-3, epochs=1,
                      steps_per_epoch=1, batch_size=2, crop_size=16, val_cases=0, spacing_mm=None, device="cpu")
    train_refnet([_pair(0)], cfg, work_dir=tmp_path / "w")
    state = torch.load(tmp_path / "w" / "last.pt", weights_only=True)
    del state["config"]["component_channel"]  # as written by earlier versions
    torch.save(state, tmp_path / "w" / "last.pt")
    train_refnet([_pair(0)], replace(cfg, epochs=2), work_dir=tmp_path / "w")  # resumes: the same architecture
    with pytest.raises(ValueError, match="another RefNet architecture"):  # not as a component model, though
        train_refnet([_pair(0)], replace(cfg, epochs=3, model=replace(cfg.model, component_channel=True)),
                     work_dir=tmp_path / "w")
