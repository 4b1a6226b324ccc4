"""The training step's shortcuts (brainjepa.fast) give the reference model's numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cfg

from brainjepa import fast
from brainjepa.fast import FastEncoder, FastPredictor
from brainjepa.model import MLP, BrainEncoder, BrainPredictor

pytestmark = pytest.mark.usefixtures("one_thread")


def pair(reference_cls, fast_cls, cfg):
    """A reference network and its fast twin holding the same weights, in float64."""
    torch.manual_seed(0)
    g = torch.randn(cfg.n_rois, cfg.n_gradients)
    ref = reference_cls(cfg, g).double()
    twin = fast_cls(cfg, g).double()
    twin.load_state_dict(ref.state_dict())
    return ref, twin


def test_fast_encoder_output_idx_equals_the_reference_outputs_at_those_tokens():
    ref, twin = pair(BrainEncoder, FastEncoder, tiny_cfg())
    x = torch.randn(2, 6, 64, dtype=torch.float64)
    out = torch.tensor([[3, 0, 17, 3], [23, 5, 6, 1]])  # any order, repeats allowed
    rows = torch.arange(2)[:, None]
    with torch.no_grad():
        torch.testing.assert_close(twin(x), ref(x), atol=1e-12, rtol=0)
        torch.testing.assert_close(twin(x, output_idx=out), ref(x)[rows, out], atol=1e-12, rtol=0)
        torch.testing.assert_close(ref(x, output_idx=out), ref(x)[rows, out], atol=0, rtol=0)
        # with a padded token selection: positions refer to the selected sequence
        idx = torch.tensor([[0, 4, 9, 0, 0], [1, 2, 3, 7, 8]])
        valid = torch.tensor([[True, True, True, False, False], [True] * 5])
        pos = torch.tensor([[2, 0], [4, 1]])
        torch.testing.assert_close(
            twin(x, idx, valid, output_idx=pos), ref(x, idx, valid)[rows, pos], atol=1e-12, rtol=0
        )


def test_fast_encoder_gradients_equal_the_reference():
    ref, twin = pair(BrainEncoder, FastEncoder, tiny_cfg())
    x = torch.randn(2, 6, 64, dtype=torch.float64)
    idx = torch.tensor([[0, 4, 9, 0, 0], [1, 2, 3, 7, 8]])
    valid = torch.tensor([[True, True, True, False, False], [True] * 5])
    weights = torch.randn(2, 5, 32, dtype=torch.float64) * valid[..., None]
    grads = []
    for net in (ref, twin):
        out = net(x, idx, valid)
        grads.append(torch.autograd.grad((out * weights).sum(), list(net.parameters())))
    for name, a, b in zip([n for n, _ in ref.named_parameters()], *grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("shared", [False, True])
def test_fast_predictor_equals_the_reference_in_values_and_gradients(depth, shared):
    """Padding last, query pruning and (optionally) the shared context state give the reference
    predictions and gradients (float64), with padding in the context and the targets and a
    sample without any target token."""
    ref, twin = pair(BrainPredictor, FastPredictor, tiny_cfg(predictor_depth=depth))
    z = torch.randn(2, 5, 32, dtype=torch.float64)
    ctx = torch.tensor([[0, 3, 4, 7, 0], [1, 2, 5, 6, 8]])
    ctx_valid = torch.tensor([[True, True, True, True, False], [True] * 5])
    tidx = torch.tensor([[10, 11, 12, 0], [0, 0, 0, 0]])
    tvalid = torch.tensor([[True, True, True, False], [False] * 4])  # sample 1: no targets
    weights = torch.randn(2, 4, 32, dtype=torch.float64) * tvalid[..., None]

    def run(net, use_state):
        zz = z.clone().requires_grad_()
        extra = {"shared": net.context_state(zz, ctx, ctx_valid)} if use_state else {}
        out = net(zz, ctx, tidx, ctx_valid, tvalid, **extra)
        grads = torch.autograd.grad((out * weights).sum(), [zz, *net.parameters()], allow_unused=True)
        return out[tvalid].detach(), grads

    want, want_grads = run(ref, False)
    got, got_grads = run(twin, shared)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    for name, g, r in zip(["z"] + [n for n, _ in ref.named_parameters()], got_grads, want_grads):
        if r is None or g is None:
            assert (r is None or r.abs().max() == 0) and (g is None or g.abs().max() == 0), name
        else:
            torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_mlp_recomputing_gelu_has_the_plain_gradients(dtype):
    torch.manual_seed(0)
    mlp = MLP(8, 32).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for recompute in (True, False):
        for p in [x, *mlp.parameters()]:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = fast.mlp(mlp, x) if recompute else mlp.fc2(F.gelu(mlp.fc1(x)))
        (out.double() * torch.linspace(-1, 1, 8, dtype=torch.float64)).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()])
        assert all(p.grad.dtype == torch.float64 for p in mlp.parameters())
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=tol * b.abs().max().item(), rtol=0)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x: fast.mlp(mlp, x), (x[:1, :2],))
