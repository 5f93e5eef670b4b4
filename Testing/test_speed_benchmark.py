"""benchmarks/speed.py runs end to end on a tiny volume and writes the rows the issue names (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def test_speed_benchmark_writes_its_rows(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--shapes", "32x32x6", "--no-base-model", "--device", "cpu",
                    "--out", str(tmp_path)], check=True, capture_output=True, text=True, timeout=600)
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [r["shape"] for r in rows] == [[32, 32, 6]]
    assert {"shape", "device", "refine_s", "slices_per_s", "peak_mem_mb"} <= set(rows[0])
    assert rows[0]["refine_s"] > 0 and rows[0]["peak_mem_mb"] > 0


def test_speed_benchmark_batch_sizes_and_base_model_shapes(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--shapes", "32x32x6", "--base-model-shapes", "64x64x6",
                    "--batch-sizes", "1", "3", "--device", "cpu", "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=600)
    out = json.loads((tmp_path / "speed.json").read_text())
    assert "base_model_s" not in out["rows"][0]  # SwinUNETR only on the shapes asked for
    assert [r["batch_size"] for r in out["batch_sizes"]] == [1, 3]
    assert all(r["refine_s"] > 0 and r["refine_extra_mb"] is not None for r in out["batch_sizes"])


def test_speed_benchmark_repeat_reports_the_median_run(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--shapes", "32x32x6", "--no-base-model", "--repeat", "3",
                    "--device", "cpu", "--out", str(tmp_path)], check=True, capture_output=True, text=True, timeout=600)
    row = json.loads((tmp_path / "speed.json").read_text())["rows"][0]
    assert len(row["refine_s_runs"]) == 3 and row["refine_s_runs"] == sorted(row["refine_s_runs"])
    assert row["refine_s"] == row["refine_s_runs"][1]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--repeat", "0", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--repeat must be >= 1" in bad.stderr


def test_train_speed_benchmark_writes_both_layouts(tmp_path):
    script = SCRIPT.parent / "train_speed.py"
    subprocess.run([sys.executable, str(script), "--epochs", "1", "--cases", "2", "--steps", "2",
                    "--out", str(tmp_path)], check=True, capture_output=True, text=True, timeout=600)
    row = json.loads((tmp_path / "train_speed.json").read_text())
    assert row["epoch_s"] > 0 and row["epoch_s_channels_last"] > 0 and row["steps_per_epoch"] == 2
    assert row["crop_ms_edge"] >= 0 and row["pairs"] > 2
