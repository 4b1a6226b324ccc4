"""Readers and writers: every format, orientation rules, TR sources, unreadable files."""

from __future__ import annotations

import gzip
import json
import sys

import numpy as np
import pytest

from brainjepa.errors import BrainJEPAError, DataError
from brainjepa.io import (
    TimeSeries,
    atlas_name,
    bids_entities,
    read_timeseries,
    sidecar_path,
    write_timeseries,
)

R, T = 5, 12


def series(r=R, t=T, seed=0):
    return np.random.default_rng(seed).normal(100, 5, (r, t)).astype(np.float32)


def names(r=R):
    return [f"Net_{i}" for i in range(r)]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".tsv", ".tsv.gz", ".csv", ".csv.gz", ".mat", ".h5"])
def test_write_read_round_trip_every_format(tmp_path, suffix):
    x = series()
    path = write_timeseries(tmp_path / f"sub-01_bold{suffix}", x, roi_labels=names(), tr=0.8)
    ts = read_timeseries(path)
    assert ts.data.dtype == np.float32 and ts.data.shape == (R, T)
    np.testing.assert_allclose(ts.data, x, rtol=1e-6)
    assert ts.tr == pytest.approx(0.8)
    assert ts.path == str(path)
    if suffix != ".npy":  # a bare .npy has no room for names
        assert ts.roi_labels == names()


def test_tr_argument_overrides_file_and_is_checked(tmp_path):
    path = write_timeseries(tmp_path / "a.npz", series(), tr=0.8)
    assert read_timeseries(path, tr=2.0).tr == 2.0
    with pytest.raises(DataError, match="positive"):
        read_timeseries(path, tr=-1)


def test_npy_orientation_flag_and_square_matrix(tmp_path):
    x = series()
    np.save(tmp_path / "tr.npy", x.T)
    np.testing.assert_array_equal(read_timeseries(tmp_path / "tr.npy", orientation="time-by-roi").data, x)
    # without a flag a bare array is roi-by-time (the package convention)
    assert read_timeseries(tmp_path / "tr.npy").data.shape == (T, R)
    sq = series(6, 6)
    np.save(tmp_path / "sq.npy", sq)
    with pytest.raises(DataError, match="square"):
        read_timeseries(tmp_path / "sq.npy")
    np.testing.assert_array_equal(read_timeseries(tmp_path / "sq.npy", orientation="time-by-roi").data, sq.T)
    with pytest.raises(DataError, match="orientation"):
        read_timeseries(tmp_path / "sq.npy", orientation="sideways")


def test_npy_not_2d(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4)))
    with pytest.raises(DataError, match="2-D"):
        read_timeseries(tmp_path / "a.npy")


# ----------------------------------------------------------------------------- containers


def test_npz_variable_choice(tmp_path):
    x = series()
    np.savez(tmp_path / "one.npz", anything=x, tr=np.float64(2.0))
    ts = read_timeseries(tmp_path / "one.npz")  # the only 2-D array
    np.testing.assert_array_equal(ts.data, x)
    assert ts.tr == 2.0
    np.savez(tmp_path / "two.npz", a=x, b=x * 2)
    with pytest.raises(DataError, match="several 2-D"):
        read_timeseries(tmp_path / "two.npz")
    np.testing.assert_array_equal(read_timeseries(tmp_path / "two.npz", variable="b").data, x * 2)
    with pytest.raises(DataError, match="no array named 'c'"):
        read_timeseries(tmp_path / "two.npz", variable="c")
    np.savez(tmp_path / "conv.npz", timeseries=x, confounds=x[:2])  # a conventional name wins
    np.testing.assert_array_equal(read_timeseries(tmp_path / "conv.npz").data, x)
    np.savez(tmp_path / "meta.npz", data=x.T, orientation="time-by-roi")
    np.testing.assert_array_equal(read_timeseries(tmp_path / "meta.npz").data, x)


def test_mat_variable_by_name_or_only_2d(tmp_path):
    from scipy.io import savemat

    x = series()
    savemat(tmp_path / "a.mat", {"bold": x, "TR": 0.72, "note": "hi"})
    ts = read_timeseries(tmp_path / "a.mat")
    np.testing.assert_allclose(ts.data, x)
    assert ts.tr == pytest.approx(0.72)
    savemat(tmp_path / "b.mat", {"ts1": x, "ts2": x + 1})
    with pytest.raises(DataError, match="variable"):
        read_timeseries(tmp_path / "b.mat")
    np.testing.assert_allclose(read_timeseries(tmp_path / "b.mat", variable="ts2").data, x + 1)


def test_mat_v73_is_read_as_hdf5(tmp_path):
    h5py = pytest.importorskip("h5py")
    x = series()
    path = tmp_path / "v73.mat"
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("ts", data=x)
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")
    np.testing.assert_array_equal(read_timeseries(path).data, x)


def test_h5_dataset_attrs_and_choice(tmp_path):
    h5py = pytest.importorskip("h5py")
    x = series()
    with h5py.File(tmp_path / "a.h5", "w") as f:
        ds = f.create_dataset("group/bold", data=x.T)
        ds.attrs["orientation"] = "time-by-roi"
        ds.attrs["RepetitionTime"] = 1.5
        f.create_dataset("roi_labels", data=np.array(names(), dtype=h5py.string_dtype()))
    ts = read_timeseries(tmp_path / "a.h5")
    np.testing.assert_array_equal(ts.data, x)
    assert ts.tr == 1.5 and ts.roi_labels == names()
    with h5py.File(tmp_path / "b.h5", "w") as f:
        f.create_dataset("x", data=x)
        f.create_dataset("y", data=x)
    with pytest.raises(DataError, match="several 2-D dataset"):
        read_timeseries(tmp_path / "b.h5")
    np.testing.assert_array_equal(read_timeseries(tmp_path / "b.h5", variable="y").data, x)


# ----------------------------------------------------------------------------- text formats


def write_text(path, lines, gz=False):
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("entity", ["seg", "atlas"])
def test_xcpd_timeseries_tsv(tmp_path, entity):
    x = series()
    name = f"sub-07_ses-2_task-rest_space-fsLR_{entity}-4S156Parcels_stat-mean_timeseries.tsv"
    lines = ["\t".join(names())] + ["\t".join(f"{v:.6f}" for v in row) for row in x.T]
    path = write_text(tmp_path / name, lines)
    json.dump({"RepetitionTime": 0.8}, open(sidecar_path(path), "w"))
    ts = read_timeseries(path)
    np.testing.assert_allclose(ts.data, x, atol=1e-4)  # rows are volumes: transposed to (R, T)
    assert ts.roi_labels == names() and ts.tr == 0.8
    assert bids_entities(path)["sub"] == "07" and bids_entities(path)["ses"] == "2"
    assert atlas_name(path) == "4S156Parcels"
    with pytest.raises(DataError, match="contradicts"):
        read_timeseries(path, orientation="roi-by-time")


def test_xcpd_na_values_become_nan(tmp_path):
    x = series()
    rows = [["n/a" if (t == 3 and r == 1) else f"{x[r, t]:.5f}" for r in range(R)] for t in range(T)]
    path = write_text(tmp_path / "a_timeseries.tsv", ["\t".join(names())] + ["\t".join(r) for r in rows])
    ts = read_timeseries(path)
    assert np.isnan(ts.data[1, 3]) and np.isfinite(np.delete(ts.data.ravel(), 1 * T + 3)).all()


def test_sampling_frequency_sidecar(tmp_path):
    path = write_timeseries(tmp_path / "a.tsv", series(), sidecar=False)
    json.dump({"SamplingFrequency": 0.5}, open(sidecar_path(path), "w"))
    assert read_timeseries(path).tr == 2.0


def test_time_column_gives_tr_and_censoring_is_refused(tmp_path):
    x = series()
    times = np.arange(T) * 0.72
    header = "\t".join(["onset"] + names())
    ok = write_text(
        tmp_path / "ok.tsv", [header] + ["\t".join([f"{t:.3f}"] + [f"{v}" for v in row]) for t, row in zip(times, x.T)]
    )
    ts = read_timeseries(ok)
    assert ts.tr == pytest.approx(0.72, abs=1e-3) and ts.data.shape == (R, T)
    censored = np.delete(times, [4, 5])
    bad = write_text(
        tmp_path / "bad.tsv",
        [header] + ["\t".join([f"{t:.3f}"] + [f"{v}" for v in row]) for t, row in zip(censored, x.T)],
    )
    with pytest.raises(DataError, match=r"bad\.tsv: censored or non-uniform"):
        read_timeseries(bad)


def test_all_na_rows_are_censored_volumes(tmp_path):
    x = series()
    lines = ["\t".join(names())] + ["\t".join(["n/a"] * R if t == 5 else [f"{v}" for v in x[:, t]]) for t in range(T)]
    with pytest.raises(DataError, match="entirely n/a"):
        read_timeseries(write_text(tmp_path / "a.tsv", lines))


def test_volume_timing_sidecar_censoring(tmp_path):
    path = write_timeseries(tmp_path / "a.npy", series(), sidecar=False)
    timing = np.delete(np.arange(T + 1) * 0.8, 3).tolist()
    json.dump({"VolumeTiming": timing}, open(sidecar_path(path), "w"))
    with pytest.raises(DataError, match="VolumeTiming"):
        read_timeseries(path)
    json.dump({"VolumeTiming": (np.arange(T) * 0.8).tolist()}, open(sidecar_path(path), "w"))
    assert read_timeseries(path).tr == pytest.approx(0.8)


@pytest.mark.parametrize("gz", [False, True])
def test_ukb_csv_layout(tmp_path, gz):
    x = series()
    lines = [",".join(["label_name"] + [str(t) for t in range(T)])]
    lines += [",".join([n] + [f"{v:.6f}" for v in row]) for n, row in zip(names(), x)]
    path = write_text(tmp_path / ("ukb.csv.gz" if gz else "ukb.csv"), lines, gz=gz)
    ts = read_timeseries(path, tr=0.735)
    np.testing.assert_allclose(ts.data, x, atol=1e-4)
    assert ts.roi_labels == names() and ts.tr == 0.735
    with pytest.raises(DataError, match="rows are ROIs"):
        read_timeseries(path, orientation="time-by-roi")


def test_ukb_csv_without_header(tmp_path):
    x = series()
    path = write_text(tmp_path / "u.csv", [",".join([n] + [f"{v}" for v in row]) for n, row in zip(names(), x)])
    ts = read_timeseries(path)
    assert ts.roi_labels == names() and ts.data.shape == (R, T)


def test_headerless_numeric_text(tmp_path):
    x = series()
    path = write_text(tmp_path / "m.csv", [",".join(f"{v}" for v in row) for row in x.T])
    np.testing.assert_allclose(read_timeseries(path, orientation="time-by-roi").data, x, rtol=1e-6)
    assert read_timeseries(path).data.shape == (T, R)  # default: rows are ROIs
    txt = write_text(tmp_path / "m.txt", [" ".join(f"{v}" for v in row) for row in x])
    np.testing.assert_allclose(read_timeseries(txt).data, x, rtol=1e-6)


# ----------------------------------------------------------------------------- NIfTI


def make_nifti(tmp_path, x):
    nib = pytest.importorskip("nibabel")
    r, t = x.shape
    labels = np.zeros((4, 4, r), dtype=np.int16)
    for k in range(r):
        labels[:2, :2, k] = k + 1  # 4 voxels per parcel
    vol = np.zeros((4, 4, r, t), dtype=np.float32)
    for k in range(r):
        vol[:2, :2, k] = x[k] + np.array([[1, -1], [-1, 1]])[..., None]  # parcel mean stays x[k]
    img = nib.Nifti1Image(vol, np.eye(4))
    img.header.set_xyzt_units("mm", "msec")
    img.header.set_zooms((1.0, 1.0, 1.0, 800.0))
    nib.save(img, tmp_path / "sub-01_bold.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "atlas.nii.gz")
    (tmp_path / "atlas.tsv").write_text("index\tname\n" + "".join(f"{k + 1}\t{n}\n" for k, n in enumerate(names(r))))
    return tmp_path / "sub-01_bold.nii.gz", tmp_path / "atlas.nii.gz"


def test_nifti_with_label_atlas(tmp_path):
    pytest.importorskip("nilearn")
    x = series()
    img, atlas = make_nifti(tmp_path, x)
    ts = read_timeseries(img, atlas=atlas)
    np.testing.assert_allclose(ts.data, x, rtol=1e-5)
    assert ts.roi_labels == names()
    assert ts.tr == pytest.approx(0.8)  # header in msec
    with pytest.raises(DataError, match="needs a label atlas"):
        read_timeseries(img)


def test_nifti_without_nilearn_names_the_extra(tmp_path, monkeypatch):
    x = series()
    img, atlas = make_nifti(tmp_path, x)
    monkeypatch.setitem(sys.modules, "nilearn.maskers", None)  # makes the import fail
    with pytest.raises(BrainJEPAError, match=r"pip install 'brainjepa\[nifti\]'"):
        read_timeseries(img, atlas=atlas)


# ----------------------------------------------------------------------------- unreadable files


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_timeseries(tmp_path / "nope.npy")
    (tmp_path / "a.xyz").write_text("1")
    with pytest.raises(DataError, match="unknown file type"):
        read_timeseries(tmp_path / "a.xyz")


def test_truncated_binary_files(tmp_path):
    path = write_timeseries(tmp_path / "a.npy", series(50, 40))
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(DataError, match=r"a\.npy: cannot read .npy file.*truncated"):
        read_timeseries(path)
    gz = write_timeseries(tmp_path / "b.csv.gz", series(50, 40), sidecar=False)
    gz.write_bytes(gz.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"b\.csv\.gz"):
        read_timeseries(gz)
    mat = write_timeseries(tmp_path / "c.mat", series())
    mat.write_bytes(mat.read_bytes()[:100])
    with pytest.raises(DataError, match=r"c\.mat"):
        read_timeseries(mat)


def test_ragged_and_non_numeric_text(tmp_path):
    lines = ["a\tb\tc", "1\t2\t3", "4\t5"]
    with pytest.raises(DataError, match="line 3 has 2 fields"):
        read_timeseries(write_text(tmp_path / "r.tsv", lines))
    lines = ["a\tb\tc", "1\t2\t3", "4\tfoo\t6", "7\t8\t9"]
    with pytest.raises(DataError, match="line 3, field 2: 'foo' is not a number"):
        read_timeseries(write_text(tmp_path / "s.tsv", lines))
    with pytest.raises(DataError, match="empty"):
        read_timeseries(write_text(tmp_path / "e.tsv", []))


def test_bad_sidecar_is_named(tmp_path):
    path = write_timeseries(tmp_path / "a.npy", series())
    sidecar_path(path).write_text("{not json")
    with pytest.raises(DataError, match=r"a\.json: cannot read JSON sidecar"):
        read_timeseries(path)
    sidecar_path(path).write_text(json.dumps({"RepetitionTime": "fast"}))
    with pytest.raises(DataError, match="not a number"):
        read_timeseries(path)


def test_timeseries_dataclass_and_writer_input(tmp_path):
    ts = TimeSeries(series(), names(), 2.0, None)
    assert ts.n_rois == R and ts.n_timepoints == T
    back = read_timeseries(write_timeseries(tmp_path / "x.npz", ts))
    assert back.roi_labels == names() and back.tr == 2.0
    with pytest.raises(DataError, match="cannot write"):
        write_timeseries(tmp_path / "x.xyz", ts)
    with pytest.raises(DataError, match=r"\(R, T\)"):
        write_timeseries(tmp_path / "y.npy", np.zeros(3))
