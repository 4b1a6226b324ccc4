"""Does pretraining pay off? Brain states and traits, objectives, learning curves.

One command regenerates experiments/results/states/ (see experiments/README.md):

1. A simulated cohort with brain states (brainjepa.synthetic.simulate_cohort with task blocks:
   the DorsAttn network is driven, and its coupling strengthened, in blocks of 20-60 s) and the
   usual traits (age, patient). The first ``n_eval`` subjects are held out; the next
   ``n_pretrain`` pretrain (labels and states unused).
2. Conditions, each pretrained with the demo's recipe (DemoSettings) at the window the state
   task needs (48 frames of 0.72 s, patches of 8 frames) and one change: the default
   (normalisation per scan) over 3 pretraining seeds, normalisation per window, the VICReg and
   SIGReg regularisers, targets averaged over the last 2 blocks; and one long run (8x the demo's
   length) whose checkpoints give the learning curves.
3. Every checkpoint is probed on the held-out subjects: brain state per window
   (brainjepa.evaluate.probe_states: readouts mean / roi / fc, random init over 3 seeds, FC,
   amplitude and level of the same window, subject-grouped splits; every window, and apart the
   windows that lie >= 90% inside one block, whose label is not ambiguous) and the traits per subject
   (brainjepa.evaluate.probe_cohort), with the diagnostics (brainjepa.diagnostics.diagnose_model).
4. The long run's checkpoints and the same architecture from scratch are fine-tuned on the
   held-out subjects' age (brainjepa.evaluate.FineTuner defaults, subject splits).
5. Outputs: one JSON per (condition, step), results.md (tables, timings, the command) and
   curves.png (metric vs steps with the random-init band, and the fine-tuning curve).

    python experiments/states.py             # the committed results
    python experiments/states.py --quick     # the same pipeline in a few minutes

Finished stages are reused (a run's checkpoints, a JSON), so an interrupted run continues;
--only NAME runs some conditions ("pure": the pure-window probes of earlier results, "finetune":
the fine-tuning curve); --fresh starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from brainjepa.bundle import load_model
from brainjepa.data import open_cohort
from brainjepa.diagnostics import diagnose_model
from brainjepa.evaluate import (
    HEADLINE_METRIC,
    METRIC_NAMES,
    FineTuner,
    compare,
    finetune_windows,
    probe_cohort,
    run_protocol,
)
from brainjepa.evaluate.features import random_init_like
from brainjepa.evaluate.finetune import DEFAULT_WINDOWS
from brainjepa.evaluate.states import STATE_TARGET, probe_states, scan_means, window_features
from brainjepa.pretrain import load_config, pretrain
from brainjepa.report import DemoSettings
from brainjepa.runio import find_checkpoints
from brainjepa.synthetic import simulate_cohort

log = logging.getLogger("states")
TRAITS = {"age": "regression", "patient": "classification"}
# the state of windows that lie (>= 90%) inside one block: the label is not ambiguous there
PURE_TARGET, PURE = "state (pure windows)", 0.9
TASKS = {STATE_TARGET: "classification", PURE_TARGET: "classification", **TRAITS}
READOUTS = ("mean", "roi", "fc")


@dataclasses.dataclass
class Plan:
    n_eval: int = 160
    n_pretrain: int = 200
    steps: int = 400
    long_steps: int = 3200
    long_evaluate_at: tuple[int, ...] = (400, 800, 1600, 2400, 3200)
    seeds: int = 5
    init_seeds: int = 3
    pretrain_seeds: tuple[int, ...] = (0, 1, 2)
    finetune_seeds: int = 3
    conditions: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("scope=window", ("data.normalization_scope=window",)),
        ("vicreg", ("train.regularizer=vicreg", "train.reg_weight=1.0")),
        ("sigreg", ("train.regularizer=sigreg", "train.reg_weight=10.0")),
        ("target=last2", ("train.target_layers=2",)),
    )


QUICK = Plan(
    n_eval=30,
    n_pretrain=30,
    steps=10,
    long_steps=20,
    long_evaluate_at=(10, 20),
    seeds=3,
    init_seeds=2,
    pretrain_seeds=(0,),
    finetune_seeds=2,
    conditions=(("vicreg", ("train.regularizer=vicreg",)),),
)

# the state task's window: 48 frames at the simulated TR (34.6 s), 6 patches of 8 frames (5.8 s)
STATE_MODEL = ("data.target_tr=0.72", "model.n_timepoints=48", "model.patch_size=8")
TASK = {"task_network": "DorsAttn", "task_drive": 0.015, "task_coupling": 2.0, "block_seconds": (20.0, 60.0)}


def simulate(plan: Plan, demo: DemoSettings, out: Path, task: dict):
    path = out / "cohort.npz"
    n = plan.n_eval + plan.n_pretrain
    if path.exists():
        d = np.load(path)
        made_for = json.loads(str(d["task"]) if "task" in d.files else json.dumps(TASK))  # older: the default
        if made_for != json.loads(json.dumps(task)):
            raise SystemExit(f"{path} was simulated for the task {made_for}, not {task}: use another --out")
        if len(d["x"]) == n:
            return list(d["x"]), {k: d[k] for k in TRAITS}, list(d["states"])
    sim = simulate_cohort(
        n, demo.n_rois, tr=demo.tr, minutes=demo.minutes, seed=1, patient_effect=demo.patient_effect, **task
    )
    x = np.stack(sim.timeseries)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, states=np.stack(sim.states), task=json.dumps(task), **{k: sim.labels[k] for k in TRAITS})
    tmp.replace(path)
    return list(x), {k: sim.labels[k] for k in TRAITS}, sim.states


def config(overrides, steps: int, every: int, seed: int, demo: DemoSettings) -> dict:
    over = [o for o in demo.overrides() if not o.startswith(("data.target_tr", "model.n_timepoints"))]
    return load_config(
        "tiny",
        over
        + [f"data.tr={demo.tr}", *STATE_MODEL, *overrides]
        + [f"train.checkpoint_every={every}", "train.keep_last=100", f"train.seed={seed}"],
    )


def reference_features(model, series, demo, plan, cache: Path):
    """Random-init window features and the window baselines: the same for every condition that
    shares the architecture and the normalisation, so computed once."""
    if cache.exists():
        z = np.load(cache)
        return {k: z[k] for k in z.files if k not in ("scan", "start")}, z["scan"], z["start"]
    encoders = {f"random_init#{k}": random_init_like(model, k) for k in range(plan.init_seeds)}
    feats, scan, start = window_features(encoders, series, demo.tr, readouts=READOUTS, progress=False)
    tmp = cache.with_suffix(".tmp.npz")  # atomic: two processes may share the folder
    np.savez(tmp, scan=scan, start=start, **feats)
    tmp.replace(cache)
    return feats, scan, start


def all_features(model, series, demo, ref) -> tuple:
    """The model's window features next to the references': ``(features, scan, start)``."""
    ref_feats, scan, start = ref
    own, scan2, _ = window_features({"brainjepa": model}, series, demo.tr, readouts=READOUTS, baselines=False)
    if not np.array_equal(scan, scan2):
        raise RuntimeError("the reference windows and the model's windows differ")
    return {**own, **ref_feats}, scan, start


def state_records(model, series, states, demo, plan, features, pure_only=False) -> list[dict]:
    """The state probes of every window and of the pure windows (only those: ``pure_only``)."""
    kw = dict(tr=demo.tr, seeds=plan.seeds, readouts=READOUTS, random_init_seeds=plan.init_seeds, progress=False)
    records = probe_states(model, series, states, features=features, min_purity=PURE, target=PURE_TARGET, **kw).records
    if not pure_only:
        records = probe_states(model, series, states, features=features, **kw).records + records
    return records


def add_pure_states(out: Path, plan: Plan, demo: DemoSettings, series, states) -> None:
    """Probe the pure windows for every checkpoint whose JSON predates that target."""
    held, held_states = series[: plan.n_eval], states[: plan.n_eval]
    for path in sorted(out.glob("*@*.json")):
        r = json.loads(path.read_text())
        if path.name.startswith("finetune-") or any(x["target"] == PURE_TARGET for x in r["records"]):
            continue
        t0 = time.perf_counter()
        model = load_model(find_checkpoints(out / "runs" / path.stem.split("@")[0])[r["step"]])
        scope = "window" if "data.normalization_scope=window" in r["overrides"] else "scan"
        ref = reference_features(model, held, demo, plan, out / f"reference-{scope}.npz")
        features = all_features(model, held, demo, ref)
        r["records"] += state_records(model, held, held_states, demo, plan, features, pure_only=True)
        r["pure_probe_s"] = round(time.perf_counter() - t0)
        path.write_text(json.dumps(r, indent=1, default=float) + "\n")
        log.info("%s: pure windows probed (%d s)", path.name, r["pure_probe_s"])


def evaluate(model, series, labels, states, demo, plan, ref) -> dict:
    t0 = time.perf_counter()
    feats, scan, start = all_features(model, series, demo, ref)
    state_recs = state_records(model, series, states, demo, plan, (feats, scan, start))
    cohort = open_cohort(series, tr=demo.tr, labels=labels)
    # the subject embeddings probe_cohort would make (every window's readout, averaged) and the
    # FC of those windows, from the window features; fc_full and amplitude are computed there
    per_subject = scan_means({k: v for k, v in feats.items() if ":" in k or k == "fc_window"}, scan, len(series))
    res_traits = probe_cohort(
        model,
        cohort,
        list(TRAITS),
        seeds=plan.seeds,
        readouts=READOUTS,
        random_init_seeds=plan.init_seeds,
        progress=False,
        features=per_subject,
    )
    diag = diagnose_model(model, cohort, n_batches=4)
    return {
        "records": state_recs + res_traits.records,
        "diagnostics": diag["mean"],
        "problems": diag["problems"],
        "probe_s": round(time.perf_counter() - t0),
    }


def run_condition(name, overrides, seed, steps, evaluate_at, series, labels, states, plan, demo, out) -> list[dict]:
    """Pretrain one condition in segments, probing each checkpoint in ``evaluate_at`` as soon as
    it exists, so an interrupted run keeps every result so far and continues where it stopped."""
    slug = name.replace("=", "-").replace(" ", "_")
    run = out / "runs" / slug
    cfg = config(overrides, steps, min(evaluate_at), seed, demo)
    held = series[: plan.n_eval]
    held_labels = {k: v[: plan.n_eval] for k, v in labels.items()}
    held_states = states[: plan.n_eval]
    scope = "window" if "data.normalization_scope=window" in overrides else "scan"
    results = []
    for step in evaluate_at:
        path = out / f"{slug}@{step}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
            continue
        t0 = time.perf_counter()
        if step not in find_checkpoints(run):
            pretrain(
                cfg,
                series[plan.n_eval :],
                run,
                max_steps=steps,
                resume=bool(find_checkpoints(run)),
                stop_after=step,
                progress=False,
            )
        pretrain_s = round(time.perf_counter() - t0)
        model = load_model(find_checkpoints(run)[step])
        ref = reference_features(model, held, demo, plan, out / f"reference-{scope}.npz")
        r = evaluate(model, held, held_labels, held_states, demo, plan, ref)
        r.update(condition=name, seed=seed, step=step, overrides=list(overrides), pretrain_s=pretrain_s)
        path.write_text(json.dumps(r, indent=1, default=float) + "\n")
        log.info("%s step %d: %s", name, step, headline(r))
        results.append(r)
    return results


FINETUNE_TARGET = "age"  # fine-tuning is per subject; the state task is per window


def finetune_curve(plan: Plan, demo: DemoSettings, out: Path, series, labels) -> list[dict]:
    """Fine-tune the long run's checkpoints and the same architecture from scratch on the
    held-out subjects' age (brainjepa.evaluate.FineTuner defaults, ``plan.finetune_seeds``
    60/20/20 splits), one JSON per start so an interrupted run continues."""
    checkpoints = find_checkpoints(out / "runs" / "long")
    if not checkpoints:
        raise SystemExit(f"no checkpoints in {out / 'runs' / 'long'}: run the long condition first (--only long)")
    held, y = series[: plan.n_eval], np.asarray(labels[FINETUNE_TARGET][: plan.n_eval], dtype=float)
    starts = [(f"finetune-long@{s}", s) for s in plan.long_evaluate_at if s in checkpoints]
    starts.append(("finetune-scratch", None))
    results = []
    for slug, step in starts:
        path = out / f"{slug}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
            continue
        model = load_model(checkpoints[step if step is not None else min(checkpoints)])
        if step is None:
            model = random_init_like(model, 0)
        t0 = time.perf_counter()
        windows = finetune_windows(model, held, tr=demo.tr, n_windows=DEFAULT_WINDOWS)
        method = "finetune(scratch)" if step is None else "finetune(pretrained)"
        runs = []

        def tuner(seed, model=model, runs=runs):
            ft = FineTuner(model, "regression", seed=seed)
            runs.append(ft)
            return ft

        res = run_protocol(y, {method: (tuner, windows)}, target=FINETUNE_TARGET, task="regression",
                           seeds=plan.finetune_seeds, progress=False)  # fmt: skip
        r = {
            "step": step,
            "records": res.records,
            "epochs": [{"best_epoch": ft.best_epoch_, "epochs_run": len(ft.val_losses_)} for ft in runs],
            "finetune_s": round(time.perf_counter() - t0),
        }
        path.write_text(json.dumps(r, indent=1, default=float) + "\n")
        log.info("%s: age r %.3f (%d s)", slug, mean_std(res.records, FINETUNE_TARGET, "pearson_r", method)[0],
                 r["finetune_s"])  # fmt: skip
        results.append(r)
    return results


def finetune_table(rows: list[dict]) -> str:
    if not rows or rows[-1]["step"] is not None:
        return ""
    scratch = rows[-1]
    a, sd = mean_std(scratch["records"], FINETUNE_TARGET, "pearson_r", "finetune(scratch)")
    lines = [
        f"### fine-tuning, {FINETUNE_TARGET} (r, test split, mean ± std over {len(scratch['epochs'])} split seeds)",
        "",
        f"From scratch (same architecture, random init): {a:.3f} ± {sd:.3f} ({scratch['finetune_s']} s).",
        "",
        "| long run step | finetune(pretrained) | − finetune(scratch) [95% CI], p | best epoch per split "
        "('start': the probe-initialised start was kept) | s |",
        "|---|---|---|---|---|",
    ]
    for r in rows[:-1]:
        m, s = mean_std(r["records"], FINETUNE_TARGET, "pearson_r", "finetune(pretrained)")
        epochs = [str(e["best_epoch"]) if e["best_epoch"] >= 0 else "start" for e in r["epochs"]]
        c = compare(r["records"] + scratch["records"], FINETUNE_TARGET, "pearson_r", "finetune(pretrained)",
                    "finetune(scratch)")  # fmt: skip
        lines.append(
            f"| {r['step']} | {m:.3f} ± {s:.3f} | {c['mean_diff']:+.3f} [{c['ci95_low']:+.3f}, {c['ci95_high']:+.3f}], "
            f"p={c['p_value']:.3f} | {', '.join(epochs)} | {r['finetune_s']} |"
        )
    return "\n".join(lines) + "\n"


def mean_std(records, target, metric, method):
    v = np.array(
        [r["value"] for r in records if r["target"] == target and r["metric"] == metric and r["method"] == method],
        dtype=float,
    )
    return (float(np.nanmean(v)), float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0) if len(v) else (np.nan, 0.0)


def best_readout(records, target, metric, prefix="brainjepa"):
    scores = {}
    for r in records:
        if r["target"] == target and r["metric"] == metric and r["method"].startswith(prefix + ":"):
            scores.setdefault(r["method"], []).append(r["value"])
    return max(scores, key=lambda m: np.nanmean(scores[m])).split(":", 1)[1]


def headline(r: dict) -> str:
    parts = []
    for target, task in TASKS.items():
        m = HEADLINE_METRIC[task]
        ro = best_readout(r["records"], target, m)
        a = mean_std(r["records"], target, m, f"brainjepa:{ro}")[0]
        b = mean_std(r["records"], target, m, f"random_init(best):{ro}")[0]
        parts.append(f"{target} {ro} {a:.3f} vs random {b:.3f}")
    return "; ".join(parts)


BASELINE_COLUMNS = {
    STATE_TARGET: ("fc_window", "amplitude", "level"),
    PURE_TARGET: ("fc_window", "amplitude", "level"),
    **{t: ("fc_full", "fc_window", "amplitude") for t in TRAITS},
}


def table(rows: list[dict], n_splits: int) -> str:
    lines = []
    for target, task in TASKS.items():
        metric = HEADLINE_METRIC[task]
        refs = BASELINE_COLUMNS[target]
        lines += [
            f"### {target} ({METRIC_NAMES[metric]}, mean ± std over {n_splits} split seeds)",
            "",
            "| condition | step | best readout | brainjepa | random init (best of 3) | "
            + " | ".join(refs)
            + " | brainjepa − best random [95% CI], p | context gain |",
            "|" + "---|" * (7 + len(refs)),
        ]
        for r in rows:
            rec = r["records"]
            ro = best_readout(rec, target, metric)
            cells = [r["label"], str(r["step"]), ro]
            for method in (f"brainjepa:{ro}", f"random_init(best):{ro}", *refs):
                m, sd = mean_std(rec, target, metric, method)
                cells.append(f"{m:.3f} ± {sd:.3f}")
            c = compare(rec, target, metric, f"brainjepa:{ro}", f"random_init(best):{ro}")
            cells.append(f"{c['mean_diff']:+.3f} [{c['ci95_low']:+.3f}, {c['ci95_high']:+.3f}], p={c['p_value']:.3f}")
            cells.append(f"{100 * r['diagnostics']['context_gain']:+.1f}%")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def trend(long_rows: list[dict]) -> str:
    """Where the long run's best readout would cross the best random init, extrapolating a line
    in log2(steps) through its checkpoints (a crude projection, stated with its 95% CI)."""
    from scipy import stats

    if len(long_rows) < 3:
        return ""
    lines = [
        "### Trend of the long run (least squares in log2 steps over its checkpoints)",
        "",
        "| target | readout | brainjepa per doubling of steps [95% CI] | gap to best random init at the last step "
        "| projected crossing |",
        "|---|---|---|---|---|",
    ]
    x = np.log2([r["step"] for r in long_rows])
    for target, task in TASKS.items():
        metric = HEADLINE_METRIC[task]
        ro = best_readout(long_rows[-1]["records"], target, metric)
        y = np.array([mean_std(r["records"], target, metric, f"brainjepa:{ro}")[0] for r in long_rows])
        ref = mean_std(long_rows[-1]["records"], target, metric, f"random_init(best):{ro}")[0]
        fit = stats.linregress(x, y)
        half = stats.t.ppf(0.975, len(x) - 2) * fit.stderr
        gap = y[-1] - ref
        if gap >= 0:
            cross = "already above"
        elif fit.slope <= 0:
            cross = "never: the trend is flat or falling"
        else:
            at = 2 ** ((ref - fit.intercept) / fit.slope)
            sure = "" if fit.slope - half > 0 else "; the CI includes no gain at all"
            cross = f"step ~{at:,.0f} ({at / long_rows[-1]['step']:,.0f}x the run){sure}"
        lines.append(
            f"| {target} | {ro} | {fit.slope:+.3f} [{fit.slope - half:+.3f}, {fit.slope + half:+.3f}] "
            f"| {gap:+.3f} | {cross} |"
        )
    return "\n".join(lines) + "\n"


def curves(long_rows: list[dict], ft_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, (len(TASKS) + 3) // 2, figsize=(4.2 * ((len(TASKS) + 3) // 2), 7.2))
    axes = axes.ravel()
    steps = [r["step"] for r in long_rows]
    for ax, (target, task) in zip(axes, TASKS.items()):
        metric = HEADLINE_METRIC[task]
        for ro, color in zip(READOUTS, ("#1f77b4", "#d62728", "#9467bd")):
            vals = [mean_std(r["records"], target, metric, f"brainjepa:{ro}") for r in long_rows]
            ax.errorbar(steps, [v[0] for v in vals], yerr=[v[1] for v in vals], color=color, label=f"brainjepa:{ro}")
            inits = [
                [mean_std(r["records"], target, metric, f"random_init#{k}:{ro}")[0] for k in range(3)]
                for r in long_rows[:1]
            ][0]
            ax.axhspan(min(inits), max(inits), color=color, alpha=0.12)
        for ref, style in zip(BASELINE_COLUMNS[target], (":", "--", "-.")):
            ax.axhline(mean_std(long_rows[0]["records"], target, metric, ref)[0], color="k", ls=style, lw=1, label=ref)
        ax.set_xlabel("pretraining step")
        ax.set_ylabel(METRIC_NAMES[metric])
        ax.set_title(target)
    axes[0].legend(fontsize=6)
    ax = axes[len(TASKS)]
    if ft_rows and ft_rows[-1]["step"] is None:
        vals = [mean_std(r["records"], FINETUNE_TARGET, "pearson_r", "finetune(pretrained)") for r in ft_rows[:-1]]
        ax.errorbar([r["step"] for r in ft_rows[:-1]], [v[0] for v in vals], yerr=[v[1] for v in vals],
                    label="finetune(pretrained)")  # fmt: skip
        m, sd = mean_std(ft_rows[-1]["records"], FINETUNE_TARGET, "pearson_r", "finetune(scratch)")
        ax.axhspan(m - sd, m + sd, color="k", alpha=0.12, label="finetune(scratch), ± std")
        ax.legend(fontsize=7)
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("r")
    ax.set_title(f"fine-tuned on {FINETUNE_TARGET}")
    ax = axes[-1]
    ax.plot(steps, [100 * r["diagnostics"]["context_gain"] for r in long_rows], label="context gain (%)")
    ax.plot(
        steps, [10 * r["diagnostics"].get("effective_rank", np.nan) for r in long_rows], label="10 x effective rank"
    )
    ax.set_xlabel("pretraining step")
    ax.set_title("diagnostics")
    ax.legend(fontsize=7)
    fig.suptitle("Shaded: the spread of 3 random initialisations per readout (same colour)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/results/states", help="output folder")
    p.add_argument("--quick", action="store_true", help="small sizes and few steps (minutes)")
    p.add_argument("--fresh", action="store_true", help="remove earlier results first")
    p.add_argument("--only", nargs="*", help="run only these conditions (names as in the table)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--report-only", action="store_true", help="write the report from the results on disk")
    p.add_argument(
        "--pretrain-seeds",
        type=int,
        help="pretraining seeds 0..N-1 of the default recipe (default 3; 1 with --quick)",
    )
    p.add_argument(
        "--task-drive",
        type=float,
        default=TASK["task_drive"],
        help=f"the task network's external drive in task blocks (default {TASK['task_drive']}; 0: the state "
        "lives only in the coupling)",
    )
    p.add_argument(
        "--task-coupling",
        type=float,
        default=TASK["task_coupling"],
        help=f"the task network's coupling gain in task blocks (default {TASK['task_coupling']})",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("brainjepa").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else Plan()
    if args.pretrain_seeds:
        plan = dataclasses.replace(plan, pretrain_seeds=tuple(range(args.pretrain_seeds)))
    demo = DemoSettings()
    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    task = {**TASK, "task_drive": args.task_drive, "task_coupling": args.task_coupling}
    series, labels, states = simulate(plan, demo, out, task)
    jobs = [(f"default seed={s}", (), s, plan.steps, (plan.steps,)) for s in plan.pretrain_seeds]
    jobs += [(name, over, 0, plan.steps, (plan.steps,)) for name, over in plan.conditions]
    jobs += [("long", (), 0, plan.long_steps, plan.long_evaluate_at)]
    for name, over, seed, steps, evaluate_at in jobs:
        if args.report_only or (args.only and name not in args.only):
            continue
        log.info("condition %s: %d steps (seed %d)", name, steps, seed)
        run_condition(name, over, seed, steps, evaluate_at, series, labels, states, plan, demo, out)
    if not args.report_only and (not args.only or "pure" in args.only):
        add_pure_states(out, plan, demo, series, states)
    if not args.report_only and (not args.only or "finetune" in args.only):
        log.info("fine-tuning the long run's checkpoints and from scratch on %s", FINETUNE_TARGET)
        finetune_curve(plan, demo, out, series, labels)
    # the report: every result on disk, so processes that ran conditions apart share one table
    rows, long_rows = [], []
    for name, *_ in jobs:
        slug = name.replace("=", "-").replace(" ", "_")
        res = sorted((json.loads(f.read_text()) for f in out.glob(f"{slug}@*.json")), key=lambda r: r["step"])
        for r in res:
            r["label"] = name
        if name == "long":
            long_rows = res
        rows += res
    ft_rows = sorted((json.loads(f.read_text()) for f in out.glob("finetune-long@*.json")), key=lambda r: r["step"])
    if (out / "finetune-scratch.json").exists():
        ft_rows.append(json.loads((out / "finetune-scratch.json").read_text()))
    text = table(rows, plan.seeds) + "\n" + trend(long_rows) + "\n" + finetune_table(ft_rows)
    command = "python experiments/states.py" + (" --quick" if args.quick else "")
    if args.pretrain_seeds:
        command += f" --pretrain-seeds {args.pretrain_seeds}"
    if task != TASK:
        command += f" --task-drive {args.task_drive:g} --task-coupling {args.task_coupling:g} --out {args.out}"
    (out / "results.md").write_text(
        f"# Brain states and traits: pretrained vs random init\n\nCommand: `{command}` "
        f"(finished stages are reused; per-stage times below). Cohort: "
        f"{plan.n_pretrain} pretraining + {plan.n_eval} held-out simulated subjects ({task}). "
        f"Window {STATE_MODEL}. Probes: {plan.seeds} split seeds keeping subjects apart, random init "
        f"over {plan.init_seeds} seeds.\n\n{text}\n"
        + "\n".join(
            f"- {r['label']} step {r['step']}: pretraining {r['pretrain_s']} s, probing {r['probe_s']} s"
            + (f" (+ {r['pure_probe_s']} s for the pure windows, added later)" if "pure_probe_s" in r else "")
            for r in rows
        )
        + ("\n\n![curves](curves.png)\n" if long_rows else "\n")
    )
    if long_rows:
        curves(long_rows, ft_rows, out / "curves.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
