import json

import numpy as np
import pytest
import torch
from refnet.batch import guard_config
from refnet.checkpoint import GUARD_DEFAULTS, save_model
from refnet.cli import _parser, main
from refnet.guards import GUARD_NAMES, GuardConfig
from refnet.io import load_volume, save_volume
from refnet.model import RefNet, RefNetConfig

from .conftest import TEST_MODEL_GUARDS, make_model_file

AFFINE = np.diag([-0.9, -0.9, 3.0, 1.0])


@pytest.fixture
def case(tmp_path):
    lab = np.zeros((40, 36, 10), np.uint8)
    lab[8:20, 6:30, 3:8] = 6
    lab[22:30, 10:16, 2:6] = 12
    ct = np.random.default_rng(0).normal(40, 20, lab.shape).astype(np.float32)
    paths = {
        "labels": save_volume(tmp_path / "seg.nii.gz", lab, AFFINE),
        "ct": save_volume(tmp_path / "ct.nii.gz", ct, AFFINE),
        "model": make_model_file(tmp_path / "m.pt"),
    }
    return tmp_path, paths, lab


def _refine(paths, out, *extra):
    return main(["refine", "-q", "--labels", str(paths["labels"]), "--model", str(paths["model"]),
                 "--out", str(out), "--device", "cpu", *extra])


def test_refine_writes_new_file_with_same_geometry(case):
    tmp, paths, lab = case
    assert _refine(paths, tmp / "out.nii.gz", "--ct", str(paths["ct"])) == 0
    out = load_volume(tmp / "out.nii.gz")
    assert out.array.shape == lab.shape and out.array.dtype == lab.dtype
    np.testing.assert_allclose(out.affine, AFFINE, atol=1e-5)
    np.testing.assert_array_equal(load_volume(paths["labels"]).array, lab)  # input untouched


def test_refine_totalsegmentator_scheme_keeps_other_structures(case):
    tmp, paths, lab = case
    ts = np.where(lab == 6, 5, np.where(lab == 12, 9, 0)).astype(np.int16)  # liver, left adrenal
    ts[0:4, 0:4, 0:4] = 27  # a vertebra RefNet does not know
    save_volume(tmp / "ts.nii.gz", ts, AFFINE)
    paths = {**paths, "labels": tmp / "ts.nii.gz"}
    assert _refine(paths, tmp / "ts_out.nii.gz", "--label-scheme", "totalsegmentator") == 0
    out = load_volume(tmp / "ts_out.nii.gz").array
    assert (out[0:4, 0:4, 0:4] == 27).all()
    assert set(np.unique(out)) <= {0, 5, 8, 9, 27, *range(1, 65)}


def test_empty_label_map_refines_to_itself(case):
    tmp, paths, _ = case
    save_volume(tmp / "empty.nii.gz", np.zeros((8, 8, 4), np.uint8), AFFINE)
    assert _refine({**paths, "labels": tmp / "empty.nii.gz"}, tmp / "e_out.nii.gz") == 0
    assert not load_volume(tmp / "e_out.nii.gz").array.any()


def test_refine_prints_the_report_and_writes_it_as_json(case, capsys):
    tmp, paths, _ = case
    assert _refine(paths, tmp / "out.nii.gz", "--report", str(tmp / "report.json")) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp / "report.json").read_text())
    assert set(report["held_back"]) == set(GUARD_NAMES)
    assert report["held_back"]["band"] > 0  # the tiny model grows the liver beyond the band
    assert report["changed"]["Liver"][0] > 0
    # the model file's values, resolved
    assert report["guards"] == {**dict.fromkeys(GUARD_NAMES, True), **GUARD_DEFAULTS, **TEST_MODEL_GUARDS,
                                 "drop_pieces": True}
    assert "Changed voxels per class: " in out and "Liver +" in out
    held = ", ".join(f"{name.replace('_', ' ')} {report['held_back'][name]}" for name in GUARD_NAMES)
    assert f"Guards held back (voxels): {held}." in out
    assert "Warning: the model file records no training spacing" in out  # spacing warnings reach the user
    assert report["warnings"] and not list(tmp.glob(".report.json*"))  # written atomically


def test_disabled_guard_and_overrides_reach_the_refinement(case, capsys):
    tmp, paths, _ = case
    args = _parser().parse_args(["refine", "--labels", "l", "--out", "o", "--disable-guard", "band",
                                 "--threshold", "0.7"])
    assert guard_config(args) == GuardConfig(band=False, threshold=0.7)
    args = _parser().parse_args(["refine", "--labels", "l", "--out", "o", "--disable-guard", "confidence",
                                 "--disable-guard", "new_components", "band", "--band-mm", "0"])
    with pytest.raises(ValueError, match="--band-mm sets the band guard"):
        guard_config(args)
    args = _parser().parse_args(["refine", "--labels", "l", "--out", "o", "--disable-guard", "all"])
    assert guard_config(args) == GuardConfig.off()

    assert _refine(paths, tmp / "guarded.nii.gz", "--report", str(tmp / "guarded.json")) == 0
    assert _refine(paths, tmp / "free.nii.gz", "--disable-guard", "band", "--threshold", "0.6",
                   "--report", str(tmp / "free.json")) == 0
    assert "band off" in capsys.readouterr().out
    guarded, free = (json.loads((tmp / f"{n}.json").read_text()) for n in ("guarded", "free"))
    assert free["guards"]["band"] is False and free["guards"]["threshold"] == 0.6
    assert free["held_back"]["band"] == 0 and guarded["held_back"]["band"] > 0
    assert free["changed"]["Liver"][0] > guarded["changed"]["Liver"][0]  # the band really was off
    assert (load_volume(tmp / "free.nii.gz").array == 6).sum() > (load_volume(tmp / "guarded.nii.gz").array == 6).sum()


@pytest.mark.parametrize(("extra", "message"), [
    (["--threshold", "1.5"], "argument --threshold: must be a probability between 0 and 1, got 1.5"),
    (["--threshold", "high"], "argument --threshold: must be a probability between 0 and 1, got 'high'"),
    (["--band-mm", "-1"], "argument --band-mm: must be a finite distance >= 0 mm, got -1"),
    (["--disable-guard", "size"], "argument --disable-guard: invalid choice: 'size'"),
])
def test_bad_guard_options_are_argparse_errors(case, capsys, extra, message):
    tmp, paths, _ = case
    with pytest.raises(SystemExit) as exc:
        _refine(paths, tmp / "never.nii.gz", *extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp / "never.nii.gz").exists()


def test_contradicting_guard_options_and_report_paths_are_refused(case, capsys):
    tmp, paths, _ = case
    assert _refine(paths, tmp / "never.nii.gz", "--disable-guard", "confidence", "--threshold", "0.8") == 2
    assert "refnet refine: error: --threshold sets the confidence guard" in capsys.readouterr().err
    assert _refine(paths, tmp / "never.nii.gz", "--report", str(tmp / "never.nii.gz")) == 2
    assert "--report" in capsys.readouterr().err
    assert not (tmp / "never.nii.gz").exists()


def _bad_inputs(tmp, paths):
    save_volume(tmp / "big.nii.gz", np.full((8, 8, 4), 20, np.uint8), AFFINE)
    save_volume(tmp / "flat.nii.gz", np.zeros((8, 8), np.uint8), np.eye(4))
    save_volume(tmp / "fourd.nii.gz", np.zeros((8, 8, 4, 2), np.uint8), AFFINE)
    save_volume(tmp / "ct_small.nii.gz", np.zeros((8, 8, 4), np.float32), AFFINE)
    save_volume(tmp / "ct_moved.nii.gz", np.zeros((40, 36, 10), np.float32), AFFINE + np.eye(4) * 0.5)
    net = RefNet(RefNetConfig(num_classes=5, features=(4, 4, 8, 8, 16, 4)))
    save_model(tmp / "other.pt", net, metadata={"classes": ["a", "b", "c", "d", "e"]})
    torch.save({"format": "something else"}, tmp / "foreign.pt")
    save_model(tmp / "fifteen.pt", RefNet(RefNetConfig(num_classes=15, features=(4, 4, 8, 8, 16, 4))))
    (tmp / "truncated.pt").write_bytes(paths["model"].read_bytes()[:500])
    return [
        ({"labels": tmp / "missing.nii.gz"}, [], "no such file"),
        ({"labels": tmp / "big.nii.gz"}, [], "outside the 13 RefNet classes"),
        ({"labels": tmp / "flat.nii.gz"}, [], "expected a 3D volume, got 2D"),
        ({"labels": tmp / "fourd.nii.gz"}, [], "expected a 3D volume, got 4D"),
        ({}, ["--ct", str(tmp / "ct_small.nii.gz")], "different grids"),
        ({}, ["--ct", str(tmp / "ct_moved.nii.gz")], "different grids"),
        ({"model": tmp / "other.pt"}, [], "made for 5 classes"),
        ({"model": tmp / "foreign.pt"}, [], "not a RefNet model file"),
        ({"model": tmp / "fifteen.pt"}, [], "network has 15 classes but it lists 13 names"),
        ({"model": tmp / "truncated.pt"}, [], "not a readable RefNet model file"),
        ({"model": tmp / "nope.pt"}, [], "no such model file"),
    ]


def test_bad_input_gives_clear_error_and_exit_2(case, capsys):
    tmp, paths, _ = case
    for override, extra, message in _bad_inputs(tmp, paths):
        out = tmp / "never.nii.gz"
        assert _refine({**paths, **override}, out, *extra) == 2, message
        err = capsys.readouterr().err
        assert "refnet refine: error:" in err and message in err, (message, err)
        assert "Traceback" not in err
        assert not out.exists()


def test_refuses_to_overwrite(case, capsys):
    tmp, paths, lab = case
    assert _refine(paths, paths["labels"]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    np.testing.assert_array_equal(load_volume(paths["labels"]).array, lab)
    (tmp / "exists.nii.gz").write_bytes(b"keep me")
    assert _refine(paths, tmp / "exists.nii.gz") == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp / "exists.nii.gz").read_bytes() == b"keep me"
    assert _refine(paths, tmp / "exists.nii.gz", "--overwrite") == 0


def test_unknown_scheme_is_an_argparse_error(case, capsys):
    _, paths, _ = case
    with pytest.raises(SystemExit) as exc:
        _refine(paths, "x.nii.gz", "--label-scheme", "nnunet")
    assert exc.value.code == 2
    assert "unknown label scheme" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["phantoms", "train-segmenters", "train", "pieces", "refine", "evaluate", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "--device" in capsys.readouterr().out


def test_train_segmenters_hold_out_passes_the_last_training_ids(tmp_path, monkeypatch):
    import refnet.pipeline
    from refnet.data.phantoms import PhantomConfig, write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "data", [5, 6, 7, 9, 1], seed=0,
                                 config=PhantomConfig.demo(inplane_spacing_mm=(6.0, 6.0), slice_spacing_mm=(9.0, 9.0)))
    calls = []
    monkeypatch.setattr(refnet.pipeline, "train_segmenters", lambda *a, **kw: calls.append(kw["holdout"]) or [])
    assert main(["train-segmenters", "-q", "--data", str(data), "--out", str(tmp_path / "o"), "--hold-out", "2"]) == 0
    assert main(["train-segmenters", "-q", "--data", str(data), "--out", str(tmp_path / "o")]) == 0
    assert calls == [[7, 9], []]


def test_train_segmenters_spacing_and_architectures_reach_the_models(tmp_path, monkeypatch, capsys):
    import refnet.pipeline

    seen = []
    monkeypatch.setattr(refnet.pipeline, "train_segmenters", lambda d, o, configs, **kw: seen.append(configs) or [])
    args = ["train-segmenters", "-q", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main([*args, "--architectures", "unet", "dynunet", "--spacing", "1.5", "1.5", "3"]) == 0
    assert [(c.architecture, c.seed, c.spacing_mm) for c in seen[0]] == [("unet", 0, (1.5, 1.5, 3.0)),
                                                                         ("dynunet", 1, (1.5, 1.5, 3.0))]
    assert main([*args, "--steps", "7"]) == 0
    assert [(c.steps, c.spacing_mm, c.name) for c in seen[1]] == [(7, None, "unet-s0-7"), (7, None, "segresnet-s1-7")]
    with pytest.raises(SystemExit):
        main([*args, "--spacing", "1.5", "0", "3"])
    assert "must be > 0, got 0" in capsys.readouterr().err


def test_phantoms_defaults_match_the_demo():
    from refnet.cli import _parser
    from refnet.pipeline import DemoConfig

    args = _parser().parse_args(["phantoms", "--out", "x"])
    assert (args.train, args.test) == (DemoConfig().train_cases, DemoConfig().test_cases)


@pytest.mark.parametrize(("out", "extra", "message"), [
    ("refined.png", (), "unsupported file type"),
    ("adir", ("--overwrite",), "is a folder; give a file name"),
])
def test_output_problems_are_found_before_the_model_is_read(case, capsys, out, extra, message):
    tmp, paths, _ = case
    (tmp / "adir").mkdir()
    missing_model = {**paths, "model": tmp / "no_such_model.pt"}  # would fail later, if it were read first
    assert _refine(missing_model, tmp / out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "no_such_model" not in err and "Traceback" not in err


def test_a_folder_given_as_labels_is_named_a_folder(case, capsys):
    tmp, paths, _ = case
    assert _refine({**paths, "labels": tmp}, tmp / "o.nii.gz") == 2
    assert "is a folder, not a file" in capsys.readouterr().err


def test_ct_given_to_a_label_only_model_is_reported_unused(case, caplog):
    tmp, paths, _ = case
    assert _refine(paths, tmp / "o.nii.gz", "--ct", str(paths["ct"])) == 0
    assert "reads only the label map; --ct" in caplog.text


def test_refine_progress_shows_a_bar_and_other_commands_do_not_offer_one(case, capsys):
    tmp, paths, _ = case
    assert _refine(paths, tmp / "o.nii.gz", "--progress") == 0
    assert "slice" in capsys.readouterr().err
    for command in ("phantoms", "evaluate"):
        with pytest.raises(SystemExit):
            _parser().parse_args([command, "--progress"])


def test_error_descriptions_name_the_fix():
    from refnet.cli import _describe

    assert _describe(PermissionError(13, "Permission denied", "/data/out.nii.gz")) == (
        "/data/out.nii.gz: permission denied; choose a file or folder you can read and write.")
    assert "smaller --batch-size" in _describe(MemoryError())
    assert _describe(ValueError("bad thing; fix it")) == "bad thing; fix it"
