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

Modules: :mod:`~brainjepa.io.series` (the :class:`TimeSeries` type, suffixes and the checks all
formats share), :mod:`~brainjepa.io.bids` (BIDS names, JSON sidecars), :mod:`~brainjepa.io.tables`
(CSV/TSV), :mod:`~brainjepa.io.arrays` (npy/npz/mat/h5), :mod:`~brainjepa.io.nifti` (NIfTI +
atlas); this module dispatches on the suffix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import BrainJEPAError, DataError
from .arrays import _read_h5, _read_mat, _read_npy, _read_npz, _write_h5, _write_mat, _write_npz
from .bids import _tr_from_sidecar, atlas_name, bids_entities, read_sidecar, sidecar_path
from .nifti import _read_nifti
from .series import ORIENTATIONS, SUFFIXES, TimeSeries, _positive_tr, decode_text, file_suffix, is_timeseries_file
from .tables import _read_text, _write_table

__all__ = [
    "ORIENTATIONS",
    "SUFFIXES",
    "TimeSeries",
    "atlas_name",
    "bids_entities",
    "decode_text",
    "file_suffix",
    "is_timeseries_file",
    "read_sidecar",
    "read_timeseries",
    "sidecar_path",
    "write_timeseries",
]


def read_timeseries(
    path,
    *,
    orientation: str | None = None,
    tr: float | None = None,
    variable: str | None = None,
    atlas=None,
) -> TimeSeries:
    """Read one subject's parcellated series from any supported file.

    Args:
        path: a .npy/.npz/.csv/.tsv(.gz)/.txt(.gz)/.mat/.h5/.nii(.gz) file.
        orientation: None (from headers and format conventions, see the module docstring),
            'roi-by-time' or 'time-by-roi'.
        tr: repetition time in seconds; overrides the file's own.
        variable: name of the array inside a .npz/.mat/.h5 file.
        atlas: label image (path or nibabel image) for NIfTI input.

    Returns:
        A :class:`TimeSeries` with float32 (R, T) data.

    Raises:
        DataError: naming the file, for anything unreadable.
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
    ``roi_labels``/``tr``/``orientation`` attributes.

    Args:
        path: the file to write; its folder is created.
        ts_or_array: a :class:`TimeSeries` or an (R, T) array.
        roi_labels: R names (default: the series' own, else roi000, roi001, ...).
        tr: repetition time in seconds (default: the series' own).
        layout: 'xcpd' or 'ukb' for CSV/TSV (default: 'xcpd' for TSV, 'ukb' for CSV).
        sidecar: write the TR to a BIDS JSON sidecar (``RepetitionTime``); default: for the
            formats that cannot hold it (npy, tsv, csv).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: the array is not 2-D, or the suffix or layout is not supported.
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
        _write_npz(path, data, labels, tr)
    elif suffix in (".tsv", ".tsv.gz", ".csv", ".csv.gz"):
        _write_table(path, data, labels, suffix, layout)
    elif suffix == ".mat":
        _write_mat(path, data, labels, tr)
    elif suffix in (".h5", ".hdf5"):
        _write_h5(path, data, labels, tr)
    else:
        raise DataError(f"{path}: cannot write this file type; use .npy, .npz, .tsv, .csv, .mat or .h5")
    if tr is not None and (sidecar if sidecar is not None else needs_sidecar):
        with open(sidecar_path(path), "w") as f:
            json.dump({"RepetitionTime": float(tr)}, f)
    return path
