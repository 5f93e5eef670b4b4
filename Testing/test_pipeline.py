import json
from dataclasses import replace

import pytest
import refnet.io
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


def test_out_of_fold_predictions_come_from_models_that_did_not_see_the_case(tmp_path, monkeypatch):
    from refnet.data.phantoms import write_phantom_dataset

    write_phantom_dataset(tmp_path / "data", [5, 6, 7, 8, 1], config=_tiny_demo().phantoms, seed=0)
    fits = []
    real = refnet.segmenters.train_segmenter

    def spy(cases, config, **kw):
        fits.append((config.name, len(cases)))
        return real(cases, config, **kw)

    monkeypatch.setattr(refnet.segmenters, "train_segmenter", spy)
    config = _tiny_demo().segmenters[0]
    folder, = train_segmenters(tmp_path / "data", tmp_path / "out", [config], holdout=[8], folds=3)
    # Training ids 5, 6, 7 (8 held out): the full model sees all 3, each fold model the other 2.
    assert fits == [("unet-s0-2", 3)] + [(f"unet-s0-2-fold{k}", 2) for k in range(3)]
    record = json.loads((folder / "predictions.json").read_text())
    assert record["predicted_by"] == {"1": "unet-s0-2", "5": "unet-s0-2-fold0", "6": "unet-s0-2-fold1",
                                      "7": "unet-s0-2-fold2", "8": "unet-s0-2"}
    assert (tmp_path / "out" / "segmenters" / "unet-s0-2-fold2.pt").exists()
    # Same settings: reused; other folds: refused instead of mixing two fold splits.
    train_segmenters(tmp_path / "data", tmp_path / "out", [config], holdout=[8], folds=3)
    assert len(fits) == 4
    with pytest.raises(ValueError, match="other settings .*folds"):
        train_segmenters(tmp_path / "data", tmp_path / "out", [config], holdout=[8], folds=2)
    with pytest.raises(ValueError, match="folds must be 0"):
        train_segmenters(tmp_path / "data", tmp_path / "new", [config], holdout=[8], folds=4)


def test_base_models_on_their_own_grid_train_and_predict_on_the_ct_voxels(tmp_path, monkeypatch):
    """A base model with spacing_mm gets each case's canonical spacing; its predictions come back on the CT grid."""
    from refnet.data.btcv import find_cases, load_case
    from refnet.geometry import to_canonical

    fine = replace(_tiny_demo().phantoms, inplane_spacing_mm=(4.0, 4.0), slice_spacing_mm=(6.0, 6.0))
    from refnet.data.phantoms import write_phantom_dataset

    write_phantom_dataset(tmp_path / "data", [5, 6, 1], config=fine, seed=0)
    config = replace(_tiny_demo().segmenters[0], spacing_mm=(8.0, 8.0, 12.0), patch_size=(16, 16, 8))
    seen = []
    real_train, real_predict = refnet.segmenters.train_segmenter, refnet.segmenters.predict_segmenter

    def spy_train(cases, cfg, **kw):
        seen.append(("train", [tuple(round(v, 3) for v in s) for s in kw["spacings"]]))
        return real_train(cases, cfg, **kw)

    def spy_predict(net, ct, cfg, **kw):
        seen.append(("predict", tuple(round(v, 3) for v in kw["spacing"])))
        return real_predict(net, ct, cfg, **kw)

    monkeypatch.setattr(refnet.segmenters, "train_segmenter", spy_train)
    monkeypatch.setattr(refnet.segmenters, "predict_segmenter", spy_predict)
    folder, = train_segmenters(tmp_path / "data", tmp_path / "out", [config])
    assert seen[0] == ("train", [(4.0, 4.0, 6.0)] * 2) and seen[1:] == [("predict", (4.0, 4.0, 6.0))] * 3
    for case in find_cases(tmp_path / "data").values():
        ct, _ = load_case(case)
        pred = refnet.io.load_volume(folder / f"label{case.case_id:04d}.nii.gz")
        assert pred.array.shape == ct.array.shape
        assert to_canonical(pred.array, pred.affine)[0].shape == to_canonical(ct.array, ct.affine)[0].shape
