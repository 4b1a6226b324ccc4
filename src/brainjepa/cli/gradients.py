"""``brainjepa gradients``: brain gradient positioning for any parcellation.

From subjects' time series (group FC, Fisher-z averaged) or from a ready FC matrix, write the
R x m gradient CSV the model's positional embedding uses, and a PNG of the first gradients.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import CohortSeries, _looks_like_manifest, open_cohort
from ..errors import ConfigError, DataError
from ..gradients import (
    KERNELS,
    BrainGradients,
    connectivity,
    load_connectivity,
    load_gradients_csv,
    plot_gradients,
    save_gradients_csv,
)
from ..io import ORIENTATIONS, read_timeseries


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "gradients",
        help="compute brain gradients (diffusion maps of functional connectivity)",
        description=(
            "Compute diffusion-map connectivity gradients (BrainSpace-style: top-10% row "
            "thresholding, normalized-angle affinity, alpha = 0.5) from subjects' ROI time series "
            "or from a group FC matrix. Writes a CSV with one row per ROI and one column per "
            "gradient, and a PNG of the ROIs in gradient space next to it."
        ),
    )
    p.add_argument(
        "timeseries",
        nargs="*",
        metavar="DATA",
        help="one file per subject (.npy/.npz/.csv/.tsv/.mat/.h5/.nii.gz), or one "
        "manifest CSV/TSV, folder or prepared store (its training split is used)",
    )
    p.add_argument(
        "--fc", metavar="FC_FILE", help="use this R x R connectivity matrix (.npy or header-less CSV) instead"
    )
    p.add_argument("--out", required=True, help="output CSV (the PNG gets the same stem)")
    p.add_argument("--n-components", type=int, default=30, help="number of gradients m (default 30)")
    p.add_argument(
        "--sparsity", type=float, default=0.9, help="fraction of each FC row zeroed before the affinity (default 0.9)"
    )
    p.add_argument("--alpha", type=float, default=0.5, help="diffusion-map anisotropy alpha (default 0.5)")
    p.add_argument(
        "--kernel",
        choices=KERNELS,
        default=KERNELS[0],
        help="affinity between thresholded FC rows (default normalized_angle)",
    )
    p.add_argument(
        "--diffusion-time",
        type=float,
        default=0,
        help="0 (default): multi-scale lambda/(1-lambda) scaling; t > 0: lambda^t",
    )
    p.add_argument("--no-fisher-z", action="store_true", help="average raw correlations instead of Fisher-z values")
    p.add_argument(
        "--orientation",
        choices=ORIENTATIONS,
        help="layout of the time series files when it cannot be read from them",
    )
    p.add_argument("--variable", help="array name inside .npz/.mat/.h5 files")
    p.add_argument("--atlas", help="label image for NIfTI input")
    p.add_argument(
        "--align-to", metavar="REFERENCE_CSV", help="Procrustes-align the gradients to this reference gradient CSV"
    )
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    if bool(args.fc) == bool(args.timeseries):
        raise ConfigError("give either time series files or --fc FC_FILE (exactly one of them)")
    labels = None
    if args.fc:
        fc = load_connectivity(args.fc)
        source = f"FC {args.fc}"
    elif len(args.timeseries) == 1 and _is_cohort(args.timeseries[0]):
        cohort = open_cohort(args.timeseries[0], orientation=args.orientation, variable=args.variable, atlas=args.atlas)
        index = cohort.split_indices("train")
        if len(index) == 0:
            raise DataError(f"{args.timeseries[0]}: no training scans (split 'train') to compute gradients from")
        series = CohortSeries(cohort, index)
        fc = connectivity(series, fisher_z=not args.no_fisher_z, names=[cohort.name(int(i)) for i in index])
        labels = cohort.roi_labels
        source = f"{len(index)} training scans of {args.timeseries[0]}"
    else:
        series = [
            read_timeseries(path, orientation=args.orientation, variable=args.variable, atlas=args.atlas)
            for path in args.timeseries
        ]
        labels = series[0].roi_labels
        for ts in series[1:]:
            if ts.roi_labels is not None and labels is not None and ts.roi_labels != labels:
                raise DataError(
                    f"{ts.path}: ROI labels differ from {series[0].path}'s; all subjects must "
                    "use the same parcellation in the same ROI order"
                )
        fc = connectivity(
            [ts.data for ts in series], fisher_z=not args.no_fisher_z, names=[str(p) for p in args.timeseries]
        )
        source = f"{len(series)} subjects"

    bg = BrainGradients(
        n_components=args.n_components,
        kernel=args.kernel,
        sparsity=args.sparsity,
        alpha=args.alpha,
        diffusion_time=args.diffusion_time,
    ).fit(fc)
    gradients = bg.gradients_
    if args.align_to:
        gradients = bg.align_to(load_gradients_csv(args.align_to)[0])

    out = save_gradients_csv(gradients, args.out, labels)
    shown = ", ".join(f"{v:.4f}" for v in bg.lambdas_[:3])
    print(
        f"wrote {out}: {gradients.shape[0]} ROIs x {gradients.shape[1]} gradients from {source} (lambdas {shown}, ...)"
    )
    if not args.no_plot and gradients.shape[1] >= 2:
        png = plot_gradients(gradients, Path(args.out).with_suffix(".png"), roi_labels=labels)
        print(f"wrote {png}")
    return 0


def _is_cohort(path: str) -> bool:
    """A folder, prepared store or manifest (a CSV/TSV whose header has a 'path' column)."""
    p = Path(path)
    if p.is_dir():
        return True
    if p.is_file() and p.suffix.lower() in (".csv", ".tsv"):
        return _looks_like_manifest(p)
    return False
