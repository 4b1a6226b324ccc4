"""The chunked CPU attention kernel against PyTorch's SDPA (values, gradients, padding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import brainjepa.attention as A
from brainjepa.attention import attention, set_attention_backend


@pytest.fixture
def backend():
    """Restore the backend after the test; small tiles so that every call walks several blocks."""
    previous, tile = A.get_attention_backend(), A.TILE_BYTES
    A.TILE_BYTES = 64 * 40 * 8  # 64-query blocks at 40 keys in float64
    yield set_attention_backend
    set_attention_backend(previous)
    A.TILE_BYTES = tile


def _inputs(dtype, B=2, H=3, Nq=150, Nk=150, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, Nk, d, generator=g, dtype=torch.float64) for _ in range(2))
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _run(q, k, v, key_mask=None):
    out = attention(q, k, v, key_mask)
    (out.double() * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize(
    "Nq,Nk,masked", [(150, 150, None), (150, 150, "end"), (37, 150, "end"), (150, 150, "anywhere")]
)
def test_chunked_matches_sdpa_in_float64(backend, Nq, Nk, masked):
    q, k, v = _inputs(torch.float64, Nq=Nq, Nk=Nk)
    key_mask = None
    if masked:
        key_mask = torch.ones(2, Nk, dtype=torch.bool)
        key_mask[0, -60:] = False  # sample 0: the last 60 keys are padding
        if masked == "anywhere":  # not only at the end: the additive-bias path
            key_mask[1, 10:20] = False
            key_mask = key_mask.roll(5, dims=1)
            key_mask[0, -60:] = False
    backend("sdpa")
    ref, ref_grads = _run(q, k, v, key_mask)
    backend("chunked")
    out, grads = _run(q, k, v, key_mask)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)
    if masked:  # padded keys receive no gradient and do not change the output
        assert grads[1][0, :, -60:].abs().max() == 0 and grads[2][0, :, -60:].abs().max() == 0


def test_chunked_passes_gradcheck(backend):
    backend("chunked")
    q, k, v = _inputs(torch.float64, B=1, H=2, Nq=70, Nk=90, d=4)
    mask = torch.ones(1, 90, dtype=torch.bool)
    mask[0, :7] = False
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, mask), (q, k, v))


def test_chunked_bf16_is_within_bf16_rounding_of_the_exact_result(backend):
    A.TILE_BYTES = 64 * 300 * 2
    q, k, v = _inputs(torch.bfloat16, Nq=300, Nk=300, d=32)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    backend("sdpa")
    ref, ref_grads = _run(*exact)
    backend("chunked")
    out, grads = _run(q, k, v)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert (out.double() - ref).abs().max() < 8e-3  # |out| <= ~1; bf16 has an 8-bit mantissa
    for g, r in zip(grads, ref_grads):
        assert (g.double() - r).abs().max() / r.abs().max() < 5e-2


def test_auto_backend_picks_chunked_only_for_large_bf16_cpu_work(backend):
    backend("auto")
    big = torch.zeros(1, 1, 300, 8, dtype=torch.bfloat16)
    assert A._use_chunked(big, big)
    assert not A._use_chunked(big.float(), big.float())  # fp32: SDPA's fused kernel is faster
    assert not A._use_chunked(big[:, :, :10], big[:, :, :10])  # too small to pay off
    backend("chunked")
    assert A._use_chunked(big.float(), big.float())
    with pytest.raises(ValueError, match="backend"):
        set_attention_backend("flash")


def test_model_in_bf16_gives_the_same_features_with_either_backend(backend):
    from brainjepa.model import BrainEncoder, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(
        n_rois=40,
        n_timepoints=64,
        n_gradients=5,
        embed_dim=64,
        depth=2,
        num_heads=2,
        predictor_embed_dim=32,
        predictor_depth=1,
        predictor_num_heads=2,
    )
    enc = BrainEncoder(cfg, torch.randn(40, 5)).eval()
    x = torch.randn(2, 40, 64)
    idx = torch.stack([torch.randperm(160)[:150], torch.randperm(160)[:150]])
    valid = torch.ones(2, 150, dtype=torch.bool)
    valid[1, 120:] = False  # sample 1: 30 padding tokens at the end
    feats = {}
    for name in ("sdpa", "chunked"):
        backend(name)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            feats[name] = enc(x, idx, valid).float()[valid]  # real tokens only
    assert (feats["sdpa"] - feats["chunked"]).abs().max() < 0.1  # layer-normed features, |f| ~ 1
    assert F.cosine_similarity(feats["sdpa"], feats["chunked"], dim=-1).min() > 0.999


def test_self_attention_skips_padding_queries_without_changing_real_ones(backend):
    q, k, v = _inputs(torch.float64, Nq=150, Nk=150)
    key_mask = torch.ones(2, 150, dtype=torch.bool)
    key_mask[0, -60:] = False
    rows = key_mask[:, None, :, None]  # (B, 1, N, 1): real query rows
    results = {}
    for name in ("sdpa", "chunked"):
        backend(name)
        out = attention(q, k, v, key_mask, self_attention=True)
        (out * rows * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum().backward()
        results[name] = (out.detach(), [t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    (ref, ref_grads), (out, grads) = results["sdpa"], results["chunked"]
    torch.testing.assert_close(out * rows, ref * rows, atol=1e-12, rtol=1e-10)
    assert out[0, :, -60:].abs().max() == 0  # skipped, not computed
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)


def test_log_sum_exp_output_merges_partial_attentions_exactly(backend):
    """Attention over keys A and B from two partial attentions with their log-sum-exps: same
    values and gradients as one attention over A + B (SDPA), in float64; an empty key set
    (every key of a sample is padding) contributes nothing and no NaN."""
    q, k, v = _inputs(torch.float64, Nq=90, Nk=150)
    split = 100
    mask_b = torch.ones(2, 150 - split, dtype=torch.bool)
    mask_b[1] = False  # sample 1 has no B keys at all
    weights = torch.linspace(-1, 1, 16, dtype=torch.float64)
    backend("sdpa")
    ref = attention(q, k, v, torch.cat([torch.ones(2, split, dtype=torch.bool), mask_b], 1))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    backend("auto")  # return_lse always runs the chunked kernel
    out_a, lse_a = attention(q, k[:, :, :split], v[:, :, :split], return_lse=True)
    out_b, lse_b = attention(q, k[:, :, split:], v[:, :, split:], mask_b, return_lse=True)
    assert lse_a.shape == (2, 3, 90) and lse_a.dtype == torch.float64
    scores = q @ k[:, :, :split].transpose(-2, -1) / 4.0
    torch.testing.assert_close(lse_a, torch.logsumexp(scores, -1), atol=1e-12, rtol=1e-12)
    assert torch.isinf(lse_b[1]).all() and (out_b[1] == 0).all()
    out = A.merge_attention(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)


def test_log_sum_exp_output_passes_gradcheck(backend):
    q, k, v = _inputs(torch.float64, B=1, H=2, Nq=70, Nk=90, d=4)
    mask = torch.ones(1, 90, dtype=torch.bool)
    mask[0, -7:] = False
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, mask, return_lse=True), (q, k, v))
