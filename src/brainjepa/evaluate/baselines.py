"""The references every result is shown beside: each subject's functional connectivity (FC) and
per-ROI amplitude, features that need no model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import DataError
from ..gradients import connectivity

# a scan whose ROI means exceed this many temporal stds (median over ROIs) is raw BOLD: its
# amplitude is measured in percent signal change
RAW_BOLD_MEAN_OVER_STD = 5.0


def fc_features(series: Sequence[np.ndarray]) -> np.ndarray:
    """Each subject's Pearson FC, Fisher-z, strict upper triangle.

    Args:
        series: N (R, T) time series.

    Returns:
        (N, R(R-1)/2) float32.
    """
    rows = []
    for x in series:
        r = connectivity([x], fisher_z=False)
        iu = np.triu_indices(r.shape[0], k=1)
        rows.append(np.arctanh(np.clip(r[iu], -1 + 1e-7, 1 - 1e-7)).astype(np.float32))
    return np.stack(rows)


def window_fc(windows, n_patches_valid: int, patch_size: int) -> np.ndarray:
    """The FC of the windows one subject's model input is made of.

    Args:
        windows: (W, R, n_timepoints), as from :meth:`BrainJEPA.prepare_windows`.
        n_patches_valid: the windows' valid time patches.
        patch_size: frames per time patch.

    Returns:
        (R(R-1)/2,) float32: each window's Fisher-z FC over the frames the encoder reads (its
        valid patches), averaged over the windows.
    """
    frames = n_patches_valid * patch_size
    return fc_features([np.asarray(w)[:, :frames] for w in windows]).mean(axis=0)


def amplitude_features(series: Sequence[np.ndarray]) -> np.ndarray:
    """Per ROI, the log of the temporal std of each series.

    A series that looks like raw BOLD (median over ROIs of |mean| / std above 5) is measured in
    percent signal change, 100 (x - mean) / |mean|, so scanner-dependent offsets cancel; any
    other series (already centred or scaled) as it is.

    Args:
        series: N (R, T) time series, T >= 2.

    Returns:
        (N, R) float32.

    Raises:
        DataError: a series that is not (R, T) with T >= 2.
    """
    rows = []
    for x in series:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] < 2:
            raise DataError(f"amplitude: expected an (R, T) series with T >= 2, got shape {x.shape}")
        mean, std = x.mean(axis=1), x.std(axis=1)
        ratio = np.abs(mean) / np.maximum(std, 1e-12)
        if np.median(ratio) > RAW_BOLD_MEAN_OVER_STD:
            std = 100.0 * std / np.maximum(np.abs(mean), 1e-12)
        # a constant ROI has no amplitude; a floor keeps its log finite for the probe
        rows.append(np.log(np.maximum(std, 1e-12)).astype(np.float32))
    return np.stack(rows)
