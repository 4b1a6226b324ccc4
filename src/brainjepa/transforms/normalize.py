"""Normalisation of (R, T) series.

``psc``: each scan's ROIs become percent signal change (x / mean - 1, per ROI, per window),
then each ROI is divided by its robust spread (IQR) over the training cohort. ``center``:
each scan's ROIs are demeaned, then scaled the same way. Both remove per-scan intensity
offsets (scanner, site, coil) and keep amplitude differences between subjects; ``psc`` also
removes the per-scan intensity *scale*, and needs raw BOLD (positive ROI means well above
their fluctuations). ``zscore``: per sample, per ROI (removes amplitude too). ``robust``:
the authors' per ROI (x - median) / IQR over the cohort, without per-scan centring (kept
for their checkpoint; on raw data the model then mostly sees per-scan ROI offsets).
``none``. The per-scan part of ``psc``, ``center`` and ``zscore`` takes its mean (and std) from
the whole scan (scope ``scan``, the default: a window keeps its level relative to its scan,
which is where brain states show) or from the window itself (scope ``window``: every window is
centred on its own mean). Fitted statistics live in a :class:`RobustScaler` and are stored with the model;
:func:`normalization_to_dict` is the JSON description written as ``normalization.json``.
See docs/method.md for the measurements behind the default.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import ConfigError, DataError

NORMALIZATIONS = ("psc", "center", "zscore", "robust", "none")
# methods with per-ROI statistics fitted on the training cohort (a RobustScaler)
FITTED_NORMALIZATIONS = ("psc", "center", "robust")
# psc needs every ROI's mean this many of its standard deviations above zero (raw BOLD is
# ~100 std above; demeaned or z-scored data is ~0)
PSC_MIN_MEAN_TO_STD = 3.0
# where the per-scan part takes its statistics: the whole scan, or each window on its own
SCOPES = ("scan", "window")
PER_SCAN_METHODS = ("psc", "center", "zscore")


def scan_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each ROI's mean and std over a whole scan, for the ``scan`` scope.

    Args:
        x: (..., R, T) series of one scan.

    Returns:
        ``(mean, std)``, each (..., R, 1) float64.
    """
    x = np.asarray(x, dtype=np.float64)
    return x.mean(axis=-1, keepdims=True), x.std(axis=-1, keepdims=True)


def zscore(x: np.ndarray, eps: float = 1e-8, stats: tuple | None = None) -> np.ndarray:
    """Per-sample z-scoring: each ROI to zero mean and unit std over time.

    A constant ROI becomes zeros (its std is floored at ``eps``).

    Args:
        x: (..., R, T) series.
        eps: the smallest std divided by.
        stats: the (mean, std) to use (:func:`scan_statistics` of the whole scan); default:
            those of ``x``.

    Returns:
        (..., R, T) float32.
    """
    x = np.asarray(x, dtype=np.float32)
    if stats is None:
        mean, std = x.mean(axis=-1, keepdims=True), x.std(axis=-1, keepdims=True)
    else:
        mean, std = (np.asarray(v, dtype=np.float32) for v in stats)
    return ((x - mean) / np.maximum(std, eps)).astype(np.float32, copy=False)


def has_raw_baseline(x: np.ndarray) -> np.ndarray:
    """Per ROI: is its mean clearly positive next to its fluctuations (raw BOLD)?

    Percent signal change needs such a baseline to divide by.

    Args:

        x: (..., R, T) series.

    Returns:
        (..., R) bool: mean over time > :data:`PSC_MIN_MEAN_TO_STD` times the std over time.
    """
    return x.mean(axis=-1) > PSC_MIN_MEAN_TO_STD * x.std(axis=-1)


def percent_signal_change(x: np.ndarray, stats: tuple | None = None) -> np.ndarray:
    """Percent signal change per ROI: 100 * (x / mean - 1), the mean taken over time.

    Args:
        x: (..., R, T) raw BOLD.
        stats: the (mean, std) to use (:func:`scan_statistics` of the whole scan); default:
            those of ``x``.

    Returns:
        (..., R, T) float32.

    Raises:
        DataError: an ROI's mean is not clearly positive (:func:`has_raw_baseline`; the series is
            already centred or scaled), since dividing by it would blow the noise up.
    """
    x = np.asarray(x, dtype=np.float32)
    if stats is None:
        mean, bad = x.mean(axis=-1, keepdims=True), ~has_raw_baseline(x)
    else:
        mean = np.asarray(stats[0], dtype=np.float32)
        bad = ~(stats[0] > PSC_MIN_MEAN_TO_STD * stats[1])[..., 0]
    if bad.any():
        raise DataError(
            f"normalization 'psc' needs raw BOLD (every ROI's mean well above its fluctuations), "
            f"but {int(bad.sum())} ROI(s) have a mean near or below zero (typical |mean| "
            f"{float(np.median(np.abs(mean))):.3g}): the series looks centred or scaled already; "
            "use normalization 'center' or 'zscore' for it"
        )
    return (100.0 * (x / mean - 1.0)).astype(np.float32, copy=False)


def scan_transform(x: np.ndarray, method: str, stats: tuple | None = None) -> np.ndarray:
    """The per-scan part of a normalisation, before any cohort statistics.

    Args:
        x: (..., R, T) series of one scan.
        method: ``"psc"`` (percent signal change), ``"center"`` (demean each ROI over time), or
            any other method (nothing to do per scan).
        stats: the (mean, std) of the whole scan (:func:`scan_statistics`) when ``x`` is a
            window of it (scope ``scan``); default: those of ``x`` itself.

    Returns:
        (..., R, T) float32.

    Raises:
        DataError: ``"psc"`` on a series that is not raw BOLD (:func:`percent_signal_change`).
    """
    if method == "psc":
        return percent_signal_change(x, stats)
    x = np.asarray(x, dtype=np.float32)
    if method == "center":
        mean = x.mean(axis=-1, keepdims=True) if stats is None else np.asarray(stats[0], dtype=np.float32)
        return x - mean
    return x


class RobustScaler:
    """Per-ROI robust scaling (x - median) / IQR, fitted on training series.

    ``fit`` streams over the series and keeps a uniform reservoir sample of at most
    ``max_timepoints`` time points (whole R-vectors; Vitter's algorithm R), so a cohort never has
    to be in memory at once; the medians and quartiles of 50,000 time points are within about
    0.01 IQR of the full-cohort values. When the cohort has fewer time points the statistics are
    exact. Learned: ``median_`` (R,), ``iqr_`` (R,), ``n_timepoints_seen_``.

    Args:
        max_timepoints: the size of the reservoir sample, in time points.
        seed: the seed of the reservoir sampling.
    """

    def __init__(self, max_timepoints: int = 50_000, seed: int = 0):
        self.max_timepoints = int(max_timepoints)
        self.seed = seed

    def fit(self, series: Iterable[np.ndarray]) -> RobustScaler:
        """Fit the per-ROI median and IQR on a stream of series.

        Args:
            series: iterable of (R, T_i) arrays (any T_i, the same R); read once.

        Returns:
            This scaler, fitted.

        Raises:
            DataError: no series, series with different numbers of ROIs, or an ROI with zero IQR.
        """
        rng = np.random.default_rng(self.seed)
        reservoir = None
        seen = 0
        for x in series:
            x = np.asarray(x, dtype=np.float32)
            if reservoir is None:
                reservoir = np.empty((self.max_timepoints, x.shape[0]), dtype=np.float32)
            elif x.shape[0] != reservoir.shape[1]:
                raise DataError(f"RobustScaler.fit: a series has {x.shape[0]} ROIs, the first had {reservoir.shape[1]}")
            frames = x.T
            fill = min(max(self.max_timepoints - seen, 0), len(frames))
            reservoir[seen : seen + fill] = frames[:fill]
            rest = frames[fill:]
            if len(rest):  # item j (0-based, global) replaces a random slot with prob M / (j + 1)
                j = seen + fill + np.arange(len(rest))
                slots = rng.integers(0, j + 1)
                keep = slots < self.max_timepoints
                reservoir[slots[keep]] = rest[keep]  # numpy assigns in order, so later items win
            seen += len(frames)
        if reservoir is None or seen == 0:
            raise DataError("RobustScaler.fit: no training series to fit the scaling statistics on")
        sample = reservoir[: min(seen, self.max_timepoints)]
        q25, med, q75 = np.percentile(sample, [25, 50, 75], axis=0)
        iqr = q75 - q25
        flat = np.flatnonzero(~(iqr > 0))
        if len(flat):
            raise DataError(
                f"RobustScaler.fit: {len(flat)} ROI(s) have zero interquartile range over the training "
                f"set (ROI indices {flat[:10].tolist()}{'...' if len(flat) > 10 else ''}); they are "
                "constant or nearly so: drop them from the parcellation or use normalization='zscore'"
            )
        self.median_ = med.astype(np.float32)
        self.iqr_ = iqr.astype(np.float32)
        self.n_timepoints_seen_ = int(seen)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Scale per ROI: (x - median) / IQR.

        Args:
            x: (..., R, T) series with the fitted number of ROIs.

        Returns:
            (..., R, T) float32.

        Raises:
            ConfigError: the scaler is not fitted.
            DataError: the number of ROIs differs from the fitted one.
        """
        if not hasattr(self, "median_"):
            raise ConfigError("RobustScaler is not fitted: call fit(...) or load it with from_dict(...)")
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-2] != len(self.median_):
            raise DataError(f"the data has {x.shape[-2]} ROIs but the robust scaler was fitted on {len(self.median_)}")
        return (x - self.median_[:, None]) / self.iqr_[:, None]

    def to_dict(self, method: str = "robust") -> dict:
        """The JSON description of a fitted normalisation (:func:`normalization_to_dict`).

        Args:
            method: the normalisation these statistics belong to (``"psc"``, ``"center"`` or
                ``"robust"``).

        Returns:
            The dict written as normalization.json.
        """
        return normalization_to_dict(method, self)

    @classmethod
    def from_dict(cls, d: dict) -> RobustScaler:
        """A fitted scaler from its JSON description (:meth:`to_dict`).

        Args:
            d: a dict with ``"median"`` and ``"iqr"`` lists (R,) and optionally
                ``"n_timepoints"``.

        Returns:
            The fitted scaler.

        Raises:
            ConfigError: the lists are missing, of different lengths, or an IQR is not positive.
        """
        if "median" not in d or "iqr" not in d or len(d["median"]) != len(d["iqr"]):
            raise ConfigError("robust normalization needs 'median' and 'iqr' lists of equal length")
        scaler = cls()
        scaler.median_ = np.asarray(d["median"], dtype=np.float32)
        scaler.iqr_ = np.asarray(d["iqr"], dtype=np.float32)
        if not np.all(scaler.iqr_ > 0):
            raise ConfigError("robust normalization: every IQR must be positive")
        scaler.n_timepoints_seen_ = int(d.get("n_timepoints", 0))
        return scaler


def normalization_to_dict(method: str, scaler: RobustScaler | None = None) -> dict:
    """The JSON-serialisable description of a normalisation (written as normalization.json).

    Args:
        method: one of :data:`NORMALIZATIONS`.
        scaler: the fitted statistics; needed by the fitted methods (``"psc"``, ``"center"``,
            ``"robust"``), ignored by the others.

    Returns:
        ``{"method": "psc" | "center" | "robust", "median": [...R], "iqr": [...R],
        "n_timepoints": N}`` (statistics of the per-scan transformed training series), or
        ``{"method": "zscore"}`` / ``{"method": "none"}``.

    Raises:
        ConfigError: an unknown method, or a fitted method without a fitted scaler.
    """
    if method not in NORMALIZATIONS:
        raise ConfigError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")
    if method not in FITTED_NORMALIZATIONS:
        return {"method": method}
    if scaler is None or not hasattr(scaler, "median_"):
        raise ConfigError(f"{method} normalization needs a fitted RobustScaler")
    return {
        "method": method,
        "median": [float(v) for v in scaler.median_],
        "iqr": [float(v) for v in scaler.iqr_],
        "n_timepoints": int(getattr(scaler, "n_timepoints_seen_", 0)),
    }


def normalization_from_dict(d: dict) -> tuple[str, RobustScaler | None]:
    """The inverse of :func:`normalization_to_dict`.

    Args:
        d: the description, as read from normalization.json.

    Returns:
        ``(method, scaler)``; the scaler is None for the methods without fitted statistics.

    Raises:
        ConfigError: an unknown method or invalid statistics.
    """
    method = d.get("method")
    if method not in NORMALIZATIONS:
        raise ConfigError(f"normalization.json: 'method' must be one of {NORMALIZATIONS}, got {method!r}")
    return method, (RobustScaler.from_dict(d) if method in FITTED_NORMALIZATIONS else None)


def normalize(x: np.ndarray, method: str, scaler: RobustScaler | None = None, stats: tuple | None = None) -> np.ndarray:
    """Apply a normalisation: the per-scan part (:func:`scan_transform`), then the cohort scaling.

    Args:
        x: (..., R, T) series.
        method: one of :data:`NORMALIZATIONS`.
        scaler: the fitted statistics, needed by the fitted methods.
        stats: the whole scan's (mean, std) (:func:`scan_statistics`) when ``x`` is a window
            normalised in scope ``scan``; None: the window's own.

    Returns:
        (..., R, T) float32.

    Raises:
        ConfigError: an unknown method, or a fitted method without ``scaler``.
        DataError: see :func:`scan_transform` and :meth:`RobustScaler.transform`.
    """
    if method in FITTED_NORMALIZATIONS:
        if scaler is None:
            raise ConfigError(f"normalization={method!r} needs a fitted RobustScaler")
        return scaler.transform(scan_transform(x, method, stats))
    if method == "zscore":
        return zscore(x, stats=stats)
    if method == "none":
        return np.asarray(x, dtype=np.float32)
    raise ConfigError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")
