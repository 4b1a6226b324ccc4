"""Cohorts, validation, the packed memory-mapped store, and the window Dataset.

A :class:`Cohort` is a list of subjects' (R, T_i) series with their TRs, labels and ROI names,
whatever it was read from: a list of arrays, a folder of files, a manifest, or a prepared store.
:func:`open_cohort` opens any of them; :func:`prepare_store` packs a manifest into a store;
:class:`WindowDataset` turns a cohort into (R, n_timepoints) training or evaluation windows.

Manifest (CSV or TSV, one row per scan)
    ``path`` (required; relative paths are resolved against the manifest's folder), ``subject``
    (default: the BIDS ``sub-`` entity or the file stem), ``session``, ``tr`` (seconds; default:
    the file's own), ``split`` (train/val/test), per-file reading options ``orientation``,
    ``variable``, ``atlas``; every other column is a label (numeric columns become int64 or
    float64 arrays with NaN for blanks, anything else an object array of strings).

Store (a folder)
    ``data.bin``: one (total_timepoints, R) array, time-major so that a window of every ROI is
    one contiguous read; float32, or float16 of each scan's ROI-centred values (the per-scan ROI
    means are kept in float32 in ``roi_means.npy``, so float16 keeps ~3 significant digits of the
    fluctuations rather than of the raw intensities). ``store.json``: subjects, sessions, source
    paths, TRs, offsets/lengths into the array, splits, labels, ROI names, the robust-scaling
    statistics fitted on the training split, and the files skipped with the reason.
    ``skipped.tsv`` lists the skipped files again for people who do not read JSON.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import ConfigError, DataError
from .io import (
    TimeSeries,
    bids_entities,
    decode_text,
    file_suffix,
    is_timeseries_file,
    read_sidecar,
    read_timeseries,
)
from .runio import INCOMPLETE_SUFFIX, incomplete_path, move_into_place, write_json_atomic
from .transforms import (
    FITTED_NORMALIZATIONS,
    NORMALIZATIONS,
    RobustScaler,
    WindowResampler,
    has_raw_baseline,
    magnitude_problem,
    normalization_from_dict,
    normalization_to_dict,
    normalize,
    reflect_indices,
    resampled_length,
    same_tr,
    scan_levels,
    scan_transform,
)

log = logging.getLogger(__name__)

STORE_FORMAT = "brainjepa-store"
STORE_VERSION = 1
SPLITS = ("train", "val", "test")
_RESERVED = ("path", "subject", "session", "tr", "split", "orientation", "variable", "atlas")
_MANIFEST_NAMES = ("manifest.csv", "manifest.tsv")
ON_ERROR = ("fail", "skip")
# where a scan's TR comes from when the manifest's tr column and the file (or its sidecar) both
# give one: 'check' (default) refuses a disagreement, 'manifest' or 'file' picks that source
TR_SOURCES = ("check", "manifest", "file")
# suffix of the folder a store is built in before it is renamed into place


# ----------------------------------------------------------------------------- validation


def validate_timeseries(
    ts: TimeSeries,
    *,
    n_rois: int | None = None,
    roi_labels: list[str] | None = None,
    min_timepoints: int | None = None,
    target_tr: float | None = None,
    reference: str | None = None,
) -> None:
    """Raise :class:`DataError` naming ``ts.path`` if the series is unusable.

    Checks: finite values; no all-zero or constant ROI; ROI count (and names, when both sides
    have them) equal to the cohort's (``reference`` names the file that set them); at least
    ``min_timepoints`` points after resampling to ``target_tr`` (or at the native TR).
    """
    name = ts.path or "series"
    x = ts.data
    if n_rois is not None and x.shape[0] != n_rois:
        hint = ""
        if x.shape[1] == n_rois:
            hint = " (its time axis has that length: is the file time-by-roi? set orientation)"
        raise DataError(
            f"{name}: {x.shape[0]} ROIs, but the cohort has {n_rois}"
            f"{f' (set by {reference})' if reference else ''}{hint}"
        )
    if roi_labels is not None and ts.roi_labels is not None and list(ts.roi_labels) != list(roi_labels):
        k = next(i for i, (a, b) in enumerate(zip(ts.roi_labels, roi_labels)) if a != b)
        raise DataError(
            f"{name}: ROI labels differ from the cohort's{f' ({reference})' if reference else ''}"
            f" at position {k}: {ts.roi_labels[k]!r} vs {roi_labels[k]!r}; all files must use "
            "the same parcellation in the same order"
        )
    bad = ~np.isfinite(x)
    if bad.any():
        rois = np.flatnonzero(bad.any(axis=1))
        raise DataError(
            f"{name}: {int(bad.sum())} NaN/Inf value(s) in {len(rois)} ROI(s) "
            f"({_roi_list(rois, ts.roi_labels)}); clean or interpolate them, or skip the file"
        )
    problem = magnitude_problem(x)
    if problem:
        raise DataError(f"{name}: {problem}")
    zero = np.flatnonzero(~x.any(axis=1))
    if len(zero):
        raise DataError(
            f"{name}: {len(zero)} all-zero ROI(s) ({_roi_list(zero, ts.roi_labels)}), usually "
            "parcels outside the brain mask or field of view; drop them from the "
            "parcellation or skip the file"
        )
    const = np.flatnonzero(np.ptp(x, axis=1) == 0)
    if len(const):
        raise DataError(
            f"{name}: {len(const)} constant ROI(s) ({_roi_list(const, ts.roi_labels)}); they "
            "carry no signal and break scaling; drop them or skip the file"
        )
    if min_timepoints is not None:
        n = x.shape[1]
        if target_tr is not None:
            if ts.tr is None:
                raise DataError(
                    f"{name}: no TR (no RepetitionTime sidecar, no tr column or flag), but "
                    f"resampling to {target_tr} s needs one"
                )
            n = resampled_length(n, ts.tr, target_tr)
        if n < min_timepoints:
            at = f" at TR {target_tr} s" if target_tr is not None else ""
            raise DataError(f"{name}: {n} time points{at}, shorter than the window of {min_timepoints}")


def _roi_list(idx: np.ndarray, labels) -> str:
    shown = [f"{i}" + (f" '{labels[i]}'" if labels else "") for i in idx[:5]]
    return "ROI " + ", ".join(shown) + (", ..." if len(idx) > 5 else "")


# ----------------------------------------------------------------------------- manifests


@dataclass
class Record:
    """One scan to read: where, who, and how."""

    path: str
    subject: str
    session: str | None = None
    tr: float | None = None
    split: str | None = None
    orientation: str | None = None
    variable: str | None = None
    atlas: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    source: str | None = None  # "MANIFEST, line N" for records read from a manifest
    tr_source: str = "check"  # one of TR_SOURCES
    levels: tuple | None = None  # (level, fluctuation) of the series, set when validated

    def read(self, tr: float | None = None, orientation: str | None = None) -> TimeSeries:
        """The series. A TR in this record (the manifest's tr column) and one in the file or its
        sidecar must agree unless ``tr_source`` picks one; ``tr`` only fills a missing one."""
        ts = read_timeseries(
            self.path, orientation=self.orientation or orientation, variable=self.variable, atlas=self.atlas
        )
        if self.tr is not None:
            if ts.tr is not None and not same_tr(ts.tr, self.tr) and self.tr_source != "file":
                if self.tr_source == "check":
                    where = sidecar_or_file(self.path)
                    raise DataError(
                        f"{self.path}: TR {ts.tr:g} s in {where} but {self.tr:g} s in "
                        f"{self.source or 'the tr given for it'}; correct the wrong one, or choose "
                        "a source with --tr-source manifest|file (tr_source=...)"
                    )
                ts.tr = float(self.tr)
            elif ts.tr is None or self.tr_source == "manifest":
                ts.tr = float(self.tr)
        if ts.tr is None and tr is not None:
            ts.tr = float(tr)
        return ts


def sidecar_or_file(path) -> str:
    """Where a file's own TR was read from, for messages: its JSON sidecar or the file itself."""
    from .io import sidecar_path

    side = sidecar_path(path)
    meta = read_sidecar(path) if side.is_file() else {}
    return (
        str(side)
        if any(k in meta for k in ("RepetitionTime", "SamplingFrequency", "VolumeTiming"))
        else "the file itself"
    )


def subject_from_path(path: str | Path) -> tuple[str, str | None]:
    """(subject, session) from BIDS entities of the file name, else (file stem, None)."""
    ent = bids_entities(path)
    if "sub" in ent:
        return f"sub-{ent['sub']}", (f"ses-{ent['ses']}" if "ses" in ent else None)
    name = Path(path).name
    return name[: len(name) - len(file_suffix(name))] or name, None


def read_manifest(path) -> tuple[list[Record], list[str]]:
    """Parse a manifest CSV/TSV -> (records, label column names). Paths resolved, splits checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the manifest ({exc})") from exc
    text = decode_text(raw, path, "manifest")
    if "\0" in text:
        raise DataError(f"{path}: NUL bytes; a manifest is a CSV/TSV text file, this one is binary or corrupted")
    if not text.strip():
        raise DataError(
            f"{path}: the manifest is empty; it needs a header line with a 'path' column and one line per scan"
        )
    lines = text.splitlines()
    first = lines[0]
    delimiter = "\t" if (path.suffix.lower() == ".tsv" or ("\t" in first and "," not in first)) else ","
    try:
        table = list(csv.reader(lines, delimiter=delimiter, strict=True))
    except csv.Error as exc:
        raise DataError(
            f"{path}: not a valid {'TSV' if delimiter == chr(9) else 'CSV'} file ({exc}); check the quoting"
        ) from None
    columns = [c.strip() for c in table[0]]
    if "path" not in columns:
        raise DataError(f"{path}, line 1: a manifest needs a 'path' column (found: {', '.join(columns) or 'nothing'})")
    repeated = sorted({c for c in columns if c and columns.count(c) > 1})
    if repeated:
        raise DataError(
            f"{path}, line 1: column {repeated[0]!r} appears {columns.count(repeated[0])} "
            "times; give every column a distinct name"
        )
    label_names = [c for c in columns if c not in _RESERVED and c]
    records = []
    for line, fields in enumerate(table[1:], start=2):
        if not any(f.strip() for f in fields):
            continue  # blank line
        if len(fields) > len(columns):
            raise DataError(
                f"{path}, line {line}: {len(fields)} fields but the header has "
                f"{len(columns)} columns; quote values that contain "
                f"{'tabs' if delimiter == chr(9) else 'commas'}"
            )
        row = {c: (fields[k].strip() if k < len(fields) else "") for k, c in enumerate(columns) if c}
        if not row.get("path"):
            raise DataError(f"{path}, line {line}: empty 'path'")
        file = Path(row["path"]).expanduser()
        file = file if file.is_absolute() else (path.parent / file)

        subject, session = subject_from_path(file)
        tr = row.get("tr") or None
        if tr is not None:
            try:
                tr = float(tr)
            except ValueError:
                raise DataError(f"{path}, line {line}: tr {row['tr']!r} is not a number") from None
            if not tr > 0:
                raise DataError(f"{path}, line {line}: tr must be positive, got {tr}")
        split = row.get("split") or None
        if split is not None and split not in SPLITS:
            raise DataError(f"{path}, line {line}: split must be one of {SPLITS}, got {split!r}")
        atlas = row.get("atlas") or None
        if atlas is not None and not Path(atlas).is_absolute():
            atlas = str(path.parent / atlas)
        records.append(
            Record(
                path=str(file),
                subject=row.get("subject") or subject,
                session=row.get("session") or (session if not row.get("subject") else None),
                tr=tr,
                split=split,
                orientation=row.get("orientation") or None,
                variable=row.get("variable") or None,
                atlas=atlas,
                labels={k: row.get(k, "") for k in label_names},
                source=f"{path}, line {line}",
            )
        )
    if not records:
        raise DataError(f"{path}: the manifest has a header but lists no files")
    return records, label_names


def _label_array(values: list[str]) -> np.ndarray:
    """Numeric column -> int64 (integral, complete) or float64 (NaN for blanks); else strings."""
    try:
        nums = np.array([float(v) if v not in ("", "n/a", "NA", "nan") else np.nan for v in values])
    except ValueError:
        return np.array(values, dtype=object)
    if len(nums) and np.all(np.isfinite(nums)) and np.all(nums == np.round(nums)):
        return nums.astype(np.int64)
    return nums


def _folder_records(folder: Path) -> list[Record]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_timeseries_file(p))
    if not files and (folder / "data.bin").is_file():
        raise DataError(
            f"{folder}: data.bin without store.json: an interrupted 'brainjepa prepare' "
            "(or a copy that missed store.json); prepare the store again with --overwrite"
        )
    if not files:
        raise DataError(
            f"{folder}: no time-series files (supported: .npy .npz .csv .tsv .mat .h5 .nii) and no manifest.csv"
        )
    out = []
    for p in files:
        subject, session = subject_from_path(p)
        out.append(Record(path=str(p), subject=subject, session=session))
    return out


# ----------------------------------------------------------------------------- cohorts


class Cohort:
    """Subjects' raw (R, T_i) series with TRs, labels and ROI names.

    subjects/sessions/paths/splits: per-scan lists; labels: name -> (N,) array; roi_labels: R
    names or None; n_rois: R; skipped: [(path, reason)] of files left out (on_error='skip');
    normalization: stored robust statistics (a prepared store) or None.
    """

    def __init__(
        self,
        *,
        subjects,
        trs,
        lengths,
        n_rois,
        roi_labels=None,
        labels=None,
        sessions=None,
        paths=None,
        splits=None,
        skipped=None,
        normalization=None,
        levels=None,
    ):
        self.subjects = list(subjects)
        self.trs = [None if t is None else float(t) for t in trs]
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.n_rois = int(n_rois)
        self.roi_labels = list(roi_labels) if roi_labels is not None else None
        self.labels = dict(labels or {})
        n = len(self.subjects)
        self.sessions = list(sessions) if sessions is not None else [None] * n
        self.paths = list(paths) if paths is not None else [None] * n
        self.splits = list(splits) if splits is not None else ["train"] * n
        self.skipped = list(skipped or [])
        self.normalization = normalization
        # per scan (level, fluctuation) of the raw series (see transforms.scan_levels), or None
        self.levels = None if levels is None else np.asarray(levels, dtype=np.float64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.subjects)

    def series(self, i: int) -> np.ndarray:
        """Raw float32 (R, T_i) of scan i (no resampling, no scaling)."""
        raise NotImplementedError

    def read(self, i: int, start: int, stop: int) -> np.ndarray:
        """Frames start..stop-1 of scan i as float32 (R, stop - start), mirror-padded at the ends."""
        x = self.series(i)
        return x[:, reflect_indices(start, stop, x.shape[1])]

    def tr(self, i: int) -> float | None:
        return self.trs[i]

    def length(self, i: int) -> int:
        return int(self.lengths[i])

    def split_indices(self, split: str) -> np.ndarray:
        """Indices of the scans in ``split`` ('train', 'val' or 'test')."""
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)

    def name(self, i: int) -> str:
        return self.paths[i] or self.subjects[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} scans, {self.n_rois} ROIs, labels={sorted(self.labels)})"


class ArrayCohort(Cohort):
    """A cohort held in memory (a list of arrays, or files small enough to cache)."""

    def __init__(self, arrays: Sequence[np.ndarray], **meta):
        self._arrays = list(arrays)
        super().__init__(lengths=[a.shape[1] for a in self._arrays], **meta)

    def series(self, i: int) -> np.ndarray:
        return self._arrays[i]


class FileCohort(Cohort):
    """A cohort of files read on demand (validated once when opened)."""

    def __init__(self, records: Sequence[Record], tr=None, orientation=None, **meta):
        self._records = list(records)
        self._tr, self._orientation = tr, orientation
        super().__init__(**meta)

    def series(self, i: int) -> np.ndarray:
        return self._records[i].read(self._tr, self._orientation).data


def iter_valid(
    records: Sequence[Record],
    *,
    tr: float | None = None,
    orientation: str | None = None,
    on_error: str = "fail",
    min_timepoints: int | None = None,
    target_tr: float | None = None,
    skipped: list | None = None,
    progress: bool = False,
) -> Iterator[tuple[Record, TimeSeries]]:
    """Read and validate every record; yield (record, series) for the good ones.

    The first good file sets the cohort's ROI count and names. Duplicate (subject, session)
    pairs are errors. With on_error='skip' bad files are appended to ``skipped`` as
    (path, reason) and logged; with 'fail' the first one raises :class:`DataError`.
    """
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    skipped = skipped if skipped is not None else []
    n_rois = roi_labels = reference = None
    seen: dict[tuple, str] = {}
    seen_files: dict[str, Record] = {}
    if progress:
        from tqdm.auto import tqdm

        records = tqdm(records, desc="reading", unit="file")
    for rec in records:
        try:
            key = (rec.subject, rec.session)
            if key in seen:
                sess = f", session {rec.session}" if rec.session else ""
                raise DataError(
                    f"{rec.path}: duplicate subject {rec.subject}{sess} (also in {seen[key]}); "
                    "give each scan a unique subject/session or remove one"
                )
            file_key = _file_key(rec.path)
            if file_key in seen_files:
                first = seen_files[file_key]
                raise DataError(
                    f"{rec.source or rec.path}: {rec.path} is listed twice (also for "
                    f"subject {first.subject}{', ' + first.source if first.source else ''}); "
                    "list each scan once"
                )
            ts = rec.read(tr, orientation)
            validate_timeseries(
                ts,
                n_rois=n_rois,
                roi_labels=roi_labels,
                min_timepoints=min_timepoints,
                target_tr=target_tr,
                reference=reference,
            )
        except DataError as exc:
            if on_error == "fail":
                raise
            log.warning("skipping %s", exc)
            skipped.append((rec.path, str(exc)))
            continue
        if n_rois is None:
            n_rois, reference = ts.n_rois, rec.path
        if roi_labels is None and ts.roi_labels is not None:  # the first file that names its ROIs
            roi_labels = ts.roi_labels
        seen[key] = rec.path
        seen_files[file_key] = rec
        rec.levels = scan_levels(ts.data)
        yield rec, ts


def _file_key(path) -> str:
    """A file's identity for duplicate checks (the resolved path when it exists)."""
    p = Path(path)
    try:
        return str(p.resolve()) if p.exists() else os.path.normpath(str(p.absolute()))
    except OSError:
        return str(p)


def _with_defaults(records: list[Record], variable: str | None, atlas, tr_source: str = "check") -> list[Record]:
    """Fill the cohort-wide array name / NIfTI atlas into records whose manifest row left them
    blank, and the rule for a TR given by both the manifest and the file."""
    if tr_source not in TR_SOURCES:
        raise ConfigError(f"tr_source must be one of {TR_SOURCES}, got {tr_source!r}")
    for rec in records:
        rec.variable = rec.variable or variable
        rec.atlas = rec.atlas or (None if atlas is None else str(atlas))
        rec.tr_source = tr_source
    return records


def _labels_of(records: Sequence[Record], label_names: Sequence[str]) -> dict[str, np.ndarray]:
    return {k: _label_array([r.labels.get(k, "") for r in records]) for k in label_names}


def _splits_of(records: Sequence[Record], train_fraction: float, seed: int) -> list[str]:
    """Manifest splits when given; else a random subject-level train/val split."""
    if all(r.split is not None for r in records):
        return [r.split for r in records]
    if any(r.split is not None for r in records):
        missing = next(r.path for r in records if r.split is None)
        raise DataError(f"{missing}: the manifest's 'split' column is blank here; fill it for every row")
    if not 0 < train_fraction <= 1:
        raise ConfigError(f"train_fraction must be in (0, 1], got {train_fraction}")
    subjects = sorted({r.subject for r in records})
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_train = max(1, int(round(train_fraction * len(subjects))))
    train = {subjects[k] for k in order[:n_train]}
    return ["train" if r.subject in train else "val" for r in records]


def open_cohort(
    path_or_list,
    *,
    tr: float | None = None,
    orientation: str | None = None,
    on_error: str = "fail",
    labels: dict | None = None,
    variable: str | None = None,
    atlas=None,
    cache_bytes: int = 1 << 30,
    tr_source: str = "check",
) -> Cohort:
    """Open a cohort from any source.

    path_or_list: a prepared store folder (has store.json); a folder with a manifest.csv/.tsv;
    a folder of time-series files (one scan each, subjects from BIDS names or stems); a manifest
    CSV/TSV (has a 'path' column); or a list of (R, T) arrays / TimeSeries. tr/orientation
    apply where files do not say; on_error: 'fail' or 'skip' (skipped files in ``.skipped``);
    labels: name -> (N,) arrays for a list input; variable/atlas: array name in .npz/.mat/.h5
    files and label image for NIfTI files, where the manifest does not give them; tr_source: which
    TR wins when a manifest's tr column and a file disagree ('check': neither, an error). Files
    are read and validated once here; their arrays are kept in memory when they total at most
    ``cache_bytes``.
    """
    if isinstance(path_or_list, Cohort):
        return path_or_list
    if isinstance(path_or_list, (list, tuple)):
        return _array_cohort(path_or_list, tr, orientation, on_error, labels)
    path = Path(path_or_list)
    if path.is_dir() and (path / "store.json").is_file():
        return open_store(path)
    interrupted = interrupted_store(path)
    if interrupted:
        raise DataError(interrupted)
    label_names: list[str] = []
    if path.is_dir():
        manifest = next((path / m for m in _MANIFEST_NAMES if (path / m).is_file()), None)
        if manifest is not None:
            records, label_names = read_manifest(manifest)
        else:
            records = _folder_records(path)
    elif path.is_file() and _looks_like_manifest(path):
        records, label_names = read_manifest(path)
    elif path.is_file():
        raise DataError(
            f"{path}: a single time-series file is not a cohort; pass its folder, a manifest "
            "(CSV/TSV with a 'path' column) or a prepared store"
        )
    else:
        raise DataError(f"{path}: no such file or folder")
    records = _with_defaults(records, variable, atlas, tr_source)
    skipped: list = []
    kept, arrays, total = [], [], 0
    roi_labels = None
    for rec, ts in iter_valid(records, tr=tr, orientation=orientation, on_error=on_error, skipped=skipped):
        roi_labels = roi_labels or ts.roi_labels
        kept.append((rec, ts.tr, ts.data.shape))
        total += ts.data.nbytes
        if arrays is not None:
            arrays.append(ts.data)
            if total > cache_bytes:
                arrays = None
    if not kept:
        raise DataError(f"{path}: no usable files ({len(skipped)} skipped: {skipped[0][1] if skipped else ''})")
    recs = [k[0] for k in kept]
    meta = dict(
        subjects=[r.subject for r in recs],
        sessions=[r.session for r in recs],
        paths=[r.path for r in recs],
        trs=[k[1] for k in kept],
        n_rois=kept[0][2][0],
        roi_labels=roi_labels,
        labels=_labels_of(recs, label_names),
        splits=_splits_of(recs, 1.0, 0),
        skipped=skipped,
        levels=[r.levels for r in recs],
    )
    if arrays is not None:
        return ArrayCohort(arrays, **meta)
    return FileCohort(recs, tr=tr, orientation=orientation, lengths=[k[2][1] for k in kept], **meta)


def _looks_like_manifest(path: Path) -> bool:
    if path.suffix.lower() not in (".csv", ".tsv"):
        return False
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 16).decode("utf-8-sig", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    return "path" in [c.strip().strip('"') for c in first.replace("\t", ",").split(",")]


def _array_cohort(items, tr, orientation, on_error, labels) -> Cohort:
    records, series = [], []
    for k, item in enumerate(items):
        ts = item if isinstance(item, TimeSeries) else None
        if ts is None:
            arr = np.asarray(item, dtype=np.float32)
            if orientation == "time-by-roi":
                arr = arr.T
            ts = TimeSeries(np.ascontiguousarray(arr), None, tr, f"array {k}")
        if ts.data.ndim != 2:
            raise DataError(f"array {k}: expected an (R, T) array, got shape {ts.data.shape}")
        if ts.tr is None and tr is not None:
            ts.tr = float(tr)
        records.append(_Given(ts, f"sub-{k:04d}"))
        series.append(ts)
    skipped: list = []
    good = list(iter_valid(records, on_error=on_error, skipped=skipped))
    if not good:
        raise DataError(f"no usable arrays ({len(skipped)} skipped)")
    keep = [int(rec.subject[4:]) for rec, _ in good]
    labels = {k: np.asarray(v)[keep] for k, v in (labels or {}).items()}
    for k, v in labels.items():
        if len(v) != len(keep):
            raise DataError(f"label {k!r} has {len(v)} values for {len(items)} arrays")
    roi_labels = next((ts.roi_labels for _, ts in good if ts.roi_labels is not None), None)
    return ArrayCohort(
        [ts.data for _, ts in good],
        subjects=[rec.subject for rec, _ in good],
        trs=[ts.tr for _, ts in good],
        n_rois=good[0][1].n_rois,
        roi_labels=roi_labels,
        labels=labels,
        paths=[ts.path for _, ts in good],
        skipped=skipped,
        levels=[rec.levels for rec, _ in good],
    )


class _Given(Record):
    """A record whose series is already in memory (for list inputs)."""

    def __init__(self, ts: TimeSeries, subject: str):
        super().__init__(path=ts.path or subject, subject=subject)
        self._ts = ts

    def read(self, tr=None, orientation=None) -> TimeSeries:
        return self._ts


# ----------------------------------------------------------------------------- the store


class Store(Cohort):
    """A prepared cohort: one memory-mapped (total_timepoints, R) array plus store.json.

    Windows are read straight from the memory map (contiguous, all ROIs), so the cohort never
    has to fit in RAM. The map is opened lazily in each process and not pickled, so the store
    can be handed to DataLoader workers.
    """

    def __init__(self, path):
        self.path = Path(path)
        meta_file = self.path / "store.json"
        try:
            with open(meta_file) as f:
                meta = json.load(f)
        except (OSError, ValueError) as exc:
            raise DataError(f"{meta_file}: cannot read the store's index ({exc})") from exc
        if meta.get("format") != STORE_FORMAT:
            raise DataError(f"{self.path}: not a brainjepa store (store.json has no format '{STORE_FORMAT}')")
        if meta.get("version", 0) > STORE_VERSION:
            raise DataError(
                f"{self.path}: store version {meta['version']} is newer than this brainjepa "
                f"supports ({STORE_VERSION}); upgrade brainjepa"
            )
        self.meta = meta
        self.dtype = np.dtype(meta["dtype"])
        self.offsets = np.asarray(meta["offsets"], dtype=np.int64)
        self.total_timepoints = int(meta["total_timepoints"])
        labels = {}
        for k, v in meta["labels"].items():
            labels[k] = (
                _label_array(["" if x is None else str(x) for x in v])
                if meta.get("label_types", {}).get(k) != "string"
                else np.array(v, dtype=object)
            )
        super().__init__(
            subjects=meta["subjects"],
            trs=meta["trs"],
            lengths=meta["lengths"],
            n_rois=meta["n_rois"],
            roi_labels=meta.get("roi_labels"),
            labels=labels,
            sessions=meta.get("sessions"),
            paths=meta.get("paths"),
            splits=meta.get("splits"),
            skipped=[(s["path"], s["reason"]) for s in meta.get("skipped", [])],
            normalization=meta.get("normalization"),
            levels=meta.get("scan_levels"),
        )
        self.centered = bool(meta.get("centered", False))
        expected = self.total_timepoints * self.n_rois * self.dtype.itemsize
        size = (self.path / "data.bin").stat().st_size if (self.path / "data.bin").is_file() else -1
        if size != expected:
            raise DataError(
                f"{self.path / 'data.bin'}: {size} bytes, the index expects {expected}; "
                "the store is incomplete or corrupt: prepare it again"
            )
        self._data = self._means = self._fd = None

    @property
    def data(self) -> np.memmap:
        """The (total_timepoints, R) memory map (opened on first use in each process)."""
        if self._data is None:
            self._data = np.memmap(
                self.path / "data.bin", dtype=self.dtype, mode="r", shape=(self.total_timepoints, self.n_rois)
            )
        return self._data

    def _roi_means(self, i: int) -> np.ndarray:
        if self._means is None:
            self._means = np.load(self.path / "roi_means.npy")
        return self._means[i][:, None]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_data"] = state["_means"] = state["_fd"] = None  # workers reopen the file themselves
        return state

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of data.bin as a private (stop - start, R) array in the store dtype."""
        if not hasattr(os, "preadv"):  # e.g. Windows: read through the memory map
            return np.array(self.data[start:stop])
        # one read of exactly these bytes: on a cold cache, page faults on a memory map make the
        # kernel read around every fault, several times the window (3.7x measured on 30 GB)
        if self._fd is None:
            self._fd = os.open(self.path / "data.bin", os.O_RDONLY)
        out = np.empty((stop - start, self.n_rois), dtype=self.dtype)
        view = memoryview(out).cast("B")
        done, offset = 0, start * self.n_rois * self.dtype.itemsize
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise DataError(f"{self.path / 'data.bin'}: unexpected end of file; prepare the store again")
            done += got
        return out

    def _frames(self, i: int, lo: int, hi: int) -> np.ndarray:
        """Frames lo..hi-1 (in range) of scan i -> float32 (R, hi - lo)."""
        raw = self._rows(self.offsets[i] + lo, self.offsets[i] + hi)
        if raw.dtype == np.float16:  # torch's half -> float cast is vectorised, numpy's is ~15x slower
            raw = torch.from_numpy(raw).float().numpy()
        block = raw.T
        return block + self._roi_means(i) if self.centered else block

    def series(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(self._frames(i, 0, self.length(i)))

    def read(self, i: int, start: int, stop: int) -> np.ndarray:
        n = self.length(i)
        if 0 <= start and stop <= n:
            return self._frames(i, start, stop)
        idx = reflect_indices(start, stop, n)
        lo = int(idx.min())
        return self._frames(i, lo, int(idx.max()) + 1)[:, idx - lo]

    def sample_frames(self, i: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """k random frames of scan i (all of them if it has fewer) -> float32 (R, k)."""
        n = self.length(i)
        if k >= n:
            return self.series(i)
        idx = np.sort(rng.choice(n, size=k, replace=False))
        block = np.concatenate([self._rows(self.offsets[i] + j, self.offsets[i] + j + 1) for j in idx])
        block = block.astype(np.float32).T
        return block + self._roi_means(i) if self.centered else block


def interrupted_store(path) -> str | None:
    """A message when ``path`` is (or is the destination of) a store whose preparation did not
    finish, else None."""
    path = Path(path)
    name = path.name
    if name.startswith(".") and name.endswith(INCOMPLETE_SUFFIX) and path.is_dir():
        final = path.with_name(name[1 : -len(INCOMPLETE_SUFFIX)])
        return (
            f"{path}: a store that 'brainjepa prepare' was still writing when it stopped; use "
            f"{final} once prepared, or prepare it again with --out {final} --overwrite"
        )
    partial = incomplete_path(path)
    if partial.is_dir() and not (path / "store.json").is_file():
        return (
            f"{path}: not prepared: 'brainjepa prepare' was interrupted while writing it (the "
            f"partial store is {partial}); run the prepare command again with --overwrite"
        )
    if path.is_dir() and (path / "data.bin").is_file() and not (path / "store.json").is_file():
        return (
            f"{path}: data.bin without store.json: an interrupted 'brainjepa prepare' (or a copy "
            "that missed store.json); run the prepare command again with --overwrite"
        )
    return None


def open_store(path) -> Store:
    """Open a folder written by :func:`prepare_store`."""
    path = Path(path)
    interrupted = interrupted_store(path)
    if interrupted:
        raise DataError(interrupted)
    if not (path / "store.json").is_file():
        raise DataError(
            f"{path}: not a prepared store (no store.json); create one with brainjepa prepare MANIFEST --out STORE"
        )
    return Store(path)


# scans read whole to fit a per-scan method's statistics (psc, center): enough for quartiles,
# and a UK Biobank-size store is not read end to end before training starts
MAX_SCALER_SCANS = 1000


def fit_scaler(
    cohort: Cohort, indices=None, *, method: str = "robust", max_timepoints: int = 50_000, seed: int = 0
) -> RobustScaler:
    """Fit a :class:`RobustScaler` for normalisation ``method`` on scans ``indices`` (default:
    the training split), each scan first put through the method's per-scan part
    (:func:`brainjepa.transforms.scan_transform`: percent signal change for 'psc', demeaning
    for 'center').

    Each scan contributes an equal share of a ~``max_timepoints`` sample of its frames (for
    'robust' a store reads only those frames; the per-scan methods read the whole scan, so they
    use a seeded sample of at most ``MAX_SCALER_SCANS`` scans, whose quartiles are as precise),
    and the scaler's reservoir keeps the total bounded either way.
    """
    idx = cohort.split_indices("train") if indices is None else np.asarray(indices, dtype=np.int64)
    if len(idx) == 0:
        raise DataError("no training scans to fit the scaling statistics on")
    rng = np.random.default_rng(seed)
    if method != "robust" and len(idx) > MAX_SCALER_SCANS:
        idx = np.sort(rng.choice(idx, size=MAX_SCALER_SCANS, replace=False))
    per_scan = max(1, -(-max_timepoints // len(idx)))

    def frames(i: int) -> np.ndarray:
        if method == "robust" and isinstance(cohort, Store):
            return cohort.sample_frames(i, per_scan, rng)
        try:
            x = scan_transform(cohort.series(i), method)
        except DataError as exc:
            raise DataError(f"{cohort.name(i)}: {exc}") from None
        return _subsample(x, per_scan, rng)

    return RobustScaler(max_timepoints=max_timepoints, seed=seed).fit(frames(int(i)) for i in idx)


def choose_normalization(cohort: Cohort, indices=None, max_scans: int = 20) -> str:
    """The ``auto`` normalisation of a training cohort: 'psc' when its scans look like raw BOLD
    (every ROI's mean well above its fluctuations, checked on up to ``max_scans`` scans spread
    over ``indices``), else 'center' (already centred or scaled data, e.g. denoised XCP-D
    outputs). See docs/method.md, "Recipe"."""
    idx = cohort.split_indices("train") if indices is None else np.asarray(indices, dtype=np.int64)
    pick = idx[np.linspace(0, len(idx) - 1, min(max_scans, len(idx))).round().astype(int)] if len(idx) else idx
    for i in pick:
        x = cohort.series(int(i))
        if not has_raw_baseline(x).all():
            return "center"
    return "psc"


def _subsample(x: np.ndarray, k: int, rng) -> np.ndarray:
    return x if k >= x.shape[1] else x[:, np.sort(rng.choice(x.shape[1], size=k, replace=False))]


@dataclass
class PrepareReport:
    """What :func:`prepare_store` did."""

    out_dir: str
    n_scans: int
    n_rois: int
    total_timepoints: int
    n_bytes: int
    splits: dict[str, int]
    skipped: list[tuple[str, str]]
    report_path: str
    trs: list = field(default_factory=list)

    def summary(self) -> str:
        split = ", ".join(f"{k} {v}" for k, v in self.splits.items())
        known = [t for t in self.trs if t is not None]
        if not known:
            tr = "TR unknown"
        else:
            tr = (
                "TR "
                + _tr_list(known)
                + (f", {len(self.trs) - len(known)} without a TR" if len(known) < len(self.trs) else "")
            )
        text = (
            f"packed {self.n_scans} scans x {self.n_rois} ROIs ({self.total_timepoints} time points, "
            f"{self.n_bytes / 2**20:.1f} MiB; {split}; {tr}) into {self.out_dir}"
        )
        if self.skipped:
            text += f"; skipped {len(self.skipped)} file(s), listed in {self.report_path}"
        return text


def prepare_store(
    manifest_path,
    out_dir,
    *,
    dtype: str = "float32",
    on_error: str = "fail",
    tr: float | None = None,
    orientation: str | None = None,
    variable: str | None = None,
    atlas=None,
    train_fraction: float = 1.0,
    seed: int = 0,
    min_timepoints: int | None = None,
    target_tr: float | None = None,
    max_scaler_timepoints: int = 50_000,
    overwrite: bool = False,
    progress: bool = False,
    tr_source: str = "check",
) -> PrepareReport:
    """Validate every file of a manifest and pack the cohort into a memory-mapped store.

    One pass over the files: each is read, validated (:func:`validate_timeseries`, duplicates,
    ROI count/names) and appended to the store (:func:`pack_store`). Splits come from the
    manifest's ``split`` column, else a random subject-level ``train_fraction`` (the rest 'val');
    the robust-scaling statistics are fitted on the training scans. ``min_timepoints`` (at
    ``target_tr`` when given) rejects scans too short for the window you will train with.
    tr/orientation/variable/atlas apply to files whose manifest row and contents do not say;
    tr_source decides a TR given by both the manifest and the file (see :data:`TR_SOURCES`).

    The store is written to ``OUT.incomplete`` and renamed to ``out_dir`` when complete, so an
    interrupted run never leaves something that looks like a store.
    """
    records, label_names = read_manifest(manifest_path)
    records = _with_defaults(records, variable, atlas, tr_source)
    skipped: list = []
    scans = iter_valid(
        records,
        tr=tr,
        orientation=orientation,
        on_error=on_error,
        min_timepoints=min_timepoints,
        target_tr=target_tr,
        skipped=skipped,
        progress=progress,
    )
    report = pack_store(
        scans,
        out_dir,
        dtype=dtype,
        label_names=label_names,
        train_fraction=train_fraction,
        seed=seed,
        skipped=skipped,
        max_scaler_timepoints=max_scaler_timepoints,
        overwrite=overwrite,
        source=str(manifest_path),
    )
    store = open_store(report.out_dir)
    report_scaling(store, "robust", what="prepare")
    distinct = {round(t, 6) for t in store.trs if t is not None}
    if len(distinct) > 1:
        log.info(
            "the scans have different TRs (%s); pretrain (data.target_tr: auto) resamples every "
            "scan to %g s, the coarsest",
            _tr_list([t for t in store.trs if t is not None]),
            max(distinct),
        )
    return report


def pack_store(
    scans,
    out_dir,
    *,
    dtype: str = "float32",
    label_names: Sequence[str] = (),
    train_fraction: float = 1.0,
    seed: int = 0,
    skipped: list | None = None,
    max_scaler_timepoints: int = 50_000,
    overwrite: bool = False,
    source: str = "the input",
) -> PrepareReport:
    """Write (record, series) pairs, already validated, as a store in ``out_dir``.

    scans: iterable of (:class:`Record`, :class:`TimeSeries`), consumed once, so a generator
    streams a cohort of any size; ``skipped`` is the list the generator fills with (path,
    reason) (read after it is exhausted, for the report). A failure removes the half-written
    store.
    """
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    skipped = skipped if skipped is not None else []
    final = Path(out_dir)
    out = incomplete_path(final)
    if out.exists():
        if not overwrite:
            raise DataError(
                f"{out}: left by an interrupted prepare of {final}; a partial store cannot "
                "be resumed: run the same command with --overwrite to start again"
            )
        shutil.rmtree(out)
    if final.exists() and any(final.iterdir()):
        if not overwrite:
            raise DataError(f"{final}: the output folder exists and is not empty; choose another or pass --overwrite")
        if not (final / "store.json").is_file() and not (final / "data.bin").is_file():
            raise DataError(f"{final}: refusing to overwrite a folder that is not a brainjepa store")
    out.mkdir(parents=True)
    try:
        return _pack(
            scans, out, final, dtype, label_names, train_fraction, seed, skipped, max_scaler_timepoints, source
        )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _pack(
    scans, out: Path, final: Path, dtype, label_names, train_fraction, seed, skipped, max_scaler_timepoints, source
) -> PrepareReport:
    """pack_store's work, in the temporary folder ``out``; renamed to ``final`` at the end."""
    centered = dtype == "float16"
    kept, trs, lengths, means = [], [], [], []
    roi_labels = None
    n_rois = 0
    with open(out / "data.bin", "wb") as f:
        for rec, ts in scans:
            x = ts.data
            if centered:
                mu = x.mean(axis=1, dtype=np.float64).astype(np.float32)
                x = x - mu[:, None]
                if np.abs(x).max() > 6e4:
                    raise DataError(
                        f"{rec.path}: fluctuations up to {np.abs(x).max():.3g} overflow float16; use --dtype float32"
                    )
                means.append(mu)
            f.write(np.ascontiguousarray(x.T, dtype=dtype).tobytes())
            roi_labels, n_rois = roi_labels or ts.roi_labels, ts.n_rois
            kept.append(rec)
            trs.append(ts.tr)
            lengths.append(ts.n_timepoints)
            if rec.levels is None:
                rec.levels = scan_levels(ts.data)
    report_path = out / "skipped.tsv"
    with open(report_path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["path", "problem"])
        w.writerows(skipped)
    if not kept:
        shown = f": {skipped[0][1]}" if skipped else ""
        raise DataError(f"{source}: no usable files; all {len(skipped)} were skipped{shown}")
    if centered:
        np.save(out / "roi_means.npy", np.stack(means))
    labels = _labels_of(kept, label_names)
    splits = _splits_of(kept, train_fraction, seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    meta = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "created_by": f"brainjepa {__version__}",
        "layout": "time-major: data.bin is (total_timepoints, n_rois), scan i at rows offsets[i]:offsets[i]+lengths[i]",
        "dtype": dtype,
        "centered": centered,
        "n_rois": n_rois,
        "total_timepoints": int(sum(lengths)),
        "roi_labels": roi_labels,
        "subjects": [r.subject for r in kept],
        "sessions": [r.session for r in kept],
        "paths": [r.path for r in kept],
        "trs": trs,
        "offsets": offsets.tolist(),
        "lengths": [int(n) for n in lengths],
        "splits": splits,
        "labels": {k: [_json_value(v) for v in a] for k, a in labels.items()},
        "label_types": {k: ("string" if a.dtype == object else "numeric") for k, a in labels.items()},
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "scan_levels": [[float(v) for v in r.levels] for r in kept],
        "normalization": None,
    }
    write_json_atomic(out / "store.json", meta)
    if "train" in splits:
        scaler = fit_scaler(Store(out), max_timepoints=max_scaler_timepoints, seed=seed)
        meta["normalization"] = normalization_to_dict("robust", scaler)
        write_json_atomic(out / "store.json", meta)
    n_bytes = (out / "data.bin").stat().st_size
    move_into_place(out, final)
    counts = {s: splits.count(s) for s in SPLITS if s in splits}
    return PrepareReport(
        str(final),
        len(kept),
        n_rois,
        int(sum(lengths)),
        n_bytes,
        counts,
        skipped,
        str(final / "skipped.tsv"),
        list(trs),
    )


def _json_value(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else float(v)
    return v


# ----------------------------------------------------------------------------- windows


class WindowDataset(torch.utils.data.Dataset):
    """(R, n_timepoints) windows of a cohort, resampled to ``target_tr`` and normalised.

    Item i is scan ``indices[i]``: its series is resampled to ``target_tr`` (when given; every
    scan then needs a TR), a window of ``n_timepoints`` is cut (random when ``train``, else
    centred) and normalised (the fitted methods 'psc', 'center', 'robust' with ``scaler``, the
    store's stored statistics, or a scaler fitted on the cohort's training split; 'zscore' per
    window; 'none'). The random window of
    item i depends only on (seed, epoch, i), so a resumed run sees the same windows: call
    ``set_epoch(epoch)`` at the start of each epoch. Windows are read through
    :meth:`Cohort.read`, so a store streams from disk and only the window (plus the resampling
    filter's margins) is ever loaded.
    """

    def __init__(
        self,
        cohort,
        n_timepoints: int = 160,
        *,
        target_tr: float | None = None,
        train: bool = True,
        normalization: str = "robust",
        scaler: RobustScaler | None = None,
        seed: int = 0,
        indices=None,
    ):
        if normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.cohort = open_cohort(cohort)
        self.n_timepoints = int(n_timepoints)
        self.target_tr = None if target_tr is None else float(target_tr)
        self.train = bool(train)
        self.normalization = normalization
        self.seed = int(seed)
        self.epoch = 0
        self.indices = np.arange(len(self.cohort)) if indices is None else np.asarray(indices, dtype=np.int64)
        self._resamplers: dict[float, WindowResampler] = {}
        self._max_start = np.empty(len(self.indices), dtype=np.int64)
        for k, i in enumerate(self.indices):
            self._max_start[k] = self._check_scan(int(i))
        severity, message = scaling_report(self.cohort, normalization, self.indices, what="dataset")
        if severity in ("error", "warning") and _first_report(self.cohort, normalization, self.indices):
            log.warning(message)  # a dataset built by hand: say it, do not refuse
        self.scaler = None
        if normalization in FITTED_NORMALIZATIONS:
            self.scaler = scaler if scaler is not None else self._default_scaler()
            if len(self.scaler.median_) != self.cohort.n_rois:
                raise DataError(
                    f"the {normalization} scaler has {len(self.scaler.median_)} ROIs, the cohort {self.cohort.n_rois}"
                )

    def _check_scan(self, i: int) -> int:
        """Validate scan i against the window; return the last valid raw start frame."""
        n = self.cohort.length(i)
        name = self.cohort.name(i)
        if self.target_tr is None:
            if n < self.n_timepoints:
                raise DataError(f"{name}: {n} time points, shorter than the window of {self.n_timepoints}")
            return n - self.n_timepoints
        tr = self.cohort.tr(i)
        if tr is None:
            raise DataError(
                f"{name}: no TR known (no RepetitionTime sidecar, tr column or --tr), but "
                f"target_tr={self.target_tr} needs one"
            )
        if resampled_length(n, tr, self.target_tr) < self.n_timepoints:
            raise DataError(
                f"{name}: {n} frames at TR {tr} s give "
                f"{resampled_length(n, tr, self.target_tr)} at TR {self.target_tr} s, "
                f"shorter than the window of {self.n_timepoints}"
            )
        if same_tr(tr, self.target_tr):
            return n - self.n_timepoints
        return n - self._resampler(tr).raw_extent()

    def _resampler(self, tr: float) -> WindowResampler:
        key = round(tr, 9)
        if key not in self._resamplers:
            self._resamplers[key] = WindowResampler(tr, self.target_tr, self.n_timepoints)
        return self._resamplers[key]

    def _default_scaler(self) -> RobustScaler:
        stored = self.cohort.normalization
        if stored and stored.get("method") == self.normalization:
            return normalization_from_dict(stored)[1]
        log.info("fitting %s scaling statistics on the cohort's training split", self.normalization)
        return fit_scaler(self.cohort, method=self.normalization, seed=self.seed)

    def normalization_dict(self) -> dict:
        """The JSON description of this dataset's normalisation (for normalization.json)."""
        return normalization_to_dict(self.normalization, self.scaler)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def start(self, idx: int) -> int:
        """Raw start frame of item ``idx``'s window for the current epoch."""
        hi = int(self._max_start[idx])
        if not self.train:
            return hi // 2
        rng = np.random.default_rng((self.seed, self.epoch, int(idx)))
        return int(rng.integers(0, hi + 1))

    def window(self, idx: int) -> np.ndarray:
        """Item ``idx`` as float32 (R, n_timepoints) numpy array."""
        i = int(self.indices[idx])
        s = self.start(idx)
        tr = self.cohort.tr(i)
        if self.target_tr is None or same_tr(tr, self.target_tr):
            x = self.cohort.read(i, s, s + self.n_timepoints)
        else:
            rs = self._resampler(tr)
            x = rs.apply(self.cohort.read(i, s - rs.margin, s - rs.margin + rs.span))
        return normalize(x, self.normalization, self.scaler)

    def __getitem__(self, idx: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.window(idx), dtype=np.float32))


class NamedSeries(np.ndarray):
    """A scan's (R, T) array that knows where it came from (``source_name``), so that messages
    about it (e.g. from :meth:`brainjepa.bundle.BrainJEPA.prepare`) can name the file."""

    source_name: str | None = None

    @classmethod
    def of(cls, x: np.ndarray, name: str | None) -> NamedSeries:
        out = np.asarray(x).view(cls)
        out.source_name = name
        return out

    def __array_finalize__(self, obj) -> None:
        self.source_name = getattr(obj, "source_name", None)


class CohortSeries:
    """Lazy sequence view of a cohort's raw (R, T_i) series, read one subject at a time (group FC,
    embedding) without holding the cohort in memory."""

    def __init__(self, cohort, index: np.ndarray | None = None):
        self.cohort = cohort
        self.index = np.arange(len(cohort)) if index is None else np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        k = int(self.index[i])
        return NamedSeries.of(self.cohort.series(k), self.cohort.name(k))

    def trs(self) -> list:
        return [self.cohort.tr(int(i)) for i in self.index]


# ----------------------------------------------------------------------------- cohort checks


def _tr_list(trs) -> str:
    counts: dict[float, int] = {}
    for t in trs:
        key = next((k for k in counts if same_tr(k, t)), t)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{t:g} s ({n} scan{'s' if n > 1 else ''})" for t, n in sorted(counts.items()))


def resolve_target_tr(setting, cohort, indices=None) -> float | None:
    """The TR to train at, from ``data.target_tr`` and the TRs of scans ``indices`` (default all).

    ``"auto"``: when every scan shares one TR, that TR; when they differ, the coarsest of them
    (every scan is then resampled to it: downsampling low-passes, never invents frequencies the
    coarser scans lack, and a window spans the same seconds for every subject), said in the log;
    a scan without a known TR in a cohort that needs resampling is an error naming it. When no
    scan has a TR, None (windows are counted in frames). A number is returned as it is; None
    (native TR) is kept, with a warning when the TRs differ.
    """
    idx = np.arange(len(cohort)) if indices is None else np.asarray(indices, dtype=np.int64)
    trs = [cohort.tr(int(i)) for i in idx]
    known = [t for t in trs if t is not None]
    distinct = []
    for t in known:
        if not any(same_tr(t, d) for d in distinct):
            distinct.append(t)
    if setting is None:
        if len(distinct) > 1:
            log.warning(
                "data.target_tr is null: scans are used at their own TRs (%s), so a window "
                "spans different durations in different subjects; set data.target_tr=auto "
                "(or seconds) to resample them to one TR",
                _tr_list(known),
            )
        return None
    if setting != "auto":
        return float(setting)
    if not known:
        log.info(
            "no scan has a known TR: windows are counted in frames (give a TR with --tr, a tr "
            "column or sidecars to train at a defined TR)"
        )
        return None
    missing = [int(i) for i, t in zip(idx, trs) if t is None]
    if missing:
        more = f" (and that of {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(
            f"{cohort.name(missing[0])}: no TR known (no RepetitionTime sidecar, tr column "
            f"or --tr), but other scans have TRs ({_tr_list(known)}), so it cannot be "
            f"aligned with them; give its TR{more}, "
            "or set data.target_tr explicitly"
        )
    target = max(distinct)
    if len(distinct) > 1:
        log.info(
            "data.target_tr auto: the scans have different TRs (%s); resampling every scan to "
            "%g s, the coarsest (set data.target_tr to choose another)",
            _tr_list(known),
            target,
        )
    else:
        log.info("data.target_tr auto: every scan has TR %g s", target)
    return float(target)


PER_SCAN_METHODS = ("zscore", "center", "psc")  # normalisations that remove each scan's offsets


def per_scan_method(raw: bool = False) -> str:
    """The per-scan normalisation to recommend: percent signal change ('psc') for unscaled BOLD
    where available, else per-scan centring ('center', or 'zscore' where that is missing)."""
    if raw and "psc" in NORMALIZATIONS:
        return "psc"
    return "center" if "center" in NORMALIZATIONS else "zscore"


def _default_normalization() -> str:
    from .runs import SCHEMA

    return SCHEMA["data"]["normalization"][0]


def cohort_levels(cohort, indices=None) -> np.ndarray:
    """(N, 2) per scan (level, fluctuation) of scans ``indices`` (default all), from the values
    recorded when the cohort was validated, else computed from the series."""
    idx = np.arange(len(cohort)) if indices is None else np.asarray(indices, dtype=np.int64)
    levels = getattr(cohort, "levels", None)
    if levels is not None and len(levels) == len(cohort):
        return levels[idx]
    return np.array([scan_levels(cohort.series(int(i))) for i in idx], dtype=np.float64).reshape(-1, 2)


def scaling_report(cohort, method: str, indices=None, *, what: str = "pretrain") -> tuple[str, str | None]:
    """(severity, message) about how the cohort's raw scale meets normalisation ``method``.

    severity 'error': unscaled BOLD with ``method`` 'none' (the model would see the scanner's
    arbitrary intensities); 'warning': offsets that differ across scans or sites under 'robust'
    (cohort statistics cannot remove them), or raw BOLD found at ``prepare``; 'info': raw BOLD
    that ``method`` removes (a per-scan method); 'ok' with None when nothing is noticed.
    """
    from .transforms import RAW_OFFSET_RATIO, cohort_offset_problem

    idx = np.arange(len(cohort)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(idx) == 0:
        return "ok", None
    lv = cohort_levels(cohort, idx)
    level, fluct = lv[:, 0], lv[:, 1]
    raw = (level > RAW_OFFSET_RATIO * np.maximum(fluct, 1e-30)) & (level > 1.0)
    names = [cohort.name(int(i)) for i in idx]
    offsets = cohort_offset_problem(level, fluct, names)
    centring = per_scan_method(bool(raw.any()))
    if not raw.any() and offsets is None:
        return "ok", None
    k = int(np.flatnonzero(raw)[0]) if raw.any() else int(np.argmax(level))
    example = (
        f"{int(raw.sum())} of {len(idx)} scans look like unscaled BOLD (e.g. {names[k]}: typical "
        f"ROI mean {level[k]:.3g}, {level[k] / max(fluct[k], 1e-30):.0f}x its fluctuations)"
    )
    found = example if raw.any() else offsets
    if raw.any() and offsets:
        found += "; " + offsets
    if what == "prepare":
        if _default_normalization() == "auto":
            return "warning", (
                f"{found}; the store keeps the values as they are: pretrain's default "
                "data.normalization: auto removes each scan's offset (robust and none "
                "would keep it)"
            )
        return "warning", (
            f"{found}; the store keeps the values as they are: pretrain with "
            f"--set data.normalization={centring} (per-scan) so that each "
            "scan's offset is removed"
        )
    if method == "auto":
        return "info", (f"{found}; data.normalization=auto picks a per-scan method, which removes each scan's offset")
    if method in PER_SCAN_METHODS:
        return "info", f"{found}; the {method} normalisation removes each scan's offset"
    if what == "model":  # embed, probe, ...: the model's normalisation is fixed
        if method == "none":
            return "warning", (
                f"{found}; the model was trained without normalisation, so these "
                "values go in as they are and its features follow the scanner's "
                "intensity"
            )
        if offsets:
            return "warning", (
                f"{offsets}; the model's {method} statistics come from its training "
                "cohort and cannot remove offsets that differ between scans, so "
                "features may follow site rather than subject; a model pretrained with "
                f"per-scan centring (brainjepa pretrain --set data.normalization="
                f"{centring}) removes them"
            )
        return "info", f"{found}; the model's {method} statistics rescale them"
    if method == "none":
        return "error", (
            f"{found}, and data.normalization=none would feed them to the model as they "
            f"are; use --set data.normalization={centring}"
        )
    if offsets:
        return "warning", (
            f"{offsets}; data.normalization={method} scales with statistics pooled over "
            f"the cohort and keeps these offsets as if they were signal: use --set "
            f"data.normalization={centring} to remove each scan's offset"
        )
    return "info", f"{found}; data.normalization={method} rescales them with the cohort's statistics"


def _first_report(cohort, method: str, indices) -> bool:
    """True the first time a (method, scans) pair of this cohort is reported (one message per
    cohort, not one per object built on it)."""
    idx = np.arange(len(cohort)) if indices is None else np.asarray(indices, dtype=np.int64)
    key = (method, len(idx), int(idx.sum()))
    done = cohort.__dict__.setdefault("_scaling_reported", set())
    if key in done:
        return False
    done.add(key)
    return True


def report_scaling(cohort, method: str, indices=None, *, what: str = "pretrain") -> None:
    """Log :func:`scaling_report`'s message at its severity; raise ConfigError for an error."""
    severity, message = scaling_report(cohort, method, indices, what=what)
    if severity != "error" and not _first_report(cohort, method, indices):
        return
    if severity == "error":
        raise ConfigError(message)
    if severity == "warning":
        log.warning(message)
    elif severity == "info":
        log.info(message)


def check_cohort_for_model(model, cohort) -> None:
    """Before embedding, probing or fine-tuning: every scan must have a TR when the model has one,
    and at least one time patch of frames at the model's TR (each refused by name; a scan shorter
    than the model's window is embedded from its valid patches); the cohort's raw scale is
    reported against the model's normalisation (:func:`report_scaling`)."""
    target = getattr(model, "target_tr", None)
    patch = model.config.patch_size
    for i in range(len(cohort)):
        tr = cohort.tr(i)
        frames = cohort.length(i)
        if target is not None:
            if tr is None:
                raise DataError(
                    f"{cohort.name(i)}: no TR known (no RepetitionTime sidecar, tr column "
                    f"or --tr), but the model works at TR {target:g} s and each scan is "
                    "resampled from its own TR; give the TR with --tr or a tr column"
                )
            if not same_tr(tr, target):
                frames = resampled_length(frames, tr, target)
        if frames < patch:
            at = (
                f" at the model's TR {target:g} s (from {cohort.length(i)} at {tr:g} s)"
                if target is not None and not same_tr(tr, target)
                else ""
            )
            raise DataError(
                f"{cohort.name(i)}: {frames} time points{at}, fewer than one time patch "
                f"of the model ({patch}); use a longer scan or leave this one out"
            )
    trs = {round(t, 6) for t in cohort.trs if t is not None}
    if target is not None and len(trs) > 1:
        log.info(
            "the scans have TRs %s; each is resampled from its own TR to the model's %g s",
            _tr_list([t for t in cohort.trs if t is not None]),
            target,
        )
    method = (getattr(model, "normalization", None) or {}).get("method", "unknown")
    if method != "unknown":
        report_scaling(cohort, method, what="model")
