"""oneDNN's fused linear for inference on a CPU (brainjepa.fused): values, dtypes, when it is taken."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from brainjepa import fused
from brainjepa.model import BrainEncoder, ModelConfig

needs_fused = pytest.mark.skipif(not fused.fused_available(), reason="PyTorch without oneDNN's fused linear")


@pytest.fixture
def counted(monkeypatch):
    """The fused op wrapped to count its calls (the check is done first, with the real op)."""
    fused.reset()
    assert fused.fused_available()
    calls = []
    op = fused._state["op"]
    monkeypatch.setitem(fused._state, "op", lambda *a: calls.append(1) or op(*a))
    yield calls
    monkeypatch.undo()
    fused.reset()


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 50, 40, generator=g)[:, ::2]  # a strided input
    w, b = torch.randn(24, 40, generator=g) * 0.2, torch.randn(24, generator=g)
    return x.to(dtype), w.to(dtype), b.to(dtype)


@needs_fused
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_linear_matches_f_linear(counted, dtype, tol, gelu, with_bias):
    x, w, b = _inputs(dtype)
    b = b if with_bias else None
    with torch.no_grad():
        got = fused.linear(x, w, b, gelu=gelu)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    ref = F.gelu(ref) if gelu else ref
    assert counted == [1] and got.dtype == dtype and got.shape == (3, 25, 24)
    assert float((got.double() - ref).abs().max() / ref.abs().max()) < tol


@needs_fused
def test_under_autocast_it_computes_in_autocast_dtype(counted):
    x, w, b = _inputs(torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused.linear(x, w, b, gelu=True)
        ref = F.gelu(F.linear(x, w, b))
    assert counted == [1] and got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


@needs_fused
def test_a_first_call_under_autocast_still_takes_the_fused_op():
    """The check compares with F.linear in fp32 and bf16 whatever context the first call comes from."""
    fused.reset()
    x, w, b = _inputs(torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused.linear(x, w, b)
    assert fused._state["op"] is not None
    fused.reset()


@needs_fused
def test_gradients_take_f_linear(counted):
    x, w, b = _inputs(torch.float32)
    w.requires_grad_()
    y = fused.linear(x, w, b, gelu=True)
    y.sum().backward()
    assert counted == [] and w.grad is not None
    with torch.no_grad():  # the same values without autograd, through the fused op
        torch.testing.assert_close(fused.linear(x, w, b, gelu=True), y.detach(), rtol=1e-5, atol=1e-5)
    assert counted == [1]


def test_turned_off_with_the_compiled_softmax(monkeypatch):
    fused.reset()
    monkeypatch.setenv("BRAINJEPA_NATIVE", "0")
    x, w, b = _inputs(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fused.linear(x, w, b), F.linear(x, w, b))
    assert not fused.fused_available()
    monkeypatch.undo()
    fused.reset()


@needs_fused
def test_encoder_without_autograd_gives_the_training_numbers(counted):
    cfg = ModelConfig(n_rois=12, n_timepoints=32, patch_size=8, n_gradients=3, embed_dim=48, depth=2, num_heads=3)
    torch.manual_seed(0)
    enc = BrainEncoder(cfg, torch.randn(12, 3)).eval()
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        fast = enc(x)
    assert len(counted) == 2 * 4  # qkv, proj, fc1 (+GELU), fc2 in each block
    torch.testing.assert_close(fast, enc(x).detach(), rtol=1e-5, atol=1e-5)
