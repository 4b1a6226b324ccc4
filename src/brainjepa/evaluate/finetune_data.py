"""The inputs of fine-tuning: a few evenly spaced windows of each subject's scan, each prepared
exactly as the model's input (resampled to its TR, normalised on its own), so that training can
draw one window per subject and epoch and evaluation can average over all of them
(docs/method.md, "Fine-tuning")."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..inputs import InputWarning, normalized_window, resampled_input
from .features import progress_bar, repetition_times


def subject_windows_for_finetuning(model, series, tr: float | None = None, n_windows: int = 1) -> torch.Tensor:
    """``n_windows`` evenly spaced windows of one subject's scan, each prepared as the model's input.

    The scan is resampled to the model's TR; with one window it is the centre window (exactly
    :meth:`BrainJEPA.prepare`), with W > 1 the windows start at W evenly spaced frames from the
    first to the last possible start (rounded), so they overlap when the scan is shorter than W
    windows. Each window is normalised on its own, as :meth:`BrainJEPA.prepare` normalises its one.

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA` (config, TR, normalisation).
        series: (R, T) raw series.
        tr: its TR in seconds.
        n_windows: W, at least 1.

    Returns:
        (W, R, n_timepoints) float32.

    Raises:
        ConfigError: ``n_windows`` below 1.
        DataError: as :meth:`BrainJEPA.prepare` (shape, NaN/Inf, scale), or a scan shorter than
            one window.
    """
    if n_windows < 1:
        raise ConfigError(f"n_windows must be at least 1, got {n_windows}")
    if n_windows == 1:
        return torch.as_tensor(model.prepare(series, tr=tr)).as_subclass(torch.Tensor)[None]
    who = getattr(series, "source_name", None) or "fine-tuning windows"
    x, at = resampled_input(model, series, tr, who)
    length = model.config.n_timepoints
    if x.shape[1] < length:
        raise DataError(
            f"{who}: {x.shape[1]} time points{at}, shorter than the model's window of "
            f"{length}; use longer scans or leave this one out"
        )
    starts = np.rint(np.linspace(0, x.shape[1] - length, n_windows)).astype(int)
    scaled = [normalized_window(model, x[:, s : s + length], None, who) for s in starts]
    problem = next((pr for _, pr in scaled if pr), None)
    if problem:  # once per series
        warnings.warn(f"{who}: {problem}", InputWarning, stacklevel=2)
    return torch.from_numpy(np.stack([w for w, _ in scaled]))


def finetune_windows(model, X, tr=None, n_windows: int = 1, progress: bool = False) -> torch.Tensor:
    """Every subject's fine-tuning windows (:func:`subject_windows_for_finetuning`).

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA`.
        X: a sequence of raw (R, T_i) series, read one at a time.
        tr: one repetition time in seconds or one per series.
        n_windows: W windows per subject.
        progress: show a progress bar.

    Returns:
        (N, R, n_timepoints) with one window, else (N, W, R, n_timepoints), float32 on the CPU.
    """
    trs = repetition_times(tr, len(X))
    items = progress_bar(range(len(X)), len(X), "fine-tuning windows", progress)
    out = torch.stack([subject_windows_for_finetuning(model, X[i], trs[i], n_windows) for i in items])
    return out[:, 0] if n_windows == 1 else out
