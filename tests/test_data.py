"""Cohorts, manifests, validation of bad input, the packed store, and WindowDataset."""

from __future__ import annotations

import csv
import json
import pickle

import numpy as np
import pytest
import torch
from conftest import write_manifest

from brainjepa.cli import main
from brainjepa.data import (
    ArrayCohort,
    Store,
    WindowDataset,
    fit_scaler,
    open_cohort,
    open_store,
    prepare_store,
    read_manifest,
    validate_timeseries,
)
from brainjepa.errors import ConfigError, DataError
from brainjepa.io import TimeSeries, write_timeseries
from brainjepa.transforms import RobustScaler, WindowResampler, normalization_to_dict, resample_tr

R, T = 6, 120


def scan(seed, r=R, t=T):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(r, t)) * 5 + rng.uniform(50, 150, (r, 1))).astype(np.float32)


@pytest.fixture
def mixed(tmp_path):
    """Six scans in six formats, one with a subfolder path, labels int/float/string with a blank."""
    labels = [f"r{i}" for i in range(R)]
    specs = [("a/s1.npy", 0.8), ("s2.tsv", 0.8), ("s3.csv.gz", None), ("s4.npz", 0.8), ("s5.mat", 0.8), ("s6.h5", 2.0)]
    rows, data = [], []
    for k, (name, tr) in enumerate(specs):
        x = scan(k)
        write_timeseries(tmp_path / name, x, roi_labels=labels, tr=tr, sidecar=tr is not None)
        data.append(x)
        rows.append(
            [
                name,
                f"sub-{k}",
                "" if tr is not None else "0.8",
                str(20 + k) if k != 3 else "",
                "ctl" if k % 2 else "pat",
            ]
        )
    return write_manifest(tmp_path, rows), data


# ----------------------------------------------------------------------------- cohorts


def test_open_cohort_from_arrays_with_labels():
    xs = [scan(i) for i in range(3)]
    c = open_cohort(xs, tr=0.8, labels={"y": np.array([1, 2, 3])})
    assert isinstance(c, ArrayCohort) and len(c) == 3 and c.n_rois == R
    np.testing.assert_array_equal(c.series(1), xs[1])
    assert c.tr(0) == 0.8 and c.subjects == ["sub-0000", "sub-0001", "sub-0002"]
    np.testing.assert_array_equal(c.labels["y"], [1, 2, 3])
    np.testing.assert_array_equal(c.read(0, -2, 3), xs[0][:, [2, 1, 0, 1, 2]])  # mirrored edge
    assert open_cohort(c) is c
    c_t = open_cohort([x.T for x in xs], orientation="time-by-roi")
    np.testing.assert_array_equal(c_t.series(2), xs[2])
    assert c_t.tr(0) is None


def test_open_cohort_from_manifest_mixed_formats(mixed):
    manifest, data = mixed
    for source in (manifest, manifest.parent):  # the file, or its folder (manifest.csv inside)
        c = open_cohort(source)
        assert len(c) == 6 and c.subjects[0] == "sub-0" and c.roi_labels == [f"r{i}" for i in range(R)]
        for i, x in enumerate(data):
            np.testing.assert_allclose(c.series(i), x, rtol=1e-6)
        assert c.trs == [0.8, 0.8, 0.8, 0.8, 0.8, 2.0]
        assert c.labels["age"].dtype == np.float64 and np.isnan(c.labels["age"][3])
        assert c.labels["group"].dtype == object and c.labels["group"][1] == "ctl"
        assert c.paths[0].endswith("a/s1.npy")


def test_folder_of_files_and_big_folders_read_on_demand(tmp_path):
    for k in range(3):
        write_timeseries(tmp_path / f"sub-{k:02d}_ses-1_bold.npy", scan(k), tr=1.0)
    (tmp_path / "notes.txt.bak").write_text("ignored")
    c = open_cohort(tmp_path)
    assert c.subjects == ["sub-00", "sub-01", "sub-02"] and c.sessions[0] == "ses-1"
    lazy = open_cohort(tmp_path, cache_bytes=0)  # files re-read when needed
    assert type(lazy).__name__ == "FileCohort"
    np.testing.assert_array_equal(lazy.series(2), scan(2))
    assert lazy.length(1) == T and lazy.tr(0) == 1.0


def test_open_cohort_rejects_bad_sources(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_cohort(tmp_path / "missing")
    with pytest.raises(DataError, match="no time-series files"):
        open_cohort(tmp_path)
    one = write_timeseries(tmp_path / "one.npy", scan(0))
    with pytest.raises(DataError, match="not a cohort"):
        open_cohort(one)


def test_manifest_errors(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("file,subject\nx.npy,s1\n")
    with pytest.raises(DataError, match="'path' column"):
        read_manifest(bad)
    write_timeseries(tmp_path / "x.npy", scan(0))
    m = write_manifest(tmp_path, [["x.npy", "s1", "abc"]], ("path", "subject", "tr"))
    with pytest.raises(DataError, match="line 2: tr 'abc'"):
        read_manifest(m)
    m = write_manifest(tmp_path, [["x.npy", "s1", "dev"]], ("path", "subject", "split"))
    with pytest.raises(DataError, match="split must be one of"):
        read_manifest(m)
    tsv = tmp_path / "m.tsv"
    tsv.write_text("path\tsubject\tsex\nx.npy\ts1\tF\n")
    records, labels = read_manifest(tsv)
    assert labels == ["sex"] and records[0].labels == {"sex": "F"} and records[0].path == str(tmp_path / "x.npy")


# ----------------------------------------------------------------------------- bad input


def ts_of(x, name="bad.npy", labels=None, tr=1.0):
    return TimeSeries(np.asarray(x, dtype=np.float32), labels, tr, name)


@pytest.mark.parametrize(
    "case,message",
    [
        ("nan", r"bad\.npy: 1 NaN/Inf value\(s\) in 1 ROI\(s\) \(ROI 2\)"),
        ("inf", r"bad\.npy: 1 NaN/Inf"),
        ("zero", r"bad\.npy: 1 all-zero ROI\(s\) \(ROI 1\)"),
        ("constant", r"bad\.npy: 1 constant ROI\(s\) \(ROI 4\)"),
    ],
)
def test_validate_values(case, message):
    x = scan(0)
    if case == "nan":
        x[2, 5] = np.nan
    elif case == "inf":
        x[0, 0] = np.inf
    elif case == "zero":
        x[1] = 0
    else:
        x[4] = 3.5
    with pytest.raises(DataError, match=message):
        validate_timeseries(ts_of(x))


def test_validate_shape_labels_and_length():
    x = scan(0)
    validate_timeseries(ts_of(x), n_rois=R, min_timepoints=T)  # fine
    with pytest.raises(DataError, match=r"bad\.npy: 6 ROIs, but the cohort has 7 \(set by first\.npy\)"):
        validate_timeseries(ts_of(x), n_rois=7, reference="first.npy")
    with pytest.raises(DataError, match="is the file time-by-roi"):
        validate_timeseries(ts_of(scan(0, r=T, t=R)), n_rois=R)
    with pytest.raises(DataError, match=r"position 1: 'b' vs 'x'"):
        validate_timeseries(ts_of(x, labels=list("abcdef")), roi_labels=list("axcdef"))
    with pytest.raises(DataError, match="shorter than the window of 121"):
        validate_timeseries(ts_of(x), min_timepoints=121)
    with pytest.raises(DataError, match="60 time points at TR 2.0 s"):  # 120 frames at 1 s
        validate_timeseries(ts_of(x), min_timepoints=61, target_tr=2.0)
    with pytest.raises(DataError, match="no TR"):
        validate_timeseries(ts_of(x, tr=None), min_timepoints=10, target_tr=2.0)


@pytest.fixture
def bad_cohort(tmp_path):
    """A manifest with one good file and one file per problem."""
    good = [scan(k) for k in range(3)]
    rows = []
    for k, x in enumerate(good):
        write_timeseries(tmp_path / f"good{k}.npy", x, tr=1.0)
        rows.append([f"good{k}.npy", f"s{k}", ""])
    nan = scan(10)
    nan[0, 3] = np.nan
    bad = {
        "nan.npy": nan,
        "zero.npy": np.vstack([scan(11)[:-1], np.zeros((1, T))]),
        "short.npy": scan(12, t=30),
        "rois.npy": scan(13, r=R + 1),
    }
    for name, x in bad.items():
        write_timeseries(tmp_path / name, x, tr=1.0)
        rows.append([name, name.split(".")[0], ""])
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    rows.append(["broken.npy", "broken", ""])
    rows.append(["missing.npy", "missing", ""])
    rows.append(["good0.npy", "s0", ""])  # duplicate subject
    write_timeseries(tmp_path / "cens.npy", scan(14), sidecar=False)
    json.dump({"VolumeTiming": [0, 1, 2, 4, 5] + list(range(6, T + 1))}, open(tmp_path / "cens.json", "w"))
    rows.append(["cens.npy", "cens", ""])
    return write_manifest(tmp_path, rows, ("path", "subject", "tr")), good


def test_on_error_fail_and_skip(bad_cohort, tmp_path):
    manifest, good = bad_cohort
    with pytest.raises(DataError, match=r"nan\.npy: 1 NaN/Inf"):
        open_cohort(manifest)
    c = open_cohort(manifest, on_error="skip")
    assert len(c) == 4 and c.subjects == ["s0", "s1", "s2", "short"]
    reasons = dict(c.skipped)
    assert len(reasons) == 7
    problems = {p.split("/")[-1]: r for p, r in reasons.items() if not p.endswith("good0.npy")}
    assert "NaN/Inf" in problems["nan.npy"]
    assert "all-zero ROI" in problems["zero.npy"]
    assert "7 ROIs, but the cohort has 6" in problems["rois.npy"]
    assert "cannot read" in problems["broken.npy"]
    assert "not found" in problems["missing.npy"]
    assert "censored" in problems["cens.npy"]
    assert "duplicate subject s0" in reasons[str(manifest.parent / "good0.npy")]
    # short.npy is fine for a cohort; it only fails against a window (prepare --window, WindowDataset)
    assert not any("short" in p for p in reasons)
    with pytest.raises(ConfigError, match="on_error"):
        open_cohort(manifest, on_error="ignore")


def test_prepare_skip_report_and_fail_cleanup(bad_cohort, tmp_path):
    manifest, good = bad_cohort
    out = tmp_path / "store"
    with pytest.raises(DataError, match=r"nan\.npy"):
        prepare_store(manifest, out)
    assert not out.exists()  # nothing half-written is left behind
    report = prepare_store(manifest, out, on_error="skip", min_timepoints=40)
    assert report.n_scans == 3 and len(report.skipped) == 8
    rows = list(csv.reader(open(out / "skipped.tsv"), delimiter="\t"))
    assert rows[0] == ["path", "problem"] and len(rows) == 9
    assert any("short.npy" in r[0] and "shorter than the window of 40" in r[1] for r in rows[1:])
    assert "skipped 8 file(s)" in report.summary()
    s = open_store(out)
    assert len(s.skipped) == 8
    with pytest.raises(DataError, match="exists and is not empty"):
        prepare_store(manifest, out, on_error="skip")
    prepare_store(manifest, out, on_error="skip", overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not a brainjepa store"):
        prepare_store(manifest, tmp_path / "other", overwrite=True)


def test_cli_prepare_errors_are_one_line(bad_cohort, tmp_path, capsys):
    manifest, _ = bad_cohort
    assert main(["prepare", str(manifest), "--out", str(tmp_path / "s1")]) == 1
    err = capsys.readouterr().err
    assert "brainjepa prepare: error:" in err and "nan.npy" in err and "Traceback" not in err
    assert main(["-q", "prepare", str(manifest), "--out", str(tmp_path / "s2"), "--on-error", "skip"]) == 0
    assert "skipped 7 file(s)" in capsys.readouterr().out
    with pytest.raises(DataError):
        main(["--debug", "prepare", str(manifest), "--out", str(tmp_path / "s3")])


# ----------------------------------------------------------------------------- store


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_prepare_store_packs_mixed_formats(mixed, tmp_path, dtype):
    manifest, data = mixed
    report = prepare_store(manifest, tmp_path / "store", dtype=dtype, train_fraction=0.5, seed=3)
    assert report.n_scans == 6 and report.total_timepoints == 6 * T and report.splits == {"train": 3, "val": 3}
    s = open_store(tmp_path / "store")
    assert isinstance(s, Store) and len(s) == 6 and s.n_rois == R
    assert s.data.shape == (6 * T, R) and s.data.dtype == np.dtype(dtype)
    for i, x in enumerate(data):
        if dtype == "float32":
            np.testing.assert_allclose(s.series(i), x, rtol=1e-6)
        else:  # ROI-centred float16: error small relative to the fluctuations (std 5)
            assert np.abs(s.series(i) - x).max() < 0.01
    assert s.trs == [0.8, 0.8, 0.8, 0.8, 0.8, 2.0] and s.roi_labels == [f"r{i}" for i in range(R)]
    np.testing.assert_array_equal(s.labels["age"][[0, 1, 2, 4, 5]], [20, 21, 22, 24, 25])
    assert np.isnan(s.labels["age"][3]) and list(s.labels["group"]) == ["pat", "ctl"] * 3
    np.testing.assert_allclose(s.read(2, 10, 20), data[2][:, 10:20], atol=0.01)
    np.testing.assert_allclose(s.read(2, -3, 2), data[2][:, [3, 2, 1, 0, 1]], atol=0.01)
    # robust statistics were fitted on the training scans only
    train = s.split_indices("train")
    assert len(train) == 3
    expected = RobustScaler().fit([data[i] for i in train])
    np.testing.assert_allclose(s.normalization["median"], expected.median_, rtol=1e-3)
    np.testing.assert_allclose(s.normalization["iqr"], expected.iqr_, rtol=2e-2)
    # the same subject-level split every time for the same seed
    again = prepare_store(manifest, tmp_path / "store2", train_fraction=0.5, seed=3)
    assert open_store(again.out_dir).splits == s.splits


def test_store_split_column_and_pickling(tmp_path):
    rows = []
    for k in range(4):
        write_timeseries(tmp_path / f"s{k}.npy", scan(k), tr=1.0)
        rows.append([f"s{k}.npy", f"s{k}", "train" if k < 3 else "test"])
    manifest = write_manifest(tmp_path, rows, ("path", "subject", "split"))
    prepare_store(manifest, tmp_path / "st")
    s = open_store(tmp_path / "st")
    assert s.splits == ["train", "train", "train", "test"] and s.labels == {}
    _ = s.data  # open the map, then make sure it does not travel with the object
    blob = pickle.dumps(s)
    assert len(blob) < 20_000
    np.testing.assert_array_equal(pickle.loads(blob).series(3), s.series(3))


def test_store_integrity_checks(tmp_path):
    write_timeseries(tmp_path / "a.npy", scan(0), tr=1.0)
    manifest = write_manifest(tmp_path, [["a.npy", "a", ""]], ("path", "subject", "tr"))
    prepare_store(manifest, tmp_path / "st")
    with open(tmp_path / "st" / "data.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="incomplete or corrupt"):
        open_store(tmp_path / "st")
    with pytest.raises(DataError, match="not a prepared store"):
        open_store(tmp_path)


def test_fit_scaler_on_cohort_subsamples():
    xs = [scan(k, t=400) for k in range(5)]
    c = open_cohort(xs)
    exact = RobustScaler().fit(xs)
    np.testing.assert_allclose(fit_scaler(c).median_, exact.median_, rtol=1e-6)
    sub = fit_scaler(c, [0, 1], max_timepoints=200)
    assert sub.n_timepoints_seen_ == 200
    with pytest.raises(DataError, match="no training scans"):
        fit_scaler(c, [])


# ----------------------------------------------------------------------------- windows


def test_window_dataset_is_reproducible_per_seed_epoch_and_index():
    c = open_cohort([scan(k, t=300) for k in range(4)], tr=1.0)
    ds = WindowDataset(c, 32, normalization="none", seed=7)
    assert len(ds) == 4
    x = ds[1]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (R, 32)
    again = WindowDataset(c, 32, normalization="none", seed=7)
    torch.testing.assert_close(again[1], x)  # a fresh dataset (resume) sees the same window
    s0 = ds.start(1)
    np.testing.assert_array_equal(x.numpy(), c.series(1)[:, s0 : s0 + 32])
    starts_epoch0 = [ds.start(i) for i in range(4)]
    ds.set_epoch(1)
    assert [ds.start(i) for i in range(4)] != starts_epoch0
    other_seed = WindowDataset(c, 32, normalization="none", seed=8)
    assert [other_seed.start(i) for i in range(4)] != starts_epoch0
    ev = WindowDataset(c, 32, train=False, normalization="none")
    np.testing.assert_array_equal(ev[0].numpy(), c.series(0)[:, 134:166])  # centre window


def test_window_dataset_resamples_each_scan_from_its_own_tr():
    x1, x2 = scan(1, t=900), scan(2, t=300)
    c = open_cohort([TimeSeries(x1, None, 0.7, None), TimeSeries(x2, None, 2.1, None)])
    ds = WindowDataset(c, 40, target_tr=2.1, train=False, normalization="none")
    start = ds.start(0)
    assert start == (900 - WindowResampler(0.7, 2.1, 40).raw_extent()) // 2
    # the window equals resampling the whole series on a grid through its first frame
    full = resample_tr(x1[:, start - 99 :], 0.7, 2.1)  # 99 frames = 33 outputs before it
    np.testing.assert_allclose(ds[0].numpy(), full[:, 33:73], atol=1e-4)
    np.testing.assert_array_equal(ds[1].numpy(), x2[:, 130:170])  # same TR: a plain window


def test_window_dataset_normalisations(tmp_path):
    xs = [scan(k, t=200) for k in range(4)]
    c = open_cohort(xs, tr=1.0)
    scaler = RobustScaler().fit(xs[:2])
    ds = WindowDataset(c, 50, train=False, scaler=scaler)
    raw = WindowDataset(c, 50, train=False, normalization="none")[3].numpy()
    np.testing.assert_allclose(ds[3].numpy(), scaler.transform(raw), rtol=1e-5, atol=1e-6)
    assert normalization_to_dict(ds.normalization, ds.scaler) == normalization_to_dict("robust", scaler)
    fitted = WindowDataset(c, 50)  # no scaler: fitted on the cohort's training split
    np.testing.assert_allclose(fitted.scaler.median_, RobustScaler().fit(xs).median_, rtol=1e-6)
    z = WindowDataset(c, 50, normalization="zscore")[0].numpy()
    np.testing.assert_allclose(z.mean(axis=1), 0, atol=1e-5)
    with pytest.raises(ConfigError):
        WindowDataset(c, 50, normalization="minmax")
    with pytest.raises(DataError, match="robust scaler has 3 ROIs"):
        WindowDataset(c, 50, scaler=RobustScaler().fit([scan(0, r=3)]))


def test_window_dataset_uses_store_statistics(mixed, tmp_path):
    manifest, data = mixed
    prepare_store(manifest, tmp_path / "store")
    s = open_store(tmp_path / "store")
    ds = WindowDataset(tmp_path / "store", 48, target_tr=2.0, train=False)
    np.testing.assert_allclose(ds.scaler.median_, s.normalization["median"])
    assert ds[5].shape == (R, 48)  # the TR-2.0 scan is used as is
    rs = WindowResampler(0.8, 2.0, 48)
    raw = rs.apply(s.read(0, ds.start(0) - rs.margin, ds.start(0) - rs.margin + rs.span))
    np.testing.assert_allclose(ds[0].numpy(), ds.scaler.transform(raw), rtol=1e-5, atol=1e-5)


def test_window_dataset_rejects_short_scans_and_missing_tr():
    c = open_cohort([scan(0, t=100), scan(1, t=40)], tr=1.0)
    with pytest.raises(DataError, match="array 1: 40 time points, shorter than the window of 50"):
        WindowDataset(c, 50, normalization="none")
    WindowDataset(c, 50, normalization="none", indices=[0])  # fine without the short scan
    with pytest.raises(DataError, match="give 20 at TR 2.0 s"):
        WindowDataset(c, 30, target_tr=2.0, normalization="none")
    no_tr = open_cohort([scan(0)])
    with pytest.raises(DataError, match="no TR known"):
        WindowDataset(no_tr, 20, target_tr=2.0, normalization="none")


def test_window_dataset_with_workers_and_distributed_sampler(mixed, tmp_path):
    manifest, _ = mixed
    prepare_store(manifest, tmp_path / "store", dtype="float16")
    ds = WindowDataset(open_store(tmp_path / "store"), 32, target_tr=1.6, seed=1)
    serial = torch.stack([ds[i] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    torch.testing.assert_close(torch.cat(list(loader)), serial)
    shards = []
    for rank in range(2):
        sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(0)
        shards.append(list(sampler))
        batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, sampler=sampler)))
        assert batch.shape == (3, R, 32)
    assert sorted(shards[0] + shards[1]) == list(range(len(ds)))


def test_cohort_wide_atlas_and_variable_for_manifest_rows_without_them(tmp_path):
    pytest.importorskip("nilearn")
    from brainjepa.synthetic import simulate_cohort, write_cohort

    sim = simulate_cohort(n_subjects=2, n_rois=14, minutes=1, seed=0)
    manifest = write_cohort(sim, tmp_path, fmt="nifti")
    rows = list(csv.DictReader(open(manifest)))
    atlas = tmp_path / rows[0]["atlas"]
    bare = write_manifest(tmp_path, [[r["path"], r["subject"]] for r in rows], ("path", "subject"))
    with pytest.raises(DataError, match="needs a label atlas"):
        open_cohort(bare)
    c = open_cohort(bare, atlas=atlas)
    np.testing.assert_allclose(c.series(1), sim.timeseries[1], rtol=1e-5)
    assert c.roi_labels == sim.roi_labels
    np.savez(tmp_path / "two.npz", a=scan(0), b=scan(1))
    two = write_manifest(tmp_path, [["two.npz", "s"]], ("path", "subject"))
    report = prepare_store(two, tmp_path / "st", variable="b")
    np.testing.assert_allclose(open_store(report.out_dir).series(0), scan(1))


def test_tr_precedence_manifest_then_file_then_default(tmp_path):
    write_timeseries(tmp_path / "own.npy", scan(0), tr=0.8)  # sidecar RepetitionTime 0.8
    write_timeseries(tmp_path / "none.npy", scan(1))  # no TR anywhere
    write_timeseries(tmp_path / "col.npy", scan(2), tr=0.8)  # manifest column says 0.72
    m = write_manifest(
        tmp_path, [["own.npy", "a", ""], ["none.npy", "b", ""], ["col.npy", "c", "0.72"]], ("path", "subject", "tr")
    )
    # the manifest (0.72) and col.json (0.8) disagree: an error naming both, unless a source is chosen
    with pytest.raises(DataError, match=r"col\.npy: TR 0\.8 s in .*col\.json but 0\.72 s in .*manifest\.csv, line 4"):
        open_cohort(m)
    assert open_cohort(m, tr=2.0, tr_source="manifest").trs == [0.8, 2.0, 0.72]
    assert open_cohort(m, tr_source="manifest").trs == [0.8, None, 0.72]
    assert open_cohort(m, tr_source="file").trs == [0.8, None, 0.8]
    given = [TimeSeries(scan(0), None, 0.8, None), scan(1)]
    assert open_cohort(given, tr=2.0).trs == [0.8, 2.0]
