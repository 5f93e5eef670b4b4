"""benchmarks/refnet_variants.py: its variants build valid training presets and its island count is right."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "refnet_variants.py"


@pytest.fixture(scope="module")
def variants():
    spec = importlib.util.spec_from_file_location("refnet_variants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_variant_is_a_valid_preset_that_differs_from_the_preset(variants):
    from refnet.quality import QualityConfig

    base = QualityConfig.quick().demo.train
    configs = {name: variants.train_config(base, over) for name, over in variants.VARIANTS.items()}
    assert configs["preset"] == base
    assert len({repr(c) for c in configs.values()}) == len(configs)  # no two variants train the same thing
    assert configs["components_crop160"].model.component_channel and configs["components_crop160"].crop_size == 160
    assert configs["error_crops_far_islands"].errors.island_gap_mm == (10.0, 60.0)
    assert configs["error_crops_far_islands"].model == base.model


def test_islands_are_the_components_that_miss_their_organ(variants):
    target = np.zeros((20, 20, 10), np.uint8)
    target[2:8, 2:8, 2:8] = 3
    raw = target.copy()
    raw[2:4, 2:4, 2:4] = 0
    raw[12:15, 12:15, 2:4] = 3  # a speck of the same organ, far away: an island
    raw[5:7, 9:11, 3:5] = 3  # touching nothing of class 3 in the target either: an island
    raw[7:9, 2:4, 2:4] = 1  # another class over the organ's edge: its component meets no class-1 truth
    got = variants._islands(raw, target)
    expected = np.zeros_like(got)
    expected[12:15, 12:15, 2:4] = expected[5:7, 9:11, 3:5] = expected[7:9, 2:4, 2:4] = True
    np.testing.assert_array_equal(got, expected)


def test_the_script_refuses_a_folder_without_a_finished_run(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--base", str(tmp_path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "run benchmarks/quality.py first" in done.stderr
