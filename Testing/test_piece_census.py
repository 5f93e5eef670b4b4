"""benchmarks/piece_census.py: its settings score what they say, and it names why a helpful piece stayed."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from refnet.evaluate import dice_per_class
from refnet.pieces import FEATURE_NAMES, PieceDecider

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "piece_census.py"
LIVER, KIDNEY, SPLEEN, GALLBLADDER = 6, 3, 1, 4


@pytest.fixture(scope="module")
def census():
    spec = importlib.util.spec_from_file_location("piece_census", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _truth() -> np.ndarray:
    t = np.zeros((40, 40, 40), np.uint8)
    t[4:20, 4:30, 4:30] = LIVER
    t[26:36, 10:20, 10:20] = KIDNEY
    return t


class _ScoresNothing(PieceDecider):
    """A decider whose scorer drops nothing, with the shipped gates (what the census reads)."""

    def __init__(self, typical_ml: list[float]) -> None:
        super().__init__(typical_ml=typical_ml, mean=[], scale=[], states=[], class_threshold=0.5)

    def scores(self, pieces, spacing, ct=None):
        return np.zeros(len(pieces.cls))


def test_case_census_scores_each_setting_and_names_why_helpful_pieces_stayed(census):
    truth = _truth()
    raw = truth.copy()
    raw[30:33, 30:33, 30:33] = LIVER  # a detached liver speck: dropping it helps; the scorer keeps it
    raw[37:40, 36:40, 2:5] = LIVER  # another, on the image's edge: the edge gate would keep it anyway
    raw[22:26, 32:38, 30:36] = SPLEEN  # a spleen the truth lacks, of a plausible size: a main piece
    typical = [0.0] * 13
    typical[LIVER], typical[KIDNEY], typical[SPLEEN] = 10.0, 1.0, 0.2
    scores, rows, whole = census.case_census(raw, truth, (1.0, 1.0, 1.0), _ScoresNothing(typical))

    def mean(m):
        return float(np.nanmean(dice_per_class(m, truth)))

    assert scores["raw"] == pytest.approx(mean(raw)) and scores["as fitted"] == scores["raw"]
    no_gates = truth  # every error here is a whole piece: removing them all gives the truth back
    assert scores["perfect scorer, no gates"] == pytest.approx(mean(no_gates)) == pytest.approx(1.0)
    gated = raw.copy()
    gated[30:33, 30:33, 30:33] = 0  # only the uncut speck may go: the cut one and the plausible spleen stay
    assert scores["perfect scorer, gates on"] == pytest.approx(mean(gated))
    assert scores["piece by piece"] == scores["as fitted"] == pytest.approx(mean(raw))  # it scores nothing
    absent = np.where(raw == SPLEEN, 0, raw)
    assert scores["absent classes removed"] == pytest.approx(mean(absent))
    by_size = sorted(rows, key=lambda r: r["ml"])
    assert [(r["organ"], r["kept_because"]) for r in by_size] == [
        ("Liver", "score below cut-off"), ("Liver", "edge gate"), ("Spleen", "main piece of a plausible class"),
        ("Left kidney", ""), ("Liver", "")]
    assert [r["class_absent"] for r in by_size] == [False, False, True, False, False]
    assert whole["as fitted"] == whole["piece by piece"] == {"absent_removed": [], "present_removed": []}


def test_the_script_refuses_a_folder_without_a_finished_run(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(tmp_path)],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "run benchmarks/quality.py first" in done.stderr


def test_pieces_are_grouped_by_organ_and_fate_for_the_json(census):
    rows = [{"organ": "Liver", "ml": 0.5, "cut": False, "helps": True, "dice_change": 0.01, "dropped": True,
             "kept_because": "", "class_absent": False}] * 3
    rows += [{**rows[0], "dropped": False, "kept_because": "edge gate", "cut": True}]
    groups = census._grouped(7, rows)
    assert [(g["pieces"], g["ml"], g["dice_change_sum"], g["kept_because"]) for g in groups] == [
        (3, 1.5, 0.03, ""), (1, 0.5, 0.01, "edge gate")]
    assert all(g["case"] == 7 for g in groups)


class _ScoresGallbladder(PieceDecider):
    """A decider whose scorer puts an absent gallbladder's largest piece just under its cut-off."""

    def __init__(self, typical_ml: list[float]) -> None:
        super().__init__(typical_ml=typical_ml, mean=[], scale=[], states=[], threshold=0.9, class_threshold=0.85)

    def scores(self, pieces, spacing, ct=None):
        largest = pieces.features[:, FEATURE_NAMES.index("is_largest")] > 0.5
        return np.where(pieces.cls == GALLBLADDER, np.where(largest, 0.88, 0.99), 0.0)


def test_the_census_counts_organs_removed_whole_with_and_without_the_class_cut_off(census):
    truth = _truth()
    raw = truth.copy()
    raw[30:34, 30:34, 30:34] = GALLBLADDER  # 64 voxels of an organ the patient lacks
    raw[36:38, 36:38, 34:36] = GALLBLADDER  # and a speck of it
    typical = [0.0] * 13
    typical[LIVER], typical[KIDNEY], typical[GALLBLADDER] = 10.0, 1.0, 1.0  # 72 uL: under the floor
    scores, _, whole = census.case_census(raw, truth, (1.0, 1.0, 1.0), _ScoresGallbladder(typical))
    assert whole["as fitted"] == {"absent_removed": ["Gallbladder"], "present_removed": []}
    assert whole["piece by piece"] == {"absent_removed": [], "present_removed": []}  # its largest piece stays
    assert scores["as fitted"] == pytest.approx(1.0) and scores["piece by piece"] < 1.0
