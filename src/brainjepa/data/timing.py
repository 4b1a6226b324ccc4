"""Repetition times and cohort checks against a model: the TR to train at
(:func:`resolve_target_tr`) and whether a cohort can be embedded by a model
(:func:`check_cohort_for_model`)."""

from __future__ import annotations

import logging

import numpy as np

from ..errors import DataError
from ..transforms import resampled_length, same_tr
from .scaling import report_scaling

log = logging.getLogger(__name__)


def _tr_list(trs) -> str:
    """TRs and how many scans have each, for messages: '2 s (3 scans), 0.72 s (1 scan)'."""
    counts: dict[float, int] = {}
    for t in trs:
        key = next((k for k in counts if same_tr(k, t)), t)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{t:g} s ({n} scan{'s' if n > 1 else ''})" for t, n in sorted(counts.items()))


def resolve_target_tr(setting, cohort, indices=None) -> float | None:
    """The TR to train at, from the ``data.target_tr`` setting and the TRs of the scans.

    ``"auto"``: when every scan shares one TR, that TR; when they differ, the coarsest of them
    (every scan is then resampled to it: downsampling low-passes, never invents frequencies the
    coarser scans lack, and a window spans the same seconds for every subject), said in the log.
    When no scan has a TR, None (windows are counted in frames). A number is returned as it is;
    None (native TR) is kept, with a warning when the TRs differ.

    Args:
        setting: ``"auto"``, a TR in seconds, or None.
        cohort: the cohort.
        indices: the scans (default: all).

    Returns:
        The TR in seconds, or None for each scan's own.

    Raises:
        DataError: under ``"auto"``, a scan without a known TR in a cohort whose other scans
            have one (named in the message).
    """
    idx = np.arange(len(cohort)) if indices is None else np.asarray(indices, dtype=np.int64)
    trs = [cohort.tr(int(i)) for i in idx]
    known = [t for t in trs if t is not None]
    distinct = []
    for t in known:
        if not any(same_tr(t, d) for d in distinct):
            distinct.append(t)
    if setting is None:
        if len(distinct) > 1:
            log.warning(
                "data.target_tr is null: scans are used at their own TRs (%s), so a window "
                "spans different durations in different subjects; set data.target_tr=auto "
                "(or seconds) to resample them to one TR",
                _tr_list(known),
            )
        return None
    if setting != "auto":
        return float(setting)
    if not known:
        log.info(
            "no scan has a known TR: windows are counted in frames (give a TR with --tr, a tr "
            "column or sidecars to train at a defined TR)"
        )
        return None
    missing = [int(i) for i, t in zip(idx, trs) if t is None]
    if missing:
        more = f" (and that of {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(
            f"{cohort.name(missing[0])}: no TR known (no RepetitionTime sidecar, tr column "
            f"or --tr), but other scans have TRs ({_tr_list(known)}), so it cannot be "
            f"aligned with them; give its TR{more}, "
            "or set data.target_tr explicitly"
        )
    target = max(distinct)
    if len(distinct) > 1:
        log.info(
            "data.target_tr auto: the scans have different TRs (%s); resampling every scan to "
            "%g s, the coarsest (set data.target_tr to choose another)",
            _tr_list(known),
            target,
        )
    else:
        log.info("data.target_tr auto: every scan has TR %g s", target)
    return float(target)


def check_cohort_for_model(model, cohort) -> None:
    """Check a cohort before embedding, probing or fine-tuning with a model.

    Every scan must have a TR when the model has one, and at least one time patch of frames at
    the model's TR (a scan shorter than the model's window is embedded from its valid patches);
    the cohort's raw scale is reported against the model's normalisation
    (:func:`~brainjepa.data.report_scaling`).

    Args:
        model: the model (its ``config.patch_size``, ``target_tr`` and ``normalization``).
        cohort: the cohort.

    Raises:
        DataError: naming the first scan without a TR or too short.
        ConfigError: the cohort's scale cannot go into the model (see
            :func:`~brainjepa.data.scaling_report`).
    """
    target = getattr(model, "target_tr", None)
    for i in range(len(cohort)):
        check_scan_for_model(model, cohort.name(i), cohort.tr(i), cohort.length(i))
    trs = {round(t, 6) for t in cohort.trs if t is not None}
    if target is not None and len(trs) > 1:
        log.info(
            "the scans have TRs %s; each is resampled from its own TR to the model's %g s",
            _tr_list([t for t in cohort.trs if t is not None]),
            target,
        )
    method = (getattr(model, "normalization", None) or {}).get("method", "unknown")
    if method != "unknown":
        report_scaling(cohort, method, what="model")


def check_scan_for_model(model, name: str, tr: float | None, frames: int) -> None:
    """Check one scan's TR and length against a model (see :func:`check_cohort_for_model`).

    Args:
        model: the model (its ``config.patch_size`` and ``target_tr``).
        name: the scan's file or subject, for messages.
        tr: its TR in seconds, or None when unknown.
        frames: its number of time points at its own TR.

    Raises:
        DataError: naming the scan, when it has no TR and the model has one, or when it holds
            fewer than one time patch at the model's TR.
    """
    target = getattr(model, "target_tr", None)
    patch = model.config.patch_size
    n = frames
    if target is not None:
        if tr is None:
            raise DataError(
                f"{name}: no TR known (no RepetitionTime sidecar, tr column "
                f"or --tr), but the model works at TR {target:g} s and each scan is "
                "resampled from its own TR; give the TR with --tr or a tr column"
            )
        if not same_tr(tr, target):
            n = resampled_length(frames, tr, target)
    if n < patch:
        at = (
            f" at the model's TR {target:g} s (from {frames} at {tr:g} s)"
            if target is not None and not same_tr(tr, target)
            else ""
        )
        raise DataError(
            f"{name}: {n} time points{at}, fewer than one time patch "
            f"of the model ({patch}); use a longer scan or leave this one out"
        )
