"""Keep or drop each connected piece of a label map: a decision learned from a model's own mistakes.

A 2D refiner reads a few slices at a time and never sees that a blob of "left kidney" lies on the
spleen, or that a 15-voxel "gallbladder" is all there is of a gallbladder that was removed. Classical
cleanup (:mod:`refnet.cleanup`) sees connectivity but decides with one rule per class (keep the largest
piece or not), so it cannot keep two adrenal glands and drop a speck of liver in the same map, and it
never drops an organ the patient does not have. On the benchmark's development seed, removing every
raw piece that touches none of its organ's ground truth would gain +4.25% mean Dice, more than half of
it from organs predicted in patients who lack them; cleanup gains +0.92%.

:class:`PieceDecider` learns the decision per piece from out-of-fold predictions (the errors models make
on cases they did not see) paired with ground truth. Each 26-connected piece of each class is described
by physical, field-of-view-independent features (:func:`find_pieces`): its volume in mL, its size
against its class's largest piece and against the class's typical volume in the training truth, what
it touches, where it lies against the class's largest piece, and the class. Its target
(:func:`drop_helps`) is whether removing it raises the class's Dice on that case (or the class is absent
from the truth). A small MLP ensemble (torch) scores the pieces; a piece is dropped when the score
passes a cut-off chosen by cross-validation on the training cases and the no-harm gates allow it
(:class:`PieceGates`): a class's largest piece (both adrenal glands' two) only goes with the whole
class, a whole class only when it is implausibly small, and a piece the image's edge cuts never goes.

An organ the patient lacks goes only when every one of its pieces goes, and a drop decided piece by
piece leaves it whenever one speck scores under the cut-off. So a class under the whole-class floor
is also scored as a whole (the volume-weighted mean of its pieces' scores) and goes whole when that
passes a second cut-off, chosen by the same cross-validation (off when it helps nowhere).

A label map alone cannot tell a small real organ from one drawn where the patient has none. The CT
can: bile is near 10 HU, liver near 100. A decider fitted with the CT (``cts`` in :meth:`PieceDecider.fit`)
adds :data:`CT_FEATURE_NAMES`, each piece's intensity against its class's in the training truth, and
then needs the CT wherever it runs.

Written by hand because no medical-imaging library learns connected-component decisions: MONAI and
nnU-Net offer only the fixed largest-component rule.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from .labels import NUM_CLASSES

__all__ = ["CT_FEATURE_NAMES", "FEATURE_NAMES", "PieceDecider", "PieceGates", "Pieces", "drop_helps", "find_pieces",
           "fit_on_pairs", "remove_pieces"]

_STRUCTURE = np.ones((3, 3, 3), dtype=bool)  # 26-connected, as refnet.cleanup and MONAI
ADRENAL_GLANDS = 12  # both adrenal glands are one class (refnet.labels): two separate pieces are normal
FEATURE_NAMES = (
    ["log_ml", "log_of_largest", "is_largest", "log_class_of_typical", "log_pieces", "gap_mm", "dx", "dy", "dz"]
    + [f"touch_{c}" for c in range(NUM_CLASSES)]
    + [f"class_{c}" for c in range(NUM_CLASSES)]
)
# With the CT: the piece's mean HU against its class's in the training truth (in units of the class's
# within-organ SD), and its HU spread against the class's (log10).
CT_FEATURE_NAMES = ["hu_z", "log_hu_sd_ratio"]


@dataclass
class Pieces:
    """The connected pieces of one label map, with what is needed to remove any of them.

    Attributes:
        cls: (N,) class of each piece.
        voxels: (N,) voxel count of each piece.
        features: (N, F) :data:`FEATURE_NAMES` values (without the typical-volume column filled in
            until :meth:`PieceDecider.features` does it).
        boxes: per class, the bounding-box slices of its voxels.
        parts: per class, the component labels inside its box (1..n; piece ``index`` of the class).
        index: (N,) component label of each piece in its class's ``parts``.
        cut: (N,) whether the piece reaches an edge of the image (a first or last voxel along an axis):
            the scan range or a crop cuts it, so its true size and connections are unknown.
    """

    cls: np.ndarray
    voxels: np.ndarray
    features: np.ndarray
    boxes: dict[int, tuple[slice, ...]] = field(default_factory=dict)
    parts: dict[int, np.ndarray] = field(default_factory=dict)
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    cut: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def mask(self, n: int, shape: tuple[int, ...]) -> np.ndarray:
        """Boolean (X, Y, Z) mask of piece ``n``."""
        out = np.zeros(shape, dtype=bool)
        c = int(self.cls[n])
        out[self.boxes[c]] = self.parts[c] == self.index[n]
        return out


def find_pieces(labels: np.ndarray, spacing: Sequence[float], *, num_classes: int = NUM_CLASSES,
                edges: Sequence[bool] | None = None) -> Pieces:
    """Every 26-connected piece of every organ class of ``labels`` (canonical RAS), with its features.

    Features are in mm and mL and relative to the map's own pieces, so they do not depend on the voxel
    grid or on how much background surrounds the labels. ``edges``: which of the array's six faces
    (axis 0 low, axis 0 high, axis 1 low, ...) are the image's own edges, for :attr:`Pieces.cut`
    (None: all six; a box cut out of a larger image passes only the faces it shares with it).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"find_pieces needs a 3D label map, got shape {labels.shape}.")
    spacing = np.asarray(spacing, dtype=np.float64)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    edges = (True,) * 6 if edges is None else tuple(bool(e) for e in edges)
    if len(edges) != 6:
        raise ValueError(f"edges: one flag per face of a 3D array (6), got {len(edges)}.")
    rows, classes, counts, indices, cuts, boxes_out, parts_out = [], [], [], [], [], {}, {}
    for cls, box in enumerate(ndimage.find_objects(labels, max_label=num_classes - 1), start=1):
        if box is None:
            continue
        mask = labels[box] == cls
        parts, count = ndimage.label(mask, structure=_STRUCTURE)
        boxes_out[cls], parts_out[cls] = box, parts
        sizes = np.bincount(parts.ravel(), minlength=count + 1)[1:]
        largest = int(np.argmax(sizes))
        offset = np.array([s.start for s in box], dtype=np.float64)
        piece_boxes = ndimage.find_objects(parts)
        centres = np.array([_centroid(parts[pb] == n + 1) + [p.start for p in pb]
                            for n, pb in enumerate(piece_boxes)])
        centres = (centres + offset) * spacing
        gaps = np.zeros(count)
        if count > 1:  # mm from each piece to the largest one (scipy's exact EDT), read in each piece's box
            dist = ndimage.distance_transform_edt(parts != largest + 1, sampling=spacing)
            for n, piece_box in enumerate(piece_boxes):
                if n != largest:
                    gaps[n] = dist[piece_box][parts[piece_box] == n + 1].min()
        for n, piece_box in enumerate(piece_boxes):
            touch = _touching(labels, box, piece_box, parts, n + 1, num_classes)
            gap = float(gaps[n])
            d = (centres[n] - centres[largest]) / 100.0
            one_hot = np.zeros(num_classes)
            one_hot[cls] = 1.0
            rows.append(np.concatenate([
                [np.log10(sizes[n] * voxel_ml), np.log10(sizes[n] / sizes[largest]), float(n == largest),
                 0.0, np.log10(count), min(gap, 300.0) / 100.0, *d], touch, one_hot]))
            classes.append(cls)
            counts.append(int(sizes[n]))
            indices.append(n + 1)
            cuts.append(_reaches_edge(box, piece_box, labels.shape, edges))
    features = np.array(rows, dtype=np.float64).reshape(len(rows), len(FEATURE_NAMES))
    return Pieces(np.array(classes, int), np.array(counts, np.int64), features, boxes_out, parts_out,
                  np.array(indices, int), np.array(cuts, bool))


def _reaches_edge(box: tuple[slice, ...], piece_box: tuple[slice, ...], shape: tuple[int, ...],
                  edges: tuple[bool, ...]) -> bool:
    """Whether a piece (its box inside its class's box) has a voxel on one of the image-edge faces."""
    for axis, (outer, inner) in enumerate(zip(box, piece_box)):
        lo, hi = outer.start + inner.start, outer.start + inner.stop
        if (edges[2 * axis] and lo == 0) or (edges[2 * axis + 1] and hi == shape[axis]):
            return True
    return False


def _centroid(mask: np.ndarray) -> np.ndarray:
    """Voxel centroid of a 3D mask from its three projections (one pass; scipy's center_of_mass builds
    index arrays the size of the box)."""
    total = float(mask.sum())
    return np.array([float(mask.sum(axis=tuple(b for b in range(3) if b != a)) @ np.arange(mask.shape[a])) / total
                     for a in range(3)])


def _touching(labels, box, piece_box, parts, n, num_classes) -> np.ndarray:
    """Share of the voxels around piece ``n`` (its one-voxel shell) that are each class."""
    lo = [b.start + p.start - 1 for b, p in zip(box, piece_box)]
    hi = [b.start + p.stop + 1 for b, p in zip(box, piece_box)]
    clip_lo = [max(v, 0) for v in lo]
    clip_hi = [min(v, s) for v, s in zip(hi, labels.shape)]
    window = labels[tuple(slice(a, b) for a, b in zip(clip_lo, clip_hi))]
    own = np.zeros(window.shape, dtype=bool)
    inner = tuple(slice(b.start + p.start - a, b.start + p.stop - a) for b, p, a in zip(box, piece_box, clip_lo))
    own[inner] = parts[piece_box] == n
    shell = ndimage.binary_dilation(own, structure=_STRUCTURE) & ~own
    hist = np.bincount(window[shell].astype(np.int64), minlength=num_classes)[:num_classes].astype(np.float64)
    return hist / max(hist.sum(), 1.0)


def drop_helps(pieces: Pieces, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per piece: does removing it alone raise its class's Dice on this case, and by how much.

    Removing a piece of ``s`` voxels of which ``tp`` are right raises the class's Dice exactly when its
    precision ``tp / s`` is below half the class's Dice ``2 TP / (P + G)``. A class the truth lacks
    scores no Dice at all once every piece is gone (the benchmark leaves absent-absent classes out), so
    each of its pieces is a drop, weighted by its share of the class.

    Returns:
        ``(helps, weight)``: bool (N,) and float (N,) |Dice change| (used to weight training).
    """
    return _drop_effect(pieces, _Counts.of(pieces, target))


def _drop_effect(pieces: Pieces, stats: _Counts) -> tuple[np.ndarray, np.ndarray]:
    """:func:`drop_helps` from counts already taken."""
    helps = np.zeros(len(pieces.cls), dtype=bool)
    weight = np.zeros(len(pieces.cls), dtype=np.float64)
    for n, c in enumerate(pieces.cls):
        p, tp_total, g = stats.p[c], stats.tp[c], stats.g[c]
        s, tp = pieces.voxels[n], stats.piece_tp[n]
        if g == 0:
            helps[n], weight[n] = True, s / p
            continue
        before = 2.0 * tp_total / (p + g)
        after = 2.0 * (tp_total - tp) / (p - s + g)
        helps[n], weight[n] = after > before, abs(after - before)
    return helps, weight


@dataclass
class _Counts:
    """Voxel counts that give each class's Dice after any set of drops without touching the voxels."""

    p: np.ndarray  # (C,) predicted voxels per class
    tp: np.ndarray  # (C,) true positives per class
    g: np.ndarray  # (C,) ground-truth voxels per class
    piece_tp: np.ndarray  # (N,) true positives per piece

    @classmethod
    def of(cls, pieces: Pieces, target: np.ndarray) -> _Counts:
        piece_tp = np.zeros(len(pieces.cls), dtype=np.int64)
        for c, parts in pieces.parts.items():
            hits = np.bincount(parts[target[pieces.boxes[c]] == c], minlength=int(parts.max()) + 1)
            mine = pieces.cls == c
            piece_tp[mine] = hits[pieces.index[mine]]
        p = np.bincount(pieces.cls, weights=pieces.voxels, minlength=NUM_CLASSES)
        tp = np.bincount(pieces.cls, weights=piece_tp, minlength=NUM_CLASSES)
        g = np.bincount(np.asarray(target).ravel().astype(np.int64), minlength=NUM_CLASSES)[:NUM_CLASSES]
        return cls(p, tp, g.astype(np.float64), piece_tp)

    def organ_dice(self, pieces: Pieces, drop: np.ndarray) -> np.ndarray:
        """(C-1,) organ Dice after dropping ``drop`` (NaN where both maps lack the class)."""
        p = self.p - np.bincount(pieces.cls[drop], weights=pieces.voxels[drop], minlength=NUM_CLASSES)
        tp = self.tp - np.bincount(pieces.cls[drop], weights=self.piece_tp[drop], minlength=NUM_CLASSES)
        total = p + self.g
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, 2.0 * tp / total, np.nan)[1:]


@dataclass(frozen=True)
class PieceGates:
    """What the decider may never do, whatever it scores (the no-harm rules).

    Attributes:
        class_floor: a class's largest piece (and so the whole class) may go only when the class's
            total volume is below this fraction of its typical volume in the training truth.
        main_pieces: ``(class, k)`` pairs: classes whose anatomy has k separate parts, whose k largest
            pieces are all kept like a largest piece. The one class of both adrenal glands has two.
        keep_cut: a piece the image's edge cuts (:attr:`Pieces.cut`) is kept, and its class never goes
            whole: beyond the edge it may be larger or joined to the rest of its organ, so its size and
            gap say nothing. (A slab cut out of a correct map splits a liver into lobes the decider
            would drop; a scan range that cuts an organ does the same.)
    """

    class_floor: float = 0.2
    main_pieces: tuple[tuple[int, int], ...] = ((ADRENAL_GLANDS, 2),)
    keep_cut: bool = True

    def __post_init__(self) -> None:  # a saved file holds lists
        object.__setattr__(self, "main_pieces", tuple((int(c), int(k)) for c, k in self.main_pieces))

    def allow(self, pieces: Pieces, drop: np.ndarray, class_ml: np.ndarray, typical: np.ndarray) -> np.ndarray:
        """``drop`` with the gates applied: a class keeps its main (and cut) pieces or goes as a whole."""
        drop = np.array(drop, dtype=bool, copy=True)
        if not len(drop):
            return drop
        small_class = self.may_go_whole(pieces, class_ml, typical)
        largest = pieces.features[:, FEATURE_NAMES.index("is_largest")] > 0.5
        main = largest.copy()
        for c, k in self.main_pieces:
            mine = np.nonzero(pieces.cls == c)[0]
            main[mine[np.argsort(-pieces.voxels[mine], kind="stable")[:k]]] = True
        if self._cut_known(pieces):
            main |= pieces.cut
        drop &= ~main | small_class
        for c in np.unique(pieces.cls[largest & drop]):
            drop[pieces.cls == c] = True
        return drop

    def may_go_whole(self, pieces: Pieces, class_ml: np.ndarray, typical: np.ndarray) -> np.ndarray:
        """Per piece: may its class go whole (under the floor of its typical volume, and no piece cut)."""
        small = (typical > 0) & (class_ml < self.class_floor * typical)
        if self._cut_known(pieces):
            small &= ~np.isin(pieces.cls, pieces.cls[pieces.cut])
        return small

    def _cut_known(self, pieces: Pieces) -> bool:
        return self.keep_cut and len(pieces.cut) == len(pieces.cls)  # (Pieces built without the flags: none is cut)


THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # drop-probability cut-offs the inner cross-validation chooses from


class _Net(torch.nn.Module):
    def __init__(self, width: int, inputs: int = len(FEATURE_NAMES)) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(inputs, width), torch.nn.ReLU(),
                                          torch.nn.Linear(width, width), torch.nn.ReLU(),
                                          torch.nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


@dataclass
class PieceDecider:
    """A trained keep/drop scorer for the pieces of a label map, with its cut-off and gates.

    Attributes:
        typical_ml: per class, the median volume (mL) of the class in the training truth (0: unseen).
        mean, scale: feature standardisation from the training pieces.
        states: the weights of each MLP of the ensemble (their probabilities are averaged).
        threshold: drop when the probability is above this (chosen by inner cross-validation in :meth:`fit`).
        class_threshold: a class under the whole-class floor goes whole when its pieces' volume-weighted
            mean probability is above this (chosen after ``threshold`` by the same cross-validation;
            1.0, the value of deciders fitted before it existed, never drops a class this way).
        gates: :class:`PieceGates`.
        width: MLP width.
        provenance: what it was trained on, and the cross-validation's figures.
        typical_hu: per class ``[mean, sd]`` HU of the class in the training truth (median over cases of
            each case's mean and within-organ SD) for a decider that reads the CT; None: label map only.
    """

    typical_ml: list[float]
    mean: list[float]
    scale: list[float]
    states: list[dict[str, Any]]
    threshold: float = 0.5
    gates: PieceGates = field(default_factory=PieceGates)
    width: int = 32
    provenance: dict[str, Any] = field(default_factory=dict)
    class_threshold: float = 1.0
    typical_hu: list[list[float]] | None = None

    @property
    def uses_ct(self) -> bool:
        """True if the decider reads the CT (it was fitted with it)."""
        return self.typical_hu is not None

    @property
    def feature_names(self) -> list[str]:
        return list(FEATURE_NAMES) + (CT_FEATURE_NAMES if self.uses_ct else [])

    def features(self, pieces: Pieces, spacing: Sequence[float], ct: np.ndarray | None = None) -> np.ndarray:
        """The pieces' features with the class's volume against its typical volume filled in, and the CT's
        columns for a decider that reads it (``ct``: HU on the label map's grid).

        Raises:
            ValueError: the decider reads the CT and none (or one of another shape) was given.
        """
        if self.uses_ct:
            ct = _check_ct(ct)
        feats = pieces.features.copy()
        if not len(feats):
            return feats.reshape(0, len(self.feature_names))
        class_ml = _class_ml(pieces, spacing)
        typical = np.asarray(self.typical_ml)[pieces.cls]
        col = FEATURE_NAMES.index("log_class_of_typical")
        feats[:, col] = np.where(typical > 0, np.log10(class_ml / np.maximum(typical, 1e-6)), 0.0)
        if self.uses_ct:
            feats = np.concatenate([feats, _ct_features(pieces, ct, np.asarray(self.typical_hu))], axis=1)
        return feats

    def scores(self, pieces: Pieces, spacing: Sequence[float], ct: np.ndarray | None = None) -> np.ndarray:
        """Drop probability of each piece (before the cut-off and the gates)."""
        return _predict(self.states, self.width, self._standard(self.features(pieces, spacing, ct)))

    def decide(self, labels: np.ndarray, spacing: Sequence[float], edges: Sequence[bool] | None = None,
               ct: np.ndarray | None = None) -> tuple[Pieces, np.ndarray]:
        """The pieces of ``labels`` (canonical RAS) and which of them to drop (bool (N,)), gates applied;
        ``edges`` as :func:`find_pieces` (None: ``labels`` is the whole image); ``ct``: HU on the same
        grid, for a decider that reads it."""
        if self.uses_ct:
            ct = _check_ct(ct, np.shape(labels))
        pieces = find_pieces(labels, spacing, edges=edges)
        class_ml, typical = _class_ml(pieces, spacing), np.asarray(self.typical_ml)[pieces.cls]
        drop = self.proposal(pieces, self.scores(pieces, spacing, ct), class_ml, typical)
        return pieces, self.gates.allow(pieces, drop, class_ml, typical)

    def proposal(self, pieces: Pieces, prob: np.ndarray, class_ml: np.ndarray, typical: np.ndarray, *,
                 threshold: float | None = None, class_threshold: float | None = None) -> np.ndarray:
        """Which pieces the scores propose to drop, before the gates: each piece above the cut-off, and
        every piece of a class under the whole-class floor whose volume-weighted mean score is above the
        class cut-off (``threshold``/``class_threshold``: override the fitted ones, for the CV)."""
        threshold = self.threshold if threshold is None else threshold
        class_threshold = self.class_threshold if class_threshold is None else class_threshold
        drop = prob > threshold
        if not len(drop) or class_threshold >= 1.0:
            return drop
        small = self.gates.may_go_whole(pieces, class_ml, typical)
        volume = np.bincount(pieces.cls, weights=pieces.voxels, minlength=NUM_CLASSES)
        weighted = np.bincount(pieces.cls, weights=pieces.voxels * prob, minlength=NUM_CLASSES)
        class_score = (weighted / np.maximum(volume, 1))[pieces.cls]
        return drop | (small & (class_score > class_threshold))

    def apply(self, labels: np.ndarray, spacing: Sequence[float], ct: np.ndarray | None = None) -> np.ndarray:
        """``labels`` (canonical RAS) with the dropped pieces set to background (a copy)."""
        pieces, drop = self.decide(labels, spacing, ct=ct)
        return remove_pieces(labels, pieces, drop)

    def apply_to(self, labels: np.ndarray, affine: np.ndarray,
                 ct: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """A label map in any orientation (with its voxel-to-RAS affine, and its CT on the same grid for a
        decider that reads it) after the decision, and how many pieces went; the input is not changed."""
        from .geometry import canonical_affine, to_canonical
        from .spacing import voxel_spacing

        canon, reo = to_canonical(np.asarray(labels), affine)
        spacing = voxel_spacing(canonical_affine(affine, np.shape(labels)))
        if ct is not None and np.shape(ct) != np.shape(labels):
            raise ValueError(f"the CT's shape {np.shape(ct)} differs from the label map's {np.shape(labels)}; "
                             "resample one onto the other's grid first.")
        pieces, drop = self.decide(canon, spacing, ct=None if ct is None else reo.forward(np.asarray(ct)))
        return reo.backward(remove_pieces(canon, pieces, drop)), int(drop.sum())

    def _standard(self, feats: np.ndarray) -> np.ndarray:
        return (feats - np.asarray(self.mean)) / np.asarray(self.scale)

    def to_payload(self) -> dict[str, Any]:
        """Plain types and tensors (what ``torch.load(weights_only=True)`` reads back), e.g. inside a model file."""
        return {"features": self.feature_names, "typical_ml": self.typical_ml, "mean": self.mean,
                "scale": self.scale, "states": self.states, "threshold": self.threshold,
                "class_threshold": self.class_threshold,
                "gates": {"class_floor": self.gates.class_floor,
                          "main_pieces": [list(p) for p in self.gates.main_pieces], "keep_cut": self.gates.keep_cut},
                "width": self.width, "provenance": self.provenance, "typical_hu": self.typical_hu}

    @classmethod
    def from_payload(cls, payload: Any, source: str = "the decider") -> PieceDecider:
        """The decider of :meth:`to_payload`'s dict.

        Raises:
            ValueError: not a decider of this version's features, or an inconsistent one.
        """
        if not isinstance(payload, dict) or payload.get("features") not in (
                list(FEATURE_NAMES), list(FEATURE_NAMES) + CT_FEATURE_NAMES):
            raise ValueError(f"{source}: not a RefNet piece decider of this version; train one with "
                             "`refnet pieces` (or refnet.pieces.PieceDecider.fit).")
        try:
            decider = cls(list(payload["typical_ml"]), list(payload["mean"]), list(payload["scale"]),
                          list(payload["states"]), float(payload["threshold"]), PieceGates(**payload["gates"]),
                          int(payload["width"]), dict(payload.get("provenance", {})),
                          float(payload.get("class_threshold", 1.0)),  # files before it: off
                          _hu_table(payload.get("typical_hu")))
            if decider.feature_names != payload["features"]:
                raise ValueError("its features and its CT statistics disagree")
            _predict(decider.states, decider.width, np.zeros((1, len(decider.feature_names))))  # weights fit the net
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{source}: the piece decider is inconsistent ({err}); fit it again.") from None
        return decider

    def save(self, path: str | os.PathLike) -> Path:
        """Write the decider alone as one torch file (:meth:`load` reads it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.to_payload(), path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PieceDecider:
        """Read a decider written by :meth:`save`.

        Raises:
            ValueError: unreadable, not a decider file, or one made for other features.
        """
        try:
            payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file: say what it should be
            raise ValueError(f"{path}: cannot be read as a RefNet piece decider ({err}).") from None
        return cls.from_payload(payload, str(path))

    @classmethod
    def fit(cls, raws: Sequence[np.ndarray], targets: Sequence[np.ndarray], spacings: Sequence[Sequence[float]],
            groups: Sequence[int] | None = None, *, gates: PieceGates | None = None, width: int = 32,
            epochs: int = 400, ensemble: int = 3, max_pieces: int = 20_000, seed: int = 0,
            provenance: dict[str, Any] | None = None, cts: Sequence[np.ndarray] | None = None) -> PieceDecider:
        """Learn the decision from predictions (out-of-fold ones) paired with their ground truth; with
        ``cts`` (each map's CT in HU, same grid) a decider that reads the CT.

        A noisy model can leave hundreds of thousands of specks; the nets train on at most ``max_pieces``
        of them (a fixed random draw per map, in proportion), which keeps the cost bounded.

        The cut-off is chosen from :data:`THRESHOLDS` by a 2-fold cross-validation over ``groups`` (the
        case of each map, so one case's maps stay on one side): the one whose drops raise the held-out
        maps' mean organ Dice most (ties: the higher, more cautious one); none of them helping keeps
        every piece (cut-off 1.0). Nothing but the training maps is looked at.

        Raises:
            ValueError: no pairs, mismatched lengths, or no pieces to learn from.
        """
        if not raws or len(raws) != len(targets) or len(raws) != len(spacings):
            raise ValueError("PieceDecider.fit needs one target and one spacing per prediction, and at least one.")
        if cts is not None and len(cts) != len(raws):
            raise ValueError(f"PieceDecider.fit: {len(cts)} CTs for {len(raws)} predictions; give one per map.")
        groups = list(range(len(raws))) if groups is None else list(groups)
        gates = gates or PieceGates()
        typical = _typical_ml(targets, spacings)
        blank = cls(typical, [], [], [], 0.5, gates, width,
                    typical_hu=None if cts is None else _typical_hu(targets, cts))
        blank.mean, blank.scale = [0.0] * len(blank.feature_names), [1.0] * len(blank.feature_names)
        maps = []
        for n, (raw, target, spacing, group) in enumerate(zip(raws, targets, spacings, groups)):
            pieces = find_pieces(raw, spacing)
            if len(pieces.cls):
                counts = _Counts.of(pieces, target)
                helps, weight = _drop_effect(pieces, counts)
                feats = blank.features(pieces, spacing, None if cts is None else cts[n])
                maps.append(_Map(pieces, feats, helps, weight, counts, _class_ml(pieces, spacing), group))
        if not maps:
            raise ValueError("PieceDecider.fit: the predictions have no labelled pieces to learn from.")
        total = sum(len(m.helps) for m in maps)
        rng = np.random.default_rng(seed)
        for m in maps:  # which pieces the nets train on (the Dice of the cut-off choice counts all of them)
            keep = min(len(m.helps), max(1, round(max_pieces * len(m.helps) / total)))
            m.train = np.sort(rng.choice(len(m.helps), keep, replace=False)) if keep < len(m.helps) else None
        x = np.concatenate([m.features for m in maps])
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale[scale < 1e-6] = 1.0
        blank.mean, blank.scale = mean.tolist(), scale.tolist()
        (threshold, class_threshold), cv = _choose_threshold(blank, maps, epochs=epochs, ensemble=ensemble,
                                                             seed=seed)
        blank.states = _fit_states(blank, maps, epochs=epochs, ensemble=ensemble, seed=seed)
        blank.threshold, blank.class_threshold = threshold, class_threshold
        blank.provenance = {**(provenance or {}), "maps": len(raws), "pieces": len(x),
                            "drops_helping": int(sum(m.helps.sum() for m in maps)), "cross_validation": cv}
        return blank


def fit_on_pairs(pairs: Sequence[Any], *, seed: int = 0, epochs: int = 400,
                 provenance: dict[str, Any] | None = None, with_ct: bool = False) -> PieceDecider:
    """A decider trained on training pairs (:class:`refnet.pairs.TrainingPair`, canonical layout) and,
    once per case, on the case's truth as its own input: correct maps, whose every piece must stay.
    ``with_ct``: a decider that reads the CT (the pairs must carry it: ``load_training_pairs(...,
    with_ct=True)``).

    Use out-of-fold predictions (``refnet train-segmenters --folds K``): a model's errors on cases it
    trained on are fewer and different from those on new cases.
    """
    from .spacing import voxel_spacing

    if not pairs:
        raise ValueError("no training pairs to fit the piece decider on.")
    truths = list({p.case_id: p for p in pairs}.values())
    raws = [p.raw for p in pairs] + [p.target for p in truths]
    targets = [p.target for p in pairs] + [p.target for p in truths]
    spacings = [voxel_spacing(p.affine) for p in pairs] + [voxel_spacing(p.affine) for p in truths]
    groups = [p.case_id for p in pairs] + [p.case_id for p in truths]
    cts = None
    if with_ct:
        if any(p.ct is None for p in pairs):
            raise ValueError("a piece decider that reads the CT needs the CT of every training pair; load the "
                             "pairs with their CT (refnet.pairs.load_training_pairs(..., with_ct=True)).")
        cts = [p.ct for p in pairs] + [p.ct for p in truths]
    return PieceDecider.fit(raws, targets, spacings, groups, seed=seed, epochs=epochs, cts=cts,
                            provenance={**(provenance or {}), "sources": sorted({p.source for p in pairs}),
                                        "cases": sorted(int(p.case_id) for p in truths), "ct": with_ct})


@dataclass
class _Map:
    pieces: Pieces
    features: np.ndarray
    helps: np.ndarray
    weight: np.ndarray
    counts: _Counts
    class_ml: np.ndarray
    group: int
    train: np.ndarray | None = None  # indices of the pieces the nets train on (None: all)

    def part(self, values: np.ndarray) -> np.ndarray:
        return values if self.train is None else values[self.train]


def _fit_states(decider: PieceDecider, maps: Sequence[_Map], *, epochs: int, ensemble: int,
                seed: int) -> list[dict[str, Any]]:
    x = decider._standard(np.concatenate([m.part(m.features) for m in maps]))
    y = np.concatenate([m.part(m.helps) for m in maps]).astype(np.float64)
    w = np.concatenate([m.part(m.weight) for m in maps])
    return [_train(x, y, w, width=decider.width, epochs=epochs, seed=seed + k) for k in range(ensemble)]


def _choose_threshold(decider: PieceDecider, maps: Sequence[_Map], *, epochs: int, ensemble: int,
                      seed: int) -> tuple[tuple[float, float], dict[str, Any]]:
    """The piece cut-off, then the class cut-off, whose drops raise held-out maps' mean organ Dice most,
    by 2-fold CV over case groups (ties: the higher, more cautious one; none helping: 1.0, off).

    The piece cut-off is chosen exactly as without the class rule; the class cut-off is chosen with it
    fixed, so the class rule only adds the whole-class drops that help on held-out maps."""
    groups = sorted({m.group for m in maps})
    if len(groups) < 2:
        return (0.5, 1.0), {"note": "one case: no cross-validation, cut-off 0.5, no class cut-off"}
    fold_of = {g: n % 2 for n, g in enumerate(groups)}
    held_out = []  # (map, held-out probabilities, mean organ Dice before any drop)
    for fold in (0, 1):
        train = [m for m in maps if fold_of[m.group] != fold]
        held = [m for m in maps if fold_of[m.group] == fold]
        if not train or not held:
            continue
        states = _fit_states(decider, train, epochs=epochs, ensemble=ensemble, seed=seed)
        for m in held:
            prob = _predict(states, decider.width, decider._standard(m.features))
            held_out.append((m, prob, _mean(m.counts.organ_dice(m.pieces, np.zeros(len(prob), bool)))))

    def gain(threshold: float, class_threshold: float) -> float:
        total = 0.0
        for m, prob, before in held_out:
            typical = np.asarray(decider.typical_ml)[m.pieces.cls]
            drop = decider.proposal(m.pieces, prob, m.class_ml, typical, threshold=threshold,
                                    class_threshold=class_threshold)
            total += _mean(m.counts.organ_dice(m.pieces, decider.gates.allow(m.pieces, drop, m.class_ml,
                                                                             typical))) - before
        return total

    piece_gain = {t: gain(t, 1.0) for t in THRESHOLDS}
    best = max(THRESHOLDS, key=lambda t: (round(piece_gain[t], 6), t))
    chosen = best if piece_gain[best] > 0 else 1.0
    class_gain = {t: gain(chosen, t) - piece_gain[chosen] for t in THRESHOLDS} if chosen < 1.0 else {}
    best_class = max(THRESHOLDS, key=lambda t: (round(class_gain[t], 6), t)) if class_gain else 1.0
    chosen_class = best_class if class_gain.get(best_class, 0.0) > 0 else 1.0
    return (chosen, chosen_class), {
        "mean_organ_dice_gain_sum": {str(t): round(v, 5) for t, v in piece_gain.items()}, "threshold": chosen,
        "class_gain_sum": {str(t): round(v, 5) for t, v in class_gain.items()}, "class_threshold": chosen_class}


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else 0.0


def _predict(states: Sequence[dict[str, Any]], width: int, x: np.ndarray) -> np.ndarray:
    if not len(x):
        return np.zeros(0)
    xt = torch.as_tensor(x, dtype=torch.float32)
    probs = []
    for state in states:
        net = _Net(width, x.shape[1])
        net.load_state_dict(state)
        with torch.no_grad():
            probs.append(torch.sigmoid(net(xt)).numpy().astype(np.float64))
    return np.mean(probs, axis=0)


def remove_pieces(labels: np.ndarray, pieces: Pieces, drop: np.ndarray) -> np.ndarray:
    """A copy of ``labels`` with the dropped pieces set to background."""
    out = np.array(labels, copy=True)
    for n in np.nonzero(drop)[0]:
        c = int(pieces.cls[n])
        view = out[pieces.boxes[c]]
        view[pieces.parts[c] == pieces.index[n]] = 0
    return out


def _class_ml(pieces: Pieces, spacing: Sequence[float]) -> np.ndarray:
    """Per piece, its class's total labelled volume in mL."""
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    totals = np.bincount(pieces.cls, weights=pieces.voxels, minlength=NUM_CLASSES)
    return totals[pieces.cls] * voxel_ml


def _typical_ml(targets: Sequence[np.ndarray], spacings: Sequence[Sequence[float]]) -> list[float]:
    """Median volume (mL) of each class over the truths that have it (0 where none has it)."""
    volumes: list[list[float]] = [[] for _ in range(NUM_CLASSES)]
    for target, spacing in zip(targets, spacings):
        voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
        counts = np.bincount(np.asarray(target).ravel().astype(np.int64), minlength=NUM_CLASSES)[:NUM_CLASSES]
        for c in range(1, NUM_CLASSES):
            if counts[c]:
                volumes[c].append(float(counts[c]) * voxel_ml)
    return [float(np.median(v)) if v else 0.0 for v in volumes]


def _train(x: np.ndarray, y: np.ndarray, w: np.ndarray, *, width: int, epochs: int, seed: int) -> dict[str, Any]:
    """Full-batch AdamW on the weighted binary cross-entropy; pieces weigh by the Dice they move."""
    torch.manual_seed(seed)
    net = _Net(width, x.shape[1])
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    wt = torch.as_tensor(w + 1e-3, dtype=torch.float32)
    loss_fn = torch.nn.BCEWithLogitsLoss(weight=wt / wt.mean())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        loss_fn(net(xt), yt).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _check_ct(ct: np.ndarray | None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The CT a CT-reading decider was given, checked (against the label map's ``shape`` when known)."""
    if ct is None:
        raise ValueError("this piece decider reads the CT; pass the CT volume (--ct), or skip the piece "
                         "decision (--keep-pieces).")
    ct = np.asarray(ct)
    if shape is not None and ct.shape != tuple(shape):
        raise ValueError(f"the CT's shape {ct.shape} differs from the label map's {tuple(shape)}; give the CT on "
                         "the label map's grid.")
    return ct


def _ct_features(pieces: Pieces, ct: np.ndarray, typical_hu: np.ndarray) -> np.ndarray:
    """Per piece :data:`CT_FEATURE_NAMES`: its mean HU against its class's typical, in the class's SDs
    (clipped to +-10), and log10 of its HU SD over the class's (SD floor 1 HU)."""
    out = np.zeros((len(pieces.cls), len(CT_FEATURE_NAMES)))
    for c, parts in pieces.parts.items():
        values = np.asarray(ct[pieces.boxes[c]], dtype=np.float64).ravel()
        label = parts.ravel()
        n = int(parts.max()) + 1
        counts = np.maximum(np.bincount(label, minlength=n), 1)
        means = np.bincount(label, weights=values, minlength=n) / counts
        sds = np.sqrt(np.maximum(np.bincount(label, weights=values ** 2, minlength=n) / counts - means ** 2, 0.0))
        mine = np.nonzero(pieces.cls == c)[0]
        mu, sd = typical_hu[c]
        sd = max(float(sd), 1.0)
        out[mine, 0] = np.clip((means[pieces.index[mine]] - mu) / sd, -10.0, 10.0)
        out[mine, 1] = np.log10(np.maximum(sds[pieces.index[mine]], 1.0) / sd)
    return out


def _typical_hu(targets: Sequence[np.ndarray], cts: Sequence[np.ndarray]) -> list[list[float]]:
    """Per class ``[mean, sd]`` HU: medians over the truths that have the class of its mean and within-organ
    SD (``[0, 1]`` where none has it)."""
    stats: list[list[tuple[float, float]]] = [[] for _ in range(NUM_CLASSES)]
    for target, ct in zip(targets, cts):
        target = np.asarray(target).astype(np.int64)
        ct = np.asarray(ct, dtype=np.float64)
        if ct.shape != target.shape:
            raise ValueError(f"a CT of shape {ct.shape} for a label map of shape {target.shape}; give each "
                             "map's CT on its grid.")
        counts = np.bincount(target.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
        sums = np.bincount(target.ravel(), weights=ct.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
        squares = np.bincount(target.ravel(), weights=ct.ravel() ** 2, minlength=NUM_CLASSES)[:NUM_CLASSES]
        for c in range(1, NUM_CLASSES):
            if counts[c]:
                mean = sums[c] / counts[c]
                stats[c].append((mean, float(np.sqrt(max(squares[c] / counts[c] - mean ** 2, 0.0)))))
    return [[float(np.median([m for m, _ in v])), float(np.median([d for _, d in v]))] if v else [0.0, 1.0]
            for v in stats]


def _hu_table(value: Any) -> list[list[float]] | None:
    """A saved ``typical_hu`` (None: a label-only decider), checked: one ``[mean, sd]`` per class."""
    if value is None:
        return None
    table = [[float(m), float(d)] for m, d in value]
    if len(table) != NUM_CLASSES:
        raise ValueError(f"typical_hu has {len(table)} classes, not {NUM_CLASSES}")
    return table
