"""``brainjepa embed``: subject embeddings (and optionally token features) from a model."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from ..bundle import load_model
from ..data import check_cohort_for_model, open_cohort
from ..data.manifest import TR_SOURCES
from ..errors import DataError
from ..evaluate import READOUTS, WINDOWS, load_cohort, save_embeddings
from ..io import ORIENTATIONS
from ..runio import incomplete_path


def add_model_data_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --data and the input/compute options shared by embed, probe, finetune, attention."""
    p.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="model bundle folder, pretraining run folder, checkpoint (.pt) or hub id",
    )
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="DATA",
        help="manifest CSV/TSV, folder, prepared store, or several time-series files",
    )
    p.add_argument("--tr", type=float, metavar="SECONDS", help="repetition time of files that do not carry one")
    p.add_argument(
        "--orientation",
        choices=ORIENTATIONS,
        help="layout of files where it cannot be read from them",
    )
    p.add_argument(
        "--tr-source",
        choices=TR_SOURCES,
        default="check",
        help="when a manifest's tr column and a file disagree: 'check' refuses, 'manifest' or 'file' uses that one",
    )
    p.add_argument("--batch-size", type=int, default=16, help="subjects per forward pass (default 16)")
    p.add_argument("--device", default="auto", help="auto (default: GPU when available), cpu, cuda, cuda:1, ...")


def load(args: argparse.Namespace):
    """(model, cohort) from the shared arguments."""

    model = load_model(args.model)
    if len(args.data) == 1 and getattr(args, "tr_source", "check") != "check":
        cohort = open_cohort(args.data[0], tr=args.tr, orientation=args.orientation, tr_source=args.tr_source)
    else:
        cohort = load_cohort(args.data, tr=args.tr, orientation=args.orientation)
    check_cohort_for_model(model, cohort)  # names the scan before any slow work
    return model, cohort


def check_finite_npz(path, subjects) -> None:
    """Refuse an embedding file with NaN/Inf rows, naming the subjects."""

    with np.load(path) as z:
        for key in ("embeddings", "tokens"):
            if key in z.files:
                values = z[key].reshape(len(z[key]), -1)
                bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
                if len(bad):
                    names = ", ".join(str(subjects[i]) for i in bad[:5])
                    raise DataError(
                        f"{key} of {len(bad)} subject(s) are NaN/Inf ({names}); nothing was written: check those scans"
                    )


def register(subparsers) -> None:

    p = subparsers.add_parser(
        "embed",
        help="embed subjects with a pretrained model",
        description=(
            "Embed every subject: each series is resampled to the model's TR, cut into windows "
            "(--windows all: evenly spaced windows covering the scan; center: the centre window) "
            "each normalised as in pretraining (deterministic), encoded, and read out "
            "(--readout mean: mean over tokens then LayerNorm; roi: per-ROI mean and std over "
            "time; fc: ROI x ROI correlation of token features), averaged over windows. Writes "
            "an .npz with 'subjects', 'embeddings' (N x F), 'readout', 'windows', 'roi_labels', "
            "one 'label_<name>' array per label column and, with --tokens, 'tokens' "
            "(N x R x P x D, the centre window)."
        ),
    )
    add_model_data_arguments(p)
    p.add_argument("--out", required=True, metavar="EMB_NPZ", help="output .npz file")
    p.add_argument(
        "--readout",
        choices=READOUTS,
        default="mean",
        help=f"readout of the token features, one of {', '.join(READOUTS)} (default mean)",
    )
    p.add_argument(
        "--windows",
        choices=WINDOWS,
        default="all",
        help="all (default): average over windows covering each scan; center: the centre window only",
    )
    p.add_argument("--tokens", action="store_true", help="also save the centre window's token features (N x R x P x D)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    model, cohort = load(args)
    final = Path(args.out)
    tmp = incomplete_path(final)  # renamed when complete and checked
    try:
        save_embeddings(
            model,
            cohort,
            tmp,
            readout=args.readout,
            windows=args.windows,
            tokens=args.tokens,
            batch_size=args.batch_size,
            device=args.device,
            progress=not args.quiet,
        )
        check_finite_npz(tmp, cohort.subjects)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    out = final

    n_dims = np.load(out)["embeddings"].shape[1]
    cfg = model.config
    print(
        f"wrote {out}: {len(cohort)} subjects x {n_dims} dimensions ({args.readout} readout, "
        f"{args.windows} windows)"
        + (f", tokens {len(cohort)} x {cfg.n_rois} x {cfg.n_patches} x {cfg.embed_dim}" if args.tokens else "")
    )
    return 0
