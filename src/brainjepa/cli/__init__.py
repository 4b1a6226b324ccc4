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


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="brainjepa",
        description="Brain-JEPA: pretrain, embed, probe and fine-tune fMRI foundation models.",
    )
    parser.add_argument("--version", action="version", version=f"brainjepa {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:  # a verb not built yet must not break the others
            if exc.name and exc.name.endswith(f"cli.{name}"):
                continue
            raise
        module.register(sub)
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
