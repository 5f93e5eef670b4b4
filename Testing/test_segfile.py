"""Slicer segmentation files (.seg.nrrd) through `refnet refine` and the batch: segments, names, colours kept."""

import numpy as np
import pytest
import slicerio
from refnet import batch
from refnet.checkpoint import load_model
from refnet.cli import main
from refnet.io import load_volume
from refnet.refine import refine_labels
from refnet.segfile import read_segmentation_file, write_segmentation_file
from refnet.segments import split_class_map

from .conftest import make_model_file

AFFINE_LPS = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
LIVER_TERM = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
              "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")


def _segmentation(path):
    """Spleen first (label value 1), liver second (value 2, so a label-volume reader calls it a right kidney),
    a tumour overlapping the liver (a second layer) that matches no RefNet class."""
    seg = slicerio.create_segmentation((40, 36, 8), AFFINE_LPS)
    liver = np.zeros((40, 36, 8), bool)
    liver[5:22, 6:26, 1:7] = True
    spleen = np.zeros_like(liver)
    spleen[26:34, 8:18, 2:6] = True
    tumour = np.zeros_like(liver)
    tumour[10:14, 10:14, 3:5] = True
    slicerio.add_segment(seg, spleen, {"id": "Segment_1", "name": "spleen", "color": [0.6, 0.4, 0.6]})
    slicerio.add_segment(seg, liver, {"id": "Segment_7", "name": "my liver", "color": [0.9, 0.5, 0.4],
                                      "terminology": slicerio.segmentation.terminology_entry_from_string(LIVER_TERM)})
    slicerio.add_segment(seg, tumour, {"id": "Tumor_1", "name": "Tumor", "color": [1.0, 1.0, 0.0]})
    slicerio.write_segmentation(str(path), seg)
    return {"spleen": spleen, "liver": liver, "tumour": tumour}


def test_segments_are_matched_by_name_and_terminology_not_by_voxel_value(tmp_path):
    masks = _segmentation(tmp_path / "in.seg.nrrd")
    read = read_segmentation_file(tmp_path / "in.seg.nrrd")
    assert read.classes == [1, 6, None] and read.unmatched == ["Tumor"]
    class_map = read.class_map()
    assert (class_map[masks["liver"]] == 6).all() and (class_map[masks["spleen"]] == 1).all()
    np.testing.assert_allclose(read.affine, np.diag([-1, -1, 1, 1]) @ AFFINE_LPS)
    with pytest.raises(ValueError, match="is a Slicer segmentation, not a label volume"):
        load_volume(tmp_path / "in.seg.nrrd")  # its voxel values (1, 2 per layer) are not classes


def test_refine_round_trip_keeps_every_segment(tmp_path, capsys):
    masks = _segmentation(tmp_path / "in.seg.nrrd")
    model_file = make_model_file(tmp_path / "m.pt")
    assert main(["refine", "--labels", str(tmp_path / "in.seg.nrrd"), "--out", str(tmp_path / "out.seg.nrrd"),
                 "--model", str(model_file), "--device", "cpu"]) == 0
    assert "Copied unchanged (no RefNet class): Tumor." in capsys.readouterr().out
    before, after = slicerio.read_segmentation(str(tmp_path / "in.seg.nrrd")), \
        slicerio.read_segmentation(str(tmp_path / "out.seg.nrrd"))
    fields = ("id", "name", "color", "terminology")
    assert [[s.get(k) for k in fields] for s in after["segments"]] == [[s.get(k) for k in fields]
                                                                       for s in before["segments"]]
    np.testing.assert_array_equal(slicerio.segment_mask(after, "Tumor"), masks["tumour"])  # copied unchanged
    read = read_segmentation_file(tmp_path / "in.seg.nrrd")
    refined = refine_labels(read.class_map(), read.affine, load_model(model_file))
    spleen, liver = split_class_map(refined, [masks["spleen"], masks["liver"]], [1, 6],
                                    spacing=(0.8, 0.8, 2.5))
    np.testing.assert_array_equal(slicerio.segment_mask(after, "my liver"), liver)
    np.testing.assert_array_equal(slicerio.segment_mask(after, "spleen"), spleen)
    assert not np.array_equal(liver, masks["liver"])  # the tiny model does change the liver
    assert main(["refine", "--labels", str(tmp_path / "in.seg.nrrd"), "--out", str(tmp_path / "out.nii.gz"),
                 "--model", str(model_file)]) != 0
    assert "must both be Slicer segmentations (.seg.nrrd)" in capsys.readouterr().err


def test_batch_refines_segmentation_files(tmp_path):
    (tmp_path / "in").mkdir()
    _segmentation(tmp_path / "in" / "case1.seg.nrrd")
    model = load_model(make_model_file(tmp_path / "m.pt"))

    def refine_case(labels, affine, ct, scheme=None):
        assert scheme == "refnet"  # a segmentation file's class map is in RefNet classes
        return batch.refine_label_map_with_report(labels, affine, ct, model=model, scheme=scheme)

    summary = batch.run_batch(batch.find_cases(tmp_path / "in"), tmp_path / "out", refine_case, needs_ct=False)
    assert summary.exit_code == 0
    out = read_segmentation_file(tmp_path / "out" / "case1.seg.nrrd")
    assert [s["name"] for s in out.segments] == ["spleen", "my liver", "Tumor"]
    write_segmentation_file(tmp_path / "again.seg.nrrd", out, out.class_map())  # a no-op refinement round-trips
    again = read_segmentation_file(tmp_path / "again.seg.nrrd")
    assert all(np.array_equal(a, b) for a, b in zip(again.masks, out.masks))
