"""brainjepa prepare: validate a manifest's files and pack them into a memory-mapped store."""

from __future__ import annotations

import argparse

from ..data import prepare_store
from ..data.manifest import TR_SOURCES
from ..data.prepare import STORE_DTYPES
from ..data.validate import ON_ERROR
from ..io import ORIENTATIONS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="validate a manifest's files and pack the cohort into a memory-mapped store",
        description="Read every file of MANIFEST (CSV/TSV with columns path, subject, optional "
        "session, tr, split and label columns), check it (NaN/Inf, constant ROIs, ROI count and "
        "names, length, duplicates, censoring) and pack the cohort into STORE: one memory-mapped "
        "array plus store.json with subjects, TRs, labels, ROI names and robust-scaling statistics "
        "fitted on the training split. Bad files stop the run (--on-error fail) or are skipped "
        "and listed in STORE/skipped.tsv (--on-error skip).",
    )
    p.add_argument("manifest", help="manifest CSV/TSV")
    p.add_argument("--out", required=True, help="output store folder")
    p.add_argument(
        "--dtype",
        choices=STORE_DTYPES,
        default="float32",
        help="storage precision (float16 halves the size; values are stored ROI-centred)",
    )
    p.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="fail",
        help="stop at the first bad file (default) or skip and report bad files",
    )
    p.add_argument("--tr", type=float, default=None, help="TR in seconds for files that do not give one")
    p.add_argument(
        "--tr-source",
        choices=TR_SOURCES,
        default="check",
        help="when the manifest's tr column and a file's sidecar (or the file) both give a "
        "TR: 'check' refuses a disagreement, 'manifest' or 'file' uses that one",
    )
    p.add_argument(
        "--orientation",
        choices=ORIENTATIONS,
        default=None,
        help="axis order of headerless matrices (default: roi-by-time)",
    )
    p.add_argument("--variable", default=None, help="array name inside .npz/.mat/.h5 files")
    p.add_argument("--atlas", default=None, help="label image (NIfTI) for 4-D NIfTI inputs")
    p.add_argument(
        "--train-fraction",
        type=float,
        default=1.0,
        help="fraction of subjects in the training split when the manifest has no "
        "'split' column (the rest become 'val'; default 1.0)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="reject scans shorter than this many time points (at --target-tr if given)",
    )
    p.add_argument("--target-tr", type=float, default=None, help="TR at which --window is counted")
    p.add_argument("--seed", type=int, default=0, help="seed for the split and the scaling sample")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing store in --out, or the partial store (.OUT.incomplete) an interrupted run left",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    report = prepare_store(
        args.manifest,
        args.out,
        dtype=args.dtype,
        on_error=args.on_error,
        tr=args.tr,
        orientation=args.orientation,
        variable=args.variable,
        atlas=args.atlas,
        train_fraction=args.train_fraction,
        seed=args.seed,
        min_timepoints=args.window,
        target_tr=args.target_tr,
        overwrite=args.overwrite,
        progress=not getattr(args, "quiet", False),
        tr_source=args.tr_source,
    )
    print(report.summary())
    return 0
