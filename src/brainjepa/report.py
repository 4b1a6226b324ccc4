"""Plots and reports: loss curve, embedding PCA, results bars, network attention, report.md.

Every plot function writes one PNG and returns its path; matplotlib (extra ``viz``) is imported
only here and only when a plot is made, with the file-only Agg backend.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, require
from .evaluate import (
    COMPARISON_COLUMNS,
    METRIC_NAMES,
    MODEL,
    RANDOM_INIT,
    READOUTS,
    _method_rank,
    compare,
    comparison_cells,
    format_p,
    headline_metric,
    infer_task,
    result_grid,
)
from .plotting import pyplot, save_figure
from .runio import read_metrics

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
# pretrained vs random init is called a difference below this paired t-test p value
ALPHA = 0.05
# headline metrics of the results bars, with the chance level drawn as a dashed line
HEADLINE = {"balanced_acc": 0.5, "auroc": 0.5, "pearson_r": 0.0, "r2": 0.0}


def plot_loss_curve(metrics: str | Path | Sequence[dict], path: str | Path) -> Path:
    """Pretraining loss (and learning rate, when logged) against optimizer step."""
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


def pca(X: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(scores (N, k), explained variance ratio (k,)) of the centred rows of X (N, D)."""
    Xc = np.asarray(X, dtype=np.float64) - np.mean(X, axis=0)
    U, s, _ = np.linalg.svd(Xc, full_matrices=False)
    var = s**2
    return U[:, :n_components] * s[:n_components], var[:n_components] / max(var.sum(), 1e-300)


def plot_embedding_pca(
    embeddings: np.ndarray, labels: dict[str, np.ndarray], path: str | Path, title: str = "subject embeddings"
) -> Path:
    """First two principal components of (N, D) embeddings with every dimension standardised
    (as the probes see them), one panel per label, coloured by it (discrete colours for
    classification labels, a colour bar for continuous ones)."""
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
    """Bars of mean +- std over seeds per method, one panel per (target, headline metric):
    balanced ACC and AUROC for classification, Pearson r and R^2 for regression. Single
    random-init seeds (``random_init#k:...``) are left out: their mean and best are shown."""
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
    """Bar plot of attention per network (or ROI); 1.0 (dashed) is the uniform share."""
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
    """Write roi_attention.csv (roi, network, attention), and with networks
    network_attention.csv + network_attention.png, else roi_attention.png."""
    from .evaluate import network_attention

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
    """Attention received per ROI over a cohort's evaluation windows, aggregated per network
    (``networks``: a file for :func:`~brainjepa.evaluate.read_networks`, one name per ROI, or
    None to parse Schaefer-style ROI names), written with :func:`save_attention`."""
    from .evaluate import BrainJEPAEmbedder, CohortSeries, network_labels_from_roi_names, read_networks, roi_attention

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


def results_markdown(rows: list[dict]) -> str:
    """The results as markdown tables, one per target: methods x metrics, 'mean ± std'."""
    out = []
    for target, n, metrics, methods, cell in result_grid(rows):
        out.append(f"**{target}** (test split, mean ± std over {n} seeds)\n")
        out.append("| method | " + " | ".join(METRIC_NAMES.get(m, m) for m in metrics) + " |")
        out.append("|---" * (len(metrics) + 1) + "|")
        out += [f"| {m} | " + " | ".join(cell.get((m, k), "-") for k in metrics) + " |" for m in methods]
        out.append("")
    return "\n".join(out)


def comparisons_markdown(comparisons: list[dict]) -> str:
    """Paired comparisons (:func:`brainjepa.evaluate.comparison_rows`) as a markdown table."""
    if not comparisons:
        return "_no paired comparisons_\n"
    out = ["| " + " | ".join(COMPARISON_COLUMNS) + " |", "|---" * len(COMPARISON_COLUMNS) + "|"]
    out += ["| " + " | ".join(comparison_cells(c)) + " |" for c in comparisons]
    return "\n".join(out) + "\n"


def write_report(path: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write a markdown report: ``# title`` then one ``## heading`` + markdown body per section
    (images are referenced relative to the report's folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = [f"# {title}", ""]
    for heading, body in sections:
        text += [f"## {heading}", "", body.strip(), ""]
    path.write_text("\n".join(text))
    return path


# --------------------------------------------------------------------------- the demo


@dataclass(frozen=True)
class DemoSettings:
    """The simulated study of ``brainjepa demo``. The cohort is simulated at a multiband TR and
    resampled to ``target_tr`` for the model (as the paper does with 0.72 s HCP data); the first
    ``n_pretrain`` subjects pretrain the model without their labels, the other ``n_eval`` are
    held out for probing (never seen in pretraining, as in the paper's held-out cohorts)."""

    n_pretrain: int = 80
    n_eval: int = 160
    n_rois: int = 48
    minutes: float = 6.0
    tr: float = 0.72
    target_tr: float = 2.16
    n_timepoints: int = 96
    steps: int = 400
    batch_size: int = 16
    seeds: int = 5
    patient_effect: float = 0.75  # fraction of within-network coupling patients lose
    # The tiny config narrowed so that pretraining takes a few minutes on a laptop CPU, with the
    # paper's L2 loss. The predictor is one block of two 48-wide heads: with narrow heads (2
    # blocks of 4 heads of width 12) it never read its context within 1,200 steps on this
    # cohort (context gain 0.0%), with wide heads it did from ~step 130 (measured:
    # docs/method.md, "Recipe"). Constant EMA 0.99: the target keeps 2% of its initialisation.
    recipe: tuple[str, ...] = (
        "model.embed_dim=96",
        "model.num_heads=4",
        "model.predictor_embed_dim=96",
        "model.predictor_depth=1",
        "model.predictor_num_heads=2",
        "train.loss=l2",
        "optim.lr=1e-3",
        "optim.ema_start=0.99",
        "optim.ema_end=0.99",
        "optim.final_weight_decay=0.04",
    )

    def overrides(self) -> list[str]:
        return [
            f"model.n_timepoints={self.n_timepoints}",
            f"model.n_gradients={self.n_gradients}",
            f"data.target_tr={self.target_tr}",
            f"optim.batch_size={self.batch_size}",
            "optim.warmup_epochs=1",
            "train.log_every=5",
            f"train.checkpoint_every={self.steps}",
            f"train.diagnose_every={max(self.steps // 8, 1)}",
            "train.keep_last=1",
            *self.recipe,
        ]

    @property
    def n_gradients(self) -> int:
        return min(30, self.n_rois // 2)


QUICK_DEMO = DemoSettings(n_pretrain=40, n_eval=40, n_rois=32, minutes=4.0, n_timepoints=64, steps=20, seeds=3)
# what a demo folder may contain; --overwrite removes exactly these
DEMO_STAGES = ("simulate", "gradients", "pretrain", "diagnose", "embed", "probe", "attention", "report")
DEMO_OUTPUTS = ("data", "run", "figures", "attention", "gradients.csv", "diagnostics.json", "results.json", "report.md")
TARGETS = ("age", "patient")
PATIENT_NETWORK = "Default"
# random initialisations probed next to the pretrained encoder: seeds differ by more than
# pretraining gains on small cohorts, so one seed is no reference
DEMO_RANDOM_INIT_SEEDS = 3


def run_demo(
    out_dir: str | Path = "brainjepa-demo",
    *,
    quick: bool = False,
    seeds: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """The whole method on the built-in simulated cohort, end to end, with a report.

    Simulate -> brain gradients -> pretrain -> embed the held-out subjects (every window, every
    readout, the pretrained and 3 randomly initialised encoders) -> probe 'age' (regression) and
    'patient' (classification) against random init, FC (full scan and model windows) and
    amplitude, with paired comparisons -> attention per network -> ``out_dir/report.md`` with
    figures. Returns {"report", "results" (rows), "comparisons", "table", "comparison_table",
    "timings" (seconds per stage), "wall_time_s"}.
    """
    import dataclasses
    import logging
    import shutil
    import time
    from contextlib import contextmanager

    from .bundle import load_model
    from .data import open_cohort
    from .diagnostics import diagnose_model
    from .errors import ConfigError
    from .evaluate import probe_cohort, probe_features
    from .gradients import BrainGradients, connectivity, plot_gradients, save_gradients_csv
    from .model import count_parameters
    from .pretrain import load_config, pretrain
    from .synthetic import simulate_cohort, write_cohort

    require("sklearn", "eval", "the demo's probes")
    require("matplotlib", "viz", "the demo's figures")
    log = logging.getLogger("brainjepa.demo")
    s = QUICK_DEMO if quick else DemoSettings()
    if seeds is not None:
        s = dataclasses.replace(s, seeds=seeds)
    out = Path(out_dir)
    present = [name for name in DEMO_OUTPUTS if (out / name).exists()]
    if present and not overwrite:
        raise ConfigError(
            f"{out} already holds demo outputs ({', '.join(present)}): pass "
            "--overwrite to replace them, or choose another --out folder"
        )
    for name in present:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}

    @contextmanager
    def stage(name: str, message: str):
        log.info(
            "[%d/%d %s] %s (%.0f s elapsed)",
            len(timings) + 1,
            len(DEMO_STAGES),
            name,
            message,
            time.perf_counter() - start,
        )
        t0 = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - t0

    with stage(
        "simulate", f"simulating {s.n_pretrain + s.n_eval} subjects, {s.n_rois} ROIs, {s.minutes:g} min at TR {s.tr} s"
    ):
        sim = simulate_cohort(
            s.n_pretrain + s.n_eval,
            s.n_rois,
            tr=s.tr,
            minutes=s.minutes,
            seed=0,
            patient_network=PATIENT_NETWORK,
            patient_effect=s.patient_effect,
        )
        parts = {"pretrain": slice(0, s.n_pretrain), "eval": slice(s.n_pretrain, None)}
        manifests = {
            part: write_cohort(
                dataclasses.replace(
                    sim,
                    timeseries=sim.timeseries[sl],
                    subjects=sim.subjects[sl],
                    labels={k: v[sl] for k, v in sim.labels.items()},
                ),
                out / "data" / part,
            )
            for part, sl in parts.items()
        }
        networks = [sim.network_names[k] for k in sim.networks]

    with stage("gradients", f"brain gradients from the group FC of the {s.n_pretrain} pretraining subjects"):
        gradients = (
            BrainGradients(n_components=s.n_gradients).fit(connectivity(sim.timeseries[parts["pretrain"]])).gradients_
        )
        save_gradients_csv(gradients, out / "gradients.csv", sim.roi_labels)
        plot_gradients(gradients, figures / "gradients.png", networks=networks)

    with stage("pretrain", f"pretraining the tiny model for {s.steps} steps of {s.batch_size} windows"):
        config = load_config("tiny", s.overrides() + [f"data.gradients={out / 'gradients.csv'}"])
        summary = pretrain(config, manifests["pretrain"], out / "run", max_steps=s.steps, progress=progress)
        plot_loss_curve(out / "run" / "metrics.jsonl", figures / "loss.png")

    with stage("diagnose", "does the predictor use the context? (held-out subjects)"):
        model = load_model(out / "run")
        cohort = open_cohort(manifests["eval"])
        diagnosis = diagnose_model(model, cohort, batch_size=s.batch_size, n_batches=4)
        (out / "diagnostics.json").write_text(json.dumps(diagnosis, indent=1) + "\n")
        plot_diagnostics(diagnosis, figures / "diagnostics.png")
        history = read_metrics(out / "run" / "metrics.jsonl")
        if any("diag_loss_own" in r for r in history):
            plot_diagnostics_history(history, figures / "diagnostics_history.png")
        for problem in diagnosis["problems"]:
            log.warning("diagnostics: %s", problem)

    with stage(
        "embed",
        f"embedding the {s.n_eval} held-out subjects (pretrained and "
        f"{DEMO_RANDOM_INIT_SEEDS} random-init encoders, all windows, readouts "
        f"{', '.join(READOUTS)}; FC and amplitude baselines)",
    ):
        features = probe_features(
            model, cohort, readouts=READOUTS, random_init_seeds=DEMO_RANDOM_INIT_SEEDS, windows="all", progress=progress
        )
        plot_embedding_pca(
            features[f"{MODEL}:mean"],
            {t: np.asarray(cohort.labels[t]) for t in TARGETS},
            figures / "embedding_pca.png",
            "pretrained embeddings (mean readout)",
        )

    with stage("probe", f"probing {' and '.join(TARGETS)}: {s.seeds} seeds of 60/20/20 splits"):
        results = probe_cohort(
            model,
            cohort,
            TARGETS,
            seeds=s.seeds,
            readouts=READOUTS,
            random_init_seeds=DEMO_RANDOM_INIT_SEEDS,
            windows="all",
            features=features,
            progress=progress,
        )
        results.save(out / "results.json")
        plot_results(results.rows, figures / "results.png")

    with stage("attention", "attention received per ROI and network"):
        attention = cohort_attention(model, cohort, out / "attention", networks=networks, progress=progress)

    with stage("report", "writing the report"):
        body = _demo_sections(
            s,
            sim,
            model,
            summary,
            results,
            attention,
            diagnosis,
            timings,
            time.perf_counter() - start,
            count_parameters(model.encoder),
            out,
        )
        report = write_report(out / "report.md", "brainjepa demo: Brain-JEPA on a simulated cohort", body)
    wall = time.perf_counter() - start
    log.info("demo finished in %.0f s", wall)
    return {
        "report": report,
        "results": results.rows,
        "comparisons": results.comparisons,
        "table": results.table(),
        "comparison_table": results.comparison_table(),
        "timings": timings,
        "wall_time_s": wall,
    }


def paired_differences(records: list[dict], target: str, metric: str, method: str, baseline: str) -> np.ndarray:
    """Per-seed ``method - baseline`` of one metric (both were evaluated on the same splits)."""
    value = {(r["method"], r["seed"]): r["value"] for r in records if r["target"] == target and r["metric"] == metric}
    seeds = sorted({seed for m, seed in value if m == method} & {seed for m, seed in value if m == baseline})
    return np.array([value[(method, s)] - value[(baseline, s)] for s in seeds], dtype=np.float64)


def _best(records: list[dict], target: str, metric: str, prefix: str) -> tuple[str, float] | None:
    """(method, mean over split seeds) of the method named prefix... with the best mean."""
    means = {}
    for r in records:
        if r["target"] == target and r["metric"] == metric and r["method"].startswith(prefix):
            means.setdefault(r["method"], []).append(r["value"])
    scored = [
        (m, float(np.mean([v for v in vals if np.isfinite(v)])))
        for m, vals in means.items()
        if any(np.isfinite(v) for v in vals)
    ]
    return max(scored, key=lambda item: item[1]) if scored else None


def _verdict(c: dict, alpha: float = ALPHA) -> str:
    """How a paired comparison reads: only a two-sided p below ``alpha`` counts as a difference."""
    p = c["p_value"]
    if p is None or not np.isfinite(p):
        return "cannot be told apart from" if c["n"] >= 2 else "cannot be tested (under 2 paired splits) against"
    if p < alpha:
        return "beats" if c["mean_diff"] > 0 else "is worse than"
    return "does not significantly differ from"


def reading(records: list[dict], alpha: float = ALPHA) -> str:
    """One factual line per target: does the pretrained encoder's best readout beat the best
    random-init seed (with any readout) on the headline metric (AUROC or Pearson r), paired over
    split seeds? Both are picked by their mean test score, so neither side gets an advantage;
    the verdict follows the two-sided paired t-test at ``alpha``."""
    lines = []
    for target in dict.fromkeys(r["target"] for r in records):
        metric = headline_metric(records, target)
        model = _best(records, target, metric, MODEL + ":")
        rand = _best(records, target, metric, RANDOM_INIT + SEED_MARK)
        if model is None or rand is None:
            continue
        c = compare(records, target, metric, model[0], rand[0])
        ci = f", 95% CI [{c['ci95_low']:+.3f}, {c['ci95_high']:+.3f}]" if np.isfinite(c["ci95_low"]) else ""
        lines.append(
            f"- **{target}** ({METRIC_NAMES[metric]}): the pretrained encoder's best readout "
            f"`{model[0]}` ({model[1]:.3f}) {_verdict(c, alpha)} the best random-init seed "
            f"`{rand[0]}` ({rand[1]:.3f}): paired difference {c['mean_diff']:+.3f}{ci}, "
            f"paired t-test p {format_p(c['p_value'])}, better on {c['wins']} of {c['n']} splits."
        )
    return "\n".join(lines)


def _diagnosis_text(diagnosis: dict) -> str:
    """The demo's diagnostics section: the numbers, then what they mean, true either way."""
    from .diagnostics import MIN_CONTEXT_GAIN, format_diagnostics

    m = diagnosis["mean"]
    uses = m["context_gain"] >= MIN_CONTEXT_GAIN
    verdict = (
        f"**Yes**: with another subject's context the predictor's loss is "
        f"{100 * m['context_gain']:+.1f}% above its loss with the subject's own context "
        f"(threshold +{100 * MIN_CONTEXT_GAIN:.0f}%), so its predictions depend on whose "
        "brain it sees."
        if uses
        else f"**No**: with another subject's context the predictor's loss changes by only "
        f"{100 * m['context_gain']:+.1f}% (threshold +{100 * MIN_CONTEXT_GAIN:.0f}%): it does "
        "not read the subject from the context, so pretraining cannot teach the encoder "
        "much about the subject."
    )
    return (
        "Measured on the held-out subjects (`brainjepa diagnose`; "
        f"{diagnosis['settings']['n_batches']} batches of {diagnosis['settings']['batch_size']}, "
        "masks as in training; docs/method.md explains each number). "
        + verdict
        + "\n\n```\n"
        + format_diagnostics(diagnosis)
        + "```\n\n![diagnostics](figures/diagnostics.png)"
        "\n\nDuring training (`diag_*` in run/metrics.jsonl):\n\n"
        "![diagnostics over training](figures/diagnostics_history.png)"
    )


def _demo_sections(
    s: DemoSettings,
    sim,
    model,
    summary: dict,
    results,
    attention: dict,
    diagnosis: dict,
    timings: dict,
    wall: float,
    n_params: int,
    out: Path,
) -> list[tuple[str, str]]:
    cfg = model.config
    net_rows = list(csv.DictReader(attention["network_csv"].open()))
    net_table = "\n".join(
        ["| network | attention (1 = uniform) | ROIs |", "|---|---|---|"]
        + [f"| {r['network']} | {float(r['attention']):.4f} | {r['n_rois']} |" for r in net_rows]
    )
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    final_loss = summary.get("final_loss")

    def rel(p):
        return Path(p).relative_to(out).as_posix()

    return [
        (
            "What ran",
            "\n".join(
                [
                    f"- **Cohort** (simulated, `brainjepa.synthetic`): {s.n_pretrain + s.n_eval} subjects, "
                    f"{s.n_rois} ROIs in {len(sim.network_names)} networks, {s.minutes:g} min at TR {s.tr} s, "
                    f"resampled to TR {s.target_tr} s; labels `age` (20-80, lowers global coupling) and "
                    f"`patient` (0/1, weakens coupling inside the {PATIENT_NETWORK} network).",
                    f"- **Pretraining**: the first {s.n_pretrain} subjects, labels unused; tiny config "
                    f"narrowed to width {cfg.embed_dim}, {cfg.depth} layers ({n_params / 1e6:.2f}M encoder "
                    f"parameters); windows of {cfg.n_timepoints} frames = {cfg.n_rois} x {cfg.n_patches} "
                    f"tokens; {summary['steps']} steps of {s.batch_size}; final loss {final_loss:.4f}.",
                    f"- **Evaluation**: the other {s.n_eval} subjects (never seen in pretraining). Each "
                    f"scan is resampled and tiled with evenly spaced {cfg.n_timepoints}-frame windows; "
                    "every window is encoded once and read out three ways: `mean` (mean over tokens + "
                    "LayerNorm, the paper's pooling), `roi` (per-ROI mean and std of each feature over "
                    "time) and `fc` (ROI x ROI correlation of the token features over time, Fisher-z); "
                    "a subject's embedding is the readout averaged over its windows. Closed-form probes "
                    "(ridge / logistic regression, strength chosen on validation) on "
                    f"{s.seeds} random stratified 60/20/20 splits, each test split evaluated once. "
                    "References on the same splits: the same architecture randomly initialised with "
                    f"{DEMO_RANDOM_INIT_SEEDS} seeds (`random_init#k`, their per-split mean "
                    "`random_init(mean)` and the seed with the best mean test score `random_init(best)`, "
                    "an optimistic reference), the Fisher-z FC of the full scan (`fc_full`) and of "
                    "exactly the windows the encoder sees (`fc_window`), and the per-ROI log amplitude "
                    "of the scan (`amplitude`).",
                    f"- **Wall time**: {wall:.0f} s ({timing}).",
                    "- **Scale**: this shows the mechanics at laptop scale (a 0.5M-parameter encoder, "
                    f"{s.steps} steps on {s.n_pretrain} simulated subjects); it is not a benchmark of the "
                    "method, which the paper pretrained (ViT-B, 300 epochs) on ~32k UK Biobank subjects.",
                ]
            ),
        ),
        ("Does the predictor use the context?", _diagnosis_text(diagnosis)),
        (
            "Results",
            "Pretrained against random initialisation, on each target's headline metric "
            f"(paired over the {s.seeds} splits; a difference counts only at p < {ALPHA}):"
            "\n\n"
            + reading(results.records)
            + "\n\n"
            + results_markdown(results.rows)
            + "\n**Paired comparisons**: brainjepa minus each reference per split (mean, 95% t "
            "interval, two-sided paired t-test p, splits won). With few splits these tests have "
            "little power; a p above 0.05 means no detectable difference, not equality.\n\n"
            + comparisons_markdown(results.comparisons)
            + "\n![results](figures/results.png)\n\nAll rows and comparisons, as JSON: "
            "`results.json`.",
        ),
        ("Pretraining loss", "![loss](figures/loss.png)"),
        (
            "Brain gradients",
            "The ROIs in the space of their first connectivity gradients "
            "(coloured by simulated network); these position the ROI tokens.\n\n"
            "![gradients](figures/gradients.png)",
        ),
        (
            "Embeddings",
            "First two principal components of the held-out subjects' pretrained "
            "embeddings (every dimension standardised, as the probes see them)."
            "\n\n![pca](figures/embedding_pca.png)",
        ),
        (
            "Attention per network",
            "Attention each ROI's tokens receive in the pretrained encoder, "
            "averaged over heads, layers, time patches and subjects, then "
            f"per network.\n\n{net_table}\n\n![attention]({rel(attention['png'])})",
        ),
        (
            "The same steps as commands",
            "\n".join(
                [
                    "```bash",
                    f"brainjepa embed --model {out / 'run'} --data {out / 'data/eval/manifest.csv'} --out emb.npz",
                    f"brainjepa probe --model {out / 'run'} --data {out / 'data/eval/manifest.csv'} "
                    "--target age --target patient --out results.json",
                    f"brainjepa finetune --model {out / 'run'} --data {out / 'data/eval/manifest.csv'} "
                    "--target patient --epochs 10 --seeds 2",
                    f"brainjepa attention --model {out / 'run'} --data {out / 'data/eval/manifest.csv'} "
                    f"--networks {out / 'data/eval/rois.tsv'} --out attention",
                    "```",
                ]
            ),
        ),
    ]


# --------------------------------------------------------------------------- diagnostics

_DIAG_LOSSES = (
    ("loss_own", "own context", "#1f77b4"),
    ("loss_other", "another sample's context", "#d62728"),
    ("loss_zero", "all-zero input", "#9e9e9e"),
    ("loss_position", "position-only floor", "#2ca02c"),
)


def plot_diagnostics(result: dict, path: str | Path) -> Path:
    """Bars of :func:`brainjepa.diagnostics.diagnose_model`'s predictor losses and the variance
    shares of the target features."""
    m = result["mean"]
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8, 3.2), gridspec_kw={"width_ratios": [2, 1]})
    ax.bar(range(4), [m[k] for k, _, _ in _DIAG_LOSSES], color=[c for _, _, c in _DIAG_LOSSES])
    ax.set_xticks(range(4), [label for _, label, _ in _DIAG_LOSSES], rotation=15, fontsize=8)
    ax.set_ylabel("predictor loss")
    ax.set_title(f"context reliance (gain {100 * m['context_gain']:+.1f}%)")
    ax2.bar([0, 1], [m["position_share"], m["subject_share"]], color=["#8c564b", "#1f77b4"])
    ax2.set_xticks([0, 1], ["position", "subject"])
    ax2.set_ylim(0, 1)
    ax2.set_title("target variance share")
    return save_figure(fig, path)


def plot_diagnostics_history(metrics: str | Path | Sequence[dict], path: str | Path) -> Path:
    """The training-time diagnostics (``diag_*`` in metrics.jsonl) against optimizer step."""
    records = read_metrics(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    records = [r for r in records if "diag_loss_own" in r]
    if not records:
        raise DataError("no diagnostics records (train.diagnose_every was 0)")
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [r["step"] for r in records]
    for key, label, color in _DIAG_LOSSES:
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
