"""The authors' released checkpoint -> a brainjepa bundle (``brainjepa convert-official``).

Their parameter names are mapped to ours (:func:`map_official_state_dict`), the architecture is
inferred from tensor shapes (:func:`infer_official_config`) and the result is saved as a
safetensors bundle. This is the one place where a file may be fully unpickled, and only with
``trust_pickle=True`` (see :func:`brainjepa.bundle_files.load_torch_file`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from .bundle import BrainJEPA
from .bundle_files import ENCODERS, load_tensors, load_torch_file, sha256_file
from .errors import ConfigError, DataError
from .gradients import load_gradients_csv
from .inputs import OFFICIAL_NORMALIZATION_NOTE
from .model import ModelConfig, sincos_1d

logger = logging.getLogger(__name__)

_OFFICIAL_BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def map_official_state_dict(state: dict, part: str) -> dict:
    """Rename one of the authors' state dicts to ours.

    Strips DDP ``module.`` prefixes, renames keys, reshapes the Conv2d patch embedding (D, 1, 1, p)
    into a Linear (D, p), and drops the fixed sine-cosine tables (we recompute them; they are
    checked against ours so a checkpoint built with another temporal code is refused).

    Args:
        state: the authors' encoder or predictor state dict.
        part: "encoder" or "predictor".

    Returns:
        The state dict with our names (no ``gradients`` buffer).

    Raises:
        ValueError: another ``part``.
        DataError: a key it does not know (so nothing is silently lost), or a sine-cosine table
            that differs from ours.
    """
    if part not in ("encoder", "predictor"):
        raise ValueError(f"part must be 'encoder' or 'predictor', not {part!r}")
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    if part == "encoder":
        table = {
            "patch_embed.proj.weight": "patch_embed.weight",
            "patch_embed.proj.bias": "patch_embed.bias",
            "pos_embed_proj.predictor_pos_embed_proj.weight": "pos_embed.proj.weight",
            "pos_embed_proj.predictor_pos_embed_proj.bias": "pos_embed.proj.bias",
            "norm.weight": "norm.weight",
            "norm.bias": "norm.bias",
        }
        sincos_key, block_prefix = "pos_embed_proj.emb_h", ("blocks.", "blocks.")
    else:
        table = {
            "mask_token": "mask_token",
            "predictor_embed.weight": "embed.weight",
            "predictor_embed.bias": "embed.bias",
            "predictor_2dpe_proj.predictor_pos_embed_proj.weight": "pos_embed.proj.weight",
            "predictor_2dpe_proj.predictor_pos_embed_proj.bias": "pos_embed.proj.bias",
            "predictor_norm.weight": "norm.weight",
            "predictor_norm.bias": "norm.bias",
            "predictor_proj.weight": "proj.weight",
            "predictor_proj.bias": "proj.bias",
        }
        sincos_key, block_prefix = "predictor_2dpe_proj.emb_h", ("predictor_blocks.", "blocks.")
    out, unknown = {}, []
    for key, value in state.items():
        if key in table:
            out[table[key]] = value
        elif key == sincos_key:
            _check_official_sincos(value)
        elif key.startswith(block_prefix[0]):
            i, rest = key[len(block_prefix[0]) :].split(".", 1)
            if rest.rsplit(".", 1)[0] not in _OFFICIAL_BLOCK_PARTS:
                unknown.append(key)
            out[f"{block_prefix[1]}{i}.{rest}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise DataError(
            f"the authors' {part} state dict has keys this converter does not know: "
            f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}"
        )
    if "patch_embed.weight" in out:
        w = out["patch_embed.weight"]
        out["patch_embed.weight"] = w.reshape(w.shape[0], -1)
    return out


def _check_official_sincos(table: torch.Tensor) -> None:
    """The authors store the temporal code as an (R*P, d/2) table; ours must be identical."""
    n_tokens, half = table.shape
    # the code restarts at each ROI: find P as the period of the first column's zeros
    zeros = (table[:, 0] == 0).nonzero().flatten()
    n_patches = int(zeros[1] - zeros[0]) if len(zeros) > 1 else n_tokens
    ours = sincos_1d(n_patches, half).repeat(n_tokens // n_patches, 1)
    if ours.shape != table.shape or not torch.allclose(ours, table.float(), atol=1e-5):
        raise DataError(
            "the checkpoint's temporal sine-cosine table differs from brainjepa's; "
            "this checkpoint was not made with the Brain-JEPA positional embedding"
        )


def infer_official_config(
    encoder_state: dict,
    predictor_state: dict,
    n_timepoints: int = 160,
    num_heads: int | None = None,
    predictor_num_heads: int | None = None,
) -> ModelConfig:
    """Infer the architecture from the authors' tensor shapes.

    Head counts are not stored in the weights: by default the encoder gets 64-dim heads as in
    ViT-S/B/L, and the predictor the encoder's head count, as in the authors' setup.

    Args:
        encoder_state: the authors' encoder state dict.
        predictor_state: the authors' predictor state dict.
        n_timepoints: the window length the checkpoint was trained on.
        num_heads: encoder heads; None: embed_dim // 64.
        predictor_num_heads: predictor heads; None: the encoder's.

    Returns:
        The architecture (with the authors' min-max rescaled positions).

    Raises:
        DataError: a token count that is not a whole number of ROIs for ``n_timepoints``.
    """
    enc = {k.removeprefix("module."): v for k, v in encoder_state.items()}
    pred = {k.removeprefix("module."): v for k, v in predictor_state.items()}
    D = enc["patch_embed.proj.weight"].shape[0]
    patch = enc["patch_embed.proj.weight"].shape[-1]
    n_tokens = enc["pos_embed_proj.emb_h"].shape[0]
    n_patches = n_timepoints // patch
    if n_tokens % n_patches:
        raise DataError(
            f"checkpoint has {n_tokens} tokens, not a multiple of {n_patches} patches "
            f"(n_timepoints={n_timepoints}): pass the right --n-timepoints"
        )
    depth = 1 + max(int(k.split(".")[1]) for k in enc if k.startswith("blocks."))
    pdepth = 1 + max(int(k.split(".")[1]) for k in pred if k.startswith("predictor_blocks."))
    Dp = pred["predictor_embed.weight"].shape[0]
    heads = num_heads or max(1, D // 64)
    return ModelConfig(
        n_rois=n_tokens // n_patches,
        n_timepoints=n_timepoints,
        patch_size=patch,
        n_gradients=enc["pos_embed_proj.predictor_pos_embed_proj.weight"].shape[1],
        embed_dim=D,
        depth=depth,
        num_heads=heads,
        mlp_ratio=enc["blocks.0.mlp.fc1.weight"].shape[0] / D,
        qkv_bias="blocks.0.attn.qkv.bias" in enc,
        predictor_embed_dim=Dp,
        predictor_depth=pdepth,
        predictor_num_heads=predictor_num_heads or heads,
        pos_minmax=True,
    )


def convert_official(
    checkpoint: str | Path,
    gradients_csv: str | Path,
    out: str | Path,
    *,
    trust_pickle: bool = False,
    n_timepoints: int = 160,
    num_heads: int | None = None,
    predictor_num_heads: int | None = None,
    encoder: str = "target",
    predictor: bool = True,
    roi_labels: Sequence[str] | None = None,
    target_tr: float | None = None,
) -> Path:
    """Convert the authors' released checkpoint (e.g. jepa-ep300.pth.tar) into a bundle.

    The checkpoint is read with ``torch.load(weights_only=True)``; only ``trust_pickle=True``
    allows full unpickling (which can run arbitrary code) when that fails. Keys are mapped with
    :func:`map_official_state_dict`, the size is inferred from tensor shapes
    (:func:`infer_official_config`), and the bundle records the authors' min-max rescaled
    positional embedding and an "unknown" normalisation (their statistics are not shipped).

    Args:
        checkpoint: the authors' checkpoint file.
        gradients_csv: their (R, 30) gradient matrix.
        out: the bundle folder to write.
        trust_pickle: allow full unpickling when the safe load refuses the file.
        n_timepoints: the window length the checkpoint was trained on.
        num_heads: encoder heads (not stored in the weights); None: 64-dim heads, 12 for ViT-B.
        predictor_num_heads: predictor heads; None: the encoder's.
        encoder: "target" (the EMA target encoder, default) or "context".
        predictor: include the predictor.
        roi_labels: the ROI names; None: the labels in ``gradients_csv``, if any.
        target_tr: the TR (seconds) of the training data, recorded in the bundle; None: unknown.

    Returns:
        The bundle folder.

    Raises:
        ConfigError: an unknown ``encoder``.
        DataError: not an authors' checkpoint, or gradients of another shape than it needs.
        BrainJEPAError: an unreadable or refused file, or weights that do not fit.
    """
    checkpoint = Path(checkpoint)
    if encoder not in ENCODERS:
        raise ConfigError(f"encoder must be one of {sorted(ENCODERS)}, not {encoder!r}")
    ckpt = load_torch_file(checkpoint, trust_pickle=trust_pickle)
    key = ENCODERS[encoder]
    missing = [k for k in (key, "predictor") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DataError(f"{checkpoint}: not an authors' Brain-JEPA checkpoint (missing {missing}; found {found})")
    cfg = infer_official_config(
        ckpt[key],
        ckpt["predictor"],
        n_timepoints=n_timepoints,
        num_heads=num_heads,
        predictor_num_heads=predictor_num_heads,
    )
    gradients, csv_labels = load_gradients_csv(gradients_csv)
    if gradients.shape != (cfg.n_rois, cfg.n_gradients):
        raise DataError(
            f"{gradients_csv}: gradients have shape {gradients.shape} but the "
            f"checkpoint expects (n_rois={cfg.n_rois}, n_gradients={cfg.n_gradients}); "
            "use the gradient file released with this checkpoint"
        )
    model = BrainJEPA(
        cfg,
        gradients,
        normalization={"method": "unknown", "expected": "robust", "note": OFFICIAL_NORMALIZATION_NOTE},
        roi_labels=roi_labels if roi_labels is not None else csv_labels,
        target_tr=target_tr,
        predictor=predictor,
        # the authors' code trains with Smooth-L1 (the paper writes L2)
        info={"loss": "smooth_l1", "encoder_weights": key},
    )
    g = model.encoder.gradients
    tensors = {f"encoder.{k}": v for k, v in map_official_state_dict(ckpt[key], "encoder").items()}
    tensors["encoder.gradients"] = g
    if predictor:
        tensors.update(
            {f"predictor.{k}": v for k, v in map_official_state_dict(ckpt["predictor"], "predictor").items()}
        )
        tensors["predictor.gradients"] = g
    load_tensors(model, tensors, checkpoint)
    model.provenance = {
        "source": "authors' released Brain-JEPA checkpoint, converted by brainjepa convert-official",
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": sha256_file(checkpoint),
        "gradients_file": Path(gradients_csv).name,
        "epoch": ckpt.get("epoch"),
        "steps": None,
        "authors_training": {
            k: ckpt[k] for k in ("batch_size", "world_size", "lr", "loss") if isinstance(ckpt.get(k), (int, float))
        },
        "training_data": "not stored in the checkpoint; the paper pretrains on UK Biobank (about "
        "32k subjects; Tian Scale III subcortex 50 ROIs first, then Schaefer-400 "
        "in 17-network order; 160 frames at about 2 s)",
        "pos_embed": "spatial half min-max rescaled to [-1, 1] over all tokens (authors' code)",
        "converter": {
            "encoder": encoder,
            "n_timepoints": n_timepoints,
            "num_heads": cfg.num_heads,
            "predictor_num_heads": cfg.predictor_num_heads,
            "heads_given": num_heads is not None,
            "trust_pickle": trust_pickle,
        },
    }
    out = model.save_pretrained(out)
    logger.info("converted %s -> %s (R=%d, D=%d, depth=%d)", checkpoint, out, cfg.n_rois, cfg.embed_dim, cfg.depth)
    return out
