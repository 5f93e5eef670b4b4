"""Stand-in for the few ``vtk`` names RefNetSegmentRefine uses (see ``slicer/__init__.py``).

Only containers: a 4x4 matrix, a string array, an output-argument ``reference`` and an event id.
No pipeline, no image data, no rendering.
"""

from __future__ import annotations

import numpy as np


class vtkMatrix4x4:
    """A 4x4 matrix filled in by ``GetIJKToRASMatrix`` (real VTK: C++ object, same element access)."""

    def __init__(self) -> None:
        self._m = np.eye(4)

    def GetElement(self, i: int, j: int) -> float:
        return float(self._m[i, j])

    def SetElement(self, i: int, j: int, value: float) -> None:
        self._m[i, j] = value


class vtkStringArray:
    """Ordered strings, as passed to ``ImportLabelmapToSegmentationNode``."""

    def __init__(self) -> None:
        self._values: list[str] = []

    def InsertNextValue(self, value: str) -> int:
        self._values.append(str(value))
        return len(self._values) - 1

    def GetNumberOfValues(self) -> int:
        return len(self._values)

    def GetValue(self, index: int) -> str:
        return self._values[index]


class reference:
    """Output argument for C++ ``std::string&`` parameters (real VTK: ``vtk.reference``)."""

    def __init__(self, value: object) -> None:
        self._value = value

    def get(self) -> object:
        return self._value

    def set(self, value: object) -> None:
        self._value = value


class vtkCommand:
    ModifiedEvent = 33
