"""Warmup + cosine schedules, shared by pretraining (:class:`Schedule`: learning rate, weight
decay, EMA momentum) and fine-tuning (learning rate)."""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(start: float, end: float, t: float) -> float:
    """Half a cosine from ``start`` (t = 0) to ``end`` (t = 1).

    Args:
        start: the value at t = 0.
        end: the value at t = 1.
        t: the position; clipped to [0, 1].

    Returns:
        The value at ``t``.
    """
    t = min(max(t, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine(step: int, total: int, warmup: int, peak: float, start: float, final: float) -> float:
    """A linear warmup followed by a cosine decay, at one step.

    Linear from ``start`` (step 0) towards ``peak`` over the first ``warmup`` steps, then a cosine
    from ``peak`` (step ``warmup``) to ``final``, reached at the last step ``total - 1`` (and
    kept after it).

    Args:
        step: the step, 0-based.
        total: the number of steps.
        warmup: the number of warmup steps (0: none).
        peak: the value at the end of the warmup.
        start: the value at step 0.
        final: the value at the last step.

    Returns:
        The value at ``step``.
    """
    if step < warmup:
        return start + (peak - start) * step / warmup
    return cosine(peak, final, _progress(step, warmup, total - 1))


def _progress(step: int, first: int, last: int) -> float:
    """Where ``step`` lies from ``first`` (0) to ``last`` (1), clipped; 1 when they coincide."""
    return 1.0 if last <= first else min(max((step - first) / (last - first), 0.0), 1.0)


@dataclass
class Schedule:
    """Learning rate, weight decay and EMA momentum at optimizer step s = 0 .. total_steps-1.

    lr: linear warmup start_lr -> lr over ``warmup_steps``, then cosine lr -> final_lr reaching
    final_lr at the last step. weight decay: cosine weight_decay -> final_weight_decay over all
    steps. momentum (applied after step s): linear ema_start -> ema_end, ema_end at the last step.

    Attributes:
        total_steps: the number of optimizer steps of the run.
        warmup_steps: the number of learning-rate warmup steps.
        lr: the peak learning rate, reached at the end of the warmup.
        start_lr: the learning rate at step 0.
        final_lr: the learning rate at the last step.
        weight_decay: the weight decay at step 0.
        final_weight_decay: the weight decay at the last step.
        ema_start: the EMA momentum after step 0.
        ema_end: the EMA momentum after the last step.
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
        """The schedule of a config's ``optim`` section over ``total_steps`` steps.

        The warmup is the fraction ``warmup_epochs / epochs`` of ``total_steps`` (rounded, at most
        ``total_steps``).

        Args:
            optim: the ``optim`` section: ``epochs``, ``warmup_epochs``, ``lr``, ``start_lr``,
                ``final_lr``, ``weight_decay``, ``final_weight_decay``, ``ema_start``,
                ``ema_end``.
            total_steps: the horizon, in optimizer steps.

        Returns:
            The schedule.
        """
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
        """The learning rate at a step.

        Args:
            step: the optimizer step, 0-based.

        Returns:
            The learning rate (warmup, then cosine).
        """
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.lr, self.start_lr, self.final_lr)

    def weight_decay_at(self, step: int) -> float:
        """The weight decay at a step.

        Args:
            step: the optimizer step, 0-based.

        Returns:
            The weight decay (cosine over all steps, no warmup).
        """
        return warmup_cosine(step, self.total_steps, 0, self.weight_decay, self.weight_decay, self.final_weight_decay)

    def momentum_at(self, step: int) -> float:
        """The EMA momentum to apply after a step.

        Args:
            step: the optimizer step, 0-based.

        Returns:
            The momentum (linear from ``ema_start`` to ``ema_end``, clipped at both ends).
        """
        return self.ema_start + (self.ema_end - self.ema_start) * _progress(step, 0, self.total_steps - 1)
