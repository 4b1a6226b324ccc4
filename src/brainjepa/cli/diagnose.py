"""``brainjepa diagnose``: is a model learning the brain or the grid? (representation diagnostics)"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..diagnostics import diagnose_model, format_diagnostics, plot_diagnostics
from .embed import add_model_data_arguments, load


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "diagnose",
        help="representation diagnostics: context reliance, collapse, position vs subject",
        description=(
            "Run the representation diagnostics of a model (with its predictor) on a cohort: the "
            "predictor's loss with each sample's own context, another sample's context and an "
            "all-zero input, beside the position-only floor; feature std and token cosine "
            "(collapse); the share of the token features' variance that is token position vs "
            "subject; the effective rank of subject embeddings. Prints a table and what it "
            "means, and writes diagnostics.json and diagnostics.png to --out."
        ),
        epilog="example:\n  brainjepa diagnose --model runs/tiny --data sim/manifest.csv --out diag/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_data_arguments(p)
    p.add_argument("--batches", type=int, default=4, help="batches to average over (default 4)")
    p.add_argument("--seed", type=int, default=0, help="subject order and masks (default 0)")
    p.add_argument("--out", metavar="DIR", help="write diagnostics.json and diagnostics.png here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    model, cohort = load(args)
    result = diagnose_model(
        model, cohort, batch_size=args.batch_size, n_batches=args.batches, seed=args.seed, progress=not args.quiet
    )
    print(format_diagnostics(result), end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "diagnostics.json").write_text(json.dumps(result, indent=1) + "\n")

        plot_diagnostics(result, out / "diagnostics.png")
        print(f"wrote {out / 'diagnostics.json'} and {out / 'diagnostics.png'}")
    return 0
