import numpy as np
import pytest
from refnet.labels import CLASS_NAMES
from refnet.surface import FLARE22_TOLERANCE_MM, surface_scores

AORTA, LIVER = CLASS_NAMES.index("Aorta"), CLASS_NAMES.index("Liver")


def _shifted(cls: int, shift: int = 1) -> tuple[np.ndarray, np.ndarray]:
    target = np.zeros((30, 30, 12), np.uint8)
    target[8:20, 8:20, 3:9] = cls
    return np.roll(target, shift, axis=0), target


def test_tolerances_are_applied_in_millimetres():
    pred, target = _shifted(AORTA)  # one voxel off along the first axis
    nsd, hd = surface_scores(pred, target, (1.0, 1.0, 1.0))
    assert nsd[AORTA] == pytest.approx(1.0) and hd[AORTA] == pytest.approx(1.0)
    nsd, hd = surface_scores(pred, target, (3.0, 1.0, 1.0))  # the same voxel shift is 3 mm > 2 mm
    assert nsd[AORTA] < 0.9 and hd[AORTA] == pytest.approx(3.0)
    pred, target = _shifted(LIVER)  # the liver's tolerance is 5 mm: 3 mm is within it
    nsd, _ = surface_scores(pred, target, (3.0, 1.0, 1.0))
    assert nsd[LIVER] == pytest.approx(1.0)
    assert set(FLARE22_TOLERANCE_MM) == set(CLASS_NAMES[1:])


def test_identity_absent_and_one_sided_classes():
    pred, target = _shifted(AORTA, shift=0)
    nsd, hd = surface_scores(pred, target, (0.8, 0.8, 2.5))
    assert nsd[AORTA] == 1.0 and hd[AORTA] == 0.0
    assert np.isnan(nsd[LIVER]) and np.isnan(hd[LIVER]) and np.isnan(nsd[0])  # absent from both / background
    pred = pred.copy()
    pred[0:2, 0:2, 0:2] = LIVER  # a false positive of an absent organ
    nsd, hd = surface_scores(pred, target, (1.0, 1.0, 1.0))
    assert nsd[LIVER] == 0.0 and np.isnan(hd[LIVER])
    with pytest.raises(ValueError, match="spacing must hold 3"):
        surface_scores(pred, target, (1.0, 1.0))
