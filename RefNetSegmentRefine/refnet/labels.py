"""The one class table: the 13 RefNet classes and how other label schemes map onto them.

Every front (core, CLI, Slicer module) reads names, colours, synonyms and terminology from here,
so a segment called ``kidney_right`` in TotalSegmentator, label 2 in BTCV and "Right kidney" in
Slicer all land on the same class. :data:`LABEL_SCHEMES` maps the numberings of BTCV, TotalSegmentator,
FLARE22 and WORD onto the classes; their other structures map to nothing and pass through untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BTCV_TO_CLASS",
    "CLASSES",
    "CLASS_NAMES",
    "FLARE22_TO_CLASS",
    "LABEL_SCHEMES",
    "NUM_CLASSES",
    "TOTALSEGMENTATOR_TO_CLASS",
    "WORD_TO_CLASS",
    "LabelClass",
    "check_class_labels",
    "class_index_for_name",
    "class_index_for_terminology",
    "from_class_labels",
    "scheme_mapping",
    "slicer_terminology",
    "to_class_labels",
]


@dataclass(frozen=True)
class LabelClass:
    """One RefNet class.

    Attributes:
        index: value in a RefNet label map (0 = background).
        key: machine name, also the TotalSegmentator-style name.
        name: display name.
        color: RGB in 0..255.
        synonyms: other names that mean this class (TotalSegmentator, BTCV, common spellings).
        sct_type: SNOMED CT (code, meaning) of the structure; empty for background.
        sct_modifier: SNOMED CT (code, meaning) laterality modifier, if any.
    """

    index: int
    key: str
    name: str
    color: tuple[int, int, int]
    synonyms: tuple[str, ...] = ()
    sct_type: tuple[str, str] = ("", "")
    sct_modifier: tuple[str, str] = ("", "")


_RIGHT = ("24028007", "Right")
_LEFT = ("7771000", "Left")

CLASSES: tuple[LabelClass, ...] = (
    LabelClass(0, "background", "Background", (0, 0, 0), ("bg", "none", "unlabeled")),
    LabelClass(1, "spleen", "Spleen", (157, 108, 162), ("spl",), ("78961009", "Spleen")),
    LabelClass(2, "kidney_right", "Right kidney", (185, 102, 83), ("rkid", "r kidney", "kidney r"),
               ("64033007", "Kidney"), _RIGHT),
    LabelClass(3, "kidney_left", "Left kidney", (180, 130, 90), ("lkid", "l kidney", "kidney l"),
               ("64033007", "Kidney"), _LEFT),
    LabelClass(4, "gallbladder", "Gallbladder", (139, 150, 98), ("gall", "gall bladder"),
               ("28231008", "Gallbladder")),
    LabelClass(5, "esophagus", "Esophagus", (211, 171, 143), ("eso", "oesophagus"),
               ("32849002", "Esophagus")),
    LabelClass(6, "liver", "Liver", (221, 130, 101), ("liv",), ("10200004", "Liver")),
    LabelClass(7, "stomach", "Stomach", (216, 132, 105), ("sto",), ("69695003", "Stomach")),
    LabelClass(8, "aorta", "Aorta", (224, 97, 76), ("aor",), ("15825003", "Aorta")),
    LabelClass(9, "inferior_vena_cava", "Inferior vena cava", (0, 151, 206), ("ivc", "postcava"),
               ("64131007", "Inferior vena cava")),
    LabelClass(10, "portal_vein_and_splenic_vein", "Portal and splenic vein", (0, 112, 165),
               ("portal vein", "psv", "veins", "portal and splenic veins", "portal splenic vein"),
               ("32764006", "Portal vein")),
    LabelClass(11, "pancreas", "Pancreas", (249, 180, 111), ("pan",), ("15776009", "Pancreas")),
    LabelClass(12, "adrenal_glands", "Adrenal glands", (244, 217, 154),
               ("adrenal gland", "adrenal_gland_right", "adrenal_gland_left", "right adrenal gland",
                "left adrenal gland", "rag", "lag", "adrenals"),
               ("23451007", "Adrenal gland")),
)

NUM_CLASSES = len(CLASSES)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)

# BTCV/Synapse 14-label maps (0 background, 1..13 organs): the two adrenals (12, 13) merge.
BTCV_TO_CLASS: dict[int, int] = {**{i: i for i in range(12)}, 12: 12, 13: 12}

# TotalSegmentator v2 "total" task values of our organs; its other ~100 labels map to nothing.
TOTALSEGMENTATOR_TO_CLASS: dict[int, int] = {
    0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 7, 7: 11, 8: 12, 9: 12, 15: 5, 52: 8, 63: 9, 64: 10,
}

# MICCAI FLARE 2022 (13 organs): 1 liver, 2 right kidney, 3 spleen, 4 pancreas, 5 aorta, 6 IVC,
# 7/8 right/left adrenal (merged), 9 gallbladder, 10 esophagus, 11 stomach, 12 duodenum, 13 left kidney.
# Duodenum maps to nothing; FLARE22 has no portal/splenic vein.
FLARE22_TO_CLASS: dict[int, int] = {
    0: 0, 1: 6, 2: 2, 3: 1, 4: 11, 5: 8, 6: 9, 7: 12, 8: 12, 9: 4, 10: 5, 11: 7, 13: 3,
}

# WORD (16 organs): 1 liver, 2 spleen, 3 left kidney, 4 right kidney, 5 stomach, 6 gallbladder,
# 7 esophagus, 8 pancreas, 12 adrenal (both); duodenum (9), colon (10), intestine (11), rectum (13),
# bladder (14) and the femoral heads (15, 16) map to nothing. WORD has no aorta, IVC or portal vein.
WORD_TO_CLASS: dict[int, int] = {
    0: 0, 1: 6, 2: 1, 3: 3, 4: 2, 5: 7, 6: 4, 7: 5, 8: 11, 12: 12,
}

LABEL_SCHEMES: dict[str, dict[int, int]] = {
    "refnet": {c.index: c.index for c in CLASSES},
    "btcv": BTCV_TO_CLASS,
    "totalsegmentator": TOTALSEGMENTATOR_TO_CLASS,
    "flare22": FLARE22_TO_CLASS,
    "word": WORD_TO_CLASS,
}


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-&,.]+", " ", name.strip().lower()).replace(" and ", " ").strip()


_NAME_INDEX: dict[str, int] = {}
for _c in CLASSES:
    for _n in (_c.key, _c.name, *_c.synonyms):
        _NAME_INDEX[_normalise(_n)] = _c.index


def class_index_for_name(name: str) -> int | None:
    """Class index for a segment/structure name, or None when nothing matches.

    Matching ignores case, spaces, underscores and hyphens, and knows the synonyms in
    :data:`CLASSES` (e.g. ``"kidney_right"``, ``"Right kidney"`` -> 2).
    """
    return _NAME_INDEX.get(_normalise(name))


def scheme_mapping(scheme: str) -> dict[int, int]:
    """Input-value -> class-index mapping of a named label scheme.

    Raises:
        ValueError: unknown scheme; the message lists the known ones.
    """
    if scheme not in LABEL_SCHEMES:
        raise ValueError(f"unknown label scheme {scheme!r}; choose one of {sorted(LABEL_SCHEMES)}.")
    return LABEL_SCHEMES[scheme]


def _other_schemes() -> str:
    """The non-RefNet scheme names as prose: ``"btcv, totalsegmentator, flare22 or word"``."""
    names = [n for n in LABEL_SCHEMES if n != "refnet"]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_class_labels(labels: np.ndarray, *, what: str = "label map") -> None:
    """Raise ValueError unless every value of ``labels`` is a RefNet class index (0..12)."""
    if not np.issubdtype(labels.dtype, np.integer) and not np.issubdtype(labels.dtype, np.bool_):
        if not np.all(np.mod(labels, 1) == 0):
            raise ValueError(f"{what} must hold integer class values, got dtype {labels.dtype} "
                             "with fractional values; pass a label map, not an image.")
    values = np.unique(labels)
    bad = values[(values < 0) | (values >= NUM_CLASSES)]
    if bad.size:
        raise ValueError(
            f"{what} holds values {bad[:10].tolist()} outside the {NUM_CLASSES} RefNet classes "
            f"0..{NUM_CLASSES - 1}; pass --label-scheme {_other_schemes()} if it uses another numbering."
        )


def to_class_labels(labels: np.ndarray, scheme: str = "refnet") -> tuple[np.ndarray, np.ndarray]:
    """Map a label map in ``scheme`` to RefNet classes.

    Args:
        labels: integer label map of any shape.
        scheme: one of :data:`LABEL_SCHEMES`.

    Returns:
        ``(classes, unmapped)``: uint8 class map of the same shape (unmapped values become 0)
        and a bool mask of voxels whose value maps to no class.

    Raises:
        ValueError: unknown scheme, or (scheme ``refnet``) values outside 0..12.
    """
    mapping = scheme_mapping(scheme)
    if scheme == "refnet":
        check_class_labels(labels)
        return labels.astype(np.uint8, copy=True), np.zeros(labels.shape, dtype=bool)
    mapped = _map_values(labels, mapping)
    return np.maximum(mapped, 0).astype(np.uint8), mapped < 0


def _map_values(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """int16 array of ``mapping[value]`` per voxel, -1 where the value maps to no class."""
    if labels.size and np.issubdtype(labels.dtype, np.integer):
        low, high = int(labels.min()), int(labels.max())
        if low >= 0 and high < 1 << 16:  # a lookup table instead of np.unique's sort of a CT-sized map
            lut = np.full(high + 1, -1, dtype=np.int16)
            for value, index in mapping.items():
                if 0 <= value <= high:
                    lut[value] = index
            return lut[labels]
    values, inverse = np.unique(labels, return_inverse=True)
    mapped = np.array([mapping.get(int(v), -1) for v in values], dtype=np.int16)[inverse.ravel()]
    return mapped.reshape(labels.shape)


def from_class_labels(
    classes: np.ndarray, original: np.ndarray, scheme: str = "refnet"
) -> np.ndarray:
    """Map refined RefNet classes back to the values of ``original``'s scheme.

    Voxels whose original value maps to no class keep that value; where a class has several
    source values (the two adrenals of BTCV and FLARE22), each voxel keeps its original value if
    it still holds that class; a voxel new to the class takes the value of the nearest voxel that had
    one of them (a voxel added to the left adrenal stays left), or the lowest value if there is none.

    Args:
        classes: refined class map, same shape as ``original``.
        original: the input label map in ``scheme``.
        scheme: one of :data:`LABEL_SCHEMES`.

    Returns:
        Label map with ``original``'s dtype and scheme.
    """
    mapping = scheme_mapping(scheme)
    if classes.shape != original.shape:
        raise ValueError(f"classes shape {classes.shape} differs from original shape {original.shape}.")
    back = np.zeros(NUM_CLASSES, dtype=np.int64)
    for value in sorted(mapping, reverse=True):
        back[mapping[value]] = value
    back = back.astype(original.dtype)
    out = back[classes if np.issubdtype(classes.dtype, np.integer) else classes.astype(np.intp)]
    orig_cls_map = _map_values(original, mapping)
    np.copyto(out, original, where=(orig_cls_map == classes) | (orig_cls_map < 0))
    for c in range(NUM_CLASSES):
        sources = [v for v, k in mapping.items() if k == c]
        if len(sources) > 1:
            _nearest_source(out, classes == c, np.isin(original, sources), original)
    return out


def _nearest_source(out: np.ndarray, is_class: np.ndarray, had_source: np.ndarray, original: np.ndarray) -> None:
    """Give voxels new to a multi-value class the original value of the nearest voxel that had one, in place."""
    from scipy import ndimage

    new = is_class & ~had_source
    if not new.any() or not had_source.any():
        return
    nz = np.nonzero(new | had_source)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in nz)  # holds both: the nearest source is inside
    _, nearest = ndimage.distance_transform_edt(~had_source[box], return_indices=True)
    values = original[box][tuple(nearest)]
    out[box] = np.where(new[box], values, out[box])


def slicer_terminology(index: int) -> str:
    """Slicer terminology entry string for a class (the format of ``vtkSegment`` terminology tags)."""
    c = CLASSES[index]
    if not c.sct_type[0]:
        return ""
    typ = f"SCT^{c.sct_type[0]}^{c.sct_type[1]}"
    mod = f"SCT^{c.sct_modifier[0]}^{c.sct_modifier[1]}" if c.sct_modifier[0] else "^^"
    return (
        "Segmentation category and type - 3D Slicer General Anatomy list"
        f"~SCT^123037004^Anatomical Structure~{typ}~{mod}"
        "~Anatomic codes - DICOM master list~^^~^^"
    )


def class_index_for_terminology(entry: str) -> int | None:
    """Class index for a Slicer terminology entry string, or None when it names no RefNet class.

    The entry is ``context~category~type~typeModifier~regionContext~region~regionModifier`` with each
    coded field as ``scheme^code^meaning`` (the format of ``vtkSegment`` terminology tags). The type
    code (SNOMED CT, scheme ``SCT`` or the older ``SRT``) selects the class; where two classes share
    a type (the kidneys) the laterality modifier must match too, otherwise the entry is ambiguous.
    """
    fields = entry.split("~") if entry else []
    if len(fields) < 3:
        return None
    code = fields[2].split("^")
    modifier = fields[3].split("^") if len(fields) > 3 else []
    if len(code) < 2 or code[0] not in ("SCT", "SRT") or not code[1]:
        return None
    modifier_code = modifier[1] if len(modifier) > 1 else ""
    candidates = [c for c in CLASSES if c.sct_type[0] == code[1]]
    if len(candidates) > 1:
        candidates = [c for c in candidates if c.sct_modifier[0] == modifier_code]
    return candidates[0].index if len(candidates) == 1 else None
