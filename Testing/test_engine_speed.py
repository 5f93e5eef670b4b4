"""The engine's speed work changes no output: each shortcut against the plain computation it replaced.

Embedding each slice once, the identity term without a one-hot, channels-last convolutions, the
label resampling over present classes only, the slab-wise guards and the projection-based box must
give what the straightforward code gives (CPU fp32); bf16 autocast stays within a stated tolerance.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import refnet.refine as refine_module
import torch
import torch.nn.functional as F
from refnet.checkpoint import LoadedModel, load_model
from refnet.data.phantoms import PhantomConfig, make_phantom
from refnet.error_simulator import simulate_errors
from refnet.guards import GuardConfig, _boundary, limit_to_band
from refnet.model import RefNet, RefNetConfig
from refnet.refine import (
    RefineConfig,
    auto_batch_size,
    labelled_extent,
    present_classes,
    refine_labels,
    refine_volume,
    resolve_precision,
)
from refnet.spacing import InPlaneGrid, _coords, _sample, _source_block, resample_labels, voxel_spacing
from refnet.train import _crop


def _net(**kw) -> RefNet:
    torch.manual_seed(0)
    net = RefNet(RefNetConfig(features=(4, 4, 8, 8, 16, 4), **kw)).eval()
    torch.nn.init.normal_(net.unet.final_conv.weight, std=1.0)
    return net


@pytest.mark.parametrize("ct_channels", [0, 1])
def test_embedding_each_slice_once_gives_the_same_logits(ct_channels):
    net = _net(ct_channels=ct_channels)
    slices = torch.randint(0, 13, (6, 32, 48))
    index = torch.tensor([[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]])
    ct = torch.rand(4, 1, 32, 48) if ct_channels else None
    with torch.no_grad():
        expected = net(slices[index], ct)
        assert torch.equal(net.forward_slices(slices, index, ct), expected)


def test_identity_term_is_the_scaled_one_hot_of_the_centre_slice():
    net = _net()
    labels = torch.randint(0, 13, (3, 3, 32, 32))
    with torch.no_grad():
        b, s, h, w = labels.shape
        x = net.embedding(labels).permute(0, 1, 4, 2, 3).reshape(b, s * 8, h, w)
        one_hot = F.one_hot(labels[:, 1], 13).permute(0, 3, 1, 2).float()
        assert torch.equal(net(labels), net.unet(x) + net.config.identity_scale * one_hot)


def _resample_all_classes(volume, grid, span, *, num_classes):
    """The resampling before the speed work: a one-hot of every class, 16 slices at a time."""
    (u0, u1), (v0, v1) = span
    out = np.zeros((u1 - u0, v1 - v0, volume.shape[2]), dtype=np.uint8)
    if grid.identity:
        return resample_labels(volume, grid, span, num_classes=num_classes)
    rows = _coords(u0, u1, grid.scale[0], to_model=False)
    cols = _coords(v0, v1, grid.scale[1], to_model=False)
    (a0, a1), (b0, b1) = _source_block(rows, volume.shape[0]), _source_block(cols, volume.shape[1])
    for k0 in range(0, volume.shape[2], 16):
        block = torch.from_numpy(np.ascontiguousarray(volume[a0:a1, b0:b1, k0 : k0 + 16]).astype(np.int64))
        onehot = (block.permute(2, 0, 1)[:, None] == torch.arange(num_classes).view(1, -1, 1, 1)).float()
        probs = _sample(onehot, rows, cols, (a0, b0), "bilinear", "zeros")
        out[:, :, k0 : k0 + 16] = probs.max(dim=1).indices.permute(1, 2, 0).to(torch.uint8).numpy()
    return out


@pytest.mark.parametrize("scale", [0.45, 1.0, 1.87, 2.5])
def test_resampling_over_present_classes_equals_all_classes(scale):
    rng = np.random.default_rng(1)
    vol = np.zeros((70, 60, 40), np.uint8)
    for c in (3, 6, 9, 12):  # a few classes, some slices without any: the reduced one-hot has work to skip
        i, j, k = rng.integers(8, 50, 3)
        vol[i - 6 : i + 6, j - 5 : j + 7, max(0, k - 20) : k] = c
    vol[rng.random(vol.shape) < 0.02] = 5  # speckle: ties between classes at equal weights
    grid = InPlaneGrid(vol.shape[:2], (scale, scale))
    span = ((-2, grid.shape[0] + 3), (-1, grid.shape[1] + 2))
    np.testing.assert_array_equal(resample_labels(vol, grid, span, num_classes=13),
                                  _resample_all_classes(vol, grid, span, num_classes=13))


def _plain_logits(model, labels, ct=None, *, index=None, **_):
    """Inference before the speed work: the full slab of every sample, int64, contiguous, fp32."""
    slab = labels if index is None else np.asarray(labels)[np.asarray(index)]
    with torch.no_grad():
        return model.net(torch.as_tensor(slab.astype(np.int64)), None if ct is None else torch.as_tensor(ct)).float()


def _phantom_prediction():
    ph = make_phantom(3, PhantomConfig.demo())
    raw = simulate_errors(ph.labels, voxel_spacing(ph.affine), np.random.default_rng(0))
    return raw, ph.affine


@pytest.mark.parametrize("scramble", [False, True], ids=["shipped", "scrambled"])
def test_the_engine_refines_exactly_as_plain_fp32_inference(monkeypatch, scramble):
    # the shipped model as users get it, and (changing thousands of voxels, so every path has work) the
    # shipped model with a noisy last layer and no guards
    model, guards = (_scrambling_model(), GuardConfig.off()) if scramble else (load_model(device="cpu"), GuardConfig())
    raw, affine = _phantom_prediction()
    fast = refine_labels(raw, affine, model, config=RefineConfig(guards=guards))
    assert (fast != raw).sum() > (1000 if scramble else 0)
    monkeypatch.setattr(refine_module, "predict_logits", _plain_logits)
    monkeypatch.setattr(refine_module, "resample_labels", _resample_all_classes)
    plain = refine_labels(raw, affine, model, config=RefineConfig(batch_size=8, guards=guards))
    # fp32 convolutions at another batch size and memory layout run other kernels (which ones depends on the
    # CPU), so a voxel whose two best classes tie to ~1e-6 may flip (1 of 967932 on an AMD EPYC with the
    # scrambled net); a wrong path changes thousands (the scrambled net changes > 1000 against raw).
    differ = int((fast != plain).sum())
    assert differ <= 1e-5 * fast.size, f"{differ} of {fast.size} voxels differ from plain fp32 inference"


def test_bf16_autocast_on_cpu_stays_within_tolerance():
    # The stated tolerance of mixed precision: probabilities within 0.02 of fp32 (measured 0.004 here), and
    # the shipped model's refined labels differ on at most 0.1% of the voxels (none here).
    model = load_model(device="cpu")
    raw, affine = _phantom_prediction()
    slices = np.moveaxis(raw[:, :, 10:16], 2, 0)
    index = np.array([[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]])
    fp32 = torch.softmax(refine_module.predict_logits(model, slices, index=index), dim=1)
    bf16 = torch.softmax(refine_module.predict_logits(model, slices, index=index, precision="bf16"), dim=1)
    assert float((fp32 - bf16).abs().max()) <= 0.02
    labels = refine_labels(raw, affine, model, config=RefineConfig(precision="bf16"))
    assert np.mean(labels != refine_labels(raw, affine, model)) <= 1e-3


def test_precision_choice_and_refusals():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="fp16 runs only on a CUDA GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision must be one of"):
        RefineConfig(precision="int8")


def test_compiled_unet_gives_the_same_labels(tiny_model):
    lab = np.zeros((40, 36, 10), np.uint8)
    lab[10:30, 8:28, 2:8] = 6
    lab[14:20, 12:18, 3:7] = 2
    eager = refine_labels(lab, np.eye(4), tiny_model)
    compiled = refine_labels(lab, np.eye(4), tiny_model, config=RefineConfig(compile="eager"))  # dynamo, no C++
    np.testing.assert_array_equal(compiled, eager)


def test_a_compile_failure_falls_back_to_eager(tiny_model, caplog, monkeypatch):
    class Broken:
        def __init__(self, *a, **k):
            pass

        def __call__(self, x):
            raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda *a, **k: Broken())
    monkeypatch.setattr(refine_module, "_COMPILED", type(refine_module._COMPILED)())
    lab = np.zeros((24, 24, 6), np.uint8)
    lab[6:18, 6:18, 1:5] = 6
    expected = refine_labels(lab, np.eye(4), tiny_model)
    np.testing.assert_array_equal(refine_labels(lab, np.eye(4), tiny_model, config=RefineConfig(compile=True)),
                                  expected)
    assert "running eagerly" in caplog.text


def test_auto_batch_size_follows_free_memory(tiny_model):
    assert auto_batch_size((288, 288), tiny_model, None) == 4  # CPU
    small = auto_batch_size((512, 512), tiny_model, 50 * 2**20)
    large = auto_batch_size((512, 512), tiny_model, 40 * 2**30)
    assert 1 <= small < large <= 64
    assert auto_batch_size((512, 512), tiny_model, 1) == 1


def test_box_and_present_classes_match_numpy():
    rng = np.random.default_rng(2)
    vol = np.zeros((30, 40, 50), np.uint8)
    vol[5:9, 11:30, 17:41] = rng.integers(0, 13, (4, 19, 24))
    nz = np.nonzero(vol)
    assert labelled_extent(vol) == [(int(i.min()), int(i.max()) + 1) for i in nz]
    np.testing.assert_array_equal(present_classes(vol, 13), np.bincount(vol.ravel(), minlength=13) > 0)


def _band_whole_box(raw, refined, spacing, band_mm):
    """The band guard before the speed work: one distance transform over the whole box of changes."""
    from scipy import ndimage

    changed = raw != refined
    pad = [int(np.ceil(band_mm / s)) + 1 for s in spacing]
    nz = np.nonzero(changed)
    box = tuple(slice(max(0, int(i.min()) - p), min(n, int(i.max()) + 1 + p)) for i, p, n in zip(nz, pad, raw.shape))
    edge = _boundary(raw[box])
    far = np.ones(raw.shape, dtype=bool)
    far[box] = ndimage.distance_transform_edt(~edge, sampling=spacing) > band_mm
    undo = far & changed
    return np.where(undo, raw, refined), int(undo.sum())


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5), (1.5, 1.5, 0.7)])
def test_slabwise_band_guard_equals_one_distance_transform(spacing):
    rng = np.random.default_rng(3)
    raw = np.zeros((30, 28, 90), np.uint8)  # deeper than a slab of the guard: several slabs and their pads
    raw[6:22, 5:20, 10:80] = 6
    raw[12:16, 9:14, 30:60] = 2
    refined = raw.copy()
    refined[rng.random(raw.shape) < 0.05] = 6
    out, held = limit_to_band(raw, refined, spacing, 4.0)
    ref, ref_held = _band_whole_box(raw, refined, spacing, 4.0)
    np.testing.assert_array_equal(out, ref)
    assert held == ref_held > 0


def _scrambling_model() -> LoadedModel:
    """The shipped model with a noisy last layer and no confidence bar: it changes voxels everywhere, the
    worst case for the memory of the box arrays and the guards."""
    model = load_model(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.net.unet.final_conv.weight.normal_(0, 0.5)
    meta = {**model.metadata, "guards": {**model.metadata["guards"], "class_thresholds": [0.0] * 13}}
    return LoadedModel(model.net, meta, model.device)


def _numpy_peak(model, depth: int) -> int:
    rng = np.random.default_rng(0)
    lab = np.zeros((96, 96, depth), np.uint8)
    for c in range(1, 13):
        i, j = rng.integers(12, 84, 2)
        lab[i - 8 : i + 8, j - 8 : j + 8, :] = c
    tracemalloc.start()
    try:
        refine_volume(lab, np.diag([1.5, 1.5, 2.5, 1.0]), model,
                      config=RefineConfig(guards=GuardConfig(class_check=False)))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_per_extra_slice_stays_a_few_bytes_per_voxel():
    # Dense box arrays (raw, candidate, float32 confidence, result) take about 8 bytes per voxel; before the
    # slab-wise guards the distance transform over the whole box added about 45 more.
    model = _scrambling_model()
    extra = _numpy_peak(model, 160) - _numpy_peak(model, 80)
    assert extra / (96 * 96 * 80) < 12


def test_edge_crops_equal_padding_the_volume():
    rng = np.random.default_rng(4)
    vol = rng.integers(0, 13, (40, 30, 5)).astype(np.uint8)
    for ci, cj in [(0, 0), (39, 29), (20, 15), (2, 28), (-5, 40)]:
        lo_i, lo_j = ci - 8, cj - 8
        pad = ((max(0, -lo_i), max(0, lo_i + 16 - 40)), (max(0, -lo_j), max(0, lo_j + 16 - 30)), (0, 0))
        padded = np.pad(vol, pad, mode="edge")
        expected = padded[lo_i + pad[0][0] : lo_i + pad[0][0] + 16, lo_j + pad[1][0] : lo_j + pad[1][0] + 16]
        np.testing.assert_array_equal(_crop(vol, ci, cj, 16), expected)
