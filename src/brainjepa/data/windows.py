"""The window Dataset: (R, n_timepoints) training or evaluation windows of a cohort, resampled to
one TR and normalised (:class:`WindowDataset`)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..transforms import (
    FITTED_NORMALIZATIONS,
    NORMALIZATIONS,
    PER_SCAN_METHODS,
    SCOPES,
    RobustScaler,
    WindowResampler,
    normalize,
    resampled_length,
    same_tr,
    scan_statistics,
)
from .scaling import _first_report, scaling_report, stored_or_fitted_scaler
from .sources import open_cohort

log = logging.getLogger(__name__)


class WindowDataset(torch.utils.data.Dataset):
    """(R, n_timepoints) windows of a cohort, resampled to ``target_tr`` and normalised.

    Item i is scan ``indices[i]``: its series is resampled to ``target_tr`` (when given; every
    scan then needs a TR), a window of ``n_timepoints`` is cut (random when ``train``, else
    centred) and normalised (the fitted methods 'psc', 'center', 'robust' with ``scaler``, the
    store's stored statistics, or a scaler fitted on the cohort's training split
    (:func:`~brainjepa.data.stored_or_fitted_scaler`); 'zscore' per
    window; 'none'). The random window of item i depends only on (seed, epoch, i), so a resumed
    run sees the same windows: call ``set_epoch(epoch)`` at the start of each epoch. With
    ``scope="scan"`` the per-scan part of 'psc', 'center' and 'zscore' uses the whole scan's mean
    (and std), computed once per scan and kept, so a window keeps its level relative to its
    scan; with ``scope="window"`` each window uses its own. Windows are
    read through :meth:`~brainjepa.data.Cohort.read`, so a store streams from disk and only the
    window (plus the resampling filter's margins) is ever loaded.

    Args:
        cohort: a :class:`~brainjepa.data.Cohort` or anything
            :func:`~brainjepa.data.open_cohort` opens.
        n_timepoints: the window's length in frames (at ``target_tr``).
        target_tr: the TR in seconds to resample every scan to, or None for each scan's own.
        train: random windows (True) or centred ones (False).
        normalization: one of :data:`brainjepa.transforms.NORMALIZATIONS`.
        scaler: fitted statistics for a fitted method (default: the store's, else fitted on the
            cohort's training split).
        seed: seed of the random windows and of a scaler fitted here.
        indices: the scans to use (default: all).
        scope: where the per-scan part takes its statistics: "scan" or "window"
            (:data:`brainjepa.transforms.SCOPES`).
        report: log a problem of the cohort's raw scale with ``normalization``
            (:func:`~brainjepa.data.scaling_report`, once per cohort); False where the caller has
            reported it already (pretraining does, before it resolves the normalisation).

    Raises:
        ConfigError: an unknown normalisation or scope.
        DataError: a scan shorter than the window or without the TR that resampling needs, or
            a scaler with another number of ROIs.
    """

    def __init__(
        self,
        cohort,
        n_timepoints: int = 160,
        *,
        target_tr: float | None = None,
        train: bool = True,
        normalization: str = "robust",
        scaler: RobustScaler | None = None,
        seed: int = 0,
        indices=None,
        scope: str = "window",
        report: bool = True,
    ):
        if normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if scope not in SCOPES:
            raise ConfigError(f"normalization scope must be one of {SCOPES}, got {scope!r}")
        self.scope = scope
        self._scan_stats: dict[int, tuple] = {}
        self.cohort = open_cohort(cohort)
        self.n_timepoints = int(n_timepoints)
        self.target_tr = None if target_tr is None else float(target_tr)
        self.train = bool(train)
        self.normalization = normalization
        self.seed = int(seed)
        self.epoch = 0
        self.indices = np.arange(len(self.cohort)) if indices is None else np.asarray(indices, dtype=np.int64)
        self._resamplers: dict[float, WindowResampler] = {}
        self._max_start = np.empty(len(self.indices), dtype=np.int64)
        for k, i in enumerate(self.indices):
            self._max_start[k] = self._check_scan(int(i))
        if report:
            severity, message = scaling_report(self.cohort, normalization, self.indices, what="dataset")
            if severity in ("error", "warning") and _first_report(self.cohort, normalization, self.indices):
                log.warning(message)  # a dataset built by hand: say it, do not refuse
        self.scaler = None
        if normalization in FITTED_NORMALIZATIONS:
            if scaler is None:
                scaler = stored_or_fitted_scaler(self.cohort, normalization, seed=self.seed)
            self.scaler = scaler
            if len(self.scaler.median_) != self.cohort.n_rois:
                raise DataError(
                    f"the {normalization} scaler has {len(self.scaler.median_)} ROIs, the cohort {self.cohort.n_rois}"
                )

    def _check_scan(self, i: int) -> int:
        """Validate scan i against the window; return the last valid raw start frame."""
        n = self.cohort.length(i)
        name = self.cohort.name(i)
        if self.target_tr is None:
            if n < self.n_timepoints:
                raise DataError(f"{name}: {n} time points, shorter than the window of {self.n_timepoints}")
            return n - self.n_timepoints
        tr = self.cohort.tr(i)
        if tr is None:
            raise DataError(
                f"{name}: no TR known (no RepetitionTime sidecar, tr column or --tr), but "
                f"target_tr={self.target_tr} needs one"
            )
        if resampled_length(n, tr, self.target_tr) < self.n_timepoints:
            raise DataError(
                f"{name}: {n} frames at TR {tr} s give "
                f"{resampled_length(n, tr, self.target_tr)} at TR {self.target_tr} s, "
                f"shorter than the window of {self.n_timepoints}"
            )
        if same_tr(tr, self.target_tr):
            return n - self.n_timepoints
        return n - self._resampler(tr).raw_extent()

    def _resampler(self, tr: float) -> WindowResampler:
        key = round(tr, 9)
        if key not in self._resamplers:
            self._resamplers[key] = WindowResampler(tr, self.target_tr, self.n_timepoints)
        return self._resamplers[key]

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose random windows the items are.

        Args:
            epoch: the epoch; item i's random window depends only on (seed, epoch, i).
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def start(self, idx: int) -> int:
        """The raw start frame of an item's window for the current epoch.

        Args:
            idx: the item.

        Returns:
            A random start when training, else the centred one.
        """
        hi = int(self._max_start[idx])
        if not self.train:
            return hi // 2
        rng = np.random.default_rng((self.seed, self.epoch, int(idx)))
        return int(rng.integers(0, hi + 1))

    def window(self, idx: int) -> np.ndarray:
        """An item as a NumPy array.

        Args:
            idx: the item.

        Returns:
            Its resampled, normalised window, float32 (R, n_timepoints).
        """
        i = int(self.indices[idx])
        s = self.start(idx)
        tr = self.cohort.tr(i)
        if self.target_tr is None or same_tr(tr, self.target_tr):
            x = self.cohort.read(i, s, s + self.n_timepoints)
        else:
            rs = self._resampler(tr)
            x = rs.apply(self.cohort.read(i, s - rs.margin, s - rs.margin + rs.span))
        return normalize(x, self.normalization, self.scaler, self.statistics(i))

    def statistics(self, i: int):
        """The whole scan's (mean, std) that its windows are normalised with, or None.

        Args:
            i: the scan's index in the cohort.

        Returns:
            :func:`~brainjepa.transforms.scan_statistics` of scan ``i`` (computed once) in scope
            "scan" for a per-scan method; None otherwise (each window uses its own).
        """
        if self.scope != "scan" or self.normalization not in PER_SCAN_METHODS:
            return None
        if i not in self._scan_stats:
            mean, std = scan_statistics(self.cohort.series(i))
            self._scan_stats[i] = (mean.astype(np.float32), std.astype(np.float32))
        return self._scan_stats[i]

    def __getitem__(self, idx: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.window(idx), dtype=np.float32))
