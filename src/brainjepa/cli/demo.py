"""``brainjepa demo``: the whole method on a simulated cohort in minutes, with a report."""

from __future__ import annotations

import argparse

from ..report import run_demo


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="simulate, pretrain, embed, probe against baselines, and write a report",
        description=(
            "Run Brain-JEPA end to end on the built-in simulated cohort: simulate subjects, "
            "compute brain gradients, pretrain the tiny model, embed held-out subjects, probe "
            "'age' and 'patient' per subject and the brain state per window against the random-init "
            "and FC baselines, and write a report folder (report.md, results.json, figures/). "
            "Measured on a 2-core CPU shared with other jobs: 17-31 min (1006 s and 1844 s, most "
            "of it pretraining), --quick 108 s. report.md gives the wall time of each stage. Needs "
            "the 'eval' and 'viz' extras."
        ),
    )
    p.add_argument("--out", default="brainjepa-demo", metavar="DIR", help="report folder (default ./brainjepa-demo)")
    p.add_argument(
        "--quick", action="store_true", help="smaller cohort and windows, 20 pretraining steps, 3 seeds (for CI)"
    )
    p.add_argument("--seeds", type=int, help="probe seeds (default 5; 3 with --quick)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo in DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    out = run_demo(args.out, quick=args.quick, seeds=args.seeds, overwrite=args.overwrite, progress=not args.quiet)
    print()
    print(out["table"])
    print(f"demo finished in {out['wall_time_s']:.0f} s; report: {out['report']}")
    return 0
