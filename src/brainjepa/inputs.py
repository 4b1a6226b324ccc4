"""What goes into a model: preparing raw series and checking prepared input.

:meth:`brainjepa.bundle.BrainJEPA.prepare` and ``prepare_windows`` resample a subject's raw
(R, T) series to the model's TR, cut windows and apply the model's normalisation, naming the
series in every message; :meth:`~brainjepa.bundle.BrainJEPA.check_input` checks a prepared
batch. Errors (:class:`~brainjepa.errors.DataError`) stop what cannot work (wrong shape,
NaN/Inf, values the model's scaling leaves far off its training range); an
:class:`InputWarning` flags a milder mismatch of scale or ROI order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .errors import ConfigError, DataError
from .transforms import (
    FITTED_NORMALIZATIONS,
    NORMALIZATIONS,
    PER_SCAN_METHODS,
    SCOPES,
    RobustScaler,
    center_window,
    magnitude_problem,
    normalization_from_dict,
    normalize,
    resample_tr,
    same_tr,
    scan_statistics,
)

# "unknown": the weights came without statistics (the authors' checkpoint); prepare() then
# refuses to guess until the user chooses
NORMALIZATION_METHODS = (*NORMALIZATIONS, "unknown")

OFFICIAL_NORMALIZATION_NOTE = (
    "The authors' checkpoint ships no normalisation statistics. Their pipeline scaled every ROI "
    "as (x - median) / IQR with statistics computed over their pretraining cohort; their "
    "downstream scripts z-score each sample instead. Choose one before preparing data: fit a "
    "brainjepa.transforms.RobustScaler on your own cohort and call "
    "model.set_normalization(scaler), or call model.set_normalization('zscore'), or pass "
    "normalization=... to model.prepare()."
)


class InputWarning(UserWarning):
    """The data given to a model looks unlike the data it was trained on."""


# Prepared input lies within a few units of 0 (robust: IQRs from the training median; z-scores);
# beyond this the series is on another scale than the model's training data.
MAX_SCALED_VALUE = 1e3
# typical per-ROI IQR that prepared input of a per-scan method (center, psc) may have: the
# method divides by the training cohort's IQR, so the training data sit near 1
PER_SCAN_IQR = (0.2, 5.0)  # outside: a warning
PER_SCAN_IQR_LIMIT = (0.1, 10.0)  # outside: an error


class PreparedInput(torch.Tensor):
    """A tensor made by :meth:`BrainJEPA.prepare` (stacking or moving keeps the type): its scale
    was checked against the model's normalisation there, naming the series, so the model does
    not check it again."""


def prepare_series(
    model,
    series,
    tr: float | None = None,
    window: str = "center",
    normalization: str | dict | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """One subject's raw (R, T) series -> the model's (R, n_timepoints) float32 input.

    Resamples from ``tr`` to the model's ``target_tr`` (when the bundle has one), takes one window
    and applies the bundle's normalisation, or ``normalization`` when given. A bundle without
    statistics (method "unknown") needs that choice. A mild mismatch of scale is an
    :class:`InputWarning`.

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA` (its config, TR and normalisation).
        series: (R, T) raw series.
        tr: the series' TR in seconds; without it a model with a TR warns and does not resample.
        window: "center" (the centre window) or "start" (the first n_timepoints).
        normalization: None (the bundle's), "zscore", "none", a "robust" dict or a fitted
            RobustScaler.
        name: starts every message; default: the series' ``source_name`` attribute (set for
            cohort scans), else "prepare".

    Returns:
        (R, n_timepoints) float32, a :class:`PreparedInput`.

    Raises:
        DataError: wrong shape, NaN/Inf, absurd magnitudes, too short, or values that the model's
            scaling leaves far outside the training data's range (another scale).
        ConfigError: a bad ``window``, or no normalisation known.
    """
    cfg = model.config
    who = name or getattr(series, "source_name", None) or "prepare"
    if window not in ("center", "start"):
        raise ConfigError(f"prepare: window must be 'center' or 'start', not {window!r}")
    x, at = resampled_input(model, series, tr, who)
    if x.shape[1] < cfg.n_timepoints:
        raise DataError(
            f"{who}: {x.shape[1]} time points{at}, shorter than the model's window of "
            f"{cfg.n_timepoints}; use longer scans or leave this one out"
        )
    stats = window_statistics(model, x, normalization)
    x = center_window(x, cfg.n_timepoints) if window == "center" else x[:, : cfg.n_timepoints]
    out, problem = normalized_window(model, x, normalization, who, stats)
    if problem:
        warnings.warn(f"{who}: {problem}", InputWarning, stacklevel=2)
    return torch.from_numpy(out).as_subclass(PreparedInput)


def series_windows(
    model, series, tr: float | None = None, normalization: str | dict | None = None, name: str | None = None
) -> tuple[torch.Tensor, int]:
    """One subject's raw (R, T) series -> every window of it.

    Resampled to ``target_tr`` as in :func:`prepare_series`; then W = ceil(T / n_timepoints)
    windows (T counted after resampling) start at evenly spaced frames from 0 to
    T - n_timepoints (rounded), so together they cover the whole scan and the last one ends at its
    final frame. Each window is normalised as :func:`prepare_series` normalises its one window:
    with the whole scan's statistics in scope ``scan``, with its own in scope ``window``. A scan
    shorter than one window gives one window: its real frames normalised (using only them), then
    zeros.

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA`.
        series: (R, T) raw series.
        tr: the series' TR in seconds.
        normalization: None (the bundle's), "zscore", "none", a "robust" dict or a fitted
            RobustScaler.
        name: starts every message; default: the series' ``source_name`` attribute, else
            "prepare_windows".

    Returns:
        (W, R, n_timepoints) float32 windows (a :class:`PreparedInput`), and n_patches_valid:
        how many time patches hold data, T // patch_size for a short scan (all ``n_patches``
        otherwise); only the tokens of those patches should be encoded (``token_idx``).

    Raises:
        DataError: as :func:`prepare_series`, or a scan shorter than one time patch.
    """
    cfg = model.config
    who = name or getattr(series, "source_name", None) or "prepare_windows"
    x, _ = resampled_input(model, series, tr, who)
    n_frames, length = x.shape[1], cfg.n_timepoints
    if n_frames < length:
        n_valid = n_frames // cfg.patch_size
        if n_valid == 0:
            raise DataError(
                f"{who}: the series has {n_frames} time points at the "
                f"model's TR, fewer than one time patch ({cfg.patch_size}); use "
                "a longer scan"
            )
        window = np.zeros((cfg.n_rois, length), dtype=np.float32)
        # statistics of the real frames only: the padding must not shift the scaling
        window[:, :n_frames], problem = normalized_window(model, x, normalization, who)
        if problem:
            warnings.warn(f"{who}: {problem}", InputWarning, stacklevel=2)
        return torch.from_numpy(window[None]).as_subclass(PreparedInput), n_valid
    stats = window_statistics(model, x, normalization)
    scaled = [
        normalized_window(model, x[:, s : s + length], normalization, who, stats)
        for s in window_starts(n_frames, length)
    ]
    problem = next((pr for _, pr in scaled if pr), None)
    if problem:  # once per series
        warnings.warn(f"{who}: {problem}", InputWarning, stacklevel=2)
    windows = np.stack([w for w, _ in scaled])
    return (
        torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).as_subclass(PreparedInput),
        cfg.n_patches,
    )


def window_starts(n_frames: int, length: int) -> np.ndarray:
    """The start frames of the windows that cover a scan (:func:`series_windows`).

    Args:
        n_frames: the scan's frames (at the model's TR), at least ``length``.
        length: the window length in frames.

    Returns:
        (W,) int, W = ceil(n_frames / length) evenly spaced starts from 0 to n_frames - length.
    """
    return np.rint(np.linspace(0, n_frames - length, -(-n_frames // length))).astype(int)


def check_batch(model, x, roi_labels: Sequence[str] | None = None, *, scale_checked: bool = False) -> None:
    """Check a prepared batch against the model.

    Warnings (:class:`InputWarning`): ROI labels that differ from the model's; more time points
    than the model uses; statistics unlike the model's normalisation (e.g. raw BOLD with offsets
    of 1e3-1e4 fed to a model trained on scaled data, which gives chance-level results).

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA`.
        x: (B, R, T) prepared input.
        roi_labels: the input's ROI names, or None (not compared).
        scale_checked: the scale was checked already (by ``model.prepare``): skip the statistics.

    Raises:
        DataError: not 3-D, wrong ROI count, too few time points, NaN/Inf, or ROI labels of
            another length.
    """
    cfg = model.config
    x = torch.as_tensor(x)
    if x.ndim != 3:
        raise DataError(
            f"expected a batch of shape (B, R={cfg.n_rois}, T={cfg.n_timepoints}), "
            f"got shape {tuple(x.shape)} (use x[None] for a single subject)"
        )
    B, R, T = x.shape
    if R != cfg.n_rois:
        raise DataError(
            f"input has {R} ROIs but the model was trained on {cfg.n_rois}; use "
            "the same parcellation, with ROIs in the order of the model's "
            "gradients.csv"
        )
    if T < cfg.n_timepoints:
        raise DataError(
            f"input has {T} time points but the model needs {cfg.n_timepoints}; "
            f"use model.prepare(series, tr=...) to resample and window"
        )
    if not bool(torch.isfinite(x).all()):
        raise DataError("input contains NaN or Inf values")
    if T > cfg.n_timepoints:
        warnings.warn(
            f"input has {T} time points; the model uses only the first "
            f"{cfg.n_timepoints} (model.prepare takes the centre window)",
            InputWarning,
            stacklevel=3,
        )
    if roi_labels is not None and model.roi_labels is not None:
        labels = [str(r) for r in roi_labels]
        if len(labels) != R:
            raise DataError(f"{len(labels)} ROI labels given for an input with {R} ROIs")
        if labels != model.roi_labels:
            diff = [i for i, (a, b) in enumerate(zip(labels, model.roi_labels)) if a != b]
            shown = ", ".join(f"#{i} {labels[i]!r} vs {model.roi_labels[i]!r}" for i in diff[:3])
            warnings.warn(
                f"ROI labels differ from the model's at {len(diff)} of {R} "
                f"positions ({shown}); reorder your ROIs to the model's "
                "gradients.csv or results will be meaningless",
                InputWarning,
                stacklevel=3,
            )
    if scale_checked or isinstance(x, PreparedInput):  # model.prepare checked each series
        return
    problem = statistics_problem(x[:, :, : cfg.n_timepoints], model.normalization)
    if problem:
        warnings.warn(problem, InputWarning, stacklevel=3)


def normalization_dict(normalization) -> dict:
    """The dict form of a normalisation given by the user.

    Args:
        normalization: a fitted RobustScaler, a method name without statistics ("zscore",
            "none", ...) or a dict.

    Returns:
        {"method": ..., plus any statistics}.

    Raises:
        ConfigError: a method that needs statistics given by name, or another type.
    """
    if isinstance(normalization, RobustScaler):
        return normalization.to_dict()
    if isinstance(normalization, str):
        if normalization in FITTED_NORMALIZATIONS:
            raise ConfigError(
                f"normalization={normalization!r} needs statistics: pass a fitted "
                "brainjepa.transforms.RobustScaler or its to_dict()"
            )
        return {"method": normalization}
    if isinstance(normalization, dict):
        return dict(normalization)
    raise ConfigError(
        f"normalization must be 'zscore', 'none', a robust dict or a RobustScaler, not {type(normalization).__name__}"
    )


def check_normalization(d: dict, n_rois: int) -> dict:
    """Check a normalisation dict against the model.

    Args:
        d: the normalisation, as in normalization.json.
        n_rois: the model's ROI count.

    Returns:
        ``d`` itself.

    Raises:
        ConfigError: an unknown method or invalid statistics.
        DataError: statistics for another number of ROIs.
    """
    method = d.get("method")
    if method not in NORMALIZATION_METHODS:
        raise ConfigError(f"normalization method must be one of {NORMALIZATION_METHODS}, got {method!r}")
    if d.get("scope", "window") not in SCOPES:
        raise ConfigError(f"normalization scope must be one of {SCOPES}, got {d['scope']!r}")
    if method in FITTED_NORMALIZATIONS:
        normalization_from_dict(d)  # validates median / iqr
        if len(d["median"]) != n_rois:
            raise DataError(
                f"{method} normalization has statistics for {len(d['median'])} ROIs but the model has {n_rois}"
            )
    return d


def _scale_fix(method: str) -> str:
    """What to do when series stay off-scale after the model's own normalisation."""
    if method == "robust":
        return (
            "its statistics are the training cohort's median/IQR per ROI, so series with other "
            "offsets stay off-scale: use a model trained with per-scan centring (pretrain "
            "--set data.normalization=zscore), or fit statistics on your cohort "
            "(model.set_normalization(RobustScaler().fit(series))) knowing the model never saw "
            "that scale"
        )
    if method == "center":
        return (
            "this method removes each scan's offset but keeps its units: bring the series to "
            "the units of the model's training data, or use a model trained with psc (percent "
            "signal change) for unscaled BOLD"
        )
    return "check the series' units and export"


def statistics_problem(x: torch.Tensor, normalization: dict, prepared: bool = False) -> str | None:
    """A message when prepared input looks unlike what the model was trained on.

    Args:
        x: (B, R, T) prepared input (the first 8 samples are looked at).
        normalization: the model's normalisation dict.
        prepared: the input came out of model.prepare (the message then cannot ask for it).

    Returns:
        The message, or None when the input looks right.
    """
    method = normalization["method"]
    if method == "unknown":
        method = normalization.get("expected", "unknown")
    if method == "none":
        return None
    x = x[:8].float()  # a few samples tell enough and keep the check cheap
    q25, med, q75 = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], device=x.device), dim=-1)
    level = float(med.abs().median())  # typical per-ROI offset
    iqr = float((q75 - q25).median())  # typical per-ROI spread
    if prepared:
        fix = "model.prepare applied the model's own normalisation and the series is still off: " + _scale_fix(method)
    else:
        fix = (
            "prepare raw series with model.prepare(series, tr=...), which applies the model's normalisation"
            if normalization["method"] != "unknown"
            else "scale each ROI as the model's training data was (see the note in its "
            "normalization.json), e.g. model.set_normalization(...) then model.prepare(series)"
        )
    if level > 100:
        return (
            f"input looks like raw BOLD signal (typical ROI median {level:.3g}) but the model "
            f"was trained on {method}-scaled data; features will be meaningless (chance-level "
            f"results): {fix}"
        )
    if prepared and method in ("center", "psc") and not PER_SCAN_IQR[0] < iqr < PER_SCAN_IQR[1]:
        return (
            f"after the model's {method} scaling the typical ROI spread (IQR) is {iqr:.3g}, "
            "while its training data had about 1: the series is in other units than the "
            f"training data (e.g. unscaled BOLD for a model trained on scaled data): {fix}"
        )
    if method == "zscore":
        std = float(x.std(dim=-1).median())
        mean = float(x.mean(dim=-1).abs().median())
        if mean > 1 or not 0.25 < std < 4:
            return (
                f"input does not look z-scored per ROI (typical |mean| {mean:.3g}, std "
                f"{std:.3g}) but the model was trained on z-scored data: {fix}"
            )
    elif method in FITTED_NORMALIZATIONS and (level > 5 or not 0.01 < iqr < 20):
        return (
            f"input does not look {method}-scaled (typical ROI |median| {level:.3g}, IQR "
            f"{iqr:.3g}; expected near 0 and 1) but the model was trained on {method}-scaled "
            f"data: {fix}"
        )
    return None


def resampled_input(model, series, tr: float | None, who: str) -> tuple[np.ndarray, str]:
    """A checked series at the model's TR (shared by prepare and prepare_windows).

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA`.
        series: (R, T) raw series.
        tr: its TR in seconds; None: not resampled (with a warning when the model has a TR).
        who: starts every message.

    Returns:
        The (R, T') float32 series, and a note on the resampling for messages ("" when none).

    Raises:
        DataError: wrong shape, NaN/Inf, or absurd magnitudes.
    """
    cfg = model.config
    x = np.asarray(series, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != cfg.n_rois:
        raise DataError(
            f"{who}: expected one subject's (R={cfg.n_rois}, T) series, got "
            f"shape {x.shape}; the model was trained with {cfg.n_rois} ROIs"
        )
    if not np.isfinite(x).all():
        raise DataError(f"{who}: the series contains NaN or Inf values")
    problem = magnitude_problem(x)
    if problem:
        raise DataError(f"{who}: {problem}")
    at = ""
    if model.target_tr is not None:
        if tr is None:
            warnings.warn(
                f"{who}: the model was trained at TR {model.target_tr} s; pass "
                "tr=<seconds> so the series is resampled to it",
                InputWarning,
                stacklevel=3,
            )
        elif not same_tr(tr, model.target_tr):
            n_raw = x.shape[1]
            x = resample_tr(x, tr, model.target_tr)
            at = f" ({n_raw} frames at TR {tr:g} s resampled to the model's TR {model.target_tr:g} s)"
    return x, at


def resolved_normalization(model, normalization=None) -> dict:
    """The normalisation that applies: the model's, or ``normalization`` when given.

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA`.
        normalization: None (the model's), or any form :func:`normalization_dict` takes.

    Returns:
        The normalisation dict (as in normalization.json).
    """
    if normalization is None:
        return model.normalization
    return check_normalization(normalization_dict(normalization), model.config.n_rois)


def window_statistics(model, x: np.ndarray, normalization=None):
    """The whole scan's statistics that its windows are normalised with, or None.

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA`.
        x: (R, T) the whole (resampled) scan.
        normalization: None (the model's), or any form :func:`normalization_dict` takes.

    Returns:
        :func:`~brainjepa.transforms.scan_statistics` of ``x`` when the normalisation is a
        per-scan method in scope ``scan``; None when each window uses its own (scope
        ``window``, the scope of bundles made before scopes existed, or a method without a
        per-scan part).
    """
    norm = resolved_normalization(model, normalization)
    if norm.get("scope", "window") == "scan" and norm["method"] in PER_SCAN_METHODS:
        return scan_statistics(x)
    return None


def normalized_window(model, x: np.ndarray, normalization, who: str, stats=None) -> tuple[np.ndarray, str | None]:
    """One window scaled by the model's normalisation, or by ``normalization`` when given.

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA`.
        x: (R, t) window.
        normalization: None (the model's), or any form :func:`normalization_dict` takes.
        who: starts every message.
        stats: the whole scan's (mean, std) (:func:`window_statistics`), or None: the window's own.

    Returns:
        The scaled (R, t) float32 window, and a message when it is mildly off the training scale
        (None when not).

    Raises:
        ConfigError: no normalisation known (method "unknown").
        DataError: a window the scaling leaves far off (beyond MAX_SCALED_VALUE, or a per-scan
            method's spread more than 10 times off).
    """
    norm = resolved_normalization(model, normalization)
    if norm["method"] == "unknown":
        raise ConfigError(
            f"{who}: this model does not know how its training data was "
            "normalised. " + norm.get("note", OFFICIAL_NORMALIZATION_NOTE)
        )
    method, scaler = normalization_from_dict(norm)
    out = np.ascontiguousarray(normalize(x, method, scaler, stats), dtype=np.float32)
    if method == "none":
        return out, None
    peak = float(np.abs(out).max())
    if not np.isfinite(peak) or peak > MAX_SCALED_VALUE:
        raise DataError(
            f"{who}: after the model's {method} scaling the values reach {peak:.3g} (its training "
            "data lay within a few units of 0): this series is on another scale (unscaled BOLD for "
            "a model whose statistics came from scaled data, other units, another scanner); "
            f"{_scale_fix(method)}"
        )
    if method in ("center", "psc"):
        q25, q75 = np.percentile(out, [25, 75], axis=-1)
        iqr = float(np.median(q75 - q25))
        if not PER_SCAN_IQR_LIMIT[0] < iqr < PER_SCAN_IQR_LIMIT[1]:
            raise DataError(
                f"{who}: after the model's {method} scaling the typical ROI spread (IQR) is "
                f"{iqr:.3g}, more than 10 times off the training data's (about 1): the series is in "
                f"other units than the model was trained on; {_scale_fix(method)}"
            )
    return out, statistics_problem(torch.from_numpy(out)[None], norm, prepared=True)
