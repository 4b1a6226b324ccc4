"""The :class:`Cohort` interface (subjects' raw (R, T_i) series with TRs, labels and ROI names)
with its in-memory and file-backed forms, and lazy views of a cohort's series."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..transforms import reflect_indices
from .manifest import Record


class Cohort:
    """Subjects' raw (R, T_i) series with TRs, labels and ROI names.

    Subclasses say where the series come from by implementing :meth:`series`.

    Args:
        subjects: per-scan subject identifiers.
        trs: per-scan TRs in seconds (None where unknown).
        lengths: per-scan numbers of time points.
        n_rois: R, the number of ROIs of every scan.
        roi_labels: R names, or None.
        labels: label name -> (N,) array.
        sessions: per-scan sessions (default: None each).
        paths: per-scan source files (default: None each).
        splits: per-scan 'train'/'val'/'test' (default: 'train' each).
        skipped: (path, reason) of files left out (on_error='skip').
        normalization: stored robust statistics (a prepared store), or None.
        levels: per-scan (level, fluctuation) of the raw series (see
            :func:`brainjepa.transforms.scan_levels`), or None.
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
        """The raw series of a scan (no resampling, no scaling).

        Args:
            i: the scan's index.

        Returns:
            float32 (R, T_i).
        """
        raise NotImplementedError

    def read(self, i: int, start: int, stop: int) -> np.ndarray:
        """A stretch of frames of a scan, mirror-padded where it runs past the ends.

        Args:
            i: the scan's index.
            start: the first frame (may be negative).
            stop: one past the last frame (may exceed the scan's length).

        Returns:
            float32 (R, stop - start).
        """
        x = self.series(i)
        return x[:, reflect_indices(start, stop, x.shape[1])]

    def tr(self, i: int) -> float | None:
        """The TR of a scan.

        Args:
            i: the scan's index.

        Returns:
            The TR in seconds, or None when unknown.
        """
        return self.trs[i]

    def length(self, i: int) -> int:
        """The number of time points of a scan.

        Args:
            i: the scan's index.

        Returns:
            T_i, in the scan's own TR.
        """
        return int(self.lengths[i])

    def split_indices(self, split: str) -> np.ndarray:
        """Indices of the scans in a split.

        Args:
            split: 'train', 'val' or 'test'.

        Returns:
            int64 indices, in cohort order.
        """
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)

    def name(self, i: int) -> str:
        """A scan's name for messages.

        Args:
            i: the scan's index.

        Returns:
            Its source file, else its subject.
        """
        return self.paths[i] or self.subjects[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} scans, {self.n_rois} ROIs, labels={sorted(self.labels)})"


class ArrayCohort(Cohort):
    """A cohort held in memory (a list of arrays, or files small enough to cache).

    Args:
        arrays: the (R, T_i) series.
        **meta: the other arguments of :class:`Cohort` (``lengths`` comes from the arrays).
    """

    def __init__(self, arrays: Sequence[np.ndarray], **meta):
        self._arrays = list(arrays)
        super().__init__(lengths=[a.shape[1] for a in self._arrays], **meta)

    def series(self, i: int) -> np.ndarray:
        """The array of a scan, as given (no copy).

        Args:
            i: the scan's index.

        Returns:
            (R, T_i).
        """
        return self._arrays[i]


class FileCohort(Cohort):
    """A cohort of files read on demand (validated once when opened).

    Args:
        records: the scans' records.
        tr: a TR in seconds for files that do not give one.
        orientation: the orientation for files that do not give one.
        **meta: the arguments of :class:`Cohort`.
    """

    def __init__(self, records: Sequence[Record], tr=None, orientation=None, **meta):
        self._records = list(records)
        self._tr, self._orientation = tr, orientation
        super().__init__(**meta)

    def series(self, i: int) -> np.ndarray:
        """Read a scan's file.

        Args:
            i: the scan's index.

        Returns:
            float32 (R, T_i).
        """
        return self._records[i].read(self._tr, self._orientation).data


class CohortSubset(Cohort):
    """Some scans of a cohort, in a given order (the others left out, e.g. unusable for a model).

    Args:
        cohort: the cohort.
        index: the scans to keep, by their index in ``cohort``.
        skipped: (path, reason) of the scans left out, added to ``cohort.skipped``.
    """

    def __init__(self, cohort: Cohort, index, skipped=()):
        self.parent = cohort
        self.index = np.asarray(index, dtype=np.int64)
        idx = [int(i) for i in self.index]
        super().__init__(
            subjects=[cohort.subjects[i] for i in idx],
            trs=[cohort.trs[i] for i in idx],
            lengths=cohort.lengths[self.index],
            n_rois=cohort.n_rois,
            roi_labels=cohort.roi_labels,
            labels={k: np.asarray(v)[self.index] for k, v in cohort.labels.items()},
            sessions=[cohort.sessions[i] for i in idx],
            paths=[cohort.paths[i] for i in idx],
            splits=[cohort.splits[i] for i in idx],
            skipped=list(cohort.skipped) + list(skipped),
            normalization=cohort.normalization,
            levels=None if cohort.levels is None else cohort.levels[self.index],
        )

    def series(self, i: int) -> np.ndarray:
        """The raw series of a kept scan.

        Args:
            i: the scan's index in this subset.

        Returns:
            float32 (R, T_i).
        """
        return self.parent.series(int(self.index[i]))

    def name(self, i: int) -> str:
        """A kept scan's name for messages.

        Args:
            i: the scan's index in this subset.

        Returns:
            Its name in the full cohort.
        """
        return self.parent.name(int(self.index[i]))


class NamedSeries(np.ndarray):
    """A scan's (R, T) array that knows where it came from (``source_name``).

    Messages about it (e.g. from :meth:`brainjepa.bundle.BrainJEPA.prepare`) can then name the
    file.
    """

    source_name: str | None = None

    @classmethod
    def of(cls, x: np.ndarray, name: str | None) -> NamedSeries:
        """A view of ``x`` named ``name``.

        Args:
            x: the (R, T) array.
            name: where it came from, or None.

        Returns:
            The view (no copy).
        """
        out = np.asarray(x).view(cls)
        out.source_name = name
        return out

    def __array_finalize__(self, obj) -> None:
        self.source_name = getattr(obj, "source_name", None)


class CohortSeries:
    """Lazy sequence view of a cohort's raw (R, T_i) series, read one subject at a time.

    For group FC and embedding without holding the cohort in memory.


    Args:
        cohort: the cohort.
        index: the scans to show, in order (default: all).
    """

    def __init__(self, cohort, index: np.ndarray | None = None):
        self.cohort = cohort
        self.index = np.arange(len(cohort)) if index is None else np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        k = int(self.index[i])
        return NamedSeries.of(self.cohort.series(k), self.cohort.name(k))

    def trs(self) -> list:
        """The TRs of the viewed scans.

        Returns:
            One TR in seconds per viewed scan, in order (None where unknown).
        """
        return [self.cohort.tr(int(i)) for i in self.index]
