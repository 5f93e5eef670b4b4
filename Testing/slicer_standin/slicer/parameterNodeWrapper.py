"""Stand-in for slicer.parameterNodeWrapper: the decorator returns the class unchanged.

Slicer's wrapper reads the class's type hints and binds them to a vtkMRMLScriptedModuleNode and to
the .ui widgets named by their ``SlicerParameterName`` property; none of that is modelled here (the
static test of the .ui file checks that each bound name exists).
"""

from __future__ import annotations


def parameterNodeWrapper(classtype=None):
    return classtype
