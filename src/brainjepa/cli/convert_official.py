"""``brainjepa convert-official``: the authors' released checkpoint -> a brainjepa bundle.

Reads their ``jepa-ep300.pth.tar`` with ``torch.load(weights_only=True)`` (full unpickling only
with ``--trust-pickle``), maps the weights onto brainjepa's modules and writes a safetensors
bundle that loads everywhere with ``brainjepa.BrainJEPA.from_pretrained``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bundle import BrainJEPA
from ..bundle_files import ENCODERS
from ..convert import convert_official
from ..errors import DataError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-official",
        help="convert the authors' released Brain-JEPA checkpoint into a safe model bundle",
        description=(
            "Convert the authors' checkpoint (e.g. jepa-ep300.pth.tar) and their gradient file "
            "(gradient_mapping_450.csv) into a brainjepa bundle folder (config.json, "
            "model.safetensors, gradients.csv, normalization.json, provenance.json). The "
            "checkpoint is read without executing code unless --trust-pickle is given. The "
            "checkpoint carries no normalisation statistics: the bundle records that, and "
            "model.prepare() asks you to choose one."
        ),
    )
    p.add_argument("checkpoint", help="the authors' checkpoint file (.pth.tar)")
    p.add_argument(
        "--gradients", required=True, metavar="CSV", help="the authors' R x 30 gradient matrix (header-less CSV)"
    )
    p.add_argument("--out", required=True, metavar="BUNDLE", help="output bundle folder")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow full unpickling if the safe loader refuses the file (can run code "
        "embedded in it: only for files from a source you trust)",
    )
    p.add_argument(
        "--n-timepoints", type=int, default=160, help="time points per sample the model was trained on (default 160)"
    )
    p.add_argument(
        "--num-heads",
        type=int,
        help="encoder attention heads (not stored in the weights; default: 64-dim "
        "heads, i.e. 12 for the ViT-B release)",
    )
    p.add_argument("--predictor-num-heads", type=int, help="predictor attention heads (default: as the encoder)")
    p.add_argument(
        "--encoder",
        choices=tuple(ENCODERS),
        default="target",
        help="which encoder becomes the bundle's encoder: the EMA target encoder (default) or the context encoder",
    )
    p.add_argument("--no-predictor", action="store_true", help="leave the predictor out")
    p.add_argument(
        "--roi-labels", metavar="TXT", help="file with one ROI label per line, in the gradient file's row order"
    )
    p.add_argument(
        "--target-tr",
        type=float,
        metavar="SECONDS",
        help="TR of the model's training data, so prepare() resamples to it",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    labels = None
    if args.roi_labels:
        try:
            labels = [line.strip() for line in Path(args.roi_labels).read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise DataError(f"{args.roi_labels}: cannot read ROI labels ({exc})") from exc
    out = convert_official(
        args.checkpoint,
        args.gradients,
        args.out,
        trust_pickle=args.trust_pickle,
        n_timepoints=args.n_timepoints,
        num_heads=args.num_heads,
        predictor_num_heads=args.predictor_num_heads,
        encoder=args.encoder,
        predictor=not args.no_predictor,
        roi_labels=labels,
        target_tr=args.target_tr,
    )
    cfg = BrainJEPA.from_pretrained(out).config
    print(
        f"wrote {out}: {cfg.n_rois} ROIs x {cfg.n_timepoints} time points, width "
        f"{cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads "
        f"({args.encoder} encoder{'' if args.no_predictor else ' + predictor'})"
    )
    print(
        "note: the checkpoint has no normalisation statistics; scale inputs per ROI as the "
        "authors did (see normalization.json) before embedding"
    )
    return 0
