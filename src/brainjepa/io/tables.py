"""Delimited text tables (CSV/TSV/TXT, optionally gzipped): the XCP-D/fMRIPrep layout (a header
of parcel names, one row per volume), the UK Biobank layout (a ``label_name`` column, one column
per volume), and a bare matrix; reading and writing."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np

from ..errors import DataError
from .series import TimeSeries, _check_uniform, _orient, decode_text

_TIME_COLUMNS = ("time", "onset", "frame_time", "frame_times", "acq_time", "volume_timing")
_UKB_LABEL_COLUMNS = ("label_name", "label", "roi", "roi_name", "region", "parcel")


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


def _write_table(path: Path, data: np.ndarray, labels: list[str], suffix: str, layout: str | None) -> None:
    """Write (R, T) ``data`` as CSV/TSV in the XCP-D layout or the UK Biobank one (see
    :func:`brainjepa.io.write_timeseries`)."""
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
