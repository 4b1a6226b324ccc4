"""Checks of a series' scale: raw intensity offsets, offsets between scans, absurd magnitudes."""

from __future__ import annotations

import numpy as np

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
