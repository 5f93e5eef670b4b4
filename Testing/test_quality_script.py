"""benchmarks/quality.py --from-runs: the published tables again from kept per-seed run files."""

import importlib.util
import json
import sys

import pytest

from .test_batch import ROOT

SCRIPT = ROOT / "benchmarks" / "quality.py"


def _run(seed, raw, ref):
    n = len(raw)
    nan = [[None] * 13] * n
    return {"seed": seed, "dataset": f"/q/seed{seed}/data", "cases": list(range(n)), "cleanup": {},
            "raw_source": "r", "unseen_source": None, "timings": {}, "methods": {
                "raw": {"dice": [[v] * 13 for v in raw], "nsd": nan, "hd95": nan, "fp_ml": [[0.0] * 13] * n},
                "refnet_label": {"dice": [[v] * 13 for v in ref], "nsd": nan, "hd95": nan, "fp_ml": [[0.0] * 13] * n}}}


def _main(monkeypatch, *args):
    spec = importlib.util.spec_from_file_location("quality_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["quality.py", *map(str, args)])
    return module.main()


def test_from_runs_pools_kept_run_files_without_training(tmp_path, monkeypatch, capsys):
    files = []
    for seed, raw, ref in ((1, [0.5, 0.7], [0.51, 0.72]), (2, [0.6, 0.6], [0.6, 0.63])):
        files.append(tmp_path / f"seed{seed}.json")
        files[-1].write_text(json.dumps(_run(seed, raw, ref)))
    out = tmp_path / "out"
    assert _main(monkeypatch, "--out", out, "--quick", "--from-runs", *files) == 0
    summary = json.loads((out / "quality.json").read_text())
    assert summary["seeds"] == [1, 2] and summary["cases"] == 4
    assert summary["gains"]["refnet_label"]["case_dice_diff"]["mean"] == pytest.approx(0.015)
    assert (out / "quality.md").is_file() and (out / "quality_gain.png").stat().st_size > 0
    assert not (out / "seed1").exists()  # nothing was run
    assert "refnet_label gain +2.50%" in capsys.readouterr().out


@pytest.mark.parametrize("bad, message", [("twice", "given twice"), ("summary", "not a run file"),
                                          ("missing", "not a readable run file")])
def test_from_runs_refuses_what_it_cannot_pool(tmp_path, monkeypatch, capsys, bad, message):
    good = tmp_path / "seed1.json"
    good.write_text(json.dumps(_run(1, [0.5], [0.6])))
    other = {"twice": good, "summary": tmp_path / "quality.json", "missing": tmp_path / "none.json"}[bad]
    if bad == "summary":
        other.write_text(json.dumps({"seeds": [1], "gains": {}}))
    with pytest.raises(SystemExit) as done:
        _main(monkeypatch, "--out", tmp_path / "out", "--from-runs", good, other)
    assert done.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("presets, message", [(["unet"], "give K >= 2 base models"),
                                              (["unet", "vnet"], "unknown architecture 'vnet'"),
                                              (["unet", "unet:steps=0"], "steps must be an int >= 1"),
                                              (["unet", "segresnet"], "the unseen architecture 'segresnet'")])
def test_segmenters_refuses_bad_presets(tmp_path, monkeypatch, capsys, presets, message):
    with pytest.raises(SystemExit) as done:
        _main(monkeypatch, "--out", tmp_path / "out", "--quick", "--segmenters", *presets)
    assert done.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_segmenters_reach_the_run_and_the_summary(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("quality_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = []

    def fake_run(folder, config, *, seed, dataset):
        seen.append(config.demo.segmenters)
        return _run(seed, [0.5, 0.7], [0.51, 0.72])

    monkeypatch.setattr(module, "run_quality", fake_run)
    monkeypatch.setattr(sys, "argv", ["quality.py", "--out", str(tmp_path / "out"), "--quick", "--seeds", "21",
                                      "--segmenters", "unet", "dynunet:seed=1"])
    assert module.main() == 0
    assert [(s.architecture, s.seed) for s in seen[0]] == [("unet", 0), ("dynunet", 1)]
    summary = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert summary["segmenters"] == ["unet", "dynunet:seed=1"]


def test_unseen_preset_reaches_the_run_so_segresnet_can_be_a_base_model(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("quality_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = []

    def fake_run(folder, config, *, seed, dataset):
        seen.append(config)
        return _run(seed, [0.5, 0.7], [0.51, 0.72])

    monkeypatch.setattr(module, "run_quality", fake_run)
    argv = ["quality.py", "--out", str(tmp_path / "out"), "--quick", "--seeds", "34",
            "--segmenters", "unet", "segresnet:seed=1,steps=600"]
    monkeypatch.setattr(sys, "argv", [*argv, "--unseen", "dynunet:lr=0.03"])
    assert module.main() == 0
    assert [s.architecture for s in seen[0].demo.segmenters] == ["unet", "segresnet"]
    assert (seen[0].unseen.architecture, seen[0].unseen.lr) == ("dynunet", 0.03)
    assert json.loads((tmp_path / "out" / "quality.json").read_text())["unseen"] == "dynunet:lr=0.03"
    for bad, message in (("unet", "the unseen architecture 'unet'"), ("vnet", "--unseen: unknown architecture")):
        monkeypatch.setattr(sys, "argv", [*argv[:2], str(tmp_path / "bad"), *argv[3:], "--unseen", bad])
        with pytest.raises(SystemExit) as done:
            module.main()
        assert done.value.code == 2 and message in capsys.readouterr().err
    assert len(seen) == 1 and not (tmp_path / "bad").exists()
