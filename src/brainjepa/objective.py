"""The JEPA objective, shared by the training step and the diagnostics.

Target blocks of a :class:`~brainjepa.masking.MaskBatch` are grouped by region (alpha, beta,
gamma), each group padded only to its own longest block. The target of a token is the target
encoder's feature there, layer-normed over the features; with ``center`` (the default recipe),
the batch's mean feature *at that token position* is then subtracted, so a prediction made from
the token's position alone scores no better than predicting zero and the predictor has to read
the context (docs/method.md, "Recipe"). A block's loss is the mean over its valid tokens of the
per-token distance (Smooth-L1 or squared error, averaged over features); the step's loss is the
mean over blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fast import FastEncoder
from .masking import MaskBatch

# Padded token lists are rounded up to a multiple of this (extra entries invalid). Sequence
# lengths then come from a small set, and so do the matmul shapes: oneDNN (bf16 on CPU) compiles
# and caches a kernel per shape, and with a new length every step that cache alone grew the
# process by ~80 MB per step up to ~600 MB. The padding adds ~1% of the tokens.
PAD_MULTIPLE = 64
LOSSES = ("smooth_l1", "l2")


def pad_width(idx: torch.Tensor, valid: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut or pad (with invalid entries pointing at token 0) the last dim of idx / valid to
    ``width`` rounded up to a multiple of PAD_MULTIPLE."""
    width = -(-max(width, 1) // PAD_MULTIPLE) * PAD_MULTIPLE
    extra = width - idx.shape[-1]
    if extra <= 0:
        return idx[..., :width], valid[..., :width]
    return F.pad(idx, (0, extra)), F.pad(valid, (0, extra))


def block_groups(masks: MaskBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Target blocks grouped by region: [(idx B x K x w, valid B x K x w)], each group cut to its
    last column holding a valid token (only all-padding columns go; every target token stays),
    then padded to a multiple of PAD_MULTIPLE."""
    groups = []
    for region in dict.fromkeys(masks.regions):
        sel = torch.tensor([i for i, r in enumerate(masks.regions) if r == region])
        idx, valid = masks.target_idx[:, sel], masks.target_valid[:, sel]
        used = valid.any(0).any(0).nonzero()
        groups.append(pad_width(idx, valid, int(used.max()) + 1 if len(used) else 1))
    return groups


def context_tokens(masks: MaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The context's (idx B x Nc, valid B x Nc), padded to a multiple of PAD_MULTIPLE."""
    return pad_width(masks.context_idx, masks.context_valid, masks.context_idx.shape[1])


def target_features(target_encoder: nn.Module, x: torch.Tensor, token_idx: torch.Tensor, center: bool) -> torch.Tensor:
    """Targets (B x M x D, float32) at tokens ``token_idx`` (B x M) of input x (B x R x T).

    The target encoder's features, layer-normed; with ``center`` each position's mean over the
    batch is subtracted (which needs the full grid). Without it a
    :class:`~brainjepa.fast.FastEncoder` computes only the requested tokens in its last block.
    """
    if not center:
        if isinstance(target_encoder, FastEncoder):
            h = target_encoder(x, output_idx=token_idx)
        else:
            h = gather_tokens(target_encoder(x), token_idx)
        return F.layer_norm(h.float(), h.shape[-1:])
    full = target_encoder(x)
    full = F.layer_norm(full.float(), full.shape[-1:])
    full = full - full.mean(0, keepdim=True)
    return gather_tokens(full, token_idx)


def gather_tokens(h: torch.Tensor, token_idx: torch.Tensor) -> torch.Tensor:
    """Features h (B x N x D) at tokens token_idx (B x M) -> B x M x D."""
    return torch.gather(h, 1, token_idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))


def token_loss(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-token distance (... x D -> ...), averaged over features."""
    if loss == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none").mean(-1)
    return (pred - target).pow(2).mean(-1)


def masked_block_mean(err: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-block mean over the valid tokens of per-token errors (n x w -> n); 0 if none."""
    v = valid.to(err.dtype)
    return (err * v).sum(-1) / v.sum(-1).clamp_min(1)


def block_loss_sum(
    predictor: nn.Module,
    z: torch.Tensor,
    context_idx: torch.Tensor,
    context_valid: torch.Tensor,
    target_idx: torch.Tensor,
    target_valid: torch.Tensor,
    targets: torch.Tensor,
    loss: str = "smooth_l1",
    shared=None,
) -> torch.Tensor:
    """Predict one group of K target blocks and sum their losses over samples and blocks.

    z: B x Nc x D context features at context_idx (B x Nc, validity context_valid);
    target_idx/valid: B x K x w; targets: B x K x w x D target features at target_idx.
    Each block gets its own predictor pass (z repeated K times). A block without valid tokens
    adds 0. ``shared``: the context state of a :class:`~brainjepa.fast.FastPredictor` for z
    (``predictor.context_state``), reused by every pass.
    """
    B, K, w = target_idx.shape
    D = targets.shape[-1]
    if K > 1:
        z, context_idx, context_valid = (t.repeat_interleave(K, 0) for t in (z, context_idx, context_valid))
        shared = None if shared is None else shared.repeat_interleave(K)
    valid = target_valid.reshape(B * K, w)
    extra = {} if shared is None else {"shared": shared}
    pred = predictor(z, context_idx, target_idx.reshape(B * K, w), context_valid, valid, **extra).float()
    err = token_loss(pred, targets.reshape(B * K, w, D), loss)
    return masked_block_mean(err, valid).sum()


def split_targets(h: torch.Tensor, groups) -> list[torch.Tensor]:
    """Cut target features h (B x M x D, the groups' tokens concatenated) into one
    B x K x w x D tensor per group."""
    out, offset = [], 0
    for idx, _ in groups:
        out.append(h[:, offset : offset + idx[0].numel()].reshape(*idx.shape, -1))
        offset += idx[0].numel()
    return out


def group_tokens(groups) -> tuple[torch.Tensor, torch.Tensor]:
    """All groups' target tokens and their validity, concatenated: (B x M, B x M)."""
    return tuple(torch.cat([t.reshape(t.shape[0], -1) for t in part], 1) for part in zip(*groups))


def n_blocks(masks: MaskBatch) -> int:
    """Blocks with at least one valid token (the loss's denominator), at least 1."""
    return max(int(masks.target_valid.any(-1).sum()), 1)
