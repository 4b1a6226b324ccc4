"""Manifests: the CSV/TSV description of a cohort, one :class:`Record` per scan.

Manifest (CSV or TSV, one row per scan)
    ``path`` (required; relative paths are resolved against the manifest's folder), ``subject``
    (default: the BIDS ``sub-`` entity or the file stem), ``session``, ``tr`` (seconds; default:
    the file's own), ``split`` (train/val/test), per-file reading options ``orientation``,
    ``variable``, ``atlas``; every other column is a label (numeric columns become int64 or
    float64 arrays with NaN for blanks, anything else an object array of strings).

A folder of time-series files without a manifest gives one record per file. Records also carry
the cohort-wide reading defaults and the rule for a TR given by both the manifest and the file.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..io import (
    TimeSeries,
    bids_entities,
    decode_text,
    file_suffix,
    is_timeseries_file,
    read_sidecar,
    read_timeseries,
    sidecar_path,
)
from ..transforms import same_tr

SPLITS = ("train", "val", "test")
_RESERVED = ("path", "subject", "session", "tr", "split", "orientation", "variable", "atlas")
_MANIFEST_NAMES = ("manifest.csv", "manifest.tsv")
# where a scan's TR comes from when the manifest's tr column and the file (or its sidecar) both
# give one: 'check' (default) refuses a disagreement, 'manifest' or 'file' picks that source
TR_SOURCES = ("check", "manifest", "file")


@dataclass
class Record:
    """One scan to read: where, who, and how.

    Attributes:
        path: the file.
        subject: subject identifier.
        session: session identifier, or None.
        tr: repetition time in seconds given for the file (the manifest's tr column), or None.
        split: 'train', 'val', 'test' or None.
        orientation: the file's orientation when it cannot be told from the file, or None.
        variable: the array's name inside a .npz/.mat/.h5 file, or None.
        atlas: the label image for a NIfTI file, or None.
        labels: label column -> the value in this row.
        source: "MANIFEST, line N" for records read from a manifest, for messages.
        tr_source: which TR wins when the manifest and the file disagree (one of
            :data:`TR_SOURCES`).
        levels: (level, fluctuation) of the series, set when validated.
    """

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
        """Read the scan's series.

        A TR in this record (the manifest's tr column) and one in the file or its sidecar must
        agree unless ``tr_source`` picks one.

        Args:
            tr: a TR in seconds for a file that has none of its own and no tr in this record.
            orientation: the orientation to use when this record does not give one.

        Returns:
            The series, with its TR resolved.

        Raises:
            DataError: the file is unreadable, or its TR disagrees with this record's under
                ``tr_source`` 'check'.
        """
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
    """Where a file's own TR was read from, for messages.

    Args:
        path: the data file.

    Returns:
        The path of its JSON sidecar when that holds a TR, else "the file itself".
    """
    side = sidecar_path(path)
    meta = read_sidecar(path) if side.is_file() else {}
    return (
        str(side)
        if any(k in meta for k in ("RepetitionTime", "SamplingFrequency", "VolumeTiming"))
        else "the file itself"
    )


def subject_from_path(path: str | Path) -> tuple[str, str | None]:
    """Subject and session of a scan from its file name.

    Args:
        path: the data file.

    Returns:
        (subject, session) from the BIDS ``sub-``/``ses-`` entities, else (file stem, None).
    """
    ent = bids_entities(path)
    if "sub" in ent:
        return f"sub-{ent['sub']}", (f"ses-{ent['ses']}" if "ses" in ent else None)
    name = Path(path).name
    return name[: len(name) - len(file_suffix(name))] or name, None


def read_manifest(path) -> tuple[list[Record], list[str]]:
    """Parse a manifest CSV/TSV (see the module docstring for its columns).

    Args:
        path: the manifest file.

    Returns:
        (records, label column names); relative paths are resolved against the manifest's
        folder, and TRs and splits are checked.

    Raises:
        DataError: naming the line, for an unreadable or malformed manifest.
    """
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


def _looks_like_manifest(path: Path) -> bool:
    if path.suffix.lower() not in (".csv", ".tsv"):
        return False
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 16).decode("utf-8-sig", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    return "path" in [c.strip().strip('"') for c in first.replace("\t", ",").split(",")]


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
