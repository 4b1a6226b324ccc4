"""``brainjepa demo``: the whole method on the built-in simulated cohort, with a report."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import load_model
from ..data import CohortSeries, open_cohort
from ..diagnostics import MIN_CONTEXT_GAIN, count_parameters, diagnose_model, format_diagnostics, plot_diagnostics
from ..errors import ConfigError, require
from ..evaluate import (
    MODEL,
    RANDOM_INIT,
    READOUTS,
    cohort_states,
    probe_cohort,
    probe_states,
    random_init_like,
    scan_means,
    window_features,
)
from ..gradients import BrainGradients, connectivity, plot_gradients, save_gradients_csv
from ..pretrain import load_config, pretrain
from ..pretrain.plots import plot_diagnostics_history, plot_loss_curve
from ..runio import read_metrics
from ..synthetic import simulate_cohort, write_cohort
from .plots import cohort_attention, plot_embedding_pca, plot_results
from .report import ALPHA, comparisons_markdown, reading, results_markdown, write_report


@dataclass(frozen=True)
class DemoSettings:
    """The simulated study of ``brainjepa demo``. The cohort is simulated at a multiband TR (the
    model keeps it: its windows must be short enough to hold one brain state); the first
    ``n_pretrain`` subjects pretrain the model without their labels, the other ``n_eval`` are
    held out for probing (never seen in pretraining, as in the paper's held-out cohorts).

    Args:
        n_pretrain: subjects that pretrain the model (labels unused).
        n_eval: held-out subjects that are probed.
        n_rois: ROIs of the simulated cohort.
        minutes: scan length in minutes.
        tr: the simulated repetition time in seconds.
        target_tr: the model's repetition time in seconds.
        n_timepoints: frames per model window (at ``target_tr``): 48 frames of 0.72 s, about the
            length of a task block, so that a window has one brain state.
        patch_size: frames per token (8 frames, 5.8 s).
        steps: pretraining steps.
        batch_size: windows per pretraining step (and subjects per diagnostics batch).
        seeds: split seeds of the probes.
        patient_effect: the fraction of within-network coupling patients lose.
        task_network: the network whose state changes in task blocks (brain states).
        task_drive: its external input in task blocks (0: none).
        task_coupling: the gain of its internal coupling in task blocks.
        block_seconds: the shortest and longest block in seconds.
        recipe: config overrides that narrow the tiny config so that pretraining takes a few
            minutes on a laptop CPU (one wide-headed predictor block, the L2 loss, constant
            EMA 0.99).
    """

    n_pretrain: int = 80
    n_eval: int = 160
    n_rois: int = 48
    minutes: float = 6.0
    tr: float = 0.72
    target_tr: float = 0.72
    n_timepoints: int = 48
    patch_size: int = 8
    steps: int = 400
    batch_size: int = 16
    seeds: int = 5
    patient_effect: float = 0.75  # fraction of within-network coupling patients lose
    # brain states: the scans alternate between rest and blocks of 20-60 s in which the coupling
    # within one network is 5x stronger, with no external drive: the state lives in the window's
    # second-order structure, not in its level (with a drive, the raw window's level decodes the
    # state better than any encoder; measured in docs/method.md, "Brain states and traits")
    task_network: str = "DorsAttn"
    task_drive: float = 0.0
    task_coupling: float = 4.0
    block_seconds: tuple[float, float] = (20.0, 60.0)
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
        """The config overrides of the demo's pretraining run.

        Returns:
            ``key=value`` strings for :func:`~brainjepa.pretrain.load_config` with the ``tiny``
            config: window length, gradients, TR, batch size, logging, checkpoint and
            diagnostics intervals, then :attr:`recipe`.
        """
        return [
            f"model.n_timepoints={self.n_timepoints}",
            f"model.patch_size={self.patch_size}",
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
        """Brain gradients that position the ROI tokens: half the ROIs, at most 30."""
        return min(30, self.n_rois // 2)


QUICK_DEMO = DemoSettings(n_pretrain=40, n_eval=40, n_rois=32, minutes=4.0, steps=20, seeds=3)
# what a demo folder may contain; --overwrite removes exactly these
DEMO_STAGES = ("simulate", "gradients", "pretrain", "diagnose", "embed", "probe", "attention", "report")
DEMO_OUTPUTS = ("data", "run", "figures", "attention", "gradients.csv", "diagnostics.json", "results.json", "report.md")
TARGETS = ("age", "patient")
STATE_LAG = 6.0  # seconds between a block and the BOLD it labels
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
    figures.

    Args:
        out_dir: the output folder (see :data:`DEMO_OUTPUTS` for what it receives).
        quick: the small settings :data:`QUICK_DEMO` (a smoke test) instead of
            :class:`DemoSettings`'s defaults.
        seeds: split seeds of the probes (None: the settings').
        overwrite: replace earlier demo outputs in ``out_dir``.
        progress: show progress bars.

    Returns:
        {"report" (its path), "results" (summary rows), "comparisons", "table",
        "comparison_table", "timings" (seconds per stage), "wall_time_s"}.

    Raises:
        ConfigError: ``out_dir`` already holds demo outputs and ``overwrite`` is not set.
        BrainJEPAError: scikit-learn or matplotlib is not installed.
    """

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
            task_network=s.task_network,
            task_drive=s.task_drive,
            task_coupling=s.task_coupling,
            block_seconds=s.block_seconds,
        )
        parts = {"pretrain": slice(0, s.n_pretrain), "eval": slice(s.n_pretrain, None)}
        manifests = {
            part: write_cohort(
                dataclasses.replace(
                    sim,
                    timeseries=sim.timeseries[sl],
                    subjects=sim.subjects[sl],
                    labels={k: v[sl] for k, v in sim.labels.items()},
                    states=sim.states[sl],
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
        f"encoding every window of the {s.n_eval} held-out subjects (pretrained and "
        f"{DEMO_RANDOM_INIT_SEEDS} random-init encoders, readouts {', '.join(READOUTS)}; FC, "
        "amplitude and level of each window)",
    ):
        encoders = {
            MODEL: model,
            **{f"{RANDOM_INIT}#{k}": random_init_like(model, k) for k in range(DEMO_RANDOM_INIT_SEEDS)},
        }
        windows = window_features(encoders, CohortSeries(cohort), cohort.trs, readouts=READOUTS, progress=progress)
        # a subject's embedding is its windows' readouts averaged (and fc_window their FC)
        features = scan_means(
            {k: v for k, v in windows[0].items() if ":" in k or k == "fc_window"}, windows[1], len(cohort)
        )
        plot_embedding_pca(
            features[f"{MODEL}:mean"],
            {t: np.asarray(cohort.labels[t]) for t in TARGETS},
            figures / "embedding_pca.png",
            "pretrained embeddings (mean readout)",
        )

    with stage(
        "probe",
        f"probing {' and '.join(TARGETS)} per subject and the brain state per window: {s.seeds} seeds of "
        "60/20/20 splits",
    ):
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
        states = probe_states(
            model,
            CohortSeries(cohort),
            cohort_states(cohort, "events"),
            tr=cohort.trs,
            subjects=cohort.subjects,
            lag=STATE_LAG,
            seeds=s.seeds,
            readouts=READOUTS,
            random_init_seeds=DEMO_RANDOM_INIT_SEEDS,
            progress=progress,
            features=windows,
        )
        results.extend(states)
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


def _diagnosis_text(diagnosis: dict) -> str:
    """The demo's diagnostics section: the numbers, then what they mean, true either way."""

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
                    f"{s.n_rois} ROIs in {len(sim.network_names)} networks, {s.minutes:g} min at TR {s.tr} s; "
                    f"subject labels `age` (20-80, lowers global coupling) and `patient` (0/1, weakens "
                    f"coupling inside the {PATIENT_NETWORK} network); and brain states within each scan: "
                    f"rest alternates with task blocks of {s.block_seconds[0]:g}-{s.block_seconds[1]:g} s in "
                    f"which the coupling within the {s.task_network} network is {1 + s.task_coupling:g}x "
                    "stronger"
                    + (f" and the network is driven (input {s.task_drive:g})" if s.task_drive else "")
                    + " (written as BIDS events files, the manifest's `events` column).",
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
                    f"- **Brain states** (target `state`): every window is one sample, labelled by the "
                    f"state that fills most of it {STATE_LAG:g} s later (the hemodynamic delay); the "
                    "same readouts and random inits, probed per window on splits that keep a subject's "
                    "windows together, against the FC, the per-ROI log amplitude and the per-ROI "
                    "`level` (mean relative to the scan) of the same window.",
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
