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
