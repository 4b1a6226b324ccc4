"""``brainjepa finetune``: full fine-tuning next to the FC baseline and a from-scratch model."""

from __future__ import annotations

import argparse

from ..evaluate import finetune_cohort
from ..evaluate.finetune import (
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_PATIENCE,
    DEFAULT_READOUT,
    DEFAULT_WARMUP_EPOCHS,
    DEFAULT_WINDOWS,
    HEADS,
)
from .embed import add_model_data_arguments, add_on_error_argument, load, report_skipped
from .probe import add_protocol_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune the whole model, with the FC and random-init baselines",
        description=(
            "Fine-tune encoder + head (on the token features' FC, or mean-pooled tokens) with AdamW, "
            "warmup + cosine schedule, layer-wise learning-rate decay and drop path (docs/method.md, "
            "Fine-tuning), stopping when the validation loss stops improving and keeping its best "
            "epoch; several windows per subject are drawn in training and averaged at test time. "
            "The same recipe trains the randomly initialised architecture ('random_init'); the FC "
            "and amplitude baselines share every split. Splits, seeds and the table are as in "
            "'brainjepa probe'."
        ),
    )
    add_model_data_arguments(p)
    add_protocol_arguments(p)
    p.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help=f"most training epochs (default {DEFAULT_EPOCHS})"
    )
    p.add_argument(
        "--patience",
        type=int,
        default=DEFAULT_PATIENCE,
        help=f"stop after this many epochs without a lower validation loss (default {DEFAULT_PATIENCE}; 0: never)",
    )
    p.add_argument(
        "--lr", type=float, default=DEFAULT_LR, help=f"peak learning rate of the top layer (default {DEFAULT_LR:g})"
    )
    p.add_argument(
        "--layer-decay", type=float, default=0.75, help="learning-rate factor per layer below the top (default 0.75)"
    )
    p.add_argument(
        "--drop-path", type=float, default=0.1, help="stochastic depth rate of the deepest block (default 0.1)"
    )
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument(
        "--warmup-epochs",
        type=int,
        default=DEFAULT_WARMUP_EPOCHS,
        help=f"linear warmup epochs (default {DEFAULT_WARMUP_EPOCHS})",
    )
    p.add_argument(
        "--n-windows",
        type=int,
        default=DEFAULT_WINDOWS,
        help=f"windows per subject: one drawn per epoch, all averaged at test time (default {DEFAULT_WINDOWS})",
    )
    p.add_argument(
        "--readout", choices=HEADS, default=DEFAULT_READOUT, help=f"what the head reads (default {DEFAULT_READOUT})"
    )
    add_on_error_argument(p, "RESULTS_JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    model, cohort = load(args, "input")  # fine-tuning trains on each scan's full centre window
    results = finetune_cohort(
        model,
        cohort,
        args.target,
        task=args.task,
        seeds=args.seeds,
        split_column=args.split_column,
        fc_input=args.fc_input,
        class_weight=args.class_weight,
        epochs=args.epochs,
        patience=args.patience or None,
        lr=args.lr,
        layer_decay=args.layer_decay,
        drop_path=args.drop_path,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        n_windows=args.n_windows,
        readout=args.readout,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
    )
    print(results.table())
    if args.out:
        print(f"wrote {results.save(args.out)}")
    return report_skipped(cohort, args.out)
