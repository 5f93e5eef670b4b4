"""benchmarks/gain_sources.py: it splits a gain into found organs and whole-organ events correctly."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gain_sources.py"
NAN = float("nan")


@pytest.fixture(scope="module")
def sources():
    spec = importlib.util.spec_from_file_location("gain_sources", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run() -> dict:
    # Two cases, background + 3 organs. Case 0: raw drew organ 3, which the patient lacks (Dice 0).
    raw = [[0.99, 0.8, 0.6, 0.0], [0.99, 0.7, 0.5, NAN]]
    drop = [[0.99, 0.8, 0.6, NAN], [0.99, 0.7, 0.5, NAN]]  # removes the absent organ, nothing else
    trim = [[0.99, 0.9, 0.6, 0.0], [0.99, 0.8, 0.5, NAN]]  # better boundaries, keeps the absent organ
    return {"seed": 3, "methods": {m: {"dice": d} for m, d in (("raw", raw), ("drop", drop), ("trim", trim))}}


def test_a_removed_absent_organ_is_a_fixed_event_and_no_gain_on_found_organs(sources):
    got = sources.gain_sources(_run())["methods"]
    assert got["drop"]["gain_percent_on_found_organs"] == 0.0
    raw_mean, drop_mean = ((0.99 + 0.8 + 0.6) / 4 + 0.73) / 2, ((0.99 + 0.8 + 0.6) / 3 + 0.73) / 2
    assert got["drop"]["gain_percent"] == pytest.approx(100 * (drop_mean - raw_mean) / raw_mean, abs=1e-3)
    assert (got["drop"]["whole_organ_events"], got["drop"]["whole_organ_events_fixed"]) == (1, 1)
    # Found organs only: case means (0.99+0.8+0.6)/3 and (0.99+0.7+0.5)/3 against +0.1 on organ 1 in each.
    base = ((0.99 + 0.8 + 0.6) / 3 + (0.99 + 0.7 + 0.5) / 3) / 2
    assert got["trim"]["gain_percent_on_found_organs"] == pytest.approx(100 * (0.2 / 3 / 2) / base, abs=1e-3)
    assert got["trim"]["whole_organ_events_fixed"] == 0 and "raw" not in got


def test_recorded_truth_volumes_count_absent_organs_apart_from_missed_ones(sources):
    run = _run()
    run["methods"]["raw"]["dice"][1][2] = 0.0  # case 1: raw misses organ 2, which the patient has
    run["truth_ml"] = [[900.0, 10.0, 5.0, 0.0], [900.0, 10.0, 5.0, 0.0]]
    got = sources.gain_sources(run)["methods"]["drop"]
    assert (got["whole_organ_events"], got["absent_organs_drawn"], got["absent_organs_removed"]) == (2, 1, 1)


def test_the_script_pools_run_files_and_names_a_bad_one(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps(_run()).replace("NaN", "null"))
    out = tmp_path / "g.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(run), str(run), "--out", str(out)],
                          capture_output=True, text=True, check=True)
    assert "drop" in done.stdout
    assert json.loads(out.read_text())["pooled"]["drop"]["whole_organ_events_fixed"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    done = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "not a quality.py run file" in done.stderr
