"""CT data: reading the real volume and DICOM slices, RAS orientation, resampling, the HU rule,
report splitting on real report text, MONAI preprocessing round trips and the CT sources."""

from __future__ import annotations

import csv
import gzip
import io
import json
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
import torch

from vlp.data_pipelines.sources import build
from vlp.data_pipelines.sources.ct_lesions import atlas_path, location_words
from vlp.data_pipelines.sources.ct_rate import CT_RATE_ABNORMALITIES
from vlp.data_pipelines.text import is_normal_sentence, report_sentences
from vlp.data_pipelines.volume_io import (
    HUInfo,
    Volume,
    VolumeError,
    decode_sample_volume,
    read_volume,
    to_hu,
    volume_to_npy,
)
from vlp.data_pipelines.volume_transforms import VolumePreprocess, resample_to_spacing

RADMATCH_CHEST = "radmatch/assets/fewshot/chest-ct/reports_gt/example_1.txt"


def _site_file(relative: str) -> Path:
    import importlib.util

    root = Path(importlib.util.find_spec("radmatch").submodule_search_locations[0]).parent
    return root / relative


@pytest.fixture(scope="module")
def atlas_crop() -> Volume:
    """A 48 x 40 x 36 crop of the real totalsegmentator CT volume (1 mm), affine shifted to match."""
    image = nib.load(atlas_path())
    data = np.asarray(image.dataobj, dtype=np.float32)[80:128, 60:100, 70:106]
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.array([80, 60, 70]) + image.affine[:3, 3]
    return Volume(data, affine, HUInfo(False))


def _nifti_bytes(array: np.ndarray, affine: np.ndarray, slope=None, inter=None) -> bytes:
    data = bytearray(nib.Nifti1Image(array, affine).to_bytes())
    if slope is not None:  # nibabel resets scaling on write; set scl_slope/scl_inter (bytes 112-120) directly
        data[112:120] = struct.pack("<ff", slope, inter)
    return gzip.compress(bytes(data))


# ---------------------------------------------------------------------------------------------
# reading, orientation, spacing


def test_real_nifti_reads_in_ras_with_header_spacing():
    volume = read_volume(atlas_path())
    assert volume.array.shape == (202, 202, 179)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert volume.spacing == pytest.approx((1.0, 1.0, 1.0))
    raw = np.asarray(nib.load(atlas_path()).dataobj)
    np.testing.assert_array_equal(volume.array, raw.astype(np.float32))
    assert not volume.hu.rescale_applied


def test_orientation_to_ras_undoes_an_lps_flip(atlas_crop):
    # The same anatomy stored LPS: x and y reversed, affine columns negated and origin moved.
    lps = atlas_crop.array[::-1, ::-1, :].copy()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [atlas_crop.array.shape[0] - 1, atlas_crop.array.shape[1] - 1]
    affine = atlas_crop.affine @ flip
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    prep = VolumePreprocess(False, spacing=None, roi=atlas_crop.array.shape, hu_window=(-1000, 1000))
    out = prep(Volume(lps, affine, HUInfo(False)))[0].numpy()
    expected = np.clip(atlas_crop.array / 1000.0, -1, 1)  # [-1000, 1000] -> [-1, 1]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_resampling_sets_spacing_and_keeps_world_positions(atlas_crop):
    out = resample_to_spacing(atlas_crop, (2.0, 2.0, 3.0))
    assert out.spacing == pytest.approx((2.0, 2.0, 3.0))
    assert out.array.shape == pytest.approx((24, 20, 12), abs=1)
    # Voxel (0, 0, 0) of both grids is the same world point (MONAI keeps the corner voxel centre).
    np.testing.assert_allclose(out.affine[:3, 3], atlas_crop.affine[:3, 3], atol=1e-4)
    # Trilinear resampling preserves the mean intensity of a smooth region to within a few HU.
    assert abs(out.array.mean() - atlas_crop.array.mean()) < 3.0


def test_preprocess_resamples_windows_and_crops(atlas_crop):
    prep = VolumePreprocess(False, spacing=(2.0, 2.0, 2.0), roi=(16, 16, 16), hu_window=(-100, 100))
    out = prep(atlas_crop)
    assert out.shape == (1, 16, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    # The centre crop of the resampled volume, windowed by hand.
    resampled = resample_to_spacing(atlas_crop, (2.0, 2.0, 2.0)).array
    starts = [(n - 16) // 2 for n in resampled.shape]
    crop = resampled[starts[0] : starts[0] + 16, starts[1] : starts[1] + 16, starts[2] : starts[2] + 16]
    np.testing.assert_allclose(out[0].numpy(), np.clip(crop / 100.0, -1, 1), atol=2e-2)


def test_preprocess_pads_small_volumes_with_air_and_random_crops_in_train():
    volume = Volume(np.full((10, 12, 6), 40.0, np.float32), np.eye(4), HUInfo(False))
    out = VolumePreprocess(True, spacing=None, roi=(16, 16, 8), hu_window=(-1000, 1000))(volume)
    assert out.shape == (1, 16, 16, 8)
    assert out.min() == pytest.approx(-1.0)  # padding is air
    assert int(torch.isclose(out, torch.tensor(0.04)).sum()) == 10 * 12 * 6


def test_shard_sample_round_trip_and_pickling(atlas_crop):
    meta = {"spacing": [1.0, 1.0, 1.0]}
    sample = {"__key__": "k", "npy": volume_to_npy(atlas_crop.array), "json": json.dumps(meta).encode()}
    decoded = decode_sample_volume(sample)
    np.testing.assert_array_equal(decoded.array, np.rint(atlas_crop.array))
    prep = pickle.loads(pickle.dumps(VolumePreprocess(False, spacing=None, roi=(48, 40, 36), hu_window=(-50, 150))))
    out = prep(sample)[0].numpy()
    np.testing.assert_allclose(out, np.clip((np.rint(atlas_crop.array) + 50) / 200 * 2 - 1, -1, 1), atol=1e-5)
    nifti = {"__key__": "n", "nii.gz": _nifti_bytes(atlas_crop.array.astype(np.int16), atlas_crop.affine)}
    np.testing.assert_allclose(prep(nifti)[0].numpy(), out, atol=1e-5)


def test_mask_follows_the_volume_through_the_pipeline():
    array = np.zeros((20, 20, 20), np.float32)
    array[2:5, 3:6, 4:7] = 500
    mask = (array > 0).astype(np.int8)
    volume = Volume(array, np.diag([2.0, 2.0, 2.0, 1.0]), HUInfo(False))
    image, label = VolumePreprocess(False, spacing=(4.0, 4.0, 4.0), roi=(8, 8, 8)).with_mask(volume, mask)
    assert label.dtype == torch.long and set(label.unique().tolist()) <= {0, 1}
    assert (image[label == 1] > -0.2).float().mean() > 0.9  # the mask sits on the bright cube


# ---------------------------------------------------------------------------------------------
# HU rule


def test_hu_rule_applies_rescale_to_stored_values_only():
    stored = np.array([0, 24, 1024, 2000], dtype=np.uint16)
    hu, info = to_hu(stored, 1.0, -1024.0)
    np.testing.assert_array_equal(hu, [-1024, -1000, 0, 976])
    assert info.rescale_applied
    already = np.array([-1024, -1000, 0, 976], dtype=np.int16)
    hu2, info2 = to_hu(already, 1.0, -1024.0)
    np.testing.assert_array_equal(hu2, already)  # not shifted to -2048
    assert not info2.rescale_applied and "already HU" in info2.reason
    _, info3 = to_hu(stored, None, None)
    assert not info3.rescale_applied


def test_nifti_header_scaling_is_never_doubled(tmp_path):
    stored = np.random.default_rng(0).integers(0, 2000, size=(6, 5, 4)).astype(np.int16)
    path = tmp_path / "scaled.nii.gz"
    path.write_bytes(_nifti_bytes(stored, np.eye(4), slope=1.0, inter=-1024.0))
    volume = read_volume(path, slope=1.0, intercept=-1024.0)  # external metadata says the same
    np.testing.assert_array_equal(volume.array, stored.astype(np.float32) - 1024)
    assert not volume.hu.rescale_applied and "header" in volume.hu.reason


# ---------------------------------------------------------------------------------------------
# DICOM


def test_real_dicom_slice_in_hu():
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    volume = read_volume(path)
    expected = ds.pixel_array.astype(np.float32).T * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.array[..., 0], expected)
    assert volume.spacing[:2] == pytest.approx([float(v) for v in ds.PixelSpacing])


def test_dicom_series_is_sorted_by_position_and_converted_to_ras(tmp_path):
    source = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "series"
    folder.mkdir()
    z0 = float(source.ImagePositionPatient[2])
    for index, name in zip([2, 0, 1], ["a.dcm", "b.dcm", "c.dcm"]):  # files out of order
        ds = source.copy()
        ds.ImagePositionPatient = [source.ImagePositionPatient[0], source.ImagePositionPatient[1], z0 + 2.5 * index]
        ds.InstanceNumber = index + 1
        ds.SOPInstanceUID = f"{source.SOPInstanceUID}.{index}"
        arr = source.pixel_array.copy()
        arr[0, 0] = index  # a marker to check the order
        ds.PixelData = arr.tobytes()
        ds.save_as(folder / name)
    (folder / "report.txt").write_text("FINDINGS: No effusion.")
    volume = read_volume(folder)
    assert volume.array.shape == (128, 128, 3)
    assert [volume.array[0, 0, k] + 1024 for k in range(3)] == [0, 1, 2]
    assert volume.spacing == pytest.approx((0.661468, 0.661468, 2.5))
    # LPS -> RAS: x and y of the origin are negated.
    assert volume.affine[0, 3] == pytest.approx(-float(source.ImagePositionPatient[0]))
    assert volume.affine[1, 3] == pytest.approx(-float(source.ImagePositionPatient[1]))
    assert nib.aff2axcodes(volume.affine)[2] == "S"


def test_bad_volume_paths_raise_clear_errors(tmp_path):
    with pytest.raises(VolumeError, match="no such volume"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(VolumeError, match="unknown volume format"):
        read_volume(tmp_path / "x.txt")
    with pytest.raises(VolumeError, match="no volume member"):
        decode_sample_volume({"__key__": "k", "txt": b"x"})


# ---------------------------------------------------------------------------------------------
# reports


def test_real_report_sentences_and_normal_flags():
    text = _site_file(RADMATCH_CHEST).read_text()
    sentences = report_sentences(text)
    assert "There is no pleural effusion." in sentences
    assert "Minor chronic atelectasis is medially in the left lower lobe." in sentences
    assert not any("TECHNIQUE" in s or "3-D renderings" in s for s in sentences)  # only findings + impression
    assert "Severe coronary artery calcifications." in sentences  # impression, enumerator stripped
    flags = dict(zip(sentences, map(is_normal_sentence, sentences)))
    assert flags["There is no pleural effusion."] and flags["The heart is not enlarged."]
    assert not flags["Minor chronic atelectasis is medially in the left lower lobe."]
    assert not flags["There are severe coronary artery calcifications."]
    assert not is_normal_sentence("No effusion, but a new nodule in the right lower lobe.")


# ---------------------------------------------------------------------------------------------
# sources


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_ct_lesions_is_deterministic_and_consistent(tmp_path):
    options = dict(train_size=6, test_size=2, size=24, spacing=6.0, seed=3)
    summary = build("ct-lesions", tmp_path / "a", **options)
    build("ct-lesions", tmp_path / "b", **options)
    assert summary["semi_synthetic"] and summary["counts"] == {"train": 6, "test": 2}
    first = _members(tmp_path / "a" / "ct-lesions-train-000000.tar")
    assert first == _members(tmp_path / "b" / "ct-lesions-train-000000.tar")
    assert (tmp_path / "a" / "ct-lesions-test-000000.tar").is_file()
    seen_lesions = 0
    for name, data in first.items():
        if not name.endswith(".json"):
            continue
        key = name[: -len(".json")]
        meta = json.loads(data)
        volume = np.load(io.BytesIO(first[f"{key}.npy"]))
        mask = np.load(io.BytesIO(first[f"{key}.mask.npy"]))
        assert volume.dtype == np.int16 and volume.shape == mask.shape == (24, 24, 24)
        assert meta["semi_synthetic"] and meta["spacing"] == [6.0, 6.0, 6.0]
        kinds = {lesion["kind"] for lesion in meta["lesions"]}
        assert {k for k, v in meta["labels"].items() if v} == kinds
        for lesion in meta["lesions"]:
            seen_lesions += 1
            sentence = meta["sentences"][lesion["sentence_index"]]
            assert location_words(lesion["center"], 24) in sentence
            assert not is_normal_sentence(sentence)  # so ct_align keeps it in the alignment
            voxels = volume[mask == lesion["mask_value"]]
            assert voxels.size > 0
            if lesion["kind"] == "calcification":
                assert voxels.mean() > 400
            if lesion["kind"] == "fat":
                assert voxels.mean() < -50
        assert all(is_normal_sentence(s) for s in meta["sentences"] if s.startswith("No "))
        assert "sentence_normal" not in meta  # the ct_align head flags them, not the shards
        assert report_sentences(first[f"{key}.txt"].decode()) == meta["sentences"]
    assert seen_lesions > 0


def _ct_rate_fixture(root: Path) -> None:
    """Two volumes in the CT-RATE layout: one stored as raw values, one already HU (as in the
    `_fixed` release), side by side, both with RescaleIntercept -1024 in the metadata."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 400, size=(12, 10, 8)).astype(np.int16)
    hu[0, 0, 0] = -1024
    raw = (hu + 1024).astype(np.int16)  # stored values, intercept -1024
    for folder, name, array in (("train", "train_1_a_1.nii.gz", raw), ("train", "train_2_a_1.nii.gz", hu)):
        target = root / "dataset" / folder / name.rsplit("_", 2)[0] / name.rsplit("_", 1)[0] / name
        target.parent.mkdir(parents=True)
        target.write_bytes(_nifti_bytes(array, np.eye(4)))  # header says 1 mm: wrong, as in CT-RATE v1
    reports = root / "dataset" / "radiology_text_reports"
    reports.mkdir(parents=True)
    with open(reports / "train_reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"])
        w.writerow(["train_1_a_1.nii.gz", "Cough.", "Non-contrast.", "A 5 mm nodule in the right upper lobe. No pleural effusion.", "Lung nodule."])
        w.writerow(["train_2_a_1.nii.gz", "", "", "Heart is not enlarged.", "No acute findings."])
    meta = root / "dataset" / "metadata"
    meta.mkdir(parents=True)
    with open(meta / "train_metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", "Manufacturer", "RescaleIntercept", "RescaleSlope", "XYSpacing", "ZSpacing"])
        w.writerow(["train_1_a_1.nii.gz", "X", "-1024", "1", "[0.75, 0.75]", "1.5"])
        w.writerow(["train_2_a_1.nii.gz", "X", "-1024", "1", "[0.75, 0.75]", "1.5"])
    labels = root / "dataset" / "multi_abnormality_labels"
    labels.mkdir(parents=True)
    with open(labels / "train_predicted_labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", *CT_RATE_ABNORMALITIES])
        w.writerow(["train_1_a_1.nii.gz", *[1 if n == "Lung nodule" else 0 for n in CT_RATE_ABNORMALITIES]])
        w.writerow(["train_2_a_1.nii.gz", *[0] * len(CT_RATE_ABNORMALITIES)])


def test_ct_rate_layout_rescales_once_and_uses_metadata_spacing(tmp_path):
    _ct_rate_fixture(tmp_path / "CT-RATE")
    summary = build(f"ct-rate:{tmp_path / 'CT-RATE'}", tmp_path / "out", split="train", spacing=(1.5, 1.5, 3.0))
    assert summary["count"] == 2
    members = _members(tmp_path / "out" / "ct-rate-train-000000.tar")
    metas = {name.split(".")[0]: json.loads(data) for name, data in members.items() if name.endswith(".json")}
    raw, fixed = metas["train_1_a_1"], metas["train_2_a_1"]
    assert raw["hu"]["rescale_applied"] and not fixed["hu"]["rescale_applied"]
    assert raw["spacing"] == pytest.approx([1.5, 1.5, 3.0]) and raw["spacing_from"].startswith("metadata")
    # Metadata spacing (0.75, 0.75, 1.5) resampled to (1.5, 1.5, 3.0) halves every axis (12, 10, 8
    # voxels; MONAI rounds the new extent, so allow one voxel). With the header's 1 mm it would not.
    assert all(abs(a - b) <= 1 for a, b in zip(raw["shape"], [6, 5, 4]))
    a = np.load(io.BytesIO(members["train_1_a_1.npy"]))
    b = np.load(io.BytesIO(members["train_2_a_1.npy"]))
    np.testing.assert_array_equal(a, b)  # same HU either way: no double rescale
    assert a.min() >= -1024
    assert raw["labels"]["Lung nodule"] == 1 and len(raw["labels"]) == 18
    assert "A 5 mm nodule in the right upper lobe." in raw["sentences"]
    assert "No pleural effusion." in raw["sentences"] and "sentence_normal" not in raw


def test_ct_dir_reads_nifti_and_dicom_with_reports_and_labels(tmp_path):
    root = tmp_path / "vols"
    root.mkdir()
    (root / "a.nii.gz").write_bytes(_nifti_bytes(np.full((8, 8, 8), 30, np.int16), np.diag([2.0, 2.0, 2.0, 1.0])))
    (root / "a.txt").write_text("FINDINGS: Small cyst. IMPRESSION: Cyst.")
    series = root / "b"
    series.mkdir()
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), series / "1.dcm")
    (root / "b.txt").write_text("FINDINGS: No effusion.")
    with open(root / "labels.csv", "w") as f:
        f.write("name,cyst\na.nii.gz,1\nb,0\n")
    summary = build(f"ct:{root}", tmp_path / "out", spacing=(4.0, 4.0, 4.0))
    assert summary["count"] == 2
    members = _members(tmp_path / "out" / "ct-000000.tar")
    metas = {name.split(".")[0]: json.loads(data) for name, data in members.items() if name.endswith(".json")}
    assert metas["a"]["labels"] == {"cyst": 1} and metas["b"]["labels"] == {"cyst": 0}
    assert metas["b"]["hu"]["rescale_applied"]  # DICOM: its own slope/intercept
    assert metas["a"]["spacing"] == pytest.approx([4.0, 4.0, 4.0])
    (root / "a.txt").unlink()
    with pytest.raises(ValueError, match="no report a.txt"):
        build(f"ct:{root}", tmp_path / "out2")
