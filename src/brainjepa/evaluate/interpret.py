"""Interpretation: the attention each token receives, per ROI and per functional network.

The attention weights are computed here, outside the model, by running the encoder's own
modules step by step with explicit softmax weights; the model itself only computes features.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import DataError
from .features import progress_bar, resolve_device


def encode_with_attention(encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The encoder's features of every token, and the attention each token receives per layer.

    Runs the encoder's modules explicitly (``tokens``, then per block ``norm1``, ``attn.qkv``
    split into ``attn.num_heads`` heads, softmax(q k^T / sqrt(d)), ``attn.proj`` of the merged
    heads, ``norm2`` and ``mlp`` with their residuals; finally ``norm``), as the encoder does in
    eval mode (drop path is not applied).

    Args:
        encoder: a :class:`~brainjepa.model.BrainEncoder`.
        x: (B, R, T) model inputs.

    Returns:
        (features (B, N, D), received): ``received`` holds per layer a (B, N) float tensor, the
        attention weight each token receives averaged over heads and queries (each row sums to
        1, since every query's weights do).
    """
    h = encoder.tokens(x)
    received = []
    for block in encoder.blocks:
        attn = block.attn
        a = block.norm1(h)
        B, N, C = a.shape
        H = attn.num_heads
        q, k, v = attn.qkv(a).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)  # each (B, H, N, d)
        weights = ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).softmax(dim=-1)  # (B, H, N, N)
        received.append(weights.mean(dim=(1, 2)).float())
        h = h + attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))
        h = h + block.mlp(block.norm2(h))
    return encoder.norm(h), received


def attention_received(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The attention each token receives, per layer (see :func:`encode_with_attention`).

    Args:
        encoder: a :class:`~brainjepa.model.BrainEncoder`.
        x: (B, R, T) model inputs.

    Returns:
        One (B, N) tensor per layer: mean over heads and queries of the attention weights.
    """
    return encode_with_attention(encoder, x)[1]


@torch.inference_mode()
def roi_attention(
    encoder: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, device: str | None = None, progress: bool = False
) -> np.ndarray:
    """Attention each ROI receives.

    Averaged over heads, queries, layers, time patches and subjects, and scaled so 1.0 is the
    uniform share (every token receiving 1 / N of the attention).

    Args:
        encoder: a :class:`~brainjepa.model.BrainEncoder`.
        windows: (S, R, T) model inputs (see :meth:`BrainJEPAEmbedder.windows`).
        batch_size: windows per forward pass.
        device: where to compute.
        progress: show a progress bar.

    Returns:
        (R,) float64.
    """
    device = resolve_device(device)
    encoder = encoder.to(device).eval()
    cfg = encoder.cfg
    total = torch.zeros(cfg.n_rois, dtype=torch.float64)
    batches = windows.split(batch_size)
    for x in progress_bar(batches, len(batches), "attention", progress):
        received = torch.stack(attention_received(encoder, x.to(device))).mean(dim=0)  # (B, N), mean over layers
        total += received.reshape(len(x), cfg.n_rois, cfg.n_patches).mean(dim=2).sum(dim=0).double().cpu()
    return (total / len(windows) * cfg.n_tokens).numpy()


def network_labels_from_roi_names(roi_labels: Sequence[str] | None) -> list[str] | None:
    """Networks from Schaefer-style ROI names.

    Args:
        roi_labels: ROI names such as '7Networks_LH_Vis_1', also without the '7Networks_'
            prefix, as the simulated cohort names them ('LH_Default_3').

    Returns:
        One network per ROI ('Vis', 'Default'), or None when a name does not follow the scheme.
    """
    if not roi_labels:
        return None
    nets = []
    for label in roi_labels:
        parts = str(label).split("_")
        if parts[0].endswith("Networks"):
            parts = parts[1:]
        if len(parts) < 3 or parts[0] not in ("LH", "RH"):
            return None
        nets.append(parts[1])
    return nets


def read_networks(path: str | Path, roi_labels: Sequence[str] | None, n_rois: int) -> list[str]:
    """ROI -> network assignment from a CSV/TSV with a ``network`` column.

    Rows are matched to the model's ROI labels by a ``roi`` (or ``name``) column when both
    exist, else taken as one row per ROI in model order (the simulated cohort's rois.tsv works
    as is).

    Args:
        path: the table (.tsv / .txt tab-separated, else comma-separated).
        roi_labels: the model's ROI labels, or None.
        n_rois: the model's R.

    Returns:
        One network per ROI, in model order.

    Raises:
        DataError: no such file, no 'network' column, ROIs without a network, or a row count
            other than R.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"networks file {path} does not exist")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t" if path.suffix in (".tsv", ".txt") else ","))
    if not rows or "network" not in rows[0]:
        raise DataError(f"{path}: needs a header with a 'network' column (optionally 'roi')")
    key = next((k for k in ("roi", "name") if k in rows[0]), None)
    if key and roi_labels:
        mapping = {r[key]: r["network"] for r in rows}
        missing = [r for r in roi_labels if r not in mapping]
        if missing:
            raise DataError(f"{path}: no network for ROI(s) {missing[:5]} of the model")
        return [mapping[r] for r in roi_labels]
    if len(rows) != n_rois:
        raise DataError(
            f"{path}: {len(rows)} rows but the model has {n_rois} ROIs (one row per "
            "ROI in model order, or add a 'roi' column with the model's ROI labels)"
        )
    return [r["network"] for r in rows]


def network_attention(roi_values: np.ndarray, networks: Sequence) -> list[dict]:
    """Mean of a per-ROI quantity per network.

    Args:
        roi_values: (R,) values.
        networks: R network labels.

    Returns:
        [{"network", "attention", "n_rois"}], in order of first appearance.

    Raises:
        DataError: a label count other than R.
    """
    roi_values = np.asarray(roi_values)
    if len(networks) != len(roi_values):
        raise DataError(f"{len(networks)} network labels for {len(roi_values)} ROIs")
    networks = [str(n) for n in networks]
    out = []
    for net in dict.fromkeys(networks):
        idx = [i for i, n in enumerate(networks) if n == net]
        out.append({"network": net, "attention": float(roi_values[idx].mean()), "n_rois": len(idx)})
    return out
