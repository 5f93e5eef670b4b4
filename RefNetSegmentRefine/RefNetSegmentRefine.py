"""RefNet Segment Refine: refine any model's abdominal CT segmentation in 3D Slicer.

The Module, Widget and Test classes Slicer expects; this file reads as the GUI. The Logic (MRML nodes
<-> numpy arrays around the Slicer-free ``refnet`` core, building a *new* segmentation node), the review
layout, the model card summary and the dependency checks live in ``RefNetSegmentRefineLib/`` beside it
(the SlicerMONAIAuto3DSeg layout) and are re-exported here, so ``from RefNetSegmentRefine import
RefNetSegmentRefineLogic`` keeps working in scripts.

Responsiveness and Cancel: Refine exports the segments (in the GUI, with a status line), then runs the
network in a background process (``python -m refnet.worker``, started with Slicer's process helper as
SlicerMONAIAuto3DSeg does) that a timer polls for progress; Cancel kills the process at any moment.
The output node is only created after the process succeeded, so a cancelled or failed run leaves the
scene exactly as it was. Scripts and the batch call the Logic's in-process ``refine()`` instead.

``refnet`` (and with it torch) is imported inside the methods that need it, so the module loads, and
can offer to install PyTorch, on a Slicer where torch is missing.
"""

from __future__ import annotations

import os

import numpy as np
import qt
import slicer
import vtk
from RefNetSegmentRefineLib import (  # noqa: F401  (re-exported for scripts and the tests)
    CHANGES_COLOR,
    MINIMUM_TORCH,
    MODULE_DIR,
    REQUIREMENTS_PATH,
    SHIPPED_MODEL_PATH,
    Device,
    RefineResult,
    RefNetSegmentRefineLogic,
    RefNetSegmentRefineParameterNode,
    endReview,
    guardSettings,
    missingRequirements,
    modelCardPath,
    modelCardSummary,
    readRequirements,
    showSideBySide,
)
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#
# RefNetSegmentRefine
#


class RefNetSegmentRefine(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "RefNet Segment Refine"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["RefNet contributors"]
        self.parent.helpText = """
Refine the output of any 3D abdominal CT segmentation model slice by slice with RefNet.
Select a segmentation and its CT, click Refine, and compare raw (left) and refined (right).
The input segmentation is never modified: the result is a new segmentation "&lt;name&gt; refined".
Segments are matched to the 13 RefNet classes by name, synonym (e.g. TotalSegmentator names) or
terminology; other segments are copied unchanged.
"""
        self.parent.acknowledgementText = """
RefNet is open source. The module follows the structure of Slicer's scripted module template and of
the SlicerTotalSegmentator and SlicerMONAIAuto3DSeg extensions.
"""


#
# RefNetSegmentRefineWidget
#


class RefNetSegmentRefineWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._lastSegmentation = None
        self._modelKey = None
        self._running = False
        self._cancelRequested = False
        self._result = None
        self._changesNode = None
        self._previousLayout = None  # the layout before the review began (restored by End review)
        self._job = None  # the running BackgroundRefinement
        self._previousForJob = None  # the result shown before the running job started

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RefNetSegmentRefine.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.modelPathLineEdit.nameFilters = ["RefNet model (*.pt)"]
        self.logic = RefNetSegmentRefineLogic()
        self.logic.logCallback = self._showStatus
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.refineButton.connect("clicked(bool)", self.onRefineButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.showChangesCheckBox.connect("toggled(bool)", self.onShowChangesToggled)
        self.ui.endReviewButton.connect("clicked(bool)", self.onEndReviewButton)
        self.ui.endReviewButton.setVisible(False)
        self._setRunning(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._cancelRequested = True
        if self._job is not None:  # the module is closing: stop the process, leave no job folder behind
            self._job.cancel()
            self._job = None
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelRequested = True  # a running refinement stops before creating anything
        if self._job is not None:
            self._job.cancel()
            self._job = None
            self._setRunning(False)
        self._result = self._changesNode = self._previousLayout = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputSegmentation:
            firstSegmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if firstSegmentation:
                self._parameterNode.inputSegmentation = firstSegmentation

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p.inputSegmentation is not self._lastSegmentation:
            self._lastSegmentation = p.inputSegmentation  # the CT follows the segmentation's reference volume
            reference = self.logic.referenceVolume(p.inputSegmentation) if p.inputSegmentation else None
            if p.inputSegmentation and reference is None:
                # Loaded from a file, it names no CT: an earlier, unrelated CT must not stay selected.
                p.inputVolume = None
                self._showStatus("Select the CT this segmentation belongs to (it names no reference volume, "
                                 "e.g. because it was loaded from a file).")
            elif reference:
                p.inputVolume = reference
        self.ui.modelPathLineEdit.enabled = not p.useDefaultModel
        self.ui.refineButton.enabled = bool(p.inputSegmentation and p.inputVolume) and not self._running
        self._updateModelInfo()

    def _updateModelInfo(self) -> None:
        key = (self._parameterNode.useDefaultModel, str(self._parameterNode.modelPath))
        if key == self._modelKey:
            return
        self._modelKey = key
        try:
            self.ui.modelInfoLabel.text = self.logic.describeModel(self._modelPath())
        except Exception as err:  # shown next to the model choice; Refine reports it again
            self.ui.modelInfoLabel.text = str(err)

    def _modelPath(self) -> str | None:
        path = str(self._parameterNode.modelPath)
        if self._parameterNode.useDefaultModel:
            return None
        if path in ("", "."):
            raise ValueError("Choose a RefNet model file (.pt), or tick 'Shipped model'.")
        return path

    def onRefineButton(self) -> None:
        """Export the segments, then run the network in a background process polled by a timer (GUI stays live)."""
        with slicer.util.tryWithErrorDisplay("RefNet refinement failed."):
            if not self._ensureDependencies():
                return
            p = self._parameterNode
            self._previousForJob = self._result
            self._setRunning(True)
            self._showStatus("Exporting the segments...")
            slicer.app.processEvents()
            try:
                self._job = self.logic.startBackgroundRefine(
                    p.inputSegmentation, p.inputVolume, modelPath=self._modelPath(), device=p.device.value,
                    guards=guardSettings(p.safetyGuards, p.dropPieces), outputNode=p.outputSegmentation)
            except Exception:
                self._setRunning(False)
                raise
            self._showStatus("Refining in a background process (Cancel stops it at once)...")
            self._pollJob()

    def _pollJob(self) -> None:
        """Timer callback: progress while the process runs, the result (built here) when it has ended."""
        job = self._job
        if job is None:
            return
        finished = job.poll()
        self.ui.progressBar.maximum = job.total
        self.ui.progressBar.value = job.done
        if not finished:
            qt.QTimer.singleShot(200, self._pollJob)
            return
        self._job = None
        with slicer.util.tryWithErrorDisplay("RefNet refinement failed."):
            self._showStatus("Creating the refined segmentation...")
            try:
                result = job.result()
            finally:
                self._setRunning(False)
            previous = self._previousForJob
            if previous is not None and previous.outputNode is result.outputNode:
                previous = None  # replaced in place: nothing else to hide
            self._result = result
            self._parameterNode.outputSegmentation = result.outputNode  # a re-run replaces it unless "Create new"
            self._showResult(previous)

    def onCancelButton(self) -> None:
        self._cancelRequested = True
        if self._job is not None:
            job, self._job = self._job, None
            job.cancel()  # kills the process; the scene was not touched
            self._setRunning(False)
            self._showStatus("Cancelled: nothing was created or changed.")
            return
        self._showStatus("Cancelling...")

    def onShowChangesToggled(self, checked: bool) -> None:
        with slicer.util.tryWithErrorDisplay("Could not show the changed voxels."):
            if checked and self._result and self._changesNode is None:
                self._changesNode = self.logic.createChangesNode(self._result)
            if self._changesNode and slicer.mrmlScene.IsNodePresent(self._changesNode):
                self._changesNode.GetDisplayNode().SetVisibility(checked)

    def _ensureDependencies(self) -> bool:
        missing = self.logic.missingDependencies()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            f"RefNet needs these Python packages: {', '.join(missing)}.\n\nInstall them now? This needs a "
            "network connection and may take several minutes; PyTorch is installed by the PyTorch extension.",
            "Install RefNet dependencies",
        ):
            self._showStatus(f"Not installed: {', '.join(missing)}. RefNet cannot run without them.")
            return False
        with slicer.util.WaitCursor():
            self.logic.installDependencies()
        return True

    def _setRunning(self, running: bool) -> None:
        self._running = running
        self._cancelRequested = False
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.modelCollapsibleButton.enabled = not running
        self.ui.advancedCollapsibleButton.enabled = not running
        self.ui.refineButton.enabled = not running
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(running)
        self.ui.cancelButton.setVisible(running)

    def _showResult(self, previous: RefineResult | None = None) -> None:
        """Review the new result; what an earlier run showed (its output, its changes) is hidden first."""
        for node in (self._changesNode, previous.outputNode if previous else None):
            if node and slicer.mrmlScene.IsNodePresent(node) and node.GetDisplayNode():
                node.GetDisplayNode().SetVisibility(False)
        self._changesNode = None
        layout = showSideBySide(self._parameterNode.inputSegmentation, self._result.outputNode,
                                self._parameterNode.inputVolume)
        if self._previousLayout is None:  # a second run keeps the layout from before the first
            self._previousLayout = layout
        self.ui.endReviewButton.setVisible(layout is not None)
        self.onShowChangesToggled(self.ui.showChangesCheckBox.checked)
        self._showStatus(self._result.report)

    def onEndReviewButton(self) -> None:
        """Input shown in every view again, the refined output kept (hidden), the earlier layout back."""
        with slicer.util.tryWithErrorDisplay("Could not end the review."):
            endReview(self._parameterNode.inputSegmentation, self._previousLayout)
            for node in (self._changesNode, self._result.outputNode if self._result else None):
                if node and slicer.mrmlScene.IsNodePresent(node) and node.GetDisplayNode():
                    node.GetDisplayNode().RemoveAllViewNodeIDs()
                    node.GetDisplayNode().SetVisibility(False)
            self._previousLayout = None
            self.ui.endReviewButton.setVisible(False)

    def _showStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text


#
# RefNetSegmentRefineTest
#


class RefNetSegmentRefineTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload & Test, or ctest ``py_RefNetSegmentRefine``): a phantom case from the
    core, refined through the Logic with a tiny model on CPU."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RefinePhantom()

    def test_RefinePhantom(self):
        logic = RefNetSegmentRefineLogic()
        missing = logic.missingDependencies()
        if missing:
            self.delayDisplay(f"Skipped: install {', '.join(missing)} first (click Refine in the module).")
            return
        self.delayDisplay("Building a phantom case")
        volumeNode, segmentationNode = self._phantomNodes()
        before = {sid: slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, sid, volumeNode)
                  for sid, _, _ in logic.segmentList(segmentationNode)}
        nodesBefore = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        with self.assertRaises(ValueError):
            logic.refine(None, volumeNode)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), nodesBefore)

        self.delayDisplay("Refining")
        result = logic.refine(segmentationNode, volumeNode, modelPath=self._tinyModel(), device="cpu")
        outputNode = result.outputNode
        self.assertTrue(slicer.mrmlScene.IsNodePresent(outputNode))
        self.assertEqual(outputNode.GetName(), "RefNet phantom refined")
        names = [name for _, name, _ in logic.segmentList(segmentationNode)]
        self.assertEqual([name for _, name, _ in logic.segmentList(outputNode)], names)
        arrayFrom = slicer.util.arrayFromSegmentBinaryLabelmap
        for sid, array in before.items():  # the input is unchanged
            np.testing.assert_array_equal(arrayFrom(segmentationNode, sid, volumeNode), array)
        lesion = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName("Lesion")
        np.testing.assert_array_equal(arrayFrom(outputNode, lesion, volumeNode), before[lesion])  # passed through
        self.assertIn("Lesion", result.report)
        self.assertIn("Guards held back", result.report)
        self.delayDisplay("Test passed")

    def _phantomNodes(self):
        from refnet.data.phantoms import PhantomConfig, make_phantom
        from refnet.labels import CLASSES

        phantom = make_phantom(0, PhantomConfig.demo())
        volumeNode = slicer.util.addVolumeFromArray(np.ascontiguousarray(phantom.ct.transpose(2, 1, 0)),
                                                    ijkToRAS=phantom.affine, name="RefNet phantom CT")
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "RefNet phantom")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        lesion = np.zeros(phantom.labels.shape, np.uint8)
        i, j, k = (s // 2 for s in lesion.shape)
        lesion[i - 3:i + 3, j - 3:j + 3, k - 1:k + 1] = 1
        present = np.unique(phantom.labels)[1:]
        masks = [(CLASSES[int(c)].name, CLASSES[int(c)].color, phantom.labels == c) for c in present]
        for name, color, mask in [*masks, ("Lesion", (255, 0, 0), lesion)]:
            sid = segmentationNode.GetSegmentation().AddEmptySegment("", name, [v / 255.0 for v in color])
            slicer.util.updateSegmentBinaryLabelmapFromArray(
                np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8), segmentationNode, sid, volumeNode)
        return volumeNode, segmentationNode

    @staticmethod
    def _tinyModel() -> str:
        import torch
        from refnet.checkpoint import save_model
        from refnet.model import RefNet, RefNetConfig

        torch.manual_seed(0)
        net = RefNet(RefNetConfig(features=(4, 4, 8, 8, 16, 4)))
        torch.nn.init.normal_(net.unet.final_conv.weight, std=0.5)  # untrained RefNet is identity; perturb it
        path = os.path.join(slicer.app.temporaryPath, "RefNetSegmentRefineSelfTest.pt")
        save_model(path, net)
        return path
