"""The piece decider that reads the CT: it tells an organ drawn where the patient has none from a small
real one, which look the same in the label map; and the engine asks for the CT it needs."""

import numpy as np
import pytest
from refnet.pieces import CT_FEATURE_NAMES, FEATURE_NAMES, PieceDecider, find_pieces, fit_on_pairs

LIVER, KIDNEY, GALLBLADDER = 6, 3, 4
HU = {0: -90.0, LIVER: 100.0, KIDNEY: 160.0, GALLBLADDER: 10.0}
SMALL = (slice(30, 32), slice(30, 32), slice(30, 32))  # where the base model draws an 8-voxel gallbladder


def _case(has_gallbladder: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth, raw, CT). The truth's gallbladder, when it has one, is a 4^3 block around SMALL; raw draws
    only SMALL in both kinds of case, so the label maps alone are identical. The CT shows bile there only
    when the gallbladder is real (liver-like tissue otherwise)."""
    truth = np.zeros((40, 40, 40), np.uint8)
    truth[4:20, 4:30, 4:30] = LIVER
    truth[4:14, 32:38, 4:14] = KIDNEY
    ct = np.full(truth.shape, HU[0], np.float32)
    for c in (LIVER, KIDNEY):
        ct[truth == c] = HU[c]
    ct[29:33, 29:33, 29:33] = HU[LIVER]  # tissue in the fossa
    if has_gallbladder:
        truth[29:33, 29:33, 29:33] = GALLBLADDER
        ct[29:33, 29:33, 29:33] = HU[GALLBLADDER]
    raw = np.where(truth == GALLBLADDER, 0, truth).astype(np.uint8)
    raw[SMALL] = GALLBLADDER
    return truth, raw, ct + rng.normal(0.0, 5.0, ct.shape).astype(np.float32)


def _data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [_case(k % 4 < 2, rng) for k in range(n)]  # each CV fold (even, odd cases) has both kinds


def test_the_ct_features_measure_each_piece_against_its_organ():
    truth, raw, ct = _case(False, np.random.default_rng(0))
    decider = PieceDecider.fit([raw, truth], [truth, truth], [(1.0, 1.0, 1.0)] * 2, epochs=5, ensemble=1,
                               cts=[ct, ct])
    assert decider.uses_ct and decider.feature_names == list(FEATURE_NAMES) + CT_FEATURE_NAMES
    liver_mean, liver_sd = decider.typical_hu[LIVER]
    assert liver_mean == pytest.approx(100.0, abs=1.0) and liver_sd == pytest.approx(5.0, abs=0.5)
    pieces = find_pieces(raw, (1.0, 1.0, 1.0))
    feats = decider.features(pieces, (1.0, 1.0, 1.0), ct)
    assert feats.shape == (len(pieces.cls), len(FEATURE_NAMES) + 2)
    z = feats[:, len(FEATURE_NAMES)]
    assert abs(z[pieces.cls == LIVER][0]) < 1.0  # the liver is liver
    # No truth here has a gallbladder (typical [0, 1]): the drawn one reads as 100 HU away from nothing known.
    assert z[pieces.cls == GALLBLADDER][0] == pytest.approx(10.0)  # clipped
    with pytest.raises(ValueError, match="reads the CT; pass the CT volume"):
        decider.features(pieces, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="differs from the label map's"):
        decider.decide(raw, (1.0, 1.0, 1.0), ct=ct[:, :, :10])


def test_with_the_ct_the_decider_drops_an_absent_organ_and_keeps_a_small_real_one():
    train = _data(8, 0)
    truths = [t for t, _, _ in train]
    raws, cts = [r for _, r, _ in train], [c for _, _, c in train]
    kwargs = dict(groups=list(range(8)) * 2, epochs=200, ensemble=2, seed=0)
    with_ct = PieceDecider.fit(raws + truths, truths + truths, [(1.0, 1.0, 1.0)] * 16, cts=cts + cts, **kwargs)
    absent, present = (_case(has, np.random.default_rng(9)) for has in (False, True))
    # The same label map in both patients: a decider that reads only it decides both the same way.
    np.testing.assert_array_equal(absent[1], present[1])
    out_absent = with_ct.apply(absent[1], (1.0, 1.0, 1.0), ct=absent[2])
    out_present = with_ct.apply(present[1], (1.0, 1.0, 1.0), ct=present[2])
    assert not (out_absent == GALLBLADDER).any()  # drawn where the patient has none: gone
    np.testing.assert_array_equal(out_present, present[1])  # small but real (bile under it): kept
    for truth, _, ct in (absent, present):  # correct maps come back unchanged
        np.testing.assert_array_equal(with_ct.apply(truth, (1.0, 1.0, 1.0), ct=ct), truth)


def test_a_ct_decider_is_saved_with_its_ct_statistics(tmp_path):
    truth, raw, ct = _case(True, np.random.default_rng(1))
    decider = PieceDecider.fit([raw, truth], [truth, truth], [(1.0, 1.0, 1.0)] * 2, epochs=5, ensemble=1,
                               cts=[ct, ct])
    again = PieceDecider.load(decider.save(tmp_path / "pieces_ct.pt"))
    assert again.uses_ct and again.typical_hu == decider.typical_hu
    pieces = find_pieces(raw, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(again.scores(pieces, (1.0, 1.0, 1.0), ct), decider.scores(pieces, (1.0, 1.0, 1.0), ct))
    payload = decider.to_payload()
    payload["typical_hu"] = None  # CT features without the statistics they are read against
    with pytest.raises(ValueError, match="inconsistent"):
        PieceDecider.from_payload(payload)
    with pytest.raises(ValueError, match="CTs for 2 predictions"):
        PieceDecider.fit([raw, truth], [truth, truth], [(1.0, 1.0, 1.0)] * 2, cts=[ct])


def test_fitting_on_pairs_with_the_ct_needs_the_pairs_ct():
    from refnet.pairs import TrainingPair

    truth, raw, _ = _case(False, np.random.default_rng(2))
    pairs = [TrainingPair(raw, truth, case_id=1, source="m", affine=np.eye(4))]
    with pytest.raises(ValueError, match="with_ct=True"):
        fit_on_pairs(pairs, with_ct=True, epochs=5)


def test_the_engine_asks_for_the_ct_a_decider_reads(tmp_path):
    from refnet.checkpoint import load_model, save_model
    from refnet.guards import GuardConfig
    from refnet.refine import RefineConfig, refine_volume

    truth, raw, ct = _case(False, np.random.default_rng(3))
    decider = PieceDecider.fit([raw, truth], [truth, truth], [(1.0, 1.0, 1.0)] * 2, epochs=5, ensemble=1,
                               cts=[ct, ct])
    shipped = load_model(None)
    model = load_model(save_model(tmp_path / "ct_pieces.pt", shipped.net, metadata=shipped.metadata, pieces=decider))
    assert model.uses_ct and not model.net_uses_ct  # callers pass the CT; the net itself does not read it
    with pytest.raises(ValueError, match="piece decider reads the CT.*--keep-pieces"):
        refine_volume(raw, np.eye(4), model)
    bad = ct.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        refine_volume(raw, np.eye(4), model, ct=bad)
    refined = refine_volume(raw, np.eye(4), model, ct=ct)
    assert refined.labels.shape == raw.shape
    # Without the decider the CT is not needed.
    off = refine_volume(raw, np.eye(4), model, config=RefineConfig(guards=GuardConfig(drop_pieces=False)))
    assert off.report.dropped_pieces == {}


def test_the_no_harm_check_gives_a_ct_decider_the_ct():
    from refnet.checkpoint import load_model
    from refnet.no_harm import no_harm_scores

    train = _data(4, 4)
    truths, raws, cts = ([case[k] for case in train] for k in range(3))
    decider = PieceDecider.fit(raws + truths, truths + truths, [(1.0, 1.0, 1.0)] * 8, groups=[0, 1, 2, 3] * 2,
                               epochs=50, ensemble=1, cts=cts + cts)
    truth, _, ct = _case(True, np.random.default_rng(5))
    scores = no_harm_scores(truth, np.eye(4), load_model(None), pieces=decider, ct=ct)
    assert scores["mean_dice"] is not None and scores["pieces_dropped"] is not None
    with pytest.raises(ValueError, match="reads the CT"):
        no_harm_scores(truth, np.eye(4), load_model(None), pieces=decider)
