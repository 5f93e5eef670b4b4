import numpy as np
import pytest
import torch
from refnet.evaluate import dice_per_class
from refnet.pieces import FEATURE_NAMES, PieceDecider, PieceGates, _Counts, drop_helps, find_pieces

LIVER, KIDNEY, GALLBLADDER, ADRENAL = 6, 3, 4, 12


def _truth(gallbladder: bool = False) -> np.ndarray:
    """A liver block, a kidney block and two adrenal glands (one class, two pieces) on a 40^3 grid."""
    t = np.zeros((40, 40, 40), np.uint8)
    if gallbladder:
        t[20:24, 32:36, 4:8] = GALLBLADDER
    t[4:20, 4:30, 4:30] = LIVER
    t[26:36, 10:20, 10:20] = KIDNEY
    t[24:27, 30:33, 20:23] = ADRENAL
    t[33:36, 30:33, 20:23] = ADRENAL
    return t


def _with_errors(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The truth plus liver specks in the background and, where the truth lacks one, a small gallbladder."""
    raw = truth.copy()
    for _ in range(3):
        x, y, z = rng.integers(22, 37), rng.integers(2, 8), rng.integers(30, 37)
        raw[x:x + 2, y:y + 2, z:z + 2] = LIVER
    if not (truth == GALLBLADDER).any():
        raw[36:38, 36:38, 2:4] = GALLBLADDER
    return raw


def test_pieces_features_are_physical():
    t = _truth()
    t[30:32, 2:4, 34:36] = LIVER  # a speck far from the liver
    one, two = find_pieces(t, (1.0, 1.0, 1.0)), find_pieces(t, (2.0, 2.0, 2.0))
    assert sorted(one.cls.tolist()) == [KIDNEY, LIVER, LIVER, ADRENAL, ADRENAL]
    speck = int(np.nonzero((one.cls == LIVER) & (one.voxels == 8))[0][0])
    f1, f2 = one.features[speck], two.features[speck]
    col = {n: i for i, n in enumerate(FEATURE_NAMES)}
    assert f1[col["is_largest"]] == 0 and f1[col["log_of_largest"]] == pytest.approx(np.log10(8 / (16 * 26 * 26)))
    assert f2[col["gap_mm"]] == pytest.approx(2 * f1[col["gap_mm"]])  # mm, not voxels
    assert f2[col["log_ml"]] == pytest.approx(f1[col["log_ml"]] + np.log10(8), abs=1e-3)
    assert f1[col["touch_0"]] == pytest.approx(1.0)  # all around it is background
    assert one.mask(speck, t.shape).sum() == 8


def test_drop_helps_and_counts_match_dice():
    t = _truth()
    raw = _with_errors(t, np.random.default_rng(0))
    pieces = find_pieces(raw, (1.0, 1.0, 1.0))
    helps, weight = drop_helps(pieces, t)
    for n, c in enumerate(pieces.cls):
        right = pieces.voxels[n] > 100 or c == ADRENAL
        assert helps[n] == (not right), (c, pieces.voxels[n])
    assert helps[pieces.cls == GALLBLADDER].all()  # a class the truth lacks
    # The counts give exactly the Dice of the map with the drops applied.
    counts = _Counts.of(pieces, t)
    out = raw.copy()
    for n in np.nonzero(helps)[0]:
        out[pieces.mask(n, raw.shape)] = 0
    np.testing.assert_allclose(counts.organ_dice(pieces, helps), dice_per_class(out, t)[1:], equal_nan=True)
    assert (weight > 0).all()


def test_gates_keep_the_largest_piece_unless_the_class_is_implausibly_small():
    t = _truth()
    raw = _with_errors(t, np.random.default_rng(1))
    pieces = find_pieces(raw, (1.0, 1.0, 1.0))
    largest = pieces.features[:, FEATURE_NAMES.index("is_largest")] > 0.5
    everything = np.ones(len(pieces.cls), bool)
    class_ml = np.bincount(pieces.cls, weights=pieces.voxels, minlength=13)[pieces.cls] / 1000.0
    typical = np.where(pieces.cls == GALLBLADDER, 1.0, class_ml)  # the gallbladder is 8 uL of a typical 1 mL
    drop = PieceGates(class_floor=0.2).allow(pieces, everything, class_ml, typical)
    assert drop[pieces.cls == GALLBLADDER].all() and not drop[largest & (pieces.cls != GALLBLADDER)].any()
    assert drop[(pieces.cls == LIVER) & ~largest].all()
    # A whole class goes only with its largest piece: dropping small pieces alone leaves the class.
    only_small = PieceGates().allow(pieces, ~largest, class_ml, class_ml)
    assert not only_small[largest].any()
    # Both adrenal glands are main pieces (one class, two organs); a third adrenal piece is not.
    raw[2:4, 36:38, 36:38] = ADRENAL
    pieces = find_pieces(raw, (1.0, 1.0, 1.0))
    class_ml = np.bincount(pieces.cls, weights=pieces.voxels, minlength=13)[pieces.cls] / 1000.0
    drop = PieceGates().allow(pieces, np.ones(len(pieces.cls), bool), class_ml, class_ml)
    adrenal = pieces.cls == ADRENAL
    assert drop[adrenal].tolist() == (pieces.voxels[adrenal] == 8).tolist() and drop[adrenal].sum() == 1
    largest = pieces.features[:, FEATURE_NAMES.index("is_largest")] > 0.5
    # Without the rule the smaller gland could go too (the largest stays).
    assert PieceGates(main_pieces=()).allow(pieces, ~largest | adrenal, class_ml, class_ml)[adrenal].sum() == 2


def _slab() -> np.ndarray:
    """A correct liver cut by the scan range: a slab through two lobes joined above it (two pieces, both
    reaching the top and bottom slices), and a small gallbladder cap reaching the bottom slice."""
    t = np.zeros((40, 40, 6), np.uint8)
    t[4:24, 4:30, :] = LIVER
    t[28:32, 10:16, :] = LIVER  # the other lobe, 7% of the first
    t[32:34, 30:32, :2] = GALLBLADDER
    return t


def test_pieces_the_image_edge_cuts_are_flagged():
    t = _slab()
    t[10:12, 34:36, 2:4] = KIDNEY  # inside: touches no edge
    pieces = find_pieces(t, (1.0, 1.0, 1.0))
    assert pieces.cut[pieces.cls == LIVER].all() and pieces.cut[pieces.cls == GALLBLADDER].all()
    assert not pieces.cut[pieces.cls == KIDNEY].any()
    assert not find_pieces(t, (1.0, 1.0, 1.0), edges=[False] * 6).cut.any()  # a box inside a larger image
    top_only = find_pieces(t, (1.0, 1.0, 1.0), edges=[False] * 5 + [True]).cut
    assert top_only.tolist() == [p == LIVER for p in find_pieces(t, (1.0, 1.0, 1.0)).cls]  # the cap stops short
    with pytest.raises(ValueError, match="one flag per face"):
        find_pieces(t, (1.0, 1.0, 1.0), edges=[True] * 4)


def test_gates_keep_what_the_image_edge_cuts():
    t = _slab()
    pieces = find_pieces(t, (1.0, 1.0, 1.0))
    everything = np.ones(len(pieces.cls), bool)
    class_ml = np.bincount(pieces.cls, weights=pieces.voxels, minlength=13)[pieces.cls] / 1000.0
    typical = class_ml * 100  # every class far below its typical volume: whole classes may go
    assert not PieceGates().allow(pieces, everything, class_ml, typical).any()
    # Without the rule the smaller lobe goes, and the cut gallbladder cap with its whole class.
    free = PieceGates(keep_cut=False).allow(pieces, everything, class_ml, typical)
    assert free.all()
    # The same slab inside a larger image: nothing is cut, so the gates alone decide again.
    inner = find_pieces(t, (1.0, 1.0, 1.0), edges=[False] * 6)
    assert PieceGates().allow(inner, everything, class_ml, typical).all()


def _decider(seed: int = 0) -> PieceDecider:
    rng = np.random.default_rng(seed)
    truths = [_truth(gallbladder=n % 2 == 0) for n in range(6)]
    raws = [_with_errors(t, rng) for t in truths] + truths[:2]  # and correct maps, which must stay
    return PieceDecider.fit(raws, truths + truths[:2], [(1.0, 1.0, 1.0)] * 8, groups=[0, 1, 2, 3, 4, 5, 0, 1],
                            epochs=150, ensemble=2, seed=seed)


def test_decider_learns_to_drop_errors_and_keep_correct_pieces(tmp_path):
    decider = _decider()
    assert decider.typical_ml[GALLBLADDER] == pytest.approx(0.064)
    for t in (_truth(), _truth(gallbladder=True)):
        raw = _with_errors(t, np.random.default_rng(7))  # specks at places never seen in training
        # Both adrenal glands and a real gallbladder stay; the specks and an implausible gallbladder go.
        np.testing.assert_array_equal(decider.apply(raw, (1.0, 1.0, 1.0)), t)
        np.testing.assert_array_equal(decider.apply(t, (1.0, 1.0, 1.0)), t)  # correct maps come back unchanged
    cv = decider.provenance["cross_validation"]
    assert decider.threshold == cv["threshold"] and decider.provenance["maps"] == 8
    # Round trip: the same scores after save and load.
    path = decider.save(tmp_path / "pieces.pt")
    again = PieceDecider.load(path)
    pieces = find_pieces(raw, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(again.scores(pieces, (1.0, 1.0, 1.0)), decider.scores(pieces, (1.0, 1.0, 1.0)))


def _scattered_gallbladder() -> np.ndarray:
    """The truth (no gallbladder) with an absent gallbladder drawn as three separate pieces."""
    raw = _truth()
    raw[30:34, 32:36, 30:34] = GALLBLADDER  # 64 voxels
    raw[36:38, 36:38, 34:36] = GALLBLADDER  # 8
    raw[22:23, 36:37, 36:37] = GALLBLADDER  # 1
    return raw


def test_a_small_class_is_also_scored_as_a_whole():
    raw = _scattered_gallbladder()
    pieces = find_pieces(raw, (1.0, 1.0, 1.0))
    gb = pieces.cls == GALLBLADDER
    class_ml = np.bincount(pieces.cls, weights=pieces.voxels, minlength=13)[pieces.cls] / 1000.0
    typical = np.where(gb, 1.0, class_ml)  # 73 uL of a typical 1 mL: under the floor; the rest typical
    prob = np.where(gb, np.where(pieces.voxels == 64, 0.88, 0.99), 0.1)  # its largest piece under the cut-off
    decider = _decider()
    decider = PieceDecider(decider.typical_ml, decider.mean, decider.scale, decider.states, 0.9, PieceGates())
    # Piece by piece (class cut-off 1.0, the old deciders): the largest piece stays, so the class does.
    piecewise = decider.proposal(pieces, prob, class_ml, typical)
    assert piecewise[gb].sum() == 2 and not PieceGates().allow(pieces, piecewise, class_ml, typical)[gb].all()
    # As a whole: mean score (64 * .88 + 9 * .99) / 73 = .894 passes 0.85, so every piece goes, gates allowing.
    whole = decider.proposal(pieces, prob, class_ml, typical, class_threshold=0.85)
    assert whole[gb].all() and not whole[~gb].any()
    assert PieceGates().allow(pieces, whole, class_ml, typical)[gb].all()
    assert not decider.proposal(pieces, prob, class_ml, typical, class_threshold=0.9)[gb].all()
    # A class at its typical volume never goes whole this way, and neither does one the image edge cuts.
    assert not decider.proposal(pieces, prob, class_ml, class_ml, class_threshold=0.5)[gb].all()
    edge = raw.copy()
    edge[39, 39, 39] = GALLBLADDER
    cut = find_pieces(edge, (1.0, 1.0, 1.0))
    cut_gb = cut.cls == GALLBLADDER
    cut_ml = np.bincount(cut.cls, weights=cut.voxels, minlength=13)[cut.cls] / 1000.0
    cut_prob = np.where(cut_gb, 0.95, 0.1)
    assert cut.cut[cut_gb].sum() == 1
    assert not decider.proposal(cut, np.where(cut_gb & cut.cut, 0.4, cut_prob), cut_ml,
                                np.where(cut_gb, 1.0, cut_ml), class_threshold=0.5)[cut_gb & cut.cut].any()


def test_the_class_cut_off_is_chosen_by_cross_validation_and_saved(tmp_path):
    decider = _decider()
    cv = decider.provenance["cross_validation"]
    assert decider.class_threshold == cv["class_threshold"]
    gains = cv["class_gain_sum"]
    # On only when it helps the held-out maps; then the best (the highest of ties).
    if decider.class_threshold < 1.0:
        assert gains[str(decider.class_threshold)] == max(gains.values()) > 0
    else:
        assert all(v <= 0 for v in gains.values())
    decider.class_threshold = 0.7
    assert PieceDecider.load(decider.save(tmp_path / "pieces.pt")).class_threshold == 0.7
    # A decider saved before the class rule existed reads back with it off.
    payload = decider.to_payload()
    del payload["class_threshold"]
    assert PieceDecider.from_payload(payload).class_threshold == 1.0


def test_decider_refuses_foreign_files_and_empty_training(tmp_path):
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a RefNet piece decider"):
        PieceDecider.load(tmp_path / "other.pt")
    (tmp_path / "broken.pt").write_bytes(b"nope")
    with pytest.raises(ValueError, match="cannot be read as a RefNet piece decider"):
        PieceDecider.load(tmp_path / "broken.pt")
    empty = np.zeros((8, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="no labelled pieces"):
        PieceDecider.fit([empty], [empty], [(1.0, 1.0, 1.0)])
    with pytest.raises(ValueError, match="one target and one spacing"):
        PieceDecider.fit([empty], [], [(1.0, 1.0, 1.0)])


def test_decider_on_an_empty_map_changes_nothing():
    decider = _decider()
    empty = np.zeros((10, 10, 10), np.uint8)
    np.testing.assert_array_equal(decider.apply(empty, (1.0, 1.0, 1.0)), empty)


def test_apply_to_reads_the_orientation_from_the_affine():
    decider = _decider()
    raw = _with_errors(_truth(), np.random.default_rng(3))
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])  # the same map stored left-posterior first, 2 x 2 x 3 mm voxels
    stored = raw[::-1, ::-1, :]
    out, dropped = decider.apply_to(stored, lps)
    np.testing.assert_array_equal(out[::-1, ::-1, :], decider.apply(raw, (2.0, 2.0, 3.0)))
    assert dropped > 0 and (stored == raw[::-1, ::-1, :]).all()  # the input is untouched


def test_no_harm_scores_count_the_decider_after_the_refiner():
    from refnet.checkpoint import load_model
    from refnet.no_harm import no_harm_scores

    decider, model = _decider(), load_model(None)
    t = _truth()
    alone = no_harm_scores(t, np.eye(4), model)
    both = no_harm_scores(t, np.eye(4), model, pieces=decider)
    assert alone["pieces_dropped"] is None and both["pieces_dropped"] == 0
    assert both["mean_dice"] == alone["mean_dice"]


def test_a_model_file_carries_its_decider_and_the_engine_applies_it(tmp_path):
    from refnet.checkpoint import load_model, save_model
    from refnet.guards import GuardConfig
    from refnet.refine import RefineConfig, refine_volume
    from refnet.segments import format_guards

    shipped = load_model(None)
    decider = _decider()
    path = save_model(tmp_path / "with_pieces.pt", shipped.net, metadata=shipped.metadata, pieces=decider)
    model = load_model(path)
    assert model.pieces is not None and model.pieces.threshold == decider.threshold
    assert load_model(save_model(tmp_path / "plain.pt", shipped.net, metadata=shipped.metadata)).pieces is None
    t = _truth()
    raw = _with_errors(t, np.random.default_rng(5))
    specks = (raw == LIVER) & (t != LIVER)
    result = refine_volume(raw, np.eye(4), model)
    assert not (result.labels[specks] == LIVER).any() and (result.labels == GALLBLADDER).sum() == 0
    dropped = result.report.dropped_pieces
    assert dropped["Liver"]["pieces"] == 3 and dropped["Gallbladder"]["whole_class"]
    assert "Gallbladder whole" in result.report.summary()
    assert any(line.startswith("Piece decision: dropped pieces:") and "Liver 3 (" in line
               for line in format_guards(result.report))
    assert result.report.to_dict()["dropped_pieces"] == result.report.dropped_pieces
    kept = refine_volume(raw, np.eye(4), model, config=RefineConfig(guards=GuardConfig(drop_pieces=False)))
    assert kept.report.dropped_pieces == {} and (kept.labels == GALLBLADDER).any()  # the net alone keeps the class
    assert "Piece decision: off." in format_guards(kept.report, GuardConfig(drop_pieces=False))


def test_the_engine_keeps_pieces_the_image_edge_cuts_and_reads_the_edges_from_its_box(tmp_path):
    from dataclasses import replace

    from refnet.checkpoint import load_model
    from refnet.refine import refine_volume

    model = load_model(None)
    model.pieces = replace(_decider(), threshold=-1.0)  # scores every piece for dropping: only the gates stop it
    slab = _slab()
    lobe = (slab == LIVER) & (np.arange(40)[:, None, None] >= 28)
    out = refine_volume(slab, np.eye(4), model)
    assert out.labels[lobe].tolist().count(LIVER) == lobe.sum() and (out.labels == GALLBLADDER).any()
    assert out.report.dropped_pieces == {}
    # The same anatomy with background above and below (the scan covers the lobes' ends): the engine's box
    # stops inside the image, so nothing is cut and the smaller lobe goes (the decider's call).
    padded = np.pad(slab, ((0, 0), (0, 0), (8, 8)))
    inside = refine_volume(padded, np.eye(4), model)
    assert not (inside.labels[:, :, 8:14][lobe] == LIVER).any()
    assert inside.report.dropped_pieces["Liver"]["pieces"] == 1


def test_a_damaged_decider_in_a_model_file_is_named(tmp_path):
    from refnet.checkpoint import load_model, save_model

    shipped = load_model(None)
    path = save_model(tmp_path / "m.pt", shipped.net, metadata=shipped.metadata, pieces=_decider())
    payload = torch.load(path, weights_only=True)
    payload["pieces"]["states"][0].pop("layers.0.weight")
    torch.save(payload, path)
    with pytest.raises(ValueError, match="its piece decider: the piece decider is inconsistent"):
        load_model(path)


def test_refnet_pieces_command_adds_a_decider_and_keeps_the_input_model(tmp_path, capsys):
    from refnet.checkpoint import load_model, save_model
    from refnet.cli import main
    from refnet.data.phantoms import PhantomConfig, write_phantom_dataset

    data = tmp_path / "data"
    coarse = PhantomConfig.demo(inplane_spacing_mm=(6.0, 6.0), slice_spacing_mm=(9.0, 9.0))
    write_phantom_dataset(data, [5, 6, 1], config=coarse, seed=0)
    shipped = load_model(None)
    model = save_model(tmp_path / "m.pt", shipped.net, metadata=shipped.metadata)  # a model without a decider
    args = ["pieces", "-q", "--data", str(data), "--predictions", str(data / "label"), "--device", "cpu"]
    assert main([*args, "--model", str(model), "--out", str(model)]) == 2
    assert "is the --model file" in capsys.readouterr().err
    out = tmp_path / "m_pieces.pt"
    assert main([*args, "--model", str(model), "--out", str(out)]) == 0
    assert load_model(out).pieces is not None and load_model(model).pieces is None
    printed = capsys.readouterr().out
    assert "cut-off" in printed and "whole-class cut-off" in printed
    assert main([*args, "--model", str(model), "--out", str(out)]) == 2  # exists: not replaced without --overwrite
    with_ct = tmp_path / "m_pieces_ct.pt"
    assert main([*args, "--model", str(model), "--out", str(with_ct), "--ct"]) == 0
    loaded = load_model(with_ct)
    assert loaded.pieces.uses_ct and loaded.uses_ct and not loaded.net_uses_ct
