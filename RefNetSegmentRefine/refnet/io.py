"""Reading and writing 3D volumes (NIfTI, NRRD) with their voxel-to-world affine.

Writes are atomic (temporary file in the same folder, then rename) so an interrupted batch never
leaves a half-written file that a re-run would take for a finished case.
"""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = [
    "Volume",
    "atomic_path",
    "check_output_path",
    "check_writable",
    "load_volume",
    "read_affine",
    "save_volume",
    "stop_on_sigterm",
    "sweep_temporaries",
    "volume_suffix",
    "write_json",
]

_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")


@dataclass(frozen=True)
class Volume:
    """A 3D array and its 4x4 voxel(i, j, k)-to-world(RAS, mm) affine."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def volume_suffix(path: str | os.PathLike) -> str:
    """The recognised file suffix of ``path`` (``.nii.gz``, ``.nii``, ``.nrrd``, ``.seg.nrrd``).

    Raises:
        ValueError: the suffix is none of these.
    """
    name = Path(path).name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{path}: unsupported file type; use NIfTI (.nii, .nii.gz) or NRRD (.nrrd).")


def _check_3d(array: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(
            f"{path}: expected a 3D volume, got {array.ndim}D with shape {array.shape}; "
            "RefNet refines one 3D label map per file (split 4D series, stack 2D slices first)."
        )
    return array


def load_volume(path: str | os.PathLike) -> Volume:
    """Load a 3D NIfTI or NRRD file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a 3D volume, or an unsupported file type.
    """
    path = Path(path)
    _check_input_file(path)
    suffix = volume_suffix(path)
    if suffix == ".seg.nrrd":  # its voxels are per-layer segment values: read as classes they would be wrong
        raise ValueError(f"{path}: is a Slicer segmentation, not a label volume; read it with "
                         "refnet.segfile.read_segmentation_file (refnet refine and refnet-batch do), or export "
                         "a label map from Slicer.")
    try:
        if suffix.endswith(".nrrd"):
            array, affine = _load_nrrd(path)
        else:
            img = nib.load(str(path))
            array, affine = np.asanyarray(img.dataobj), img.affine
    except MemoryError as err:
        raise ValueError(f"{path}: declares a volume too large for this machine's memory "
                         f"({_declared_shape(path)}); check the file's header, or use a machine with more "
                         "memory.") from err
    except (OSError, EOFError, zlib.error, nib.filebasedimages.ImageFileError) as err:
        if isinstance(err, PermissionError):
            raise ValueError(f"{path}: no permission to read it; check the file's permissions.") from err
        raise _unreadable(path, suffix, err) from err
    return Volume(_check_3d(np.asarray(array), path), np.asarray(affine, dtype=np.float64))


def _declared_shape(path: Path) -> str:
    try:
        if volume_suffix(path).endswith(".nrrd"):
            shape = _nrrd_module(path).read_header(str(path)).get("sizes")
        else:
            shape = nib.load(str(path)).shape
        return f"shape {tuple(int(n) for n in shape)}"
    except Exception:  # only for the message; the MemoryError is what the user must hear about
        return "shape unknown"


def _unreadable(path: Path, suffix: str, err: BaseException) -> ValueError:
    kind = "NRRD" if suffix.endswith(".nrrd") else "gzip-compressed NIfTI" if suffix == ".nii.gz" else "NIfTI"
    size = path.stat().st_size
    what = "it is empty" if size == 0 else f"{type(err).__name__}: {err}"
    return ValueError(f"{path}: cannot be read as {kind} ({what}); the file may be truncated, of another "
                      "format, or misnamed (a .nii.gz must be gzip-compressed, a .nii must not); re-export it.")


def read_affine(path: str | os.PathLike) -> np.ndarray:
    """The (4, 4) voxel-to-RAS affine of a NIfTI or NRRD file, from its header alone (no voxel data read).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unsupported file type.
    """
    path = Path(path)
    _check_input_file(path)
    if volume_suffix(path).endswith(".nrrd"):
        return _nrrd_affine(_nrrd_module(path).read_header(str(path)), path)
    return np.asarray(nib.load(str(path)).affine, dtype=np.float64)


def _check_input_file(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a file; give the path of one .nii.gz, .nii or .nrrd file.")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; check the path.")


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Fail now, before any work, if a volume cannot be written to ``path`` later.

    Raises:
        ValueError: an unsupported suffix, a folder at ``path``, an existing file without ``overwrite``,
            or a folder (or its nearest existing parent) this process may not write to.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give a file name such as {path / 'refined.nii.gz'}.")
    volume_suffix(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; pass --overwrite to replace it or choose another name.")
    return check_writable(path)


def check_writable(path: str | os.PathLike) -> Path:
    """Fail now if no file can be created at ``path``: its folder (or nearest existing parent) is not writable.

    Raises:
        ValueError: the folder is not writable, or a file stands where a folder is needed.
    """
    path = Path(path)
    parent = path.parent.resolve()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write into {parent} (no permission, or not a folder); "
                         "choose a folder you can write to.")
    return path


def _nrrd_module(path: Path):
    try:
        import nrrd  # optional: pip install pynrrd
    except ImportError as err:
        raise ValueError(f"{path}: reading NRRD needs pynrrd; run `pip install pynrrd` or use NIfTI.") from err
    return nrrd


def _load_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    nrrd = _nrrd_module(path)
    try:
        array, header = nrrd.read(str(path))
    except (nrrd.NRRDError, StopIteration, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise _unreadable(path, ".nrrd", err) from err
    return array, _nrrd_affine(header, path)


def _nrrd_affine(header: dict, path: Path) -> np.ndarray:
    directions = np.asarray(header.get("space directions", np.eye(3)), dtype=np.float64)
    if directions.shape[0] > 3:  # a leading non-spatial axis (multi-layer .seg.nrrd) has no direction
        raise ValueError(f"{path}: NRRD with a non-spatial axis (layered segmentation); export a labelmap.")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = directions.T
    affine[:3, 3] = origin
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("left-posterior-superior", "lps"):
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # NRRD is usually LPS; our affines are RAS
    return affine


# Names of the temporary files of atomic_path and write_json: ".<name>.<8 random chars><suffix>".
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}(\.nii\.gz|\.nii|\.seg\.nrrd|\.nrrd|\.tmp)$")


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that an interrupted write left in ``folder`` (hidden, of our naming pattern).

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if path.is_file() and _TEMPORARY.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def stop_on_sigterm() -> None:
    """Turn SIGTERM (``kill``, a job scheduler's stop) into KeyboardInterrupt, so that the ``finally`` of an
    atomic write removes its temporary file instead of the process dying with it left behind."""

    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        signal.signal(signal.SIGTERM, _interrupt)


def atomic_path(path: str | os.PathLike) -> tuple[Path, Path]:
    """A temporary path beside ``path`` with the same suffix, for write-then-rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = volume_suffix(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[: -len(suffix)]}.", suffix=suffix, dir=path.parent)
    _open_mode(fd)
    os.close(fd)
    return Path(tmp), path


def _open_mode(fd: int) -> None:
    """Give a mkstemp file (0600) the mode ``open()`` would: 0666 less the umask, so others can read outputs."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def save_volume(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``array`` with ``affine`` atomically to NIfTI or NRRD, chosen by suffix.

    Returns:
        The written path.
    """
    tmp, path = atomic_path(path)
    try:
        if volume_suffix(path).endswith(".nrrd"):
            _save_nrrd(tmp, array, affine)
        else:
            img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _save_nrrd(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    try:
        import nrrd
    except ImportError as err:
        raise ValueError(f"{path}: writing NRRD needs pynrrd; run `pip install pynrrd` or use NIfTI.") from err
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    header = {"space": "left-posterior-superior", "space directions": lps[:3, :3].T,
              "space origin": lps[:3, 3], "kinds": ["domain"] * 3, "encoding": "gzip"}
    nrrd.write(str(path), np.asarray(array), header)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (temporary file beside ``path``, then rename).

    numpy scalars and arrays and paths are converted to plain JSON values.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _open_mode(fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2, default=_json_default)
            file.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
