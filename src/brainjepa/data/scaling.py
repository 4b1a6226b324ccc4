"""Normalisation choices for a cohort: the scaling statistics (:func:`fit_scaler`), the ``auto``
method (:func:`choose_normalization`), both resolved once for a training run
(:func:`resolve_normalization`, :func:`stored_or_fitted_scaler`), and the report on how a
cohort's raw scale meets a method (:func:`scaling_report`, :func:`report_scaling`)."""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ConfigError, DataError
from ..transforms import (
    FITTED_NORMALIZATIONS,
    NORMALIZATIONS,
    RAW_OFFSET_RATIO,
    RobustScaler,
    cohort_offset_problem,
    has_raw_baseline,
    normalization_from_dict,
    scan_levels,
    scan_transform,
)
from .cohort import Cohort
from .store import Store

log = logging.getLogger(__name__)

# the data.normalization of the pretraining configuration when it does not set one: 'auto'
# (percent signal change for raw BOLD, else per-scan centring; see choose_normalization)
DEFAULT_NORMALIZATION = "auto"
PER_SCAN_METHODS = ("zscore", "center", "psc")  # normalisations that remove each scan's offsets
# scans read whole to fit a per-scan method's statistics (psc, center): enough for quartiles,
# and a UK Biobank-size store is not read end to end before training starts
MAX_SCALER_SCANS = 1000


def fit_scaler(
    cohort: Cohort, indices=None, *, method: str = "robust", max_timepoints: int = 50_000, seed: int = 0
) -> RobustScaler:
    """Fit the scaling statistics of a normalisation method on a cohort's scans.

    Each scan is first put through the method's per-scan part
    (:func:`brainjepa.transforms.scan_transform`: percent signal change for 'psc', demeaning
    for 'center'). Each scan contributes an equal share of a ~``max_timepoints`` sample of its
    frames (for 'robust' a store reads only those frames; the per-scan methods read the whole
    scan, so they use a seeded sample of at most :data:`MAX_SCALER_SCANS` scans, whose quartiles
    are as precise), and the scaler's reservoir keeps the total bounded either way.

    Args:
        cohort: the cohort.
        indices: the scans to fit on (default: the training split).
        method: the normalisation ('robust', 'psc', 'center').
        max_timepoints: about how many frames to fit on in all.
        seed: seed of the frame and scan samples.

    Returns:
        The fitted :class:`~brainjepa.transforms.RobustScaler`.

    Raises:
        DataError: there are no scans to fit on, or a scan cannot be transformed.
    """
    idx = cohort.split_indices("train") if indices is None else np.asarray(indices, dtype=np.int64)
    if len(idx) == 0:
        raise DataError("no training scans to fit the scaling statistics on")
    rng = np.random.default_rng(seed)
    if method != "robust" and len(idx) > MAX_SCALER_SCANS:
        idx = np.sort(rng.choice(idx, size=MAX_SCALER_SCANS, replace=False))
    per_scan = max(1, -(-max_timepoints // len(idx)))

    def frames(i: int) -> np.ndarray:
        if method == "robust" and isinstance(cohort, Store):
            return cohort.sample_frames(i, per_scan, rng)
        try:
            x = scan_transform(cohort.series(i), method)
        except DataError as exc:
            raise DataError(f"{cohort.name(i)}: {exc}") from None
        return _subsample(x, per_scan, rng)

    return RobustScaler(max_timepoints=max_timepoints, seed=seed).fit(frames(int(i)) for i in idx)


def choose_normalization(cohort: Cohort, indices=None, max_scans: int = 20) -> str:
    """The ``auto`` normalisation of a training cohort (see docs/method.md, "Recipe").

    Args:
        cohort: the cohort.
        indices: the training scans (default: the training split).
        max_scans: how many scans, spread over ``indices``, are checked.

    Returns:
        'psc' when the checked scans look like raw BOLD (every ROI's mean well above its
        fluctuations), else 'center' (already centred or scaled data, e.g. denoised XCP-D
        outputs).
    """
    idx = cohort.split_indices("train") if indices is None else np.asarray(indices, dtype=np.int64)
    pick = idx[np.linspace(0, len(idx) - 1, min(max_scans, len(idx))).round().astype(int)] if len(idx) else idx
    for i in pick:
        x = cohort.series(int(i))
        if not has_raw_baseline(x).all():
            return "center"
    return "psc"


def stored_or_fitted_scaler(cohort: Cohort, method: str, indices=None, *, seed: int = 0) -> RobustScaler:
    """The scaling statistics of a fitted method: the cohort's stored ones (a prepared store's)
    when they are for ``method`` and the cohort's ROI count, else fitted (:func:`fit_scaler`).

    Args:
        cohort: the cohort.
        method: a fitted normalisation ('psc', 'center', 'robust').
        indices: the scans to fit on (default: the training split).
        seed: seed of :func:`fit_scaler`'s samples.

    Returns:
        The :class:`~brainjepa.transforms.RobustScaler`.
    """
    stored = cohort.normalization
    if stored and stored.get("method") == method and len(stored.get("median", [])) == cohort.n_rois:
        return normalization_from_dict(stored)[1]
    log.info("fitting %s scaling statistics on the cohort's training split", method)
    return fit_scaler(cohort, indices, method=method, seed=seed)


def resolve_normalization(
    cohort: Cohort, method: str, indices=None, *, seed: int = 0
) -> tuple[str, RobustScaler | None]:
    """The normalisation a training run uses, resolved once: ``auto`` chosen
    (:func:`choose_normalization`, logged) and a fitted method's statistics
    (:func:`stored_or_fitted_scaler`).

    Args:
        cohort: the cohort.
        method: data.normalization, one of :data:`brainjepa.transforms.NORMALIZATIONS` or 'auto'.
        indices: the training scans (default: the training split).
        seed: seed of :func:`fit_scaler`'s samples.

    Returns:
        (method, scaler): the method, never 'auto', and its statistics (None for a method
        without them).
    """
    if method == "auto":
        method = choose_normalization(cohort, indices)
        log.info(
            "data.normalization auto: %s (%s)",
            method,
            "the scans look like raw BOLD" if method == "psc" else "the scans are centred or scaled",
        )
    scaler = stored_or_fitted_scaler(cohort, method, indices, seed=seed) if method in FITTED_NORMALIZATIONS else None
    return method, scaler


def _subsample(x: np.ndarray, k: int, rng) -> np.ndarray:
    return x if k >= x.shape[1] else x[:, np.sort(rng.choice(x.shape[1], size=k, replace=False))]


def per_scan_method(raw: bool = False) -> str:
    """The per-scan normalisation to recommend.

    Args:
        raw: whether the data look like unscaled BOLD.

    Returns:
        Percent signal change ('psc') for unscaled BOLD where available, else per-scan
        centring ('center', or 'zscore' where that is missing).
    """
    if raw and "psc" in NORMALIZATIONS:
        return "psc"
    return "center" if "center" in NORMALIZATIONS else "zscore"


def cohort_levels(cohort, indices=None) -> np.ndarray:
    """The raw scale of a cohort's scans.

    Args:
        cohort: the cohort.
        indices: the scans (default: all).

    Returns:
        (N, 2) float64 per scan (level, fluctuation) (see
        :func:`brainjepa.transforms.scan_levels`), from the values recorded when the cohort was
        validated, else computed from the series.
    """
    idx = np.arange(len(cohort)) if indices is None else np.asarray(indices, dtype=np.int64)
    levels = getattr(cohort, "levels", None)
    if levels is not None and len(levels) == len(cohort):
        return levels[idx]
    return np.array([scan_levels(cohort.series(int(i))) for i in idx], dtype=np.float64).reshape(-1, 2)


def scaling_report(cohort, method: str, indices=None, *, what: str = "pretrain") -> tuple[str, str | None]:
    """How a cohort's raw scale meets a normalisation method.

    Args:
        cohort: the cohort.
        method: the normalisation ('auto', 'psc', 'center', 'zscore', 'robust', 'none').
        indices: the scans (default: all).
        what: who asks: 'pretrain', 'prepare', 'dataset' or 'model' (a trained model's fixed
            normalisation, for embed, probe, ...); it changes the advice.

    Returns:
        (severity, message). Severity 'error': unscaled BOLD with ``method`` 'none' (the model
        would see the scanner's arbitrary intensities); 'warning': offsets that differ across
        scans or sites under 'robust' (cohort statistics cannot remove them), or raw BOLD found
        at ``prepare``; 'info': raw BOLD that ``method`` removes (a per-scan method); 'ok' with
        None when nothing is noticed.
    """
    idx = np.arange(len(cohort)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(idx) == 0:
        return "ok", None
    lv = cohort_levels(cohort, idx)
    level, fluct = lv[:, 0], lv[:, 1]
    raw = (level > RAW_OFFSET_RATIO * np.maximum(fluct, 1e-30)) & (level > 1.0)
    names = [cohort.name(int(i)) for i in idx]
    offsets = cohort_offset_problem(level, fluct, names)
    centring = per_scan_method(bool(raw.any()))
    if not raw.any() and offsets is None:
        return "ok", None
    k = int(np.flatnonzero(raw)[0]) if raw.any() else int(np.argmax(level))
    example = (
        f"{int(raw.sum())} of {len(idx)} scans look like unscaled BOLD (e.g. {names[k]}: typical "
        f"ROI mean {level[k]:.3g}, {level[k] / max(fluct[k], 1e-30):.0f}x its fluctuations)"
    )
    found = example if raw.any() else offsets
    if raw.any() and offsets:
        found += "; " + offsets
    if what == "prepare":
        if DEFAULT_NORMALIZATION == "auto":
            return "warning", (
                f"{found}; the store keeps the values as they are: pretrain's default "
                "data.normalization: auto removes each scan's offset (robust and none "
                "would keep it)"
            )
        return "warning", (
            f"{found}; the store keeps the values as they are: pretrain with "
            f"--set data.normalization={centring} (per-scan) so that each "
            "scan's offset is removed"
        )
    if method == "auto":
        return "info", (f"{found}; data.normalization=auto picks a per-scan method, which removes each scan's offset")
    if method in PER_SCAN_METHODS:
        return "info", f"{found}; the {method} normalisation removes each scan's offset"
    if what == "model":  # embed, probe, ...: the model's normalisation is fixed
        if method == "none":
            return "warning", (
                f"{found}; the model was trained without normalisation, so these "
                "values go in as they are and its features follow the scanner's "
                "intensity"
            )
        if offsets:
            return "warning", (
                f"{offsets}; the model's {method} statistics come from its training "
                "cohort and cannot remove offsets that differ between scans, so "
                "features may follow site rather than subject; a model pretrained with "
                f"per-scan centring (brainjepa pretrain --set data.normalization="
                f"{centring}) removes them"
            )
        return "info", f"{found}; the model's {method} statistics rescale them"
    if method == "none":
        return "error", (
            f"{found}, and data.normalization=none would feed them to the model as they "
            f"are; use --set data.normalization={centring}"
        )
    if offsets:
        return "warning", (
            f"{offsets}; data.normalization={method} scales with statistics pooled over "
            f"the cohort and keeps these offsets as if they were signal: use --set "
            f"data.normalization={centring} to remove each scan's offset"
        )
    return "info", f"{found}; data.normalization={method} rescales them with the cohort's statistics"


def _first_report(cohort, method: str, indices) -> bool:
    """True the first time a (method, scans) pair of this cohort is reported (one message per
    cohort, not one per object built on it)."""
    idx = np.arange(len(cohort)) if indices is None else np.asarray(indices, dtype=np.int64)
    key = (method, len(idx), int(idx.sum()))
    done = cohort.__dict__.setdefault("_scaling_reported", set())
    if key in done:
        return False
    done.add(key)
    return True


def report_scaling(cohort, method: str, indices=None, *, what: str = "pretrain") -> None:
    """Log :func:`scaling_report`'s message at its severity, once per cohort and method.

    Args:
        cohort: the cohort.
        method: the normalisation.
        indices: the scans (default: all).
        what: who asks (see :func:`scaling_report`).

    Raises:
        ConfigError: the report is an error.
    """
    severity, message = scaling_report(cohort, method, indices, what=what)
    if severity != "error" and not _first_report(cohort, method, indices):
        return
    if severity == "error":
        raise ConfigError(message)
    if severity == "warning":
        log.warning(message)
    elif severity == "info":
        log.info(message)
