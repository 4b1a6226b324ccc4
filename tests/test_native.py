"""The compiled bf16 softmax (brainjepa.native): values, masking, threads, fallback, build cache."""

from __future__ import annotations

import logging

import pytest
import torch

import brainjepa.attention as A
from brainjepa import native
from brainjepa.attention import attention, set_attention_backend

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh(monkeypatch):
    """A kernel state of its own: loaded anew in the test, restored afterwards."""
    native.reset()
    yield monkeypatch
    monkeypatch.undo()
    native.reset()


def _scores(rows, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, n, generator=g) * 5).to(torch.bfloat16)


@needs_compiler
@pytest.mark.parametrize(
    "rows,n", [(1, 1), (3, 15), (17, 16), (5, 48), (40, 63), (40, 64), (6, 95), (9, 1000), (70, 4500)]
)
def test_compiled_softmax_matches_pytorch(fresh, rows, n):
    x = _scores(rows, n)
    if n > 2:
        x[0, 1::2] = float("-inf")  # masked keys
    if rows > 2:
        x[2] = float("-inf")  # a query without any key
    y, lse = torch.empty_like(x), torch.full((rows,), 123.0)
    assert native.softmax_bf16(x, y, lse)
    ref = torch.softmax(x.float(), -1).nan_to_num(0.0)
    # one bf16 rounding of the exact probability, as PyTorch's softmax
    torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=1e-7)
    assert (y[0, 1::2] == 0).all() if n > 2 else True
    if rows > 2:
        assert (y[2] == 0).all() and lse[2] == float("-inf")
    torch.testing.assert_close(lse, torch.logsumexp(x.float(), -1), rtol=1e-6, atol=1e-5)
    assert (y.float().sum(-1)[lse > -1e30] - 1).abs().max() < 1e-2


@needs_compiler
def test_compiled_softmax_on_strided_rows_in_place_and_on_threads(fresh):
    big = _scores(64, 300, seed=1)
    view = big[:, 20:250]  # row stride 300, 230 columns
    expected = torch.softmax(view.float(), -1).to(torch.bfloat16)
    one_thread, lse1 = torch.empty(64, 230, dtype=torch.bfloat16), torch.empty(64)
    torch.set_num_threads(1)
    try:
        assert native.softmax_bf16(view, one_thread, lse1)
    finally:
        torch.set_num_threads(2)
    assert native.softmax_bf16(view, view, None)  # in place, 2 threads (rows split between them)
    assert torch.equal(view, one_thread)  # the split changes no bit
    assert (view.float() - expected.float()).abs().max() <= 2**-8
    assert (big[:, :20] == _scores(64, 300, seed=1)[:, :20]).all()  # nothing outside the view is written


def test_unsupported_tensors_are_left_to_pytorch(fresh):
    x = _scores(4, 32)
    assert not native.softmax_bf16(x.float(), x.float())  # fp32
    assert not native.softmax_bf16(x.t(), torch.empty(32, 4, dtype=torch.bfloat16))  # strided columns
    assert not native.softmax_bf16(x, torch.empty_like(x), torch.empty(4, dtype=torch.float64))


def test_without_a_compiler_attention_falls_back_and_says_why(fresh, caplog, tmp_path):
    fresh.setenv("CC", str(tmp_path / "no-such-cc"))
    fresh.setenv("BRAINJEPA_CACHE_DIR", str(tmp_path / "cache"))
    x = _scores(8, 100)
    with caplog.at_level(logging.WARNING, logger="brainjepa.native"):
        assert not native.softmax_bf16(x, torch.empty_like(x))
    assert "PyTorch's softmax" in caplog.text and "no-such-cc" in native.unavailable_reason()
    fresh.setenv("BRAINJEPA_NATIVE", "0")
    native.reset()
    assert native.softmax_fn() is None and native.unavailable_reason() == "BRAINJEPA_NATIVE=0"


@needs_compiler
def test_library_is_built_once_and_then_reused(fresh, tmp_path):
    fresh.setenv("BRAINJEPA_CACHE_DIR", str(tmp_path))
    assert native.softmax_fn() is not None
    built = list((tmp_path / "kernels").glob("softmax_bf16-*"))
    assert len(built) == 1
    native.reset()

    def no_compiling(*args):
        raise AssertionError("compiled again")

    fresh.setattr(native, "_compile", no_compiling)
    assert native.softmax_fn() is not None


@needs_compiler
def test_bf16_attention_agrees_with_and_without_the_compiled_softmax(fresh):
    previous, tile = set_attention_backend("chunked"), A.TILE_BYTES
    A.TILE_BYTES = 64 * 200 * 2  # several query blocks
    try:
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(2, 3, 200, 16, generator=g).to(torch.bfloat16) for _ in range(3))
        mask = torch.ones(2, 200, dtype=torch.bool)
        mask[1, 150:] = False
        runs = {}
        for setting in ("1", "0"):
            fresh.setenv("BRAINJEPA_NATIVE", setting)
            native.reset()
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out, lse = attention(*leaves, mask, return_lse=True)
            (out.float() * torch.linspace(-1, 1, 16)).sum().backward()
            runs[setting] = (out.float(), lse, [t.grad.float() for t in leaves])
        assert native.unavailable_reason() == "BRAINJEPA_NATIVE=0"
        (out1, lse1, grads1), (out0, lse0, grads0) = runs["1"], runs["0"]
        assert (out1 - out0).abs().max() < 1.6e-2  # bf16 outputs of size ~1: a rounding or two
        torch.testing.assert_close(lse1, lse0, rtol=1e-3, atol=2e-2)  # lse0 is read off bf16 P
        for a, b in zip(grads1, grads0):
            assert (a - b).abs().max() / b.abs().max() < 3e-2
    finally:
        set_attention_backend(previous)
        A.TILE_BYTES = tile
