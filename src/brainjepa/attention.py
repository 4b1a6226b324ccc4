"""Scaled dot-product attention: PyTorch's SDPA, plus a query-chunked kernel for bf16 on CPU.

``attention(q, k, v, key_mask)`` is what every transformer block calls. On GPUs, and in fp32,
it is ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on
CUDA; on CPU its fused fp32 kernel already runs at the machine's fp32 matmul peak). PyTorch's
fused CPU kernel does not run its matmuls on the bf16 units, though (measured: no faster in bf16
than in fp32). :class:`ChunkedAttention` does: for each head and block of queries it computes
the scores with one bf16 GEMM, the softmax, and a second GEMM, so that only a (block x keys)
score tile exists at a time. The backward pass recomputes each tile (as flash attention does)
instead of storing the N x N weights, so memory stays linear in N. The tiles live in two
workspace buffers reused for every block of a call: allocating a fresh multi-megabyte tile per
block costs more in page faults than the GEMM itself. Key padding at the end of a sequence
(brainjepa's layout) just shortens the keys; other padding patterns use an additive bias.

Measured on the 2-core CPU this project is developed on (bf16, batch 2 x 3 heads x 4,500
tokens x 64): forward 0.09-0.11 s vs 0.20-0.22 s for SDPA, forward + backward 0.31-0.34 s vs
0.50-0.57 s; ``benchmarks/attention.py`` and ``benchmarks/RESULTS.md`` have the table.

Backend choice: ``"auto"`` (default) takes the chunked kernel for bf16/fp16 CPU tensors with
at least :data:`CHUNKED_MIN_PAIRS` query-key pairs, SDPA otherwise; ``"sdpa"`` and ``"chunked"``
force one (for benchmarks and tests). Set it with :func:`set_attention_backend` or the
``BRAINJEPA_ATTENTION`` environment variable.
"""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F

from . import native

__all__ = [
    "attention",
    "merge_attention",
    "padding_mask",
    "cat_valid",
    "uses_chunked_attention",
    "ChunkedAttention",
    "set_attention_backend",
    "get_attention_backend",
]

BACKENDS = ("auto", "sdpa", "chunked")
CHUNKED_MIN_PAIRS = 256 * 256  # below this, one fused SDPA call is cheaper than the loop
TILE_BYTES = 4 * 2**20  # score tile per head and block: large GEMMs, cheap to fault in

_backend = os.environ.get("BRAINJEPA_ATTENTION", "auto")


def set_attention_backend(name: str) -> str:
    """Select the attention backend for every later call.

    Args:
        name: ``"auto"``, ``"sdpa"`` or ``"chunked"`` (see the module docstring).

    Returns:
        The previous choice, to restore it later.

    Raises:
        ValueError: an unknown backend.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, not {name!r}")
    previous, _backend = _backend, name
    return previous


def get_attention_backend() -> str:
    """The attention backend in use.

    Returns:
        ``"auto"``, ``"sdpa"`` or ``"chunked"``: the last :func:`set_attention_backend`, or the
        ``BRAINJEPA_ATTENTION`` environment variable at import (default ``"auto"``).

    Raises:
        ValueError: ``BRAINJEPA_ATTENTION`` names an unknown backend.
    """
    if _backend not in BACKENDS:
        raise ValueError(f"BRAINJEPA_ATTENTION={_backend!r}; choose one of {BACKENDS}")
    return _backend


def uses_chunked_attention(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether large attentions on this device and dtype run on the chunked kernel.

    Args:
        device: the tensors' device.
        dtype: the tensors' dtype.

    Returns:
        True for a forced ``"chunked"`` backend, or under ``"auto"`` for bf16/fp16 on the CPU
        (attentions below :data:`CHUNKED_MIN_PAIRS` query-key pairs still use SDPA then).
    """
    backend = get_attention_backend()
    if backend != "auto":
        return backend == "chunked"
    return torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def _use_chunked(q: torch.Tensor, k: torch.Tensor) -> bool:
    if get_attention_backend() == "chunked":
        return True
    return uses_chunked_attention(q.device, q.dtype) and q.shape[-2] * k.shape[-2] >= CHUNKED_MIN_PAIRS


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    self_attention: bool = False,
    return_lse: bool = False,
):
    """softmax(q k^T / sqrt(d) + mask) v.

    Args:
        q: (B, H, Nq, d) queries.
        k: (B, H, Nk, d) keys.
        v: (B, H, Nk, d) values.
        key_mask: (B, Nk) bool, True = a key that may be attended to (every query must have at
            least one, unless ``return_lse``); None attends to every key.
        self_attention: the queries are the keys' tokens, so a padding key is also a padding
            query whose output is meaningless; the chunked kernel then skips those queries
            (zeros).
        return_lse: also return each query's log-sum-exp of its scaled, masked scores. Two
            attentions over disjoint key sets then combine exactly into the attention over their
            union (:func:`merge_attention`). Only the chunked kernel exposes it, so it is used on
            every device; a query without any key gets output 0 and lse -inf, a skipped padding
            query output 0 and lse 0.

    Returns:
        (B, H, Nq, d); with ``return_lse``, the pair ``(out, lse)`` with lse (B, H, Nq) in fp32
        (fp64 for fp64 inputs), differentiable.
    """
    if return_lse or _use_chunked(q, k):
        return _chunked_entry()(q, k, v, key_mask, self_attention, return_lse)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def padding_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    """A key-padding mask from a validity mask.

    Args:
        valid: (B, N) bool, True for real tokens, or None.

    Returns:
        ``valid``, or None when every token is real (the fastest attention kernels take no mask).
    """
    return None if valid is None or bool(valid.all()) else valid


def cat_valid(a: torch.Tensor | None, b: torch.Tensor | None, na: int, nb: int) -> torch.Tensor | None:
    """Validity of the concatenation of two token lists.

    Args:
        a: (B, na) bool validity of the first list, or None (all valid).
        b: (B, nb) bool validity of the second list, or None (all valid).
        na: length of the first list.
        nb: length of the second list.

    Returns:
        (B, na + nb) key-padding mask (:func:`padding_mask`), or None when every
        token is valid.
    """
    if a is None and b is None:
        return None
    ref = a if a is not None else b
    a = a if a is not None else ref.new_ones(ref.shape[0], na)
    b = b if b is not None else ref.new_ones(ref.shape[0], nb)
    return padding_mask(torch.cat([a, b], dim=1))


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """The attention over keys A and B together, from the two partial attentions.

    Each part is weighted by its share exp(lse_part - lse_all) of the softmax mass.

    Args:
        out_a: (B, H, N, d) attention over keys A, from ``attention(..., return_lse=True)``.
        lse_a: (B, H, N) its log-sum-exp.
        out_b: (B, H, N, d) attention over keys B.
        lse_b: (B, H, N) its log-sum-exp.

    Returns:
        (B, H, N, d) attention over A and B, in ``out_a``'s dtype.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    share_a = torch.exp(lse_a - lse).unsqueeze(-1)
    share_b = torch.exp(lse_b - lse).unsqueeze(-1)
    return (out_a * share_a + out_b * share_b).to(out_a.dtype)


def _chunked_entry():
    """The chunked kernel, kept out of torch.compile's tracing (a Python loop over heads and
    blocks: nothing to fuse, and tracing it took a minute). The wrapper is made only once
    torch.compile is in use (its machinery is loaded): importing it costs ~70 MB of memory and
    a second of start-up for every run that does not compile."""
    global _chunked_disabled
    if "torch._dynamo" not in sys.modules:
        return _chunked_attention
    if _chunked_disabled is None:
        _chunked_disabled = torch.compiler.disable(_chunked_attention)
    return _chunked_disabled


_chunked_disabled = None


def _chunked_attention(q, k, v, key_mask, self_attention, return_lse=False):
    """:func:`attention` through :class:`ChunkedAttention` (same arguments)."""
    B, H, Nq, d = q.shape
    Nk = k.shape[-2]
    bias = n_keys = n_queries = None
    if key_mask is not None:
        counts = key_mask.sum(1)
        if torch.equal(key_mask, torch.arange(Nk, device=q.device) < counts[:, None]):
            # padding at the end (as brainjepa lays out its sequences): just fewer keys
            n_keys = tuple(int(c) for c in counts.repeat_interleave(H))
            n_queries = n_keys if self_attention and Nq == Nk else None
        else:
            bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~key_mask, float("-inf"))
            bias = bias[:, None, None, :].expand(B, H, 1, Nk).reshape(B * H, 1, Nk)
    out, lse = ChunkedAttention.apply(
        q.reshape(B * H, Nq, d),
        k.reshape(B * H, Nk, d),
        v.reshape(B * H, Nk, d),
        bias,
        n_keys,
        n_queries,
        H,
        return_lse,
    )
    out = out.permute(0, 2, 1, 3)  # (B, H, Nq, d) view of a (B, Nq, H, d) tensor
    return (out, lse.view(B, H, Nq)) if return_lse else out


def _block_size(n_keys: int, itemsize: int) -> int:
    """Queries per block so that one (block x keys) score tile is about TILE_BYTES, a power of
    two (few distinct matmul shapes: oneDNN compiles and caches a kernel per shape)."""
    return 1 << max(6, (TILE_BYTES // (n_keys * itemsize)).bit_length() - 1)


class ChunkedAttention(torch.autograd.Function):
    """Attention over (G, N, d) tensors (G = B x H: batch x heads), one head and query block at a time.

    The output is (B, Nq, H, d): merging the heads back into (B, Nq, H*d) for the
    output projection is then a view, not a copy (and one tensor is kept for backward, not two).


    Padding: ``n_keys`` (G ints) keeps only the first n_keys[g] keys of group g (padding at the
    end, the cheap case); ``bias``, an additive (G, 1, Nk) key bias (0 or -inf), masks any other
    pattern; or both None. ``n_queries`` (G ints): only the first n_queries[g] queries are
    computed, the other outputs (and their gradients) are zero. ``with_lse``: the second output
    is each query's log-sum-exp, lse = max(S) - log(max(P)) (P's largest entry is 1 / sum
    exp(S - max S), so this is exact to P's precision); otherwise an empty tensor. Its gradient
    g adds g * P to dS, i.e. shifts the correction term below.

    Forward saves the scaled q, k, v and the output; backward recomputes each block's weights P
    and uses the standard identities dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)),
    dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d). dK and dV are accumulated over blocks in fp32
    (fp64 for fp64).
    """

    @staticmethod
    def _tiles(qs, k, bias, n_keys, n_queries, with_lse=False, in_place=False):
        """Walk the (head, query block) tiles: yields g, n (keys used), s:e (queries), P (the
        softmax(qs k^T + bias) tile, in a workspace buffer), work_s (the other buffer, free for
        the caller) and, ``with_lse``, the tile's (e - s,) log-sum-exp in fp32 (fp64 for fp64)
        or None. qs: (G, Nq, d) pre-scaled queries."""
        G, Nq, _ = qs.shape
        Nk = k.shape[1]
        kt = k.transpose(1, 2)
        block = min(_block_size(Nk, qs.element_size()), Nq)
        work_s = qs.new_empty(block * Nk)
        work_p = work_s if in_place and qs.dtype == torch.bfloat16 and native.softmax_fn() else qs.new_empty(block * Nk)
        work_lse = qs.new_empty(block, dtype=torch.float32)
        for g in range(G):
            n = Nk if n_keys is None else n_keys[g]
            nq = Nq if n_queries is None else n_queries[g]
            for s in range(0, nq, block):
                e = min(s + block, nq)
                S = work_s[: (e - s) * n].view(e - s, n)
                if bias is None:
                    torch.mm(qs[g, s:e], kt[g, :, :n], out=S)
                else:
                    torch.addmm(bias[g], qs[g, s:e], kt[g, :, :n], out=S)
                P = work_p[: S.numel()].view(S.shape)
                lse = work_lse[: e - s] if with_lse else None
                if not native.softmax_bf16(S, P, lse):  # PyTorch's softmax: not bf16, or no compiler
                    torch.ops.aten._softmax.out(S, -1, False, out=P)
                    if with_lse:  # P's largest entry is 1 / sum exp(S - max S); no keys: -inf
                        acc = torch.promote_types(qs.dtype, torch.float32)
                        lse = S.new_full((e - s,), -math.inf, dtype=acc)
                        if n:
                            lse = S.amax(-1).to(acc) - P.amax(-1).to(acc).log()
                yield g, n, s, e, P, work_s, lse

    @staticmethod
    def forward(ctx, q, k, v, bias, n_keys, n_queries, heads, with_lse=False):
        """Compute the attention block by block (see the class docstring).

        Args:
            ctx: the autograd context.
            q: (G, Nq, d) queries, G = B x H, batch-major.
            k: (G, Nk, d) keys.
            v: (G, Nk, d) values.
            bias: (G, 1, Nk) additive key bias (0 or -inf), or None.
            n_keys: G ints, the number of leading keys each group uses, or None for all.
            n_queries: G ints, the number of leading queries computed (the others are zero), or
                None for all.
            heads: H, to lay the output out as (B, Nq, H, d).
            with_lse: also compute each query's log-sum-exp.

        Returns:
            ``(out, lse)``: out (B, Nq, H, d); lse (G, Nq) in fp32 (fp64 for fp64 inputs), or an
            empty tensor without ``with_lse``.
        """
        G, Nq, d = q.shape
        qs = q * (1.0 / math.sqrt(d))  # computed in fp32 and rounded once for bf16
        out = (q.new_empty if n_queries is None else q.new_zeros)(G // heads, Nq, heads, d)
        acc = torch.promote_types(q.dtype, torch.float32)
        lse = q.new_zeros((G, Nq) if with_lse else (0,), dtype=acc)
        tiles = ChunkedAttention._tiles(qs, k, bias, n_keys, n_queries, with_lse, in_place=True)
        for g, n, s, e, P, _, tile_lse in tiles:
            torch.mm(P, v[g, :n], out=out[g // heads, s:e, g % heads])
            if with_lse:
                lse[g, s:e] = tile_lse
        ctx.save_for_backward(qs, k, v, bias, out)
        ctx.n_keys, ctx.n_queries, ctx.with_lse = n_keys, n_queries, with_lse
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        """Recompute each block's weights and accumulate the gradients (see the class docstring).

        Args:
            ctx: the autograd context saved by :meth:`forward`.
            dout: (B, Nq, H, d) gradient of the output.
            dlse: (G, Nq) gradient of the log-sum-exp (used only with ``with_lse``).

        Returns:
            The gradients of q, k and v (in their dtype), and None for the other inputs.
        """
        qs, k, v, bias, out = ctx.saved_tensors
        G, Nq, d = qs.shape
        Nk = k.shape[1]
        heads = out.shape[2]
        scale = 1.0 / math.sqrt(d)
        dout = dout.contiguous()  # (B, Nq, H, d) like out
        # rowsum(dO * O) = rowsum(dP * P), the softmax backward's correction term, per query
        acc = torch.promote_types(qs.dtype, torch.float32)  # accumulation dtype
        corr = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True).neg_()
        if ctx.with_lse:  # (G, Nq) -> the (B, Nq, H, 1) layout of corr
            corr += dlse.view(-1, heads, Nq).transpose(1, 2).unsqueeze(-1)
        corr = corr.to(qs.dtype)
        vt = v.transpose(1, 2)
        dq = (qs.new_empty if ctx.n_queries is None else qs.new_zeros)(G, Nq, d)
        dk = torch.zeros(G, Nk, d, dtype=acc, device=qs.device)
        dv = torch.zeros_like(dk)
        for g, n, s, e, P, work_s, _ in ChunkedAttention._tiles(qs, k, bias, ctx.n_keys, ctx.n_queries):
            do_block = dout[g // heads, s:e, g % heads]
            dv[g, :n] += torch.mm(P.t(), do_block)
            # dP - rowsum(dO * O), subtracted inside the GEMM's fp32 accumulation
            dS = torch.addmm(
                corr[g // heads, s:e, g % heads], do_block, vt[g, :, :n], out=work_s[: P.numel()].view(P.shape)
            )
            dS.mul_(P)
            torch.mm(dS, k[g, :n], out=dq[g, s:e]).mul_(scale)
            dk[g, :n] += torch.mm(dS.t(), qs[g, s:e])  # qs carries the 1/sqrt(d) already
        return dq, dk.to(qs.dtype), dv.to(qs.dtype), None, None, None, None, None
