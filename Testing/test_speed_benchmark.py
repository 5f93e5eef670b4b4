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
