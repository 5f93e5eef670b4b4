import numpy as np
import pytest
from refnet.cleanup import apply_cleanup, choose_cleanup, clean_class


def _map() -> np.ndarray:
    labels = np.zeros((20, 20, 6), np.uint8)
    labels[2:10, 2:10, 1:5] = 6  # liver block
    labels[5, 5, 2] = 0  # a hole inside it
    labels[15:17, 15:17, 2:4] = 6  # a stray island of liver
    labels[12:18, 2:6, 1:5] = 1  # spleen
    return labels


def test_largest_component_removes_islands_and_fill_holes_closes_holes():
    labels = _map()
    lcc = clean_class(labels, 6, "largest_component")
    assert (lcc[15:17, 15:17, 2:4] == 0).all() and lcc[5, 5, 2] == 0
    filled = clean_class(labels, 6, "fill_holes")
    assert filled[5, 5, 2] == 6 and (filled[15:17, 15:17, 2:4] == 6).all()
    assert np.array_equal(labels, _map())  # input untouched
    # Other classes never change, and a class that is absent is a no-op.
    assert np.array_equal(lcc == 1, labels == 1) and np.array_equal(clean_class(labels, 3, "fill_holes"), labels)
    with pytest.raises(ValueError, match="unknown cleanup step"):
        clean_class(labels, 6, "smooth")


def test_a_step_is_kept_only_for_classes_it_helps():
    truth = _map()
    truth[15:17, 15:17, 2:4] = 0  # the island is an error, the hole is an error
    truth[5, 5, 2] = 6
    pred = _map()
    # The spleen in the prediction has an island that is real (the truth has it too): keep it.
    truth[0:2, 18:20, 0:2] = 1
    pred[0:2, 18:20, 0:2] = 1
    plan = choose_cleanup([pred], [truth])
    assert plan == {6: ["largest_component", "fill_holes"]}
    assert np.array_equal(apply_cleanup(pred, plan), truth)
    assert choose_cleanup([truth], [truth]) == {}  # nothing to gain on a correct map


def test_cleanup_no_harm_benchmark_flags_the_two_piece_adrenal_class(tmp_path):
    """benchmarks/cleanup_no_harm.py on a made-up FLARE22-numbered map: both adrenals share one RefNet class,
    so keeping the largest component deletes a correct gland (below the bar); a one-piece liver is untouched."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from refnet.io import save_volume

    lab = np.zeros((30, 30, 12), np.uint8)
    lab[4:14, 4:14, 2:10] = 1  # liver
    lab[20:23, 5:8, 4:7] = 7  # right adrenal
    lab[20:23, 22:25, 4:8] = 8  # left adrenal, a little larger
    (tmp_path / "flare22").mkdir()
    save_volume(tmp_path / "flare22" / "FLARE22_Tr_0001.nii.gz", lab, np.eye(4))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cleanup_no_harm.py"
    subprocess.run([sys.executable, str(script), "--real-dir", str(tmp_path), "--out", str(tmp_path / "c.json")],
                   check=True, capture_output=True, text=True, timeout=300)
    summary = json.loads((tmp_path / "c.json").read_text())["summary"]
    adrenal = summary["largest_component"]["Adrenal glands"]
    assert not adrenal["passes"] and adrenal["worst_dice"] == pytest.approx(2 * 36 / (36 + 36 + 27), abs=1e-4)
    assert summary["largest_component"]["Liver"] == {"maps": 1, "changed_maps": 0, "worst_dice": 1.0, "passes": True}
