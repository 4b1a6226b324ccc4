from __future__ import annotations

import numpy as np
import pytest
import torch

from brainjepa.errors import ConfigError, DataError
from brainjepa.masking import MaskBatch, SpatiotemporalMasker

GRIDS = [(450, 10), (20, 10), (4, 2), (100, 5), (7, 3)]


def count_range(scale, size, most):
    """The count range a fraction range maps to: round(f * size) clipped to [1, most]."""
    return tuple(int(np.clip(np.rint(f * size), 1, most)) for f in scale)


def check_batch(masker: SpatiotemporalMasker, mb: MaskBatch) -> None:
    """Every guarantee of the module docstring, checked sample by sample with plain sets."""
    R, P, K = masker.n_rois, masker.n_patches, masker.n_blocks
    B = mb.context_idx.shape[0]
    assert mb.regions == ("alpha",) * K + ("beta",) * K + ("gamma",) * K
    assert mb.context_idx.dtype == torch.int64 and mb.target_idx.dtype == torch.int64
    assert mb.context_valid.dtype == torch.bool and mb.target_valid.dtype == torch.bool
    assert mb.target_idx.shape[:2] == (B, 3 * K) and mb.observation.shape == (B, R, P)
    # rows are padded to the longest one (not cut to the shortest) and the valid mask is a prefix
    for idx, valid in ((mb.context_idx, mb.context_valid), (mb.target_idx, mb.target_valid)):
        n = valid.sum(-1, keepdim=True)
        assert torch.equal(valid, torch.arange(valid.shape[-1]) < n)
        assert valid.shape[-1] == max(int(n.max()), 1)
        assert (idx[~valid] == 0).all()
        assert ((idx >= 0) & (idx < R * P)).all()

    for b in range(B):
        obs = mb.observation[b].numpy()
        rows = set(np.flatnonzero(obs.any(1)).tolist())
        W = np.flatnonzero(obs.any(0))
        s, w = int(W[0]), W.size
        assert np.array_equal(W, np.arange(s, s + w)), "window is contiguous"
        assert obs.sum() == len(rows) * w, "observation block is a full ROI set x window"
        assert 1 <= len(rows) <= R - 1 and 1 <= w <= P - 1
        assert (len(rows), w) >= (
            count_range(masker.obs_roi_scale, R, R - 1)[0],
            count_range(masker.obs_time_scale, P, P - 1)[0],
        )
        Wset = set(W.tolist())
        obs_tokens = {r * P + t for r in rows for t in Wset}

        all_targets = set()
        for k, region in enumerate(mb.regions):
            tok = mb.target_idx[b, k][mb.target_valid[b, k]].numpy()
            assert tok.size > 0, "every block has tokens"
            assert (np.diff(tok) > 0).all(), "sorted, no duplicates"
            rois, ts = set((tok // P).tolist()), sorted(set((tok % P).tolist()))
            assert ts == list(range(ts[0], ts[-1] + 1)), "patch span is contiguous"
            assert tok.size == len(rois) * len(ts), "block is a full ROI set x span, nothing cut"
            left, right = s, P - s - w
            if region == "alpha":
                assert set(ts) <= Wset
                assert rois - rows, "holds a cross-ROI token"
                roi_most, time_most = R, w
            elif region == "beta":
                assert rois <= rows
                assert set(ts) - Wset, "holds a cross-time token"
                roi_most, time_most = len(rows), P
            else:
                assert not rois & rows and not set(ts) & Wset
                roi_most, time_most = R - len(rows), max(left, right)
            lo, hi = count_range(getattr(masker, f"{region}_roi_scale"), R, roi_most)
            assert lo <= len(rois) <= hi
            lo, hi = count_range(getattr(masker, f"{region}_time_scale"), P, time_most)
            assert lo <= len(ts) <= hi
            all_targets |= set(tok.tolist())

        ctx = mb.context_idx[b][mb.context_valid[b]].numpy()
        assert (np.diff(ctx) > 0).all()
        assert set(ctx.tolist()) == obs_tokens - all_targets, "context = observation minus targets"
        assert ctx.size >= masker.min_context


@pytest.mark.parametrize("n_rois,n_patches", GRIDS)
@pytest.mark.parametrize("n_blocks", [1, 2])
def test_guarantees_hold_for_many_seeds(n_rois, n_patches, n_blocks):
    masker = SpatiotemporalMasker(n_rois, n_patches, n_blocks=n_blocks)
    for seed in range(6 if n_rois == 450 else 25):
        check_batch(masker, masker(8, rng=seed))


def test_guarantees_hold_with_extreme_scales():
    # full-width target scales and a small observation block stress the clipping to the pools
    masker = SpatiotemporalMasker(
        12,
        6,
        n_blocks=2,
        obs_roi_scale=(0.1, 1.0),
        obs_time_scale=(0.1, 1.0),
        alpha_roi_scale=(0.0, 1.0),
        alpha_time_scale=(0.0, 1.0),
        beta_roi_scale=(0.0, 1.0),
        beta_time_scale=(0.0, 1.0),
        gamma_roi_scale=(0.0, 1.0),
        gamma_time_scale=(0.0, 1.0),
        min_context=0,
    )
    for seed in range(40):
        check_batch(masker, masker(8, rng=seed))


def test_seeded_determinism():
    masker = SpatiotemporalMasker(100, 5)
    a, b, c = masker(6, rng=3), masker(6, rng=np.random.default_rng(3)), masker(6, rng=4)
    for name in ("context_idx", "context_valid", "target_idx", "target_valid", "observation"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.observation, c.observation)
    # the masker's own generator: same seed, same stream; the stream moves on between calls
    m1, m2 = SpatiotemporalMasker(100, 5, seed=7), SpatiotemporalMasker(100, 5, seed=7)
    first = m1(4)
    assert torch.equal(first.observation, m2(4).observation)
    assert not torch.equal(first.observation, m1(4).observation)


def test_rows_are_ragged_and_no_target_is_dropped():
    # The authors' collator cut every row to the batch's shortest; ours pads to the longest.
    masker = SpatiotemporalMasker(450, 10)
    mb = masker(16, rng=0)
    for k in range(3):
        sizes = mb.target_valid[:, k].sum(1)
        assert sizes.unique().numel() > 1
    total = sum(int(mb.target_valid[b, k].sum()) for b in range(16) for k in range(3))
    assert int(mb.target_valid.sum()) == total
    assert mb.target_valid.shape[-1] == int(mb.target_valid.sum(-1).max())


def test_target_rois_are_unbiased():
    R, P = 450, 10
    masker = SpatiotemporalMasker(R, P)
    mb = masker(800, rng=11)
    for k, region in enumerate(mb.regions):
        rois = (mb.target_idx[:, k][mb.target_valid[:, k]] // P).numpy()
        # per-sample ROI sets are uniform: sd of the mean is < 1 ROI, tolerance 2% of (R-1)/2 = 4.5
        assert abs(rois.mean() - (R - 1) / 2) < 0.02 * (R - 1) / 2, region
        hist = np.bincount(rois * 10 // R, minlength=10) / rois.size
        assert np.abs(hist - 0.1).max() < 0.015, (region, hist)
    ctx_rois = (mb.context_idx[mb.context_valid] // P).numpy()
    assert abs(ctx_rois.mean() - (R - 1) / 2) < 0.02 * (R - 1) / 2


def test_first_and_last_patch_are_visible_in_many_draws():
    P = 10
    masker = SpatiotemporalMasker(450, P)
    mb = masker(800, rng=5)
    patches = torch.zeros(800, P, dtype=torch.int64)
    patches.scatter_add_(1, mb.context_idx % P, mb.context_valid.long())  # padding adds 0
    patches = patches > 0
    # windows of 8-9 patches start anywhere they fit: about half of the draws show patch 9
    assert 0.35 < patches[:, P - 1].float().mean() < 0.65
    assert 0.35 < patches[:, 0].float().mean() < 0.65


def test_min_context_redraws_and_fails_clearly():
    # On 4 x 2 with four alpha blocks the context is often emptied; min_context=1 redraws those.
    free = SpatiotemporalMasker(4, 2, n_blocks=4, min_context=0)
    assert (free(64, rng=0).context_valid.sum(1) == 0).any()
    kept = SpatiotemporalMasker(4, 2, n_blocks=4, min_context=1)
    mb = kept(64, rng=0)
    assert (mb.context_valid.sum(1) >= 1).all()
    check_batch(kept, mb)
    # every alpha block takes one of the 3 observed tokens, so 3 context tokens is impossible
    with pytest.raises(ConfigError, match="min_context=3"):
        SpatiotemporalMasker(4, 2, n_blocks=4, min_context=3)(4, rng=0)


def test_counts_match_the_grids():
    R, P = 30, 6
    masker = SpatiotemporalMasker(R, P, n_blocks=2)
    mb = masker(10, rng=2)
    c = mb.counts()
    grids = np.zeros((10, 6, R * P), dtype=bool)
    for b in range(10):
        for k in range(6):
            grids[b, k, mb.target_idx[b, k][mb.target_valid[b, k]].numpy()] = True
    expect = {
        "context": mb.context_valid.sum(1).float().mean().item(),
        "alpha": grids[:, :2].any(1).sum(1).mean(),
        "beta": grids[:, 2:4].any(1).sum(1).mean(),
        "gamma": grids[:, 4:].any(1).sum(1).mean(),
        "target": grids.any(1).sum(1).mean(),
    }
    for key, value in expect.items():
        assert c[key] == pytest.approx(value)
        assert c[f"{key}_fraction"] == pytest.approx(value / (R * P))


def test_counts_do_not_lose_token_zero_to_padding():
    # block 0 holds token 0; block 1's padding also points at token 0 and must not erase it
    mb = MaskBatch(
        context_idx=torch.tensor([[2]]),
        context_valid=torch.tensor([[True]]),
        target_idx=torch.tensor([[[0, 1], [3, 0], [3, 0]]]),
        target_valid=torch.tensor([[[True, True], [True, False], [True, False]]]),
        regions=("alpha", "beta", "gamma"),
        observation=torch.ones(1, 2, 2, dtype=torch.bool),
    )
    c = mb.counts()
    assert (c["context"], c["alpha"], c["beta"], c["gamma"], c["target"]) == (1, 2, 1, 1, 3)
    assert c["target_fraction"] == 0.75


def test_to_moves_every_tensor():
    mb = SpatiotemporalMasker(20, 4)(3, rng=0)
    moved = mb.to("meta")
    for name in ("context_idx", "context_valid", "target_idx", "target_valid", "observation"):
        t = getattr(moved, name)
        assert t.device.type == "meta" and t.dtype == getattr(mb, name).dtype
    assert moved.regions == mb.regions and moved.n_blocks == 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory():
    mb = SpatiotemporalMasker(20, 4)(3, rng=0).pin_memory()
    assert mb.context_idx.is_pinned() and mb.target_valid.is_pinned() and mb.observation.is_pinned()


def test_collate_stacks_tensors_arrays_and_dicts():
    masker = SpatiotemporalMasker(6, 4, seed=0)
    xs = [torch.randn(6, 64) for _ in range(3)]
    x, mb = masker.collate(xs)
    assert x.shape == (3, 6, 64) and torch.equal(x[1], xs[1])
    assert mb.context_idx.shape[0] == 3 and mb.target_idx.shape[:2] == (3, 3)
    check_batch(masker, mb)
    x2, mb2 = masker.collate([{"x": v.numpy(), "y": 1} for v in xs])
    assert torch.equal(x2, x)
    assert not torch.equal(mb.observation, mb2.observation), "the generator moves on"
    # a fresh masker with the same seed repeats the first batch
    assert torch.equal(SpatiotemporalMasker(6, 4, seed=0).collate(xs)[1].observation, mb.observation)
    with pytest.raises(DataError, match="6 ROIs"):
        masker.collate([torch.randn(5, 64)])


class _Toy(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.full((8, 32), float(i))


def _worker_masks(seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    masker = SpatiotemporalMasker(8, 2, seed=1)
    loader = torch.utils.data.DataLoader(_Toy(), batch_size=4, num_workers=2, collate_fn=masker.collate)
    return [mb.observation for _, mb in loader]


def test_collate_in_workers_differs_per_worker_and_is_reproducible():
    run1, run2 = _worker_masks(0), _worker_masks(0)
    assert all(torch.equal(a, b) for a, b in zip(run1, run2))
    # batches 0 and 1 come from different workers, whose generators were reseeded differently
    assert not torch.equal(run1[0], run1[1])
    assert not all(torch.equal(a, b) for a, b in zip(run1, _worker_masks(1)))


def test_describe_and_repr_round_trip():
    masker = SpatiotemporalMasker(50, 5, n_blocks=2, beta_time_scale=(0.1, 0.3), seed=4)
    d = masker.describe()
    assert d["n_rois"] == 50 and d["n_blocks"] == 2 and d["beta_time_scale"] == (0.1, 0.3) and d["seed"] == 4
    again = eval(repr(masker), {"SpatiotemporalMasker": SpatiotemporalMasker})
    assert again.describe() == d


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_rois=1, n_patches=10), "n_rois=1"),
        (dict(n_rois=10, n_patches=1), "n_patches=1"),
        (dict(n_rois=10, n_patches=4, n_blocks=0), "n_blocks=0"),
        (dict(n_rois=10, n_patches=4, alpha_roi_scale=(0.6, 0.4)), "alpha_roi_scale"),
        (dict(n_rois=10, n_patches=4, obs_time_scale=(0.0, 0.5)), "obs_time_scale"),
        (dict(n_rois=10, n_patches=4, gamma_time_scale=0.3), "gamma_time_scale"),
        (dict(n_rois=10, n_patches=4, min_context=28), "min_context=28"),
    ],
)
def test_bad_settings_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SpatiotemporalMasker(**kwargs)


def test_bad_batch_size():
    with pytest.raises(ConfigError, match="batch_size=0"):
        SpatiotemporalMasker(10, 4)(0)


def test_block_cuts_padding_only():
    mb = SpatiotemporalMasker(450, 10)(8, rng=1)
    for k in range(mb.n_blocks):
        idx, valid = mb.block(k)
        n = mb.target_valid[:, k].sum(1)
        assert valid.shape == (8, int(n.max())) and torch.equal(valid.sum(1), n)
        assert torch.equal(idx[valid], mb.target_idx[:, k][mb.target_valid[:, k]])
    assert mb.block(2)[0].shape[1] < mb.target_idx.shape[2]  # gamma blocks are far shorter than alpha
