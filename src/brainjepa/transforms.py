"""Temporal alignment and normalisation of (R, T) series.

TR resampling
    Multiband data (TR 0.72-0.8 s) is brought to a target TR (about 2 s in the paper). The
    authors keep every third frame, which aliases everything between the new Nyquist frequency
    and the old one and only fits TR ratios near 3. Here the series is evaluated at the new
    sampling times ``k * tr_out`` with a band-limited interpolator: a Kaiser-windowed sinc whose
    cut-off is the lower of the two Nyquist frequencies (an anti-aliasing low-pass when
    downsampling), each output's weights normalised to unit DC gain, series ends mirror-padded.
    Any TR ratio works and each file's own TR is used. Because the weights for "n outputs
    starting on an input frame" do not depend on where the window starts, a window costs one
    small matrix product (:class:`WindowResampler`), which keeps the streaming loader fast.

Normalisation
    ``psc``: each scan's ROIs become percent signal change (x / mean - 1, per ROI, per window),
    then each ROI is divided by its robust spread (IQR) over the training cohort. ``center``:
    each scan's ROIs are demeaned, then scaled the same way. Both remove per-scan intensity
    offsets (scanner, site, coil) and keep amplitude differences between subjects; ``psc`` also
    removes the per-scan intensity *scale*, and needs raw BOLD (positive ROI means well above
    their fluctuations). ``zscore``: per sample, per ROI (removes amplitude too). ``robust``:
    the authors' per ROI (x - median) / IQR over the cohort, without per-scan centring (kept
    for their checkpoint; on raw data the model then mostly sees per-scan ROI offsets).
    ``none``. Fitted statistics live in a :class:`RobustScaler` and are stored with the model;
    :func:`normalization_to_dict` is the JSON description written as ``normalization.json``.
    See docs/method.md for the measurements behind the default.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np
import torch

from .errors import ConfigError, DataError

NORMALIZATIONS = ("psc", "center", "zscore", "robust", "none")
# methods with per-ROI statistics fitted on the training cohort (a RobustScaler)
FITTED_NORMALIZATIONS = ("psc", "center", "robust")
# psc needs every ROI's mean this many of its standard deviations above zero (raw BOLD is
# ~100 std above; demeaned or z-scored data is ~0)
PSC_MIN_MEAN_TO_STD = 3.0
# half-width of the interpolation kernel, in output samples: wide enough for a sharp anti-alias
# cut-off, small enough that a 160-point window needs only ~8 extra output periods each side
KERNEL_HALF_WIDTH = 8
KAISER_BETA = 6.0


@contextmanager
def single_threaded():
    """Run torch ops in the block on one thread, then restore the caller's setting.

    For the small matrix products of resampling and simulation, intra-op threads never pay off,
    and when other processes share the cores (DataLoader workers, other jobs) a threaded BLAS
    waits on descheduled threads: 10-20x slower, measured on a shared 2-core machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _positive(value, name: str) -> float:
    if value is None or not np.isfinite(value) or value <= 0:
        raise DataError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def same_tr(tr_in: float, tr_out: float) -> bool:
    """Whether two repetition times are equal up to a relative 1e-6 (no resampling needed).

    Args:
        tr_in: the series' TR in seconds.
        tr_out: the target TR in seconds.

    Returns:
        True when ``|tr_in - tr_out| <= 1e-6 * tr_out``.
    """
    return abs(tr_in - tr_out) <= 1e-6 * tr_out


def resampled_length(n_frames: int, tr_in: float, tr_out: float) -> int:
    """The number of samples at ``tr_out`` that fit in the time span of ``n_frames`` at ``tr_in``.

    Args:
        n_frames: the number of input frames T.
        tr_in: the input TR in seconds.
        tr_out: the output TR in seconds.

    Returns:
        ``floor((T - 1) * tr_in / tr_out) + 1``, or T when the TRs are the same (:func:`same_tr`).
    """
    if same_tr(tr_in, tr_out):
        return n_frames
    return int(np.floor((n_frames - 1) * tr_in / tr_out + 1e-9)) + 1


def _weights(positions: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Interpolation taps for outputs at fractional input ``positions``.

    Returns first (n,) int: index of each output's first tap, and w (n, W) float64 weights over
    input frames first .. first + W - 1, summing to 1 per row.
    """
    scale = max(step, 1.0)
    half = KERNEL_HALF_WIDTH * scale
    reach = int(np.ceil(half))
    first = np.floor(positions).astype(np.int64) - reach + 1
    frames = first[:, None] + np.arange(2 * reach)[None, :]
    offsets = frames - positions[:, None]
    fc = 0.5 / scale  # cut-off in cycles per input frame
    inside = np.clip(1.0 - (offsets / half) ** 2, 0.0, None)
    w = np.sinc(2 * fc * offsets) * np.i0(KAISER_BETA * np.sqrt(inside)) * (np.abs(offsets) < half)
    w /= w.sum(axis=1, keepdims=True)
    return first, w


def reflect_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Frame indices ``start .. stop - 1`` of an n-frame series, mirrored outside ``0 .. n - 1``.

    The mirror does not repeat the edge frame (-1 maps to 1, n maps to n - 2); a one-frame series
    maps everything to 0.

    Args:
        start: the first index (may be negative).
        stop: one past the last index (may exceed n).
        n: the number of frames of the series.

    Returns:
        (stop - start,) int array of indices in ``0 .. n - 1``.
    """
    idx = np.arange(start, stop)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def _reflect_take(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Columns start..stop-1 of (..., T) ``x``, mirror-padded outside 0..T-1."""
    n = x.shape[-1]
    if start >= 0 and stop <= n:
        return x[..., start:stop]
    return x[..., reflect_indices(start, stop, n)]


def resample_tr(x: np.ndarray, tr_in: float, tr_out: float) -> np.ndarray:
    """Resample a series from one TR to another with a band-limited interpolator.

    Output k is the band-limited value at time k * tr_out (see the module docstring). The same TR
    returns ``x`` as float32 unchanged.

    Args:
        x: (R, T) series (any leading axes work; time is last), sampled every ``tr_in`` seconds.
        tr_in: the input TR in seconds.
        tr_out: the output TR in seconds.

    Returns:
        (R, T') float32 with T' = floor((T - 1) * tr_in / tr_out) + 1 (:func:`resampled_length`).

    Raises:
        DataError: a TR is not a positive number.
    """
    tr_in, tr_out = _positive(tr_in, "tr_in"), _positive(tr_out, "tr_out")
    x = np.asarray(x, dtype=np.float32)
    if same_tr(tr_in, tr_out):
        return x
    step = tr_out / tr_in
    n_out = resampled_length(x.shape[-1], tr_in, tr_out)
    out = np.empty(x.shape[:-1] + (n_out,), dtype=np.float32)
    for k0 in range(0, n_out, 256):  # chunks bound the gather's memory on long series
        k = np.arange(k0, min(k0 + 256, n_out))
        first, w = _weights(k * step, step)
        seg = _reflect_take(x, int(first[0]), int(first[-1]) + w.shape[1])
        taps = (first - first[0])[:, None] + np.arange(w.shape[1])[None, :]
        out[..., k] = np.einsum("...kw,kw->...k", seg[..., taps], w.astype(np.float32))
    return out


class WindowResampler:
    """Resample a window of ``n`` outputs at ``tr_out`` whose first output sits on an input frame.

    The (S, n) weights are computed once; ``apply(seg)`` maps input frames (R, S) -> (R, n) and
    ``__call__(x, start)`` reads frames start - margin .. start - margin + S - 1 of (R, T) ``x``
    (mirror-padded at the ends) first. Equals ``resample_tr(x, ...)[:, k0:k0 + n]`` whenever
    start == k0 * step. The weight matrix is banded, so it is applied in blocks of 32 outputs,
    each touching only its ~(32 * step + 2 * margin) input frames (3-4x fewer flops than dense).

    Args:
        tr_in: the input TR in seconds.
        tr_out: the output TR in seconds.
        n: the number of outputs per window.

    Raises:
        DataError: a TR is not a positive number.
    """

    BLOCK = 32

    def __init__(self, tr_in: float, tr_out: float, n: int):
        self.tr_in, self.tr_out, self.n = _positive(tr_in, "tr_in"), _positive(tr_out, "tr_out"), int(n)
        self.step = self.tr_out / self.tr_in
        first, w = _weights(np.arange(self.n) * self.step, self.step)
        self.margin = int(-first[0])
        self.span = int(first[-1] - first[0]) + w.shape[1]  # S input frames read per window
        self.weights = np.zeros((self.span, self.n), dtype=np.float32)  # (S, n): out = seg @ weights
        for k in range(self.n):
            lo = first[k] - first[0]
            self.weights[lo : lo + w.shape[1], k] = w[k]
        self._blocks = []  # (first input frame, last + 1, first output, (frames, outputs) weights)
        for k0 in range(0, self.n, self.BLOCK):
            cols = self.weights[:, k0 : k0 + self.BLOCK]
            rows = np.flatnonzero(np.any(cols != 0, axis=1))
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            self._blocks.append((lo, hi, k0, torch.from_numpy(np.ascontiguousarray(cols[lo:hi]))))

    def raw_extent(self) -> int:
        """The input frames spanned by the n outputs themselves (excluding the filter margins).

        Returns:
            ``floor((n - 1) * step) + 1`` frames, step = tr_out / tr_in.
        """
        return int(np.floor((self.n - 1) * self.step + 1e-9)) + 1

    def apply(self, seg: np.ndarray) -> np.ndarray:
        """Resample S input frames to the window's n outputs.

        Args:
            seg: (R, S) input frames, the ``margin`` frames before the window's first output
                frame first.

        Returns:
            (R, n) float32.
        """
        # torch rather than numpy for the products: its thread count can be limited per call,
        # numpy's BLAS threads cannot (and would oversubscribe the CPU in every DataLoader worker)
        seg_t = torch.from_numpy(np.asarray(seg, dtype=np.float32))
        out = torch.empty(seg_t.shape[0], self.n)
        with single_threaded():
            for lo, hi, k0, w in self._blocks:
                torch.mm(seg_t[:, lo:hi], w, out=out[:, k0 : k0 + w.shape[1]])
        return out.numpy()

    def __call__(self, x: np.ndarray, start: int) -> np.ndarray:
        """Resample the window whose first output sits on input frame ``start``.

        Args:
            x: (R, T) series at ``tr_in``; frames outside 0 .. T - 1 are mirror-padded.
            start: the input frame of the first output.

        Returns:
            (R, n) float32, equal to ``resample_tr(x, ...)[:, k0:k0 + n]`` when start == k0 * step.
        """
        return self.apply(_reflect_take(x, start - self.margin, start - self.margin + self.span))


def _check_window(n_frames: int, length: int) -> None:
    if length <= 0:
        raise ConfigError(f"window length must be positive, got {length}")
    if n_frames < length:
        raise DataError(f"series has {n_frames} time points, shorter than the window of {length}")


def center_window(x: np.ndarray, length: int) -> np.ndarray:
    """The centred window of a series (deterministic, for evaluation).

    Args:
        x: (R, T) series (any leading axes; time is last).
        length: the window length in time points; when T - length is odd, the end loses one
            frame more than the start.


    Returns:
        (R, length) view of ``x``.

    Raises:
        ConfigError: ``length`` is not positive.
        DataError: the series is shorter than ``length``.
    """
    _check_window(x.shape[-1], length)
    start = (x.shape[-1] - length) // 2
    return x[..., start : start + length]


def zscore(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Per-sample z-scoring: each ROI to zero mean and unit std over time.

    A constant ROI becomes zeros (its std is floored at ``eps``).

    Args:
        x: (..., R, T) series.
        eps: the smallest std divided by.

    Returns:
        (..., R, T) float32.
    """
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(axis=-1, keepdims=True)
    std = x.std(axis=-1, keepdims=True)
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


def percent_signal_change(x: np.ndarray) -> np.ndarray:
    """Percent signal change per ROI: 100 * (x / mean - 1), the mean taken over time.

    Args:
        x: (..., R, T) raw BOLD.

    Returns:
        (..., R, T) float32.

    Raises:
        DataError: an ROI's mean is not clearly positive (:func:`has_raw_baseline`; the series is
            already centred or scaled), since dividing by it would blow the noise up.
    """
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(axis=-1, keepdims=True)
    bad = ~has_raw_baseline(x)
    if bad.any():
        raise DataError(
            f"normalization 'psc' needs raw BOLD (every ROI's mean well above its fluctuations), "
            f"but {int(bad.sum())} ROI(s) have a mean near or below zero (typical |mean| "
            f"{float(np.median(np.abs(mean))):.3g}): the series looks centred or scaled already; "
            "use normalization 'center' or 'zscore' for it"
        )
    return (100.0 * (x / mean - 1.0)).astype(np.float32, copy=False)


def scan_transform(x: np.ndarray, method: str) -> np.ndarray:
    """The per-scan part of a normalisation, before any cohort statistics.

    Args:
        x: (..., R, T) series of one scan.
        method: ``"psc"`` (percent signal change), ``"center"`` (demean each ROI over time), or
            any other method (nothing to do per scan).

    Returns:
        (..., R, T) float32.

    Raises:
        DataError: ``"psc"`` on a series that is not raw BOLD (:func:`percent_signal_change`).
    """
    if method == "psc":
        return percent_signal_change(x)
    x = np.asarray(x, dtype=np.float32)
    if method == "center":
        return x - x.mean(axis=-1, keepdims=True)
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


def normalize(x: np.ndarray, method: str, scaler: RobustScaler | None = None) -> np.ndarray:
    """Apply a normalisation: the per-scan part (:func:`scan_transform`), then the cohort scaling.

    Args:
        x: (..., R, T) series.
        method: one of :data:`NORMALIZATIONS`.
        scaler: the fitted statistics, needed by the fitted methods.

    Returns:
        (..., R, T) float32.

    Raises:
        ConfigError: an unknown method, or a fitted method without ``scaler``.
        DataError: see :func:`scan_transform` and :meth:`RobustScaler.transform`.
    """
    if method in FITTED_NORMALIZATIONS:
        if scaler is None:
            raise ConfigError(f"normalization={method!r} needs a fitted RobustScaler")
        return scaler.transform(scan_transform(x, method))
    if method == "zscore":
        return zscore(x)
    if method == "none":
        return np.asarray(x, dtype=np.float32)
    raise ConfigError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")


# ------------------------------------------------------------------------------ input scale checks

# A scan whose typical ROI mean is more than this many times its typical fluctuation (std over
# time) carries the scanner's arbitrary intensity: unscaled BOLD (means of 1e2-1e4, fluctuations
# of a few percent). Centred or scaled series have means near 0 (ratio < 1); percent signal
# change that was not demeaned sits at ~100 with fluctuations ~1 and is caught as well.
RAW_OFFSET_RATIO = 20.0
# Scans whose levels differ by more than this many typical fluctuations (across the cohort)
# differ by an intensity offset (scanner, site, coil) that cohort-level scaling keeps as signal.
COHORT_OFFSET_RATIO = 3.0
# float32 keeps about 7 significant digits: beyond this ratio of offset to fluctuation the
# fluctuations lose their precision before any scaling happens.
PRECISION_OFFSET_RATIO = 1e5
# No BOLD signal, in any unit a pipeline writes, comes near this; larger values are a unit or
# export error (and their squares overflow float32 in variances and FC).
MAX_ABS_VALUE = 1e9


def scan_levels(x: np.ndarray) -> tuple[float, float]:
    """The typical intensity level and fluctuation of one scan.

    Args:
        x: (R, T) series.

    Returns:
        ``(level, fluctuation)``: the median over ROIs of |mean over time| and the median over
        ROIs of the std over time, computed in float64.
    """
    x = np.asarray(x, dtype=np.float64)
    return float(np.median(np.abs(x.mean(axis=-1)))), float(np.median(x.std(axis=-1)))


def cohort_offset_problem(levels, fluctuations, names) -> str | None:
    """Check whether scans' intensity levels differ across a cohort (site or scanner offsets).

    The spread is the interquartile range of the levels; it is a problem when it exceeds
    :data:`COHORT_OFFSET_RATIO` times the median fluctuation (and 1.0).

    Args:
        levels: per scan, the level from :func:`scan_levels`.
        fluctuations: per scan, the fluctuation from :func:`scan_levels`.
        names: per scan, its name for the message.

    Returns:
        A message naming the lowest and highest scans, or None (also for fewer than 2 scans).
    """
    levels = np.asarray(levels, dtype=np.float64)
    fluct = np.asarray(fluctuations, dtype=np.float64)
    if len(levels) < 2:
        return None
    q25, q75 = np.percentile(levels, [25, 75])
    spread = max(q75 - q25, 0.0)
    typical = float(np.median(fluct))
    if spread > COHORT_OFFSET_RATIO * max(typical, 1e-30) and spread > 1.0:
        lo, hi = int(np.argmin(levels)), int(np.argmax(levels))
        return (
            f"scans differ in intensity offset by {spread / max(typical, 1e-30):.0f}x their "
            f"fluctuations (typical ROI mean {levels[lo]:.3g} in {names[lo]} vs "
            f"{levels[hi]:.3g} in {names[hi]}): site or scanner offsets"
        )
    return None


def magnitude_problem(x: np.ndarray) -> str | None:
    """Check whether a finite series can be a usable signal at float32.

    Args:
        x: (R, T) finite series.

    Returns:
        A message when values go beyond :data:`MAX_ABS_VALUE` or the offsets are more than
        :data:`PRECISION_OFFSET_RATIO` times the fluctuations (float32 loses them), else None.
    """
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > MAX_ABS_VALUE:
        return (
            f"values up to {peak:.3g}, beyond any BOLD signal (limit {MAX_ABS_VALUE:.0e}); check "
            "the units and the export of this file"
        )
    level, fluct = scan_levels(x)
    if fluct > 0 and level > PRECISION_OFFSET_RATIO * fluct:
        return (
            f"offsets {level / fluct:.2g}x the fluctuations (typical ROI mean {level:.3g}, std "
            f"{fluct:.3g}): float32 keeps about 7 digits, so the fluctuations are lost; remove "
            "the mean of each ROI before export"
        )
    return None
