"""Opening a cohort from any source: a prepared store, a folder (with or without a manifest), a
manifest file, or a list of arrays (:func:`open_cohort`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from ..io import TimeSeries
from .cohort import ArrayCohort, Cohort, FileCohort
from .manifest import (
    _MANIFEST_NAMES,
    Record,
    _folder_records,
    _labels_of,
    _looks_like_manifest,
    _splits_of,
    _with_defaults,
    read_manifest,
)
from .store import interrupted_store, open_store
from .validate import iter_valid


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
    n_rois: int | None = None,
    roi_labels: list[str] | None = None,
    reference: str | None = None,
) -> Cohort:
    """Open a cohort from any source.

    Files are read and validated once here; their arrays are kept in memory when they total at
    most ``cache_bytes``, else read again on demand.

    Args:
        path_or_list: a prepared store folder (has store.json); a folder with a
            manifest.csv/.tsv; a folder of time-series files (one scan each, subjects from BIDS
            names or stems); a manifest CSV/TSV (has a 'path' column); a list of (R, T) arrays
            or :class:`~brainjepa.io.TimeSeries`; or a :class:`Cohort` (returned as it is).
        tr: a TR in seconds for files that do not give one.
        orientation: the orientation for files (or arrays) that do not give one.
        on_error: 'fail' or 'skip' (skipped files are listed in ``.skipped``).
        labels: name -> (N,) arrays, for a list input.
        variable: the array's name in .npz/.mat/.h5 files, where the manifest does not give it.
        atlas: the label image for NIfTI files, where the manifest does not give it.
        cache_bytes: the most bytes of series kept in memory.
        tr_source: which TR wins when a manifest's tr column and a file disagree ('check':
            neither, an error; 'manifest'; 'file').
        n_rois: the ROI count every file must have, e.g. a model's (default: the first usable
            file's); not applied to a prepared store.
        roi_labels: the ROI names every file that names its ROIs must have (default: the first
            usable file's that names them).
        reference: what set ``n_rois`` and ``roi_labels``, for messages (e.g. "the model").

    Returns:
        A :class:`~brainjepa.data.Store`, an :class:`ArrayCohort` or a :class:`FileCohort`.

    Raises:
        DataError: the source is not a cohort, or no file in it is usable.
    """
    if isinstance(path_or_list, Cohort):
        return path_or_list
    if isinstance(path_or_list, (list, tuple)):
        return _array_cohort(path_or_list, tr, orientation, on_error, labels, n_rois, roi_labels, reference)
    path = Path(path_or_list)
    if path.is_dir() and (path / "store.json").is_file():
        return open_store(path)
    records, label_names = cohort_records(path, variable=variable, atlas=atlas, tr_source=tr_source)
    skipped: list = []
    kept, arrays, total = [], [], 0
    expect = dict(n_rois=n_rois, roi_labels=roi_labels, reference=reference)
    names = None  # the first file's that names its ROIs
    for rec, ts in iter_valid(records, tr=tr, orientation=orientation, on_error=on_error, skipped=skipped, **expect):
        names = names or ts.roi_labels
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
        roi_labels=names,
        labels=_labels_of(recs, label_names),
        splits=_splits_of(recs, 1.0, 0),
        skipped=skipped,
        levels=[r.levels for r in recs],
    )
    if arrays is not None:
        return ArrayCohort(arrays, **meta)
    return FileCohort(recs, tr=tr, orientation=orientation, lengths=[k[2][1] for k in kept], **meta)


def cohort_records(path, *, variable: str | None = None, atlas=None, tr_source: str = "check"):
    """The scans a folder or manifest lists, without reading them.

    Args:
        path: a folder with a manifest.csv/.tsv, a folder of time-series files, or a manifest
            CSV/TSV (has a 'path' column). A prepared store is not a list of records: open it
            with :func:`open_cohort`.
        variable: the array's name in .npz/.mat/.h5 files, where the manifest does not give it.
        atlas: the label image for NIfTI files, where the manifest does not give it.
        tr_source: which TR wins when a manifest's tr column and a file disagree.

    Returns:
        (records in listed order, label column names).

    Raises:
        DataError: an interrupted store, an empty or malformed manifest, a single time-series
            file, or a path that does not exist.
    """
    path = Path(path)
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
    elif path.is_file() and (_looks_like_manifest(path) or _is_blank_table(path)):
        records, label_names = read_manifest(path)  # an empty one is refused as such
    elif path.is_file():
        raise DataError(
            f"{path}: a single time-series file is not a cohort; pass its folder, a manifest "
            "(CSV/TSV with a 'path' column) or a prepared store"
        )
    else:
        raise DataError(f"{path}: no such file or folder")
    return _with_defaults(records, variable, atlas, tr_source), label_names


def _is_blank_table(path: Path) -> bool:
    """A .csv/.tsv file with nothing but white space: an empty manifest, not a time series."""
    if path.suffix.lower() not in (".csv", ".tsv"):
        return False
    try:
        with open(path, "rb") as f:
            return not f.read(1 << 16).strip()
    except OSError:
        return False


def _array_cohort(items, tr, orientation, on_error, labels, n_rois=None, roi_labels=None, reference=None) -> Cohort:
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
    expect = dict(n_rois=n_rois, roi_labels=roi_labels, reference=reference)
    good = list(iter_valid(records, on_error=on_error, skipped=skipped, **expect))
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
