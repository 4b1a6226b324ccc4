"""The ``brainjepa`` command line: one thin sub-command per verb, each calling the library.

Each verb lives in its own module in this package and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` (a callable taking the parsed namespace and returning an exit code).
User errors (:class:`brainjepa.errors.BrainJEPAError`) are printed as one line; ``--debug`` shows
the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import textwrap

from .. import __version__
from ..errors import BrainJEPAError

# verb modules, in the order they appear in --help (the pipeline's order)
COMMANDS = [
    "simulate",
    "prepare",
    "gradients",
    "pretrain",
    "export",
    "embed",
    "probe",
    "finetune",
    "attention",
    "diagnose",
    "convert_official",
    "demo",
]

# runnable examples ending each verb's --help, in pipeline order: the output of one feeds the next
EXAMPLES = {
    "simulate": ["brainjepa simulate --subjects 40 --rois 50 --out sim"],
    "prepare": [
        "brainjepa prepare sim/manifest.csv --out store",
        "brainjepa prepare sim/manifest.csv --out store --dtype float16 --on-error skip --overwrite",
    ],
    "gradients": [
        "brainjepa gradients store --out gradients.csv",
        "brainjepa gradients sim/manifest.csv --out gradients.csv --n-components 10",
    ],
    "pretrain": [
        "brainjepa pretrain tiny --data store --out runs/tiny --max-steps 40",
        "brainjepa pretrain tiny --data store --out runs/tiny2 --gradients gradients.csv "
        "--set data.target_tr=2.0 --max-steps 40",
    ],
    "export": ["brainjepa export runs/tiny --out tiny-bundle"],
    "embed": [
        "brainjepa embed --model runs/tiny --data sim/manifest.csv --out emb.npz",
        "brainjepa embed --model runs/tiny --data store --out emb.npz --on-error skip --shard-size 500",
    ],
    "probe": ["brainjepa probe --model runs/tiny --data sim/manifest.csv --target age --seeds 3 --out results.json"],
    "finetune": ["brainjepa finetune --model runs/tiny --data sim/manifest.csv --target patient --epochs 5"],
    "attention": ["brainjepa attention --model runs/tiny --data sim/manifest.csv --out attention"],
    "convert-official": [
        "brainjepa convert-official jepa-ep300.pth.tar --gradients gradient_mapping_450.csv --out vitb-authors"
    ],
    "demo": ["brainjepa demo --quick", "brainjepa demo --out my-demo"],
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and example blocks as written; every option with a default shows it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or not action.option_strings
            or (isinstance(default, list) and not default)
        ):
            return text
        return f"{text} (default: %(default)s)"

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return super()._fill_text(text, width, indent)

        return "\n".join(
            textwrap.fill(part, width, initial_indent=indent, subsequent_indent=indent) for part in text.split("\n")
        )


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="brainjepa",
        description="Brain-JEPA: pretrain, embed, probe and fine-tune fMRI foundation models.",
    )
    parser.add_argument("--version", action="version", version=f"brainjepa {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    for verb, sub_parser in sub.choices.items():
        sub_parser.formatter_class = HelpFormatter
        if verb in EXAMPLES and not sub_parser.epilog:
            sub_parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[verb])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except BrainJEPAError as exc:
        if args.debug:
            raise
        print(f"brainjepa {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"brainjepa {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
