"""Temporal alignment and normalisation of (R, T) series.

- :mod:`~brainjepa.transforms.resample`: TR resampling with a band-limited interpolator, windows.
- :mod:`~brainjepa.transforms.normalize`: per-scan and cohort normalisation (psc, center, zscore,
  robust), the fitted statistics (:class:`RobustScaler`) and their JSON form.
- :mod:`~brainjepa.transforms.checks`: checks of a series' scale.
"""

from .checks import (
    COHORT_OFFSET_RATIO,
    MAX_ABS_VALUE,
    PRECISION_OFFSET_RATIO,
    RAW_OFFSET_RATIO,
    cohort_offset_problem,
    magnitude_problem,
    scan_levels,
)
from .normalize import (
    FITTED_NORMALIZATIONS,
    NORMALIZATIONS,
    PER_SCAN_METHODS,
    PSC_MIN_MEAN_TO_STD,
    SCOPES,
    RobustScaler,
    has_raw_baseline,
    normalization_from_dict,
    normalization_to_dict,
    normalize,
    percent_signal_change,
    scan_statistics,
    scan_transform,
    zscore,
)
from .resample import (
    KAISER_BETA,
    KERNEL_HALF_WIDTH,
    WindowResampler,
    center_window,
    reflect_indices,
    resample_tr,
    resampled_length,
    same_tr,
    single_threaded,
)

__all__ = [
    "COHORT_OFFSET_RATIO",
    "FITTED_NORMALIZATIONS",
    "KAISER_BETA",
    "KERNEL_HALF_WIDTH",
    "MAX_ABS_VALUE",
    "NORMALIZATIONS",
    "PER_SCAN_METHODS",
    "PRECISION_OFFSET_RATIO",
    "PSC_MIN_MEAN_TO_STD",
    "RAW_OFFSET_RATIO",
    "RobustScaler",
    "SCOPES",
    "WindowResampler",
    "center_window",
    "cohort_offset_problem",
    "has_raw_baseline",
    "magnitude_problem",
    "normalization_from_dict",
    "normalization_to_dict",
    "normalize",
    "percent_signal_change",
    "reflect_indices",
    "resample_tr",
    "resampled_length",
    "same_tr",
    "scan_levels",
    "scan_statistics",
    "scan_transform",
    "single_threaded",
    "zscore",
]
