"""Which scans a model can use: the ordered list of scans a command was given (:class:`ScanList`,
read one at a time), the checks of one scan against a model (:func:`check_scan`), and
``--on-error skip`` for a whole cohort (:func:`open_inputs`, :func:`usable_cohort`).

A scan is unusable for a model when it cannot be read, holds NaN/Inf or absurd values, has
another ROI count (or other ROI names) than the model, has no TR where the model needs one, is
shorter than one time patch at the model's TR, or is on a scale the model's normalisation cannot
bring to its training range. With ``on_error="fail"`` the first such scan stops the command with
a message naming it; with ``"skip"`` it is left out, logged and listed (file, problem) in a TSV
next to the output (:func:`skipped_path`, :func:`~brainjepa.data.write_skipped`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data import (
    ON_ERROR,
    ArrayCohort,
    Cohort,
    CohortSubset,
    NamedSeries,
    Record,
    check_cohort_for_model,
    check_scan_for_model,
    cohort_records,
    duplicate_records,
    open_cohort,
    scaling_report,
    subject_from_path,
    validate_timeseries,
)
from ..data.manifest import _labels_of  # label columns typed as open_cohort types them
from ..errors import ConfigError, DataError
from ..io import TimeSeries
from .features import subject_windows

log = logging.getLogger(__name__)

MODEL_REFERENCE = "the model"  # what sets the ROI count and names scans are checked against


def check_on_error(on_error: str) -> str:
    """A checked ``on_error`` choice.

    Args:
        on_error: 'fail' or 'skip' (:data:`~brainjepa.data.ON_ERROR`).

    Returns:
        ``on_error``.

    Raises:
        ConfigError: another value.
    """
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def skipped_path(out: str | Path) -> Path:
    """Where the list of scans an output left out goes: next to it, ``NAME.skipped.tsv``.

    Args:
        out: the output file (``emb.npz``, ``results.json``).

    Returns:
        ``emb.skipped.tsv`` for ``emb.npz``.
    """
    out = Path(out)
    return out.with_name(f"{out.stem if out.suffix else out.name}.skipped.tsv")


def check_scan(model, ts: TimeSeries) -> None:
    """Check one scan against a model before it is encoded.

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA`.
        ts: the scan (its ``path`` names it in messages).

    Raises:
        DataError: naming the scan: NaN/Inf or absurd values, all-zero or constant ROIs,
            another ROI count or other ROI names than the model's, no TR where the model has
            one, fewer frames than one time patch at the model's TR.
    """
    validate_timeseries(ts, n_rois=model.config.n_rois, roi_labels=model.roi_labels, reference=MODEL_REFERENCE)
    check_scan_for_model(model, ts.path or "series", ts.tr, ts.n_timepoints)


def check_scale(model, series: NamedSeries, tr: float | None, windows: str) -> None:
    """Prepare a scan's windows once, to find out whether the model's normalisation accepts it.

    Args:
        model: the model.
        series: the raw (R, T) series, named.
        tr: its TR in seconds.
        windows: as it will be encoded: 'all' or 'center' (:func:`~brainjepa.evaluate.features.subject_windows`),
            or 'input': the one full-length centre window of :meth:`BrainJEPA.prepare` (what
            fine-tuning trains on; a scan shorter than the window is refused).

    Raises:
        DataError: what :meth:`BrainJEPA.prepare_windows` / :meth:`BrainJEPA.prepare` raise.
    """
    with warnings.catch_warnings():  # the real pass warns; this one only looks for errors
        warnings.simplefilter("ignore")
        if windows == "input":
            model.prepare(series, tr=tr)
        else:
            subject_windows(model, series, tr=tr, windows=windows)


class ScanList:
    """The scans a command was given, in order, read one at a time.

    Opening it reads only the manifest (or the store's index): nothing is read or validated
    until :meth:`read`, so a cohort of any size is listed at once and each process of a job
    reads only its own scans.

    Args:
        records: the scans as manifest records, or None for ``cohort``.
        label_names: the records' label columns.
        cohort: a cohort (a prepared store, or arrays from Python) instead of records.
        tr: a TR in seconds for files that do not give one.
        orientation: the orientation of files that do not give one.
        source: what the list came from, for messages and the job's fingerprint.
    """

    def __init__(
        self,
        records: Sequence[Record] | None = None,
        label_names: Sequence[str] = (),
        *,
        cohort: Cohort | None = None,
        tr: float | None = None,
        orientation: str | None = None,
        source: str = "the input",
    ):
        if (records is None) == (cohort is None):
            raise ConfigError("ScanList needs records or a cohort, not both")
        self.records = None if records is None else list(records)
        self.cohort = cohort
        self.label_names = list(label_names)
        self.tr, self.orientation, self.source = tr, orientation, source
        if self.records is not None:
            self.subjects = [r.subject for r in self.records]
            self.names = [r.path for r in self.records]
            self.duplicates = duplicate_records(self.records)
        else:
            self.subjects = list(cohort.subjects)
            self.names = [cohort.name(i) for i in range(len(cohort))]
            self.duplicates = {}

    @classmethod
    def open(
        cls,
        data,
        *,
        tr: float | None = None,
        orientation: str | None = None,
        tr_source: str = "check",
    ) -> ScanList:
        """The scans of ``--data``.

        Args:
            data: a manifest, a folder, a prepared store, several time-series files (subjects
                from their names), or a :class:`~brainjepa.data.Cohort`.
            tr: a TR in seconds for files that do not give one.
            orientation: the orientation of files that do not give one.
            tr_source: which TR wins when a manifest's tr column and a file disagree.

        Returns:
            The list.

        Raises:
            DataError: what :func:`~brainjepa.data.cohort_records` raises.
        """
        if isinstance(data, Cohort):
            return cls(cohort=data, source="the cohort")
        paths = [data] if isinstance(data, (str, Path)) else list(data)
        if len(paths) == 1:
            path = Path(paths[0])
            if path.is_dir() and (path / "store.json").is_file():
                return cls(cohort=open_cohort(path), source=str(path))
            records, labels = cohort_records(path, tr_source=tr_source)
            return cls(records, labels, tr=tr, orientation=orientation, source=str(path))
        records = []
        for p in paths:
            subject, session = subject_from_path(p)
            records.append(Record(path=str(p), subject=subject, session=session, tr_source=tr_source))
        return cls(records, tr=tr, orientation=orientation, source=f"{len(paths)} files")

    def __len__(self) -> int:
        return len(self.subjects)

    def read(self, i: int) -> TimeSeries:
        """Read one scan (not yet checked: see :func:`check_scan`).

        Args:
            i: its position in the list.

        Returns:
            The series, named by its file (or subject).

        Raises:
            DataError: an unreadable file, a TR that disagrees with the manifest's, or a
                repeat of an earlier scan of the list.
        """
        if i in self.duplicates:
            raise DataError(self.duplicates[i])
        if self.records is not None:
            return self.records[i].read(self.tr, self.orientation)
        c = self.cohort
        return TimeSeries(np.asarray(c.series(i), dtype=np.float32), c.roi_labels, c.tr(i), c.name(i))

    def labels(self, index: Sequence[int]) -> dict[str, np.ndarray]:
        """The label columns of some scans.

        Args:
            index: their positions in the list.

        Returns:
            {name: (len(index),) array}, numeric columns as numbers (as
            :func:`~brainjepa.data.open_cohort` gives them).
        """
        index = [int(i) for i in index]
        if self.records is not None:
            return _labels_of([self.records[i] for i in index], self.label_names)
        return {k: np.asarray(v)[index] for k, v in self.cohort.labels.items()}

    def identity(self) -> dict:
        """What the list is, for a job's fingerprint: the scans in order and how they are read.

        Returns:
            {"source", "n_scans", "sha256"}: the sha256 of every scan's file, subject, session,
            TR and reading options in order (of a prepared store: of its store.json).
        """
        h = hashlib.sha256()
        if self.records is not None:
            rows = [
                [r.path, r.subject, r.session, r.tr, r.tr_source, r.orientation, r.variable, r.atlas]
                for r in self.records
            ]
            h.update(json.dumps([rows, self.tr, self.orientation]).encode())
        elif getattr(self.cohort, "path", None) is not None and (Path(self.cohort.path) / "store.json").is_file():
            h.update((Path(self.cohort.path) / "store.json").read_bytes())
        else:
            c = self.cohort
            rows = [[c.subjects[i], c.sessions[i], c.name(i), c.tr(i), c.length(i)] for i in range(len(c))]
            h.update(json.dumps(rows).encode())
        return {"source": self.source, "n_scans": len(self), "sha256": h.hexdigest()}


def open_inputs(
    data,
    *,
    tr: float | None = None,
    orientation: str | None = None,
    tr_source: str = "check",
    on_error: str = "fail",
    model=None,
) -> Cohort:
    """A cohort from ``--data``, with unreadable or invalid files skipped when asked.

    Args:
        data: one path (manifest, folder, store) or several time-series files (subjects from
            their names).
        tr: a TR in seconds for files that do not give one.
        orientation: the orientation of files that do not give one.
        tr_source: which TR wins when a manifest's tr column and a file disagree.
        on_error: 'fail' or 'skip' (the skipped files are in ``.skipped``).
        model: when given, every file must have its ROI count and names.

    Returns:
        The cohort.

    Raises:
        DataError: with 'fail' the first bad file; no usable file.
    """
    check_on_error(on_error)
    if isinstance(data, Cohort):
        return data
    expect = {}
    if model is not None:
        expect = dict(n_rois=model.config.n_rois, roi_labels=model.roi_labels, reference=MODEL_REFERENCE)
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    if len(paths) == 1:
        options = dict(tr=tr, orientation=orientation, tr_source=tr_source, on_error=on_error)
        return open_cohort(paths[0], **options, **expect)
    scans = ScanList.open(paths, tr=tr, orientation=orientation, tr_source=tr_source)
    series, skipped = [], []
    for i in range(len(scans)):
        try:
            series.append(scans.read(i))
        except DataError as exc:
            if on_error == "fail":
                raise
            log.warning("skipping %s", exc)
            skipped.append((scans.names[i], str(exc)))
    if not series:
        raise DataError(f"no usable files: all {len(skipped)} were skipped; the first: {skipped[0][1]}")
    cohort = open_cohort(series, on_error=on_error, **expect)
    cohort.subjects = [subject_from_path(p)[0] for p in cohort.paths]
    cohort.sessions = [subject_from_path(p)[1] for p in cohort.paths]
    cohort.skipped = skipped + cohort.skipped
    return cohort


def usable_cohort(model, cohort: Cohort, on_error: str = "fail", windows: str = "all") -> Cohort:
    """The scans of a cohort a model can use, checked before any slow work.

    Each scan is checked for its TR and length at the model's TR (and, with ``skip``, prepared
    once as it will be encoded, to find scans on a scale the model refuses); then the cohort's
    scale is reported against the model's normalisation (:func:`~brainjepa.data.check_cohort_for_model`).

    Args:
        model: the model.
        cohort: the cohort (its ROI count must be the model's).
        on_error: 'fail': the first unusable scan raises; 'skip': unusable scans are left out,
            logged and added to ``.skipped`` of the cohort returned.
        windows: the windows the command will encode: 'all', 'center' or 'input' (see
            :func:`check_scale`).

    Returns:
        ``cohort`` itself when every scan is usable, else a
        :class:`~brainjepa.data.CohortSubset` of the usable ones.

    Raises:
        DataError: with 'fail', naming the first unusable scan; a cohort of another ROI count
            than the model's; no usable scan.
    """
    check_on_error(on_error)
    if cohort.n_rois != model.config.n_rois:
        raise DataError(
            f"{cohort.name(0)}: {cohort.n_rois} ROIs, but the model was trained with {model.config.n_rois}; "
            "use data in the model's parcellation"
        )
    keep, skipped = [], []
    for i in range(len(cohort)):
        try:
            check_scan_for_model(model, cohort.name(i), cohort.tr(i), cohort.length(i))
            if on_error == "skip":
                check_scale(model, NamedSeries.of(cohort.series(i), cohort.name(i)), cohort.tr(i), windows)
        except DataError as exc:
            if on_error == "fail":
                raise
            log.warning("skipping %s", exc)
            skipped.append((cohort.name(i), str(exc)))
            continue
        keep.append(i)
    if not keep:
        raise DataError(f"no usable scans: all {len(skipped)} were skipped; the first: {skipped[0][1]}")
    out = cohort if not skipped else CohortSubset(cohort, keep, skipped)
    check_cohort_for_model(model, out)
    return out


def report_batch_scale(model, batch, noted: set) -> None:
    """The cohort-level scale report of :func:`~brainjepa.data.check_cohort_for_model` for a
    batch of scans read one batch at a time: an error stops, a warning or note is logged once.

    Args:
        model: the model (its normalisation).
        batch: (named series, TR) of the batch's scans.
        noted: severities already logged by this process (updated).

    Raises:
        ConfigError: the scans cannot go into the model as they are (see
            :func:`~brainjepa.data.scaling_report`).
    """
    method = (model.normalization or {}).get("method", "unknown")
    if method == "unknown" or not batch:
        return
    view = ArrayCohort(
        [x for x, _ in batch],
        subjects=[str(k) for k in range(len(batch))],
        trs=[tr for _, tr in batch],
        n_rois=batch[0][0].shape[0],
        paths=[getattr(x, "source_name", None) for x, _ in batch],
    )
    severity, message = scaling_report(view, method, what="model")
    if severity == "error":
        raise ConfigError(message)
    if message and severity not in noted:
        noted.add(severity)
        (log.warning if severity == "warning" else log.info)("%s (seen in a batch of %d scans)", message, len(batch))
