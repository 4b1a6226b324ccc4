"""Warmup + cosine schedules, shared by pretraining (learning rate, weight decay) and
fine-tuning (learning rate)."""

from __future__ import annotations

import math


def cosine(start: float, end: float, t: float) -> float:
    """Half a cosine from ``start`` (t = 0) to ``end`` (t = 1); t is clipped to [0, 1]."""
    t = min(max(t, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine(step: int, total: int, warmup: int, peak: float, start: float, final: float) -> float:
    """The value at step ``step`` of ``total`` (0-based).

    Linear from ``start`` (step 0) towards ``peak`` over the first ``warmup`` steps, then a cosine
    from ``peak`` (step ``warmup``) to ``final``, reached at the last step ``total - 1``.
    """
    if step < warmup:
        return start + (peak - start) * step / warmup
    span = total - 1 - warmup
    return cosine(peak, final, 1.0 if span <= 0 else (step - warmup) / span)
