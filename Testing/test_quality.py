import json
import re
from dataclasses import replace

import numpy as np
import pytest
from refnet.quality import METHODS, QualityConfig, quality_table, run_quality, save_gain_chart, summarise_quality
from refnet.segmenters import SegmenterConfig

from Testing.test_pipeline import _tiny_demo


def _tiny() -> QualityConfig:
    demo = replace(_tiny_demo(), train_cases=4, test_cases=2)
    return QualityConfig(demo=demo, folds=2, methods=METHODS, decider_epochs=20,
                         unseen=SegmenterConfig.demo("segresnet", seed=0, steps=1, features=4, patch_size=(32, 32, 16)))


def test_every_method_is_scored_on_the_same_test_cases(tmp_path):
    assert "refnet_components" not in QualityConfig().methods  # opt-in: it would take --quick past 30 min
    run = run_quality(tmp_path, _tiny(), seed=3)
    assert set(run["methods"]) == set(METHODS) and len(run["cases"]) == 2
    for scores in run["methods"].values():
        assert {len(scores[k]) for k in ("dice", "nsd", "hd95", "fp_ml")} == {2}
    # The truth's volume per class, per test case: an organ the truth lacks has 0 mL and raw Dice 0 or NaN.
    from refnet.data.btcv import find_cases, load_case, split_cases

    truth_ml = np.array(run["truth_ml"])
    _ct, target = load_case(split_cases(find_cases(tmp_path / "data"), "test")[0])
    assert truth_ml.shape == (2, 13) and (truth_ml[0] > 0).tolist() == [(target == c).any() for c in range(13)]
    raw = np.array(run["methods"]["raw"]["dice"], dtype=float)
    assert np.all((raw[truth_ml == 0] == 0) | np.isnan(raw[truth_ml == 0]))
    # Out-of-fold training predictions; the seed reaches the base models.
    record = json.loads((tmp_path / "predictions" / run["raw_source"] / "predictions.json").read_text())
    assert record["folds"] == 2 and run["raw_source"] == "unet-s300-2"
    assert set(record["predicted_by"].values()) == {"unet-s300-2", "unet-s300-2-fold0", "unet-s300-2-fold1"}
    ct_model = json.loads(json.dumps(run))  # run.json round-trips
    summary = summarise_quality([ct_model, run])
    assert summary["cases"] == 4 and set(summary["gains"]) == set(METHODS) - {"raw", "unseen_raw"}
    assert summary["gains"]["unseen_refnet_label"]["against"] == "unseen_raw"
    # RefNet and the decider on the K models' average are judged against the average they refine.
    assert {summary["gains"][m]["against"] for m in METHODS if m.startswith("average_")} == {"average"}
    # The same run twice: every paired difference is the run's own, so SD over seeds is 0.
    lab = summary["gains"]["refnet_label"]
    assert lab["gain_percent_sd"] == pytest.approx(0.0)
    raw = np.nanmean(np.array(run["methods"]["raw"]["dice"], dtype=float), axis=1).mean()
    ref = np.nanmean(np.array(run["methods"]["refnet_label"]["dice"], dtype=float), axis=1).mean()
    assert lab["gain_percent_mean"] == pytest.approx(100 * (ref - raw) / raw, abs=1e-3)
    table = quality_table(summary)
    assert table.count("\n") == len(METHODS) + 1 and "refnet_ct" in table
    assert re.search(r"\| average_pieces \| [0-9.]+ \| average \|", table)  # the row names its baseline
    assert save_gain_chart(tmp_path / "gain.png", summary).stat().st_size > 0


def test_summary_gain_and_interval_from_known_scores():
    def run(seed, raw, ref):
        n = len(raw)
        nan = [[None] * 13] * n
        return {"seed": seed, "cases": list(range(n)), "cleanup": {}, "raw_source": "r", "unseen_source": None,
                "timings": {}, "methods": {
                    "raw": {"dice": [[v] * 13 for v in raw], "nsd": nan, "hd95": nan, "fp_ml": [[0.0] * 13] * n},
                    "refnet_label": {"dice": [[v] * 13 for v in ref], "nsd": nan, "hd95": nan,
                                     "fp_ml": [[0.0] * 13] * n}}}

    summary = summarise_quality([run(1, [0.5, 0.7], [0.51, 0.72]), run(2, [0.6, 0.6], [0.6, 0.63])])
    gain = summary["gains"]["refnet_label"]
    assert gain["gain_percent_per_seed"] == [pytest.approx(2.5), pytest.approx(2.5)]
    assert gain["case_dice_diff"]["mean"] == pytest.approx(0.015) and gain["case_dice_diff"]["n"] == 4
    assert gain["worst_organ_change"] == pytest.approx(0.015)
    assert summary["refnet_label"]["mean_dice"] == pytest.approx(0.615)


def test_unknown_methods_are_refused():
    with pytest.raises(ValueError, match="unknown methods"):
        QualityConfig(methods=("raw", "magic"))
    with pytest.raises(ValueError, match="needs unseen_raw"):
        QualityConfig(methods=("raw", "unseen_refnet_label"))
    with pytest.raises(ValueError, match="needs average"):
        QualityConfig(methods=("raw", "average_refnet_label"))


def test_the_unseen_architecture_must_stay_unseen():
    base = QualityConfig()
    two = replace(base.demo, segmenters=(SegmenterConfig.demo("unet"), SegmenterConfig.demo("dynunet", seed=1)))
    assert replace(base, demo=two).demo.segmenters[1].architecture == "dynunet"  # SegResNet is still unseen
    with_segresnet = replace(base.demo, segmenters=(SegmenterConfig.demo("unet"), SegmenterConfig.demo("segresnet")))
    with pytest.raises(ValueError, match=r"the unseen architecture 'segresnet' is one of the base models"):
        replace(base, demo=with_segresnet)
    assert replace(base, demo=with_segresnet, methods=("raw", "refnet_label")).unseen.architecture == "segresnet"


def test_methods_added_to_a_finished_run_leave_the_others_alone(tmp_path):
    from refnet.quality import add_methods

    first = tuple(m for m in METHODS if "pieces" not in m)
    run = run_quality(tmp_path, replace(_tiny(), methods=first), seed=4)
    assert "pieces" not in run["methods"] and run["sources"][0] == run["raw_source"]
    before = json.loads(json.dumps(run))
    added = add_methods(tmp_path, run, replace(_tiny(), methods=("raw", "pieces", "refnet_label_pieces",
                                                                    "unseen_raw", "unseen_pieces")))
    assert {"pieces", "refnet_label_pieces", "unseen_pieces"} <= set(added["methods"])
    for m in first:  # raw and unseen_raw scored again on the same maps: the same figures
        assert added["methods"][m] == before["methods"][m]
    assert (tmp_path / "pieces.pt").exists()
    summary = summarise_quality([added])
    assert summary["gains"]["unseen_pieces"]["against"] == "unseen_raw"
    with pytest.raises(ValueError, match="needs unseen_raw"):
        replace(_tiny(), methods=("raw", "unseen_pieces"))


def test_clinical_resolution_keeps_everything_but_the_grids():
    from refnet.quality import CLINICAL_INPLANE_MM, CLINICAL_SLICE_MM, MODEL_SPACING_MM

    base = QualityConfig.quick()
    clinical = base.at_clinical_resolution()
    assert clinical.demo.phantoms == replace(base.demo.phantoms, inplane_spacing_mm=CLINICAL_INPLANE_MM,
                                             slice_spacing_mm=CLINICAL_SLICE_MM)
    assert CLINICAL_INPLANE_MM[1] <= 1.0 and CLINICAL_SLICE_MM[1] <= 5.0  # clinical CT: <= 1 mm pixels, <= 5 mm slices
    assert [s.spacing_mm for s in clinical.demo.segmenters] == [MODEL_SPACING_MM] * 2
    assert clinical.unseen.spacing_mm == MODEL_SPACING_MM
    # Base models and RefNet otherwise unchanged; a model's own grid is kept.
    assert [replace(s, spacing_mm=None) for s in clinical.demo.segmenters] == list(base.demo.segmenters)
    assert clinical.demo.train == base.demo.train and clinical.methods == base.methods
    own = replace(base, unseen=replace(base.unseen, spacing_mm=(3.0, 3.0, 3.0)))
    assert own.at_clinical_resolution().unseen.spacing_mm == (3.0, 3.0, 3.0)
