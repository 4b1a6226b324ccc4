"""``brainjepa probe``: linear probing of a frozen model next to random-init, FC and amplitude
baselines, with paired comparisons."""

from __future__ import annotations

import argparse

from ..data import CohortSeries
from ..errors import ConfigError
from ..evaluate import PROBES, READOUTS, WINDOWS, Results, cohort_states, probe_cohort, probe_states
from ..evaluate.cohort import FC_INPUTS
from ..evaluate.labels import TASKS
from ..evaluate.training import CLASS_WEIGHTS
from .embed import add_model_data_arguments, add_on_error_argument, load, report_skipped


def add_protocol_arguments(p: argparse.ArgumentParser, fc_input: bool = True, target_required: bool = True) -> None:
    """Target, task, seeds, splits, baselines and output options shared by probe and finetune
    (``fc_input``: offer --fc-input, the choice of fine-tuning's single FC baseline)."""
    p.add_argument(
        "--target",
        required=target_required,
        action="append",
        metavar="COLUMN",
        help="label column to predict (repeat for several targets)",
    )
    p.add_argument(
        "--task",
        choices=TASKS,
        default="auto",
        help="auto (default): classification for text or <= 10 distinct integer values",
    )
    p.add_argument("--seeds", type=int, default=5, help="number of seeds / random splits (default 5)")
    p.add_argument(
        "--split-column",
        metavar="COLUMN",
        help="use this column's train/val/test values instead of random 60/20/20 splits "
        "('split' reads the manifest's split column)",
    )
    if fc_input:
        p.add_argument(
            "--fc-input",
            choices=FC_INPUTS,
            default="full",
            help="FC baseline from each subject's full series (default) or from exactly the window the model sees",
        )
    p.add_argument(
        "--class-weight",
        choices=CLASS_WEIGHTS,
        default=None,
        help="weight classes by inverse frequency in the training loss",
    )
    p.add_argument(
        "--out", metavar="RESULTS_JSON", help="write the results as JSON (summary rows and, for probe, the comparisons)"
    )


def register(subparsers) -> None:

    p = subparsers.add_parser(
        "probe",
        help="linear probing with random-init, FC and amplitude baselines",
        description=(
            "Evaluate a frozen model by linear probing. For every seed the subjects are split "
            "60/20/20 (stratified for classification) or by --split-column; every method is "
            "fitted on train, tuned on validation only and evaluated once on test. Each scan is "
            "encoded window by window (--windows) and read out as the token mean ('mean'), "
            "per-ROI mean and std over time ('roi') or the ROI x ROI correlation of token "
            "features ('fc'). Methods: 'brainjepa:<readout>'; the same architecture randomly "
            "initialised with several seeds ('random_init#<k>:<readout>', their mean per split "
            "'random_init(mean)' and the seed with the best mean test score 'random_init(best)'); "
            "FC of the full scan ('fc_full') and of the model's windows ('fc_window'); per-ROI "
            "log amplitude ('amplitude'). Prints mean +- std over seeds and paired comparisons "
            "of brainjepa against each reference (mean difference, 95% CI, paired t-test p)."
        ),
    )
    add_model_data_arguments(p)
    add_protocol_arguments(p, fc_input=False, target_required=False)
    p.add_argument(
        "--states",
        metavar="COLUMN",
        help="also decode brain states window by window: a manifest column naming each scan's BIDS "
        "events file (onset, duration, trial_type; relative to the scan's folder); frames outside "
        "every event are the first state. Splits keep subjects apart; references: random init and "
        "the FC, amplitude and level of the same window",
    )
    p.add_argument(
        "--state-names",
        nargs="+",
        default=["rest", "task"],
        metavar="NAME",
        help="the states, the first for frames outside every event (default: rest task)",
    )
    p.add_argument(
        "--state-lag",
        type=float,
        default=6.0,
        metavar="SECONDS",
        help="hemodynamic delay between an event and the BOLD it labels (default 6)",
    )
    p.add_argument(
        "--state-min-purity",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="decode only windows with at least this fraction of their frames in one state, e.g. 0.9 "
        "leaves out windows that straddle a change of state (default 0: every window)",
    )
    p.add_argument(
        "--readout",
        action="append",
        choices=READOUTS,
        help=f"readout of the token features, one of {', '.join(READOUTS)}; repeat "
        f"for several (default: all of {', '.join(READOUTS)})",
    )
    p.add_argument(
        "--random-init-seeds",
        type=int,
        default=3,
        metavar="N",
        help="randomly initialised copies of the architecture, seeds 0..N-1 (default 3; 0 leaves them out)",
    )
    p.add_argument(
        "--windows",
        choices=WINDOWS,
        default="all",
        help="all (default): average over evenly spaced windows covering each scan; center: the centre window only",
    )
    p.add_argument(
        "--probe",
        choices=PROBES,
        default="closed-form",
        help="closed-form (default): ridge / logistic regression on standardised "
        "embeddings; bn-linear: the paper's BatchNorm + linear head (AdamW)",
    )
    p.add_argument("--epochs", type=int, default=50, help="bn-linear probe epochs (default 50)")
    add_on_error_argument(p, "RESULTS_JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    if not args.target and not args.states:
        raise ConfigError("probe needs something to predict: --target COLUMN (traits), --states COLUMN, or both")
    model, cohort = load(args, args.windows)
    results = Results()
    if args.states:
        states = cohort_states(cohort, args.states, classes=args.state_names)  # fails before the slow part
    if args.target:
        results.extend(_probe_targets(args, model, cohort))
    if args.states:
        results.extend(
            probe_states(
                model,
                CohortSeries(cohort),
                states,
                tr=cohort.trs,
                subjects=cohort.subjects,
                lag=args.state_lag,
                min_purity=args.state_min_purity,
                seeds=args.seeds,
                readouts=args.readout or READOUTS,
                random_init_seeds=args.random_init_seeds,
                batch_size=args.batch_size,
                device=args.device,
                progress=not args.quiet,
            )
        )
    print(results.table())
    print("paired over split seeds: brainjepa minus each reference\n")
    print(results.comparison_table())
    if args.out:
        print(f"wrote {results.save(args.out)}")
    return report_skipped(cohort, args.out)


def _probe_targets(args: argparse.Namespace, model, cohort) -> Results:
    return probe_cohort(
        model,
        cohort,
        args.target,
        task=args.task,
        seeds=args.seeds,
        probe=args.probe,
        split_column=args.split_column,
        readouts=args.readout or READOUTS,
        random_init_seeds=args.random_init_seeds,
        windows=args.windows,
        class_weight=args.class_weight,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
        probe_options={"epochs": args.epochs} if args.probe == "bn-linear" else None,
    )
