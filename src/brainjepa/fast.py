"""Exact shortcuts for training: the same numbers as :mod:`brainjepa.model`, for less work.

:class:`FastEncoder` and :class:`FastPredictor` subclass the reference networks (same
parameters, same state dict) and override only ``forward``; every shortcut is tested equal to
the reference (tests/test_model.py). The training step builds these classes; everything else
uses the reference ones.

- **Query pruning** (``output_idx``, the predictor's last block): when only some outputs are
  used (the target tokens of an un-centred target encoder, the mask tokens of the predictor),
  the last block computes queries, attention and MLP for those tokens only.
- **Recomputed GELU** (:class:`GeluLinear`): the MLP keeps only its hidden pre-activation for
  the backward pass and recomputes the GELU, a fifth less activation memory per block.
- **Padding last**: the predictor reorders each row's tokens so that padding comes last
  (attention does not depend on token order); the CPU attention kernel then simply uses fewer
  keys instead of an additive mask.
- **Shared context** (:meth:`FastPredictor.context_state`): the predictor's passes for several
  target blocks from one context share the first block's context-only part. The context
  queries' attention over the context keys is computed once with its log-sum-exp and merged
  per pass with their attention over that pass's target keys
  (:func:`brainjepa.attention.merge_attention`), which is exactly the attention over both.

The training step reaches these through two helpers, so that it shows only the method's stages:
:func:`step_tokens` (a micro-batch's token lists on the device, padded to :data:`PAD_MULTIPLE`)
and :class:`SplitContext` (the encoder output as the predictor's passes see it: a detached copy
that collects their gradients, and the shared context state where it is used).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .attention import attention, cat_valid, merge_attention, padding_mask
from .fused import linear
from .masking import MaskBatch
from .model import MLP, Attention, Block, BrainEncoder, BrainPredictor, add_residual, gather
from .objective import block_groups, context_tokens, n_blocks

# Padded token lists are rounded up to a multiple of this (extra entries invalid). Sequence
# lengths then come from a small set, and so do the matmul shapes: oneDNN (bf16 on CPU) compiles
# and caches a kernel per shape, and with a new length every step that cache alone grew the
# process by ~80 MB per step up to ~600 MB. The padding adds ~1% of the tokens.
PAD_MULTIPLE = 64


class GeluLinear(torch.autograd.Function):
    """linear(gelu(h), weight, bias), keeping only h for the backward pass.

    Autograd would keep both h and gelu(h) (4 x width per token each); gelu is cheap to
    recompute, so this saves a fifth of a block's activation memory for ~1% more time. Works
    under autocast: the matmuls run in h's dtype, the weight gradients come back in fp32.
    """

    @staticmethod
    def forward(ctx, h, weight, bias):
        """Compute linear(gelu(h)), saving only h, weight and bias.

        Args:
            ctx: the autograd context.
            h: (..., hidden) pre-activation.
            weight: (out, hidden) linear weight (cast to h's dtype for the matmul).
            bias: (out,) linear bias.

        Returns:
            (..., out) in h's dtype.
        """
        ctx.save_for_backward(h, weight, bias)
        return F.linear(F.gelu(h), weight.to(h.dtype), bias.to(h.dtype))

    @staticmethod
    def backward(ctx, dy):
        """Recompute gelu(h) and return the gradients of h, weight and bias.

        Args:
            ctx: the autograd context holding h, weight and bias.
            dy: (..., out) gradient of the output.

        Returns:
            The gradients of h (h's dtype), weight and bias (their own dtypes, e.g. fp32 under autocast).
        """
        h, weight, bias = ctx.saved_tensors
        dy = dy.to(h.dtype)
        with torch.enable_grad():
            h_ = h.detach().requires_grad_()
            a = F.gelu(h_)
        (dh,) = torch.autograd.grad(a, h_, dy @ weight.to(h.dtype))
        dy2, a2 = dy.reshape(-1, dy.shape[-1]), a.detach().reshape(-1, a.shape[-1])
        return dh, (dy2.t() @ a2).to(weight.dtype), dy2.sum(0).to(bias.dtype)


def mlp(module: MLP, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, recomputing the GELU in the backward pass when gradients are needed.

    Args:
        module: the block's MLP.
        x: (..., C) input.

    Returns:
        (..., C), the same numbers as ``module(x)``.
    """
    if not torch.is_grad_enabled():  # the target encoder: the reference MLP (GELU in place)
        return module(x)
    h = module.fc1(x)
    if h.requires_grad:
        return GeluLinear.apply(h, module.fc2.weight, module.fc2.bias)
    return module.fc2(F.gelu(h))


def project(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries, keys and values of an attention layer.

    Args:
        attn: the attention layer (its qkv projection and head count H).
        x: (B, N, C) normed tokens.

    Returns:
        Queries, keys, values, each (B, H, N, C / H).
    """
    B, N, C = x.shape
    qkv = linear(x, attn.qkv.weight, attn.qkv.bias)
    return qkv.view(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)


def merge_heads(attn: Attention, out: torch.Tensor) -> torch.Tensor:
    """Merge the heads and apply the output projection.

    Args:
        attn: the attention layer (its output projection).
        out: (B, H, N, d) per-head attention outputs.

    Returns:
        (B, N, H*d).
    """
    B, H, N, d = out.shape
    return linear(out.transpose(1, 2).reshape(B, N, H * d), attn.proj.weight, attn.proj.bias)


def block(blk: Block, x: torch.Tensor, key_mask: torch.Tensor | None, query_idx: torch.Tensor | None = None):
    """``blk(x, key_mask)``, or only its outputs at some queries (query pruning).

    Args:
        blk: the transformer block.
        x: (B, N, C) tokens.
        key_mask: (B, N) bool validity of the keys, or None.
        query_idx: (B, M) the positions whose outputs are wanted; None: all.

    Returns:
        (B, N, C), or (B, M, C) with ``query_idx``: the same numbers as those rows of
        ``blk(x, key_mask)``.
    """
    a = blk.norm1(x)
    if query_idx is None:
        q, k, v = project(blk.attn, a)
        residual = x
    else:
        B, N, C = a.shape
        H = blk.attn.num_heads
        w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
        q = linear(gather(a, query_idx), w[:C], None if b is None else b[:C]).view(B, -1, H, C // H).transpose(1, 2)
        k, v = linear(a, w[C:], None if b is None else b[C:]).view(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4)
        residual = gather(x, query_idx)
    out = attention(q, k, v, key_mask, self_attention=query_idx is None)
    x = residual + blk.drop_path(merge_heads(blk.attn, out))
    return add_residual(x, blk.drop_path(mlp(blk.mlp, blk.norm2(x))))


def valid_first(valid: torch.Tensor) -> torch.Tensor:
    """The order that puts each row's valid tokens first, in their order (a stable sort), and its padding last.

    Args:
        valid: (B, N) bool validity.

    Returns:
        (B, N) indices.
    """
    return torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)


class FastEncoder(BrainEncoder):
    """:class:`~brainjepa.model.BrainEncoder` with query pruning and recomputed GELU."""

    def forward(self, x, token_idx=None, token_valid=None, output_idx: torch.Tensor | None = None):
        """As :meth:`BrainEncoder.forward`, optionally computing only some outputs in the last block.

        Args:
            x: the input windows, (B, R, T).
            token_idx: which tokens to encode, (B, N); None: all R*P.
            token_valid: (B, N) bool, False for padding entries of a ragged ``token_idx``.
            output_idx: (B, M) positions in the encoded sequence whose outputs are wanted; the last
                block then works on those queries alone. None: all.

        Returns:
            (B, N, D) features after the final LayerNorm, or (B, M, D) with ``output_idx``.
        """
        h = self.tokens(x)
        if token_idx is not None:
            h = gather(h, token_idx)
        key_mask = padding_mask(token_valid)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            h = block(blk, h, key_mask, output_idx if i == last else None)
        return self.norm(h)


@dataclass
class ContextState:
    """The context tokens' part of the predictor's first block, which does not depend on the target tokens.

    Args:
        x: (B, Nc, C) the embedded context tokens.
        q: (B, H, Nc, d) their queries.
        k: (B, H, Nc, d) their keys.
        v: (B, H, Nc, d) their values.
        out: (B, H, Nc, d) the context queries' attention over the context keys.
        lse: (B, H, Nc) the log-sum-exp of that attention.
    """

    x: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        """The fields in order.

        Returns:
            [x, q, k, v, out, lse].
        """
        return [getattr(self, f.name) for f in fields(self)]

    def detached(self) -> ContextState:
        """Leaf copies that collect the gradients of several passes (see :meth:`backward`).

        Returns:
            A state of detached tensors that require gradients.
        """
        return ContextState(*(t.detach().requires_grad_() for t in self.tensors()))

    def repeat_interleave(self, k: int) -> ContextState:
        """Every tensor repeated ``k`` times along the batch (one copy per target block).

        Args:
            k: repeats per sample.

        Returns:
            A state with batch B * k.
        """
        return ContextState(*(t.repeat_interleave(k, 0) for t in self.tensors()))

    def backward(self, leaves: ContextState) -> None:
        """Backpropagate the gradients accumulated on ``leaves`` into this state's graph.

        Args:
            leaves: the state from :meth:`detached` after the passes' backward calls.
        """
        pairs = [(t, leaf.grad) for t, leaf in zip(self.tensors(), leaves.tensors()) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward(*zip(*pairs))


def block_with_context(
    blk: Block,
    context: ContextState,
    t: torch.Tensor,
    context_valid: torch.Tensor | None,
    target_valid: torch.Tensor | None,
    context_outputs: bool = True,
) -> torch.Tensor:
    """``blk`` on the tokens [context; t] given the context's own part.

    The same numbers as :func:`block` on the concatenation.

    Args:
        blk: the predictor's first block.
        context: the context's part of that block (:meth:`FastPredictor.context_state`).
        t: (B, Nt, C) the target (mask) tokens.
        context_valid: (B, Nc) bool validity of the context tokens, or None.
        target_valid: (B, Nt) bool validity of the t tokens, or None.
        context_outputs: also compute the context tokens' outputs (needed when more blocks follow).

    Returns:
        (B, Nc + Nt, C), or (B, Nt, C) (the t tokens only) without ``context_outputs``.
    """
    qt, kt, vt = project(blk.attn, blk.norm1(t))
    k, v = torch.cat([context.k, kt], 2), torch.cat([context.v, vt], 2)
    key_mask = cat_valid(context_valid, target_valid, context.k.shape[2], t.shape[1])
    if key_mask is not None:  # padding keys last (their order does not matter)
        order = valid_first(key_mask)
        key_mask = torch.gather(key_mask, 1, order)
        order = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        k, v = torch.gather(k, 2, order), torch.gather(v, 2, order)
    out = attention(qt, k, v, key_mask)
    residual = t
    if context_outputs:
        # the context queries over the t keys, merged with their attention over the context
        out_ct, lse_ct = attention(context.q, kt, vt, target_valid, return_lse=True)
        out_c = merge_attention(context.out, context.lse, out_ct, lse_ct)
        out, residual = torch.cat([out_c, out], 2), torch.cat([context.x, t], 1)
    x = residual + blk.drop_path(merge_heads(blk.attn, out))
    return add_residual(x, blk.drop_path(mlp(blk.mlp, blk.norm2(x))))


class FastPredictor(BrainPredictor):
    """:class:`~brainjepa.model.BrainPredictor` with padding last, query pruning, recomputed
    GELU and the shared context state."""

    def context_state(self, context, context_idx, context_valid=None) -> ContextState:
        """The first block's work on the context alone, the same for every set of target tokens.

        That is the embedding, the projections, and the context queries' attention over the context
        keys with its log-sum-exp; pass it as ``forward(..., shared=state)``.

        Args:
            context: context features from the encoder, (B, Nc, D).
            context_idx: their token positions, (B, Nc).
            context_valid: (B, Nc) bool validity of ragged context entries, or None.

        Returns:
            The context state.
        """
        pos = self.pos_embed(self.gradients)
        x = self.embed(context) + gather(pos, context_idx)
        first = self.blocks[0]
        q, k, v = project(first.attn, first.norm1(x))
        out, lse = attention(q, k, v, padding_mask(context_valid), self_attention=True, return_lse=True)
        return ContextState(x, q, k, v, out, lse)

    def forward(self, context, context_idx, target_idx, context_valid=None, target_valid=None, shared=None):
        """As :meth:`BrainPredictor.forward`, optionally from a shared context state.

        Args:
            context: context features from the encoder, (B, Nc, D); not used with ``shared``.
            context_idx: their token positions, (B, Nc).
            target_idx: the token positions to predict, (B, Nt).
            context_valid: (B, Nc) bool validity of ragged context entries, or None.
            target_valid: (B, Nt) bool validity of ragged target entries, or None.
            shared: the context's part of the first block from :meth:`context_state`, or None.

        Returns:
            (B, Nt, D) predictions.
        """
        B, Nc = context_idx.shape
        blocks = list(self.blocks)
        if shared is None:
            h = torch.cat(self.inputs(context, context_idx, target_idx), dim=1)
        else:
            tgt = self.mask_token + gather(self.pos_embed(self.gradients), target_idx)
            h = block_with_context(
                blocks.pop(0), shared, tgt, context_valid, target_valid, context_outputs=bool(blocks)
            )
            if not blocks:  # a one-block predictor: h holds the target tokens only
                return self.proj(self.norm(h))
        # only the mask tokens' outputs are used: the last block computes just those queries
        queries = torch.arange(Nc, h.shape[1], device=h.device).expand(B, -1)
        key_mask = cat_valid(context_valid, target_valid, Nc, target_idx.shape[1])
        if key_mask is not None:  # padding last: the CPU kernel then just uses fewer keys
            order = valid_first(key_mask)
            h, key_mask = gather(h, order), torch.gather(key_mask, 1, order)
            queries = torch.argsort(order, dim=1)[:, Nc:]
        last = len(blocks) - 1
        for i, blk in enumerate(blocks):
            h = block(blk, h, key_mask, queries if i == last else None)
        return self.proj(self.norm(h))


@dataclass
class StepTokens:
    """One micro-batch's token lists, padded to :data:`PAD_MULTIPLE`, on the training device.

    Args:
        context_idx: (B, Nc) the context tokens.
        context_valid: (B, Nc) their validity.
        groups: [(idx (B, K, w), valid (B, K, w))], the target blocks of each region
            (:func:`brainjepa.objective.block_groups`).
        blocks: the target blocks with at least one valid token (the loss's denominator).
    """

    context_idx: torch.Tensor
    context_valid: torch.Tensor
    groups: list[tuple[torch.Tensor, torch.Tensor]]
    blocks: int


def step_tokens(masks: MaskBatch, device: torch.device) -> StepTokens:
    """The token lists of a micro-batch as the training step and the diagnostics use them.

    Args:
        masks: the micro-batch's masks.
        device: where the networks live.

    Returns:
        The padded token lists on ``device``.
    """
    ctx_idx, ctx_valid = (t.to(device, non_blocking=True) for t in context_tokens(masks, PAD_MULTIPLE))
    groups = [
        (idx.to(device, non_blocking=True), valid.to(device, non_blocking=True))
        for idx, valid in block_groups(masks, PAD_MULTIPLE)
    ]
    return StepTokens(ctx_idx, ctx_valid, groups, n_blocks(masks))


class SplitContext:
    """The encoder's context features as the predictor's passes see them.

    ``z`` is a detached copy of the encoder output that collects the gradients of every pass, so
    each pass can be backpropagated as soon as its loss is known (only one pass's activations
    alive at a time) and the encoder is backpropagated once (:meth:`backward`). With ``share``,
    the predictor's first-block context part is computed once here (:meth:`FastPredictor.context_state`)
    and ``shared`` is the copy every pass reads and backpropagates into; call under the passes'
    autocast.

    Args:
        predictor: the predictor (its :meth:`~FastPredictor.context_state`).
        z: (B, Nc, D) the encoder output, part of the encoder's graph.
        context_idx: (B, Nc) its token positions.
        context_valid: (B, Nc) their validity.
        share: compute the shared context state.
    """

    def __init__(
        self,
        predictor: FastPredictor,
        z: torch.Tensor,
        context_idx: torch.Tensor,
        context_valid: torch.Tensor,
        share: bool,
    ):
        self.z = z.detach().requires_grad_()
        self._state: ContextState | None = None
        self.shared: ContextState | None = None
        if share:
            self._state = predictor.context_state(self.z, context_idx, context_valid)
            self.shared = self._state.detached()  # collects the gradients of every pass

    def backward(self, z: torch.Tensor, penalty: torch.Tensor | None = None) -> None:
        """Backpropagate the passes' gradients through the shared state (into ``self.z`` and the
        predictor's first block), then from ``self.z`` through the encoder.

        Args:
            z: the encoder output this split was made from.
            penalty: a scalar computed from ``z`` (a regulariser of the encoder's outputs) whose
                gradient joins the passes' in the same backward pass through the encoder.
        """
        if self._state is not None:
            self._state.backward(self.shared)
        if penalty is None:
            z.backward(self.z.grad)
        else:
            torch.autograd.backward([z, penalty], [self.z.grad, None])
