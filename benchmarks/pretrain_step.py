"""Full pretraining step on CPU at the authors' shape: time, tokens/s, peak RSS, FLOP/s, MFU.

One step = what :class:`brainjepa.pretrain.Trainer` does in a run: draw spatiotemporal masks,
target encoder over all R*P tokens (no grad; its last block only for the positions some sample
targets) + layer norm, centred per position over the batch (the default recipe; without
centring, i.e. batch 1, its last block computes each sample's target tokens only), context
encoder, predictor (one pass per target block; its last block for the mask tokens only; in bf16
the first block's context-only part is shared by the passes), backward, AdamW, EMA. Shape:
batch 2 of 450 ROIs x 160 time points (4,500 tokens per sample), as in the authors'
measurements (docs/method.md has the method).

Two layouts of the same optimizer step over 2 samples: batch 2 (as the authors ran it) and
batch 1 x 2 gradient-accumulation steps (optim.batch_size=1, optim.accum_steps=2: the same loss
and gradients, half the activation memory, no padding).

Masks: "ours" keeps every sampled target token (brainjepa's masker); "cut" truncates the context
and every target block to the batch's shortest, as the authors' collator does, so that their
token counts (and so their work) are compared like for like. "cut" exists only here, for the
comparison; brainjepa never truncates masks.

Each (size, precision, layout) runs in its own process so that its peak RSS is its own (peak
over all its steps: warmup and timed). Step times vary with the masks' token counts; the median
over the timed steps is reported. Model FLOPs are counted from the masks' valid token counts
(matmuls and attention, forward x 3 for the trained parts, last blocks for the needed queries
only); MFU is against this CPU's matmul peak measured here for the same dtype.

    python benchmarks/pretrain_step.py                  # tiny and small, fp32 and bf16, both layouts
    python benchmarks/pretrain_step.py --sizes tiny --layouts 2x1 --steps 5

Writes benchmarks/results/pretrain_step.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

R, T = 450, 160
# the authors' code on this machine, with their own masks
AUTHORS = {
    "tiny": {"batch": 2, "step_s": 5.3, "tokens_per_s": 1690, "peak_rss_mb": 2300},
    "small": {"batch": 2, "step_s": 36.7, "tokens_per_s": 245, "peak_rss_mb": 5000},
}


def matmul_peak(dtype: torch.dtype, sizes=(1024, 2048, 3072), reps: int = 3) -> float:
    """Best TFLOP/s of a square matmul on this machine."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e12)
    return best


def block_flops(nq: float, nk: float, dim: int, mlp_ratio: float) -> float:
    """Forward FLOPs of a ViT block with nq queries over nk tokens: q, k, v, proj and MLP
    matmuls and attention."""
    return (4 + 4 * mlp_ratio) * nq * dim**2 + 4 * nk * dim**2 + 4 * nq * nk * dim


def encoder_flops(n: float, n_out: float, dim: int, depth: int, mlp_ratio: float) -> float:
    """Forward FLOPs of ``depth`` blocks over n tokens, the last one for n_out queries only."""
    return (depth - 1) * block_flops(n, n, dim, mlp_ratio) + block_flops(n_out, n, dim, mlp_ratio)


def predictor_flops(cfg, nc: int, block_sizes: list[int], shared: bool) -> float:
    """Forward FLOPs of one sample's predictor passes (nc context tokens, one pass per target
    block of nt tokens). ``shared``: the first block's context-only part (embedding, q/k/v of
    the context, context-to-context attention) is computed once for all passes."""
    D, Dp, r, depth = cfg.embed_dim, cfg.predictor_embed_dim, cfg.mlp_ratio, cfg.predictor_depth
    total = (2 * nc * D * Dp + 6 * nc * Dp**2 + 4 * nc * nc * Dp) if shared else 0.0
    for nt in block_sizes:
        total += 2 * nt * Dp * D  # project out
        if not shared:
            total += 2 * nc * D * Dp + encoder_flops(nc + nt, nt, Dp, depth, r)
            continue
        # first block: the targets' q/k/v and attention over all tokens; the context queries
        # over the target keys; projection and MLP (for every token unless it is the last block)
        n_out = nc + nt if depth > 1 else nt
        total += 6 * nt * Dp**2 + 4 * nt * (nc + nt) * Dp + (2 + 4 * r) * n_out * Dp**2
        if depth > 1:
            total += 4 * nc * nt * Dp + encoder_flops(nc + nt, nt, Dp, depth - 1, r)
    return total


def step_flops(cfg, masks, shared: bool, centered: bool) -> float:
    """Model FLOPs of one training step for these masks (valid tokens only). ``centered``:
    centred targets need the target encoder's output at every position some sample targets."""
    D = cfg.embed_dim
    total = 0.0
    union = len(torch.unique(masks.target_idx[masks.target_valid]))
    for b in range(masks.context_idx.shape[0]):
        nc = int(masks.context_valid[b].sum())
        n_targets = union if centered else int(masks.target_valid[b].sum())
        total += encoder_flops(cfg.n_tokens, n_targets, D, cfg.depth, cfg.mlp_ratio)  # forward only
        total += 3 * encoder_flops(nc, nc, D, cfg.depth, cfg.mlp_ratio)  # context, fwd + bwd
        sizes = [int(masks.target_valid[b, j].sum()) for j in range(masks.n_blocks)]
        total += 3 * predictor_flops(cfg, nc, sizes, shared)  # fwd + bwd
    return total


def cut_to_shortest(masks):
    """The authors' batching: every sample's context and each target block cut to the batch's
    shortest (keeping the first, lowest-index tokens)."""
    from brainjepa.masking import MaskBatch

    n_ctx = int(masks.context_valid.sum(1).min())
    n_tgt = masks.target_valid.sum(-1).min(0).values  # per block
    width = int(n_tgt.max())
    keep = torch.arange(width) < n_tgt[:, None]  # blocks x width
    valid = keep.expand(masks.target_idx.shape[0], -1, -1).clone()
    return MaskBatch(
        masks.context_idx[:, :n_ctx],
        masks.context_valid[:, :n_ctx],
        masks.target_idx[..., :width] * valid,
        valid,
        masks.regions,
        masks.observation,
    )


def worker(size: str, precision: str, batch: int, accum: int, mask_mode: str, steps: int, warmup: int) -> dict:
    from brainjepa.masking import SpatiotemporalMasker
    from brainjepa.model import ModelConfig
    from brainjepa.pretrain import Trainer
    from brainjepa.pretrain.config import resolve_config

    # target centring needs two samples per micro-batch: the batch-1 rows measure un-centred
    # targets (the target encoder's last block then computes only the target tokens)
    cfg = resolve_config(
        {
            "model": {"size": size},
            "optim": {"batch_size": batch, "accum_steps": accum},
            "train": {"precision": precision, "seed": 0, "center_targets": batch > 1},
        }
    )
    model_cfg = ModelConfig.from_size(size, n_rois=R, n_timepoints=T)
    gradients = torch.randn(R, model_cfg.n_gradients, generator=torch.Generator().manual_seed(0))
    trainer = Trainer(model_cfg, gradients, cfg, total_steps=1000)
    masker = SpatiotemporalMasker(R, model_cfg.n_patches)
    rng = np.random.default_rng(0)  # the same masks for every precision
    x = torch.randn(batch * accum, R, T, generator=torch.Generator().manual_seed(1))
    times, flops, counts, losses = [], [], [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        micro = [(x[k * batch : (k + 1) * batch], masker(batch, rng)) for k in range(accum)]
        if mask_mode == "cut":
            micro = [(xb, cut_to_shortest(m)) for xb, m in micro]
        loss = trainer.step(micro, i)["loss"].item()
        dt = time.perf_counter() - t0
        losses.append(loss)
        if i >= warmup:
            times.append(dt)
            flops.append(
                sum(step_flops(model_cfg, m, trainer.share_context(), trainer.center_targets) for _, m in micro)
            )
            counts.extend(m.counts() for _, m in micro)
    with torch.no_grad(), trainer.autocast():
        t0 = time.perf_counter()
        trainer.target_encoder(x[:batch])
        target_s = (time.perf_counter() - t0) * accum
    step_s = statistics.median(times)
    gflop = float(np.mean(flops)) / 1e9
    return {
        "size": size,
        "precision": precision,
        "batch": batch,
        "accum_steps": accum,
        "masks": mask_mode,
        "threads": torch.get_num_threads(),
        "step_s": round(step_s, 3),
        "step_s_mean": round(statistics.mean(times), 3),
        "step_s_best": round(min(times), 3),
        "step_s_all": [round(t, 3) for t in times],
        "tokens_per_s": round(batch * accum * R * (T // 16) / step_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model_gflop_per_step": round(gflop, 1),
        "tflops": round(gflop / 1e3 / step_s, 4),
        "target_forward_s": round(target_s, 3),
        "first_loss": losses[0],
        "losses": losses,
        "tokens": {
            k: round(float(np.mean([c[k] for c in counts])), 1) for k in ("context", "alpha", "beta", "gamma", "target")
        },
        "parameters": sum(p.numel() for p in trainer.params),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument(
        "--layouts",
        nargs="+",
        default=["2x1:ours", "1x2:ours", "2x1:cut"],
        help="BATCHxACCUM:MASKS runs (masks: ours or cut; default 2x1:ours 1x2:ours 2x1:cut)",
    )
    ap.add_argument(
        "--steps", type=int, help="timed steps, the median is reported (default: 8 for tiny, 3 for larger sizes)"
    )
    ap.add_argument("--warmup", type=int, help="untimed first steps (default: 2 for tiny, 1 else)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pretrain_step.json"))
    ap.add_argument("--worker", nargs=3, metavar=("SIZE", "PRECISION", "LAYOUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        size, precision, layout = args.worker
        shape, _, mask_mode = layout.partition(":")
        batch, accum = (int(v) for v in shape.split("x"))
        print(json.dumps(worker(size, precision, batch, accum, mask_mode or "ours", args.steps or 3, args.warmup or 1)))
        return

    load_before = os.getloadavg()
    # this shared machine has slow phases: the peak is the best of a measurement before and one
    # after the runs (a peak measured in a slow phase alone gave an fp32 MFU above 1)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    results = []
    for size in args.sizes:
        for layout in args.layouts:
            for precision in args.precisions:
                steps = args.steps or (8 if size == "tiny" else 3)
                warmup = args.warmup if args.warmup is not None else (2 if size == "tiny" else 1)
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    size,
                    precision,
                    layout,
                    "--steps",
                    str(steps),
                    "--warmup",
                    str(warmup),
                ]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                base = AUTHORS.get(size)
                if base and base["batch"] == r["batch"] * r["accum_steps"]:
                    r["speedup_vs_authors"] = round(base["step_s"] / r["step_s"], 2)
                    r["speedup_vs_authors_best"] = round(base["step_s"] / r["step_s_best"], 2)
                    r["memory_vs_authors"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 2)
                results.append(r)
                print(
                    f"{size} {layout} {precision}: {r['step_s']} s/step, context "
                    f"{r['tokens']['context']}, target {r['tokens']['target']}",
                    file=sys.stderr,
                )
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        peaks[name] = max(peaks[name], matmul_peak(dtype))
    for r in results:
        r["mfu"] = round(r["tflops"] / peaks[r["precision"]], 3)
    report = {
        "benchmark": "pretrain_step",
        "shape": {"n_rois": R, "n_timepoints": T, "tokens_per_sample": R * T // 16},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
        },
        "matmul_peak_tflops": {k: round(v, 3) for k, v in peaks.items()},
        "authors": AUTHORS,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        "| size | batch x accum | masks | precision | s/step median (best) | tokens/s | peak RSS MB "
        "| GFLOP/step | TFLOP/s | MFU | x authors speed, median (best) | x authors memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['size']} | {r['batch']} x {r['accum_steps']} | {r['masks']} | {r['precision']} "
            f"| {r['step_s']} ({r['step_s_best']}) | {r['tokens_per_s']:,} | {r['peak_rss_mb']:,} "
            f"| {r['model_gflop_per_step']} | {r['tflops']} | {r['mfu']} "
            f"| {r.get('speedup_vs_authors', '-')} ({r.get('speedup_vs_authors_best', '-')}) "
            f"| {r.get('memory_vs_authors', '-')} |"
        )
    print(
        f"matmul peak TFLOP/s: {report['matmul_peak_tflops']}; load {load_before} -> "
        f"{report['machine']['load_average_after']}; wrote {out}"
    )


if __name__ == "__main__":
    main()
