"""Warmup + cosine schedules, shared by pretraining (:class:`Schedule`: learning rate, weight
decay, EMA momentum) and fine-tuning (learning rate)."""

from __future__ import annotations

import math
from dataclasses import dataclass


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


@dataclass
class Schedule:
    """Learning rate, weight decay and EMA momentum at optimizer step s = 0 .. total_steps-1.

    lr: linear warmup start_lr -> lr over ``warmup_steps``, then cosine lr -> final_lr reaching
    final_lr at the last step. weight decay: cosine weight_decay -> final_weight_decay over all
    steps. momentum (applied after step s): linear ema_start -> ema_end, ema_end at the last step.
    """

    total_steps: int
    warmup_steps: int
    lr: float
    start_lr: float
    final_lr: float
    weight_decay: float
    final_weight_decay: float
    ema_start: float
    ema_end: float

    @classmethod
    def from_config(cls, optim: dict, total_steps: int) -> Schedule:
        """Warmup is ``warmup_epochs / epochs`` of the horizon ``total_steps``."""
        warmup = min(round(optim["warmup_epochs"] / optim["epochs"] * total_steps), total_steps)
        return cls(
            total_steps,
            warmup,
            optim["lr"],
            optim["start_lr"],
            optim["final_lr"],
            optim["weight_decay"],
            optim["final_weight_decay"],
            optim["ema_start"],
            optim["ema_end"],
        )

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.lr, self.start_lr, self.final_lr)

    def weight_decay_at(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, 0, self.weight_decay, self.weight_decay, self.final_weight_decay)

    def momentum_at(self, step: int) -> float:
        span = self.total_steps - 1
        t = 1.0 if span <= 0 else min(max(step / span, 0.0), 1.0)
        return self.ema_start + (self.ema_end - self.ema_start) * t
