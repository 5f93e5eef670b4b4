"""A small stand-in for the parts of 3D Slicer's Python API that RefNetSegmentRefine's Logic uses.

It lets plain pytest import the module and drive the Logic's node <-> numpy conversion and refine
path. Each class mimics the *contract* read in Slicer's source (method names, argument order,
(K, J, I) array layout, which calls copy), backed by numpy:

- a scene that adds, finds and removes nodes;
- volume nodes: a (K, J, I) array plus an IJK-to-RAS matrix;
- segmentation nodes: ordered segments (name, colour, tags, one 0/1 mask on the segmentation's
  reference grid), the "Reference image geometry" conversion parameter serialized exactly like
  vtkSegmentationConverter::SerializeImageGeometry, DeepCopy, and the labelmap import with
  updatedSegmentIDs (label N -> N-th ID);
- ``slicer.util`` array helpers, dialogs that only log (as Slicer does without a main window);
- an application without a main window: ``slicer.app.layoutManager()`` is None, as in batch mode.

What it does NOT verify (only real Slicer can): resampling through parent transforms (the stand-in
raises NotImplementedError); interpolation beyond nearest-voxel resampling between grids; shared
labelmap layers, label values and representation conversion (closed surface etc.); VTK memory
semantics (views into VTK arrays, reference counting); rendering, display nodes beyond storing
their settings, slice views beyond orientation, fit and linking; Qt widgets, the .ui loader, signals
and the parameter node GUI binding (``parameterNodeWrapper`` is a no-op decorator here); the terminology module; pip,
PyTorch installation and Slicer's command-line/exit handling.
"""

from __future__ import annotations

import itertools
import types

import numpy as np
import vtk


def _serialize_geometry(ijk_to_ras: np.ndarray, dims_ijk: tuple[int, int, int]) -> str:
    extent = [0, dims_ijk[0] - 1, 0, dims_ijk[1] - 1, 0, dims_ijk[2] - 1]
    return "".join(f"{float(v)!r};" for v in np.asarray(ijk_to_ras, float).ravel()) + "".join(f"{e};" for e in extent)


# ------------------------------------------------------------------------------------------------ nodes


class vtkMRMLNode:
    def __init__(self) -> None:
        self._id: str | None = None
        self._name = ""
        self._references: dict[str, str] = {}
        self._transform_id: str | None = None
        self._display: vtkMRMLDisplayNode | None = None
        self._scene: vtkMRMLScene | None = None
        self._singleton_tag: str | None = None
        self._attributes: dict[str, str] = {}

    def GetID(self) -> str | None:
        return self._id

    def GetName(self) -> str:
        return self._name

    def SetName(self, name: str) -> None:
        self._name = name

    def GetClassName(self) -> str:
        return type(self).__name__

    def IsA(self, class_name: str) -> bool:
        return any(cls.__name__ == class_name for cls in type(self).__mro__)

    def GetScene(self) -> vtkMRMLScene | None:
        return self._scene

    def SetAttribute(self, name: str, value: str) -> None:
        self._attributes[name] = value

    def GetAttribute(self, name: str) -> str | None:
        return self._attributes.get(name)

    def SetSingletonTag(self, tag: str) -> None:
        self._singleton_tag = tag

    def SetNodeReferenceID(self, role: str, node_id: str | None) -> None:
        self._references[role] = node_id

    def GetNodeReference(self, role: str) -> vtkMRMLNode | None:
        node_id = self._references.get(role)
        return self._scene.GetNodeByID(node_id) if (self._scene and node_id) else None

    def GetTransformNodeID(self) -> str | None:
        return self._transform_id

    def SetAndObserveTransformNodeID(self, node_id: str | None) -> None:
        self._transform_id = node_id or None

    def GetDisplayNode(self) -> vtkMRMLDisplayNode | None:
        return self._display

    def CreateDefaultDisplayNodes(self) -> None:
        if self._display is None:
            self._display = vtkMRMLDisplayNode()


class vtkMRMLScriptedModuleNode(vtkMRMLNode):
    pass


class vtkMRMLDisplayNode(vtkMRMLNode):
    """Stores display settings only; nothing is rendered."""

    def __init__(self) -> None:
        super().__init__()
        self.visibility = True
        self.view_node_ids: list[str] = []

    def SetVisibility(self, visible: bool) -> None:
        self.visibility = bool(visible)

    def GetVisibility(self) -> bool:
        return self.visibility

    def AddViewNodeID(self, view_id: str) -> None:
        self.view_node_ids.append(view_id)

    def RemoveAllViewNodeIDs(self) -> None:
        self.view_node_ids = []

    def SetVisibility2DFill(self, visible: bool) -> None:
        self.fill = bool(visible)

    def SetVisibility2DOutline(self, visible: bool) -> None:
        self.outline = bool(visible)


class _ImageData:
    def __init__(self, dims_ijk: tuple[int, int, int]) -> None:
        self._dims = dims_ijk

    def GetDimensions(self) -> tuple[int, int, int]:
        return self._dims

    def GetExtent(self) -> tuple[int, int, int, int, int, int]:
        i, j, k = self._dims
        return (0, i - 1, 0, j - 1, 0, k - 1)


class vtkMRMLScalarVolumeNode(vtkMRMLNode):
    """Voxels as a (K, J, I) numpy array, plus the IJK-to-RAS matrix."""

    def __init__(self) -> None:
        super().__init__()
        self._array: np.ndarray | None = None
        self._ijk_to_ras = np.eye(4)

    def GetIJKToRASMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        for i, j in itertools.product(range(4), range(4)):
            matrix.SetElement(i, j, self._ijk_to_ras[i, j])

    def SetIJKToRASMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        self._ijk_to_ras = np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])

    def GetImageData(self) -> _ImageData | None:
        return None if self._array is None else _ImageData(tuple(reversed(self._array.shape)))

    def _geometry(self) -> str:
        return _serialize_geometry(self._ijk_to_ras, tuple(reversed(self._array.shape)))


class vtkMRMLLabelMapVolumeNode(vtkMRMLScalarVolumeNode):
    pass


class vtkSegment:
    def __init__(self, name: str = "", color: tuple[float, float, float] = (0.5, 0.5, 0.5)) -> None:
        self._name = name
        self._color = tuple(color)
        self._tags: dict[str, str] = {}
        self.mask: np.ndarray | None = None  # (K, J, I) uint8 on the grid ``grid``
        self.grid: str | None = None  # serialized geometry of ``mask`` (each segment keeps its own, as in Slicer)

    @staticmethod
    def GetTerminologyEntryTagName() -> str:
        return "TerminologyEntry"

    def GetName(self) -> str:
        return self._name

    def SetName(self, name: str) -> None:
        self._name = name

    def GetColor(self) -> tuple[float, float, float]:
        return self._color

    def SetColor(self, r: float, g: float | None = None, b: float | None = None) -> None:
        self._color = tuple(r) if g is None else (r, g, b)

    def SetTag(self, name: str, value: str) -> None:
        self._tags[name] = str(value)

    def GetTag(self, name: str, value: vtk.reference) -> bool:
        if name not in self._tags:
            return False
        value.set(self._tags[name])
        return True

    def _copy(self) -> vtkSegment:
        other = vtkSegment(self._name, self._color)
        other._tags = dict(self._tags)
        other.mask = None if self.mask is None else self.mask.copy()
        other.grid = self.grid
        return other


class vtkSegmentationConverter:
    @staticmethod
    def GetReferenceImageGeometryParameterName() -> str:
        return "Reference image geometry"

    @staticmethod
    def GetSegmentationBinaryLabelmapRepresentationName() -> str:
        return "Binary labelmap"


class vtkSegmentation:
    def __init__(self) -> None:
        self._ids: list[str] = []
        self._segments: dict[str, vtkSegment] = {}
        self._parameters: dict[str, str] = {}
        self._source = "Binary labelmap"
        self._derived: set[str] = set()  # representations converted from the source
        self._counter = itertools.count(1)

    def GetNumberOfSegments(self) -> int:
        return len(self._ids)

    def GetNthSegmentID(self, index: int) -> str:
        return self._ids[index]

    def GetSegment(self, segment_id: str) -> vtkSegment | None:
        return self._segments.get(segment_id)

    def GetSegmentIdBySegmentName(self, name: str) -> str:
        return next((sid for sid in self._ids if self._segments[sid].GetName() == name), "")

    def AddEmptySegment(self, segmentId: str = "", segmentName: str = "", color=None) -> str:
        sid = segmentId or f"Segment_{next(self._counter)}"
        self._ids.append(sid)
        self._segments[sid] = vtkSegment(segmentName or sid, color if color is not None else (0.5, 0.5, 0.5))
        return sid

    def GetConversionParameter(self, name: str) -> str:
        return self._parameters.get(name, "")

    def SetConversionParameter(self, name: str, value: str) -> None:
        self._parameters[name] = value

    def GetSourceRepresentationName(self) -> str:
        return self._source

    def ContainsRepresentation(self, name: str) -> bool:
        return name == self._source or name in self._derived

    def CreateRepresentation(self, name: str) -> bool:
        """vtkSegmentation::CreateRepresentation: converts the source into ``name`` and keeps it on the node."""
        if name != self._source:
            self._derived.add(name)
        return True

    def _representations(self) -> set[str]:
        """Stand-in only (tests): every representation the segmentation holds."""
        return {self._source} | self._derived

    def DeepCopy(self, other: vtkSegmentation) -> None:
        self._ids = list(other._ids)
        self._segments = {sid: seg._copy() for sid, seg in other._segments.items()}
        self._parameters = dict(other._parameters)
        self._source = other._source
        self._derived = set(other._derived)


class vtkMRMLSegmentationNode(vtkMRMLNode):
    def __init__(self) -> None:
        super().__init__()
        self._segmentation = vtkSegmentation()

    @staticmethod
    def GetReferenceImageGeometryReferenceRole() -> str:
        return "referenceImageGeometryRef"

    def GetSegmentation(self) -> vtkSegmentation:
        return self._segmentation

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volume: vtkMRMLScalarVolumeNode) -> None:
        if volume is None or volume.GetImageData() is None:
            return
        name = vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        self._segmentation.SetConversionParameter(name, volume._geometry())
        self.SetNodeReferenceID(self.GetReferenceImageGeometryReferenceRole(), volume.GetID())

    def SetSourceRepresentationToBinaryLabelmap(self) -> bool:
        self._segmentation._source = "Binary labelmap"
        return True

    def SetSourceRepresentationToClosedSurface(self) -> bool:
        self._segmentation._source = "Closed surface"
        return True

    def _grid(self) -> str:
        return self._segmentation.GetConversionParameter(
            vtkSegmentationConverter.GetReferenceImageGeometryParameterName())


class vtkMRMLSubjectHierarchyNode(vtkMRMLNode):
    """Item tree with only what placing a node needs: item per data node, parent get/set."""

    def __init__(self) -> None:
        super().__init__()
        self._items: dict[str, int] = {}
        self._parents: dict[int, int] = {}

    @staticmethod
    def GetSubjectHierarchyNode(scene: vtkMRMLScene) -> vtkMRMLSubjectHierarchyNode:
        return scene._subject_hierarchy

    def GetItemByDataNode(self, node: vtkMRMLNode) -> int:
        return self._items.setdefault(node.GetID(), len(self._items) + 2)  # 1 is the scene item

    def GetItemParent(self, item: int) -> int:
        return self._parents.get(item, 1)

    def SetItemParent(self, item: int, parent: int) -> None:
        self._parents[item] = parent


# ------------------------------------------------------------------------------------------------ scene


class vtkMRMLScene:
    StartCloseEvent = 66
    EndCloseEvent = 67

    def __init__(self) -> None:
        self._nodes: list[vtkMRMLNode] = []
        self._ids = itertools.count(1)
        self._subject_hierarchy = vtkMRMLSubjectHierarchyNode()
        self._unique_names: dict[str, int] = {}

    def AddNode(self, node: vtkMRMLNode) -> vtkMRMLNode:
        node._id = f"{node.GetClassName()}{next(self._ids)}"
        node._scene = self
        self._nodes.append(node)
        return node

    def AddNewNodeByClass(self, class_name: str, name: str = "") -> vtkMRMLNode:
        node = globals()[class_name]()
        node.SetName(name)
        return self.AddNode(node)

    def CreateNodeByClass(self, class_name: str) -> vtkMRMLNode:
        return globals()[class_name]()

    def RemoveNode(self, node: vtkMRMLNode) -> None:
        if node in self._nodes:
            self._nodes.remove(node)
            node._scene = None

    def IsNodePresent(self, node: vtkMRMLNode) -> int:
        return int(any(n is node for n in self._nodes))

    def GetNodeByID(self, node_id: str) -> vtkMRMLNode | None:
        return next((n for n in self._nodes if n.GetID() == node_id), None)

    def GetFirstNodeByClass(self, class_name: str) -> vtkMRMLNode | None:
        return next((n for n in self._nodes if n.IsA(class_name)), None)

    def GetNumberOfNodesByClass(self, class_name: str) -> int:
        return len(self.nodes(class_name))

    def GetSingletonNode(self, tag: str, class_name: str) -> vtkMRMLNode | None:
        return next((n for n in self._nodes if n._singleton_tag == tag and n.IsA(class_name)), None)

    def GenerateUniqueName(self, name: str) -> str:
        """vtkMRMLScene::GenerateUniqueName / GetUniqueNameIndex / BuildName: "foo", then "foo_1", "foo_2"...

        The index continues from the last one handed out for the name (registered even if no node takes it)
        and skips names a node already has. AddNewNodeByClass does not call it: two nodes can share a name.
        """
        index = self._unique_names.get(name, -1)
        while True:
            index += 1
            candidate = name if index == 0 else f"{name}_{index}"
            if not any(n.GetName() == candidate for n in self._nodes):
                break
        self._unique_names[name] = index
        return candidate

    def GetFirstNodeByName(self, name: str) -> vtkMRMLNode | None:
        return next((n for n in self._nodes if n.GetName() == name), None)

    def Clear(self, remove_singletons: int = 0) -> None:
        self._nodes = []
        self._subject_hierarchy = vtkMRMLSubjectHierarchyNode()
        self._unique_names = {}

    def nodes(self, class_name: str = "vtkMRMLNode") -> list[vtkMRMLNode]:
        """Stand-in only (tests): the nodes of a class, in insertion order."""
        return [n for n in self._nodes if n.IsA(class_name)]


mrmlScene = vtkMRMLScene()


# ------------------------------------------------------------------------------------------------ logics


def _parse_geometry(text: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    values = [float(v) for v in text.split(";") if v]
    return np.array(values[:16]).reshape(4, 4), tuple(int(values[17 + 2 * a]) + 1 for a in range(3))


def _resample(mask: np.ndarray, grid: str, reference: str) -> np.ndarray:
    """Nearest-voxel resampling of a (K, J, I) mask from ``grid`` onto ``reference``, as Slicer's export does
    (vtkOrientedImageDataResample::ResampleOrientedImageToReferenceOrientedImage, nearest neighbour for
    labelmaps); voxels of the reference outside the mask's grid are 0."""
    if grid == reference:
        return mask.copy()
    src, src_dims = _parse_geometry(grid)
    ref, ref_dims = _parse_geometry(reference)
    ijk = np.stack(np.meshgrid(*[np.arange(d) for d in ref_dims], indexing="ij"), axis=-1).reshape(-1, 3)
    src_ijk = (np.linalg.solve(src, ref) @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    idx = np.rint(src_ijk).astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(src_dims)), axis=1)
    out = np.zeros(ref_dims, dtype=mask.dtype)  # (I, J, K)
    flat = out.reshape(-1)
    flat[inside] = mask.transpose(2, 1, 0)[tuple(idx[inside].T)]
    return out.transpose(2, 1, 0)


def _same_transform(segmentation: vtkMRMLSegmentationNode, volume: vtkMRMLScalarVolumeNode) -> None:
    if segmentation.GetTransformNodeID() != volume.GetTransformNodeID():
        raise NotImplementedError("stand-in: parent transforms are Slicer-only.")


class _SegmentationsLogic:
    def ImportLabelmapToSegmentationNode(self, labelmap, segmentation, updatedSegmentIDs) -> bool:
        """Label value N of ``labelmap`` becomes the N-th segment ID (created if missing), on the labelmap's grid.

        A segmentation without reference geometry takes the labelmap's (vtkSlicerSegmentationsModuleLogic::
        ImportLabelmapToSegmentationNode sets it when it is empty)."""
        _same_transform(segmentation, labelmap)
        if not segmentation._grid():
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
        seg = segmentation.GetSegmentation()
        array = np.asarray(labelmap._array)
        for index in range(updatedSegmentIDs.GetNumberOfValues()):
            sid = updatedSegmentIDs.GetValue(index)
            if seg.GetSegment(sid) is None:
                seg.AddEmptySegment(sid, sid)
            seg.GetSegment(sid).mask = (array == index + 1).astype(np.uint8)
            seg.GetSegment(sid).grid = labelmap._geometry()
        return True


class _VolumesLogic:
    def CreateAndAddLabelVolume(self, volume: vtkMRMLScalarVolumeNode, name: str) -> vtkMRMLLabelMapVolumeNode:
        node = mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
        node._ijk_to_ras = volume._ijk_to_ras.copy()
        node._array = np.zeros(volume._array.shape, dtype=np.int16)
        node.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
        return node


_segmentations_logic = _SegmentationsLogic()
_volumes_logic = _VolumesLogic()
modules = types.SimpleNamespace(
    segmentations=types.SimpleNamespace(logic=lambda: _segmentations_logic),
    volumes=types.SimpleNamespace(logic=lambda: _volumes_logic),
)


class vtkMRMLLayoutNode:
    SlicerLayoutConventionalView = 2
    SlicerLayoutOneUpRedSliceView = 6
    SlicerLayoutSideBySideView = 29


class _SliceNode:
    """vtkMRMLSliceNode's orientation preset (SetOrientation / GetOrientation, vtkMRMLSliceNode.h)."""

    def __init__(self, orientation: str) -> None:
        self.orientation = orientation
        self.fitted = 0

    def SetOrientation(self, orientation: str) -> bool:
        self.orientation = orientation
        return True

    def GetOrientation(self) -> str:
        return self.orientation


class _SliceCompositeNode:
    def __init__(self) -> None:
        self.linked = False
        self.background_volume_id: str | None = None

    def SetLinkedControl(self, linked: bool) -> None:
        self.linked = bool(linked)

    def GetLinkedControl(self) -> bool:
        return self.linked


class _SliceLogic:
    def __init__(self, node: _SliceNode) -> None:
        self._node = node

    def FitSliceToAll(self) -> None:
        self._node.fitted += 1


class _SliceWidget:
    def __init__(self, orientation: str) -> None:
        self._node, self._composite = _SliceNode(orientation), _SliceCompositeNode()
        self._logic = _SliceLogic(self._node)

    def mrmlSliceNode(self) -> _SliceNode:
        return self._node

    def mrmlSliceCompositeNode(self) -> _SliceCompositeNode:
        return self._composite

    def sliceLogic(self) -> _SliceLogic:
        return self._logic


class _LayoutManager:
    """qSlicerLayoutManager with the rule of vtkMRMLLayoutLogic::CreateMissingViews / ApplyProperties.

    A layout's view properties marked ``action="default"`` (the side-by-side layout's axial Yellow
    view) are applied only to views the layout logic *creates*; a view that already exists from an
    earlier layout keeps its orientation. The start-up (conventional) layout creates Red axial,
    Yellow sagittal, Green coronal.
    """

    def __init__(self) -> None:
        self.layout = vtkMRMLLayoutNode.SlicerLayoutConventionalView
        startup = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))
        self._widgets = {name: _SliceWidget(o) for name, o in startup}

    def setLayout(self, layout: int) -> None:
        self.layout = int(layout)  # existing views keep their orientation (see the class docstring)

    def sliceWidget(self, name: str) -> _SliceWidget | None:
        return self._widgets.get(name)

    def sliceViewNames(self) -> list[str]:
        return list(self._widgets)


class _App:
    """The application as in ``--no-main-window`` batch mode (no layout manager), or with a main window."""

    temporaryPath = "/tmp"

    def __init__(self) -> None:
        self.process_events_calls = 0
        self.exit_status: int | None = None
        self._layout_manager: _LayoutManager | None = None

    def processEvents(self) -> None:
        self.process_events_calls += 1

    def layoutManager(self) -> _LayoutManager | None:
        return self._layout_manager

    def withMainWindow(self) -> _LayoutManager:
        """Test helper (not Slicer API): from now on the application has a main window and its layouts."""
        self._layout_manager = _LayoutManager()
        return self._layout_manager

    def exit(self, status: int = 0) -> None:
        self.exit_status = status


app = _App()

from . import util  # noqa: E402  (slicer.util needs the classes above)

__all__ = [
    "app",
    "modules",
    "mrmlScene",
    "util",
    "vtkMRMLDisplayNode",
    "vtkMRMLLabelMapVolumeNode",
    "vtkMRMLLayoutNode",
    "vtkMRMLNode",
    "vtkMRMLScalarVolumeNode",
    "vtkMRMLScene",
    "vtkMRMLScriptedModuleNode",
    "vtkMRMLSegmentationNode",
    "vtkMRMLSubjectHierarchyNode",
    "vtkSegment",
    "vtkSegmentation",
    "vtkSegmentationConverter",
]
