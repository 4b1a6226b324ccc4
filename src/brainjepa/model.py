"""The Brain-JEPA networks, as a reference to read top to bottom (docs/method.md).

Tokens are (ROI r, time patch t) pairs on an R x P grid, P = T // patch_size, numbered ROI-major
(token = r * P + t). A token's embedding is a linear map of its patch of ``patch_size`` time
points plus its position ``[temporal | spatial]``, each half d/2 wide: a fixed sine-cosine code
of t, and a learned linear map of ROI r's row of brain gradients (R x m, see
:mod:`brainjepa.gradients`).

:class:`BrainEncoder` is a ViT over the tokens it is given (the context encoder and its EMA copy,
the target encoder); :class:`BrainPredictor` a narrow ViT that reads the context features and, at
each target position, a mask token plus that position's embedding. Ragged batches carry a
validity mask (True = a real token). This module computes everything the plain way;
:mod:`brainjepa.fast` holds the exact shortcuts the training step takes, tested equal to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .attention import attention, cat_valid, padding_mask
from .errors import ConfigError, DataError
from .fused import linear

# ----------------------------------------------------------------------------- configuration

# Architecture presets. Encoder sizes follow ViT-S/B/L; predictor widths and depths follow the
# paper (384 for B and L, 192 for S; depth 6, 12 for L). "tiny" is for CPU tests and demos.
# fmt: off
MODEL_SIZES: dict[str, dict] = {
    "tiny":  dict(embed_dim=192,  depth=4,  num_heads=3,  predictor_embed_dim=96,  predictor_depth=2,  predictor_num_heads=3),   # noqa: E501
    "small": dict(embed_dim=384,  depth=12, num_heads=6,  predictor_embed_dim=192, predictor_depth=6,  predictor_num_heads=6),   # noqa: E501
    "base":  dict(embed_dim=768,  depth=12, num_heads=12, predictor_embed_dim=384, predictor_depth=6,  predictor_num_heads=12),  # noqa: E501
    "large": dict(embed_dim=1024, depth=24, num_heads=16, predictor_embed_dim=384, predictor_depth=12, predictor_num_heads=16),  # noqa: E501
}
# fmt: on
_BASE = MODEL_SIZES["base"]  # a bare ModelConfig() is the authors' ViT-B

POS_EMBEDS = ("gradient", "sincos", "learned")


@dataclass
class ModelConfig:
    """Architecture of a Brain-JEPA model: everything needed to rebuild it from JSON.

    The defaults describe the authors' published model (ViT-B, 450 ROIs, 160 time points); the
    pretraining config (:mod:`brainjepa.pretrain.config`) takes its model defaults from here.

    Args:
        n_rois: R, the number of ROIs.
        n_timepoints: T, the time points of one input window (a multiple of ``patch_size``).
        patch_size: time points per token.
        n_gradients: m, the brain gradients per ROI.
        embed_dim: encoder width D (default: ViT-B's 768).
        depth: encoder blocks (default: 12).
        num_heads: encoder attention heads (default: 12).
        mlp_ratio: MLP hidden width over block width.
        qkv_bias: biases in the query/key/value projections.
        predictor_embed_dim: predictor width Dp (default: 384).
        predictor_depth: predictor blocks (default: 6).
        predictor_num_heads: predictor attention heads (default: 12).
        pos_minmax: rescale the spatial half of the positions to [-1, 1] over all ROIs at every
            forward, as the authors' code does.
        pos_embed: spatial half of the positions: "gradient" (the method), "sincos" (of the ROI
            index) or "learned" (a free R x d/2 table); the last two are the paper's ablations.
        patch_norm: LayerNorm on the embedded patches before the positions are added
            (docs/method.md, "Recipe").
        drop_path: stochastic-depth rate of the last block (growing linearly from 0).
        layernorm_eps: epsilon of every LayerNorm.

    Raises:
        ConfigError: an unknown ``pos_embed``, a depth below 1, a window that is not a whole number
            of patches, or a width not divisible by its heads and by 4.
    """

    n_rois: int = 450
    n_timepoints: int = 160
    patch_size: int = 16
    n_gradients: int = 30
    embed_dim: int = _BASE["embed_dim"]
    depth: int = _BASE["depth"]
    num_heads: int = _BASE["num_heads"]
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    predictor_embed_dim: int = _BASE["predictor_embed_dim"]
    predictor_depth: int = _BASE["predictor_depth"]
    predictor_num_heads: int = _BASE["predictor_num_heads"]
    pos_minmax: bool = True
    pos_embed: str = "gradient"
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
                f"model.n_timepoints={self.n_timepoints} is not a multiple of model.patch_size={self.patch_size}: "
                f"choose a window length that is (e.g. {self.n_timepoints // self.patch_size * self.patch_size})"
            )
        for name, width, heads in [
            ("embed_dim", self.embed_dim, self.num_heads),
            ("predictor_embed_dim", self.predictor_embed_dim, self.predictor_num_heads),
        ]:
            if width % heads or width % 4:
                raise ConfigError(
                    f"model.{name}={width} must be divisible by its number of heads ({heads}) "
                    "and by 4 (sine-cosine positions)"
                )

    @property
    def n_patches(self) -> int:
        """Time patches per ROI, P = n_timepoints // patch_size."""
        return self.n_timepoints // self.patch_size

    @property
    def n_tokens(self) -> int:
        """Tokens per window, R * P."""
        return self.n_rois * self.n_patches

    @classmethod
    def from_size(cls, size: str, **overrides) -> ModelConfig:
        """A preset of :data:`MODEL_SIZES` ("tiny", "small", "base", "large") with some fields changed.

        Args:
            size: the preset.
            **overrides: any other field of the config.

        Raises:
            ConfigError: an unknown ``size``.
        """
        if size not in MODEL_SIZES:
            raise ConfigError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
        return cls(**{**MODEL_SIZES[size], **overrides})

    def to_dict(self) -> dict:
        """The config as a plain dict, {field: value}, ready for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """The inverse of :meth:`to_dict`.

        Args:
            d: {field: value}; missing fields take their defaults.

        Raises:
            ConfigError: a key that is not a field.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------- positions


def sincos_1d(n_positions: int, dim: int) -> torch.Tensor:
    """Fixed sine-cosine code: [sin(p w_i) | cos(p w_i)], w_i = 1e4^(-i / (dim/2)).

    Args:
        n_positions: positions p = 0 .. n_positions - 1.
        dim: code width (even).

    Returns:
        (n_positions, dim) float32.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


class GradientPositions(nn.Module):
    """Positional embedding (R*P, dim) = [sine-cosine(t) | spatial(r)] for token r*P + t.

    spatial(r) is ``Linear(gradients[r])`` ("gradient"), the sine-cosine code of the ROI index
    ("sincos") or a learned row per ROI ("learned"). With ``minmax`` a learned spatial table is
    rescaled to [-1, 1] over all ROIs at every forward.

    Args:
        n_gradients: m, the input width of the "gradient" projection.
        n_patches: P, time patches per ROI.
        dim: embedding width (each half dim/2).
        minmax: rescale the spatial half to [-1, 1] (not for "sincos").
        kind: "gradient", "sincos" or "learned".
        n_rois: R, the table size for "sincos" and "learned".
    """

    def __init__(
        self, n_gradients: int, n_patches: int, dim: int, minmax: bool, kind: str = "gradient", n_rois: int = 0
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
        """gradients (R, m) -> positions (R*P, dim), ROI-major."""
        spatial = self.proj(gradients) if self.kind == "gradient" else self.table  # (R, d/2)
        if self.minmax and self.kind != "sincos":  # over the whole table
            lo, hi = spatial.min(), spatial.max()
            spatial = 2 * (spatial - lo) / (hi - lo).clamp_min(1e-12) - 1
        n_rois = spatial.shape[0]
        spatial = spatial.repeat_interleave(self.n_patches, dim=0)  # (R*P, d/2), ROI-major
        temporal = self.temporal.repeat(n_rois, 1)  # (R*P, d/2)
        return torch.cat([temporal, spatial], dim=1)


# ----------------------------------------------------------------------------- transformer block


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples with probability p (training).

    Args:
        p: drop probability (0: identity).
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, ...) -> x (B, ...), each sample's branch kept with probability 1 - p and rescaled."""
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    """Multi-head self-attention; padding keys (``key_mask`` False) are never attended to.

    Args:
        dim: width C.
        num_heads: heads H (C // H wide each).
        qkv_bias: biases in the query/key/value projection.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C), key_mask (B, N) bool or None -> (B, N, C)."""
        B, N, C = x.shape
        H = self.num_heads
        qkv = linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)  # each (B, H, N, C/H)
        out = attention(q, k, v, key_mask, self_attention=True)  # SDPA (or the CPU bf16 kernel)
        return linear(out.transpose(1, 2).reshape(B, N, C), self.proj.weight, self.proj.bias)


class MLP(nn.Module):
    """Feed-forward part of a block: Linear, GELU, Linear.

    Args:
        dim: input and output width.
        hidden: hidden width.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        h = linear(x, self.fc1.weight, self.fc1.bias, gelu=True)
        return linear(h, self.fc2.weight, self.fc2.bias)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(norm(x)), then + mlp(norm(x)).

    Args:
        dim: width C.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over ``dim``.
        qkv_bias: biases in the query/key/value projection.
        drop_path: stochastic-depth probability of both branches.
        eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C), key_mask (B, N) bool or None -> (B, N, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x), key_mask))
        return add_residual(x, self.drop_path(self.mlp(self.norm2(x))))


def add_residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y; without autograd into x itself (for a block's own intermediate x: one
    activation-sized tensor fewer to fault in)."""
    return x + y if torch.is_grad_enabled() else x.add_(y)


def _blocks(cfg: ModelConfig, dim: int, depth: int, heads: int) -> nn.ModuleList:
    """``depth`` blocks whose drop-path rate grows linearly from 0 to ``cfg.drop_path``."""
    rates = [cfg.drop_path * i / max(depth - 1, 1) for i in range(depth)]
    return nn.ModuleList(Block(dim, heads, cfg.mlp_ratio, cfg.qkv_bias, r, cfg.layernorm_eps) for r in rates)


def _init_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear weights, zero biases, unit LayerNorms, in place."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of each sample's tokens, or of one table shared by all samples.

    Args:
        x: (B, N, C) tokens, or a shared (N, C) table.
        idx: (B, K) row indices.

    Returns:
        (B, K, C).
    """
    if x.ndim == 2:
        return x[idx]
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _check_gradients(gradients, cfg: ModelConfig) -> torch.Tensor:
    if gradients is None:  # a placeholder until real gradients are loaded (e.g. from a bundle)
        return torch.zeros(cfg.n_rois, cfg.n_gradients)
    gradients = torch.as_tensor(gradients, dtype=torch.float32)
    if tuple(gradients.shape) != (cfg.n_rois, cfg.n_gradients):
        raise DataError(
            f"gradients have shape {tuple(gradients.shape)} but the model expects (n_rois={cfg.n_rois}, "
            f"n_gradients={cfg.n_gradients}); compute gradients on the same parcellation as the data "
            "(brainjepa gradients ...)"
        )
    return gradients


def _positions(cfg: ModelConfig, dim: int) -> GradientPositions:
    return GradientPositions(cfg.n_gradients, cfg.n_patches, dim, cfg.pos_minmax, cfg.pos_embed, cfg.n_rois)


# ----------------------------------------------------------------------------- encoder


class BrainEncoder(nn.Module):
    """ViT over (ROI, time patch) tokens: the context encoder and the (EMA) target encoder.

    Args:
        cfg: the architecture.
        gradients: (R, m) brain gradients for the positions; None: zeros, a placeholder until the
            real ones are loaded (e.g. from a bundle).

    Raises:
        DataError: ``gradients`` of another shape than (cfg.n_rois, cfg.n_gradients).
    """

    def __init__(self, cfg: ModelConfig, gradients: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.register_buffer("gradients", _check_gradients(gradients, cfg))
        self.patch_embed = nn.Linear(cfg.patch_size, D)
        self.patch_norm = nn.LayerNorm(D, eps=cfg.layernorm_eps) if cfg.patch_norm else nn.Identity()
        self.pos_embed = _positions(cfg, D)
        self.blocks = _blocks(cfg, D, cfg.depth, cfg.num_heads)
        self.norm = nn.LayerNorm(D, eps=cfg.layernorm_eps)
        _init_weights(self)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded tokens with their positions.

        Args:
            x: (B, R, T) input; only the first ``n_timepoints`` time points are used.

        Returns:
            (B, R*P, D), token r*P + t.

        Raises:
            DataError: another R, or fewer than ``n_timepoints`` time points.
        """
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
        output_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Features of the tokens ``token_idx`` (B, N) of x (B, R, T), all tokens if None.

        Args:
            x: the input windows, (B, R, T).
            token_idx: which tokens to encode, (B, N); None: all R*P.
            token_valid: (B, N) bool, False for padding entries of a ragged ``token_idx``; they are
                never attended to (their own outputs are meaningless).
            output_idx: (B, M) positions of the encoded sequence to return; None: all.

        Returns:
            (B, N, D) features after the final LayerNorm, or (B, M, D) at ``output_idx``.
        """
        h = self.tokens(x)
        if token_idx is not None:
            h = gather(h, token_idx)
        key_mask = padding_mask(token_valid)
        for block in self.blocks:
            h = block(h, key_mask)
        h = self.norm(h)
        return h if output_idx is None else gather(h, output_idx)


# ----------------------------------------------------------------------------- predictor


class BrainPredictor(nn.Module):
    """Narrow ViT that predicts target-token features from context features and positions.

    Args:
        cfg: the architecture.
        gradients: (R, m) brain gradients for the positions; None: zeros, a placeholder until the
            real ones are loaded.

    Raises:
        DataError: ``gradients`` of another shape than (cfg.n_rois, cfg.n_gradients).
    """

    def __init__(self, cfg: ModelConfig, gradients: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        Dp = cfg.predictor_embed_dim
        self.register_buffer("gradients", _check_gradients(gradients, cfg))
        self.embed = nn.Linear(cfg.embed_dim, Dp)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dp))
        self.pos_embed = _positions(cfg, Dp)
        self.blocks = _blocks(cfg, Dp, cfg.predictor_depth, cfg.predictor_num_heads)
        self.norm = nn.LayerNorm(Dp, eps=cfg.layernorm_eps)
        self.proj = nn.Linear(Dp, cfg.embed_dim)
        _init_weights(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def inputs(
        self, context: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The predictor's input tokens.

        Args:
            context: context features from the encoder, (B, Nc, D).
            context_idx: their token positions, (B, Nc).
            target_idx: the token positions to predict, (B, Nt).

        Returns:
            The embedded context plus its positions (B, Nc, Dp), and the mask token plus each target's
            position (B, Nt, Dp).
        """
        pos = self.pos_embed(self.gradients)  # (R*P, Dp)
        return self.embed(context) + gather(pos, context_idx), self.mask_token + gather(pos, target_idx)

    def forward(
        self,
        context: torch.Tensor,
        context_idx: torch.Tensor,
        target_idx: torch.Tensor,
        context_valid: torch.Tensor | None = None,
        target_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the target encoder's features at ``target_idx``.

        Args:
            context: context features from the encoder, (B, Nc, D).
            context_idx: their token positions, (B, Nc).
            target_idx: the token positions to predict, (B, Nt).
            context_valid: (B, Nc) bool validity of ragged context entries, or None.
            target_valid: (B, Nt) bool validity of ragged target entries, or None.

        Returns:
            (B, Nt, D) predictions.
        """
        ctx, tgt = self.inputs(context, context_idx, target_idx)
        h = torch.cat([ctx, tgt], dim=1)
        key_mask = cat_valid(context_valid, target_valid, ctx.shape[1], tgt.shape[1])
        for block in self.blocks:
            h = block(h, key_mask)
        return self.proj(self.norm(h[:, ctx.shape[1] :]))
