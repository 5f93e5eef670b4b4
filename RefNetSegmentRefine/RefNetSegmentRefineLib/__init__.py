"""RefNetSegmentRefine's parts other than the GUI, beside the module file as SlicerMONAIAuto3DSeg lays them out.

``dependencies`` and ``modelcard`` are plain Python; ``logic`` (the Logic, reused by the batch and training
scripts) and ``review`` (the side-by-side layout) need Slicer.
"""

from .dependencies import MINIMUM_TORCH, MODULE_DIR, REQUIREMENTS_PATH, missingRequirements, readRequirements
from .logic import (
    CHANGES_COLOR,
    Device,
    RefineResult,
    RefNetSegmentRefineLogic,
    RefNetSegmentRefineParameterNode,
    guardSettings,
)
from .modelcard import SHIPPED_MODEL_PATH, modelCardPath, modelCardSummary
from .review import REVIEW_VIEWS, endReview, showSideBySide

__all__ = ["CHANGES_COLOR", "MINIMUM_TORCH", "MODULE_DIR", "REQUIREMENTS_PATH", "REVIEW_VIEWS", "SHIPPED_MODEL_PATH",
           "Device", "RefNetSegmentRefineLogic", "RefNetSegmentRefineParameterNode", "RefineResult", "endReview",
           "guardSettings",
           "missingRequirements", "modelCardPath", "modelCardSummary", "readRequirements", "showSideBySide"]
