"""Is the model learning the brain, or the grid? Representation diagnostics.

Computed on one batch of windows with its masks (during training every
``train.diagnose_every`` steps into metrics.jsonl, and by ``brainjepa diagnose`` for any model
and cohort); docs/method.md ("Diagnostics") explains each number and its threshold.

- **Context reliance**: the predictor's loss with each sample's own context, with another
  sample's context (the batch rolled by one: the same token positions, someone else's signal),
  and with an all-zero input, beside the **position-only floor** (each target predicted by the
  mean of the other samples' targets at that position). A predictor that uses its context has
  ``loss_other`` clearly above ``loss_own``; one that solves the task from positions has the
  three equal and close to the floor.
- **Collapse**, for both encoders: feature std over tokens and mean cosine between tokens.
- **Variance shares** of the target encoder's token features over the batch: the share
  explained by token position (the mean over samples at each position) and by the sample (the
  mean over positions of each sample). Tokens that are mostly position carry little about
  the person.
- **Effective rank** of the samples' mean-pooled target features (exp of the entropy of the
  normalised singular-value spectrum; at most B - 1).
- **EMA init share**: prod(m) of the momenta applied so far, the weight the target encoder still
  gives its random initialisation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import CohortSeries
from .errors import DataError
from .fast import step_tokens
from .masking import MaskBatch, SpatiotemporalMasker
from .model import gather
from .objective import block_loss_sum, group_tokens, masked_block_mean, split_targets, token_loss
from .plotting import pyplot, save_figure

# thresholds behind the warnings (docs/method.md, "Diagnostics")
MIN_CONTEXT_GAIN = 0.10  # loss with another sample's context at least 10% above its own
MAX_TOKEN_COSINE = 0.95  # mean cosine between tokens above this: collapsing
MAX_POSITION_SHARE = 0.90  # tokens that are more than 90% position


@torch.no_grad()
def feature_stats(h: torch.Tensor, max_tokens: int = 512) -> dict[str, torch.Tensor]:
    """Collapse monitor on features, e.g. the valid target tokens.

    Args:
        h: (..., D) features; every leading dimension counts as tokens (e.g. (n, D)).
        max_tokens: at most this many tokens, taken evenly, enter the cosine.

    Returns:
        ``std``: the std of each feature over the tokens, averaged over features (0 when every
        token maps to the same vector); ``cos``: the mean cosine similarity between distinct tokens
        (1 when collapsed). Both 0-d tensors.
    """
    flat = h.reshape(-1, h.shape[-1]).float()
    std = flat.std(0).mean() if flat.shape[0] > 1 else flat.new_zeros(())
    sub = F.normalize(flat[:: max(1, flat.shape[0] // max_tokens)][:max_tokens], dim=-1)
    n = sub.shape[0]
    sim = sub @ sub.T
    cos = (sim.sum() - sim.diagonal().sum()) / max(n * (n - 1), 1)
    return {"std": std, "cos": cos}


def variance_shares(h: torch.Tensor) -> dict[str, float]:
    """Shares of the variance of token features explained by the token position and by the sample.

    The position's part is the variance of the per-position means over samples, the sample's the
    variance of the per-sample means over positions, each relative to the total variance over
    (B, N).

    Args:
        h: (B, N, D) token features.

    Returns:
        {"position_share": float, "subject_share": float}.
    """
    h = h.float()
    total = h.reshape(-1, h.shape[-1]).var(0, unbiased=False).sum()
    position = h.mean(0).var(0, unbiased=False).sum()
    sample = h.mean(1).var(0, unbiased=False).sum()
    scale = float(total) if float(total) > 0 else 1.0
    return {"position_share": float(position) / scale, "subject_share": float(sample) / scale}


def effective_rank(X: torch.Tensor) -> float:
    """exp(entropy) of the normalised squared singular values of the centred rows of X.

    Args:
        X: (n, D), e.g. the samples' mean-pooled features.

    Returns:
        The effective rank (at most n - 1; 0 when X has no variance).
    """
    X = X.float() - X.float().mean(0, keepdim=True)
    s2 = torch.linalg.svdvals(X).pow(2)
    if float(s2.sum()) <= 0:
        return 0.0
    p = s2 / s2.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def ema_init_share(momentum_at, step: int) -> float:
    """The weight the target encoder still gives its random initialisation after ``step`` steps.

    Args:
        momentum_at: the EMA momentum of an optimizer step, ``momentum_at(s)``.
        step: the number of optimizer steps done.

    Returns:
        The product of the momenta of steps 0 .. step - 1.
    """
    return math.exp(sum(math.log(max(momentum_at(s), 1e-300)) for s in range(step)))


def _predictor_loss(predictor, z, ctx_idx, ctx_valid, groups, targets, loss, blocks) -> float:
    total = sum(
        float(block_loss_sum(predictor, z, ctx_idx, ctx_valid, idx, valid, t, loss))
        for (idx, valid), t in zip(groups, targets)
    )
    return total / blocks


def _position_floor(full: torch.Tensor, groups, loss: str, blocks: int) -> float:
    """Loss of predicting each target by the mean of the *other* samples' targets at the same
    position (full: B x N x D target features on the whole grid)."""
    B = full.shape[0]
    loo = (full.sum(0, keepdim=True) - full) / max(B - 1, 1)
    total = 0.0
    for idx, valid in groups:
        flat = idx.reshape(B, -1)
        err = token_loss(gather(loo, flat), gather(full, flat), loss).reshape(idx.shape)
        total += float(masked_block_mean(err, valid).sum())
    return total / blocks


@torch.no_grad()
def diagnose_batch(
    encoder: nn.Module,
    target_encoder: nn.Module,
    predictor: nn.Module,
    x: torch.Tensor,
    masks: MaskBatch,
    *,
    loss: str = "smooth_l1",
    center: bool = True,
    autocast=None,
) -> dict[str, float]:
    """Every diagnostic of the module notes on one batch with its masks.

    The modules are put in eval mode for the check and restored.

    Args:
        encoder: the context encoder (for a bundle, its one encoder serves as both).
        target_encoder: the target encoder.
        predictor: the predictor.
        x: (B, R, T) input, B >= 2.
        masks: the batch's masks.
        loss: "smooth_l1" or "l2".
        center: centre the targets per position, as in training.
        autocast: a context manager for the forward passes (e.g. bf16 autocast); None: none.

    Returns:
        A flat dict of floats: loss_own, loss_other, loss_zero, loss_position, context_gain,
        target_std, target_cos, context_std, context_cos, position_share, subject_share,
        effective_rank.
    """
    autocast = autocast or torch.autocast("cpu", enabled=False)
    device = next(encoder.parameters()).device
    x = x.to(device)
    modes = [(m, m.training) for m in (encoder, target_encoder, predictor)]
    for m, _ in modes:
        m.eval()
    try:
        padded = step_tokens(masks, device)  # as the training step pads them
        ctx_idx, ctx_valid, groups, blocks = padded.context_idx, padded.context_valid, padded.groups, padded.blocks
        with autocast:
            raw = target_encoder(x)  # the whole grid: B x N x D
        raw = F.layer_norm(raw.float(), raw.shape[-1:])
        full = raw - raw.mean(0, keepdim=True) if center else raw  # the training targets
        tokens, valid = group_tokens(groups)
        targets = split_targets(gather(full, tokens), groups)
        out: dict[str, float] = {}
        for name, inp in (("own", x), ("other", x.roll(1, 0)), ("zero", torch.zeros_like(x))):
            with autocast:
                z = encoder(inp, ctx_idx, ctx_valid)
                out[f"loss_{name}"] = _predictor_loss(predictor, z, ctx_idx, ctx_valid, groups, targets, loss, blocks)
            if name == "own":
                valid_z = z[ctx_valid]
        out["loss_position"] = _position_floor(full, groups, loss, blocks)
        out["context_gain"] = out["loss_other"] / max(out["loss_own"], 1e-12) - 1.0
        # collapse statistics on the un-centred features at the valid target tokens
        valid_h = gather(raw, tokens)[valid]
        for prefix, feats in (("target", valid_h), ("context", valid_z)):
            stats = feature_stats(feats)
            out[f"{prefix}_std"], out[f"{prefix}_cos"] = float(stats["std"]), float(stats["cos"])
        out.update(variance_shares(raw))
        out["effective_rank"] = effective_rank(raw.mean(1))
        return out
    finally:
        for m, mode in modes:
            m.train(mode)


def problems(diag: dict[str, float], collapse_std: float = 0.1) -> list[str]:
    """Plain-language warnings for a :func:`diagnose_batch` result.

    Args:
        diag: the diagnostics (or their means over batches).
        collapse_std: a feature std below this counts as collapsing.

    Returns:
        The messages; empty when healthy.
    """
    out = []
    if diag["context_gain"] < MIN_CONTEXT_GAIN:
        out.append(
            f"the predictor barely uses its context: its loss with another sample's context "
            f"is only {100 * diag['context_gain']:+.1f}% from its own ({diag['loss_other']:.4f} "
            f"vs {diag['loss_own']:.4f}; position-only floor {diag['loss_position']:.4f}): its "
            "predictions hardly depend on whose brain it sees, so the encoder gets little "
            "signal about the subject (see docs/method.md, Diagnostics)"
        )
    for name in ("target", "context"):
        if diag[f"{name}_cos"] > MAX_TOKEN_COSINE or diag[f"{name}_std"] < collapse_std:
            out.append(
                f"the {name} encoder's tokens are collapsing (mean cosine "
                f"{diag[f'{name}_cos']:.3f}, feature std {diag[f'{name}_std']:.4f})"
            )
    if diag["position_share"] > MAX_POSITION_SHARE:
        out.append(
            f"{100 * diag['position_share']:.1f}% of the target features' variance is token "
            f"position ({100 * diag['subject_share']:.1f}% is the subject): the tokens "
            "carry little signal"
        )
    return out


def diagnose_model(
    model, cohort, *, batch_size: int = 16, n_batches: int = 4, seed: int = 0, progress: bool = False
) -> dict:
    """:func:`diagnose_batch` for a model bundle (with its predictor) on a cohort.

    Each subject's centre window (``model.prepare``, each scan's own TR) is used; batches of
    ``batch_size`` subjects (the first ``n_batches * batch_size`` of a seeded permutation) get
    masks drawn as in the model's training run (its recorded mask settings, else the defaults),
    and the loss and target centring it was trained with. The bundle's encoder (the EMA target
    encoder) plays both encoders.

    Args:
        model: the bundle (:class:`~brainjepa.bundle.BrainJEPA`), with its predictor.
        cohort: the cohort.
        batch_size: subjects per batch (at most the cohort's size).
        n_batches: batches to average over (fewer when the cohort runs out).
        seed: seed of the permutation and the masks.
        progress: print a line per batch.

    Returns:
        {"mean": {name: value}, "batches": [...], "problems": [message, ...], "settings": {...}}.

    Raises:
        DataError: the bundle has no predictor, or the cohort has fewer than 2 subjects.
    """

    if model.predictor is None:
        raise DataError(
            "this model bundle has no predictor weights, which the context-reliance "
            "check needs; export the run again with its predictor (brainjepa export)"
        )
    training = model.provenance.get("training_config") or {}
    train_cfg = training.get("train") or {}
    loss = model.info.get("loss") or train_cfg.get("loss") or "smooth_l1"
    center = bool(train_cfg.get("center_targets", False))
    masker = SpatiotemporalMasker(model.config.n_rois, model.config.n_patches, **(training.get("mask") or {}))
    series = CohortSeries(cohort)
    if len(series) < 2:
        raise DataError("diagnostics need at least 2 subjects (a sample's context is swapped with another's)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(series))
    size = min(batch_size, len(series))
    trs = series.trs()
    batches = []
    for b in range(n_batches):
        chosen = order[b * size : (b + 1) * size]
        if len(chosen) < 2:
            break
        x = torch.stack([model.prepare(series[int(i)], tr=trs[int(i)]) for i in chosen])
        batches.append(
            diagnose_batch(
                model.encoder, model.encoder, model.predictor, x, masker(len(chosen), rng), loss=loss, center=center
            )
        )
        if progress:
            print(f"diagnostics: batch {b + 1}/{n_batches}", flush=True)
    mean = {k: float(np.mean([d[k] for d in batches])) for k in batches[0]}
    return {
        "mean": mean,
        "batches": batches,
        "problems": problems(mean),
        "settings": {
            "loss": loss,
            "center_targets": center,
            "batch_size": size,
            "n_batches": len(batches),
            "seed": seed,
            "mask": masker.describe(),
        },
    }


def format_diagnostics(result: dict) -> str:
    """A plain-text table of :func:`diagnose_model`'s means and its verdicts.

    Args:
        result: what :func:`diagnose_model` returned.

    Returns:
        The table, then one line per problem (or a healthy verdict).
    """
    m = result["mean"]
    rows = [
        ("predictor loss, own context", m["loss_own"]),
        ("predictor loss, another sample's context", m["loss_other"]),
        ("predictor loss, all-zero input", m["loss_zero"]),
        ("position-only floor", m["loss_position"]),
        ("context gain (other / own - 1)", m["context_gain"]),
        ("target encoder: feature std / token cosine", f"{m['target_std']:.4f} / {m['target_cos']:.3f}"),
        ("context encoder: feature std / token cosine", f"{m['context_std']:.4f} / {m['context_cos']:.3f}"),
        ("variance share: position / subject", f"{m['position_share']:.3f} / {m['subject_share']:.3f}"),
        ("effective rank of subject embeddings", m["effective_rank"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [
        f"{name:<{width}}  {value:.4f}" if isinstance(value, float) else f"{name:<{width}}  {value}"
        for name, value in rows
    ]
    verdict = result["problems"] or ["healthy: the predictor uses its context and neither encoder collapses"]
    return "\n".join(lines + [""] + [f"- {p}" for p in verdict]) + "\n"


# the predictor losses of a diagnosis, with their labels and colours in plots
DIAGNOSTIC_LOSSES = (
    ("loss_own", "own context", "#1f77b4"),
    ("loss_other", "another sample's context", "#d62728"),
    ("loss_zero", "all-zero input", "#9e9e9e"),
    ("loss_position", "position-only floor", "#2ca02c"),
)


def plot_diagnostics(result: dict, path: str | Path) -> Path:
    """Bars of :func:`diagnose_model`'s predictor losses and the variance shares of the target features.

    Args:
        result: what :func:`diagnose_model` returned.
        path: the image file to write.

    Returns:
        The written file.
    """
    m = result["mean"]
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8, 3.2), gridspec_kw={"width_ratios": [2, 1]})
    ax.bar(range(4), [m[k] for k, _, _ in DIAGNOSTIC_LOSSES], color=[c for _, _, c in DIAGNOSTIC_LOSSES])
    ax.set_xticks(range(4), [label for _, label, _ in DIAGNOSTIC_LOSSES], rotation=15, fontsize=8)
    ax.set_ylabel("predictor loss")
    ax.set_title(f"context reliance (gain {100 * m['context_gain']:+.1f}%)")
    ax2.bar([0, 1], [m["position_share"], m["subject_share"]], color=["#8c564b", "#1f77b4"])
    ax2.set_xticks([0, 1], ["position", "subject"])
    ax2.set_ylim(0, 1)
    ax2.set_title("target variance share")
    return save_figure(fig, path)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a module.

    Args:
        module: the module.

    Returns:
        The count of parameter elements (trainable or not).
    """
    return sum(p.numel() for p in module.parameters())
