"""RefNet Segment Refine: refine any model's abdominal CT segmentation in 3D Slicer.

The four classes Slicer expects. The Widget only wires the GUI. The Logic turns MRML nodes into
numpy arrays (segments exported onto the CT's voxel grid), calls the Slicer-free ``refnet`` core and
builds a *new* segmentation node from the result; it opens no dialogs and never touches the layout,
so it also runs in batch mode (``Slicer --no-main-window --python-script``) and from other scripts.

Responsiveness and Cancel: the refinement runs in Slicer's own Python. The core calls a progress
callback after every batch of slices; the Widget's callback moves the progress bar, calls
``slicer.app.processEvents()`` and returns False once Cancel was clicked, which makes the core raise
``RefinementCancelled``. The output node is only created after the refinement succeeded, so a
cancelled or failed run leaves the scene exactly as it was. This was chosen over a background
process (TotalSegmentator, MONAIAuto3DSeg) because RefNet is a small 2D net: in-process it needs no
file round trip of the CT and no second torch start-up, and Cancel stops between two slice batches
without killing processes. The price: the GUI is only redrawn between batches (well under a second
each).

``refnet`` (and with it torch) is imported inside the methods that need it, so the module loads, and
can offer to install PyTorch, on a Slicer where torch is missing.
"""

from __future__ import annotations

import enum
import importlib.util
import logging
import os
import pathlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

if TYPE_CHECKING:  # refnet.refine imports torch, which may not be installed yet
    from refnet.guards import GuardConfig
    from refnet.refine import RefineReport
    from refnet.refine import RefineResult as CoreRefineResult

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS_PATH = os.path.join(MODULE_DIR, "Resources", "requirements.txt")
MINIMUM_TORCH = "2.1"
CHANGES_COLOR = (1.0, 0.9, 0.0)  # "show changes" overlay: yellow


#
# Dependencies (plain Python, no Slicer call)
#


def readRequirements(path: str = REQUIREMENTS_PATH) -> list[str]:
    """Requirement lines of a pip requirements file, without comments and blank lines."""
    with open(path, encoding="utf-8") as file:
        lines = (line.split("#", 1)[0].strip() for line in file)
        return [line for line in lines if line]


def missingRequirements(requirements: list[str]) -> list[str]:
    """The requirements that are not installed, or installed in a version outside their specifier."""
    from importlib import metadata

    from packaging.requirements import Requirement

    missing = []
    for text in requirements:
        requirement = Requirement(text)
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


SHIPPED_MODEL_PATH = os.path.join(MODULE_DIR, "refnet", "weights", "refnet_phantom.pt")


def modelCardPath(modelPath: str | None) -> str:
    """The model card beside a model file: ``<name>.md`` (the shipped model's is refnet_phantom.md)."""
    return os.path.splitext(modelPath or SHIPPED_MODEL_PATH)[0] + ".md"


def modelCardSummary(modelPath: str | None) -> str:
    """A few lines from the model card, read as text: no torch import, no model load (the module opens fast).

    Shows the card's intended use and its Inputs, Spacing and Training data rows; the shipped model is
    always labelled as a demonstration model.
    """
    lines = []
    if not modelPath:
        lines.append("Demonstration model, trained on generated phantoms; train on your own data for real use.")
    card = modelCardPath(modelPath)
    try:
        with open(card, encoding="utf-8") as file:
            text = file.read()
    except OSError:
        lines.append(f"No model card beside this file ({os.path.basename(card)}): nothing is known about its "
                     "training data or spacing; its inputs are read when Refine loads it.")
        return "\n".join(lines)
    for row in text.splitlines():
        if row.startswith("**Intended use**") and modelPath:
            lines.append(row.replace("**", "").strip())
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] in ("Inputs", "Spacing", "Training data"):
            detail = cells[1].replace("`", "")
            lines.append(f"{cells[0]}: {detail if len(detail) <= 160 else detail[:157] + '...'}")
    return "\n".join(lines)


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
# Parameter node
#


class Device(enum.Enum):
    AUTO = "auto"
    GPU = "cuda"
    CPU = "cpu"

    def label(self) -> str:
        return {"auto": "Auto (GPU if available)", "cuda": "GPU (CUDA)", "cpu": "CPU"}[self.value]


@parameterNodeWrapper
class RefNetSegmentRefineParameterNode:
    """GUI state, saved with the scene.

    inputSegmentation - segmentation to refine (never modified).
    inputVolume - CT the segmentation was made on; sets the voxel grid.
    useDefaultModel - use the model shipped with the extension.
    modelPath - a RefNet model file, when useDefaultModel is off.
    device - where the net runs.
    safetyGuards - run every guard (refnet.guards); unticked: the net's raw refinement.
    showChanges - highlight the voxels RefNet changed.
    outputSegmentation - an earlier output to replace; None creates a new node.
    """

    inputSegmentation: vtkMRMLSegmentationNode
    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    useDefaultModel: bool = True
    modelPath: pathlib.Path
    device: Device = Device.AUTO
    safetyGuards: bool = True
    showChanges: bool = False


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
        with slicer.util.tryWithErrorDisplay("RefNet refinement failed."):
            if not self._ensureDependencies():
                return
            from refnet.guards import GuardConfig
            from refnet.refine import RefinementCancelled

            p = self._parameterNode
            previous = self._result
            self._setRunning(True)
            try:
                self._result = self.logic.refine(p.inputSegmentation, p.inputVolume, modelPath=self._modelPath(),
                                                 outputNode=p.outputSegmentation,
                                                 device=p.device.value,
                                                 guards=None if p.safetyGuards else GuardConfig.off(),
                                                 progressCallback=self._onProgress)
            except RefinementCancelled:
                self._showStatus("Cancelled: nothing was created or changed.")
                return
            finally:
                self._setRunning(False)
            if previous is not None and previous.outputNode is self._result.outputNode:
                previous = None  # replaced in place: nothing else to hide
            p.outputSegmentation = self._result.outputNode  # a re-run replaces it unless "Create new" is chosen
            self._showResult(previous)

    def onCancelButton(self) -> None:
        self._cancelRequested = True
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

    def _onProgress(self, done: int, total: int) -> bool:
        self.ui.progressBar.maximum = total
        self.ui.progressBar.value = done
        slicer.app.processEvents()  # keeps the GUI alive and lets the Cancel click arrive
        return not self._cancelRequested

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


REVIEW_VIEWS = (("Red", "vtkMRMLSliceNodeRed"), ("Yellow", "vtkMRMLSliceNodeYellow"))  # raw left, refined right


def showSideBySide(rawSegmentation, refinedSegmentation, volumeNode) -> int | None:
    """Review layout: raw segmentation left (Red view), refined right (Yellow), both axial on the CT, linked.

    GUI only: returns None and does nothing without a main window (batch mode), where
    ``slicer.app.layoutManager()`` is None; otherwise the layout that was shown before (for
    :func:`endReview`). Each segmentation's display is limited to its view (a display setting; no
    segment is changed).
    """
    layoutManager = slicer.app.layoutManager()
    if layoutManager is None:
        return None
    previousLayout = layoutManager.layout
    layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    # vtkMRMLLayoutLogic applies a layout's default orientation only to views it creates: the Yellow view
    # exists (sagittal) from the start-up layout, and vtkMRMLSliceLinkLogic links only equal orientations.
    for viewName, _ in REVIEW_VIEWS:
        layoutManager.sliceWidget(viewName).mrmlSliceNode().SetOrientation("Axial")
    slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)  # after the orientation: same field of view
    for segmentation, (_, viewNodeID) in zip((rawSegmentation, refinedSegmentation), REVIEW_VIEWS):
        if segmentation.GetDisplayNode() is None:
            segmentation.CreateDefaultDisplayNodes()
        displayNode = segmentation.GetDisplayNode()
        displayNode.SetVisibility(True)
        displayNode.RemoveAllViewNodeIDs()
        displayNode.AddViewNodeID(viewNodeID)
    for viewName, _ in REVIEW_VIEWS:
        layoutManager.sliceWidget(viewName).mrmlSliceCompositeNode().SetLinkedControl(True)
    return previousLayout


def endReview(rawSegmentation, previousLayout: int | None) -> None:
    """Show the input segmentation in every view again and bring back the layout from before the review."""
    displayNode = rawSegmentation.GetDisplayNode() if rawSegmentation else None
    if displayNode is not None:
        displayNode.RemoveAllViewNodeIDs()  # no view IDs = shown in all views (vtkMRMLDisplayNode)
    layoutManager = slicer.app.layoutManager()
    if layoutManager is not None and previousLayout is not None:
        layoutManager.setLayout(previousLayout)


#
# RefNetSegmentRefineLogic
#


@dataclass
class RefineResult:
    """What :meth:`RefNetSegmentRefineLogic.refine` made.

    Attributes:
        outputNode: the new segmentation node "<input name> refined".
        volumeNode: the CT whose voxel grid was used.
        changes: (I, J, K) bool, voxels whose class RefNet changed, on the CT grid.
        classChanges: ``{class index: ClassChange(added, removed)}`` per changed organ.
        unmatchedSegments: names of the segments copied unchanged.
        seconds: run time of the whole refinement.
        device: where the net ran.
        report: the status text (run time, changed voxels per organ, voxels each guard held back,
            warnings, passed-through segments).
        refineReport: the core's :class:`refnet.refine.RefineReport` (``held_back`` per guard,
            ``warnings``, ``to_dict()``), or None.
        guards: the :class:`refnet.guards.GuardConfig` used, or None.
    """

    outputNode: object
    volumeNode: object
    changes: np.ndarray
    classChanges: dict = field(default_factory=dict)
    unmatchedSegments: list = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    report: str = ""
    refineReport: RefineReport | None = None
    guards: GuardConfig | None = None


class RefNetSegmentRefineLogic(ScriptedLoadableModuleLogic):
    """Node <-> numpy adapter over the ``refnet`` core; usable without the Widget (batch, scripts).

    Reports through ``logCallback(text)`` (and ``logging``); raises ValueError / RuntimeError with a
    message meant for the user; never opens a dialog or touches the layout.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback = None
        self._model = None  # ((path, mtime, device), LoadedModel)

    def log(self, text: str) -> None:
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    def getParameterNode(self):
        return RefNetSegmentRefineParameterNode(super().getParameterNode())

    # --- dependencies

    @staticmethod
    def missingDependencies(requirementsPath: str = REQUIREMENTS_PATH) -> list[str]:
        """Names of what must be installed before refining: "PyTorch" and/or requirement lines."""
        missing = [] if importlib.util.find_spec("torch") is not None else ["PyTorch"]
        return missing + missingRequirements(readRequirements(requirementsPath))

    def installDependencies(self, requirementsPath: str = REQUIREMENTS_PATH) -> None:
        """Install PyTorch the way Slicer AI extensions do (SlicerPyTorch), then the module's own packages."""
        if importlib.util.find_spec("torch") is None:
            self._installTorch()
        missing = missingRequirements(readRequirements(requirementsPath))
        if missing:
            self.log(f"Installing Python packages: {' '.join(missing)} (may take a few minutes)...")
            slicer.util.pip_install(" ".join(missing))
        self.log("RefNet dependencies are installed.")

    def _installTorch(self) -> None:
        try:
            import PyTorchUtils
        except ModuleNotFoundError as err:
            raise RuntimeError("RefNet needs PyTorch. Install the 'PyTorch' extension from the Extensions "
                               "Manager, restart Slicer, then click Refine again.") from err
        self.log("Installing PyTorch (may take several minutes)...")
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH}")
        if torch is None:
            raise RuntimeError("PyTorch could not be installed; install it with the 'PyTorch Util' module, "
                               "then click Refine again.")

    def _requireDependencies(self) -> None:
        missing = self.missingDependencies()
        if missing:
            raise RuntimeError(f"RefNet cannot run: missing Python packages {', '.join(missing)}. Click Refine in "
                               "the RefNet module to install them (batch: run it once in the GUI first).")

    # --- model

    def loadModel(self, modelPath: str | None = None, device: str = "auto"):
        """Load (and cache) a RefNet model; ``modelPath`` None means the model shipped with the extension.

        Raises:
            FileNotFoundError: no such file (or the shipped model is missing from this installation).
            ValueError: not a RefNet model, or a model made for other classes.
        """
        self._requireDependencies()
        from refnet.checkpoint import default_model_path, load_model

        path = os.path.abspath(modelPath) if modelPath else None
        key = (path, os.path.getmtime(path) if path and os.path.isfile(path) else None, device)
        if self._model is None or self._model[0] != key:
            try:
                self._model = (key, load_model(path, device=device))
            except FileNotFoundError as err:
                if path is not None:
                    raise
                raise FileNotFoundError(f"The RefNet model shipped with the extension is missing "
                                        f"({default_model_path()}). Choose a model file under Model, or "
                                        "reinstall the RefNet extension.") from err
        return self._model[1]

    def describeModel(self, modelPath: str | None = None, *, load: bool = False) -> str:
        """The model card's summary; with ``load`` (or once Refine has loaded it) also its inputs.

        Without ``load`` nothing imports torch, so opening the module stays fast.
        """
        summary = modelCardSummary(modelPath)
        path = os.path.abspath(modelPath) if modelPath else None
        loaded = self._model is not None and self._model[0][0] == path
        if not (load or loaded):
            return summary
        if importlib.util.find_spec("torch") is None:
            return summary + "\nPyTorch is not installed yet; click Refine to install it."
        return summary + "\n" + self._describeInputs(self.loadModel(modelPath, device="cpu"))

    @staticmethod
    def _describeInputs(model) -> str:
        window = model.metadata.get("ct_window")
        if not model.uses_ct:
            return "Model input: label map only (the CT sets the voxel grid)."
        detail = f" (window {window[0]:g}/{window[1]:g} HU)" if window else ""
        return f"Model input: label map + CT intensities{detail}."

    # --- nodes <-> arrays

    @staticmethod
    def referenceVolume(segmentationNode):
        """The scalar (non-label) volume a segmentation was made on, or None."""
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        node = segmentationNode.GetNodeReference(role) if segmentationNode else None
        if node and node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode"):
            return node
        return None

    @staticmethod
    def ijkToRas(volumeNode) -> np.ndarray:
        """(4, 4) IJK-to-RAS matrix of a volume (the affine of its arrays transposed to (I, J, K))."""
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    @staticmethod
    def segmentList(segmentationNode) -> list[tuple[str, str, str]]:
        """``(segment ID, name, terminology entry)`` of every segment, in order."""
        segmentation = segmentationNode.GetSegmentation()
        segments = []
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            segment = segmentation.GetSegment(segmentId)
            terminology = vtk.reference("")
            segment.GetTag(segment.GetTerminologyEntryTagName(), terminology)
            segments.append((segmentId, segment.GetName(), str(terminology.get())))
        return segments

    def checkInputs(self, segmentationNode, volumeNode=None):
        """Validate the inputs and return the CT to use (the segmentation's reference volume by default).

        Raises:
            ValueError: nothing selected, no CT, no segments, different transforms, a segmentation that
                does not overlap the CT.
        """
        from refnet.segments import check_segmentation_grid, parse_image_geometry

        if segmentationNode is None:
            raise ValueError("Select a segmentation to refine.")
        volumeNode = volumeNode or self.referenceVolume(segmentationNode)
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ValueError("Select the CT volume the segmentation was made on; it sets the voxel grid.")
        if segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            raise ValueError(f"The segmentation '{segmentationNode.GetName()}' has no segments.")
        if segmentationNode.GetTransformNodeID() != volumeNode.GetTransformNodeID():
            raise ValueError("The segmentation and the CT are under different transforms; harden the transforms "
                             "(Data module) or put both under the same one.")
        geometry = segmentationNode.GetSegmentation().GetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
        if geometry:
            onGrid = check_segmentation_grid(*parse_image_geometry(geometry), self.ijkToRas(volumeNode),
                                             volumeNode.GetImageData().GetExtent())
            if not onGrid:
                self.log("The segmentation is on another voxel grid than the CT; its segments are resampled onto "
                         "the CT grid (nearest voxel) for refining, and the refined segments are on the CT grid.")
        else:
            self.log("The segmentation has no reference geometry; its segments are exported onto the CT grid.")
        return volumeNode

    @staticmethod
    def exportMasks(segmentationNode, segmentIds: list[str], volumeNode) -> list[np.ndarray]:
        """Each segment as an (I, J, K) bool mask on the CT's voxel grid (copies; the node is not changed).

        Exporting converts a closed-surface or RT-structure source into a binary labelmap and keeps it on the
        node it exports from (ExportSegmentsToLabelmapNode calls CreateRepresentation), so such an input is
        exported from a temporary copy; a binary-labelmap input has nothing to convert and is read directly.
        """
        arrayFrom = slicer.util.arrayFromSegmentBinaryLabelmap  # (K, J, I) copy in the reference geometry
        binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        source, copy = segmentationNode, None
        if not segmentationNode.GetSegmentation().ContainsRepresentation(binary):
            copy = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                      slicer.mrmlScene.GenerateUniqueName("RefNet export copy"))
            copy.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())
            copy.GetSegmentation().DeepCopy(segmentationNode.GetSegmentation())
            source = copy
        try:
            return [arrayFrom(source, segmentId, volumeNode).transpose(2, 1, 0) > 0 for segmentId in segmentIds]
        finally:
            if copy is not None:
                slicer.mrmlScene.RemoveNode(copy)

    @staticmethod
    def _importMasks(segmentationNode, segmentIds: list[str], masks: list[np.ndarray], volumeNode) -> None:
        """Set segments from (I, J, K) masks on the CT grid, one labelmap import per non-overlapping layer."""
        from refnet.segments import pack_layers

        for layer, members in pack_layers(masks):
            labelmapNode = slicer.modules.volumes.logic().CreateAndAddLabelVolume(volumeNode, "__RefNet_temp__")
            try:
                labelmapNode.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())
                slicer.util.updateVolumeFromArray(labelmapNode, np.ascontiguousarray(layer.transpose(2, 1, 0)))
                ids = vtk.vtkStringArray()
                for member in members:
                    ids.InsertNextValue(segmentIds[member])
                if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(
                        labelmapNode, segmentationNode, ids):
                    raise RuntimeError("Slicer could not import the refined label map into the new segmentation.")
            finally:
                slicer.mrmlScene.RemoveNode(labelmapNode)

    def createRefinedNode(self, segmentationNode, volumeNode, segmentIds, masks, name: str | None = None,
                          unique: bool = True):
        """A new segmentation: a copy of the input (names, colours, terminology, IDs, order) whose listed
        segments are replaced by ``masks``; removed again if anything fails."""
        name = name or f"{segmentationNode.GetName()} refined"
        # The scene does not rename a named node: without a unique name a re-run gives two equal names.
        outputNode = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(name) if unique else name)
        try:
            outputNode.CreateDefaultDisplayNodes()
            outputNode.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())
            outputNode.GetSegmentation().DeepCopy(segmentationNode.GetSegmentation())
            outputNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            binaryLabelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
            if outputNode.GetSegmentation().GetSourceRepresentationName() != binaryLabelmap:
                outputNode.GetSegmentation().CreateRepresentation(binaryLabelmap)
                outputNode.SetSourceRepresentationToBinaryLabelmap()
            self._importMasks(outputNode, segmentIds, masks, volumeNode)
            shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
            parentItem = shNode.GetItemParent(shNode.GetItemByDataNode(segmentationNode))
            shNode.SetItemParent(shNode.GetItemByDataNode(outputNode), parentItem)
        except Exception:
            slicer.mrmlScene.RemoveNode(outputNode)
            raise
        return outputNode

    def createChangesNode(self, result: RefineResult):
        """A segmentation with one segment, "Changed by RefNet", holding ``result.changes``."""
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{result.outputNode.GetName()} changes")
        try:
            node.CreateDefaultDisplayNodes()
            node.SetAndObserveTransformNodeID(result.outputNode.GetTransformNodeID())
            node.SetReferenceImageGeometryParameterFromVolumeNode(result.volumeNode)
            segmentId = node.GetSegmentation().AddEmptySegment("RefNetChanges", "Changed by RefNet", CHANGES_COLOR)
            self._importMasks(node, [segmentId], [result.changes], result.volumeNode)
        except Exception:
            slicer.mrmlScene.RemoveNode(node)
            raise
        return node

    # --- refinement

    def refineArraysWithReport(self, labels: np.ndarray, affine: np.ndarray, ct: np.ndarray | None = None, *,
                               model=None, modelPath: str | None = None, device: str = "auto",
                               labelScheme: str = "refnet", guards: GuardConfig | None = None,
                               progressCallback=None) -> CoreRefineResult:
        """Refine an (I, J, K) label map (+ CT) given as numpy arrays, with the report: the batch script's path.

        Same code as plain Python (:func:`refnet.batch.refine_label_map_with_report`); ``model`` defaults
        to :meth:`loadModel` ``(modelPath, device)``; ``guards`` is a :class:`refnet.guards.GuardConfig`
        (None: every guard on, the model file's values). The inputs are not modified.

        Returns:
            A :class:`refnet.refine.RefineResult`: ``labels`` (new array, input's scheme) and ``report``
            (changes per class, voxels held back per guard, warnings).
        """
        from refnet.batch import refine_label_map_with_report
        from refnet.refine import RefineConfig

        model = model or self.loadModel(modelPath, device)
        config = RefineConfig() if guards is None else RefineConfig(guards=guards)
        return refine_label_map_with_report(labels, affine, ct, model=model, scheme=labelScheme, config=config,
                                            progress=progressCallback)

    def refineArrays(self, labels: np.ndarray, affine: np.ndarray, ct: np.ndarray | None = None, *,
                     model=None, modelPath: str | None = None, device: str = "auto",
                     labelScheme: str = "refnet", guards: GuardConfig | None = None,
                     progressCallback=None) -> np.ndarray:
        """:meth:`refineArraysWithReport` without the report: the refined (I, J, K) array alone."""
        return self.refineArraysWithReport(labels, affine, ct, model=model, modelPath=modelPath, device=device,
                                           labelScheme=labelScheme, guards=guards,
                                           progressCallback=progressCallback).labels

    def refine(self, segmentationNode, volumeNode=None, *, modelPath: str | None = None, device: str = "auto",
               guards: GuardConfig | None = None, progressCallback=None, outputNode=None) -> RefineResult:
        """Refine a segmentation into a new node "<name> refined"; the input node is never modified.

        Args:
            segmentationNode: vtkMRMLSegmentationNode to refine.
            volumeNode: its CT (default: the segmentation's reference volume); sets the voxel grid.
            modelPath: RefNet model file; None uses the shipped model.
            device: "auto" (GPU if available), "cuda" or "cpu".
            guards: :class:`refnet.guards.GuardConfig`; None runs every guard with the model file's values,
                ``GuardConfig.off()`` none. The status text lists what each guard held back.
            progressCallback: ``progressCallback(done, total)`` per slice batch; return False to cancel.
            outputNode: an earlier output segmentation to replace (its contents are swapped only after the
                refinement succeeded); None creates a new node.

        Raises:
            ValueError: bad inputs (see :meth:`checkInputs`), no segment matching a RefNet class, a model
                for other classes.
            refnet.refine.RefinementCancelled: cancelled; nothing was created.
        """
        from refnet.guards import GuardConfig
        from refnet.segments import class_changes, compose_class_map, format_report, match_segments

        self._requireDependencies()
        guards = guards or GuardConfig()
        if outputNode is not None and outputNode is segmentationNode:
            raise ValueError("The output cannot be the input segmentation (it is never modified); choose "
                             "'Create new segmentation' or an earlier RefNet output.")
        volumeNode = self.checkInputs(segmentationNode, volumeNode)
        model = self.loadModel(modelPath, device)
        segments = self.segmentList(segmentationNode)
        classes = match_segments([(name, terminology) for _, name, terminology in segments])
        ids = [segmentId for (segmentId, _, _), c in zip(segments, classes) if c]
        matched = [c for c in classes if c]
        unmatched = [name for (_, name, _), c in zip(segments, classes) if not c]
        if not ids:
            raise ValueError(self._noMatchMessage([name for _, name, _ in segments]))
        self.log(f"Refining {len(ids)} segments on {model.device}; "
                 f"copied unchanged: {', '.join(unmatched) or 'none'}.")
        start = time.perf_counter()
        masks = self.exportMasks(segmentationNode, ids, volumeNode)
        raw = compose_class_map(masks, matched)
        affine = self.ijkToRas(volumeNode)
        ct = self._ctArray(volumeNode) if model.uses_ct else None
        core = self.refineArraysWithReport(raw, affine, ct, model=model, guards=guards,
                                           progressCallback=progressCallback)
        refined = core.labels
        replacing = outputNode is not None and slicer.mrmlScene.IsNodePresent(outputNode)
        built = self._buildOutput(segmentationNode, volumeNode, ids, masks, matched, refined, affine,
                                  temporary=replacing)
        outputNode = self._replaceInto(outputNode, built) if replacing else built
        changes, seconds = class_changes(raw, refined), time.perf_counter() - start
        report = format_report(changes, seconds=seconds, device=str(model.device), unmatched=unmatched,
                               unassigned=self._unassigned(refined, matched), report=core.report, guards=guards)
        self.log(report)
        return RefineResult(outputNode, volumeNode, raw != refined, changes, unmatched, seconds,
                            str(model.device), report, core.report, guards)

    def _buildOutput(self, segmentationNode, volumeNode, ids, masks, matched, refined, affine, temporary=False):
        from refnet.segments import split_class_map

        if not (slicer.mrmlScene.IsNodePresent(segmentationNode) and slicer.mrmlScene.IsNodePresent(volumeNode)):
            raise RuntimeError("The segmentation or the CT was removed during refinement; nothing was created.")
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        outMasks = split_class_map(refined, masks, matched, spacing=spacing)
        # A node that only carries the segments into an earlier output takes no name from the unique-name counter.
        return self.createRefinedNode(segmentationNode, volumeNode, ids, outMasks,
                                      name="RefNet temporary output" if temporary else None, unique=not temporary)

    @staticmethod
    def _replaceInto(target, built):
        """``target`` holding ``built``'s segments (its node ID and name kept); ``built`` is removed."""
        target.GetSegmentation().DeepCopy(built.GetSegmentation())
        target.SetAndObserveTransformNodeID(built.GetTransformNodeID())
        if target.GetDisplayNode() is None:
            target.CreateDefaultDisplayNodes()
        slicer.mrmlScene.RemoveNode(built)
        return target

    @staticmethod
    def _ctArray(volumeNode) -> np.ndarray:
        """(I, J, K) float32 copy of the CT's voxels (HU)."""
        return np.asarray(slicer.util.arrayFromVolume(volumeNode), np.float32).transpose(2, 1, 0).copy()

    @staticmethod
    def _unassigned(refined: np.ndarray, matched: list[int]) -> dict[int, int]:
        from refnet.segments import unassigned_voxels

        return unassigned_voxels(refined, matched)

    @staticmethod
    def _noMatchMessage(names: list[str]) -> str:
        from refnet.labels import CLASS_NAMES

        return (f"None of the segments ({', '.join(names)}) matches a RefNet class. Rename them to one of: "
                f"{', '.join(CLASS_NAMES[1:])} (TotalSegmentator names such as kidney_right also work), "
                "or set their terminology.")

    # --- training (headless)

    def train(self, datasetDir: str, predictionDirs: list[str], outputModelPath: str, *, preset: str = "demo",
              useCt: bool = False, labelScheme: str = "refnet", extraLabelDirs: tuple[str, ...] = (),
              extraLabelsScheme: str = "refnet", workDir: str | None = None, progress: bool = False,
              **trainConfig):
        """Train a RefNet model from a BTCV-layout dataset and folders of models' predictions (headless).

        The same as ``refnet train``: :func:`refnet.train.train_from_folders` with the ``demo`` preset (trains in
        minutes on a CPU) or the ``paper`` one, ``useCt`` adding the CT channel, and ``trainConfig`` overriding
        :class:`refnet.train.TrainConfig` fields (e.g. ``epochs=20``). Used by Scripts/RefNetTrain.py.

        Returns:
            The written model path; choose it under Model to refine with it.
        """
        self._requireDependencies()
        from dataclasses import replace

        from refnet.pipeline import DemoConfig
        from refnet.train import TrainConfig, train_from_folders

        if preset not in ("demo", "paper"):
            raise ValueError(f"preset must be 'demo' or 'paper', got {preset!r}.")
        config = DemoConfig().train if preset == "demo" else TrainConfig()
        if useCt:
            trainConfig["model"] = replace(config.model, ct_channels=1)
        return train_from_folders(datasetDir, list(predictionDirs), outputModelPath,
                                  config=replace(config, **trainConfig), work_dir=workDir, scheme=labelScheme,
                                  progress=progress, extra_label_dirs=tuple(extraLabelDirs),
                                  extra_scheme=extraLabelsScheme)


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
