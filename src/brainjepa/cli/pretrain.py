"""``brainjepa pretrain``: train a Brain-JEPA encoder on a cohort (one CPU, one GPU, or torchrun)."""

from __future__ import annotations

import argparse

from ..data.manifest import TR_SOURCES
from ..pretrain import load_config, pretrain


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a Brain-JEPA encoder (CPU, GPU, or many GPUs with torchrun)",
        description=(
            "Pretrain a Brain-JEPA model with spatiotemporal masking. CONFIG is a built-in config "
            "(tiny, small, base, large) or a YAML file; --set section.key=value overrides any key "
            "(e.g. --set optim.lr=5e-4). RUN_DIR receives config.yaml, metrics.jsonl, "
            "gradients.csv, normalization.json, checkpoints/, loss.png and bundle/. For several "
            "GPUs or nodes launch the same command with torchrun."
        ),
    )
    p.add_argument("config", metavar="CONFIG", help="tiny, small, base, large, or a YAML file")
    p.add_argument(
        "--data",
        required=True,
        metavar="DATA",
        help="a folder of series files (.npy R x T, .tsv, ...), a manifest CSV/TSV, or a "
        "prepared store (brainjepa prepare)",
    )
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR's latest checkpoint")
    p.add_argument(
        "--max-steps", type=int, metavar="N", help="train N optimizer steps (the schedules span these N steps)"
    )
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="stop after step N with a checkpoint, schedules unchanged (resume later)",
    )
    p.add_argument("--seed", type=int, metavar="S", help="random seed (train.seed)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override a config key, e.g. optim.lr=5e-4 (repeatable)",
    )
    p.add_argument(
        "--gradients",
        metavar="CSV",
        help="precomputed brain gradients (R x m CSV, e.g. from brainjepa gradients) "
        "instead of computing them from the training scans (data.gradients)",
    )
    p.add_argument(
        "--tr-source",
        choices=TR_SOURCES,
        help="which TR wins when a manifest's tr column and a file disagree (data.tr_source; default check: an error)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar; instead a log line (step, loss, rate) every 30 s, written between steps",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    overrides = list(args.overrides)
    if args.gradients:
        overrides.append(f"data.gradients={args.gradients}")
    if args.tr_source:
        overrides.append(f"data.tr_source={args.tr_source}")
    config = load_config(args.config, overrides)
    summary = pretrain(
        config,
        args.data,
        args.out,
        resume=args.resume,
        max_steps=args.max_steps,
        seed=args.seed,
        progress=not (args.no_progress or args.quiet),
        stop_after=args.stop_after,
    )
    if summary["rank"] == 0:
        loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
        where = f"; bundle: {summary['bundle']}" if summary["bundle"] else ""
        print(
            f"pretrained {summary['steps']}/{summary['total_steps']} steps, final loss {loss}; "
            f"run folder: {summary['run_dir']}{where}"
        )
    return 0
