"""``brainjepa finetune``: full fine-tuning next to the FC baseline and a from-scratch model."""

from __future__ import annotations

import argparse

from ..evaluate import finetune_cohort
from .embed import add_model_data_arguments, add_on_error_argument, load, report_skipped
from .probe import add_protocol_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune the whole model, with the FC and random-init baselines",
        description=(
            "Fine-tune encoder + head (mean-pooled tokens -> LayerNorm -> Linear) with AdamW, "
            "warmup + cosine schedule, layer-wise learning-rate decay and drop path (docs/method.md, Evaluation), "
            "keeping the epoch with the lowest validation loss. The same recipe trains the "
            "randomly initialised architecture ('random_init'); the FC baseline shares every "
            "split. Splits, seeds and the table are as in 'brainjepa probe'."
        ),
    )
    add_model_data_arguments(p)
    add_protocol_arguments(p)
    p.add_argument("--epochs", type=int, default=50, help="training epochs (default 50)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the top layer (default 5e-4)")
    p.add_argument(
        "--layer-decay", type=float, default=0.75, help="learning-rate factor per layer below the top (default 0.75)"
    )
    p.add_argument(
        "--drop-path", type=float, default=0.1, help="stochastic depth rate of the deepest block (default 0.1)"
    )
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--warmup-epochs", type=int, default=5, help="linear warmup epochs (default 5)")
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
        lr=args.lr,
        layer_decay=args.layer_decay,
        drop_path=args.drop_path,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
    )
    print(results.table())
    if args.out:
        print(f"wrote {results.save(args.out)}")
    return report_skipped(cohort, args.out)
