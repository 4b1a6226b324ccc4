"""``brainjepa embed``: subject embeddings (and optionally token features) from a model."""

from __future__ import annotations

import argparse
import os

from ..bundle import load_model
from ..data import ON_ERROR, write_skipped
from ..data.manifest import TR_SOURCES
from ..evaluate import READOUTS, WINDOWS
from ..evaluate.embedjob import embed_to_file
from ..evaluate.scans import open_inputs, skipped_path, usable_cohort
from ..evaluate.shards import DEFAULT_SHARD_SIZE
from ..io import ORIENTATIONS
from ..precision import PRECISIONS

EXIT_SKIPPED = 3  # the command wrote its output, but left out scans (--on-error skip)


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


def add_on_error_argument(p: argparse.ArgumentParser, output: str = "the output") -> None:
    """--on-error, shared by embed, probe and finetune."""
    p.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="fail",
        help="fail (default): stop at the first unusable scan (unreadable, NaN/Inf, another ROI count, too "
        f"short, off the model's scale), naming it; skip: leave such scans out, list them in the log and in "
        f"NAME.skipped.tsv next to {output}, and end with exit code {EXIT_SKIPPED}",
    )


def load(args: argparse.Namespace, windows: str = "all"):
    """(model, cohort) from the shared arguments: with ``--on-error skip`` the unusable scans are
    left out (listed in ``cohort.skipped``); ``windows`` are those the command will encode."""

    model = load_model(args.model)
    on_error = getattr(args, "on_error", "fail")
    cohort = open_inputs(
        args.data,
        tr=args.tr,
        orientation=args.orientation,
        tr_source=getattr(args, "tr_source", "check"),
        on_error=on_error,
        model=model if on_error == "skip" else None,
    )
    return model, usable_cohort(model, cohort, on_error, windows)  # names the scan before any slow work


def report_skipped(cohort, out) -> int:
    """Print how many scans were left out, write their TSV next to ``out``, and give the exit code.

    Args:
        cohort: the cohort a command used (its ``skipped``).
        out: the command's output file, or None (then the log alone lists them).

    Returns:
        0 when nothing was skipped, else :data:`EXIT_SKIPPED`.
    """
    if not cohort.skipped:
        return 0
    where = "the log above"
    if out:
        where = str(write_skipped(skipped_path(out), cohort.skipped))
    print(f"skipped {len(cohort.skipped)} scan(s) (--on-error skip), listed in {where}")
    return EXIT_SKIPPED


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
            "(N x R x P x D, the centre window). Scans are read and encoded a shard at a time "
            "(--shard-size), each shard saved in .EMB_NPZ.incomplete/ as soon as it is done: memory "
            "does not grow with the cohort, and after an interruption (even kill -9) the same command "
            "continues from the saved shards and writes the same file an uninterrupted run would; a "
            "changed model, readout, windows, batch or shard size or list of scans is refused. Under "
            "torchrun (torchrun --nproc_per_node K -m brainjepa embed ..., or several nodes) the ranks "
            "share the shards and rank 0 writes the one file."
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
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default); bf16; auto: bf16 where this machine measures it faster (features equal to "
        "fp32's to bf16 rounding; a resumed job keeps its precision)",
    )
    add_on_error_argument(p, "EMB_NPZ")
    p.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        metavar="N",
        help="scans per shard: results are saved every N scans, and a re-run of the same command after an "
        "interruption continues from the saved shards",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the partial results (.EMB_NPZ.incomplete) of an interrupted run with another model, "
        "options or scans instead of refusing them",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    report = embed_to_file(
        load_model(args.model),
        args.data[0] if len(args.data) == 1 else args.data,
        args.out,
        readout=args.readout,
        windows=args.windows,
        tokens=args.tokens,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        on_error=args.on_error,
        overwrite=args.overwrite,
        device=args.device,
        tr=args.tr,
        orientation=args.orientation,
        tr_source=args.tr_source,
        precision=args.precision,
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 speaks for every rank
        return 0
    print(report.summary())
    return EXIT_SKIPPED if report.skipped else 0
