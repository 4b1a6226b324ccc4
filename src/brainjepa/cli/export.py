"""``brainjepa export``: a pretraining run's checkpoint -> a model bundle."""

from __future__ import annotations

import argparse

from ..bundle import export_run
from ..bundle_files import ENCODERS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a model bundle from a pretraining run's checkpoint",
        description=(
            "Write a model bundle (config.json, model.safetensors, gradients.csv, "
            "normalization.json, provenance.json, README.md: the model card) from RUN_DIR/checkpoints: the latest "
            "checkpoint, or the one of --step. The bundle's encoder is the EMA target encoder."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="pretraining run folder")
    p.add_argument("--step", type=int, help="export this step's checkpoint (default: the latest)")
    p.add_argument("--out", metavar="DIR", help="bundle folder (default RUN_DIR/bundle)")
    p.add_argument(
        "--encoder",
        choices=tuple(ENCODERS),
        default="target",
        help="EMA target encoder (default) or context encoder",
    )
    p.add_argument("--no-predictor", action="store_true", help="leave the predictor out")
    p.add_argument(
        "--evaluation",
        metavar="RESULTS",
        help="a `brainjepa probe --out` results file of this model: its pretrained-vs-random and FC "
        "comparisons go into the model card (README.md)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    out = export_run(
        args.run_dir,
        step=args.step,
        out=args.out,
        encoder=args.encoder,
        predictor=not args.no_predictor,
        evaluation=args.evaluation,
    )
    print(f"wrote {out}")
    return 0
