"""refnet.worker: the job folder the Slicer module's background process refines."""

import io

import numpy as np
from refnet.checkpoint import load_model
from refnet.guards import GuardConfig
from refnet.refine import RefineConfig, refine_volume
from refnet.worker import main, parse_progress, read_result, run_job, write_job

from .conftest import make_model_file

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def _labels():
    lab = np.zeros((36, 32, 8), np.uint8)
    lab[6:20, 6:18, 2:6] = 6
    lab[22:28, 6:12, 1:5] = 1
    return lab


def test_a_job_gives_what_refine_volume_gives_and_reports_progress(tmp_path):
    model_file = make_model_file(tmp_path / "m.pt")
    guards = GuardConfig(band=False)
    write_job(tmp_path / "job", _labels(), AFFINE, np.zeros((36, 32, 8)), model_path=str(model_file), device="cpu",
              guards=guards)
    out = io.StringIO()
    assert run_job(tmp_path / "job", out=out) == 0
    progress = [parse_progress(line) for line in out.getvalue().splitlines()]
    assert progress and all(progress) and progress[-1][0] == progress[-1][1]
    labels, report = read_result(tmp_path / "job")
    expected = refine_volume(_labels(), AFFINE, load_model(model_file), config=RefineConfig(guards=guards))
    np.testing.assert_array_equal(labels, expected.labels)
    assert report["held_back"] == expected.report.held_back and report["device"] == "cpu"


def test_a_failing_job_writes_nothing_and_says_why(tmp_path):
    (tmp_path / "bad.pt").write_text("no model")
    write_job(tmp_path / "job", _labels(), AFFINE, model_path=str(tmp_path / "bad.pt"), device="cpu")
    out = io.StringIO()
    assert run_job(tmp_path / "job", out=out) == 1
    assert out.getvalue().startswith("error: ValueError: ") and "bad.pt" in out.getvalue()
    assert not (tmp_path / "job" / "output.npz").exists()
    assert parse_progress("progress x y") is None and parse_progress("hello") is None
    assert main([]) == 2
