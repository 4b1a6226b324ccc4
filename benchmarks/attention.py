"""Attention kernels on CPU: PyTorch SDPA vs brainjepa's chunked kernel, time and accuracy.

Shapes are those of a pretraining step at the authors' size (batch 2 of 450 ROIs x 160 time
points): the target encoder over all 4,500 tokens, the context encoder over ~2,800 tokens, and
the predictor (head dim 32) over context + alpha targets (~3,800 tokens), for tiny (3 heads) and
small (6 heads). For each: forward only (no grad) and forward + backward, bf16, best of 3 after
a warmup call; errors are against a float64 evaluation of the same bf16 inputs (max abs error of
the output, and of each gradient relative to that gradient's largest entry).

    python benchmarks/attention.py            # writes benchmarks/results/attention.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from brainjepa.attention import attention, set_attention_backend

SHAPES = {  # (batch, heads, tokens, head dim)
    "tiny target encoder": (2, 3, 4500, 64),
    "tiny context encoder": (2, 3, 2776, 64),
    "tiny predictor": (2, 3, 3757, 32),
    "small target encoder": (2, 6, 4500, 64),
    "small predictor": (2, 6, 3757, 32),
}


def run(backend: str, q, k, v, backward: bool, reps: int = 3) -> tuple[float, torch.Tensor, list]:
    set_attention_backend(backend)
    times = []
    for _ in range(reps + 1):
        for t in (q, k, v):
            t.grad = None
        start = time.perf_counter()
        if backward:
            out = attention(q, k, v)
            out.float().pow(2).sum().backward()
        else:
            with torch.no_grad():
                out = attention(q, k, v)
        times.append(time.perf_counter() - start)
    grads = [t.grad.clone() for t in (q, k, v)] if backward else []
    return min(times[1:]), out.detach(), grads


def main() -> None:
    rows = []
    for name, shape in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(*shape, generator=g).bfloat16() for _ in range(3))
        exact = [t.double().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*exact)
        ref.pow(2).sum().backward()
        ref = ref.detach()
        for backward in (False, True):
            inputs = [t.clone().requires_grad_(backward) for t in (q, k, v)]
            row = {"shape": name, "dims": shape, "pass": "forward + backward" if backward else "forward"}
            for backend in ("sdpa", "chunked"):
                seconds, out, grads = run(backend, *inputs, backward)
                row[f"{backend}_s"] = round(seconds, 4)
                row[f"{backend}_out_err"] = float((out.double() - ref).abs().max())
                if backward:
                    row[f"{backend}_grad_err"] = [
                        float((a.double() - e.grad).abs().max() / e.grad.abs().max()) for a, e in zip(grads, exact)
                    ]
            row["speedup"] = round(row["sdpa_s"] / row["chunked_s"], 2)
            rows.append(row)
            print(
                f"{name:22s} {row['pass']:18s} sdpa {row['sdpa_s']:.3f} s  chunked {row['chunked_s']:.3f} s"
                f"  x{row['speedup']}",
                flush=True,
            )
    set_attention_backend("auto")
    out = Path(__file__).parent / "results" / "attention.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "attention",
                "dtype": "bfloat16",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "results": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
