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

from .masking import MaskBatch
from .model import gather

LOSSES = ("smooth_l1", "l2")


def pad_width(
    idx: torch.Tensor, valid: torch.Tensor, width: int, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut or pad the token lists to ``width`` rounded up to a multiple of ``multiple``.

    Padding entries are invalid and point at token 0.

    Args:
        idx: (..., n) token indices.
        valid: (..., n) bool validity.
        width: the wanted width before rounding (at least 1 is used).
        multiple: round the width up to a multiple of this (the training step's is
            :data:`brainjepa.fast.PAD_MULTIPLE`).

    Returns:
        idx and valid with last dimension the rounded width.
    """
    width = -(-max(width, 1) // multiple) * multiple
    extra = width - idx.shape[-1]
    if extra <= 0:
        return idx[..., :width], valid[..., :width]
    return F.pad(idx, (0, extra)), F.pad(valid, (0, extra))


def block_groups(masks: MaskBatch, multiple: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Target blocks grouped by region (alpha, beta, gamma), in the order the regions first appear.

    Each group is cut to its last column holding a valid token (only all-padding columns go; every
    target token stays), then padded to a multiple of ``multiple``.

    Args:
        masks: the batch's masks.
        multiple: the padding multiple (:func:`pad_width`).

    Returns:
        [(idx (B, K, w), valid (B, K, w))], one pair per region.
    """
    groups = []
    for region in dict.fromkeys(masks.regions):
        sel = torch.tensor([i for i, r in enumerate(masks.regions) if r == region])
        idx, valid = masks.target_idx[:, sel], masks.target_valid[:, sel]
        used = valid.any(0).any(0).nonzero()
        groups.append(pad_width(idx, valid, int(used.max()) + 1 if len(used) else 1, multiple))
    return groups


def context_tokens(masks: MaskBatch, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The context's tokens, padded to a multiple of ``multiple``.

    Args:
        masks: the batch's masks.
        multiple: the padding multiple (:func:`pad_width`).

    Returns:
        idx (B, Nc) and valid (B, Nc).
    """
    return pad_width(masks.context_idx, masks.context_valid, masks.context_idx.shape[1], multiple)


def target_features(target_encoder: nn.Module, x: torch.Tensor, token_idx: torch.Tensor, center: bool) -> torch.Tensor:
    """Targets at some tokens: the target encoder's features, layer-normed.

    With ``center`` each position's mean over the batch is subtracted (which needs the full grid).
    Without it a :class:`~brainjepa.fast.FastEncoder` computes only the requested tokens in its
    last block.

    Args:
        target_encoder: the (EMA) target encoder.
        x: (B, R, T) input.
        token_idx: (B, M) the target tokens.
        center: subtract each position's batch mean.

    Returns:
        (B, M, D) float32.
    """
    if not center:
        h = target_encoder(x, output_idx=token_idx)
        return F.layer_norm(h.float(), h.shape[-1:])
    full = target_encoder(x)
    full = F.layer_norm(full.float(), full.shape[-1:])
    full = full - full.mean(0, keepdim=True)
    return gather(full, token_idx)


def token_loss(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-token distance, averaged over features.

    Args:
        pred: (..., D) predictions.
        target: (..., D) targets.
        loss: "smooth_l1", else squared error ("l2").

    Returns:
        (...) one value per token.
    """
    if loss == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none").mean(-1)
    return (pred - target).pow(2).mean(-1)


def masked_block_mean(err: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-block mean of per-token errors over the valid tokens.

    Args:
        err: (n, w) per-token errors.
        valid: (n, w) bool validity.

    Returns:
        (n,) the means; 0 for a block without valid tokens.
    """
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

    Each block gets its own predictor pass (z repeated K times). A block without valid tokens
    adds 0.

    Args:
        predictor: the predictor (a :class:`~brainjepa.fast.FastPredictor` to use ``shared``).
        z: (B, Nc, D) context features at ``context_idx``.
        context_idx: (B, Nc) context token positions.
        context_valid: (B, Nc) bool validity of the context tokens.
        target_idx: (B, K, w) target token positions.
        target_valid: (B, K, w) bool validity of the target tokens.
        targets: (B, K, w, D) target features at ``target_idx``.
        loss: "smooth_l1" or "l2" (:func:`token_loss`).
        shared: the predictor's context state for z (``predictor.context_state``), reused by every
            pass; None: each pass computes it.

    Returns:
        A scalar: the sum of the K * B block losses.
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
    """Cut the groups' concatenated target features into one tensor per group.

    Args:
        h: (B, M, D) target features, the groups' tokens concatenated (:func:`group_tokens`).
        groups: the groups from :func:`block_groups`.

    Returns:
        One (B, K, w, D) tensor per group.
    """
    out, offset = [], 0
    for idx, _ in groups:
        out.append(h[:, offset : offset + idx[0].numel()].reshape(*idx.shape, -1))
        offset += idx[0].numel()
    return out


def group_tokens(groups) -> tuple[torch.Tensor, torch.Tensor]:
    """All groups' target tokens and their validity, concatenated.

    Args:
        groups: the groups from :func:`block_groups`.

    Returns:
        idx (B, M) and valid (B, M).
    """
    return tuple(torch.cat([t.reshape(t.shape[0], -1) for t in part], 1) for part in zip(*groups))


def n_blocks(masks: MaskBatch) -> int:
    """Blocks with at least one valid token: the loss's denominator.

    Args:
        masks: the batch's masks.

    Returns:
        Their number over the batch, at least 1.
    """
    return max(int(masks.target_valid.any(-1).sum()), 1)
