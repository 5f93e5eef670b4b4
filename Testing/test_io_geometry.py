import numpy as np
import pytest
from refnet.geometry import axial_axis, canonical_affine, check_affine, to_canonical
from refnet.io import load_volume, save_volume, volume_suffix

LPS_LIKE = np.diag([-0.8, -0.8, 3.0, 1.0])
SAGITTAL = np.array([[0, 0, 1.0, 5], [-1.0, 0, 0, 6], [0, -2.5, 0, 7], [0, 0, 0, 1]])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_save_load_round_trip(tmp_path, suffix):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    path = save_volume(tmp_path / f"x{suffix}", arr, LPS_LIKE)
    vol = load_volume(path)
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, LPS_LIKE, atol=1e-5)
    assert vol.spacing == pytest.approx((0.8, 0.8, 3.0))
    assert [p.name for p in tmp_path.iterdir()] == [f"x{suffix}"]  # no temp file left behind


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_volume(tmp_path / "missing.nii.gz")
    save_volume(tmp_path / "flat.nii.gz", np.zeros((4, 4, 1, 2)), np.eye(4))
    with pytest.raises(ValueError, match="expected a 3D volume, got 4D"):
        load_volume(tmp_path / "flat.nii.gz")
    with pytest.raises(ValueError, match="unsupported file type"):
        volume_suffix("a.png")


def test_trailing_singleton_axis_is_dropped(tmp_path):
    save_volume(tmp_path / "a.nii.gz", np.zeros((4, 4, 3, 1), np.uint8), np.eye(4))
    assert load_volume(tmp_path / "a.nii.gz").array.shape == (4, 4, 3)


@pytest.mark.parametrize(("affine", "axis"), [(np.eye(4), 2), (LPS_LIKE, 2), (SAGITTAL, 1)])
def test_axial_axis(affine, axis):
    assert axial_axis(affine) == axis


@pytest.mark.parametrize("affine", [np.eye(4), LPS_LIKE, SAGITTAL])
def test_to_canonical_round_trip_and_world_positions(affine):
    arr = np.random.default_rng(0).integers(0, 9, (5, 6, 7))
    canon, reo = to_canonical(arr, affine)
    np.testing.assert_array_equal(reo.backward(canon), arr)
    caff = canonical_affine(affine, arr.shape)
    assert np.all(np.diag(caff)[:3] > 0) and np.count_nonzero(caff[:3, :3]) == 3
    # The same world point holds the same value in both layouts.
    ijk = np.array([1, 2, 3, 1.0])
    world = affine @ ijk
    cijk = np.round(np.linalg.inv(caff) @ world).astype(int)[:3]
    assert canon[tuple(cijk)] == arr[1, 2, 3]


def test_check_affine_errors():
    with pytest.raises(ValueError, match="4x4"):
        check_affine(np.eye(3))
    with pytest.raises(ValueError, match="singular"):
        check_affine(np.diag([1.0, 0.0, 1.0, 1.0]))


def test_written_files_respect_the_umask(tmp_path):
    """Outputs are readable by others under umask 022, as open() would make them (mkstemp alone gives 0600)."""
    import os
    import stat

    from refnet.io import save_volume, write_json

    old = os.umask(0o022)
    try:
        a = save_volume(tmp_path / "a.nii.gz", np.zeros((2, 2, 2), np.uint8), np.eye(4))
        b = write_json(tmp_path / "b.json", {"x": np.int64(1)})
    finally:
        os.umask(old)
    for path in (a, b):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


@pytest.mark.parametrize(("name", "content", "match"), [
    ("empty.nii.gz", b"", "cannot be read as gzip-compressed NIfTI \\(it is empty\\)"),
    ("png.nii.gz", b"\x89PNG\r\n\x1a\n" + b"0" * 100, "cannot be read as gzip-compressed NIfTI"),
    ("half.nii.gz", None, "cannot be read as gzip-compressed NIfTI \\(EOFError"),
    ("gzipped.nii", "gzip", "cannot be read as NIfTI.*a .nii must not"),
    ("junk.nrrd", b"hello", "cannot be read as NRRD"),
    ("empty.nrrd", b"", "cannot be read as NRRD \\(it is empty\\)"),
])
def test_unreadable_files_name_the_file_and_the_fix(tmp_path, name, content, match):
    labels = np.random.default_rng(0).integers(0, 13, (30, 30, 30)).astype(np.uint8)
    good = save_volume(tmp_path / "good.nii.gz", labels, np.eye(4)).read_bytes()
    data = good[: len(good) // 2] if content is None else good if content == "gzip" else content
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=f"{name}: {match}"):
        load_volume(tmp_path / name)


def test_sigterm_during_a_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import os
    import signal

    import nibabel as nib
    from refnet.io import stop_on_sigterm

    real_save = nib.save

    def killed_mid_write(img, filename):
        real_save(img, filename)  # the temporary file now exists ...
        os.kill(os.getpid(), signal.SIGTERM)  # ... and the job scheduler stops us

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(nib, "save", killed_mid_write)
    try:
        stop_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            save_volume(tmp_path / "out.nii.gz", np.zeros((3, 3, 3), np.uint8), np.eye(4))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_only_our_leftover_temporaries(tmp_path):
    from refnet.io import sweep_temporaries

    names = [".label0001.ab12_xyz.nii.gz", ".refnet_batch_summary.json.k3j4h5g6.tmp", ".case.q1w2e3r4.nrrd",
             "label0001.nii.gz", ".hidden_notes.txt", ".label0002.short.nii.gz"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = sweep_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(names[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])
