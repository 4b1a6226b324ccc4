"""The :class:`TimeSeries` every reader returns, the supported suffixes, and the checks and
conversions that all formats share (orientation, float32, TR values, uniform time axes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

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


@dataclass
class TimeSeries:
    """One subject's parcellated series.

    Attributes:
        data: float32 (R, T) array, R regions of interest by T volumes.
        roi_labels: R names, or None when the file does not name its ROIs.
        tr: repetition time in seconds, or None when unknown.
        path: the file the series was read from, or None.
    """

    data: np.ndarray
    roi_labels: list[str] | None = None
    tr: float | None = None
    path: str | None = None

    @property
    def n_rois(self) -> int:
        """Number of ROIs (rows of ``data``)."""
        return int(self.data.shape[0])

    @property
    def n_timepoints(self) -> int:
        """Number of volumes (columns of ``data``)."""
        return int(self.data.shape[1])


def file_suffix(path: str | Path) -> str:
    """The format suffix of a file name.

    Args:
        path: a file name or path.

    Returns:
        The suffix from :data:`SUFFIXES` ('.tsv.gz', '.npy', ...) in lower case, '' if unknown.
    """
    name = Path(path).name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def is_timeseries_file(path: str | Path) -> bool:
    """Whether ``path`` has a suffix that :func:`brainjepa.io.read_timeseries` reads.

    Args:
        path: a file name or path.

    Returns:
        True for a supported suffix.
    """
    return file_suffix(path) != ""


def decode_text(raw: bytes, path, what: str = "file") -> str:
    """UTF-8 text of a file's bytes, a leading byte-order mark dropped.

    Args:
        raw: the file's bytes.
        path: the file, for messages.
        what: what the file is, for messages ('file', 'manifest').

    Returns:
        The decoded text.

    Raises:
        DataError: a byte is not UTF-8 (the message names the line and the byte).
    """
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        byte = raw[exc.start : exc.start + 1].hex()
        raise DataError(
            f"{path}, line {line}: byte 0x{byte} is not UTF-8 text; save the {what} as "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8 OLD > NEW)"
        ) from None


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


def _labels_or_none(labels, n: int, path) -> list[str] | None:
    if labels is None:
        return None
    labels = [str(s).strip() for s in np.asarray(labels, dtype=object).reshape(-1)]
    if len(labels) != n:
        raise DataError(f"{path}: {len(labels)} ROI labels for {n} ROIs")
    return labels
