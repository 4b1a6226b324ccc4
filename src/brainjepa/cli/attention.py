"""``brainjepa attention``: attention received per ROI and per functional network."""

from __future__ import annotations

import argparse

from ..report import cohort_attention
from .embed import add_model_data_arguments, load


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "attention",
        help="attention received per ROI and functional network (interpretation)",
        description=(
            "Run the encoder over every subject's evaluation window and record the attention "
            "each token receives, averaged over heads, queries, layers, time patches and "
            "subjects (1.0 = the uniform share). Writes roi_attention.csv and, when ROI network "
            "labels are known (--networks, or Schaefer-style ROI names), network_attention.csv "
            "and network_attention.png; otherwise roi_attention.png."
        ),
    )
    add_model_data_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--networks",
        metavar="CSV_OR_TSV",
        help="ROI -> network table: a 'network' column, matched by a 'roi' (or "
        "'name') column to the model's ROI labels, else one row per ROI in order",
    )
    p.add_argument("--max-subjects", type=int, help="use at most this many subjects (the first ones)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    model, cohort = load(args)
    paths = cohort_attention(
        model,
        cohort,
        args.out,
        networks=args.networks,
        max_subjects=args.max_subjects,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
    )
    for path in paths.values():
        print(f"wrote {path}")
    return 0
