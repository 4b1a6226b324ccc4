"""Property-based tests of every reader and the manifest parser.

The property: reading anything gives either a :class:`BrainJEPAError` whose message names the
file, or a finite float32 (R, T) series equal to what was written; never another exception,
never NaN/Inf passed on. CI runs a fixed number of examples with a fixed seed (derandomised);
a longer search is

    BRAINJEPA_FUZZ=long python -m pytest tests/test_fuzz.py

(``BRAINJEPA_FUZZ_EXAMPLES=N`` sets the number of examples of that profile).
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from brainjepa.data import open_cohort, read_manifest, validate_timeseries  # noqa: E402
from brainjepa.errors import BrainJEPAError  # noqa: E402
from brainjepa.io import SUFFIXES, read_timeseries, write_timeseries  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("BRAINJEPA_FUZZ_EXAMPLES", 2000)),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
FUZZ = settings.get_profile(os.environ.get("BRAINJEPA_FUZZ", "ci"))

WRITABLE = (".npy", ".npz", ".tsv", ".csv", ".tsv.gz", ".csv.gz", ".mat", ".h5")
TEXT_ENCODINGS = ("utf-8", "utf-8-sig", "latin-1", "utf-16", "cp1252")


def _check(path: Path, read) -> np.ndarray | None:
    """Run ``read``; a BrainJEPAError must name ``path``; a result must be finite (R, T) float32
    that passes validation. Returns the data, or None after an error."""
    try:
        ts = read()
        validate_timeseries(ts)
    except BrainJEPAError as exc:
        assert path.name in str(exc), f"error does not name {path.name}: {exc}"
        assert "\n" not in str(exc).strip(), f"multi-line message: {exc!r}"
        return None
    assert ts.data.dtype == np.float32 and ts.data.ndim == 2
    assert np.isfinite(ts.data).all()
    return ts.data


def _tmpdir():
    return tempfile.TemporaryDirectory(prefix="bjfuzz")


finite_or_not = st.floats(width=32, allow_nan=True, allow_infinity=True)
arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int16, np.int32, np.float16]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=7),
    elements=None,
)


@FUZZ
@given(data=arrays, suffix=st.sampled_from(WRITABLE), orientation=st.sampled_from([None, "roi-by-time"]))
def test_round_trip_of_any_array_is_exact_or_a_named_error(data, suffix, orientation):
    with _tmpdir() as d:
        path = Path(d) / f"sub-01{suffix}"
        if suffix == ".npy":
            np.save(path, data)  # any shape and dtype, as found on disk
        else:
            try:
                with np.errstate(over="ignore", invalid="ignore"):
                    write_timeseries(path, data, tr=1.0)
            except BrainJEPAError as exc:  # the writer refuses a non-2-D array, by name
                assert data.ndim != 2 and path.name in str(exc)
                return
        got = _check(path, lambda: read_timeseries(path, orientation=orientation))
        if got is not None:
            expected = np.asarray(data, dtype=np.float64)
            assert got.shape == expected.shape
            # text formats keep 7 significant digits
            assert np.allclose(got, expected.astype(np.float32), rtol=2e-6, atol=0)


@FUZZ
@given(raw=st.binary(max_size=400), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_are_a_named_error_or_a_finite_series(raw, suffix):
    with _tmpdir() as d:
        path = Path(d) / f"sub-01{suffix}"
        path.write_bytes(raw)
        _check(path, lambda: read_timeseries(path, atlas=Path(d) / "atlas.nii.gz"))


@FUZZ
@given(seed=st.integers(0, 2**16), suffix=st.sampled_from(WRITABLE), cut=st.floats(0.0, 0.999))
def test_truncated_files_are_a_named_error_or_a_correct_prefix(seed, suffix, cut):
    x = np.random.default_rng(seed).normal(size=(4, 9)).astype(np.float32)
    with _tmpdir() as d:
        path = Path(d) / f"sub-01{suffix}"
        write_timeseries(path, x, tr=1.0)
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * cut)])
        got = _check(path, lambda: read_timeseries(path))
        if got is not None and got.shape == x.shape:
            assert np.allclose(got, x, rtol=2e-6)


@FUZZ
@given(
    values=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=6),
        elements=st.floats(allow_nan=True, allow_infinity=True),
    ),
    encoding=st.sampled_from(TEXT_ENCODINGS),
    delimiter=st.sampled_from(["\t", ","]),
    header=st.booleans(),
    gz=st.booleans(),
)
def test_text_tables_with_odd_values_and_encodings(values, encoding, delimiter, header, gz):
    suffix = (".tsv" if delimiter == "\t" else ".csv") + (".gz" if gz else "")
    with _tmpdir() as d:
        path = Path(d) / f"sub-01_timeseries{suffix}"
        buf = io.StringIO()
        w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
        if header:
            w.writerow([f"roi{i}" for i in range(values.shape[1])])
        w.writerows([[repr(float(v)) for v in row] for row in values])
        raw = buf.getvalue().encode(encoding)
        path.write_bytes(gzip.compress(raw) if gz else raw)
        got = _check(path, lambda: read_timeseries(path, orientation=None if header else "time-by-roi"))
        if got is not None:
            assert np.allclose(got, values.T.astype(np.float32), rtol=1e-6)


manifest_text = st.lists(
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    "path",
                    "subject",
                    "tr",
                    "split",
                    "age",
                    "a.npy",
                    "b.npy",
                    "sub-01",
                    "2.0",
                    "-1",
                    "train",
                    "x",
                    "",
                    '"',
                    "ü",
                    "\t",
                ]
            ),
            st.text(max_size=6),
        ),
        min_size=0,
        max_size=5,
    ),
    min_size=0,
    max_size=6,
)


@FUZZ
@given(
    rows=manifest_text,
    encoding=st.sampled_from(TEXT_ENCODINGS),
    delimiter=st.sampled_from([",", "\t"]),
    junk=st.binary(max_size=8),
)
def test_manifest_parser_gives_records_or_a_named_error(rows, encoding, delimiter, junk):
    with _tmpdir() as d:
        folder = Path(d)
        for name in ("a.npy", "b.npy"):
            write_timeseries(folder / name, np.random.default_rng(0).normal(size=(3, 12)), tr=2.0)
        text = "\n".join(delimiter.join(r) for r in rows)
        try:
            raw = text.encode(encoding) + junk
        except UnicodeEncodeError:
            raw = text.encode("utf-8") + junk
        path = folder / ("manifest.tsv" if delimiter == "\t" else "manifest.csv")
        path.write_bytes(raw)
        try:
            records, labels = read_manifest(path)
        except BrainJEPAError as exc:
            assert path.name in str(exc)
            return
        assert records and all(r.path for r in records)
        assert all(r.tr is None or r.tr > 0 for r in records)
        try:
            cohort = open_cohort(path)
        except BrainJEPAError as exc:
            assert path.name in str(exc) or any(Path(r.path).name in str(exc) for r in records), str(exc)
            return
        for i in range(len(cohort)):
            assert np.isfinite(cohort.series(i)).all()
