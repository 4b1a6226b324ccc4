"""Does fine-tuning pay off on a small cohort? Pretrained init vs the same model from scratch.

One command regenerates experiments/results/finetune.md and finetune.json on the demo's cohort
(brainjepa.report.DemoSettings: 80 subjects pretrain the tiny model for 400 steps, labels unused;
160 held-out subjects are fine-tuned and tested). On the same splits as the product's protocol
(60/20/20, stratified for 'patient', one split per seed) it compares:

- ``finetune(pretrained)``: brainjepa.evaluate.FineTuner from the pretrained encoder, the
  default recipe (layer-wise lr decay, warm-up then cosine, early stopping on the validation
  loss with the best epoch restored, several windows per subject: one drawn at random per
  epoch in training, outputs averaged over all of them at test time);
- ``finetune(scratch)``: the same recipe from a random initialisation of the same architecture;
- ``amplitude``: per-ROI log amplitude of the scan, closed-form linear probe (no FC, no model);
- ``fc``: Fisher-z FC of the full scan, closed-form linear probe.

Every fine-tuning run's curves (training and validation loss, validation score per epoch) go
into finetune.json, so the table can be checked against how training went.

    python experiments/finetune.py            # the committed results (see finetune.md for the time)
    python experiments/finetune.py --quick    # a smoke test in a few minutes

The cohort and the pretraining run are kept under experiments/results/runs/finetune-*/ (not
committed) and reused; --fresh starts over.
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
from brainjepa.evaluate import (
    HEADLINE_METRIC,
    METRIC_NAMES,
    FineTuner,
    cohort_amplitude,
    cohort_fc,
    compare,
    finetune_windows,
    make_probe,
    random_init_like,
    run_protocol,
)
from brainjepa.evaluate.finetune import DEFAULT_WINDOWS
from brainjepa.gradients import BrainGradients, connectivity, save_gradients_csv
from brainjepa.pretrain import load_config, pretrain
from brainjepa.report import DemoSettings
from brainjepa.report.demo import PATIENT_NETWORK, QUICK_DEMO
from brainjepa.synthetic import simulate_cohort

log = logging.getLogger("finetune")
TARGETS = {"age": "regression", "patient": "classification"}
PAPER_HEAD = "finetune(pretrained, mean head)"  # the paper's head: mean-pooled tokens, random init
METHODS = ("finetune(pretrained)", "finetune(scratch)", PAPER_HEAD, "amplitude", "fc")


def prepare(s: DemoSettings, work: Path) -> tuple[list, dict]:
    """The demo's cohort and its pretrained tiny model (reused when present)."""
    path = work / "cohort.npz"
    if not path.exists():
        sim = simulate_cohort(
            s.n_pretrain + s.n_eval,
            s.n_rois,
            tr=s.tr,
            minutes=s.minutes,
            seed=0,
            patient_network=PATIENT_NETWORK,
            patient_effect=s.patient_effect,
        )
        np.savez(path, x=np.stack(sim.timeseries), roi_labels=np.array(sim.roi_labels), **sim.labels)
    d = np.load(path)
    series, labels = list(d["x"]), {k: d[k] for k in TARGETS}
    if not (work / "run" / "bundle" / "model.safetensors").exists():
        shutil.rmtree(work / "run", ignore_errors=True)
        grads = BrainGradients(n_components=s.n_gradients).fit(connectivity(series[: s.n_pretrain])).gradients_
        save_gradients_csv(grads, work / "gradients.csv", [str(r) for r in d["roi_labels"]])
        cfg = load_config("tiny", s.overrides() + [f"data.gradients={work / 'gradients.csv'}", f"data.tr={s.tr}"])
        pretrain(cfg, series[: s.n_pretrain], work / "run", max_steps=s.steps, progress=False)
    return series, labels


def evaluate(model, series: list, labels: dict, s: DemoSettings, target: str, seeds: int, tuner_kwargs: dict) -> dict:
    """Every method on one target and every split seed; the fine-tuning curves of every run."""
    task = TARGETS[target]
    held_out = series[s.n_pretrain :]
    cohort = open_cohort(held_out, tr=s.tr)
    t0 = time.perf_counter()
    n_windows = tuner_kwargs.get("n_windows", DEFAULT_WINDOWS)
    windows = finetune_windows(model, held_out, tr=s.tr, n_windows=n_windows)
    amplitude, fc = cohort_amplitude(cohort, model, progress=False), cohort_fc(cohort, progress=False)
    log.info("%s: inputs %s, amplitude %s, FC %s", target, tuple(windows.shape), amplitude.shape, fc.shape)
    kwargs = {k: v for k, v in tuner_kwargs.items() if k != "n_windows"}
    starts = {
        "finetune(pretrained)": (model, {}),
        "finetune(scratch)": (random_init_like(model, 0), {}),
        PAPER_HEAD: (model, {"readout": "mean", "head_init": "random", "lr": 1e-3}),
    }
    y = np.asarray(labels[target][s.n_pretrain :])
    y = y.astype(float) if task == "regression" else y.astype(int)
    runs = []

    def tuner(name, seed):
        start, extra = starts[name]
        ft = FineTuner(start, task, seed=seed, **{**kwargs, **extra})
        fit = ft.fit

        def timed_fit(*a, **kw):
            t = time.perf_counter()
            out = fit(*a, **kw)
            runs.append(
                {
                    "target": target,
                    "method": name,
                    "seed": seed,
                    "seconds": round(time.perf_counter() - t, 1),
                    "best_epoch": ft.best_epoch_,
                    "epochs_run": len(ft.val_losses_),
                    "probe_val_score": ft.probe_val_score_,
                    "train_loss": [round(v, 4) for v in ft.train_losses_],
                    "val_loss": [round(v, 4) for v in ft.val_losses_],
                    "val_score": [round(v, 4) for v in ft.val_scores_],
                }
            )
            log.info("%s | %s | seed %d: best epoch %d of %d (%.0f s)", target, name, seed, ft.best_epoch_,
                     len(ft.val_losses_), runs[-1]["seconds"])  # fmt: skip
            return out

        ft.fit = timed_fit
        return ft

    methods = {name: (lambda seed, name=name: tuner(name, seed), windows) for name in starts}
    methods["amplitude"] = (lambda seed: make_probe("closed-form", task, seed), amplitude)
    methods["fc"] = (lambda seed: make_probe("closed-form", task, seed), fc)
    records = run_protocol(y, methods, target=target, task=task, seeds=seeds, progress=True).records
    return {"records": records, "runs": runs, "evaluate_s": round(time.perf_counter() - t0)}


def summary_table(records: list[dict]) -> str:
    lines = []
    for target, task in TARGETS.items():
        metric = HEADLINE_METRIC[task]
        lines += [
            f"### {target} ({METRIC_NAMES[metric]}, test split; mean ± std over split seeds, then each seed)",
            "",
            "| method | mean ± std | per seed |",
            "|---|---|---|",
        ]
        for m in METHODS:
            v = [r["value"] for r in records if r["target"] == target and r["metric"] == metric and r["method"] == m]
            cells = ", ".join(f"{x:.3f}" for x in v)
            lines.append(f"| {m} | {np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f} | {cells} |")
        lines += ["", "Paired differences (mean [95% CI], p, splits won):", ""]
        for a, b in (
            ("finetune(pretrained)", "finetune(scratch)"),
            ("finetune(pretrained)", PAPER_HEAD),
            ("finetune(pretrained)", "amplitude"),
            ("finetune(scratch)", "amplitude"),
            ("finetune(pretrained)", "fc"),
        ):
            c = compare(records, target, metric, a, b)
            lines.append(
                f"- {a} − {b}: {c['mean_diff']:+.3f} [{c['ci95_low']:+.3f}, {c['ci95_high']:+.3f}], "
                f"p={c['p_value']:.3f}, won {c['wins']}/{c['n']}"
            )
        lines.append("")
    return "\n".join(lines)


def runs_table(runs: list[dict]) -> str:
    lines = [
        "| target | method | seed | epochs run | best epoch | train loss (first → best) | val loss (first → best) "
        "| val score: probe init → best epoch | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        b = r["best_epoch"]
        probe = "–" if r["probe_val_score"] is None else f"{r['probe_val_score']:.3f}"
        if b < 0:  # no epoch beat the probe-initialised start: it was kept
            lines.append(
                f"| {r['target']} | {r['method']} | {r['seed']} | {r['epochs_run']} | start kept | "
                f"{r['train_loss'][0]:.3f} (epoch 0) | {r['val_loss'][0]:.3f} (epoch 0) | {probe} kept | "
                f"{r['seconds']:.0f} |"
            )
            continue
        lines.append(
            f"| {r['target']} | {r['method']} | {r['seed']} | {r['epochs_run']} | {b} | "
            f"{r['train_loss'][0]:.3f} → {r['train_loss'][b]:.3f} | {r['val_loss'][0]:.3f} → {r['val_loss'][b]:.3f} "
            f"| {probe} → {r['val_score'][b]:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/results", help="output folder (default experiments/results)")
    p.add_argument("--quick", action="store_true", help="the quick demo's small cohort and a few epochs")
    p.add_argument("--seeds", type=int, default=3, help="split seeds (default 3)")
    p.add_argument("--fresh", action="store_true", help="redo the cohort, the pretraining run and every target")
    p.add_argument(
        "--target",
        action="append",
        choices=list(TARGETS),
        help="evaluate only this target (two processes can share the work); a run without it writes the tables",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("brainjepa").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # tiny models: more threads only contend on a small machine
    s = QUICK_DEMO if args.quick else DemoSettings()
    tuner = {"epochs": 3, "patience": None, "n_windows": 2} if args.quick else {}
    out = Path(args.out)
    work = out / "runs" / ("finetune-quick" if args.quick else "finetune-demo")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    series, labels = prepare(s, work)
    model = load_model(work / "run")
    parts = {}
    for target in TARGETS:
        part = work / f"{target}.json"
        if not part.exists() and (not args.target or target in args.target):
            part.write_text(json.dumps(evaluate(model, series, labels, s, target, args.seeds, tuner), default=float))
        if part.exists():
            parts[target] = json.loads(part.read_text())
    if len(parts) < len(TARGETS):
        log.info("targets done: %s; run again without --target to write the tables", ", ".join(parts) or "none")
        return 0
    result = {
        "records": [r for p in parts.values() for r in p["records"]],
        "runs": [r for p in parts.values() for r in p["runs"]],
        "evaluate_s": sum(p["evaluate_s"] for p in parts.values()),
    }
    command = "python experiments/finetune.py" + (" --quick" if args.quick else "")
    settings = {k: v for k, v in dataclasses.asdict(s).items() if k != "recipe"}
    name = "finetune-quick" if args.quick else "finetune"
    payload = {"command": command, "demo": settings, "tuner_overrides": tuner, **result}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    text = summary_table(result["records"])
    (out / f"{name}.md").write_text(
        f"# Fine-tuning on a small cohort: pretrained init vs from scratch\n\nCommand: `{command}` "
        f"({result['evaluate_s'] / 60:.0f} min of fine-tuning and probing on a shared 2-core CPU, after "
        f"pretraining). Cohort: the demo's ({s.n_pretrain} subjects pretrain the tiny model for "
        f"{s.steps} steps; {s.n_eval} held-out subjects, {s.n_rois} ROIs, {s.minutes:g} min at TR {s.tr} s "
        f"resampled to {s.target_tr} s); {args.seeds} split seeds of 60/20/20. Recipe: "
        "`brainjepa.evaluate.FineTuner` defaults"
        + (f" with {tuner}" if tuner else "")
        + f"; `{PAPER_HEAD}` is the same recipe with the paper's head (mean-pooled tokens, "
        "LayerNorm, a randomly initialised linear layer) and a top learning rate of 1e-3.\n\n"
        + text
        + "\n### Every fine-tuning run\n\n"
        + runs_table(result["runs"])
        + "\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
