"""Bad input, tried as a new user would: through the CLI, the Python API and the batch.

Every case must end in a clear message (naming the problem and the fix) or a clean result: the
expected exit code or exception type, no traceback, and every input file byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from refnet import batch
from refnet.checkpoint import load_model, save_model
from refnet.cli import main
from refnet.io import load_volume, save_volume
from refnet.model import RefNet, RefNetConfig
from refnet.refine import refine_labels

from .conftest import TINY_FEATURES, make_model_file

AFFINE = np.diag([0.9, 0.9, 3.0, 1.0])


def _labels(shape=(30, 28, 8)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[5:18, 4:20, 2:6] = 6
    lab[20:26, 8:14, 2:5] = 2
    return lab


@pytest.fixture
def files(tmp_path):
    """A small world of good and bad files; returns (folder, {name: path})."""
    lab = _labels()
    good = save_volume(tmp_path / "seg.nii.gz", lab, AFFINE)
    raw = good.read_bytes()
    paths = {
        "seg": good,
        "ct": save_volume(tmp_path / "ct.nii.gz", np.zeros(lab.shape, np.float32), AFFINE),
        "model": make_model_file(tmp_path / "m.pt"),
        "ct_model": make_model_file(tmp_path / "ctm.pt", ct_channels=1, metadata={"ct_window": [40, 400]}),
    }
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "half.nii.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "png.nii.gz").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    (tmp_path / "gz.nii").write_bytes(raw)
    save_volume(tmp_path / "flat.nii.gz", lab[:, :, 0], np.eye(4))
    save_volume(tmp_path / "fourd.nii.gz", np.stack([lab, lab], axis=-1), AFFINE)
    save_volume(tmp_path / "frac.nii.gz", lab.astype(np.float32) + 0.5, AFFINE)
    save_volume(tmp_path / "neg.nii.gz", lab.astype(np.int16) - 1, AFFINE)
    save_volume(tmp_path / "big.nii.gz", np.where(lab > 0, 20, 0).astype(np.uint8), AFFINE)
    save_volume(tmp_path / "ct_small.nii.gz", np.zeros((8, 8, 4), np.float32), AFFINE)
    save_volume(tmp_path / "ct_moved.nii.gz", np.zeros(lab.shape, np.float32), AFFINE + np.eye(4) * 0.5)
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    save_volume(tmp_path / "ct_shifted.nii.gz", np.zeros(lab.shape, np.float32), shifted)
    nan_ct = np.zeros(lab.shape, np.float32)
    nan_ct[:, :, 3] = np.nan
    save_volume(tmp_path / "ct_nan.nii.gz", nan_ct, AFFINE)
    save_model(tmp_path / "other.pt", RefNet(RefNetConfig(num_classes=5, features=TINY_FEATURES)),
               metadata={"classes": ["a", "b", "c", "d", "e"]})
    save_model(tmp_path / "fifteen.pt", RefNet(RefNetConfig(num_classes=15, features=TINY_FEATURES)))
    torch.save({"format": "something else"}, tmp_path / "foreign.pt")
    (tmp_path / "truncated.pt").write_bytes(paths["model"].read_bytes()[:400])
    header = nib.Nifti1Header()
    header.set_data_shape((32000, 32000, 32000))
    header.set_data_dtype(np.float64)
    (tmp_path / "huge.nii").write_bytes(header.binaryblock + b"\0" * 104)  # 262 TB declared, 100 bytes there
    (tmp_path / "exists.nii.gz").write_bytes(b"keep me")
    (tmp_path / "adir").mkdir()
    return tmp_path, paths


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# (case id, argv after "refine" with {d} = the folder, exit code, message fragment)
REFINE_CASES = [
    ("missing labels", "--labels {d}/nope.nii.gz", 2, "no such file"),
    ("folder as labels", "--labels {d}/adir", 2, "is a folder, not a file"),
    ("empty file", "--labels {d}/empty.nii.gz", 2, "(it is empty)"),
    ("truncated nii.gz", "--labels {d}/half.nii.gz", 2, "the file may be truncated"),
    ("png renamed", "--labels {d}/png.nii.gz", 2, "cannot be read as gzip-compressed NIfTI"),
    ("gzip saved as .nii", "--labels {d}/gz.nii", 2, "a .nii must not"),
    ("2D image", "--labels {d}/flat.nii.gz", 2, "expected a 3D volume, got 2D"),
    ("4D image", "--labels {d}/fourd.nii.gz", 2, "expected a 3D volume, got 4D"),
    ("fractional labels", "--labels {d}/frac.nii.gz", 2, "pass a label map, not an image"),
    ("negative labels", "--labels {d}/neg.nii.gz", 2, "outside the 13 RefNet classes"),
    ("labels outside the table", "--labels {d}/big.nii.gz", 2, "--label-scheme"),
    ("CT of another shape", "--ct {d}/ct_small.nii.gz", 2, "different grids"),
    ("CT of another spacing", "--ct {d}/ct_moved.nii.gz", 2, "(spacing [1.4, 1.4, 3.5] vs [0.9, 0.9, 3.0] mm)"),
    ("CT of another origin", "--ct {d}/ct_shifted.nii.gz", 2, "(origin [5.0, 0.0, 0.0] vs [0.0, 0.0, 0.0] mm)"),
    ("shape too large for memory", "--labels {d}/huge.nii", 2, "declares a volume too large for this machine"),
    ("CT with NaN", "--ct {d}/ct_nan.nii.gz --model {d}/ctm.pt", 2, "NaN or infinite values; fill them"),
    ("CT model without CT", "--model {d}/ctm.pt", 2, "needs the CT as input"),
    ("output = input", "--out {d}/seg.nii.gz", 2, "is one of the inputs"),
    ("output exists", "--out {d}/exists.nii.gz", 2, "pass --overwrite"),
    ("output suffix", "--out {d}/refined.png", 2, "unsupported file type"),
    ("output is a folder", "--out {d}/adir --overwrite", 2, "is a folder; give a file name"),
    ("report = output", "--report {d}/out.nii.gz", 2, "is one of the volumes"),
    ("missing model", "--model {d}/nope.pt", 2, "no such model file"),
    ("truncated model", "--model {d}/truncated.pt", 2, "not a readable RefNet model file"),
    ("foreign .pt", "--model {d}/foreign.pt", 2, "not a RefNet model file"),
    ("model for other classes", "--model {d}/other.pt", 2, "made for 5 classes"),
    ("inconsistent model", "--model {d}/fifteen.pt", 2, "network has 15 classes"),
    ("threshold out of range", "--threshold 1.5", 2, "must be a probability between 0 and 1"),
    ("negative band", "--band-mm -1", 2, "must be a finite distance >= 0 mm"),
    ("unknown guard", "--disable-guard size", 2, "invalid choice: 'size'"),
    ("unknown scheme", "--label-scheme nnunet", 2, "unknown label scheme"),
    ("bad device", "--device tpu", 2, "use auto, cpu, cuda or cuda:N"),
]
if not torch.cuda.is_available():
    REFINE_CASES.append(("cuda without a GPU", "--device cuda", 2, "no CUDA GPU is available"))


@pytest.mark.parametrize(("argv", "code", "message"), [c[1:] for c in REFINE_CASES], ids=[c[0] for c in REFINE_CASES])
def test_refine_cli(files, capsys, argv, code, message):
    folder, paths = files
    base = {"--labels": str(paths["seg"]), "--model": str(paths["model"]), "--out": str(folder / "out.nii.gz"),
            "--device": "cpu"}
    extra = argv.format(d=folder).split()
    for flag in list(base):
        if flag in extra:
            del base[flag]
    before = _hashes(folder)
    assert _exit_code(lambda: main(["refine", "-q", *[x for kv in base.items() for x in kv], *extra])) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert _hashes(folder) == before  # nothing modified, nothing written, no temporary file left


def _exit_code(run) -> int:
    """The exit status of a command line, whether returned or raised by argparse."""
    try:
        return run()
    except SystemExit as done:
        return int(done.code)


# Inputs that are odd but valid: a clean result, not a crash (exit 0, same shape and geometry).
ODD_CASES = [
    ("all background", lambda lab: (np.zeros_like(lab), AFFINE)),
    ("a single slice", lambda lab: (lab[:, :, 3:4], AFFINE)),
    ("oblique directions", lambda lab: (lab, _oblique())),
    ("extreme fine spacing", lambda lab: (lab, np.diag([0.01, 0.01, 0.01, 1.0]))),
    ("extreme coarse spacing", lambda lab: (lab, np.diag([50.0, 50.0, 50.0, 1.0]))),
    ("LPS orientation", lambda lab: (lab, np.diag([-0.9, -0.9, 3.0, 1.0]))),
]


def _oblique() -> np.ndarray:
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.eye(4)
    affine[:3, :3] = [[0.9 * c, -0.9 * s, 0], [0.9 * s, 0.9 * c, 0], [0, 0, 3.0]]
    return affine


@pytest.mark.parametrize("make", [c[1] for c in ODD_CASES], ids=[c[0] for c in ODD_CASES])
def test_odd_but_valid_inputs_refine_cleanly(tmp_path, capsys, make):
    lab, affine = make(_labels())
    seg = save_volume(tmp_path / "seg.nii.gz", lab, affine)
    model = make_model_file(tmp_path / "m.pt")
    before = hashlib.sha256(seg.read_bytes()).hexdigest()
    assert main(["refine", "-q", "--labels", str(seg), "--model", str(model), "--out", str(tmp_path / "o.nii.gz"),
                 "--device", "cpu"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    out = load_volume(tmp_path / "o.nii.gz")
    assert out.array.shape == lab.shape and out.array.dtype == lab.dtype
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    assert hashlib.sha256(seg.read_bytes()).hexdigest() == before
    if not lab.any():
        np.testing.assert_array_equal(out.array, lab)


API_CASES = [
    ("2D array", lambda: (np.zeros((4, 4), np.uint8), np.eye(4), None), "must be a 3D array"),
    ("a list", lambda: ([[[0]]], np.eye(4), None), "must be a 3D array"),
    ("singular affine", lambda: (_labels(), np.diag([1.0, 1.0, 0.0, 1.0]), None), "affine is singular"),
    ("NaN affine", lambda: (_labels(), np.full((4, 4), np.nan), None), "affine is singular or not finite"),
    ("3x3 affine", lambda: (_labels(), np.eye(3), None), "must be a 4x4 matrix"),
    ("float labels", lambda: (_labels().astype(np.float32) + 0.5, AFFINE, None), "integer class values"),
    ("CT of another shape", lambda: (_labels(), AFFINE, np.zeros((2, 2, 2))), "CT shape"),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_python_api(tmp_path, make, message):
    model = load_model(make_model_file(tmp_path / "m.pt"))
    labels, affine, ct = make()
    before = np.array(labels, copy=True)
    with pytest.raises(ValueError, match=message):
        refine_labels(labels, affine, model, ct=ct)
    np.testing.assert_array_equal(np.asarray(labels), before)


BATCH_CASES = [
    ("input is a file", lambda d: ["--input", str(d / "in" / "a.nii.gz"), "--output", str(d / "out")], 2,
     "is a file, not a folder"),
    ("input missing", lambda d: ["--input", str(d / "nowhere"), "--output", str(d / "out")], 2, "no such folder"),
    ("output = input", lambda d: ["--input", str(d / "in"), "--output", str(d / "in")], 2, "must differ from --input"),
    ("threshold out of range", lambda d: ["--input", str(d / "in"), "--output", str(d / "out"), "--threshold", "1.5"],
     2, "must be a probability"),
    ("missing model", lambda d: ["--input", str(d / "in"), "--output", str(d / "out"), "--model", str(d / "no.pt")],
     2, "no such file"),
]


@pytest.mark.parametrize(("make", "code", "message"), [c[1:] for c in BATCH_CASES], ids=[c[0] for c in BATCH_CASES])
def test_batch_arguments(tmp_path, capsys, make, code, message):
    (tmp_path / "in").mkdir()
    save_volume(tmp_path / "in" / "a.nii.gz", _labels(), AFFINE)
    before = _hashes(tmp_path)
    with pytest.raises(SystemExit) as done:
        batch.main(make(tmp_path))
    err = capsys.readouterr().err
    assert done.value.code == code and message in err and "Traceback" not in err, err
    assert _hashes(tmp_path) == before


def test_batch_bad_case_among_good_ones_fails_alone(tmp_path, caplog):
    (tmp_path / "in").mkdir()
    save_volume(tmp_path / "in" / "a.nii.gz", _labels(), AFFINE)
    (tmp_path / "in" / "b.nii.gz").write_bytes(b"")
    save_volume(tmp_path / "in" / "c.nii.gz", np.full((4, 4, 4), 30, np.uint8), AFFINE)
    model = make_model_file(tmp_path / "m.pt")
    before = _hashes(tmp_path / "in")
    caplog.set_level(logging.INFO)
    assert batch.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(model)]) == 1
    assert (tmp_path / "out" / "a.nii.gz").exists() and not (tmp_path / "out" / "b.nii.gz").exists()
    assert "FAILED b.nii.gz" in caplog.text and "it is empty" in caplog.text
    assert "FAILED c.nii.gz" in caplog.text and "outside the 13 RefNet classes" in caplog.text
    assert _hashes(tmp_path / "in") == before
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".")]


def test_unwritable_output_folder_is_refused_before_any_work(files, capsys, monkeypatch):
    """As root every folder is writable, so the permission answer is simulated; the check must come first."""
    folder, paths = files
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder / "locked" else real_access(p, mode))
    (folder / "locked").mkdir()
    before = _hashes(folder)
    code = main(["refine", "-q", "--labels", str(paths["seg"]), "--model", str(folder / "no_such.pt"),
                 "--out", str(folder / "locked" / "out.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write into" in err and "locked" in err and "no_such" not in err
    assert _hashes(folder) == before


def test_ctrl_c_exits_130_without_a_traceback(files, capsys, monkeypatch):
    import refnet.cli

    folder, paths = files

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(refnet.cli, "_cmd_refine", interrupted)
    code = main(["refine", "--labels", str(paths["seg"]), "--out", str(folder / "o.nii.gz")])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and "Traceback" not in err
