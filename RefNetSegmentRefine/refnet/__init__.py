"""RefNet: refine any 3D medical segmentation slice by slice (Slicer-free core).

Main entry points: :func:`refnet.refine.refine_labels`, :func:`refnet.checkpoint.load_model`,
:func:`refnet.train.train_refnet` and the ``refnet`` command (:mod:`refnet.cli`).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
