"""RefNetSegmentRefine.py driven through the stand-in ``slicer`` (Testing/slicer_standin).

What this verifies: the module imports without Slicer's GUI; the Logic's node <-> array conversion
((K, J, I) arrays, IJK-to-RAS geometry, segment matching, output node built from the refined map)
gives exactly the core's refinement of the same arrays; the input node is never changed; bad input,
cancel and failures leave the scene as it was. What only Slicer can verify is listed in the
stand-in's docstring (resampling, rendering, widgets, parameter node binding, installation).
"""

import importlib
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from refnet.checkpoint import load_model, save_model
from refnet.guards import GUARD_NAMES, GuardConfig
from refnet.model import RefNet, RefNetConfig
from refnet.refine import RefineConfig, RefinementCancelled, RefineReport, refine_labels
from refnet.segments import compose_class_map, split_class_map

from .conftest import TINY_FEATURES, make_model_file

ROOT = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "slicer_standin"
_STANDIN_NAMES = ("slicer", "vtk", "qt", "ctk", "RefNetSegmentRefine", "RefNetSegmentRefineLib",
                  "PyTorchUtils")
SHAPE_IJK = (40, 36, 8)
# Left-right and anterior-posterior flipped, as Slicer's IJK-to-RAS of a DICOM CT usually is.
AFFINE = np.array([[-0.8, 0, 0, 15.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def M():
    """The module imported against the stand-in; sys.modules and sys.path are restored afterwards."""
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] in _STANDIN_NAMES}
    for name in saved:
        del sys.modules[name]
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(STANDIN))
        mp.syspath_prepend(str(ROOT / "RefNetSegmentRefine"))
        yield importlib.import_module("RefNetSegmentRefine")
    for name in [n for n in sys.modules if n.split(".")[0] in _STANDIN_NAMES]:
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.fixture
def slicer(M):
    import torch

    module = sys.modules["slicer"]
    module.mrmlScene.Clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: thread spin-up dominates on small CI machines
    yield module
    torch.set_num_threads(threads)


@pytest.fixture
def model_file(tmp_path):
    return make_model_file(tmp_path / "tiny.pt")


def _kji(array_ijk):
    return np.ascontiguousarray(np.asarray(array_ijk).transpose(2, 1, 0))


def _box(sl):
    mask = np.zeros(SHAPE_IJK, bool)
    mask[sl] = True
    return mask


# name, terminology, colour, (I, J, K) mask
SEGMENTS = [
    ("liver", "", (0.9, 0.5, 0.4), _box(np.s_[4:20, 5:22, 2:6])),
    ("Tumor", "", (1.0, 0.0, 0.0), _box(np.s_[8:12, 8:12, 3:5])),
    ("Segment_3", "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
     "Structure~SCT^64033007^Kidney~SCT^24028007^Right~Anatomic codes - DICOM master list~^^~^^",
     (0.7, 0.4, 0.3), _box(np.s_[24:32, 6:14, 1:6])),
    ("adrenal_gland_right", "", (0.9, 0.8, 0.6), _box(np.s_[22:25, 18:22, 3:5])),
    ("adrenal_gland_left", "", (0.9, 0.8, 0.6), _box(np.s_[30:33, 18:22, 3:5])),
]


def _scene(slicer, *, ct_dtype=np.int16, segments=SEGMENTS, with_reference=True):
    """A CT volume and a segmentation made on it, built through the (stand-in) Slicer API."""
    ct_ijk = np.random.default_rng(0).normal(40, 60, SHAPE_IJK).astype(ct_dtype)
    ct = slicer.util.addVolumeFromArray(_kji(ct_ijk), ijkToRAS=AFFINE, name="CT")
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Model output")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    for name, terminology, color, mask in segments:
        sid = seg.GetSegmentation().AddEmptySegment("", name, color)
        if terminology:
            segment = seg.GetSegmentation().GetSegment(sid)
            segment.SetTag(segment.GetTerminologyEntryTagName(), terminology)
        slicer.util.updateSegmentBinaryLabelmapFromArray(_kji(mask).astype(np.uint8), seg, sid, ct)
    if not with_reference:
        seg.SetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole(), None)
    return ct, seg, ct_ijk


def _arrays(slicer, seg, ct):
    ids = [seg.GetSegmentation().GetNthSegmentID(i) for i in range(seg.GetSegmentation().GetNumberOfSegments())]
    return {sid: slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, ct) for sid in ids}


def _metadata(M, seg):
    segmentation = seg.GetSegmentation()
    out = []
    for sid, name, terminology in M.RefNetSegmentRefineLogic.segmentList(seg):
        out.append((sid, name, terminology, tuple(segmentation.GetSegment(sid).GetColor())))
    return out


# ------------------------------------------------------------------------------------------ import


def test_module_imports_with_the_four_classes(M, slicer):
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )

    assert issubclass(M.RefNetSegmentRefine, ScriptedLoadableModule)
    assert issubclass(M.RefNetSegmentRefineWidget, ScriptedLoadableModuleWidget)
    assert issubclass(M.RefNetSegmentRefineLogic, ScriptedLoadableModuleLogic)
    assert issubclass(M.RefNetSegmentRefineTest, ScriptedLoadableModuleTest)
    module = M.RefNetSegmentRefine(types.SimpleNamespace())
    assert module.parent.title == "RefNet Segment Refine" and module.parent.categories == ["Segmentation"]
    assert [d.label() for d in M.Device] == ["Auto (GPU if available)", "GPU (CUDA)", "CPU"]
    assert M.RefNetSegmentRefineLogic().moduleName == "RefNetSegmentRefine"


# ------------------------------------------------------------------------------------------ acceptance


def test_refine_makes_a_new_node_equal_to_the_core_refinement(M, slicer, model_file):
    ct, seg, _ = _scene(slicer)
    before, meta_before = _arrays(slicer, seg, ct), _metadata(M, seg)
    logic = M.RefNetSegmentRefineLogic()
    result = logic.refine(seg, modelPath=str(model_file), device="cpu")  # CT: the segmentation's reference

    # expected: the core on the same arrays
    matched = [(mask, c) for (name, _, _, mask), c in zip(SEGMENTS, [6, None, 2, 12, 12]) if c]
    raw = compose_class_map([m for m, _ in matched], [c for _, c in matched])
    refined = refine_labels(raw, AFFINE, load_model(model_file))
    assert (refined != raw).sum() > 50  # the perturbed net really changes labels
    expected = split_class_map(refined, [m for m, _ in matched], [c for _, c in matched], spacing=(0.8, 0.8, 2.5))

    out = result.outputNode
    assert out.GetName() == "Model output refined"
    assert slicer.mrmlScene.nodes("vtkMRMLSegmentationNode") == [seg, out]
    assert _metadata(M, out) == meta_before  # IDs, names, terminology, colours, order
    got = _arrays(slicer, out, ct)
    ids = [sid for sid, _, _, _ in meta_before]
    for sid, mask in zip([ids[0], ids[2], ids[3], ids[4]], expected):
        np.testing.assert_array_equal(got[sid], _kji(mask))
    np.testing.assert_array_equal(got[ids[1]], before[ids[1]])  # Tumor: unmatched, passed through
    for sid, array in before.items():  # the input node is unchanged
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, ct), array)
    assert _metadata(M, seg) == meta_before
    np.testing.assert_array_equal(result.changes, raw != refined)
    assert result.unmatchedSegments == ["Tumor"]
    assert "Tumor" in result.report and "on cpu" in result.report
    assert out.GetNodeReference(out.GetReferenceImageGeometryReferenceRole()) is ct
    assert slicer.app.layoutManager() is None  # batch-like stand-in: the Logic never needed the layout


def test_status_text_reports_what_the_guards_held_back(M, slicer, model_file):
    ct, seg, _ = _scene(slicer)
    logic = M.RefNetSegmentRefineLogic()
    shown = []
    logic.logCallback = shown.append  # the Widget's status label
    result = logic.refine(seg, ct, modelPath=str(model_file), device="cpu")
    report = result.refineReport
    assert isinstance(report, RefineReport) and result.guards == GuardConfig()
    assert set(report.held_back) == set(GUARD_NAMES) and report.held_back["band"] > 0
    held = ", ".join(f"{name.replace('_', ' ')} {report.held_back[name]}" for name in GUARD_NAMES)
    assert f"Guards held back (voxels): {held}." in result.report
    assert "Warning: the model file records no training spacing" in result.report  # spacing warnings shown
    assert shown[-1] == result.report
    assert M.RefNetSegmentRefineParameterNode.safetyGuards is True  # the "Safety guards" box starts ticked


def test_guards_off_gives_the_unguarded_core_refinement(M, slicer, model_file):
    ct, seg, _ = _scene(slicer)
    logic = M.RefNetSegmentRefineLogic()
    guarded = logic.refine(seg, ct, modelPath=str(model_file), device="cpu")
    free = logic.refine(seg, ct, modelPath=str(model_file), device="cpu", guards=GuardConfig.off())
    matched = [(mask, c) for (_, _, _, mask), c in zip(SEGMENTS, [6, None, 2, 12, 12]) if c]
    raw = compose_class_map([m for m, _ in matched], [c for _, c in matched])
    expected = refine_labels(raw, AFFINE, load_model(model_file), config=RefineConfig(guards=GuardConfig.off()))
    np.testing.assert_array_equal(free.changes, raw != expected)
    assert free.changes.sum() > guarded.changes.sum()
    assert free.refineReport.held_back == dict.fromkeys(GUARD_NAMES, 0)
    assert ("Guards held back (voxels): absent classes off, class check off, confidence off, band off, edge off, "
            "new components off, volume change off.") in free.report


def test_ct_model_gets_the_ct_in_ijk_order(M, slicer, tmp_path):
    model_file = make_model_file(tmp_path / "ct.pt", ct_channels=1, metadata={"ct_window": [40.0, 400.0]})
    ct, seg, ct_ijk = _scene(slicer, segments=SEGMENTS[:1])
    logic = M.RefNetSegmentRefineLogic()
    result = logic.refine(seg, ct, modelPath=str(model_file), device="cpu")
    model = load_model(model_file)
    expected = refine_labels(compose_class_map([SEGMENTS[0][3]], [6]), AFFINE, model, ct=ct_ijk.astype(np.float32))
    sid = seg.GetSegmentation().GetNthSegmentID(0)
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(result.outputNode, sid, ct),
                                  _kji(expected == 6))
    assert "label map + CT intensities (window 40/400 HU)" in logic.describeModel(str(model_file))  # loaded
    other = str(make_model_file(tmp_path / "l.pt"))
    assert "label map only" not in logic.describeModel(other)  # not loaded yet: the card only
    assert "No model card beside this file (l.md)" in logic.describeModel(other)
    assert "label map only" in logic.describeModel(other, load=True)


def test_a_model_whose_piece_decider_reads_the_ct_gets_the_ct(M, slicer, tmp_path):
    from refnet.pieces import PieceDecider

    ct, seg, ct_ijk = _scene(slicer, segments=SEGMENTS[:1])
    raw = compose_class_map([SEGMENTS[0][3]], [6])
    hu = ct_ijk.astype(np.float32)
    decider = PieceDecider.fit([raw], [raw], [(1.0, 1.0, 1.0)], epochs=5, ensemble=1, cts=[hu])
    plain = load_model(make_model_file(tmp_path / "plain.pt"))
    path = save_model(tmp_path / "ct_pieces.pt", plain.net, metadata=plain.metadata, pieces=decider)
    logic = M.RefNetSegmentRefineLogic()
    result = logic.refine(seg, ct, modelPath=str(path), device="cpu")  # refuses without the CT otherwise
    expected = refine_labels(raw, AFFINE, load_model(path), ct=hu)
    sid = seg.GetSegmentation().GetNthSegmentID(0)
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(result.outputNode, sid, ct),
                                  _kji(expected == 6))
    assert "its piece decider also reads the CT" in logic.describeModel(str(path), load=True)


def test_refine_arrays_is_the_batch_array_path(M, slicer, model_file):
    from refnet.batch import refine_label_map

    labels = compose_class_map([SEGMENTS[0][3], SEGMENTS[3][3]], [6, 12]).astype(np.int16)
    labels[labels == 12] = 13  # BTCV numbering
    logic = M.RefNetSegmentRefineLogic()
    got = logic.refineArrays(labels, AFFINE, modelPath=str(model_file), device="cpu", labelScheme="btcv")
    np.testing.assert_array_equal(got, refine_label_map(labels, AFFINE, model=load_model(model_file), scheme="btcv"))
    assert logic.loadModel(str(model_file), "cpu") is logic.loadModel(str(model_file), "cpu")  # cached
    withReport = logic.refineArraysWithReport(labels, AFFINE, modelPath=str(model_file), device="cpu",
                                              labelScheme="btcv")
    np.testing.assert_array_equal(withReport.labels, got)
    assert set(withReport.report.held_back) == set(GUARD_NAMES) and withReport.report.held_back["band"] > 0
    free = logic.refineArrays(labels, AFFINE, modelPath=str(model_file), device="cpu", labelScheme="btcv",
                              guards=GuardConfig(band=False))
    np.testing.assert_array_equal(free, refine_label_map(labels, AFFINE, model=load_model(model_file), scheme="btcv",
                                                         config=RefineConfig(guards=GuardConfig(band=False))))
    assert (free != labels).sum() > (got != labels).sum()


def test_changes_node_holds_the_changed_voxels(M, slicer, model_file):
    ct, seg, _ = _scene(slicer)
    logic = M.RefNetSegmentRefineLogic()
    result = logic.refine(seg, ct, modelPath=str(model_file), device="cpu")
    node = logic.createChangesNode(result)
    assert node.GetName() == "Model output refined changes"
    (sid, name, _), = logic.segmentList(node)
    assert name == "Changed by RefNet"
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(node, sid, ct), _kji(result.changes))


def test_review_layout_needs_a_main_window(M, slicer):
    ct, seg, _ = _scene(slicer, segments=SEGMENTS[:1])
    assert M.showSideBySide(seg, seg, ct) is None  # batch mode: no layout manager, nothing touched


@pytest.fixture
def main_window(slicer):
    layout = slicer.app.withMainWindow()
    yield layout
    slicer.app._layout_manager = None


def test_review_views_are_axial_linked_and_end_where_they_began(M, slicer, model_file, main_window):
    ct, seg, _ = _scene(slicer, segments=SEGMENTS[:1])
    result = M.RefNetSegmentRefineLogic().refine(seg, ct, modelPath=str(model_file), device="cpu")
    before = main_window.layout
    assert main_window.sliceWidget("Yellow").mrmlSliceNode().GetOrientation() == "Sagittal"  # start-up layout
    assert M.showSideBySide(seg, result.outputNode, ct) == before
    assert main_window.layout == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    red, yellow = main_window.sliceWidget("Red"), main_window.sliceWidget("Yellow")
    assert red.mrmlSliceNode().GetOrientation() == yellow.mrmlSliceNode().GetOrientation() == "Axial"
    assert red.mrmlSliceCompositeNode().GetLinkedControl() and yellow.mrmlSliceCompositeNode().GetLinkedControl()
    assert yellow.mrmlSliceCompositeNode().background_volume_id == ct.GetID() and yellow.mrmlSliceNode().fitted
    assert seg.GetDisplayNode().view_node_ids == ["vtkMRMLSliceNodeRed"]
    assert result.outputNode.GetDisplayNode().view_node_ids == ["vtkMRMLSliceNodeYellow"]
    M.endReview(seg, before)
    assert seg.GetDisplayNode().view_node_ids == [] and main_window.layout == before  # shown everywhere again


# ------------------------------------------------------------------------------------------ bad input


def _other_classes_model(tmp_path):
    net = RefNet(RefNetConfig(features=TINY_FEATURES))
    return save_model(tmp_path / "other.pt", net, metadata={"classes": ["background", "tumor"]})


@pytest.mark.parametrize(("case", "error", "match"), [
    ("no segmentation", ValueError, "Select a segmentation"),
    ("no CT", ValueError, "Select the CT volume"),
    ("CT beside the segmentation", ValueError, "does not overlap the selected CT"),
    ("CT under another transform", ValueError, "different transforms"),
    ("no matching segment", ValueError, "None of the segments \\(Tumor\\) matches.*Liver"),
    ("model for other classes", ValueError, "made for 2 classes"),
    ("missing model file", FileNotFoundError, "no such model file"),
    ("missing shipped model", FileNotFoundError, "shipped with the extension is missing"),
])
def test_bad_input_changes_nothing(M, slicer, model_file, tmp_path, monkeypatch, case, error, match):
    ct, seg, _ = _scene(slicer, segments=SEGMENTS[1:2] if case == "no matching segment" else SEGMENTS,
                        with_reference=case != "no CT")
    before = _arrays(slicer, seg, ct)
    args = {"segmentationNode": seg, "volumeNode": None if case == "no CT" else ct, "modelPath": str(model_file)}
    if case == "no segmentation":
        args["segmentationNode"] = None
    elif case == "CT beside the segmentation":
        args["volumeNode"] = slicer.util.addVolumeFromArray(np.zeros((8, 36, 40), np.int16), ijkToRAS=np.eye(4))
    elif case == "CT under another transform":
        ct.SetAndObserveTransformNodeID("vtkMRMLLinearTransformNode9")
    elif case == "model for other classes":
        args["modelPath"] = str(_other_classes_model(tmp_path))
    elif case == "missing model file":
        args["modelPath"] = str(tmp_path / "none.pt")
    elif case == "missing shipped model":
        import refnet.checkpoint

        monkeypatch.setattr(refnet.checkpoint, "_DEFAULT_MODEL", tmp_path / "weights" / "refnet_phantom.pt")
        args["modelPath"] = None
    nodes = list(slicer.mrmlScene.nodes())
    with pytest.raises(error, match=match):
        M.RefNetSegmentRefineLogic().refine(**args, device="cpu")
    assert slicer.mrmlScene.nodes() == nodes
    ct.SetAndObserveTransformNodeID(None)  # the stand-in reads segments only without transforms
    for sid, array in before.items():
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, ct), array)


def test_cancel_leaves_the_scene_as_it_was(M, slicer, model_file):
    ct, seg, _ = _scene(slicer)
    nodes, calls = list(slicer.mrmlScene.nodes()), []

    def progress(done, total):
        calls.append((done, total))
        return False  # the Cancel button

    with pytest.raises(RefinementCancelled):
        M.RefNetSegmentRefineLogic().refine(seg, ct, modelPath=str(model_file), progressCallback=progress)
    assert calls and slicer.mrmlScene.nodes() == nodes


def test_failure_while_building_the_output_removes_it(M, slicer, model_file, monkeypatch):
    ct, seg, _ = _scene(slicer)
    nodes = list(slicer.mrmlScene.nodes())
    logic = slicer.modules.segmentations.logic()
    monkeypatch.setattr(logic, "ImportLabelmapToSegmentationNode", lambda *args: False)
    with pytest.raises(RuntimeError, match="could not import"):
        M.RefNetSegmentRefineLogic().refine(seg, ct, modelPath=str(model_file))
    assert slicer.mrmlScene.nodes() == nodes  # neither the output nor the temporary labelmap is left


def test_input_removed_during_refinement(M, slicer, model_file):
    ct, seg, _ = _scene(slicer)

    def progress(done, total):
        slicer.mrmlScene.RemoveNode(seg)  # the user deletes it while the GUI processes events
        return True

    with pytest.raises(RuntimeError, match="removed during refinement"):
        M.RefNetSegmentRefineLogic().refine(seg, ct, modelPath=str(model_file), progressCallback=progress)
    assert slicer.mrmlScene.nodes("vtkMRMLSegmentationNode") == []


def test_segmentation_cropped_on_the_ct_grid_is_accepted(M, slicer, model_file):
    ct, seg, _ = _scene(slicer, segments=SEGMENTS[:1])
    matrix = AFFINE.copy()
    matrix[:3, 3] += AFFINE[:3, :3] @ [2, 3, 1]
    text = "".join(f"{float(v)!r};" for v in matrix.ravel()) + "0;10;0;10;0;4;"
    seg.GetSegmentation().SetConversionParameter("Reference image geometry", text)
    assert M.RefNetSegmentRefineLogic().checkInputs(seg, ct) is ct


# ------------------------------------------------------------------------------------------ dependencies


def test_torch_missing_is_reported_and_installed_the_slicer_way(M, slicer, monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "torch" else real_find_spec(n))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nnumpy>=1.0\nrefnet-not-installed-pkg>=1.0  # trailing\n")
    logic = M.RefNetSegmentRefineLogic()
    assert logic.missingDependencies(str(requirements)) == ["PyTorch", "refnet-not-installed-pkg>=1.0"]
    ct, seg, _ = _scene(slicer, segments=SEGMENTS[:1])
    with pytest.raises(RuntimeError, match="missing Python packages PyTorch"):
        logic.refine(seg, ct)
    assert "PyTorch is not installed" in logic.describeModel(load=True)

    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # extension missing: import fails
    with pytest.raises(RuntimeError, match="Install the 'PyTorch' extension"):
        logic.installDependencies(str(requirements))

    calls = []

    class FakeTorchLogic:
        def installTorch(self, **kwargs):
            calls.append(kwargs)
            return types.SimpleNamespace(__version__="2.3")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=FakeTorchLogic))
    logic.installDependencies(str(requirements))
    assert calls == [{"askConfirmation": False, "torchVersionRequirement": ">=2.1"}]
    assert slicer.util.pip_installed[-1] == "refnet-not-installed-pkg>=1.0"


def test_shipped_requirements_are_met_in_ci(M):
    assert M.readRequirements()  # the file parses and is not empty
    assert M.missingRequirements(M.readRequirements()) == []


def test_reference_volume_ignores_labelmaps(M, slicer):
    ct, seg, _ = _scene(slicer, segments=SEGMENTS[:1])
    assert M.RefNetSegmentRefineLogic.referenceVolume(seg) is ct
    labelmap = slicer.util.addVolumeFromArray(np.zeros((2, 2, 2), np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode")
    seg.SetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole(), labelmap.GetID())
    assert M.RefNetSegmentRefineLogic.referenceVolume(seg) is None
    assert M.RefNetSegmentRefineLogic.referenceVolume(None) is None


# ------------------------------------------------------------------------------------------ training, self-test


def test_train_is_a_thin_call_of_the_core(M, slicer, monkeypatch, tmp_path):
    import refnet.train

    calls = []

    def fake_train(dataset_dir, prediction_dirs, output, *, config=None, **kw):
        calls.append((dataset_dir, prediction_dirs, output, config, kw))
        return Path(output)

    monkeypatch.setattr(refnet.train, "train_from_folders", fake_train)
    out = M.RefNetSegmentRefineLogic().train("data", ("p1", "p2"), str(tmp_path / "m.pt"), epochs=2,
                                             labelScheme="btcv")
    assert out == tmp_path / "m.pt"
    (dataset, predictions, _, config, kw), = calls
    assert (dataset, predictions) == ("data", ["p1", "p2"]) and kw["scheme"] == "btcv" and kw["pieces"] is False
    M.RefNetSegmentRefineLogic().train("data", ("p1",), str(tmp_path / "m.pt"), pieces=True)
    assert calls[-1][4]["pieces"] is True
    from refnet.pipeline import DemoConfig

    # The demo preset (as `refnet train`'s default) with the override applied.
    assert config == replace(DemoConfig().train, epochs=2)
    with pytest.raises(ValueError, match="preset must be"):
        M.RefNetSegmentRefineLogic().train("data", ("p1",), "m.pt", preset="fast")


def test_self_test_runs_on_the_standin(M, slicer, monkeypatch, tmp_path):
    """Smoke-runs the Slicer self-test's Python (phantom, Logic, checks) against the stand-in.

    It does not prove the self-test passes in Slicer; it catches typos and API misuse the stand-in
    models. A small phantom keeps it fast.
    """
    phantoms = pytest.importorskip("refnet.data.phantoms")
    if not hasattr(phantoms, "make_phantom"):
        pytest.skip("refnet.data.phantoms.make_phantom is not written yet")
    small = phantoms.PhantomConfig.demo(fov_mm=(160.0, 140.0, 40.0))
    monkeypatch.setattr(phantoms.PhantomConfig, "demo", classmethod(lambda cls, **kw: small))
    monkeypatch.setattr(slicer.app, "temporaryPath", str(tmp_path), raising=False)
    M.RefNetSegmentRefineTest().runTest()
    assert (tmp_path / "RefNetSegmentRefineSelfTest.pt").is_file()


def test_shipped_model_card_is_summarised_without_torch(M):
    summary = M.modelCardSummary(None)
    assert summary.startswith("Demonstration model, trained on generated phantoms; train on your own data")
    assert "Inputs: label map only" in summary and "Spacing: runs at 1.5 mm in-plane" in summary
    assert "Training data: " in summary


def test_opening_the_module_imports_neither_torch_nor_monai():
    import subprocess

    paths = [str(STANDIN), str(ROOT / "RefNetSegmentRefine")]
    code = (f"import sys; sys.path[:0] = {paths!r}; import RefNetSegmentRefine as M; "
            "logic = M.RefNetSegmentRefineLogic(); text = logic.describeModel(None); "
            "print(sorted(m for m in ('torch', 'monai', 'nibabel') if m in sys.modules)); print(bool(text))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "True"]


class _FakeQtWidget:
    """Any .ui widget: takes every property the Widget sets; setVisible/connect are recorded, not rendered."""

    def __init__(self) -> None:
        self.enabled, self.checked, self.visible, self.text, self.value, self.maximum = True, False, True, "", 0, 0

    def setVisible(self, visible: bool) -> None:
        self.visible = bool(visible)

    def connect(self, signal: str, slot) -> None:
        pass


def _widget(M, slicer, parameters):
    """The Widget without its .ui (the stand-in has no Qt): fake widgets take what it sets."""
    widget = M.RefNetSegmentRefineWidget()
    widget.logic = M.RefNetSegmentRefineLogic()
    names = ("modelPathLineEdit", "refineButton", "statusLabel", "modelInfoLabel", "showChangesCheckBox",
             "endReviewButton", "inputsCollapsibleButton", "modelCollapsibleButton", "advancedCollapsibleButton",
             "progressBar", "cancelButton")
    widget.ui = types.SimpleNamespace(**{n: _FakeQtWidget() for n in names})
    widget._parameterNode = parameters
    return widget


def _refine_in_background(widget):
    """Click Refine, then let the timer poll the background process until the result is in."""
    import qt

    widget.onRefineButton()
    assert widget._job is not None or widget._result is not None
    qt.run_timers()
    assert widget._job is None


def _visible_in(node, view_id):
    display = node.GetDisplayNode()
    return display.GetVisibility() and (not display.view_node_ids or view_id in display.view_node_ids)


def test_a_second_refine_leaves_one_visible_output_and_end_review_restores_the_input(M, slicer, model_file,
                                                                                   main_window):
    ct, seg, _ = _scene(slicer, segments=SEGMENTS[:1])
    p = types.SimpleNamespace(inputSegmentation=seg, inputVolume=ct, useDefaultModel=False, outputSegmentation=None,
                              modelPath=str(model_file), device=types.SimpleNamespace(value="cpu"), safetyGuards=True,
                              dropPieces=True)
    widget = _widget(M, slicer, p)
    before = main_window.layout
    _refine_in_background(widget)
    first = widget._result.outputNode
    assert p.outputSegmentation is first  # the output selector now points at it: a re-run replaces it
    expected = _arrays(slicer, first, ct)
    _refine_in_background(widget)
    assert widget._result.outputNode is first and first.GetName() == "Model output refined"
    assert {k: v.tolist() for k, v in _arrays(slicer, first, ct).items()} == \
        {k: v.tolist() for k, v in expected.items()}
    assert len(slicer.mrmlScene.nodes("vtkMRMLSegmentationNode")) == 2  # input + one output
    p.outputSegmentation = None  # "Create new segmentation": both are kept, the earlier one hidden
    _refine_in_background(widget)
    second = widget._result.outputNode
    assert first is not second and second.GetName() == "Model output refined_1"
    outputs = [n for n in slicer.mrmlScene.nodes("vtkMRMLSegmentationNode") if n is not seg]
    assert [n for n in outputs if n.GetDisplayNode().GetVisibility()] == [second]
    assert _visible_in(second, "vtkMRMLSliceNodeYellow") and not _visible_in(seg, "vtkMRMLSliceNodeYellow")
    assert widget.ui.endReviewButton.visible
    widget.onEndReviewButton()
    assert all(_visible_in(seg, v) for v in ("vtkMRMLSliceNodeRed", "vtkMRMLSliceNodeYellow", "vtkMRMLViewNode1"))
    assert main_window.layout == before and not widget.ui.endReviewButton.visible
    assert slicer.mrmlScene.IsNodePresent(second) and not second.GetDisplayNode().GetVisibility()


def test_a_segmentation_without_reference_clears_an_unrelated_ct(M, slicer):
    ct, seg, _ = _scene(slicer, segments=SEGMENTS[:1])
    other_ct, _, _ = _scene(slicer, segments=SEGMENTS[:1])
    loaded = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "from file")  # no reference volume
    p = types.SimpleNamespace(inputSegmentation=seg, inputVolume=None, useDefaultModel=True, modelPath="")
    widget = _widget(M, slicer, p)
    widget._onParameterNodeModified()
    assert p.inputVolume is ct and widget.ui.refineButton.enabled  # the CT follows the reference
    p.inputVolume = other_ct
    p.inputSegmentation = loaded
    widget._onParameterNodeModified()
    assert p.inputVolume is None and not widget.ui.refineButton.enabled
    assert widget.ui.statusLabel.text.startswith("Select the CT this segmentation belongs to")
    assert "Demonstration model" in widget.ui.modelInfoLabel.text


def test_a_closed_surface_input_is_exported_from_a_copy(M, slicer, model_file):
    ct, seg, _ = _scene(slicer)
    seg.SetSourceRepresentationToClosedSurface()
    nodes_before = list(slicer.mrmlScene.nodes())
    result = M.RefNetSegmentRefineLogic().refine(seg, ct, modelPath=str(model_file), device="cpu")
    assert seg.GetSegmentation()._representations() == {"Closed surface"}  # no labelmap added to the input
    assert [n for n in slicer.mrmlScene.nodes() if n not in nodes_before] == [result.outputNode]  # copy removed
    ct2, seg2, _ = _scene(slicer)  # the same segmentation as binary labelmaps refines identically
    again = M.RefNetSegmentRefineLogic().refine(seg2, ct2, modelPath=str(model_file), device="cpu")
    assert {k: v.tolist() for k, v in _arrays(slicer, result.outputNode, ct).items()} == \
        {k: v.tolist() for k, v in _arrays(slicer, again.outputNode, ct2).items()}


def test_a_segmentation_on_another_grid_is_resampled_onto_the_ct(M, slicer, model_file):
    ct, seg, _ = _scene(slicer)
    before = _arrays(slicer, seg, ct)
    # A CT of the same region on a 2x finer in-plane grid (half the spacing, twice the voxels).
    fine = AFFINE.copy()
    fine[:3, :2] /= 2
    fine[:3, 3] -= AFFINE[:3, :3] @ np.array([0.25, 0.25, 0.0])
    fine_ct = slicer.util.addVolumeFromArray(np.zeros((SHAPE_IJK[2], SHAPE_IJK[1] * 2, SHAPE_IJK[0] * 2), np.int16),
                                             ijkToRAS=fine, name="fine CT")
    shown = []
    logic = M.RefNetSegmentRefineLogic()
    logic.logCallback = shown.append
    result = logic.refine(seg, fine_ct, modelPath=str(model_file), device="cpu")
    assert any("resampled onto the CT grid" in line for line in shown)
    assert result.changes.shape == (SHAPE_IJK[0] * 2, SHAPE_IJK[1] * 2, SHAPE_IJK[2])
    sid = seg.GetSegmentation().GetNthSegmentID(0)
    out = slicer.util.arrayFromSegmentBinaryLabelmap(result.outputNode, sid, fine_ct)
    assert out.shape == (SHAPE_IJK[2], SHAPE_IJK[1] * 2, SHAPE_IJK[0] * 2) and out.any()
    after = _arrays(slicer, seg, ct)  # the input, on its own grid, is unchanged
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_the_input_cannot_be_the_output(M, slicer, model_file):
    ct, seg, _ = _scene(slicer, segments=SEGMENTS[:1])
    with pytest.raises(ValueError, match="output cannot be the input"):
        M.RefNetSegmentRefineLogic().refine(seg, ct, modelPath=str(model_file), device="cpu", outputNode=seg)


def test_background_refine_equals_in_process_and_cancel_leaves_the_scene_as_it_was(M, slicer, model_file, tmp_path,
                                                                                  monkeypatch):
    import os

    import qt

    monkeypatch.setattr(slicer.app, "temporaryPath", str(tmp_path))
    ct, seg, _ = _scene(slicer)
    p = types.SimpleNamespace(inputSegmentation=seg, inputVolume=ct, useDefaultModel=False, outputSegmentation=None,
                              modelPath=str(model_file), device=types.SimpleNamespace(value="cpu"), safetyGuards=True,
                              dropPieces=True)
    widget = _widget(M, slicer, p)
    # Cancel right after the start: the process is killed, nothing is created, no job folder is left.
    nodes = list(slicer.mrmlScene.nodes())
    widget.onRefineButton()
    job = widget._job
    widget.onCancelButton()
    qt.QTimer.pending.clear()
    assert job.process.poll() is not None and not os.path.exists(job.folder)
    assert list(slicer.mrmlScene.nodes()) == nodes and widget.ui.statusLabel.text.startswith("Cancelled")
    assert widget.ui.refineButton.enabled and not widget.ui.cancelButton.visible
    # A full run: the result equals the in-process refinement of the same inputs.
    _refine_in_background(widget)
    assert widget.ui.progressBar.maximum > 0 and "Guards held back" in widget.ui.statusLabel.text
    direct = M.RefNetSegmentRefineLogic().refine(seg, ct, modelPath=str(model_file), device="cpu")
    got, want = _arrays(slicer, widget._result.outputNode, ct), _arrays(slicer, direct.outputNode, ct)
    assert {k: v.tolist() for k, v in got.items()} == {k: v.tolist() for k, v in want.items()}
    assert [n for n in os.listdir(tmp_path) if n.startswith("RefNetRefine_")] == []  # job folder removed


def test_a_failing_background_process_reports_its_message(M, slicer, tmp_path, monkeypatch):
    import qt

    monkeypatch.setattr(slicer.app, "temporaryPath", str(tmp_path))
    ct, seg, _ = _scene(slicer, segments=SEGMENTS[:1])
    bad = tmp_path / "bad.pt"
    bad.write_text("not a model")
    p = types.SimpleNamespace(inputSegmentation=seg, inputVolume=ct, useDefaultModel=False, outputSegmentation=None,
                              modelPath=str(bad), device=types.SimpleNamespace(value="cpu"), safetyGuards=True,
                              dropPieces=True)
    widget = _widget(M, slicer, p)
    nodes = list(slicer.mrmlScene.nodes())
    widget.onRefineButton()
    with pytest.raises(RuntimeError, match="refinement process failed: ValueError: .*bad.pt"):
        qt.run_timers()
    assert list(slicer.mrmlScene.nodes()) == nodes and widget._job is None and widget.ui.refineButton.enabled


def test_the_advanced_boxes_give_the_guard_settings(M):
    from refnet.guards import GuardConfig

    assert M.RefNetSegmentRefineParameterNode.dropPieces is True  # "Drop implausible pieces" starts ticked
    assert M.guardSettings(True, True) is None  # the defaults: every guard with the model's values, and pieces
    assert M.guardSettings(False, True) == GuardConfig.off()
    assert M.guardSettings(True, False) == GuardConfig(drop_pieces=False)
    assert M.guardSettings(False, False) == GuardConfig(**{**GuardConfig.off().__dict__, "drop_pieces": False})
