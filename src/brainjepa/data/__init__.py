"""Cohorts, manifests, validation, the packed memory-mapped store, and the window Dataset.

A :class:`Cohort` is a list of subjects' (R, T_i) series with their TRs, labels and ROI names,
whatever it was read from: a list of arrays, a folder of files, a manifest, or a prepared store.
:func:`open_cohort` opens any of them; :func:`prepare_store` packs a manifest into a store;
:class:`WindowDataset` turns a cohort into (R, n_timepoints) training or evaluation windows.

Modules, lowest first: ``manifest`` (the CSV/TSV cohort description, :class:`Record`),
``validate`` (checks of each scan), ``cohort`` (the :class:`Cohort` classes and views),
``store`` (the memory-mapped :class:`Store` and its layout), ``sources`` (:func:`open_cohort`),
``scaling`` (scaling statistics, the ``auto`` normalisation, scale reports), ``timing`` (the TR
to train at, checks against a model), ``prepare`` (writing a store), ``windows``
(:class:`WindowDataset`). Every public name is importable from ``brainjepa.data``.
"""

from __future__ import annotations

from .cohort import ArrayCohort, Cohort, CohortSeries, CohortSubset, FileCohort, NamedSeries
from .manifest import SPLITS, TR_SOURCES, Record, read_manifest, sidecar_or_file, subject_from_path
from .manifest import _looks_like_manifest as _looks_like_manifest  # used by the gradients command
from .prepare import PrepareReport, pack_store, prepare_store
from .scaling import (
    DEFAULT_NORMALIZATION,
    MAX_SCALER_SCANS,
    PER_SCAN_METHODS,
    choose_normalization,
    cohort_levels,
    fit_scaler,
    per_scan_method,
    report_scaling,
    resolve_normalization,
    scaling_report,
    stored_or_fitted_scaler,
)
from .sources import cohort_records, open_cohort
from .store import STORE_FORMAT, STORE_VERSION, Store, interrupted_store, open_store
from .timing import check_cohort_for_model, check_scan_for_model, resolve_target_tr
from .validate import ON_ERROR, duplicate_records, iter_valid, validate_timeseries, write_skipped
from .windows import WindowDataset

__all__ = [
    "DEFAULT_NORMALIZATION",
    "MAX_SCALER_SCANS",
    "ON_ERROR",
    "PER_SCAN_METHODS",
    "SPLITS",
    "STORE_FORMAT",
    "STORE_VERSION",
    "TR_SOURCES",
    "ArrayCohort",
    "Cohort",
    "CohortSeries",
    "CohortSubset",
    "FileCohort",
    "NamedSeries",
    "PrepareReport",
    "Record",
    "Store",
    "WindowDataset",
    "check_cohort_for_model",
    "check_scan_for_model",
    "choose_normalization",
    "cohort_records",
    "duplicate_records",
    "cohort_levels",
    "fit_scaler",
    "interrupted_store",
    "iter_valid",
    "open_cohort",
    "open_store",
    "pack_store",
    "per_scan_method",
    "prepare_store",
    "read_manifest",
    "report_scaling",
    "resolve_normalization",
    "resolve_target_tr",
    "scaling_report",
    "sidecar_or_file",
    "stored_or_fitted_scaler",
    "subject_from_path",
    "validate_timeseries",
    "write_skipped",
]
