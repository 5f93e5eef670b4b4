import json
from dataclasses import replace

import pytest
import refnet.segmenters
from refnet.checkpoint import load_model
from refnet.data.phantoms import PhantomConfig
from refnet.labels import CLASS_NAMES
from refnet.model import RefNetConfig
from refnet.pipeline import DemoConfig, report, run_demo, train_segmenters
from refnet.segmenters import SegmenterConfig
from refnet.train import TrainConfig


def _tiny_demo() -> DemoConfig:
    coarse = PhantomConfig.demo(inplane_spacing_mm=(5.0, 5.0), slice_spacing_mm=(9.0, 9.0))
    return DemoConfig(
        train_cases=3, test_cases=1, device="cpu", phantoms=coarse,
        extra_anatomy=1, extra_phantoms=replace(coarse, deform_mm=16.0, shape_jitter=1.6),
        segmenters=(SegmenterConfig.demo("unet", seed=0, steps=2, features=4, patch_size=(32, 32, 16)),
                    SegmenterConfig.demo("unet", seed=1, steps=1, features=4, patch_size=(32, 32, 16))),
        train=TrainConfig(model=RefNetConfig(features=(4, 4, 8, 8, 16, 4)), lr=1e-3, epochs=1, steps_per_epoch=2,
                          batch_size=2, crop_size=32, val_cases=1, device="cpu", simulated_pairs=1),
    )


def test_demo_end_to_end_on_tiny_phantoms(tmp_path):
    metrics = run_demo(tmp_path, _tiny_demo())
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["classes"] == list(CLASS_NAMES)
    for method in ("raw", "refined"):
        assert set(written[method]["dice"]) == set(CLASS_NAMES)
        assert 0.0 <= written[method]["mean_dice"] <= 1.0
    assert written["raw_source"] == "unet-s0-2"
    assert (tmp_path / "montage.png").stat().st_size > 0
    training = load_model(tmp_path / "refnet.pt").metadata["training"]
    assert training["pairs"] == 2 * 3 and training["extra_maps"] == 1 and training["simulated_pairs"] == 1
    assert len(list((tmp_path / "predictions").iterdir())) == 2
    assert "mean Dice (13 classes): raw" in report(metrics)
    # A second run reuses phantoms, predictions and the finished RefNet checkpoints.
    stamp = (tmp_path / "predictions" / "unet-s0-2" / "label0005.nii.gz").stat().st_mtime_ns
    again = run_demo(tmp_path, _tiny_demo())
    assert (tmp_path / "predictions" / "unet-s0-2" / "label0005.nii.gz").stat().st_mtime_ns == stamp
    assert again["refined"]["mean_dice"] == metrics["refined"]["mean_dice"]
    # Resuming with other phantoms would mix two datasets: refused before anything is written.
    with pytest.raises(ValueError, match="another seed or phantom preset"):
        run_demo(tmp_path, replace(_tiny_demo(), seed=1))


def test_base_models_leave_the_per_class_check_cases_out(tmp_path, monkeypatch):
    seen = []
    real = refnet.segmenters.train_segmenter

    def spy(cases, config, **kw):
        seen.append(len(cases))
        return real(cases, config, **kw)

    monkeypatch.setattr(refnet.segmenters, "train_segmenter", spy)
    cfg = _tiny_demo()
    run_demo(tmp_path, cfg)
    assert seen == [cfg.train_cases - cfg.train.val_cases] * 2  # each base model: 3 cases minus the 1 held out
    # The held-out case is still predicted (RefNet's check scores those predictions).
    assert (tmp_path / "predictions" / "unet-s0-2" / "label0007.nii.gz").exists()
    with pytest.raises(ValueError, match="no training case left"):
        train_segmenters(tmp_path / "data", tmp_path / "again", cfg.segmenters[:1], holdout=[5, 6, 7])
