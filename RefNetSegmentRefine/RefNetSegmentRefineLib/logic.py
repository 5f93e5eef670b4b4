"""The module's Logic: MRML nodes <-> numpy arrays around the Slicer-free ``refnet`` core, and the GUI state.

It opens no dialogs and never touches the layout, so it also runs in batch mode
(``Slicer --no-main-window --python-script``) and from other scripts (Scripts/RefNetBatchRefine.py,
Scripts/RefNetTrain.py). ``refnet`` (and with it torch) is imported inside the methods that need it, so
the module loads, and can offer to install PyTorch, on a Slicer where torch is missing.
"""

from __future__ import annotations

import dataclasses
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
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from .dependencies import MINIMUM_TORCH, REQUIREMENTS_PATH, missingRequirements, readRequirements
from .modelcard import modelCardSummary

if TYPE_CHECKING:  # refnet.refine imports torch, which may not be installed yet
    from refnet.guards import GuardConfig
    from refnet.refine import RefineReport
    from refnet.refine import RefineResult as CoreRefineResult

CHANGES_COLOR = (1.0, 0.9, 0.0)  # "show changes" overlay: yellow


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
    dropPieces - apply the model file's piece decision (refnet.pieces) after the net and its guards.
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
    dropPieces: bool = True
    showChanges: bool = False


def guardSettings(safetyGuards: bool, dropPieces: bool) -> GuardConfig | None:
    """The :class:`refnet.guards.GuardConfig` of the Advanced boxes; None for the defaults (every guard, with
    the model file's values, and the piece decision)."""
    from refnet.guards import GuardConfig

    if safetyGuards and dropPieces:
        return None
    guards = GuardConfig() if safetyGuards else GuardConfig.off()
    return dataclasses.replace(guards, drop_pieces=dropPieces)


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


@dataclass
class PreparedRefinement:
    """The exported inputs of one refinement, between :meth:`RefNetSegmentRefineLogic.prepareRefinement` and
    :meth:`~RefNetSegmentRefineLogic.finishRefinement`."""

    segmentationNode: object
    volumeNode: object
    outputNode: object
    ids: list
    masks: list
    matched: list
    unmatched: list
    raw: np.ndarray  # (I, J, K) RefNet class map on the CT grid
    affine: np.ndarray
    ct: np.ndarray | None
    start: float  # perf_counter at the start, for the run time in the status text


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
        if not getattr(model, "net_uses_ct", True):
            return "Model input: label map; its piece decider also reads the CT intensities."
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

        Runs in this process (scripts, batch); the Widget uses :meth:`startBackgroundRefine` instead.

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

        self._requireDependencies()
        guards = guards or GuardConfig()
        model = self.loadModel(modelPath, device)
        job = self.prepareRefinement(segmentationNode, volumeNode, outputNode=outputNode, withCt=model.uses_ct)
        self.log(f"Refining {len(job.ids)} segments on {model.device}; "
                 f"copied unchanged: {', '.join(job.unmatched) or 'none'}.")
        core = self.refineArraysWithReport(job.raw, job.affine, job.ct, model=model, guards=guards,
                                           progressCallback=progressCallback)
        return self.finishRefinement(job, core.labels, core.report, guards=guards, device=str(model.device))

    def prepareRefinement(self, segmentationNode, volumeNode=None, *, outputNode=None,
                          withCt: bool = True) -> PreparedRefinement:
        """Check the inputs and export the matched segments as one class map on the CT grid (GUI thread).

        Raises:
            ValueError: bad inputs, the output is the input, or no segment matches a RefNet class.
        """
        from refnet.segments import compose_class_map, match_segments

        if outputNode is not None and outputNode is segmentationNode:
            raise ValueError("The output cannot be the input segmentation (it is never modified); choose "
                             "'Create new segmentation' or an earlier RefNet output.")
        volumeNode = self.checkInputs(segmentationNode, volumeNode)
        segments = self.segmentList(segmentationNode)
        classes = match_segments([(name, terminology) for _, name, terminology in segments])
        ids = [segmentId for (segmentId, _, _), c in zip(segments, classes) if c]
        matched = [c for c in classes if c]
        unmatched = [name for (_, name, _), c in zip(segments, classes) if not c]
        if not ids:
            raise ValueError(self._noMatchMessage([name for _, name, _ in segments]))
        start = time.perf_counter()
        masks = self.exportMasks(segmentationNode, ids, volumeNode)
        return PreparedRefinement(segmentationNode, volumeNode, outputNode, ids, masks, matched, unmatched,
                                  compose_class_map(masks, matched), self.ijkToRas(volumeNode),
                                  self._ctArray(volumeNode) if withCt else None, start)

    def finishRefinement(self, job: PreparedRefinement, refined: np.ndarray, coreReport, *, guards,
                         device: str) -> RefineResult:
        """Build (or swap into the chosen earlier output) the refined node and the status text (GUI thread)."""
        from refnet.segments import class_changes, format_report

        replacing = job.outputNode is not None and slicer.mrmlScene.IsNodePresent(job.outputNode)
        built = self._buildOutput(job.segmentationNode, job.volumeNode, job.ids, job.masks, job.matched, refined,
                                  job.affine, temporary=replacing)
        outputNode = self._replaceInto(job.outputNode, built) if replacing else built
        changes, seconds = class_changes(job.raw, refined), time.perf_counter() - job.start
        report = format_report(changes, seconds=seconds, device=device, unmatched=job.unmatched,
                               unassigned=self._unassigned(refined, job.matched), report=coreReport, guards=guards)
        self.log(report)
        return RefineResult(outputNode, job.volumeNode, job.raw != refined, changes, job.unmatched, seconds,
                            device, report, coreReport, guards)

    def startBackgroundRefine(self, segmentationNode, volumeNode=None, *, modelPath: str | None = None,
                              device: str = "auto", guards: GuardConfig | None = None, outputNode=None):
        """Start :meth:`refine`'s work in a separate process (``refnet.worker``); returns its handle.

        The segments are exported here; the network runs in the process, whose stdout carries progress,
        so the GUI stays live and :meth:`BackgroundRefinement.cancel` can stop it at any moment with the
        scene unchanged. Poll the handle from a timer, then call its ``result()`` on the GUI thread.
        """
        from refnet.guards import GuardConfig

        from .background import BackgroundRefinement

        self._requireDependencies()
        guards = guards or GuardConfig()
        # The CT goes along always: whether the model reads it is known only once the process loaded it.
        job = self.prepareRefinement(segmentationNode, volumeNode, outputNode=outputNode, withCt=True)
        self.log(f"Refining {len(job.ids)} segments in a background process; "
                 f"copied unchanged: {', '.join(job.unmatched) or 'none'}.")
        return BackgroundRefinement.start(self, job, modelPath=modelPath, device=device, guards=guards)

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
              pieces: bool = False, piecesCt: bool = False, **trainConfig):
        """Train a RefNet model from a BTCV-layout dataset and folders of models' predictions (headless).

        The same as ``refnet train``: :func:`refnet.train.train_from_folders` with the ``demo`` preset (trains in
        minutes on a CPU) or the ``paper`` one, ``useCt`` adding the CT channel, and ``trainConfig`` overriding
        :class:`refnet.train.TrainConfig` fields (e.g. ``epochs=20``); ``pieces`` also fits the keep/drop decision
        per connected piece into the model file (``refnet train --pieces``), ``piecesCt`` one that also reads the
        CT (``--pieces-ct``). Used by Scripts/RefNetTrain.py.

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
                                  extra_scheme=extraLabelsScheme, pieces=pieces, pieces_ct=piecesCt)
