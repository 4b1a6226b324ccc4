"""Packing a cohort into a store (:func:`prepare_store` from a manifest, :func:`pack_store` from
validated scans); the layout is described in :mod:`brainjepa.data.store`."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import ConfigError, DataError
from ..runio import incomplete_path, move_into_place, write_json_atomic
from ..transforms import normalization_to_dict, scan_levels
from .manifest import SPLITS, _labels_of, _splits_of, _with_defaults, read_manifest
from .scaling import fit_scaler, report_scaling
from .store import STORE_FORMAT, STORE_VERSION, Store, open_store
from .timing import _tr_list
from .validate import iter_valid, write_skipped

log = logging.getLogger(__name__)

STORE_DTYPES = ("float32", "float16")  # float16 halves the size; values are stored ROI-centred


@dataclass
class PrepareReport:
    """What :func:`prepare_store` did.

    Attributes:
        out_dir: the store's folder.
        n_scans: scans packed.
        n_rois: ROIs per scan.
        total_timepoints: time points of all scans together.
        n_bytes: size of data.bin.
        splits: split name -> number of scans.
        skipped: (path, reason) of each file left out.
        report_path: the skipped.tsv listing them.
        trs: per-scan TRs in seconds (None where unknown).
    """

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
        """One line for people about the packed store.

        Returns:
            The scans, ROIs, size, splits, TRs, the folder and what was skipped.
        """
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

    One pass over the files: each is read, validated
    (:func:`~brainjepa.data.validate_timeseries`, duplicates, ROI count/names) and appended to
    the store (:func:`pack_store`). Splits come from the manifest's ``split`` column, else a
    random subject-level ``train_fraction`` (the rest 'val'); the robust-scaling statistics are
    fitted on the training scans. The store is written to ``OUT.incomplete`` and renamed to
    ``out_dir`` when complete, so an interrupted run never leaves something that looks like a
    store.

    Args:
        manifest_path: the manifest CSV/TSV.
        out_dir: the store's folder.
        dtype: 'float32', or 'float16' of each scan's ROI-centred values.
        on_error: 'fail' or 'skip' (bad files are listed in the report and skipped.tsv).
        tr: a TR in seconds for files whose manifest row and contents do not give one.
        orientation: the orientation for files that do not give one.
        variable: the array's name in .npz/.mat/.h5 files, where the manifest does not give it.
        atlas: the label image for NIfTI files, where the manifest does not give it.
        train_fraction: the share of subjects in the training split when the manifest has no
            ``split`` column.
        seed: seed of that split and of the scaling statistics' sample.
        min_timepoints: rejects scans shorter than this (the window you will train with).
        target_tr: the TR (seconds) ``min_timepoints`` is counted at.
        max_scaler_timepoints: about how many frames the scaling statistics are fitted on.
        overwrite: replace an existing store (or the remains of an interrupted one).
        progress: show a progress bar.
        tr_source: which TR wins when the manifest and a file both give one (see
            :data:`~brainjepa.data.TR_SOURCES`).

    Returns:
        What was done, as a :class:`PrepareReport`.

    Raises:
        DataError: an unreadable manifest, a bad file with on_error='fail', no usable file, or
            an output folder that may not be overwritten.
        ConfigError: an unknown dtype, on_error or tr_source.
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
    """Write (record, series) pairs, already validated, as a store.

    A failure removes the half-written store.

    Args:
        scans: iterable of (:class:`~brainjepa.data.Record`, :class:`~brainjepa.io.TimeSeries`),
            consumed once, so a generator streams a cohort of any size.
        out_dir: the store's folder.
        dtype: 'float32', or 'float16' of each scan's ROI-centred values.
        label_names: the records' label columns to keep.
        train_fraction: the share of subjects in the training split when the records have no
            split.
        seed: seed of that split and of the scaling statistics' sample.
        skipped: the list the generator fills with (path, reason), read after it is exhausted,
            for the report.
        max_scaler_timepoints: about how many frames the scaling statistics are fitted on.
        overwrite: replace an existing store (or the remains of an interrupted one).
        source: what the scans came from, for messages.

    Returns:
        What was done, as a :class:`PrepareReport`.

    Raises:
        ConfigError: an unknown dtype.
        DataError: no usable scan, a float16 overflow, or an output folder that may not be
            overwritten.
    """
    if dtype not in STORE_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
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
    write_skipped(out / "skipped.tsv", skipped)
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
