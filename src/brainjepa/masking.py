"""Spatiotemporal masking (Brain-JEPA; docs/method.md) on the R x P token grid.

A sample's tokens are (ROI r, patch t), token index ``r * P + t`` (ROI-major). For every sample:

**Observation block** ``B_x``: a random set ``O`` of ``n_R`` ROIs times a contiguous window
``W = [s, s + n_T)`` of ``n_T`` patches, with ``n_R = round(eta_R * R)``, ``eta_R ~ U(obs_roi_scale)``,
``n_T = round(eta_T * P)``, ``eta_T ~ U(obs_time_scale)`` and ``s`` uniform over every start that
fits (so the last patch is visible too). Both counts are clipped to ``[1, R - 1]`` and
``[1, P - 1]``: the block always leaves at least one ROI and one patch out, so all three target
regions below are non-empty and every one of the ``3K`` target blocks holds at least one token in
every sample (the per-block loss is always defined; no block is ever padding only). With the
paper's scales this only changes ``n_T = P`` (31% of draws at ``P = 10``) into ``P - 1`` and
``n_R = R`` (0.7% at ``R = 450``) into ``R - 1``.

**Target regions** (``O'`` = ROIs not in ``O``, ``W'`` = patches not in ``W``):
alpha (cross-ROI) ``O' x W``, beta (cross-time) ``O x W'``, gamma (double-cross) ``O' x W'``.

**Target blocks** (overlapped sampling, ``s_alpha ~ B_x u B_alpha``, ``s_beta ~ B_x u B_beta``,
``s_gamma ~ B_gamma``). Each block is a ROI set times a contiguous patch span. Every fraction
``f ~ U(scale)`` is a fraction of the *full* axis (R or P, as in the paper's scales), turned into a
count by ``round(f * R)`` / ``round(f * P)`` (numpy ``rint``) and clipped to ``[1, room]``, the room
being R / ``n_R`` / ``R - n_R`` ROIs and ``n_T`` / P / the longer free piece of patches for alpha /
beta / gamma. So a time fraction of 0 still gives one patch, and a gamma block, whose ROI pool is
only the unobserved ROIs, usually takes all of them (at R = 450: about 100 wanted, about 36 there).

- alpha: ROIs from all R, always including one unobserved ROI (drawn uniformly from ``O'``);
  patches a span inside ``W``. Guarantee: every token has its patch in ``W``; the block contains
  at least one pure alpha token.
- beta: ROIs from ``O``; patches a span anywhere in ``[0, P)`` that contains at least one patch of
  ``W'`` (start drawn uniformly over the spans that do). Guarantee: every token has its ROI in
  ``O``; at least one pure beta token.
- gamma: ROIs from ``O'``; patches a span inside ``[0, s)`` or inside ``[s + n_T, P)`` (uniform over
  the spans that fit; its length is cut to the longer piece). Guarantee: every token is pure gamma.

**Context** = ``B_x`` minus the union of all target blocks, so no target token is ever visible. A
sample left with fewer than ``min_context`` context tokens is redrawn (at most 100 times, then
ConfigError).

**Random masking** (``strategy="random"``, the paper's ablation): the same draws, then each
sample's tokens are relabelled by a random permutation of the grid, so every count (context,
each block, the overlaps) is unchanged while the blocks lose all ROI and time structure.

Nothing is truncated: rows are padded to the batch maximum and carry validity masks.

**Randomness**: ``masker(B, rng)`` takes a numpy Generator or a seed; without one it uses the
masker's own generator, seeded by ``seed``. :meth:`SpatiotemporalMasker.collate` uses that generator
in the main process; inside a DataLoader worker it reseeds the worker's copy once from
``(seed, worker seed)``, so workers never repeat each other and ``torch.manual_seed`` makes runs
reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError, DataError

REGIONS = ("alpha", "beta", "gamma")
STRATEGIES = ("spatiotemporal", "random")
_MAX_REDRAWS = 100


@dataclass
class MaskBatch:
    """Masks of a batch of B samples on an R x P token grid, padded to the longest row.

    Attributes:
        context_idx: B x Nc sorted token indices (``r * P + t``), 0 where ``context_valid`` is
            False.
        context_valid: B x Nc, True for real tokens.
        target_idx: B x nblocks x Nt sorted token indices per target block, 0 where invalid.
        target_valid: B x nblocks x Nt.
        regions: the region of each block, ``("alpha",) * K + ("beta",) * K + ("gamma",) * K``.
        observation: B x R x P, True on the observation block (context plus the targets inside
            it); for plots and checks, the model does not need it.
    """

    context_idx: torch.Tensor
    context_valid: torch.Tensor
    target_idx: torch.Tensor
    target_valid: torch.Tensor
    regions: tuple[str, ...]
    observation: torch.Tensor

    @property
    def n_blocks(self) -> int:
        """The number of target blocks, 3K."""
        return len(self.regions)

    def block(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One target block, cut to its longest row.

        All blocks share the width Nt of the longest (usually alpha) block, so beta and gamma rows
        are mostly padding; a predictor that runs block by block saves that work with this.

        Args:
            k: the block's index, 0 .. 3K - 1.

        Returns:
            ``(indices, valid)``, both B x Nk (Nk >= 1: the block's longest row).
        """
        width = max(int(self.target_valid[:, k].sum(1).max()), 1)
        return self.target_idx[:, k, :width], self.target_valid[:, k, :width]

    def counts(self) -> dict[str, float]:
        """Mean per-sample token counts, for logs and checks.

        Returns:
            ``"context"``, each region (``"alpha"``, ``"beta"``, ``"gamma"``: the union of its K
            blocks) and ``"target"`` (the union of all blocks), each also as
            ``"<name>_fraction"`` of the R * P grid.
        """
        b, n_rois, n_patches = self.observation.shape
        n_tokens = n_rois * n_patches
        grid = torch.zeros(b, self.n_blocks, n_tokens, dtype=torch.int32, device=self.target_idx.device)
        # scatter_add, not scatter: padding entries point at token 0 and must not clear a real hit there
        grid.scatter_add_(2, self.target_idx, self.target_valid.to(torch.int32))
        grid = grid > 0
        out = {"context": self.context_valid.sum(1).float().mean().item()}
        for region in REGIONS:
            sel = [i for i, r in enumerate(self.regions) if r == region]
            out[region] = grid[:, sel].any(1).sum(1).float().mean().item() if sel else 0.0
        out["target"] = grid.any(1).sum(1).float().mean().item()
        for key in ("context", *REGIONS, "target"):
            out[f"{key}_fraction"] = out[key] / n_tokens
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskBatch:
        """The same masks on another device.

        Args:
            device: the target device.
            non_blocking: passed to :meth:`torch.Tensor.to` (asynchronous copies from pinned
                memory).

        Returns:
            A new MaskBatch (``regions`` shared).
        """

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return MaskBatch(
            move(self.context_idx),
            move(self.context_valid),
            move(self.target_idx),
            move(self.target_valid),
            self.regions,
            move(self.observation),
        )

    def pin_memory(self) -> MaskBatch:
        """The same masks in pinned memory; called by ``DataLoader(pin_memory=True)``.

        Returns:
            A new MaskBatch with pinned tensors.
        """
        return MaskBatch(
            self.context_idx.pin_memory(),
            self.context_valid.pin_memory(),
            self.target_idx.pin_memory(),
            self.target_valid.pin_memory(),
            self.regions,
            self.observation.pin_memory(),
        )


def _check_scale(name: str, scale: tuple[float, float], allow_zero: bool) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise ConfigError(f"SpatiotemporalMasker: {name}={scale!r} must be a pair (low, high) of fractions") from None
    if not ((lo >= 0 if allow_zero else lo > 0) and lo <= hi <= 1):
        bound = "0 <=" if allow_zero else "0 <"
        raise ConfigError(f"SpatiotemporalMasker: {name}={scale!r} must satisfy {bound} low <= high <= 1")
    return lo, hi


def _draw_counts(
    rng: np.random.Generator,
    low: np.ndarray | float,
    high: np.ndarray | float,
    size: int,
    most: np.ndarray | int,
    shape: tuple[int, ...],
) -> np.ndarray:
    """round(U(low, high) * size), clipped to [1, most]; ``low``/``high``/``most`` broadcast to ``shape``."""
    counts = np.rint(rng.uniform(low, high, shape) * size).astype(np.int64)
    return np.clip(counts, 1, most)


def _random_subset(
    rng: np.random.Generator, pool: np.ndarray, k: np.ndarray, force_from: np.ndarray | None = None
) -> np.ndarray:
    """Per row, a uniform random subset of ``k`` members of ``pool`` (M x N bool). Where a row of
    ``force_from`` (M x N bool, inside the pool) has members, the subset holds one of them, drawn
    uniformly."""
    rows = np.arange(pool.shape[0])
    keys = rng.random(pool.shape)
    np.putmask(keys, ~pool, 2.0)  # non-members sort last
    if force_from is not None:
        # keys are i.i.d., so the smallest-key member of force_from is a uniform pick from it
        pick = np.argmin(np.where(force_from, keys, 3.0), axis=1)
        keys[rows, pick] = np.where(force_from[rows, pick], -1.0, keys[rows, pick])
    kth = np.sort(keys, axis=1)[rows, k - 1]
    return keys <= kth[:, None]


def _rectangles(rois: np.ndarray, first: np.ndarray, length: np.ndarray, n_patches: int) -> np.ndarray:
    """M x R x P bool: ROI set ``rois`` (M x R) times patch span [first, first + length) per row."""
    m = rois.shape[0]
    t = np.arange(n_patches)
    table = np.zeros((m, 2, n_patches), dtype=bool)  # per row: [no patch, the span]
    table[:, 1] = (t >= first[:, None]) & (t < (first + length)[:, None])
    # a row lookup is much faster than broadcasting rois[:, :, None] & span[:, None, :] when P is small
    return np.take(table.reshape(2 * m, n_patches), 2 * np.arange(m)[:, None] + rois, axis=0)


def _pack(grid: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """M x N bool with ``counts`` (M,) True entries per row -> (M x L int64 sorted indices of the
    True entries, padded with 0; M x L valid), L = the largest count."""
    m, n = grid.shape
    valid = np.arange(max(int(counts.max(initial=0)), 1)) < counts[:, None]
    flat = np.flatnonzero(grid)  # row-major: each row's indices come out sorted, rows in order
    flat -= np.repeat(np.arange(0, m * n, n), counts)
    idx = np.zeros(valid.shape, dtype=np.int64)
    idx[valid] = flat  # boolean assignment fills row by row, left to right
    return idx, valid


class SpatiotemporalMasker:
    """Draws Brain-JEPA spatiotemporal masks (see the module docstring for the exact rules).

    Args:
        n_rois: R, number of ROIs (>= 2).
        n_patches: P, number of time patches per ROI (>= 2).
        n_blocks: K, target blocks per region; a batch has 3K blocks ordered [alpha x K, beta x K,
            gamma x K].
        obs_roi_scale: range of the observation block's fraction of the ROIs.
        obs_time_scale: range of the observation block's fraction of the patches.
        alpha_roi_scale: range of an alpha target block's fraction of R.
        alpha_time_scale: range of an alpha target block's fraction of P.
        beta_roi_scale: range of a beta target block's fraction of R.
        beta_time_scale: range of a beta target block's fraction of P.
        gamma_roi_scale: range of a gamma target block's fraction of R.
        gamma_time_scale: range of a gamma target block's fraction of P.
        min_context: fewest context tokens a sample may have; samples below it are redrawn.
        strategy: "spatiotemporal" (the method) or "random" (same counts, tokens shuffled).
        seed: seed of the masker's own generator, used by ``__call__`` without ``rng`` and by
            :meth:`collate`.

    ``masker(B, rng)`` returns a :class:`MaskBatch`; ``masker.collate`` is a DataLoader
    ``collate_fn`` returning ``(x: B x R x T, MaskBatch)``.
    """

    def __init__(
        self,
        n_rois: int,
        n_patches: int,
        n_blocks: int = 1,
        obs_roi_scale: tuple[float, float] = (0.84, 1.0),
        obs_time_scale: tuple[float, float] = (0.84, 1.0),
        alpha_roi_scale: tuple[float, float] = (0.45, 0.6),
        alpha_time_scale: tuple[float, float] = (0.2, 0.6),
        beta_roi_scale: tuple[float, float] = (0.15, 0.3),
        beta_time_scale: tuple[float, float] = (0.0, 0.4),
        gamma_roi_scale: tuple[float, float] = (0.15, 0.3),
        gamma_time_scale: tuple[float, float] = (0.0, 0.4),
        min_context: int = 1,
        strategy: str = "spatiotemporal",
        seed: int | None = None,
    ):
        if strategy not in STRATEGIES:
            raise ConfigError(f"SpatiotemporalMasker: strategy={strategy!r}; choose one of {STRATEGIES}")
        self.strategy = strategy
        if int(n_rois) < 2 or int(n_patches) < 2:
            raise ConfigError(
                f"SpatiotemporalMasker: n_rois={n_rois}, n_patches={n_patches}; both must be >= 2 so that "
                "the observation block can leave ROIs and patches out (use T >= 2 * patch_size)"
            )
        if int(n_blocks) < 1:
            raise ConfigError(f"SpatiotemporalMasker: n_blocks={n_blocks} must be >= 1")
        self.n_rois = int(n_rois)
        self.n_patches = int(n_patches)
        self.n_blocks = int(n_blocks)
        self.obs_roi_scale = _check_scale("obs_roi_scale", obs_roi_scale, allow_zero=False)
        self.obs_time_scale = _check_scale("obs_time_scale", obs_time_scale, allow_zero=False)
        self.alpha_roi_scale = _check_scale("alpha_roi_scale", alpha_roi_scale, allow_zero=True)
        self.alpha_time_scale = _check_scale("alpha_time_scale", alpha_time_scale, allow_zero=True)
        self.beta_roi_scale = _check_scale("beta_roi_scale", beta_roi_scale, allow_zero=True)
        self.beta_time_scale = _check_scale("beta_time_scale", beta_time_scale, allow_zero=True)
        self.gamma_roi_scale = _check_scale("gamma_roi_scale", gamma_roi_scale, allow_zero=True)
        self.gamma_time_scale = _check_scale("gamma_time_scale", gamma_time_scale, allow_zero=True)
        largest_context = (self.n_rois - 1) * (self.n_patches - 1)
        if not 0 <= int(min_context) <= largest_context:
            raise ConfigError(
                f"SpatiotemporalMasker: min_context={min_context} must be between 0 and {largest_context} "
                f"(the largest observation block on a {self.n_rois} x {self.n_patches} grid)"
            )
        self.min_context = int(min_context)
        self.seed = seed
        self.regions = tuple(r for r in REGIONS for _ in range(self.n_blocks))
        self.rng_ = np.random.default_rng(seed)
        self.worker_seed_: int | None = None

    def describe(self) -> dict:
        """The settings, as plain data (for run configs and logs).

        Returns:
            The constructor's arguments by name (scales as checked (low, high) tuples).
        """
        return {
            "n_rois": self.n_rois,
            "n_patches": self.n_patches,
            "n_blocks": self.n_blocks,
            "obs_roi_scale": self.obs_roi_scale,
            "obs_time_scale": self.obs_time_scale,
            "alpha_roi_scale": self.alpha_roi_scale,
            "alpha_time_scale": self.alpha_time_scale,
            "beta_roi_scale": self.beta_roi_scale,
            "beta_time_scale": self.beta_time_scale,
            "gamma_roi_scale": self.gamma_roi_scale,
            "gamma_time_scale": self.gamma_time_scale,
            "min_context": self.min_context,
            "strategy": self.strategy,
            "seed": self.seed,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"SpatiotemporalMasker({args})"

    def _draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Observation blocks (n x R x P bool), target blocks (n x 3K x R x P bool) and their token
        counts (n x 3K)."""
        R, P, K = self.n_rois, self.n_patches, self.n_blocks
        n_obs = _draw_counts(rng, *self.obs_roi_scale, R, R - 1, (n,))
        obs_rois = _random_subset(rng, np.ones((n, R), dtype=bool), n_obs)
        w = _draw_counts(rng, *self.obs_time_scale, P, P - 1, (n,))
        s = rng.integers(0, P - w + 1)
        observation = _rectangles(obs_rois, s, w, P)

        # Target blocks as n x 3 (alpha, beta, gamma) x K arrays; per-sample values get two new axes.
        n_obs, s, w = n_obs[:, None, None], s[:, None, None], w[:, None, None]
        scales = np.array(
            [
                [self.alpha_roi_scale, self.alpha_time_scale],
                [self.beta_roi_scale, self.beta_time_scale],
                [self.gamma_roi_scale, self.gamma_time_scale],
            ]
        )  # 3 x (roi, time) x (low, high)
        lo, hi = scales[:, :, 0, None], scales[:, :, 1, None]  # 3 x 2 x 1

        # ROIs: alpha from all ROIs with one unobserved ROI forced in, beta from the observed ones,
        # gamma from the unobserved ones; counts are fractions of R clipped to the pool.
        most = np.concatenate([np.full_like(n_obs, R), n_obs, R - n_obs], 1)
        n_rois = _draw_counts(rng, lo[:, 0], hi[:, 0], R, most, (n, 3, K))
        pool = np.empty((n, 3, K, R), dtype=bool)
        pool[:, 0], pool[:, 1], pool[:, 2] = True, obs_rois[:, None], ~obs_rois[:, None]
        force = np.zeros_like(pool)
        force[:, 0] = ~obs_rois[:, None]
        rois = _random_subset(rng, pool.reshape(-1, R), n_rois.reshape(-1), force.reshape(-1, R))

        # Patch spans: alpha inside the window [s, s + w); beta anywhere but holding a patch outside
        # the window; gamma inside [0, s) or inside [s + w, P). Lengths are fractions of P clipped to
        # the room there is.
        left, right = s, P - s - w
        most = np.concatenate([w, np.full_like(w, P), np.maximum(left, right)], 1)
        length = _draw_counts(rng, lo[:, 1], hi[:, 1], P, most, (n, 3, K))
        la, lb, lg = length[:, 0:1], length[:, 1:2], length[:, 2:3]
        fits = lb <= w  # a beta span no longer than the window must start before it or end after it
        n_left = np.maximum(left - lg + 1, 0)
        n_starts = np.concatenate(
            [w - la + 1, np.where(fits, P - w, P - lb + 1), n_left + np.maximum(right - lg + 1, 0)], 1
        )
        k = rng.integers(0, n_starts)
        ka, kb, kg = k[:, 0:1], k[:, 1:2], k[:, 2:3]
        first = np.concatenate(
            [s + ka, np.where(fits & (kb >= s), kb + w - lb + 1, kb), np.where(kg < n_left, kg, s + w + kg - n_left)], 1
        )

        blocks = _rectangles(rois, first.reshape(-1), length.reshape(-1), P).reshape(n, 3 * K, R * P)
        sizes = np.count_nonzero(rois, axis=1) * length.reshape(-1)
        if self.strategy == "random":  # the same counts on randomly relabelled tokens
            perm = rng.permuted(np.broadcast_to(np.arange(R * P), (n, R * P)), axis=1)
            observation = np.take_along_axis(observation.reshape(n, R * P), perm, 1).reshape(n, R, P)
            blocks = np.take_along_axis(blocks, perm[:, None], 2)
        return observation, blocks.reshape(n, 3 * K, R, P), sizes.reshape(n, 3 * K)

    def __call__(self, batch_size: int, rng: np.random.Generator | int | None = None) -> MaskBatch:
        """Draw masks for a batch.

        Args:
            batch_size: the number of samples B (>= 1).
            rng: a numpy Generator, a seed, or None for the masker's own generator (seeded by
                ``seed``).

        Returns:
            The batch's masks.

        Raises:
            ConfigError: ``batch_size`` < 1, or ``min_context`` could not be met in 100 draws.
        """
        if int(batch_size) < 1:
            raise ConfigError(f"SpatiotemporalMasker: batch_size={batch_size} must be >= 1")
        if rng is None:
            rng = self.rng_
        elif not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        B, R, P = int(batch_size), self.n_rois, self.n_patches
        observation, blocks, block_sizes = self._draw(B, rng)
        context = (observation & ~blocks.any(1)).reshape(B, R * P)
        n_context = np.count_nonzero(context, axis=1)
        for _ in range(_MAX_REDRAWS):
            short = np.flatnonzero(n_context < self.min_context)
            if short.size == 0:
                break
            observation[short], blocks[short], block_sizes[short] = self._draw(short.size, rng)
            context[short] = (observation[short] & ~blocks[short].any(1)).reshape(short.size, R * P)
            n_context[short] = np.count_nonzero(context[short], axis=1)
        if (n_context < self.min_context).any():
            raise ConfigError(
                f"SpatiotemporalMasker: could not leave min_context={self.min_context} context tokens in "
                f"{_MAX_REDRAWS} draws on a {R} x {P} grid with n_blocks={self.n_blocks}; lower min_context, "
                "n_blocks or the target scales"
            )
        context_idx, context_valid = _pack(context, n_context)
        target_idx, target_valid = _pack(blocks.reshape(-1, R * P), block_sizes.reshape(-1))
        shape = (B, 3 * self.n_blocks, -1)
        return MaskBatch(
            context_idx=torch.from_numpy(context_idx),
            context_valid=torch.from_numpy(context_valid),
            target_idx=torch.from_numpy(target_idx.reshape(shape)),
            target_valid=torch.from_numpy(target_valid.reshape(shape)),
            regions=self.regions,
            observation=torch.from_numpy(observation),
        )

    def _collate_rng(self) -> np.random.Generator:
        # Each DataLoader worker holds a copy of this masker whose generator is in the same state as
        # every other copy. A worker therefore reseeds its copy on first use from (seed, worker
        # seed); torch draws the worker seed (base_seed + worker_id) from its own generator for
        # every new iterator, so workers differ from each other and from epoch to epoch, and
        # torch.manual_seed(...) makes the whole stream reproducible.
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.rng_
        if self.worker_seed_ != info.seed:
            entropy = [info.seed] if self.seed is None else [int(self.seed), info.seed]
            self.rng_ = np.random.default_rng(entropy)
            self.worker_seed_ = info.seed
        return self.rng_

    def collate(self, samples: list) -> tuple[torch.Tensor, MaskBatch]:
        """DataLoader ``collate_fn``: stack the samples and draw their masks.

        The masks come from the masker's generator, reseeded once per DataLoader worker (see the
        module docstring).

        Args:
            samples: B samples, each R x T or a dict with key ``"x"``.

        Returns:
            ``(x, masks)``: the B x R x T stacked tensor and a :class:`MaskBatch` for it.

        Raises:
            DataError: the samples do not stack to (B, R, T) with the masker's R.
        """
        xs = [s["x"] if isinstance(s, dict) else s for s in samples]
        x = torch.stack([torch.as_tensor(v) for v in xs])
        if x.ndim != 3 or x.shape[1] != self.n_rois:
            raise DataError(
                f"SpatiotemporalMasker.collate: samples stack to shape {tuple(x.shape)}, expected "
                f"(batch, {self.n_rois} ROIs, time); check that the dataset yields R x T arrays with "
                f"R = {self.n_rois} (transpose T x R files when reading them)"
            )
        return x, self(len(xs), self._collate_rng())
