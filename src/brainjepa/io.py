"""Readers and writers for parcellated fMRI time series.

Every reader returns a :class:`TimeSeries` whose ``data`` is float32 **(R, T)**: R regions of
interest (rows) by T volumes. Files on disk come in both orientations, so each format says which
axis is which:

==========================  ===================================  ==============================
format                      layout on disk                       orientation
==========================  ===================================  ==============================
``*_timeseries.tsv`` (XCP-D, a header of parcel names, one row      time-by-roi (from the header)
fMRIPrep-style TSV/CSV)     per volume
UK Biobank CSV              a ``label_name`` column, then one    roi-by-time (from the header)
                            column per volume
headerless CSV/TSV, .npy,   a bare matrix                        roi-by-time (the package's
.npz, .mat, .h5                                                  convention) unless the file's
                                                                 metadata or ``orientation``
                                                                 says otherwise
NIfTI 4D + label atlas      voxels x volumes                     averaged per label (nilearn)
==========================  ===================================  ==============================

A bare square matrix (R == T) cannot be told apart, so it is an error unless ``orientation`` is
given. The repetition time (TR) comes from the ``tr`` argument, else the file itself (``tr`` in
.npz/.mat/.h5, the NIfTI header), else the BIDS JSON sidecar next to the file (``RepetitionTime``,
or ``SamplingFrequency`` in Hz), else a uniform time column in a TSV. Censored data (BIDS
``VolumeTiming`` or a time column with uneven steps, rows that are entirely n/a) is refused: the
time axis must be uniform for windows and TR resampling to mean anything.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BrainJEPAError, DataError, require

ORIENTATIONS = ("roi-by-time", "time-by-roi")
# suffixes (lower case, longest first) that read_timeseries understands
SUFFIXES = (
    ".tsv.gz",
    ".csv.gz",
    ".txt.gz",
    ".nii.gz",
    ".tsv",
    ".csv",
    ".txt",
    ".npy",
    ".npz",
    ".mat",
    ".h5",
    ".hdf5",
    ".nii",
)
# names under which array containers (.npz/.mat/.h5) conventionally keep the series
_DATA_KEYS = ("timeseries", "time_series", "ts", "data", "X", "bold")
_LABEL_KEYS = ("roi_labels", "labels", "roi_names", "label_names")
_TR_KEYS = ("tr", "TR", "RepetitionTime", "repetition_time")
_TIME_COLUMNS = ("time", "onset", "frame_time", "frame_times", "acq_time", "volume_timing")
_UKB_LABEL_COLUMNS = ("label_name", "label", "roi", "roi_name", "region", "parcel")


@dataclass
class TimeSeries:
    """One subject's parcellated series.

    data: float32 (R, T); roi_labels: R names or None; tr: seconds or None; path: source file.
    """

    data: np.ndarray
    roi_labels: list[str] | None = None
    tr: float | None = None
    path: str | None = None

    @property
    def n_rois(self) -> int:
        return int(self.data.shape[0])

    @property
    def n_timepoints(self) -> int:
        return int(self.data.shape[1])


def file_suffix(path: str | Path) -> str:
    """The format suffix of ``path`` ('.tsv.gz', '.npy', ...), lower case, '' if unknown."""
    name = Path(path).name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def is_timeseries_file(path: str | Path) -> bool:
    return file_suffix(path) != ""


def bids_entities(path: str | Path) -> dict[str, str]:
    """BIDS key-value entities of a file name, e.g. {'sub': '01', 'ses': '1', 'seg': '4S456Parcels'}.

    XCP-D names its parcellation ``atlas-`` in older releases and ``seg-`` in newer ones; both are
    returned under their own key and :func:`atlas_name` reads either.
    """
    name = Path(path).name
    stem = name[: len(name) - len(file_suffix(name))] if file_suffix(name) else Path(name).stem
    out = {}
    for part in stem.split("_"):
        key, sep, value = part.partition("-")
        if sep and key.isalnum() and value:
            out[key] = value
    return out


def atlas_name(path: str | Path) -> str | None:
    """The parcellation named in a BIDS/XCP-D file name (``seg-`` or the older ``atlas-``)."""
    ent = bids_entities(path)
    return ent.get("seg") or ent.get("atlas")


def sidecar_path(path: str | Path) -> Path:
    """The BIDS JSON sidecar of a data file: same name, suffix replaced by ``.json``."""
    path = Path(path)
    suffix = file_suffix(path) or path.suffix
    return path.with_name(path.name[: len(path.name) - len(suffix)] + ".json")


def read_sidecar(path: str | Path) -> dict:
    """The JSON sidecar of ``path`` as a dict ({} when there is none)."""
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        with open(side) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{side}: cannot read JSON sidecar ({exc}); fix or remove it") from exc
    return meta if isinstance(meta, dict) else {}


def _tr_from_sidecar(path: Path, meta: dict) -> float | None:
    if "VolumeTiming" in meta:
        vt = np.asarray(meta["VolumeTiming"], dtype=float)
        _check_uniform(vt, path, "VolumeTiming in the JSON sidecar")
        if len(vt) > 1:
            return float(np.median(np.diff(vt)))
    if "RepetitionTime" in meta:
        return _positive_tr(meta["RepetitionTime"], path, "RepetitionTime in the JSON sidecar")
    fs = meta.get("SamplingFrequency")
    if isinstance(fs, (int, float)) and fs > 0:
        return 1.0 / float(fs)
    return None


def _positive_tr(value, path, where) -> float:
    try:
        tr = float(np.asarray(value).reshape(-1)[0])
    except (TypeError, ValueError, IndexError) as exc:
        raise DataError(f"{path}: {where} is not a number ({value!r})") from exc
    if not np.isfinite(tr) or tr <= 0:
        raise DataError(f"{path}: {where} must be a positive number of seconds, got {tr}")
    return tr


def _check_uniform(times: np.ndarray, path, where: str) -> None:
    if times.ndim != 1 or len(times) < 3:
        return
    steps = np.diff(times)
    step = np.median(steps)
    if step <= 0 or np.max(np.abs(steps - step)) > 0.01 * step:
        gaps = int(np.sum(np.abs(steps - step) > 0.01 * step))
        raise DataError(
            f"{path}: censored or non-uniform volumes ({where} has {gaps} uneven step(s) around "
            f"{step:.3g} s); windows and TR resampling need a uniform time axis: use the "
            "uncensored (or interpolated) output of your pipeline, or skip this file"
        )


def _orient(data: np.ndarray, orientation: str | None, path, default: str = "roi-by-time") -> np.ndarray:
    """Turn a 2-D array into (R, T). ``orientation`` None means the format's ``default``."""
    if data.ndim != 2:
        raise DataError(f"{path}: expected a 2-D ROI x time matrix, got shape {data.shape}")
    if orientation is None:
        if data.shape[0] == data.shape[1]:
            raise DataError(
                f"{path}: the matrix is square ({data.shape[0]} x {data.shape[1]}), so ROIs and time "
                "cannot be told apart; pass orientation='roi-by-time' or 'time-by-roi' "
                "(--orientation on the command line, or an 'orientation' manifest column)"
            )
        orientation = default
    if orientation not in ORIENTATIONS:
        raise DataError(f"{path}: orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    return data if orientation == "roi-by-time" else data.T


def _as_float32(data, path) -> np.ndarray:
    src = np.asarray(data)
    if src.dtype.kind not in "biuf":
        if src.dtype.kind == "c":
            raise DataError(f"{path}: complex values; a time series must be real numbers")
        if src.dtype.kind not in "OUS":
            raise DataError(f"{path}: values of type {src.dtype} are not numbers")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            arr = src.astype(np.float32)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"{path}: values are not numeric ({exc})") from exc
    if src.dtype.kind == "f" and src.dtype.itemsize > 4:
        lost = np.isinf(arr) & np.isfinite(src)
        if lost.any():
            raise DataError(
                f"{path}: {int(lost.sum())} value(s) up to {np.abs(src[lost]).max():.3g} "
                "overflow float32 (largest 3.4e38); such values are not a BOLD signal: "
                "check the units and the export of this file"
            )
    return np.ascontiguousarray(arr)


def decode_text(raw: bytes, path, what: str = "file") -> str:
    """UTF-8 text of ``raw`` (a leading byte-order mark dropped); a byte that is not UTF-8 is a
    :class:`DataError` naming the line and the byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        byte = raw[exc.start : exc.start + 1].hex()
        raise DataError(
            f"{path}, line {line}: byte 0x{byte} is not UTF-8 text; save the {what} as "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8 OLD > NEW)"
        ) from None


def _labels_or_none(labels, n: int, path) -> list[str] | None:
    if labels is None:
        return None
    labels = [str(s).strip() for s in np.asarray(labels, dtype=object).reshape(-1)]
    if len(labels) != n:
        raise DataError(f"{path}: {len(labels)} ROI labels for {n} ROIs")
    return labels


# ----------------------------------------------------------------------------- readers


def read_timeseries(
    path,
    *,
    orientation: str | None = None,
    tr: float | None = None,
    variable: str | None = None,
    atlas=None,
) -> TimeSeries:
    """Read one subject's parcellated series from any supported file.

    path: .npy/.npz/.csv/.tsv(.gz)/.mat/.h5/.nii(.gz); orientation: None (from headers and format
    conventions, see the module docstring), 'roi-by-time' or 'time-by-roi'; tr: seconds,
    overrides the file's own; variable: array name inside .npz/.mat/.h5; atlas: label image
    (path or nibabel image) for NIfTI input. Returns a :class:`TimeSeries` with float32 (R, T).
    Raises :class:`DataError` naming the file for anything unreadable.
    """
    path = Path(path)
    suffix = file_suffix(path)
    if orientation is not None and orientation not in ORIENTATIONS:
        raise DataError(f"{path}: orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if suffix == "":
        raise DataError(f"{path}: unknown file type; supported: {', '.join(SUFFIXES)}")
    try:
        if suffix == ".npy":
            ts = _read_npy(path, orientation)
        elif suffix == ".npz":
            ts = _read_npz(path, orientation, variable)
        elif suffix in (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz"):
            ts = _read_text(path, orientation)
        elif suffix == ".mat":
            ts = _read_mat(path, orientation, variable)
        elif suffix in (".h5", ".hdf5"):
            ts = _read_h5(path, orientation, variable)
        else:
            ts = _read_nifti(path, atlas)
    except BrainJEPAError:  # already says what is wrong (a bad file, a missing extra)
        raise
    except Exception as exc:  # any parser failure on a user's file is a data problem
        raise DataError(
            f"{path}: cannot read {suffix} file ({type(exc).__name__}: {exc}); "
            "the file may be truncated or not in the expected format"
        ) from exc
    if tr is not None:
        ts.tr = _positive_tr(tr, path, "the tr argument")
    elif ts.tr is None:
        ts.tr = _tr_from_sidecar(path, read_sidecar(path))
    else:
        _tr_from_sidecar(path, read_sidecar(path))  # still refuse censored VolumeTiming
    ts.path = str(path)
    if ts.data.shape[0] == 0 or ts.data.shape[1] == 0:
        raise DataError(f"{path}: empty series (shape {ts.data.shape})")
    return ts


def _read_npy(path: Path, orientation) -> TimeSeries:
    arr = np.load(path, allow_pickle=False)
    return TimeSeries(_as_float32(_orient(arr, orientation, path), path))


def _pick_array(arrays: dict, variable, path, what: str):
    """Choose the series among named arrays: by name, a conventional name, or the only 2-D one."""
    if variable is not None:
        if variable not in arrays:
            raise DataError(f"{path}: no {what} named {variable!r}; it has {sorted(arrays)}")
        return variable
    two_d = [k for k, v in arrays.items() if getattr(v, "ndim", 0) == 2 and np.issubdtype(v.dtype, np.number)]
    if len(two_d) == 1:
        return two_d[0]
    for key in _DATA_KEYS:
        if key in two_d:
            return key
    if not two_d:
        raise DataError(f"{path}: no 2-D numeric {what} found (it has {sorted(arrays)})")
    raise DataError(
        f"{path}: several 2-D {what}s ({', '.join(sorted(two_d))}); choose one with "
        "variable=... (--variable, or a 'variable' manifest column)"
    )


def _meta_from(arrays: dict, path):
    labels = next((arrays[k] for k in _LABEL_KEYS if k in arrays), None)
    tr = next((arrays[k] for k in _TR_KEYS if k in arrays), None)
    orient = arrays.get("orientation")
    if orient is not None:
        orient = str(np.asarray(orient).reshape(-1)[0])
    return labels, (None if tr is None else _positive_tr(tr, path, "the tr stored in the file")), orient


def _read_npz(path: Path, orientation, variable) -> TimeSeries:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    key = _pick_array(arrays, variable, path, "array")
    labels, tr, file_orient = _meta_from(arrays, path)
    data = _as_float32(_orient(arrays[key], orientation or file_orient, path), path)
    return TimeSeries(data, _labels_or_none(labels, data.shape[0], path), tr)


def _read_mat(path: Path, orientation, variable) -> TimeSeries:
    from scipy.io import loadmat

    with open(path, "rb") as f:
        head = f.read(128)
    if b"MATLAB 7.3" in head:  # v7.3 .mat files are HDF5 underneath
        return _read_h5(path, orientation, variable)
    raw = loadmat(path, squeeze_me=True, chars_as_strings=True)
    arrays = {k: np.asarray(v) for k, v in raw.items() if not k.startswith("__")}
    key = _pick_array(arrays, variable, path, "variable")
    labels, tr, file_orient = _meta_from(arrays, path)
    data = _as_float32(_orient(arrays[key], orientation or file_orient, path), path)
    return TimeSeries(data, _labels_or_none(labels, data.shape[0], path), tr)


def _read_h5(path: Path, orientation, variable) -> TimeSeries:
    h5py = require("h5py", "hdf5", f"reading {path.name}")
    with h5py.File(path, "r") as f:
        datasets = {}
        f.visititems(lambda name, obj: datasets.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
        shapes = {k: _Shape(v) for k, v in datasets.items()}
        key = _pick_array(shapes, variable, path, "dataset")
        ds = datasets[key]
        attrs = {k: ds.attrs[k] for k in ds.attrs}
        attrs.update({k: f.attrs[k] for k in f.attrs if k not in attrs})
        for k in _LABEL_KEYS + _TR_KEYS:
            if k in datasets and k not in attrs:
                attrs[k] = datasets[k][()]
        labels, tr, file_orient = _meta_from(attrs, path)
        if labels is not None:
            labels = [s.decode() if isinstance(s, bytes) else s for s in np.asarray(labels).reshape(-1)]
        arr = ds[()]
    data = _as_float32(_orient(np.asarray(arr), orientation or file_orient, path), path)
    return TimeSeries(data, _labels_or_none(labels, data.shape[0], path), tr)


class _Shape:
    """ndim/dtype of an h5py dataset without reading it (for _pick_array)."""

    def __init__(self, ds):
        self.ndim = ds.ndim
        self.dtype = ds.dtype if ds.dtype.kind in "fiub" else np.dtype(object)


def _read_text_bytes(path: Path) -> str:
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rb") as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    return decode_text(raw, path)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return s.strip().lower() in ("n/a", "na", "nan", "")


def _to_float(s: str) -> float:
    s = s.strip()
    if s.lower() in ("n/a", "na", "nan", ""):
        return np.nan
    return float(s)


def _read_text(path: Path, orientation) -> TimeSeries:
    """CSV/TSV: XCP-D/fMRIPrep (header of parcels, rows = volumes), UKB (label column first)."""
    name = path.name.lower()
    delimiter = "\t" if ".tsv" in name else ","
    text = _read_text_bytes(path)
    if "\0" in text:
        raise DataError(f"{path}: NUL bytes in a text file; the file is binary or corrupted")
    body = text.rstrip(" \t")
    if body.strip() and "\n" in body.strip() and not body.endswith(("\n", "\r")):
        # writers end every line, the last one too: a missing line break is how a file that was
        # cut short looks, and its last number may be cut (0.3553727 -> 0.3) without any error
        raise DataError(
            f"{path}: the last line has no line break, so the file may be truncated "
            f"(line {text.count(chr(10)) + 1} cut short); check the file, and if it is "
            "complete add a line break at its end"
        )
    if delimiter == "," and "\t" in text.split("\n", 1)[0] and "," not in text.split("\n", 1)[0]:
        delimiter = "\t"  # a .txt/.csv that is really tab separated
    if ".txt" in name and delimiter == "," and "," not in text.split("\n", 1)[0]:
        rows = [line.split() for line in text.splitlines() if line.strip()]
    else:
        rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if r]
    if not rows:
        raise DataError(f"{path}: the file is empty")
    width = len(rows[0])
    bad = [i + 1 for i, r in enumerate(rows) if len(r) != width]
    if bad:
        raise DataError(
            f"{path}: line {bad[0]} has {len(rows[bad[0] - 1])} fields, the first line has "
            f"{width}; the file is truncated or malformed"
        )
    header = None
    first = [s.strip() for s in rows[0]]
    headerless_ukb = (  # "name, v1, v2, ..." on every line, no header line
        first[0].lower() not in _UKB_LABEL_COLUMNS
        and all(_is_number(s) for s in first[1:])
        and len(rows) > 1
        and not _is_number(rows[1][0])
    )
    if not headerless_ukb and not all(_is_number(s) for s in first):
        header, rows = first, rows[1:]
        _check_header(header, path)
    elif _looks_like_column_numbers(first) and len(rows) > 1:
        raise DataError(
            f"{path}: line 1 is {', '.join(first[:3])}, ... (column numbers, not ROI "
            "names and not data); replace it with the ROI names or delete the line"
        )
    if not rows:
        raise DataError(f"{path}: a header but no data rows")

    first_col = [r[0] for r in rows]
    ukb = (header is not None and header[0].lower() in _UKB_LABEL_COLUMNS) or (
        not all(_is_number(s) for s in first_col)
    )
    if ukb:  # one row per ROI: a label column, then one column per volume
        labels = [s.strip() for s in first_col]
        body = [r[1:] for r in rows]
        data = _parse_matrix(body, path, header_offset=1 if header else 0)
        if orientation == "time-by-roi":
            raise DataError(
                f"{path}: the first column holds ROI names, so rows are ROIs; "
                "orientation='time-by-roi' contradicts the file"
            )
        return TimeSeries(data, labels, None)

    if header is not None:  # XCP-D / fMRIPrep: columns are parcels, rows are volumes
        tr = None
        time_idx = [i for i, h in enumerate(header) if h.lower() in _TIME_COLUMNS]
        data = _parse_matrix(rows, path, header_offset=1)
        if time_idx:
            times = data[:, time_idx[0]].astype(np.float64)
            _check_uniform(times, path, f"the '{header[time_idx[0]]}' column")
            if len(times) > 1:
                tr = float(np.median(np.diff(times)))
            keep = [i for i in range(len(header)) if i != time_idx[0]]
            data, header = data[:, keep], [header[i] for i in keep]
        if orientation == "roi-by-time":
            raise DataError(
                f"{path}: the header names the columns, so columns are ROIs and rows are "
                "volumes; orientation='roi-by-time' contradicts the file"
            )
        censored = np.all(np.isnan(data), axis=1)
        if censored.any() and not censored.all():
            raise DataError(
                f"{path}: {int(censored.sum())} volume(s) are entirely n/a (censored); windows and TR "
                "resampling need a uniform time axis: use the interpolated/uncensored output of your "
                "pipeline, or skip this file"
            )
        return TimeSeries(np.ascontiguousarray(data.T), header, tr)

    data = _parse_matrix(rows, path, header_offset=0)
    return TimeSeries(np.ascontiguousarray(_orient(data, orientation, path)), None, None)


def _check_header(header: list[str], path) -> None:
    """A header must name each column once: an empty or a repeated name is an error."""
    blank = [i + 1 for i, h in enumerate(header) if not h]
    if blank:
        index = " (a row index written with the table?)" if blank == [1] else ""
        raise DataError(
            f"{path}: line 1, column {blank[0]} has no name{index}; every column of the "
            "header must name its ROI: name it or drop that column"
        )
    seen: dict[str, int] = {}
    for i, h in enumerate(header):
        if h and h in seen:
            raise DataError(
                f"{path}: line 1 names column {seen[h] + 1} and column {i + 1} both {h!r}; "
                "two ROIs cannot share a name: fix the header (a parcellation exported twice?)"
            )
        seen[h] = i


def _looks_like_column_numbers(first: list[str]) -> bool:
    """A first line 0, 1, 2, ... (or 1, 2, 3, ...): an index header, not a volume of data."""
    if len(first) < 3:
        return False
    try:
        values = [float(s) for s in first]
    except ValueError:
        return False
    start = values[0]
    return start in (0.0, 1.0) and values == [start + i for i in range(len(values))]


def _parse_matrix(rows: list[list[str]], path, header_offset: int) -> np.ndarray:
    try:
        wide = np.array([[_to_float(s) for s in r] for r in rows], dtype=np.float64)
    except ValueError:
        for i, r in enumerate(rows):
            for j, s in enumerate(r):
                try:
                    _to_float(s)
                except ValueError:
                    raise DataError(
                        f"{path}: line {i + 1 + header_offset}, field {j + 1}: {s!r} is not a number"
                    ) from None
        raise
    big = np.argwhere(np.isfinite(wide) & (np.abs(wide) > np.finfo(np.float32).max))
    if len(big):
        i, j = (int(v) for v in big[0])
        raise DataError(
            f"{path}: line {i + 1 + header_offset}, field {j + 1}: {rows[i][j].strip()} "
            "overflows float32 (largest 3.4e38); such values are not a BOLD signal: check "
            "the units and the export of this file"
        )
    return wide.astype(np.float32)


def _read_nifti(path: Path, atlas) -> TimeSeries:
    if atlas is None:
        raise DataError(
            f"{path}: a NIfTI image needs a label atlas to be parcellated; pass atlas=PATH "
            "(--atlas, or an 'atlas' manifest column)"
        )
    nib = require("nibabel", "nifti", f"reading {path.name}")
    maskers = require("nilearn.maskers", "nifti", f"parcellating {path.name}")
    img = nib.load(str(path))
    if len(img.shape) != 4:
        raise DataError(f"{path}: expected a 4-D image (x, y, z, time), got shape {img.shape}")
    atlas_img = nib.load(str(atlas)) if isinstance(atlas, (str, Path)) else atlas
    ids = np.unique(np.asarray(atlas_img.dataobj)).astype(int)
    ids = ids[ids != 0]
    nilearn = require("nilearn", "nifti", f"parcellating {path.name}")
    # "no standardisation" is spelled None from nilearn 0.14 on (False warns), False before
    version = tuple(int(p) for p in nilearn.__version__.split(".")[:2] if p.isdigit())
    no_scaling = None if version >= (0, 14) else False
    masker = maskers.NiftiLabelsMasker(labels_img=atlas_img, standardize=no_scaling, resampling_target="data")
    data = np.asarray(masker.fit_transform(img), dtype=np.float32).T  # (R, T)
    if data.shape[0] != len(ids):
        raise DataError(
            f"{path}: the atlas has {len(ids)} labels but only {data.shape[0]} overlap the "
            "image; check that atlas and image are in the same space"
        )
    names = _atlas_names(atlas, ids)
    tr = None
    zooms = img.header.get_zooms()
    if len(zooms) > 3 and zooms[3] > 0:
        unit = img.header.get_xyzt_units()[1]
        tr = round(float(zooms[3]) / (1000.0 if unit == "msec" else 1.0), 6)  # header is float32
    return TimeSeries(np.ascontiguousarray(data), names, tr)


def _atlas_names(atlas, ids: np.ndarray) -> list[str]:
    """ROI names from the atlas's BIDS look-up table (``<atlas>.tsv`` with index/name), else ids."""
    if isinstance(atlas, (str, Path)):
        lut = Path(str(atlas)[: -len(file_suffix(atlas))] + ".tsv") if file_suffix(atlas) else None
        if lut is not None and lut.is_file():
            with open(lut, newline="") as f:
                table = {int(r["index"]): r["name"] for r in csv.DictReader(f, delimiter="\t")}
            if all(int(i) in table for i in ids):
                return [table[int(i)] for i in ids]
    return [str(int(i)) for i in ids]


# ----------------------------------------------------------------------------- writers


def write_timeseries(
    path,
    ts_or_array,
    *,
    roi_labels: list[str] | None = None,
    tr: float | None = None,
    layout: str | None = None,
    sidecar: bool | None = None,
) -> Path:
    """Write a (R, T) series in the format given by ``path``'s suffix.

    .npy: (R, T) array; .npz: ``timeseries`` (R, T) + ``roi_labels`` + ``tr``; .tsv(.gz): XCP-D
    layout (header of ROI names, one row per volume); .csv(.gz): UK Biobank layout by default
    (``label_name`` column, one column per volume; ``layout='xcpd'`` for the TSV layout);
    .mat: ``timeseries``/``roi_labels``/``tr`` variables; .h5: ``timeseries`` dataset with
    ``roi_labels``/``tr``/``orientation`` attributes. The TR also goes to a BIDS JSON sidecar
    (``RepetitionTime``) for formats that cannot hold it (npy, tsv, csv) unless sidecar=False.
    """
    path = Path(path)
    if isinstance(ts_or_array, TimeSeries):
        data = ts_or_array.data
        roi_labels = roi_labels if roi_labels is not None else ts_or_array.roi_labels
        tr = tr if tr is not None else ts_or_array.tr
    else:
        data = ts_or_array
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 2:
        raise DataError(f"{path}: write_timeseries needs an (R, T) array, got shape {data.shape}")
    n_rois = data.shape[0]
    labels = list(roi_labels) if roi_labels is not None else [f"roi{i:03d}" for i in range(n_rois)]
    suffix = file_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    needs_sidecar = suffix in (".npy", ".tsv", ".tsv.gz", ".csv", ".csv.gz", ".txt", ".txt.gz")
    if suffix == ".npy":
        np.save(path, data)
    elif suffix == ".npz":
        extra = {"tr": np.float64(tr)} if tr is not None else {}
        np.savez(path, timeseries=data, roi_labels=np.asarray(labels), **extra)
    elif suffix in (".tsv", ".tsv.gz", ".csv", ".csv.gz"):
        delimiter = "\t" if ".tsv" in suffix else ","
        layout = layout or ("xcpd" if delimiter == "\t" else "ukb")
        opener = gzip.open if suffix.endswith(".gz") else open
        with opener(path, "wt", newline="") as f:
            w = csv.writer(f, delimiter=delimiter, lineterminator="\n")
            if layout == "xcpd":
                w.writerow(labels)
                w.writerows([[f"{v:.7g}" for v in row] for row in data.T])
            elif layout == "ukb":
                w.writerow(["label_name"] + [str(t) for t in range(data.shape[1])])
                w.writerows([[lab] + [f"{v:.7g}" for v in row] for lab, row in zip(labels, data)])
            else:
                raise DataError(f"{path}: layout must be 'xcpd' or 'ukb', got {layout!r}")
    elif suffix == ".mat":
        from scipy.io import savemat

        extra = {"tr": float(tr)} if tr is not None else {}
        savemat(path, {"timeseries": data, "roi_labels": np.asarray(labels, dtype=object), **extra})
    elif suffix in (".h5", ".hdf5"):
        h5py = require("h5py", "hdf5", f"writing {path.name}")
        with h5py.File(path, "w") as f:
            ds = f.create_dataset("timeseries", data=data)
            ds.attrs["orientation"] = "roi-by-time"
            ds.attrs["roi_labels"] = np.asarray(labels, dtype=h5py.string_dtype())
            if tr is not None:
                ds.attrs["tr"] = float(tr)
    else:
        raise DataError(f"{path}: cannot write this file type; use .npy, .npz, .tsv, .csv, .mat or .h5")
    if tr is not None and (sidecar if sidecar is not None else needs_sidecar):
        with open(sidecar_path(path), "w") as f:
            json.dump({"RepetitionTime": float(tr)}, f)
    return path
