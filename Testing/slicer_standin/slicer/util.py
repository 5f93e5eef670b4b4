"""Stand-in for the ``slicer.util`` functions RefNetSegmentRefine uses (contracts from Slicer's util.py).

Arrays are (K, J, I) like Slicer's. ``arrayFromVolume`` returns a view (as Slicer's does);
``arrayFromSegmentBinaryLabelmap`` and ``update*FromArray`` copy. Each segment keeps the grid it was
imported on; export resamples it onto the reference volume's grid by nearest voxel, as Slicer does.
Dialogs only log and confirmations answer True, which is what Slicer does when testing.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import vtk

import slicer

logger = logging.getLogger(__name__)

pip_installed: list[str] = []  # stand-in only: what pip_install was asked for


def arrayFromVolume(volumeNode) -> np.ndarray:
    return volumeNode._array


def updateVolumeFromArray(volumeNode, narray: np.ndarray) -> None:
    if np.asarray(narray).dtype == np.int64:
        raise RuntimeError("Unsupported numpy array type: long long")
    volumeNode._array = np.array(narray, copy=True)


def addVolumeFromArray(narray, ijkToRAS=None, name=None, nodeClassName=None):
    node = slicer.mrmlScene.AddNewNodeByClass(nodeClassName or "vtkMRMLScalarVolumeNode", name or "")
    if ijkToRAS is not None:
        node._ijk_to_ras = np.array(ijkToRAS, dtype=float)
    updateVolumeFromArray(node, narray)
    node.CreateDefaultDisplayNodes()
    return node


def arrayFromVTKMatrix(vmatrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[vmatrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def _reference(segmentationNode, referenceVolumeNode):
    if referenceVolumeNode is None:
        referenceVolumeNode = segmentationNode.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
        if referenceVolumeNode is None:
            raise RuntimeError("No reference volume is found in the input segmentationNode, "
                               "therefore a valid referenceVolumeNode input is required.")
    slicer._same_transform(segmentationNode, referenceVolumeNode)
    return referenceVolumeNode


def arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode=None) -> np.ndarray:
    """util.py: exports through vtkSlicerSegmentationsModuleLogic::ExportSegmentsToLabelmapNode, which first
    converts the source representation (closed surface, RT structure) into a binary labelmap *on the node*
    (CreateRepresentation): the node gains a representation. Voxels come from the stored masks here."""
    reference = _reference(segmentationNode, referenceVolumeNode)
    segmentationNode.GetSegmentation().CreateRepresentation("Binary labelmap")
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        raise RuntimeError("Export of segment failed.")
    if segment.mask is None:
        return np.zeros(reference._array.shape, dtype=np.int16)
    return slicer._resample(segment.mask, segment.grid, reference._geometry()).astype(np.int16)


def updateSegmentBinaryLabelmapFromArray(narray, segmentationNode, segmentId, referenceVolumeNode=None) -> None:
    reference = _reference(segmentationNode, referenceVolumeNode)
    if tuple(np.shape(narray)) != reference._array.shape:
        raise RuntimeError("stand-in: the array must have the reference volume's (K, J, I) shape.")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    labelmap = slicer.modules.volumes.logic().CreateAndAddLabelVolume(reference, "__temp__")
    try:
        updateVolumeFromArray(labelmap, (np.asarray(narray) > 0).astype(np.uint8))
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentationNode, ids)
    finally:
        slicer.mrmlScene.RemoveNode(labelmap)


class VTKObservationMixin:
    def __init__(self) -> None:
        self.Observations = []

    def addObserver(self, obj, event, method, group="none", priority=0.0) -> None:
        self.Observations.append((obj, event, method))

    def removeObserver(self, obj, event, method) -> None:
        self.Observations = [o for o in self.Observations if o != (obj, event, method)]

    def removeObservers(self, method=None) -> None:
        self.Observations = []


@contextlib.contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    try:
        yield
    except Exception as err:
        logger.error("%s %s", message or "", err)
        raise


def errorDisplay(text, **kwargs) -> None:
    logger.error("%s", text)


def infoDisplay(text, **kwargs) -> None:
    logger.info("%s", text)


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs) -> bool:
    logger.info("%s", text)
    return True


def delayDisplay(message, autoCloseMsec=1000, parent=None, **kwargs) -> None:
    logger.info("%s", message)


def pip_install(requirements, **kwargs) -> None:
    pip_installed.append(requirements)


def exit(status=0) -> None:
    slicer.app.exit(status)


def setSliceViewerLayers(background=None, fit=False, **kwargs) -> None:
    """slicer.util.setSliceViewerLayers: the background volume of every slice view; ``fit`` resets the views
    (util.py: resetSliceViews -> each view's FitSliceToAll). No-op without a main window here."""
    layoutManager = slicer.app.layoutManager()
    if layoutManager is None:
        return
    for name in layoutManager.sliceViewNames():
        widget = layoutManager.sliceWidget(name)
        if background is not None:
            widget.mrmlSliceCompositeNode().background_volume_id = background.GetID()
        if fit:
            widget.sliceLogic().FitSliceToAll()


def launchConsoleProcess(args, useStartupEnvironment=True, updateEnvironment=None, cwd=None, **kwargs):
    """util.py: a Popen of ``args`` with stdout and stderr merged, text mode; ``updateEnvironment`` entries
    are set in (a copy of) the environment. The startup environment is this process's here."""
    import os
    import subprocess

    env = dict(os.environ)
    env.update(updateEnvironment or {})
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
