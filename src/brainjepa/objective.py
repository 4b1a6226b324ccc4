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
REGULARIZERS = ("none", "vicreg", "sigreg")


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


def last_layers_mean(encoder: nn.Module, x: torch.Tensor, layers: int) -> torch.Tensor:
    """The mean of the last ``layers`` blocks' outputs of an encoder, each layer-normed.

    Args:
        encoder: a :class:`~brainjepa.model.BrainEncoder` (or a subclass with the same blocks).
        x: (B, R, T) input.
        layers: how many of the last blocks (1: the last block's output).

    Returns:
        (B, R * P, D) float32 over every token.
    """
    h = encoder.tokens(x)
    first = len(encoder.blocks) - min(layers, len(encoder.blocks))
    total = None
    for i, block in enumerate(encoder.blocks):
        h = block(h, None)
        if i >= first:
            out = F.layer_norm(h.float(), h.shape[-1:])
            total = out if total is None else total + out
    return total / (len(encoder.blocks) - first)


def target_features(
    target_encoder: nn.Module, x: torch.Tensor, token_idx: torch.Tensor, center: bool, layers: int = 1
) -> torch.Tensor:
    """Targets at some tokens: the target encoder's features, layer-normed.

    With ``center`` each position's mean over the batch is subtracted, which needs every sample's
    features at every position that some sample targets; a :class:`~brainjepa.fast.FastEncoder`
    computes only those positions in its last block (the union of the batch's target tokens),
    without ``center`` only each sample's own target tokens. With ``layers`` > 1 the target is
    the mean of the last ``layers`` blocks' layer-normed outputs (:func:`last_layers_mean`)
    instead of the final output.

    Args:
        target_encoder: the (EMA) target encoder.
        x: (B, R, T) input.
        token_idx: (B, M) the target tokens.
        center: subtract each position's batch mean.
        layers: how many of the last blocks the target averages.

    Returns:
        (B, M, D) float32.
    """
    if layers > 1:
        full = last_layers_mean(target_encoder, x, layers)
    elif not center:
        h = target_encoder(x, output_idx=token_idx)
        return F.layer_norm(h.float(), h.shape[-1:])
    else:  # centred: the positions any sample targets, for every sample
        positions, token_idx = torch.unique(token_idx, return_inverse=True)
        full = target_encoder(x, output_idx=positions.expand(len(x), -1))
    full = F.layer_norm(full.float(), full.shape[-1:])
    if center:
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


def vicreg_penalty(z: torch.Tensor, valid: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """The variance and covariance terms of VICReg on a batch of token features.

    Over the N valid tokens of the batch, with per-feature std s_d and covariance matrix C of the
    D features: variance = mean_d max(0, 1 - s_d) (each feature keeps a spread of at least 1),
    covariance = sum of the squared off-diagonal entries of C / D (features decorrelate). The
    penalty is variance + covariance / 25, VICReg's 25 : 1 ratio of the two terms.

    Args:
        z: (B, N, D) encoder outputs.
        valid: (B, N) bool, the tokens that count.
        eps: added to the variance before the square root.

    Returns:
        A scalar (0 with fewer than 2 valid tokens).
    """
    h = z[valid].float()
    n, d = h.shape
    if n < 2:
        return z.sum() * 0.0
    h = h - h.mean(0)
    std = torch.sqrt(h.var(0) + eps)
    variance = F.relu(1.0 - std).mean()
    cov = (h.T @ h) / (n - 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return variance + off.pow(2).sum() / d / 25.0


def sigreg_penalty(
    z: torch.Tensor, valid: torch.Tensor, generator: torch.Generator | None = None, slices: int = 256, knots: int = 17
) -> torch.Tensor:
    """SIGReg: a sketched test that the token features are an isotropic standard Gaussian.

    The features are projected on ``slices`` random unit directions a. For each projection s_n =
    a'z_n (N valid tokens) the Epps-Pulley statistic compares its empirical characteristic
    function with the standard normal one, exp(-t^2 / 2), weighted by exp(-t^2 / 2):
    N * integral over t in [-3, 3] of |mean_n exp(i t s_n) - exp(-t^2 / 2)|^2 w(t) dt, by the
    trapezoidal rule on ``knots`` points of [0, 3] (the integrand is even). The penalty is the mean
    over directions of the integral (the test statistic is N times it; leaving N out keeps the
    penalty's scale independent of the batch size). It is smallest when every 1-D projection is
    N(0, 1), that is when the features are isotropic Gaussian, so no direction can collapse.

    Args:
        z: (B, N, D) encoder outputs.
        valid: (B, N) bool, the tokens that count.
        generator: the source of the random directions (new directions at every call).
        slices: the number of random directions.
        knots: the quadrature points on [0, 3].

    Returns:
        A scalar (0 with fewer than 2 valid tokens).
    """
    h = z[valid].float()
    n, d = h.shape
    if n < 2:
        return z.sum() * 0.0
    a = torch.randn(d, slices, generator=generator, device="cpu").to(h.device)
    a = a / a.norm(dim=0, keepdim=True)
    s = h @ a  # (N, slices)
    t = torch.linspace(0.0, 3.0, knots, device=h.device)
    ts = s[:, :, None] * t  # (N, slices, knots)
    real, imag = torch.cos(ts).mean(0), torch.sin(ts).mean(0)  # (slices, knots)
    gauss = torch.exp(-0.5 * t**2)
    err = (real - gauss).pow(2) + imag.pow(2)
    integrand = err * gauss
    step = t[1] - t[0]
    integral = 2.0 * step * (integrand.sum(-1) - 0.5 * (integrand[:, 0] + integrand[:, -1]))
    return integral.mean()


def regularizer_penalty(
    name: str, z: torch.Tensor, valid: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The penalty ``name`` (:data:`REGULARIZERS`) of a batch of encoder outputs, in float32.

    Args:
        name: "vicreg" (:func:`vicreg_penalty`) or "sigreg" (:func:`sigreg_penalty`).
        z: (B, N, D) encoder outputs.
        valid: (B, N) bool, the tokens that count.
        generator: SIGReg's source of random directions.

    Returns:
        A scalar.

    Raises:
        ValueError: an unknown name.
    """
    with torch.autocast(z.device.type, enabled=False):
        if name == "vicreg":
            return vicreg_penalty(z, valid)
        if name == "sigreg":
            return sigreg_penalty(z, valid, generator)
    raise ValueError(f"unknown regularizer {name!r}; choose one of {REGULARIZERS[1:]}")
