"""Validation of scans: one series against the cohort (:func:`validate_timeseries`), and a
stream of manifest records read, checked and deduplicated (:func:`iter_valid`)."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..io import TimeSeries
from ..transforms import magnitude_problem, resampled_length, scan_levels
from .manifest import Record

log = logging.getLogger(__name__)

ON_ERROR = ("fail", "skip")
SKIPPED_COLUMNS = ("path", "problem")  # the header of every skipped.tsv


def write_skipped(path, skipped) -> Path:
    """Write the list of skipped files as a TSV (``path``, ``problem``), for people.

    Args:
        path: the .tsv file to write.
        skipped: (file, reason) pairs, in order.

    Returns:
        ``path``, as a Path.
    """
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(SKIPPED_COLUMNS)
        w.writerows(skipped)
    return path


def validate_timeseries(
    ts: TimeSeries,
    *,
    n_rois: int | None = None,
    roi_labels: list[str] | None = None,
    min_timepoints: int | None = None,
    target_tr: float | None = None,
    reference: str | None = None,
) -> None:
    """Check that a series is usable.

    Checks: finite values; no all-zero or constant ROI; ROI count (and names, when both sides
    have them) equal to the cohort's; at least ``min_timepoints`` points after resampling to
    ``target_tr`` (or at the native TR).

    Args:
        ts: the series.
        n_rois: the cohort's ROI count, or None to skip the check.
        roi_labels: the cohort's ROI names, or None to skip the check.
        min_timepoints: the shortest usable length, or None to skip the check.
        target_tr: the TR (seconds) the length is counted at, or None for the native TR.
        reference: the file that set the cohort's ROI count and names, for messages.

    Raises:
        DataError: naming ``ts.path``, for the first problem found.
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
    n_rois: int | None = None,
    roi_labels: list[str] | None = None,
    reference: str | None = None,
) -> Iterator[tuple[Record, TimeSeries]]:
    """Read and validate every record, yielding the good ones.

    The first good file sets the cohort's ROI count and names, unless they are given (e.g. a
    model's). Duplicate (subject, session) pairs and files listed twice are errors.

    Args:
        records: the scans to read.
        tr: a TR in seconds for files that do not give one.
        orientation: the orientation for files that do not give one.
        on_error: 'fail' (the first bad file raises) or 'skip' (bad files are logged and
            appended to ``skipped``).
        min_timepoints: the shortest usable length (see :func:`validate_timeseries`).
        target_tr: the TR the length is counted at.
        skipped: list that receives (path, reason) of each skipped file.
        progress: show a progress bar.
        n_rois: the ROI count every file must have (default: the first good file's).
        roi_labels: the ROI names every file that names its ROIs must have (default: the first
            good file's that names them).
        reference: what set ``n_rois`` and ``roi_labels``, for messages (e.g. "the model").

    Yields:
        (record, series) for each good file; ``record.levels`` is set.

    Raises:
        ConfigError: ``on_error`` is not one of :data:`ON_ERROR`.
        DataError: with on_error='fail', for the first bad file.
    """
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    skipped = skipped if skipped is not None else []
    seen: dict[tuple, Record] = {}
    seen_files: dict[str, Record] = {}
    if progress:
        records = tqdm(records, desc="reading", unit="file")
    for rec in records:
        try:
            key, file_key = (rec.subject, rec.session), _file_key(rec.path)
            problem = duplicate_problem(rec, seen.get(key), seen_files.get(file_key))
            if problem:
                raise DataError(problem)
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
        seen[key] = rec
        seen_files[file_key] = rec
        rec.levels = scan_levels(ts.data)
        yield rec, ts


def duplicate_problem(rec: Record, same_scan: Record | None, same_file: Record | None) -> str | None:
    """What is wrong with a record that repeats an earlier one.

    Args:
        rec: the record.
        same_scan: an earlier record with the same (subject, session), or None.
        same_file: an earlier record of the same file, or None.

    Returns:
        The message naming both, or None when neither is given.
    """
    if same_scan is not None:
        sess = f", session {rec.session}" if rec.session else ""
        return (
            f"{rec.path}: duplicate subject {rec.subject}{sess} (also in {same_scan.path}); "
            "give each scan a unique subject/session or remove one"
        )
    if same_file is not None:
        return (
            f"{rec.source or rec.path}: {rec.path} is listed twice (also for "
            f"subject {same_file.subject}{', ' + same_file.source if same_file.source else ''}); "
            "list each scan once"
        )
    return None


def duplicate_records(records: Sequence[Record]) -> dict[int, str]:
    """The records that repeat an earlier one's (subject, session) or file, from the list alone.

    Args:
        records: the scans, in order (the first of each repeat is kept).

    Returns:
        {index of a repeat: :func:`duplicate_problem`'s message}.
    """
    seen: dict[tuple, Record] = {}
    seen_files: dict[str, Record] = {}
    out = {}
    for i, rec in enumerate(records):
        key, file_key = (rec.subject, rec.session), _file_key(rec.path)
        problem = duplicate_problem(rec, seen.get(key), seen_files.get(file_key))
        if problem:
            out[i] = problem
            continue
        seen[key], seen_files[file_key] = rec, rec
    return out


def _file_key(path) -> str:
    """A file's identity for duplicate checks (the resolved path when it exists)."""
    p = Path(path)
    try:
        return str(p.resolve()) if p.exists() else os.path.normpath(str(p.absolute()))
    except OSError:
        return str(p)
