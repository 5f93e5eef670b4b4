"""Scripts/RefNetTrain.py: headless training through the module Logic (stand-in Slicer) and in plain Python."""

import importlib.util
import sys

import pytest
from refnet.checkpoint import load_model
from refnet.data.phantoms import PhantomConfig, write_phantom_dataset

from .test_batch import ROOT, standin  # noqa: F401  (the stand-in fixture)

SCRIPT = ROOT / "RefNetSegmentRefine" / "Scripts" / "RefNetTrain.py"
TINY = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--val-cases", "0", "--device", "cpu"]


def _load():
    spec = importlib.util.spec_from_file_location("RefNetTrain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    coarse = PhantomConfig.demo(inplane_spacing_mm=(6.0, 6.0), slice_spacing_mm=(9.0, 9.0))
    write_phantom_dataset(root, [5, 6, 1], config=coarse, seed=0)
    return root  # its label/ folder doubles as a "model's predictions" (a perfect model)


def _train_plain(dataset, tmp_path, *flags):
    """RefNetTrain.py in plain Python on the tiny dataset (its truth as the predictions); the written model."""
    out = tmp_path / "m.pt"
    argv = ["RefNetTrain.py", "--data", str(dataset), "--predictions", str(dataset / "label"), "--out", str(out),
            *flags, *TINY]
    assert _load().main(argv) == 0
    return load_model(out)


def test_plain_python_trains_the_model_refnet_train_would(dataset, tmp_path):
    model = _train_plain(dataset, tmp_path)
    assert model.metadata["training"]["pairs"] == 2 and not model.uses_ct
    assert model.pieces is None  # the decision per piece only when asked for


def test_pieces_flag_stores_a_piece_decider_fitted_on_the_same_pairs(dataset, tmp_path):
    model = _train_plain(dataset, tmp_path, "--pieces")
    assert model.metadata["training"]["pairs"] == 2  # the trained net, not replaced by the refit
    # 2 training pairs + each case's truth as a correct map; the cases are the dataset's training split.
    assert model.pieces is not None and model.pieces.provenance["maps"] == 4
    assert model.pieces.provenance["cases"] == [5, 6]
    # The net alone stays in the work folder; the output is written once, with its decider.
    assert (tmp_path / "m_work" / "refnet.pt").is_file()


def test_pieces_ct_flag_stores_a_decider_that_reads_the_ct_for_a_label_only_net(dataset, tmp_path):
    model = _train_plain(dataset, tmp_path, "--pieces-ct")
    assert model.pieces is not None and model.pieces.uses_ct and model.pieces.provenance["ct"] is True
    assert not model.net_uses_ct and model.uses_ct  # the net reads labels only; the decider asks for the CT


def test_inside_slicer_it_trains_through_the_module_logic(dataset, tmp_path, standin, monkeypatch):  # noqa: F811
    script = _load()
    import RefNetSegmentRefine

    calls = []
    real = RefNetSegmentRefine.RefNetSegmentRefineLogic.train
    monkeypatch.setattr(RefNetSegmentRefine.RefNetSegmentRefineLogic, "train",
                        lambda self, *a, **kw: calls.append(kw) or real(self, *a, **kw))
    out = tmp_path / "ct.pt"
    argv = ["s.py", "--", "--data", str(dataset), "--predictions", str(dataset / "label"), "--out", str(out), "--ct",
            *TINY]
    assert script.main(argv) == 0
    assert calls and calls[0]["useCt"] and calls[0]["epochs"] == 1 and calls[0]["preset"] == "demo"
    assert calls[0]["pieces"] is False and calls[0]["piecesCt"] is False
    assert load_model(out).uses_ct
    assert script.main(["s.py", "--", "--data", str(dataset)]) == 2  # missing --predictions/--out
    assert script.main(["s.py", "--", "--data", str(tmp_path / "none"), "--predictions", str(tmp_path),
                        "--out", str(tmp_path / "x.pt"), *TINY]) == 1
    assert "slicer" in sys.modules
