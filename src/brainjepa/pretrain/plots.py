"""The figures of a pretraining run folder: loss.png and diagnostics.png."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..diagnostics import DIAGNOSTIC_LOSSES
from ..errors import DataError
from ..plotting import pyplot, save_figure
from ..runio import read_metrics


def plot_loss_curve(metrics: str | Path | Sequence[dict], path: str | Path) -> Path:
    """Pretraining loss (and learning rate, when logged) against optimizer step.

    Args:
        metrics: a metrics.jsonl file, or its records; those with a step and a loss are plotted.
        path: the image file to write (loss.png in a run folder).

    Returns:
        ``path``.

    Raises:
        DataError: no record with a step and a loss.
    """
    records = read_metrics(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    records = [r for r in records if "loss" in r and "step" in r]
    if not records:
        raise DataError("no (step, loss) records to plot")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], color="#1f77b4", lw=1.4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("JEPA loss", color="#1f77b4")
    if all("lr" in r for r in records):
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in records], [r["lr"] for r in records], color="0.6", lw=1, ls="--")
        ax2.set_ylabel("learning rate", color="0.45")
    ax.set_title("pretraining")
    return save_figure(fig, path)


def plot_diagnostics_history(metrics: str | Path | Sequence[dict], path: str | Path) -> Path:
    """The training-time diagnostics (``diag_*`` in metrics.jsonl) against optimizer step.

    Args:
        metrics: a metrics.jsonl file, or its records; those with diagnostics are plotted.
        path: the image file to write (diagnostics.png in a run folder).

    Returns:
        ``path``.

    Raises:
        DataError: no diagnostics records (train.diagnose_every was 0).
    """
    records = read_metrics(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    records = [r for r in records if "diag_loss_own" in r]
    if not records:
        raise DataError("no diagnostics records (train.diagnose_every was 0)")
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [r["step"] for r in records]
    for key, label, color in DIAGNOSTIC_LOSSES:
        ax.plot(steps, [r[f"diag_{key}"] for r in records], label=label, color=color, marker="o", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("predictor loss")
    ax.legend(fontsize=7)
    for key, label in (
        ("target_cos", "target token cosine"),
        ("context_cos", "context token cosine"),
        ("position_share", "position share"),
        ("subject_share", "subject share"),
    ):
        ax2.plot(steps, [r[f"diag_{key}"] for r in records], label=label, marker="o", ms=3)
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("optimizer step")
    ax2.legend(fontsize=7)
    return save_figure(fig, path)
