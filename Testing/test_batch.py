"""refnet.batch (plain-Python batch) and the Slicer batch script's argument handling, resume and atomic writes.

The Slicer script is driven through the stand-in ``slicer`` (Testing/slicer_standin) only for its
wiring (arguments -> module Logic -> refnet.batch -> exit status); its Slicer file readers are
replaced by refnet.io here, so reading through Slicer is not tested.
"""

import importlib.util
import json
import logging
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from refnet import batch
from refnet.checkpoint import GUARD_DEFAULTS, load_model
from refnet.guards import GUARD_NAMES, GuardConfig
from refnet.io import load_volume, save_volume

from .conftest import TEST_MODEL_GUARDS, make_model_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "RefNetSegmentRefine" / "Scripts" / "RefNetBatchRefine.py"
STANDIN = Path(__file__).resolve().parent / "slicer_standin"
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
_STANDIN_NAMES = ("slicer", "vtk", "qt", "ctk", "RefNetSegmentRefine", "RefNetSegmentRefineLib",
                  "PyTorchUtils")


def _labels(seed=0, shape=(36, 32, 8)):
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint8)
    x, y = rng.integers(4, 10, 2)
    lab[x:x + 14, y:y + 12, 2:6] = 6
    lab[x + 16:x + 22, y:y + 6, 1:5] = 1
    return lab


def _dataset(root, names=("label0001.nii.gz", "label0002.nii.gz"), *, with_ct=False):
    root.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        save_volume(root / name, _labels(seed), AFFINE)
        if with_ct:
            ct = np.random.default_rng(seed).normal(40, 30, _labels(seed).shape).astype(np.float32)
            save_volume(root / name.replace("label", "img"), ct, AFFINE)
    return root


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny nets run ~100x faster on one thread on small CI machines (thread spin-up dominates)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model_file(tmp_path):
    return make_model_file(tmp_path / "tiny.pt")


# ---------------------------------------------------------------------------------------------- discovery


def test_find_cases_flat_folder_with_btcv_names(tmp_path):
    root = _dataset(tmp_path / "d", with_ct=True)
    (root / ".label0003.tmp.nii.gz").write_bytes(b"partial")  # a leftover temporary file
    (root / "notes.txt").write_text("x")
    cases = batch.find_cases(root)
    assert [c.name for c in cases] == ["label0001.nii.gz", "label0002.nii.gz"]
    assert cases[0].ct == root / "img0001.nii.gz"


def test_find_cases_btcv_root_with_label_and_img_folders(tmp_path):
    _dataset(tmp_path / "label")
    (tmp_path / "img").mkdir()
    save_volume(tmp_path / "img" / "img0002.nii.gz", np.zeros((2, 2, 2), np.float32), AFFINE)
    cases = batch.find_cases(tmp_path)
    assert [c.name for c in cases] == ["label0001.nii.gz", "label0002.nii.gz"]
    assert cases[0].ct is None and cases[1].ct == tmp_path / "img" / "img0002.nii.gz"


def test_find_cases_same_name_ct_folder(tmp_path):
    _dataset(tmp_path / "pred", names=("case_a.nii.gz",))
    _dataset(tmp_path / "ct", names=("case_a.nii.gz",))
    (case,) = batch.find_cases(tmp_path / "pred", ct_dir=tmp_path / "ct")
    assert case.ct == tmp_path / "ct" / "case_a.nii.gz"


def test_find_cases_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        batch.find_cases(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(("extra", "message"), [
    (["--output", "OUT"], "the following arguments are required: --input"),
    (["--input", "MISSING", "--output", "OUT"], "no such folder"),
    (["--input", "IN", "--output", "IN"], "must differ from --input"),
    (["--input", "IN", "--output", "OUT", "--model", "none.pt"], "no such file"),
    (["--input", "IN", "--output", "OUT", "--label-scheme", "nnunet"], "invalid choice"),
    (["--input", "IN", "--output", "OUT", "--threshold", "1.5"],
     "argument --threshold: must be a probability between 0 and 1, got 1.5"),
    (["--input", "IN", "--output", "OUT", "--band-mm", "nan"], "argument --band-mm: must be a finite distance"),
    (["--input", "IN", "--output", "OUT", "--disable-guard", "bands"], "argument --disable-guard: invalid choice"),
    (["--input", "IN", "--output", "OUT", "--disable-guard", "band", "--band-mm", "4"],
     "--band-mm sets the band guard, which --disable-guard turns off"),
])
def test_parse_args_rejects_bad_input(tmp_path, capsys, extra, message):
    (tmp_path / "IN").mkdir()
    argv = [str(tmp_path / a) if a in ("IN", "OUT", "MISSING", "none.pt") else a for a in extra]
    with pytest.raises(SystemExit) as exit_info:
        batch.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "expected"), [
    ([], GuardConfig()),
    (["--disable-guard", "band"], GuardConfig(band=False)),
    (["--disable-guard", "band", "confidence", "--disable-guard", "absent_classes"],
     GuardConfig(absent_classes=False, confidence=False, band=False)),
    (["--disable-guard", "all"], GuardConfig.off()),
    (["--band-mm", "2.5", "--threshold", "0"], GuardConfig(band_mm=2.5, threshold=0.0)),
    (["--edge-mm", "0", "--disable-guard", "volume_change"], GuardConfig(edge_mm=0.0, volume_change=False)),
    (["--keep-pieces"], GuardConfig(drop_pieces=False)),
])
def test_guard_options_build_the_guard_config(tmp_path, extra, expected):
    (tmp_path / "IN").mkdir()
    args = batch.parse_args(["--input", str(tmp_path / "IN"), "--output", str(tmp_path / "OUT"), *extra])
    assert batch.guard_config(args) == expected


def test_guard_settings_resolve_the_model_values(model_file):
    model = load_model(model_file)
    assert batch.guard_settings(GuardConfig(band=False, threshold=0.8), model) == {
        **dict.fromkeys(GUARD_NAMES, True), "band": False, "band_mm": GUARD_DEFAULTS["band_mm"], "threshold": 0.8,
        "edge_mm": GUARD_DEFAULTS["edge_mm"], **TEST_MODEL_GUARDS, "drop_pieces": True}
    assert batch.guard_settings(GuardConfig())["band_mm"] is None  # no model: left to the model file


# ---------------------------------------------------------------------------------------------- run_batch


def _summary(out):
    return json.loads((Path(out) / batch.SUMMARY_FILE).read_text())


def _identity(labels, affine, ct):
    return labels.copy()


def test_run_batch_writes_skips_and_records_failures(tmp_path):
    root = _dataset(tmp_path / "in", names=("a.nii.gz", "b.nii.gz", "c.nii.gz"))
    out = tmp_path / "out"
    out.mkdir()
    save_volume(out / "b.nii.gz", np.zeros((2, 2, 2), np.uint8), AFFINE)  # finished by an earlier run

    cases = [*batch.find_cases(root), batch.Case("x.nii.gz", tmp_path / "missing.nii.gz")]
    summary = batch.run_batch(cases, out, _identity)
    assert summary.done == ["a.nii.gz", "c.nii.gz"]
    assert summary.skipped == ["b.nii.gz"]
    assert summary.failed[0][0] == "x.nii.gz" and "FileNotFoundError" in summary.failed[0][1]
    assert summary.exit_code == 1
    assert "2 done, 1 skipped (output exists), 1 failed" in summary.format()
    np.testing.assert_array_equal(load_volume(out / "a.nii.gz").array, _labels(0))
    assert load_volume(out / "b.nii.gz").array.shape == (2, 2, 2)  # not overwritten
    written = _summary(out)
    assert (written["done"], written["skipped"], written["failed"], written["guards"]) == (2, 1, 1, None)
    assert [(c["case"], c["status"]) for c in written["cases"]] == [
        ("a.nii.gz", "done"), ("b.nii.gz", "skipped"), ("c.nii.gz", "done"), ("x.nii.gz", "failed")]
    assert written["cases"][1]["reason"] == "output exists"
    assert written["cases"][3]["reason"].startswith("FileNotFoundError")
    assert written["cases"][0]["report"] is None  # a refiner that returns a bare array has no report
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "c.nii.gz", batch.SUMMARY_FILE]


def test_run_batch_write_is_atomic(tmp_path, monkeypatch):
    root = _dataset(tmp_path / "in", names=("a.nii.gz",))
    import refnet.io as io_module

    def half_write(img, path):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(io_module.nib, "save", half_write)
    summary = batch.run_batch(batch.find_cases(root), tmp_path / "out", _identity)
    assert summary.failed and "disk full" in summary.failed[0][1]
    # no partial output a re-run would take for finished; only the summary, which records the failure
    assert [p.name for p in (tmp_path / "out").iterdir()] == [batch.SUMMARY_FILE]
    assert _summary(tmp_path / "out")["cases"][0]["status"] == "failed"
    monkeypatch.undo()
    assert batch.run_batch(batch.find_cases(root), tmp_path / "out", _identity).done == ["a.nii.gz"]


def test_load_case_files_checks_ct(tmp_path):
    root = _dataset(tmp_path / "in", names=("label0001.nii.gz",), with_ct=True)
    (case,) = batch.find_cases(root)
    labels, _, ct = batch.load_case_files(case, needs_ct=True)
    assert ct.shape == labels.shape
    assert batch.load_case_files(case, needs_ct=False)[2] is None
    with pytest.raises(ValueError, match="needs the CT but none was found"):
        batch.load_case_files(batch.Case(case.name, case.labels), needs_ct=True)
    save_volume(case.ct, np.zeros((3, 3, 3), np.float32), AFFINE)
    with pytest.raises(ValueError, match="another voxel grid"):
        batch.load_case_files(case, needs_ct=True)


def test_refine_label_map_with_report_is_refine_label_map_plus_the_report(model_file):
    from refnet.refine import RefineConfig, RefineReport

    model = load_model(model_file)
    lab = _labels().astype(np.int16)
    result = batch.refine_label_map_with_report(lab, AFFINE, model=model)
    assert isinstance(result.report, RefineReport) and set(result.report.held_back) == set(GUARD_NAMES)
    assert result.report.held_back["band"] > 0
    np.testing.assert_array_equal(result.labels, batch.refine_label_map(lab, AFFINE, model=model))
    free = batch.refine_label_map_with_report(lab, AFFINE, model=model, config=RefineConfig(guards=GuardConfig.off()))
    assert free.report.held_back == dict.fromkeys(GUARD_NAMES, 0)
    assert (free.labels != lab).sum() > (result.labels != lab).sum()  # the config reaches the refinement


def test_refine_label_map_keeps_the_input_scheme(tmp_path, model_file):
    model = load_model(model_file)
    lab = _labels().astype(np.int16)
    lab[lab == 1] = 13  # BTCV left adrenal
    lab[0, 0, 0] = 14  # a value outside BTCV's classes: kept
    out = batch.refine_label_map(lab, AFFINE, model=model, scheme="btcv")
    assert out.dtype == lab.dtype and out.shape == lab.shape
    assert out[0, 0, 0] == 14
    assert set(np.unique(out)) <= set(range(15))


# ---------------------------------------------------------------------------------------------- plain-Python main


def test_main_refines_then_resumes(tmp_path, model_file, caplog):
    root = _dataset(tmp_path / "in")
    argv = ["--input", str(root), "--output", str(tmp_path / "out"), "--model", str(model_file), "--device", "cpu"]
    with caplog.at_level(logging.INFO):
        assert batch.main(argv) == 0
    model = load_model(model_file)
    for seed, name in enumerate(["label0001.nii.gz", "label0002.nii.gz"]):
        written = load_volume(tmp_path / "out" / name)
        np.testing.assert_array_equal(written.array, batch.refine_label_map(_labels(seed), AFFINE, model=model))
        np.testing.assert_allclose(written.affine, AFFINE)
    assert "2 done, 0 skipped" in caplog.text
    assert "Guards held back (voxels, cases refined now): absent classes 0, class check 0" in caplog.text
    first = _summary(tmp_path / "out")
    assert first["guards"] == {**dict.fromkeys(GUARD_NAMES, True), **GUARD_DEFAULTS, **TEST_MODEL_GUARDS,
                               "drop_pieces": True}
    for entry in first["cases"]:
        assert entry["status"] == "done" and entry["reason"] is None and entry["guards"] == first["guards"]
        assert set(entry["report"]["held_back"]) == set(GUARD_NAMES) and entry["report"]["held_back"]["band"] > 0
        assert entry["report"]["changed"]["Liver"][0] > 0 and entry["report"]["warnings"]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert batch.main(argv) == 0
    assert "0 done, 2 skipped" in caplog.text
    resumed = _summary(tmp_path / "out")
    assert resumed["settings"] == first["settings"] and len(first["settings"]["model_sha256"]) == 64
    for old, new in zip(first["cases"], resumed["cases"]):  # the skipped cases keep their reports
        assert new["status"] == "skipped" and "report from the run that refined it" in new["reason"]
        assert (new["report"], new["guards"]) == (old["report"], old["guards"])
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left
    # Other options, scheme or model: skipping would mix two kinds of output in one folder, so it is refused.
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    other = make_model_file(tmp_path / "other.pt", perturb=False)
    for extra, what in ((["--disable-guard", "band"], "guards"), (["--label-scheme", "btcv"], "label_scheme"),
                        (["--model", str(other)], "model_sha256")):
        caplog.clear()
        assert batch.main([*argv, *extra]) == 2
        assert f"made with another {what}" in caplog.text and "new --output folder" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps


def test_main_passes_disabled_guards_to_every_case(tmp_path, model_file):
    root = _dataset(tmp_path / "in", names=("label0001.nii.gz",))
    argv = ["--input", str(root), "--output", str(tmp_path / "out"), "--model", str(model_file),
            "--disable-guard", "band", "new_components", "--threshold", "0.55"]
    assert batch.main(argv) == 0
    (entry,) = _summary(tmp_path / "out")["cases"]
    assert entry["guards"] == {**dict.fromkeys(GUARD_NAMES, True), "band": False, "new_components": False,
                               "band_mm": GUARD_DEFAULTS["band_mm"], "threshold": 0.55,
                               "edge_mm": GUARD_DEFAULTS["edge_mm"],
                               **TEST_MODEL_GUARDS, "drop_pieces": True}
    assert entry["report"]["held_back"]["band"] == 0
    from refnet.refine import RefineConfig

    expected = batch.refine_label_map(_labels(0), AFFINE, model=load_model(model_file), config=RefineConfig(
        guards=GuardConfig(band=False, new_components=False, threshold=0.55)))
    np.testing.assert_array_equal(load_volume(tmp_path / "out" / "label0001.nii.gz").array, expected)


def test_unreadable_earlier_summary_is_replaced(tmp_path, caplog):
    root = _dataset(tmp_path / "in", names=("a.nii.gz",))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / batch.SUMMARY_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        batch.run_batch(batch.find_cases(root), tmp_path / "out", _identity)
    assert "unreadable" in caplog.text
    assert _summary(tmp_path / "out")["cases"][0]["status"] == "done"


def test_main_fails_cases_without_ct_for_a_ct_model(tmp_path, caplog):
    model_file = make_model_file(tmp_path / "ct.pt", ct_channels=1)
    root = _dataset(tmp_path / "in", names=("label0001.nii.gz", "label0002.nii.gz"), with_ct=True)
    (root / "img0002.nii.gz").unlink()
    argv = ["--input", str(root), "--output", str(tmp_path / "out"), "--model", str(model_file)]
    with caplog.at_level(logging.INFO):
        assert batch.main(argv) == 1
    assert (tmp_path / "out" / "label0001.nii.gz").is_file()
    assert not (tmp_path / "out" / "label0002.nii.gz").exists()
    assert "FAILED label0002.nii.gz: ValueError: the model needs the CT" in caplog.text


@pytest.mark.parametrize(("setup", "message"), [
    ("empty", "no label maps"),
    ("bad_model", "not a readable RefNet model"),
])
def test_main_setup_errors_exit_1(tmp_path, caplog, setup, message):
    (tmp_path / "in").mkdir()
    model = tmp_path / "m.pt"
    if setup == "bad_model":
        _dataset(tmp_path / "in")
        model.write_bytes(b"not torch")
    else:
        make_model_file(model)
    assert batch.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(model)]) == 1
    assert message in caplog.text


# ---------------------------------------------------------------------------------------------- Slicer script


def _load_script():
    spec = importlib.util.spec_from_file_location("RefNetBatchRefine", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def standin(monkeypatch):
    """The stand-in slicer on sys.path for one test; every module it brought is removed afterwards."""
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] in _STANDIN_NAMES}
    for name in saved:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(STANDIN))
    monkeypatch.syspath_prepend(str(ROOT / "RefNetSegmentRefine"))
    import slicer

    yield slicer
    for name in [n for n in sys.modules if n.split(".")[0] in _STANDIN_NAMES]:
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.mark.parametrize(("argv", "expected"), [
    (["RefNetBatchRefine.py", "--", "--input", "a", "--output", "b"], ["--input", "a", "--output", "b"]),
    (["RefNetBatchRefine.py", "--input", "a"], ["--input", "a"]),
    (["RefNetBatchRefine.py", "--", "--input", "--", "x"], ["--input", "--", "x"]),
    (["RefNetBatchRefine.py"], []),
])
def test_script_arguments(argv, expected):
    assert _load_script().scriptArguments(argv) == expected


def test_script_imports_without_slicer_and_handles_arguments(tmp_path, capsys):
    assert "slicer" not in sys.modules
    script = _load_script()
    assert script.main(["s.py", "--", "--help"]) == 0
    assert "--label-scheme" in capsys.readouterr().out
    assert script.main(["s.py", "--", "--input", str(tmp_path / "none"), "--output", str(tmp_path / "o")]) == 2
    (tmp_path / "in").mkdir()
    assert script.main(["s.py", "--", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]) == 1


def test_script_refines_through_the_module_logic(tmp_path, model_file, standin, monkeypatch, caplog):
    root = _dataset(tmp_path / "in")
    script = _load_script()
    monkeypatch.setattr(script, "loadCaseWithSlicer", batch.load_case_files)  # Slicer's readers: Slicer-only
    argv = ["s.py", "--", "--input", str(root), "--output", str(tmp_path / "out"), "--model", str(model_file)]
    with caplog.at_level(logging.INFO):
        assert script.main(argv) == 0
    model = load_model(model_file)
    np.testing.assert_array_equal(load_volume(tmp_path / "out" / "label0001.nii.gz").array,
                                  batch.refine_label_map(_labels(0), AFFINE, model=model))
    assert "2 done" in caplog.text
    cases = _summary(tmp_path / "out")["cases"]
    assert [c["status"] for c in cases] == ["done", "done"]
    assert all(set(c["report"]["held_back"]) == set(GUARD_NAMES) for c in cases)
    assert script.main(argv) == 0  # resumed: everything skipped


def test_script_passes_the_guard_options_to_the_logic(tmp_path, model_file, standin, monkeypatch):
    root = _dataset(tmp_path / "in", names=("label0001.nii.gz",))
    script = _load_script()
    monkeypatch.setattr(script, "loadCaseWithSlicer", batch.load_case_files)
    argv = ["s.py", "--", "--input", str(root), "--output", str(tmp_path / "out"), "--model", str(model_file),
            "--disable-guard", "all"]
    assert script.main(argv) == 0
    (entry,) = _summary(tmp_path / "out")["cases"]
    assert not any(entry["guards"][name] for name in GUARD_NAMES)
    assert entry["report"]["held_back"] == dict.fromkeys(GUARD_NAMES, 0)
    from refnet.refine import RefineConfig

    expected = batch.refine_label_map(_labels(0), AFFINE, model=load_model(model_file),
                                      config=RefineConfig(guards=GuardConfig.off()))
    np.testing.assert_array_equal(load_volume(tmp_path / "out" / "label0001.nii.gz").array, expected)
    assert script.main(["s.py", "--", "--input", str(root), "--output", str(tmp_path / "o2"),
                        "--threshold", "2"]) == 2  # bad value: argparse error, exit 2


def test_script_as_main_always_exits_through_slicer(tmp_path, standin, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--", "--input", str(tmp_path / "none"), "--output", "o"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    assert standin.app.exit_status == 2
    (tmp_path / "in").mkdir()
    _dataset(tmp_path / "in")
    model = make_model_file(tmp_path / "m.pt")
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--", "--input", str(tmp_path / "in"), "--output",
                                      str(tmp_path / "out"), "--model", str(model)])
    runpy.run_path(str(SCRIPT), run_name="__main__")  # the stand-in has no loadLabelVolume: cases fail
    assert standin.app.exit_status == 1


def test_a_rerun_sweeps_temporary_files_an_interrupted_run_left(tmp_path, model_file):
    root = _dataset(tmp_path / "in", names=("label0001.nii.gz",))
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / ".label0001.x1y2z3w4.nii.gz"
    stale.write_bytes(b"half a file")
    assert batch.main(["--input", str(root), "--output", str(tmp_path / "out"), "--model", str(model_file)]) == 0
    assert not stale.exists() and (tmp_path / "out" / "label0001.nii.gz").exists()


def test_script_names_missing_packages_before_importing_the_core(monkeypatch, caplog):
    script = _load_script()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("nibabel", "monai")
                        else real(name, *a))
    assert script.missingPackages() == ["monai", "nibabel"]
    for name in [n for n in sys.modules if n == "refnet.batch"]:  # the core must not be imported first
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nibabel", None)  # importing it now raises ModuleNotFoundError
    with caplog.at_level(logging.ERROR):
        assert script.main(["s.py", "--", "--input", "a", "--output", "b"]) == 1
    assert "packages are missing: monai, nibabel" in caplog.text and "pip_install('monai>=1.4" not in caplog.text
    assert "slicer.util.pip_install('monai nibabel')" in caplog.text
    monkeypatch.undo()
    assert script.missingPackages() == []


def test_shards_cover_every_case_exactly_once(tmp_path, model_file, monkeypatch):
    from refnet.cli import main as refnet_main

    names = tuple(f"label{i:04d}.nii.gz" for i in range(1, 6))
    root = _dataset(tmp_path / "in", names=names)
    for k in range(2):  # a job array of 2: shard 0/2 and 1/2 into one output folder
        assert refnet_main(["refine-dataset", "--input", str(root), "--output", str(tmp_path / "out"),
                            "--model", str(model_file), "--shard", f"{k}/2", "--device", "cpu"]) == 0
    done = [json.loads((tmp_path / "out" / f"refnet_batch_summary.shard{k}of2.json").read_text())["cases"]
            for k in range(2)]
    refined = [[c["case"] for c in shard if c["status"] == "done"] for shard in done]
    assert sorted(refined[0] + refined[1]) == list(names) and not set(refined[0]) & set(refined[1])
    assert len(refined[0]) == 3 and len(refined[1]) == 2
    # Under torchrun, RANK/WORLD_SIZE choose the shard; a half-set environment is refused with the fix.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert batch.shard_from_environment() == (1, 2)
    assert [c.name for c in batch.shard_cases(batch.find_cases(root), (1, 2))] == list(names[1::2])
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="set both or neither"):
        batch.shard_from_environment()
    assert batch.shard_from_environment((0, 3)) == (0, 3)  # --shard wins
    with pytest.raises(Exception, match="K must be 0..N-1"):
        batch.parse_shard("2/2")
