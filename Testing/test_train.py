import json

import numpy as np
import pytest
import torch
from refnet.checkpoint import load_model
from refnet.model import RefNetConfig
from refnet.train import TrainConfig, TrainingPair, _gate, _Sampler, sample_batch, train_refnet, validation_cases
from scipy import ndimage

TINY = RefNetConfig(features=(4, 4, 8, 8, 16, 4))


def _pair(seed, shape=(32, 32, 6)):
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, np.uint8)
    ii, jj = np.mgrid[: shape[0], : shape[1]]
    for c, (ci, cj, r) in enumerate([(10, 10, 6), (22, 22, 5), (22, 8, 2)], start=1):
        gt[((ii - ci) ** 2 + (jj - cj) ** 2 < r * r)[..., None] & (np.arange(shape[2]) > 0)] = [6, 1, 12][c - 1]
    edge = ndimage.binary_dilation(gt > 0) & ~ndimage.binary_erosion(gt > 0)
    raw = np.where(edge & (rng.random(shape) < 0.5), 0, gt).astype(np.uint8)
    return TrainingPair(raw=raw, target=gt, case_id=seed, source="m")


def _config(**kw):
    base = dict(model=TINY, optimizer="adam", lr=1e-3, epochs=2, steps_per_epoch=3, batch_size=4, crop_size=32,
                val_cases=1, device="cpu", spacing_mm=None)
    return TrainConfig(**{**base, **kw})


def test_sample_batch_shapes_and_class_balance():
    pairs = [_pair(0), _pair(1)]
    cfg = _config(batch_size=64)
    labels, target, raw, ct = sample_batch(_Sampler(pairs), cfg, np.random.default_rng(0))
    assert labels.shape == (64, 3, 32, 32) and target.shape == (64, 32, 32) and ct is None
    np.testing.assert_array_equal(raw, labels[:, 1])
    # The small adrenal disc (class 12) is a crop centre about a third of the time, so it is in most crops.
    assert (target == 12).any(axis=(1, 2)).mean() > 0.25


def test_train_writes_model_log_and_resumes(tmp_path):
    pairs = [_pair(s) for s in range(3)]
    model = train_refnet(pairs, _config(), work_dir=tmp_path / "w")
    assert (tmp_path / "w" / "refnet.pt").exists() and (tmp_path / "w" / "last.pt").exists()
    log = [json.loads(line) for line in (tmp_path / "w" / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in log) and "val_refined" in log[0]
    loaded = load_model(tmp_path / "w" / "refnet.pt")
    assert loaded.metadata["training"]["val_cases"] == [2]
    assert 0 in loaded.metadata["refine_classes"]
    assert model.metadata["validation_gated"]["refined"]["mean_dice"] is not None
    # Resume: a longer run continues from epoch 2 instead of starting again.
    train_refnet(pairs, _config(epochs=3), work_dir=tmp_path / "w")
    log = [json.loads(line) for line in (tmp_path / "w" / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]


def test_training_is_seeded(tmp_path):
    pairs = [_pair(s) for s in range(3)]
    a = train_refnet(pairs, _config(val_cases=0, epochs=1), work_dir=tmp_path / "a")
    b = train_refnet(pairs, _config(val_cases=0, epochs=1), work_dir=tmp_path / "b")
    for (ka, va), (_, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_training_learns_to_fill_ragged_edges(tmp_path):
    torch.manual_seed(0)
    pairs = [_pair(s) for s in range(4)]
    # raw_weight=0: with w = 1, CE(P, S) and CE(P, GT) cancel where they disagree and only Dice can flip a voxel.
    # edge_mm=0: the organs run through the top slice, so the edge guard would freeze this whole 6-slice volume
    cfg = _config(epochs=3, steps_per_epoch=30, batch_size=8, val_cases=1, lr=3e-3, raw_weight=0.0, edge_mm=0.0)
    model = train_refnet(pairs, cfg, work_dir=tmp_path / "w")
    learned = model.metadata["validation"]  # the best epoch at the lowest threshold: the net learned to fill
    assert learned["refined"]["mean_dice"] > learned["raw"]["mean_dice"]
    # The chosen threshold never trades harm to correct maps for gain: the gated result is at least raw.
    gated = model.metadata["validation_gated"]
    assert gated["refined"]["mean_dice"] >= gated["raw"]["mean_dice"]
    # Each class's threshold keeps its held-out ground truth within max_harm and, among those, gains most.
    table = model.metadata["threshold_choice"]
    for c, t in enumerate(model.metadata["guards"]["class_thresholds"]):
        ok = [r for r in table if r["harm"][c] <= cfg.max_harm]
        if not ok:
            assert t == 1.0
            continue
        best = max(ok, key=lambda r: (r["gain"][c] - r["harm"][c], r["threshold"]))
        assert t == best["threshold"]


def test_simulated_pairs_come_from_training_cases_only_and_are_seeded(tmp_path):
    from refnet.error_simulator import PLAUSIBLE_VARIATION
    from refnet.train import _simulated_pairs

    pairs = [_pair(s) for s in range(3)]
    sim = _simulated_pairs(pairs, 2, TrainConfig().errors, seed=0)
    assert [(p.case_id, p.source) for p in sim] == [(c, f"simulated_{n}") for c in range(3) for n in range(2)]
    assert all(np.array_equal(p.target, pairs[p.case_id].target) for p in sim)
    assert any((p.raw != p.target).any() for p in sim)
    again = _simulated_pairs(pairs, 2, TrainConfig().errors, seed=0)
    assert all(np.array_equal(a.raw, b.raw) for a, b in zip(sim, again))
    plausible = _simulated_pairs(pairs, 1, PLAUSIBLE_VARIATION, seed=0, plausible=True)
    assert all(np.array_equal(p.raw, p.target) for p in plausible)  # a correct variant is its own target
    assert any((p.target != pairs[p.case_id].target).any() for p in plausible)
    model = train_refnet(pairs, _config(simulated_pairs=2, plausible_pairs=1, epochs=1), work_dir=tmp_path)
    assert model.metadata["training"]["simulated_pairs"] == 2 and model.metadata["training"]["plausible_pairs"] == 1
    assert model.metadata["training"]["val_cases"] == [2]


def test_extra_maps_train_but_are_never_held_out(tmp_path):
    pairs = [_pair(s) for s in range(3)]
    extra = [TrainingPair(raw=_pair(9).target, target=_pair(9).target, case_id=100 + i, source="x") for i in range(2)]
    model = train_refnet(pairs, _config(simulated_pairs=1, epochs=1), work_dir=tmp_path / "a", extra_maps=extra)
    assert model.metadata["training"]["extra_maps"] == 2
    assert model.metadata["training"]["val_cases"] == [2]  # the held-out case is a dataset case, not an extra map
    with pytest.raises(ValueError, match="case ids that the training pairs do not use"):
        train_refnet(pairs, _config(), work_dir=tmp_path / "b", extra_maps=[pairs[0]])


def test_gate_drops_only_classes_that_got_worse():
    raw = [1.0] + [0.8] * 12
    ref = [1.0] + [0.85] * 12
    ref[10], ref[12] = 0.5, 0.799
    assert _gate({"raw_per_class": raw, "refined_per_class": ref}, 0.0) == [0, *range(1, 10), 11]
    assert 12 in _gate({"raw_per_class": raw, "refined_per_class": ref}, -0.005)
    assert _gate({"raw_per_class": raw, "refined_per_class": ref}, 0.1) == [0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"optimizer": "sgd"}, "optimizer must be one of"), ({"crop_size": 40}, "multiple of 16"),
     ({"lr": 0}, "must be positive"), ({"val_cases": -1}, "val_cases"),
     ({"simulated_pairs": -1}, "simulated_pairs and plausible_pairs must be >= 0"),
     ({"plausible_pairs": -1}, "plausible_pairs must be >= 0")],
)
def test_config_ill_opts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(**kwargs)


def test_pair_and_split_errors(tmp_path):
    with pytest.raises(ValueError, match="must be 3D arrays of one shape"):
        TrainingPair(raw=np.zeros((2, 2, 2)), target=np.zeros((2, 2, 3)), case_id=1)
    with pytest.raises(ValueError, match="leaves no training case"):
        train_refnet([_pair(0)], _config(val_cases=1), work_dir=tmp_path)
    with pytest.raises(ValueError, match="takes the CT"):
        train_refnet([_pair(0), _pair(1)], _config(model=RefNetConfig(features=TINY.features, ct_channels=1)),
                     work_dir=tmp_path)


def test_validation_cases_are_the_last_ids_and_match_the_training_split(tmp_path):
    assert validation_cases([9, 5, 7, 6, 5], 2) == [7, 9]
    assert validation_cases([1, 2], 0) == []
    with pytest.raises(ValueError, match="leaves no training case"):
        validation_cases([1, 2], 2)
    with pytest.raises(ValueError, match=">= 0"):
        validation_cases([1, 2], -1)
    model = train_refnet([_pair(i) for i in (4, 1, 3)], _config(val_cases=1), work_dir=tmp_path)
    assert model.metadata["training"]["val_cases"] == validation_cases([4, 1, 3], 1) == [4]


def test_label_maps_without_ct_load_as_canonical_identity_pairs(tmp_path):
    from refnet.io import save_volume
    from refnet.pairs import EXTRA_LABELS_IDS, load_label_maps

    gt = _pair(0).target
    (tmp_path / "ras").mkdir()
    (tmp_path / "lps").mkdir()
    flare = np.where(gt == 6, 1, np.where(gt == 1, 3, 0)).astype(np.uint8)  # FLARE22: liver 1, spleen 3
    save_volume(tmp_path / "ras" / "b.nii.gz", flare, np.diag([0.8, 0.8, 2.5, 1.0]))
    save_volume(tmp_path / "ras" / "a.nii.gz", flare, np.diag([0.8, 0.8, 2.5, 1.0]))
    (tmp_path / "ras" / "notes.txt").write_text("not a volume")
    pairs = load_label_maps(tmp_path / "ras", scheme="flare22")
    assert [p.source for p in pairs] == ["a.nii.gz", "b.nii.gz"]
    assert [p.case_id for p in pairs] == [EXTRA_LABELS_IDS, EXTRA_LABELS_IDS + 1]
    assert all(np.array_equal(p.raw, p.target) for p in pairs)
    np.testing.assert_array_equal(pairs[0].target, np.where(gt == 12, 0, gt))  # read as RefNet classes
    save_volume(tmp_path / "lps" / "c.nii.gz", gt, np.diag([-0.8, -0.8, 2.5, 1.0]))
    (lps,) = load_label_maps(tmp_path / "lps")
    np.testing.assert_array_equal(lps.target, gt[::-1, ::-1])  # brought to canonical RAS
    assert np.all(np.diag(lps.affine)[:3] > 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no label maps"):
        load_label_maps(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_label_maps(tmp_path / "nope")
