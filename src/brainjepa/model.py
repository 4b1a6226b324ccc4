"""The Brain-JEPA networks: patch embedding, gradient positioning, ViT encoder and predictor.

Tokens are (ROI r, time patch t) pairs on an R x P grid, P = T // patch_size, numbered ROI-major
(token = r * P + t). The positional embedding of a token is ``[temporal | spatial]``, each half
d/2 wide: a fixed 1-D sine-cosine code of the patch index t, and a learnable linear map of the
ROI's brain-gradient row (R x m gradients, see :mod:`brainjepa.gradients`).

Attention goes through :func:`brainjepa.attention.attention`: PyTorch's SDPA (flash /
memory-efficient kernels on GPUs, the fused kernel on CPUs in fp32) or, for bf16 on CPUs, a
query-chunked kernel that runs on the bf16 matmul units. Ragged batches carry a boolean validity
mask that becomes a key-padding mask.

When only some outputs are needed (the target tokens of the EMA target encoder, the mask tokens
of the predictor), the last block computes queries, attention and MLP for those tokens only
(``output_idx``): the same numbers as the full pass followed by a gather, for a fraction of the
last block's work.

The predictor's passes for several target sets from one context share the first block's
context-only part (:meth:`BrainPredictor.context_state`): the context queries' attention over
the context keys is computed once, with its log-sum-exp, and merged per pass with their
attention over that pass's target keys, which is exactly the attention over both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, merge_attention
from .errors import ConfigError, DataError

# Architecture presets. Encoder sizes follow ViT-S/B/L; predictor widths and depths follow the
# paper (384 for B and L, 192 for S; depth 6, 12 for L). "tiny" is for CPU tests and demos.
MODEL_SIZES: dict[str, dict] = {
    "tiny": dict(embed_dim=192, depth=4, num_heads=3, predictor_embed_dim=96, predictor_depth=2, predictor_num_heads=3),
    "small": dict(
        embed_dim=384, depth=12, num_heads=6, predictor_embed_dim=192, predictor_depth=6, predictor_num_heads=6
    ),
    "base": dict(
        embed_dim=768, depth=12, num_heads=12, predictor_embed_dim=384, predictor_depth=6, predictor_num_heads=12
    ),
    "large": dict(
        embed_dim=1024, depth=24, num_heads=16, predictor_embed_dim=384, predictor_depth=12, predictor_num_heads=16
    ),
}


POS_EMBEDS = ("gradient", "sincos", "learned")


@dataclass
class ModelConfig:
    """Architecture of a Brain-JEPA model (everything needed to rebuild it from JSON)."""

    n_rois: int = 450
    n_timepoints: int = 160
    patch_size: int = 16
    n_gradients: int = 30
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    predictor_embed_dim: int = 384
    predictor_depth: int = 6
    predictor_num_heads: int = 12
    # The authors rescale the spatial (gradient) half of the positional embedding to [-1, 1]
    # over all tokens at every forward; kept switchable for checkpoint compatibility.
    pos_minmax: bool = True
    # spatial half of the positions: "gradient" (Linear of the ROI's brain gradients, the
    # method), "sincos" (fixed sine-cosine of the ROI index) or "learned" (a free table R x d/2);
    # the last two are the paper's ablations
    pos_embed: str = "gradient"
    # LayerNorm on the embedded patches before the positions are added, so a token's content is
    # on the scale of its position from the first step (see docs/method.md, "Recipe")
    patch_norm: bool = False
    drop_path: float = 0.0
    layernorm_eps: float = 1e-6

    def __post_init__(self):
        if self.pos_embed not in POS_EMBEDS:
            raise ConfigError(f"model.pos_embed={self.pos_embed!r}: choose one of {POS_EMBEDS}")
        if self.depth < 1 or self.predictor_depth < 1:
            raise ConfigError(
                f"model.depth ({self.depth}) and model.predictor_depth ({self.predictor_depth}) must be at least 1"
            )
        if self.n_timepoints % self.patch_size:
            raise ConfigError(
                f"model.n_timepoints={self.n_timepoints} is not a multiple of "
                f"model.patch_size={self.patch_size}: choose a window length that is "
                f"(e.g. {self.n_timepoints // self.patch_size * self.patch_size})"
            )
        for name, width, heads in [
            ("embed_dim", self.embed_dim, self.num_heads),
            ("predictor_embed_dim", self.predictor_embed_dim, self.predictor_num_heads),
        ]:
            if width % heads or width % 4:
                raise ConfigError(
                    f"model.{name}={width} must be divisible by its number of "
                    f"heads ({heads}) and by 4 (sine-cosine positions)"
                )

    @property
    def n_patches(self) -> int:
        return self.n_timepoints // self.patch_size

    @property
    def n_tokens(self) -> int:
        return self.n_rois * self.n_patches

    @classmethod
    def from_size(cls, size: str, **overrides) -> ModelConfig:
        if size not in MODEL_SIZES:
            raise ConfigError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
        return cls(**{**MODEL_SIZES[size], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def sincos_1d(n_positions: int, dim: int) -> torch.Tensor:
    """Fixed sine-cosine code, (n_positions, dim): [sin(p * w_i) | cos(p * w_i)], w_i = 1e4^(-i/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


class GradientPositions(nn.Module):
    """Positional embedding (R*P, dim) = [sine-cosine(t) | spatial(r)], token r*P + t.

    spatial(r): ``Linear(gradients[r])`` ("gradient"), the sine-cosine code of the ROI index
    ("sincos") or a learned row per ROI ("learned"). With ``minmax`` a learned spatial table is
    rescaled to [-1, 1] over all ROIs at every forward, as in the authors' code.
    """

    def __init__(
        self,
        n_gradients: int,
        n_patches: int,
        dim: int,
        minmax: bool,
        kind: str = "gradient",
        n_rois: int | None = None,
    ):
        super().__init__()
        self.n_patches, self.minmax, self.kind = n_patches, minmax, kind
        if kind == "gradient":
            self.proj = nn.Linear(n_gradients, dim // 2)
        elif kind == "learned":
            self.table = nn.Parameter(torch.zeros(n_rois, dim // 2))
            nn.init.trunc_normal_(self.table, std=0.02)
        else:
            self.register_buffer("table", sincos_1d(n_rois, dim // 2), persistent=False)
        self.register_buffer("temporal", sincos_1d(n_patches, dim // 2), persistent=False)

    def forward(self, gradients: torch.Tensor) -> torch.Tensor:
        spatial = self.proj(gradients) if self.kind == "gradient" else self.table  # (R, d/2)
        if self.minmax and self.kind != "sincos":  # over the whole table, as in the authors' code
            lo, hi = spatial.min(), spatial.max()
            spatial = 2 * (spatial - lo) / (hi - lo).clamp_min(1e-12) - 1
        n_rois = spatial.shape[0]
        spatial = spatial.repeat_interleave(self.n_patches, dim=0)  # (R*P, d/2), ROI-major
        temporal = self.temporal.repeat(n_rois, 1)  # (R*P, d/2)
        return torch.cat([temporal, spatial], dim=1)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples with probability p (training)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, C) -> queries, keys, values, each (B, H, N, C / H)."""
        B, N, C = x.shape
        return self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head outputs (B, H, N, d) -> the output projection of the merged heads (B, N, H*d)."""
        B, H, N, d = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, N, H * d))

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        attention_sink: list | None = None,
        query_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, N, C); key_mask: (B, N) bool, True = a real token others may attend to.
        Returns (B, N, C), or (B, M, C) for the queries ``query_idx`` (B, M) only."""
        B, N, C = x.shape
        H = self.num_heads
        if query_idx is None:
            q, k, v = self.project(x)
        else:
            if attention_sink is not None:
                raise ValueError("attention_sink needs every query; do not pass query_idx with it")
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(_gather(x, query_idx), w[:C], None if b is None else b[:C])
            q = q.view(B, -1, H, C // H).transpose(1, 2)
            kv = F.linear(x, w[C:], None if b is None else b[C:])
            k, v = kv.view(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        if attention_sink is not None:
            # explicit weights, only for interpretation: attention each key receives, mean over
            # heads and (valid) queries -> (B, N)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            if key_mask is None:
                received = weights.mean(dim=(1, 2))
            else:
                qm = key_mask[:, None, :, None].to(weights.dtype)
                received = (weights * qm).sum(dim=(1, 2)) / (qm.sum(dim=(1, 2)) * self.num_heads)
            attention_sink.append(received.float())
            out = weights @ v
        else:
            out = attention(q, k, v, key_mask, self_attention=query_idx is None)
        return self.merge(out)


class _GeluLinear(torch.autograd.Function):
    """linear(gelu(h), weight, bias), keeping only h for the backward pass.

    Autograd would keep both h and gelu(h) (4 x width per token each); gelu is cheap to
    recompute, so this saves a fifth of a block's activation memory for ~1% more time. Works
    under autocast: the matmuls run in h's dtype, the weight gradients come back in fp32.
    """

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight, bias)
        return F.linear(F.gelu(h), weight.to(h.dtype), bias.to(h.dtype))

    @staticmethod
    def backward(ctx, dy):
        h, weight, bias = ctx.saved_tensors
        dy = dy.to(h.dtype)
        with torch.enable_grad():
            h_ = h.detach().requires_grad_()
            a = F.gelu(h_)
        (dh,) = torch.autograd.grad(a, h_, dy @ weight.to(h.dtype))
        dy2, a2 = dy.reshape(-1, dy.shape[-1]), a.detach().reshape(-1, a.shape[-1])
        return dh, (dy2.t() @ a2).to(weight.dtype), dy2.sum(0).to(bias.dtype)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if torch.is_grad_enabled() and h.requires_grad:
            return _GeluLinear.apply(h, self.fc2.weight, self.fc2.bias)
        return self.fc2(F.gelu(h))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, key_mask=None, attention_sink=None, query_idx=None):
        """x (B, N, C) -> (B, N, C), or (B, M, C) for the tokens ``query_idx`` (B, M) only."""
        residual = x if query_idx is None else _gather(x, query_idx)
        x = residual + self.drop_path(self.attn(self.norm1(x), key_mask, attention_sink, query_idx))
        return self._mlp_residual(x)

    def _mlp_residual(self, x):
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_with_context(
        self,
        context: ContextState,
        t: torch.Tensor,
        context_valid: torch.Tensor | None,
        target_valid: torch.Tensor | None,
        context_outputs: bool = True,
    ) -> torch.Tensor:
        """The block on the tokens [context; t] given the context's own part (``context``, from
        :meth:`BrainPredictor.context_state`): the same numbers as :meth:`forward` on the
        concatenation. t: (B, Nt, C); validity masks (B, Nc) / (B, Nt) or None. Returns
        (B, Nc + Nt, C), or (B, Nt, C) (the t tokens only) without ``context_outputs``.
        """
        qt, kt, vt = self.attn.project(self.norm1(t))
        k, v = torch.cat([context.k, kt], 2), torch.cat([context.v, vt], 2)
        key_mask = _cat_valid(context_valid, target_valid, context.k.shape[2], t.shape[1])
        if key_mask is not None:  # padding keys last (their order does not matter)
            order = _valid_first(key_mask)
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
        return self._mlp_residual(residual + self.drop_path(self.attn.merge(out)))


@dataclass
class ContextState:
    """The context tokens' part of the predictor's first block, which does not depend on the
    target tokens: computed once per batch and shared by the passes for each target region
    (:meth:`BrainPredictor.context_state`). x: (B, Nc, C) the embedded context tokens; q, k, v:
    (B, H, Nc, d) their projections; out, lse: (B, H, Nc, d) / (B, H, Nc) the context queries'
    attention over the context keys and its log-sum-exp (:func:`brainjepa.attention.attention`).
    """

    x: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def detached(self) -> ContextState:
        """Leaf copies that collect the gradients of several passes (see :meth:`backward`)."""
        return ContextState(*(t.detach().requires_grad_() for t in self.tensors()))

    def repeat_interleave(self, k: int) -> ContextState:
        return ContextState(*(t.repeat_interleave(k, 0) for t in self.tensors()))

    def backward(self, leaves: ContextState) -> None:
        """Backpropagate the gradients accumulated on ``leaves`` (from :meth:`detached`)."""
        pairs = [(t, leaf.grad) for t, leaf in zip(self.tensors(), leaves.tensors()) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward(*zip(*pairs))


def _valid_first(valid: torch.Tensor) -> torch.Tensor:
    """The order (B, N) that puts each row's valid tokens first, in their order (a stable
    sort), and its padding last: trailing padding is just fewer keys for the CPU attention
    kernel, other patterns need a slower additive mask."""
    return torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)


def _cat_valid(a: torch.Tensor | None, b: torch.Tensor | None, na: int, nb: int) -> torch.Tensor | None:
    """Validity of the concatenation of two token lists (B, na) and (B, nb); None = all valid."""
    if a is None and b is None:
        return None
    ref = a if a is not None else b
    a = a if a is not None else ref.new_ones(ref.shape[0], na)
    b = b if b is not None else ref.new_ones(ref.shape[0], nb)
    mask = torch.cat([a, b], dim=1)
    return None if bool(mask.all()) else mask


def _blocks(cfg: ModelConfig, dim: int, depth: int, heads: int) -> nn.ModuleList:
    rates = [cfg.drop_path * i / max(depth - 1, 1) for i in range(depth)]  # grows with depth
    return nn.ModuleList(Block(dim, heads, cfg.mlp_ratio, cfg.qkv_bias, r, cfg.layernorm_eps) for r in rates)


def _check_gradients(gradients: torch.Tensor | None, cfg: ModelConfig) -> torch.Tensor:
    if gradients is None:
        # placeholder until real gradients are loaded (e.g. from a bundle's state dict)
        return torch.zeros(cfg.n_rois, cfg.n_gradients)
    gradients = torch.as_tensor(gradients, dtype=torch.float32)
    if tuple(gradients.shape) != (cfg.n_rois, cfg.n_gradients):
        raise DataError(
            f"gradients have shape {tuple(gradients.shape)} but the model expects "
            f"(n_rois={cfg.n_rois}, n_gradients={cfg.n_gradients}); compute gradients on the "
            f"same parcellation as the data (brainjepa gradients ...)"
        )
    return gradients


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: (B, N, C) or (N, C); idx: (B, K) -> (B, K, C)."""
    if x.ndim == 2:
        return x[idx]
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class BrainEncoder(nn.Module):
    """ViT over (ROI, time patch) tokens. Used as context encoder and (EMA) target encoder."""

    def __init__(self, cfg: ModelConfig, gradients: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.register_buffer("gradients", _check_gradients(gradients, cfg))
        self.patch_embed = nn.Linear(cfg.patch_size, D)
        self.patch_norm = nn.LayerNorm(D, eps=cfg.layernorm_eps) if cfg.patch_norm else nn.Identity()
        self.pos_embed = GradientPositions(cfg.n_gradients, cfg.n_patches, D, cfg.pos_minmax, cfg.pos_embed, cfg.n_rois)
        self.blocks = _blocks(cfg, D, cfg.depth, cfg.num_heads)
        self.norm = nn.LayerNorm(D, eps=cfg.layernorm_eps)
        _init_weights(self)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded tokens with positions: (B, R, T) -> (B, R*P, D)."""
        cfg = self.cfg
        B, R, T = x.shape
        if R != cfg.n_rois or T < cfg.n_timepoints:
            raise DataError(
                f"input has shape (R={R}, T={T}) per sample but the model expects "
                f"(R={cfg.n_rois}, T={cfg.n_timepoints})"
            )
        patches = x[:, :, : cfg.n_timepoints].reshape(B, R * cfg.n_patches, cfg.patch_size)
        return self.patch_norm(self.patch_embed(patches)) + self.pos_embed(self.gradients)

    def forward(
        self,
        x: torch.Tensor,
        token_idx: torch.Tensor | None = None,
        token_valid: torch.Tensor | None = None,
        attention_sink: list | None = None,
        output_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, R, T) -> features (B, N, D) of the tokens in ``token_idx`` (B, N); all if None.

        ``token_valid`` (B, N) marks real entries of a padded ``token_idx``; padded tokens are
        never attended to (their own outputs are meaningless and must be ignored).
        ``output_idx`` (B, M): return only these positions of the encoded sequence, (B, M, D);
        the last block then works on those queries alone.
        ``attention_sink``: a list that receives, per layer, the attention each token receives
        (B, N), averaged over heads and queries; slower (explicit attention), for interpretation.
        """
        h = self.tokens(x)
        if token_idx is not None:
            h = _gather(h, token_idx)
        if token_valid is not None and bool(token_valid.all()):
            token_valid = None  # no padding: keep the fastest attention kernel
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            h = block(h, token_valid, attention_sink, output_idx if i == last else None)
        return self.norm(h)


class BrainPredictor(nn.Module):
    """Narrow ViT that predicts target-token features from context features and positions."""

    def __init__(self, cfg: ModelConfig, gradients: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        Dp = cfg.predictor_embed_dim
        self.register_buffer("gradients", _check_gradients(gradients, cfg))
        self.embed = nn.Linear(cfg.embed_dim, Dp)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dp))
        self.pos_embed = GradientPositions(
            cfg.n_gradients, cfg.n_patches, Dp, cfg.pos_minmax, cfg.pos_embed, cfg.n_rois
        )
        self.blocks = _blocks(cfg, Dp, cfg.predictor_depth, cfg.predictor_num_heads)
        self.norm = nn.LayerNorm(Dp, eps=cfg.layernorm_eps)
        self.proj = nn.Linear(Dp, cfg.embed_dim)
        _init_weights(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def context_state(
        self, context: torch.Tensor, context_idx: torch.Tensor, context_valid: torch.Tensor | None = None
    ) -> ContextState:
        """The first block's work on the context alone (embedding, projections, the context
        queries' attention over the context keys with its log-sum-exp), which is the same for
        every set of target tokens: pass it as ``forward(..., shared=state)`` to several
        predictions from the same context. Arguments as in :meth:`forward`."""
        pos = self.pos_embed(self.gradients)
        x = self.embed(context) + _gather(pos, context_idx)
        first = self.blocks[0]
        q, k, v = first.attn.project(first.norm1(x))
        key_mask = None if context_valid is None or bool(context_valid.all()) else context_valid
        out, lse = attention(q, k, v, key_mask, self_attention=True, return_lse=True)
        return ContextState(x, q, k, v, out, lse)

    def forward(
        self,
        context: torch.Tensor | None,
        context_idx: torch.Tensor,
        target_idx: torch.Tensor,
        context_valid: torch.Tensor | None = None,
        target_valid: torch.Tensor | None = None,
        shared: ContextState | None = None,
    ) -> torch.Tensor:
        """context (B, Nc, D) at tokens context_idx (B, Nc); returns predictions (B, Nt, D)
        for the tokens target_idx (B, Nt). Validity masks (B, Nc) / (B, Nt) mark padding.
        ``shared``: the context's part of the first block from :meth:`context_state` (then
        ``context`` is not used): the same predictions, without redoing that part."""
        B, Nc = context_idx.shape
        pos = self.pos_embed(self.gradients)  # (R*P, Dp), computed once per call
        tgt = self.mask_token + _gather(pos, target_idx)
        blocks = list(self.blocks)
        if shared is None:
            h = torch.cat([self.embed(context) + _gather(pos, context_idx), tgt], dim=1)
        else:
            h = blocks.pop(0).forward_with_context(
                shared, tgt, context_valid, target_valid, context_outputs=bool(blocks)
            )
            if not blocks:  # a one-block predictor: h holds the target tokens only
                return self.proj(self.norm(h))
        # only the mask tokens' outputs are used: the last block computes just those queries
        queries = torch.arange(Nc, h.shape[1], device=h.device).expand(B, -1)
        key_mask = _cat_valid(context_valid, target_valid, Nc, target_idx.shape[1])
        if key_mask is not None:  # padding tokens last (attention does not depend on order)
            order = _valid_first(key_mask)
            h, key_mask = _gather(h, order), torch.gather(key_mask, 1, order)
            queries = torch.argsort(order, dim=1)[:, Nc:]
        last = len(blocks) - 1
        for i, block in enumerate(blocks):
            h = block(h, key_mask, query_idx=queries if i == last else None)
        return self.proj(self.norm(h))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
