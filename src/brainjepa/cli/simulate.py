"""brainjepa simulate: write the built-in simulated resting-state cohort (files + manifest)."""

from __future__ import annotations

import argparse
import time

from ..synthetic import FORMATS, simulate_cohort, write_cohort


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="write a simulated resting-state cohort (files + manifest.csv with labels)",
        description="Simulate resting-state BOLD (Stuart-Landau oscillators on a modular connectome, "
        "Balloon-Windkessel hemodynamics, noise) with subject labels 'age' (continuous), 'patient' "
        "(0/1) and 'site' (nuisance), and write it as files plus manifest.csv. With --task-network the "
        "scans also switch between rest and task blocks (brain states), recorded as BIDS events files.",
    )
    p.add_argument("--subjects", type=int, default=60, help="number of subjects (default 60)")
    p.add_argument("--rois", type=int, default=100, help="number of ROIs (default 100)")
    p.add_argument("--tr", type=float, default=0.72, help="repetition time in seconds (default 0.72)")
    p.add_argument("--minutes", type=float, default=6.0, help="scan length in minutes (default 6)")
    p.add_argument("--networks", type=int, default=7, help="number of functional networks (default 7)")
    p.add_argument("--sites", type=int, default=3, help="number of acquisition sites (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="tsv",
        help="file format: XCP-D tsv (default), UKB csv, npy, npz, mat, h5, nifti, or mixed",
    )
    p.add_argument(
        "--task-network",
        metavar="NETWORK",
        help="add brain states: in task blocks that alternate with rest this network (e.g. DorsAttn) "
        "is driven and its coupling strengthened (see --task-drive, --task-coupling; with --task-drive 0 "
        "the state lives in the coupling alone, as in brainjepa demo); writes one BIDS events file per "
        "scan and an 'events' manifest column (for probe --states events)",
    )
    p.add_argument(
        "--task-drive",
        type=float,
        default=0.015,
        help="input to the task network in task blocks (default 0.015; 0: none)",
    )
    p.add_argument(
        "--task-coupling",
        type=float,
        default=2.0,
        help="relative gain of the task network's internal coupling in task blocks (default 2)",
    )
    p.add_argument(
        "--block-seconds",
        type=float,
        nargs=2,
        default=(20.0, 60.0),
        metavar=("SHORTEST", "LONGEST"),
        help="block lengths in seconds (default 20 60)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    t0 = time.perf_counter()
    sim = simulate_cohort(
        args.subjects,
        args.rois,
        tr=args.tr,
        minutes=args.minutes,
        seed=args.seed,
        n_networks=args.networks,
        n_sites=args.sites,
        task_network=args.task_network,
        task_drive=args.task_drive if args.task_network else 0.0,
        task_coupling=args.task_coupling if args.task_network else 0.0,
        block_seconds=tuple(args.block_seconds),
    )
    manifest = write_cohort(sim, args.out, fmt=args.format)
    t = sim.timeseries[0].shape[1]
    print(
        f"simulated {args.subjects} subjects x {args.rois} ROIs x {t} volumes (TR {args.tr} s) in "
        f"{time.perf_counter() - t0:.1f} s; manifest: {manifest}"
    )
    return 0
