"""Does pretraining learn the brain? The evidence suite (see experiments/README.md).

One command regenerates experiments/results/: a simulated cohort (brainjepa.synthetic), the tiny
model pretrained with the default recipe on 100 / 400 / 1,600 subjects, and the paper's two
ablations at 400 subjects (positions: gradients vs sine-cosine of the ROI index vs learned;
masking: spatiotemporal vs random). Every model is probed on the same 300 held-out subjects with
the product's protocol (brainjepa.evaluate.probe_cohort: readouts mean / roi / fc, random init
over 3 seeds, FC on the full scan and on the model's windows, per-ROI amplitude, 5 split seeds,
paired comparisons) and diagnosed (brainjepa.diagnostics.diagnose_model).

    python experiments/suite.py                  # the committed results (about an hour on 2 cores)
    python experiments/suite.py --quick          # a few minutes: small sizes, few steps

Finished stages are kept (a run folder with a bundle, a results JSON), so an interrupted suite
continues where it stopped; --fresh starts over.
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
from brainjepa.evaluate import HEADLINE_METRIC, METRIC_NAMES, compare, probe_cohort
from brainjepa.pretrain import load_config, pretrain
from brainjepa.report import DemoSettings
from brainjepa.synthetic import simulate_cohort

log = logging.getLogger("suite")
TARGETS = {"age": "regression", "patient": "classification"}
REFERENCES = ("random_init(best)", "random_init(mean)", "fc_window", "fc_full", "amplitude")


@dataclasses.dataclass
class Plan:
    sizes: tuple[int, ...] = (100, 400, 1600)
    n_eval: int = 300
    steps: int = 400
    seeds: int = 5
    init_seeds: int = 3
    ablation_size: int = 400
    ablations: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("positions=sincos", ("model.pos_embed=sincos",)),
        ("positions=learned", ("model.pos_embed=learned",)),
        ("masking=random", ("mask.strategy=random",)),
        ("patch_norm=off", ("model.patch_norm=false",)),
        (
            "authors' recipe",
            (
                "data.normalization=robust",
                "model.patch_norm=false",
                "train.center_targets=false",
                "optim.ema_start=0.996",
                "optim.ema_end=1.0",
            ),
        ),
    )


QUICK = Plan(
    sizes=(40, 80),
    n_eval=60,
    steps=20,
    seeds=3,
    ablation_size=40,
    ablations=(("masking=random", ("mask.strategy=random",)),),
)


def conditions(plan: Plan) -> list[tuple[str, int, tuple[str, ...]]]:
    out = [(f"n={n}", n, ()) for n in plan.sizes]
    return out + [(name, plan.ablation_size, over) for name, over in plan.ablations]


def simulate(plan: Plan, demo: DemoSettings, out: Path) -> tuple[list, dict]:
    """The cohort: the first n_eval subjects are held out for probing, the rest pretrain."""
    path = out / "cohort.npz"
    n = plan.n_eval + max(plan.sizes)
    if path.exists():
        d = np.load(path)
        if len(d["x"]) == n:
            return list(d["x"]), {k: d[k] for k in TARGETS}
    sim = simulate_cohort(n, demo.n_rois, tr=demo.tr, minutes=demo.minutes, seed=1, patient_effect=demo.patient_effect)
    x = np.stack(sim.timeseries)
    np.savez(path, x=x, **{k: sim.labels[k] for k in TARGETS})
    return list(x), {k: sim.labels[k] for k in TARGETS}


def run_condition(
    name: str,
    size: int,
    overrides: tuple[str, ...],
    series: list,
    labels: dict,
    plan: Plan,
    demo: DemoSettings,
    out: Path,
) -> dict:
    slug = name.replace("=", "-").replace(" ", "_").replace("'", "")
    result_file = out / f"{slug}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    run = out / "runs" / slug
    t0 = time.perf_counter()
    if not (run / "bundle" / "model.safetensors").exists():
        shutil.rmtree(run, ignore_errors=True)
        cfg = load_config(
            "tiny", demo.overrides() + [f"data.tr={demo.tr}", *overrides, f"train.checkpoint_every={plan.steps}"]
        )
        pretrain(cfg, series[plan.n_eval : plan.n_eval + size], run, max_steps=plan.steps, progress=False)
    t_pretrain = time.perf_counter() - t0
    model = load_model(run)
    cohort = open_cohort(series[: plan.n_eval], tr=demo.tr, labels={k: v[: plan.n_eval] for k, v in labels.items()})
    results = probe_cohort(
        model, cohort, list(TARGETS), seeds=plan.seeds, random_init_seeds=plan.init_seeds, progress=False
    )
    diag = diagnose_model(model, cohort, n_batches=4)
    summary = {
        "condition": name,
        "n_pretrain": size,
        "overrides": list(overrides),
        "steps": plan.steps,
        "records": results.records,
        "diagnostics": diag["mean"],
        "problems": diag["problems"],
        "pretrain_s": round(t_pretrain),
        "evaluate_s": round(time.perf_counter() - t0 - t_pretrain),
    }
    result_file.write_text(json.dumps(summary, indent=1, default=float) + "\n")
    return summary


def best_readout(records: list[dict], target: str, metric: str, prefix: str) -> str:
    """The readout whose ``prefix:<readout>`` method has the best mean test score."""
    scores = {}
    for r in records:
        if r["target"] == target and r["metric"] == metric and r["method"].startswith(prefix + ":"):
            scores.setdefault(r["method"], []).append(r["value"])
    return max(scores, key=lambda m: np.nanmean(scores[m])).split(":", 1)[1]


def mean_std(records, target, metric, method) -> tuple[float, float]:
    v = np.array(
        [r["value"] for r in records if r["target"] == target and r["metric"] == metric and r["method"] == method],
        dtype=float,
    )
    return float(np.nanmean(v)), float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0


def table(summaries: list[dict]) -> str:
    lines = []
    for target, task in TARGETS.items():
        metric = HEADLINE_METRIC[task]
        lines += [
            f"### {target} ({METRIC_NAMES[metric]}, mean ± std over split seeds)",
            "",
            "| condition | best readout | brainjepa | random init (best of 3) | random init (mean) "
            "| FC window | FC full | amplitude | brainjepa − best random [95% CI], p | "
            "context gain |",
            "|" + "---|" * 10,
        ]
        for s in summaries:
            rec = s["records"]
            ro = best_readout(rec, target, metric, "brainjepa")
            cells = [s["condition"], ro]
            for method in (
                f"brainjepa:{ro}",
                f"random_init(best):{ro}",
                f"random_init(mean):{ro}",
                "fc_window",
                "fc_full",
                "amplitude",
            ):
                m, sd = mean_std(rec, target, metric, method)
                cells.append(f"{m:.3f} ± {sd:.3f}")
            c = compare(rec, target, metric, f"brainjepa:{ro}", f"random_init(best):{ro}")
            cells.append(f"{c['mean_diff']:+.3f} [{c['ci95_low']:+.3f}, {c['ci95_high']:+.3f}], p={c['p_value']:.3f}")
            cells.append(f"{100 * s['diagnostics']['context_gain']:+.1f}%")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def figure(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TARGETS), figsize=(11, 3.8))
    for ax, (target, task) in zip(axes, TARGETS.items()):
        metric = HEADLINE_METRIC[task]
        x = np.arange(len(summaries))
        for k, (label, pick, color) in enumerate(
            (
                ("brainjepa (best readout)", lambda ro: f"brainjepa:{ro}", "#1f77b4"),
                ("random init (best)", lambda ro: f"random_init(best):{ro}", "#9e9e9e"),
                ("FC window", lambda ro: "fc_window", "#ff7f0e"),
                ("amplitude", lambda ro: "amplitude", "#2ca02c"),
            )
        ):
            vals = []
            for s in summaries:
                ro = best_readout(s["records"], target, metric, "brainjepa")
                vals.append(mean_std(s["records"], target, metric, pick(ro)))
            ax.bar(x + (k - 1.5) * 0.2, [v[0] for v in vals], 0.2, yerr=[v[1] for v in vals], label=label, color=color)
        ax.set_xticks(x, [s["condition"] for s in summaries], rotation=25, fontsize=8)
        ax.set_ylabel(METRIC_NAMES[metric])
        ax.set_title(target)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/results", help="output folder (default experiments/results)")
    p.add_argument("--quick", action="store_true", help="small sizes and few steps (minutes)")
    p.add_argument("--fresh", action="store_true", help="remove earlier results first")
    p.add_argument(
        "--only",
        nargs="*",
        help="run only these conditions (names as in the table); "
        "several processes may share --out once its cohort.npz exists",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("brainjepa").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # tiny models: more threads only contend on a small machine
    plan = QUICK if args.quick else Plan()
    demo = DemoSettings()
    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log.info("simulating %d subjects", plan.n_eval + max(plan.sizes))
    series, labels = simulate(plan, demo, out)
    summaries = []
    for name, size, overrides in conditions(plan):
        if args.only and name not in args.only:
            continue
        log.info("condition %s: pretraining on %d subjects for %d steps, then probing", name, size, plan.steps)
        s = run_condition(name, size, overrides, series, labels, plan, demo, out)
        log.info("condition %s done (pretrain %s s, evaluate %s s)", name, s["pretrain_s"], s["evaluate_s"])
        summaries.append(s)
    wall = time.perf_counter() - start
    text = table(summaries)
    command = "python experiments/suite.py" + (" --quick" if args.quick else "")
    timing = "\n".join(
        ["| condition | pretraining (s) | evaluation (s) |", "|---|---|---|"]
        + [f"| {s['condition']} | {s['pretrain_s']} | {s['evaluate_s']} |" for s in summaries]
    )
    compute = sum(s["pretrain_s"] + s["evaluate_s"] for s in summaries) / 60
    (out / "results.md").write_text(
        f"# Experiment suite results\n\nCommand: `{command}`. Recipe: `brainjepa demo`'s "
        f"(DemoSettings), {plan.steps} steps; evaluation on {plan.n_eval} held-out subjects, "
        f"{plan.seeds} split seeds, random init over {plan.init_seeds} seeds. Compute: "
        f"{compute:.0f} min over the conditions (table below; stages already done are reused, "
        f"this invocation took {wall / 60:.1f} min).\n\n{text}\n### Time per condition\n\n"
        f"{timing}\n\n![results](results.png)\n"
    )
    figure(summaries, out / "results.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
