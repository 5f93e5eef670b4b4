"""The side-by-side review of raw and refined segmentations (GUI only; no-ops without a main window)."""

from __future__ import annotations

import slicer

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
