"""Linear layers without autograd on a CPU: one oneDNN call with the bias and GELU fused.

``F.linear`` on a CPU runs as ``addmm``: it first writes the bias into every row of the output,
then the matrix product adds to it, and a GELU after it is one more pass over the (4 x wider)
hidden activations. oneDNN, which runs PyTorch's CPU matrix products, can add the bias and
apply the GELU while each output tile is still in registers; PyTorch exposes that as
``torch.ops.mkldnn._linear_pointwise`` (the op its compiler fuses linear layers into). Measured
on the machine this project is developed on (1 thread, 9,000 tokens, widths of the small
model): fc1 + GELU 68 -> 58 ms in bf16 and 169 -> 133 ms in fp32, the other projections 2-20%
faster; ``benchmarks/RESULTS.md`` has the numbers.

:func:`linear` is what the networks call. It takes the fused op only where nothing needs
gradients (the target encoder, embedding), on a CPU, in fp32 or bf16 (autocast's dtype when
autocast is on, as ``F.linear`` would use), and only after the op has been checked once against
``F.linear`` on this machine. Everywhere else, and where the op is missing (PyTorch built without
oneDNN) or disagrees, it is ``F.linear`` (and ``F.gelu``): the same numbers up to the rounding of
the hidden activations, which the fused op rounds once, after the GELU, instead of twice.
``BRAINJEPA_NATIVE=0`` turns it off with the compiled softmax.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .native import enabled

logger = logging.getLogger(__name__)

__all__ = ["linear", "fused_available", "reset"]

_state: dict = {"op": None, "checked": False}


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """Autocast's dtype on ``device_type`` when autocast is on there, else None."""
    try:
        on = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if on else None
    except TypeError:  # PyTorch < 2.4: the CPU-only functions
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def _check(op) -> str:
    """'' when ``op`` gives F.linear's numbers (with and without GELU, bias, in fp32 and bf16), else why not."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 24, generator=g)
    w = torch.randn(40, 24, generator=g) * 0.2
    b = torch.randn(40, generator=g)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
        for bias in (bd, None):
            for gelu in (False, True):
                ref = F.linear(xd.float(), wd.float(), None if bias is None else bias.float())
                ref = F.gelu(ref) if gelu else ref
                got = op(xd, wd, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
                if got.shape != ref.shape or got.dtype != dtype:
                    return f"shape/dtype {tuple(got.shape)} {got.dtype} instead of {tuple(ref.shape)} {dtype}"
                err = float((got.float() - ref).abs().max() / ref.abs().max())
                if not err <= tol:
                    return f"relative error {err:.2g} in {dtype} (gelu={gelu}, bias={bias is not None})"
    return ""


def _op():
    """oneDNN's fused linear, checked once; None where missing, off or wrong."""
    if not _state["checked"]:
        _state["checked"] = True
        if not enabled() or not torch.backends.mkldnn.is_available():
            return None
        try:
            op = torch.ops.mkldnn._linear_pointwise
            with torch.autocast("cpu", enabled=False):  # the first call may come under autocast
                problem = _check(op)
        except (AttributeError, RuntimeError) as exc:  # not in this PyTorch build
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            logger.info("oneDNN's fused linear is not used (%s): F.linear instead", problem)
        else:
            _state["op"] = op
    return _state["op"]


def fused_available() -> bool:
    """Whether :func:`linear` can take oneDNN's fused op on this machine (checked at first call).

    Returns:
        True when the op exists, agrees with ``F.linear`` and is not turned off.
    """
    return _op() is not None


def reset() -> None:
    """Forget the check, so that the next call checks again (tests, a changed ``BRAINJEPA_NATIVE``)."""
    _state.update(op=None, checked=False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False):
    """``F.linear(x, weight, bias)``, then ``F.gelu`` with ``gelu``; fused where that is safe (see the module).

    Args:
        x: (..., in) input.
        weight: (out, in).
        bias: (out,) or None.
        gelu: apply the (exact, erf) GELU to the result.

    Returns:
        (..., out), in the dtype F.linear would give (autocast's, when it is on).
    """
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if x.device.type == "cpu" and not needs_grad and _op() is not None:
        dtype = _autocast_dtype("cpu") or x.dtype
        if dtype in (torch.float32, torch.bfloat16) and weight.dtype in (torch.float32, torch.bfloat16):
            b = None if bias is None else bias.to(dtype)
            attr, algorithm = ("gelu", "none") if gelu else ("none", "")
            return _state["op"](x.to(dtype), weight.to(dtype), b, attr, [], algorithm)
    out = F.linear(x, weight, bias)
    if gelu:
        return F.gelu(out) if torch.is_grad_enabled() else torch.ops.aten.gelu_(out)
    return out
