"""The position planes: offsets from the labelled centroid, the same in any field of view, and fed to the net."""

import numpy as np
import pytest
import torch
from refnet.checkpoint import load_model, save_model
from refnet.model import RefNet, RefNetConfig
from refnet.position import POSITION_SCALE_MM, position_planes
from refnet.refine import _aux_slab, refine_labels
from refnet.train import TrainConfig, TrainingPair, _Sampler, sample_batch, train_refnet

from .conftest import TEST_MODEL_GUARDS, TINY_FEATURES


def _labels() -> np.ndarray:
    labels = np.zeros((40, 30, 6), np.uint8)
    labels[10:20, 5:15, 1:5] = 6  # centroid row 14.5, column 9.5
    return labels


def test_planes_are_mm_offsets_from_the_labelled_centroid():
    planes = position_planes(_labels(), (2.0, 3.0, 5.0))
    assert planes.shape == (40, 30, 2) and planes.dtype == np.float32
    np.testing.assert_allclose(planes[:, 0, 0], (np.arange(40) - 14.5) * 2.0 / POSITION_SCALE_MM, rtol=1e-6)
    np.testing.assert_allclose(planes[0, :, 1], (np.arange(30) - 9.5) * 3.0 / POSITION_SCALE_MM, rtol=1e-6)
    far = position_planes(_labels(), (20.0, 20.0, 5.0))
    assert far.min() == -1.0 and far.max() == 1.0  # clipped
    assert not position_planes(np.zeros((4, 4, 2), np.uint8), (1.0, 1.0, 1.0)).any()


def test_planes_follow_the_anatomy_not_the_field_of_view():
    labels = _labels()
    padded = np.pad(labels, ((7, 3), (5, 0), (2, 2)))
    np.testing.assert_allclose(position_planes(padded, (2.0, 3.0, 5.0))[7:-3, 5:],
                               position_planes(labels, (2.0, 3.0, 5.0)), atol=1e-6)


def test_refinement_and_training_hand_the_net_the_same_planes():
    labels = _labels()
    planes = position_planes(labels, (1.0, 1.0, 1.0))
    aux = _aux_slab(None, None, planes, np.array([2, 3]))
    assert aux.shape == (2, 2, 40, 30)
    np.testing.assert_array_equal(aux[1, 0], planes[..., 0])
    cfg = TrainConfig(model=RefNetConfig(features=TINY_FEATURES, position_channels=True), batch_size=8,
                      crop_size=16, spacing_mm=None, device="cpu")
    sampler = _Sampler([TrainingPair(raw=labels, target=labels, case_id=0)], position=True)
    rng = np.random.default_rng(0)
    centre = _Sampler([TrainingPair(raw=labels, target=labels, case_id=0)]).centre(np.random.default_rng(0))[1]
    crops = sample_batch(sampler, cfg, rng)[3]
    assert crops.shape == (8, 2, 16, 16)
    ci, cj = centre[:2]  # the first crop is centred where the sampler's first draw falls
    np.testing.assert_allclose(crops[0, :, 8, 8], planes[ci, cj], rtol=1e-6)


def test_a_position_model_trains_refines_and_says_what_it_needs(tmp_path):
    labels = _labels()
    cfg = TrainConfig(model=RefNetConfig(features=TINY_FEATURES, position_channels=True), optimizer="adam",
                      lr=1e-3, epochs=1, steps_per_epoch=2, batch_size=4, crop_size=16, val_cases=0,
                      spacing_mm=None, device="cpu")
    model = train_refnet([TrainingPair(raw=labels, target=labels, case_id=0)], cfg, work_dir=tmp_path / "w")
    assert load_model(tmp_path / "w" / "refnet.pt").net.config.position_channels
    assert refine_labels(labels, np.eye(4), model).shape == labels.shape
    net = RefNet(RefNetConfig(features=TINY_FEATURES, position_channels=True))
    with pytest.raises(ValueError, match="2 position channels"):
        net(torch.zeros((1, 3, 16, 16), dtype=torch.long))
    torch.manual_seed(0)
    untrained = RefNet(RefNetConfig(features=TINY_FEATURES, position_channels=True))
    save_model(tmp_path / "u.pt", untrained, metadata={"guards": TEST_MODEL_GUARDS})
    np.testing.assert_array_equal(refine_labels(labels, np.eye(4), load_model(tmp_path / "u.pt")), labels)
