"""Figures of evaluation results: embedding PCA, results bars, network attention.

Every plot function writes one PNG and returns its path (matplotlib, extra ``viz``, through
:mod:`brainjepa.plotting`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data import CohortSeries
from ..errors import DataError
from ..evaluate import (
    METRIC_NAMES,
    BrainJEPAEmbedder,
    _method_rank,
    infer_task,
    network_attention,
    network_labels_from_roi_names,
    read_networks,
    roi_attention,
)
from ..plotting import pyplot, save_figure

# by the method's base name (before ':<readout>'); fine-tuning's names included
METHOD_COLORS = {
    "brainjepa": "#1f77b4",
    "random_init": "#9e9e9e",
    "random_init(best)": "#6e6e6e",
    "random_init(mean)": "#b8b8b8",
    "fc_baseline": "#ff7f0e",
    "fc_full": "#ff7f0e",
    "fc_window": "#ffbb78",
    "amplitude": "#2ca02c",
}
# the random-init summaries and the seeds behind them: bars and the demo show the summaries
SEED_MARK = "#"
# headline metrics of the results bars, with the chance level drawn as a dashed line
HEADLINE = {"balanced_acc": 0.5, "auroc": 0.5, "pearson_r": 0.0, "r2": 0.0}


def pca(X: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of the centred rows of X.

    Args:
        X: (N, D) data.
        n_components: k, the components to keep.

    Returns:
        (scores (N, k), explained variance ratio (k,)).
    """
    Xc = np.asarray(X, dtype=np.float64) - np.mean(X, axis=0)
    U, s, _ = np.linalg.svd(Xc, full_matrices=False)
    var = s**2
    return U[:, :n_components] * s[:n_components], var[:n_components] / max(var.sum(), 1e-300)


def plot_embedding_pca(
    embeddings: np.ndarray, labels: dict[str, np.ndarray], path: str | Path, title: str = "subject embeddings"
) -> Path:
    """Plot the first two principal components of subject embeddings.

    Every dimension is standardised first (as the probes see them); one panel per label,
    coloured by it (discrete colours for classification labels, a colour bar for continuous
    ones).

    Args:
        embeddings: (N, D) embeddings.
        labels: {name: (N,) labels}, one panel each.
        path: the PNG to write.
        title: the start of every panel's title.

    Returns:
        The path written.
    """
    X = np.asarray(embeddings, dtype=np.float64)
    scores, ratio = pca((X - X.mean(axis=0)) / np.maximum(X.std(axis=0), 1e-12))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(labels), figsize=(4.3 * len(labels), 3.8), squeeze=False)
    for ax, (name, values) in zip(axes[0], labels.items()):
        values = np.asarray(values)
        if infer_task(values) == "classification":
            for k in np.unique(values):
                m = values == k
                ax.scatter(scores[m, 0], scores[m, 1], s=16, label=f"{name}={k}", alpha=0.8)
            ax.legend(fontsize=7)
        else:
            sc = ax.scatter(scores[:, 0], scores[:, 1], c=values.astype(float), s=16, cmap="viridis")
            fig.colorbar(sc, ax=ax, label=name)
        ax.set_xlabel(f"PC1 ({ratio[0]:.0%})")
        ax.set_ylabel(f"PC2 ({ratio[1]:.0%})")
        ax.set_title(f"{title}: {name}", fontsize=9)
    return save_figure(fig, path)


def plot_results(rows: list[dict], path: str | Path) -> Path:
    """Plot bars of mean +- std over seeds per method.

    One panel per (target, headline metric): balanced ACC and AUROC for classification,
    Pearson r and R^2 for regression, each with its chance level as a dashed line. Single
    random-init seeds (``random_init#k:...``) are left out: their mean and best are shown.

    Args:
        rows: summary rows (:attr:`brainjepa.evaluate.Results.rows`).
        path: the PNG to write.

    Returns:
        The path written.

    Raises:
        DataError: the rows have none of those metrics.
    """
    panels = [
        (t, m)
        for t in dict.fromkeys(r["target"] for r in rows)
        for m in HEADLINE
        if any(r["target"] == t and r["metric"] == m for r in rows)
    ]
    if not panels:
        raise DataError("no headline metrics (balanced_acc, auroc, pearson_r, r2) in the results")
    plt = pyplot()
    n_bars = max(len({r["method"] for r in rows if SEED_MARK not in r["method"]}), 3)
    fig, axes = plt.subplots(1, len(panels), figsize=((0.25 * n_bars + 1.2) * len(panels), 4.2), squeeze=False)
    for ax, (target, metric) in zip(axes[0], panels):
        sel = {
            r["method"]: r
            for r in rows
            if r["target"] == target and r["metric"] == metric and SEED_MARK not in r["method"]
        }
        methods = sorted(sel, key=_method_rank)
        means = [sel[m]["mean"] if sel[m]["mean"] is not None else np.nan for m in methods]
        ax.bar(
            range(len(methods)),
            means,
            yerr=[sel[m]["std"] or 0 for m in methods],
            capsize=2,
            color=[METHOD_COLORS.get(m.split(":")[0], "#8c564b") for m in methods],
        )
        ax.axhline(HEADLINE[metric], color="k", ls="--", lw=0.8)
        ax.set_xticks(range(len(methods)), [m.replace(":", "\n") for m in methods], fontsize=6, rotation=90)
        ax.set_title(f"{target}: {METRIC_NAMES[metric]}", fontsize=9)
    fig.suptitle(f"test metrics, mean ± std over {max(r['n_seeds'] for r in rows)} seeds", fontsize=9)
    return save_figure(fig, path)


def plot_attention(
    names: Sequence[str], values: Sequence[float], path: str | Path, title: str = "attention received per network"
) -> Path:
    """Plot attention received per network (or ROI) as bars; 1.0 (dashed) is the uniform share.

    Args:
        names: the networks (or ROIs).
        values: their attention, relative to the uniform share.
        path: the PNG to write.
        title: the figure's title.

    Returns:
        The path written.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(names) + 1.5), 3.4))
    ax.bar(range(len(names)), values, color="#1f77b4")
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xticks(
        range(len(names)),
        list(names),
        rotation=45 if len(names) > 6 else 0,
        ha="right" if len(names) > 6 else "center",
        fontsize=7,
    )
    lo, hi = float(np.min(values)), float(np.max(values))
    pad = max(hi - lo, 1e-3) * 0.5
    ax.set_ylim(max(0.0, lo - pad), hi + pad)  # differences are small; zoom in on them
    ax.set_ylabel("attention received (1 = uniform)")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def save_attention(
    out_dir: str | Path, roi_values: np.ndarray, roi_labels: Sequence[str] | None, networks: Sequence[str] | None
) -> dict[str, Path]:
    """Write attention per ROI, and per network when networks are known, as tables and a figure.

    Files in ``out_dir``: roi_attention.csv (roi, network, attention), and with ``networks``
    network_attention.csv (network, attention, n_rois) and network_attention.png, else
    roi_attention.png.

    Args:
        out_dir: the folder (created).
        roi_values: (R,) attention received per ROI (1 = uniform).
        roi_labels: the ROI names, or None for roi0, roi1, ...
        networks: the network of each ROI, or None.

    Returns:
        {"roi_csv", "png", and with networks "network_csv"}: the paths written.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    roi_labels = list(roi_labels) if roi_labels is not None else [f"roi{i}" for i in range(len(roi_values))]
    paths = {"roi_csv": out / "roi_attention.csv"}
    with paths["roi_csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["roi", "network", "attention"])
        for i, v in enumerate(roi_values):
            w.writerow([roi_labels[i], networks[i] if networks is not None else "", f"{v:.6f}"])
    if networks is None:
        paths["png"] = plot_attention(roi_labels, roi_values, out / "roi_attention.png", "attention received per ROI")
        return paths
    table = network_attention(roi_values, networks)
    paths["network_csv"] = out / "network_attention.csv"
    with paths["network_csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["network", "attention", "n_rois"])
        w.writerows([[t["network"], f"{t['attention']:.6f}", t["n_rois"]] for t in table])
    paths["png"] = plot_attention(
        [t["network"] for t in table], [t["attention"] for t in table], out / "network_attention.png"
    )
    return paths


def cohort_attention(
    model,
    cohort,
    out_dir: str | Path,
    *,
    networks: str | Path | Sequence[str] | None = None,
    max_subjects: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Attention received per ROI over a cohort's evaluation windows, aggregated per network.

    Each subject's centre window is encoded; the result is written with :func:`save_attention`.

    Args:
        model: the model (a :class:`~brainjepa.bundle.BrainJEPA`).
        cohort: the cohort.
        out_dir: the output folder.
        networks: a file for :func:`~brainjepa.evaluate.read_networks`, one name per ROI, or
            None to parse Schaefer-style ROI names (names that do not parse: per ROI only).
        max_subjects: use only the first this many subjects (None: all).
        batch_size: windows per forward pass.
        device: where to encode.
        progress: show a progress bar.

    Returns:
        The paths :func:`save_attention` wrote.
    """

    roi_labels = model.roi_labels or cohort.roi_labels
    if isinstance(networks, (str, Path)):
        networks = read_networks(networks, roi_labels, model.config.n_rois)
    elif networks is None:
        networks = network_labels_from_roi_names(roi_labels)
    n = len(cohort) if max_subjects is None else min(max_subjects, len(cohort))
    series = CohortSeries(cohort, np.arange(n))
    windows = BrainJEPAEmbedder(model, batch_size=batch_size).windows(series, series.trs())
    values = roi_attention(model.encoder, windows, batch_size=batch_size, device=device, progress=progress)
    return save_attention(out_dir, values, roi_labels, networks)
