"""Embedding speed and memory side by side with the authors' code, in one run, on identical input.

Both encoders see the same (batch, 450, 160) input (4,500 tokens per sample, patch 16, the
authors' gradient file for the positions) at the same model sizes; speed does not depend on
the weights, so both are randomly initialised. "authors": their released encoder, built with
their own ``init_model`` / model factories from a copy of their code (``--official DIR``, never
part of this repository; ``flash_attn`` is replaced by a stub that raises if called, so their
``attn_mode='normal'`` path runs), forward under ``torch.no_grad`` in fp32, as their code runs on
a CPU. "ours": :func:`brainjepa.evaluate.encode_windows` under ``torch.inference_mode`` at
``--precision`` (default ``auto``: :mod:`brainjepa.precision`'s probe decides, and the choice is
recorded).

Each measurement runs in its own process (its peak RSS is its own), the two implementations
alternate round by round (order swapped every round) so that both meet the same load on a
shared machine, and the fp32 and bf16 matmul peaks are measured in the same run, before and
after. Reported per process: median seconds per batch, CPU seconds per batch (user + system),
peak RSS, GFLOP/s (analytic FLOPs: patch embedding, the block matmuls and attention) and the
CPU share other processes used meanwhile (from /proc/stat).

    python benchmarks/versus_authors.py --official /path/to/Brain-JEPA --sizes tiny small --batch 8

``--what step`` times one whole pretraining step instead, on the authors' own masks: their
``MaskCollator_fmri`` with the mask scales of their ViT-B config draws the masks in both
processes (same seed, so the same masks, recorded as token counts); "authors": their encoder,
predictor (sizes below), target encoder (a copy) and step as their training script runs it in
fp32 on a CPU (target forward + layer norm, context encoder, predictor, smooth-L1 loss,
backward, AdamW, EMA); "ours": :class:`brainjepa.pretrain.Trainer` (the default recipe, at
``--precision``) on the same context and target tokens (their one target block per sample),
the masks converted outside the timed step. Model FLOPs are counted for the authors' work
(encoder over the context, predictor over context + targets, forward x 3 for both; target
encoder forward over all tokens).

    python benchmarks/versus_authors.py --official /path/to/Brain-JEPA --what step --sizes small --batch 2

Writes benchmarks/results/versus_authors.json (``--what step``: versus_authors_step.json) and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pretrain_step import block_flops  # this folder's step benchmark: the same FLOP count

from brainjepa.precision import cpu_model

R, T, PATCH = 450, 160, 16
N_TOKENS = R * T // PATCH
SIZES = {  # width, depth, heads (the authors' vit_small / vit_base; tiny: their class at our tiny width)
    "tiny": (192, 4, 4),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}
PREDICTOR = {"tiny": (96, 2), "small": (192, 6), "base": (384, 6)}  # width, depth (heads: the encoder's)
MASK_SCALES = dict(  # the authors' ViT-B pretraining config (configs/ukb_vitb_ep300.yaml)
    enc_mask_scale=(0.84, 1.0), pred_mask_R_scale=(0.45, 0.6), pred_mask_T_scale=(0.0, 0.4),
    pred_mask_T_roi_scale=(0.2, 0.6), pred_mask_R_roi_scale=(0.15, 0.3), min_keep=4, allow_overlap=False,
)  # fmt: skip
GRADIENT_FILE = "data/gradient_mapping_450.csv"  # in the authors' tree


def embed_flops(size: str, batch: int) -> float:
    """Forward FLOPs of the encoder on ``batch`` windows: patch embedding, qkv / proj / MLP
    matmuls (MLP ratio 4) and the two attention matmuls."""
    c, depth, _ = SIZES[size]
    return batch * (2 * N_TOKENS * PATCH * c + depth * block_flops(N_TOKENS, N_TOKENS, c, 4))


def step_flops(size: str, n_context: list[int], n_target: list[int]) -> float:
    """Model FLOPs of the authors' training step for these per-sample token counts: the target
    encoder's forward over all tokens, and forward + backward (x 3) of the context encoder and of
    the predictor over context + targets."""
    c, depth, _ = SIZES[size]
    cp, pdepth = PREDICTOR[size]
    total = 0.0
    for nc, nt in zip(n_context, n_target):
        total += 2 * N_TOKENS * PATCH * c + depth * block_flops(N_TOKENS, N_TOKENS, c, 4)
        ctx = 2 * nc * PATCH * c + depth * block_flops(nc, nc, c, 4)
        pred = 2 * nc * c * cp + pdepth * block_flops(nc + nt, nc + nt, cp, 4) + 2 * nt * cp * c
        total += 3 * (ctx + pred)
    return total


def authors_masks(official: Path, batch: int, steps: int):
    """``steps`` mask batches drawn by the authors' collator: [(context (B, Kc), target (B, Kt))]."""
    import torch

    sys.path.insert(0, str(official))
    from src.masks.spatialtemporal_multiblock import MaskCollator_fmri

    torch.manual_seed(0)
    collator = MaskCollator_fmri(input_size=(R, T), patch_size=PATCH, **MASK_SCALES)
    out = []
    for _ in range(steps):
        _, enc, pred = collator([torch.zeros(1)] * batch)
        out.append((enc[0], pred[0]))
    return out


def authors_step(official: Path, size: str, x, masks):
    """A function running one training step of the authors' code on ``x`` for a mask batch."""
    import copy

    import torch
    import torch.nn.functional as F

    encoder = authors_encoder(official, size)
    import src.models.vision_transformer as vit
    from src.masks.utils import apply_masks
    from src.utils.tensors import repeat_interleave_batch

    width, depth = PREDICTOR[size]
    predictor = vit.vit_predictor(
        num_patches=encoder.patch_embed.num_patches, num_patches_2d=encoder.patch_embed.num_patches_2d,
        embed_dim=encoder.embed_dim, predictor_embed_dim=width, depth=depth, num_heads=encoder.num_heads,
        gradient_pos_embed=torch.as_tensor(gradients(official))[None], attn_mode="normal", add_w="mapping",
    )  # fmt: skip
    target = copy.deepcopy(encoder)
    for p in target.parameters():
        p.requires_grad = False
    params = list(encoder.parameters()) + list(predictor.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04)
    imgs = x[:, None]

    def step(i):
        ctx, tgt = masks[i]
        with torch.no_grad():
            h = target(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            h = repeat_interleave_batch(apply_masks(h, [tgt]), len(h), repeat=1)
        z = predictor(encoder(imgs, [ctx]), [ctx], [tgt])
        loss = F.smooth_l1_loss(z, h)
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for q, k in zip(encoder.parameters(), target.parameters()):
                k.mul_(0.996).add_(0.004 * q.detach())
        return float(loss)

    return step


def our_step(official: Path, size: str, precision: str, x, masks):
    """A function running one :class:`brainjepa.pretrain.Trainer` step on the same tokens."""
    import torch

    from brainjepa.masking import MaskBatch
    from brainjepa.model import ModelConfig
    from brainjepa.pretrain import Trainer
    from brainjepa.pretrain.config import resolve_config

    width, depth, heads = SIZES[size]
    pwidth, pdepth = PREDICTOR[size]
    cfg = resolve_config({"optim": {"batch_size": len(x)}, "train": {"precision": precision, "seed": 0}})
    model_cfg = ModelConfig(
        n_rois=R, n_timepoints=T, patch_size=PATCH, n_gradients=30, embed_dim=width, depth=depth, num_heads=heads,
        predictor_embed_dim=pwidth, predictor_depth=pdepth, predictor_num_heads=heads, pos_minmax=True,
    )  # fmt: skip
    trainer = Trainer(model_cfg, torch.as_tensor(gradients(official)), cfg, total_steps=1000)
    batches = []
    for ctx, tgt in masks:  # the authors' masks: one context and one target block per sample
        ctx, tgt = ctx.sort(1).values, tgt.sort(1).values
        obs = torch.zeros(len(x), N_TOKENS, dtype=torch.bool)
        obs.scatter_(1, ctx, True).scatter_(1, tgt, True)
        every = torch.ones_like(tgt, dtype=torch.bool)
        ctx_valid = torch.ones_like(ctx, dtype=torch.bool)
        batches.append(MaskBatch(ctx, ctx_valid, tgt[:, None], every[:, None], ("alpha",), obs.view(len(x), R, -1)))

    def step(i):
        return float(trainer.step([(x, batches[i])], i)["loss"])

    return step, trainer.bf16


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)
    return sum(v) - idle, sum(v)


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def gradients(official: Path):
    import numpy as np

    return np.loadtxt(official / GRADIENT_FILE, delimiter=",", dtype=np.float32).reshape(R, -1)


def authors_encoder(official: Path, size: str):
    """The authors' encoder at ``size``, built by their code."""
    import types

    import torch

    if "flash_attn" not in sys.modules:  # their module imports it at the top; normal attention never calls it
        stub = types.ModuleType("flash_attn")

        def unavailable(*a, **k):
            raise RuntimeError("flash_attn stub: use attn_mode='normal'")

        stub.flash_attn_qkvpacked_func = unavailable
        sys.modules["flash_attn"] = stub
    sys.path.insert(0, str(official))
    import src.models.vision_transformer as vit

    width, depth, heads = SIZES[size]
    grad = torch.as_tensor(gradients(official))[None]
    common = dict(
        img_size=(R, T), patch_size=PATCH, in_chans=1, gradient_pos_embed=grad, attn_mode="normal", add_w="mapping"
    )
    if size == "tiny":
        norm = functools.partial(torch.nn.LayerNorm, eps=1e-6)
        return vit.VisionTransformer(
            embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4, qkv_bias=True, norm_layer=norm, **common
        )
    return getattr(vit, f"vit_{size}")(**common)


def child(args) -> dict:
    """One implementation, one size: time ``args.iters`` batches after one warm-up batch."""
    import torch

    torch.set_num_threads(args.threads)
    official = Path(args.official)
    torch.manual_seed(0)
    x = torch.randn(args.batch, R, T)
    info = {}
    if args.what == "step":
        masks = authors_masks(official, args.batch, args.iters + 1)
        info["tokens"] = [{"context": int(c.shape[1]), "target": int(t.shape[1])} for c, t in masks]
        if args.child == "authors":
            step = authors_step(official, args.size, x, masks)
        else:
            step, info["bf16"] = our_step(official, args.size, args.precision, x, masks)
        counter = iter(range(args.iters + 1))

        def run():
            return torch.tensor(step(next(counter)))

    elif args.child == "authors":
        model = authors_encoder(official, args.size).eval()

        def run():
            with torch.no_grad():
                return model(x[:, None])

    else:
        from brainjepa.bundle import BrainJEPA
        from brainjepa.evaluate import encode_windows
        from brainjepa.model import ModelConfig
        from brainjepa.precision import use_bf16

        width, depth, heads = SIZES[args.size]
        cfg = ModelConfig(
            n_rois=R, n_timepoints=T, patch_size=PATCH, n_gradients=30, embed_dim=width, depth=depth,
            num_heads=heads, pos_minmax=True,
        )  # fmt: skip
        model = BrainJEPA(cfg, gradients(official)).eval()
        t = time.perf_counter()
        info["bf16"] = use_bf16(args.precision, "cpu")
        info["precision_decision_s"] = time.perf_counter() - t

        def run():
            with torch.inference_mode():
                return encode_windows(model, x, precision=args.precision)

    times, cpu = [], []
    out = run()  # warm-up
    info["out_shape"] = list(out.shape)
    del out
    b0 = cpu_busy()
    for _ in range(args.iters):
        c, t = self_cpu(), time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
        cpu.append(self_cpu() - c)
    b1 = cpu_busy()
    total = b1[1] - b0[1]
    own = sum(cpu) * os.sysconf("SC_CLK_TCK") if total else 0.0
    if args.what == "step":
        timed = info["tokens"][1:]
        flops = statistics.mean(
            step_flops(args.size, [t["context"]] * args.batch, [t["target"]] * args.batch) for t in timed
        )
    else:
        flops = embed_flops(args.size, args.batch)
    s = statistics.median(times)
    return {
        "impl": args.child,
        "size": args.size,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "s_per_batch": s,
        "times_s": times,
        "cpu_s_per_batch": statistics.median(cpu),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gflops": flops / 1e9,
        "gflop_per_s": flops / s / 1e9,
        "gflop_per_cpu_s": flops / statistics.median(cpu) / 1e9,
        "others_cpu_share": max(0.0, (b1[0] - b0[0] - own) / total) if total else None,
        **info,
    }


def peaks(threads: int) -> dict:
    """Best fp32 and bf16 GFLOP/s of square matmuls with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in (1024, 2048):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b
            for _ in range(3):
                t = time.perf_counter()
                a @ b
                best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
        out[name] = best
    return out


def spawn(args, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--official", args.official, "--threads", str(args.threads)] + extra
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", default=os.environ.get("BRAINJEPA_AUTHORS_CODE"), help="the authors' source tree")
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=2, help="timed batches per process (after one warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (authors / ours)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--precision", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16"], help="ours, one row per value"
    )
    p.add_argument("--what", choices=["embed", "step"], default="embed", help="encoder forward, or a training step")
    p.add_argument("--out", help="default: benchmarks/results/versus_authors.json (_step.json for --what step)")
    p.add_argument("--child", choices=["authors", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--peaks", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.official or not (Path(args.official) / "src" / "models" / "vision_transformer.py").exists():
        raise SystemExit("--official must be a copy of the authors' Brain-JEPA source tree (src/models/...)")
    if args.peaks:
        print(json.dumps(peaks(args.threads)))
        return
    if args.child:
        args.precision = args.precision[0]
        print(json.dumps(child(args)))
        return
    if args.out is None:
        name = "versus_authors.json" if args.what == "embed" else "versus_authors_step.json"
        args.out = str(Path(__file__).parent / "results" / name)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    peak_runs = [spawn(args, ["--peaks"])]
    rows = []
    for rnd in range(args.rounds):
        for size in args.sizes:
            runs = [("authors", "fp32")] + [("ours", prec) for prec in args.precision]
            for impl, prec in runs if rnd % 2 == 0 else runs[::-1]:
                common = ["--size", size, "--batch", str(args.batch), "--iters", str(args.iters), "--what", args.what]
                r = spawn(args, common + ["--child", impl, "--precision", prec])
                r["round"], r["precision"] = rnd, prec
                rows.append(r)
                print(json.dumps(r), flush=True)
    peak_runs.append(spawn(args, ["--peaks"]))
    summary = []
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    for size in args.sizes:
        a = [r for r in rows if r["size"] == size and r["impl"] == "authors"]
        for prec in args.precision:
            o = [r for r in rows if r["size"] == size and r["impl"] == "ours" and r["precision"] == prec]
            summary.append(
                {
                    "size": size,
                    "precision": prec,
                    "ours_bf16": o[0].get("bf16"),
                    "authors_s": med(a, "s_per_batch"),
                    "ours_s": med(o, "s_per_batch"),
                    "speedup_wall": med(a, "s_per_batch") / med(o, "s_per_batch"),
                    "authors_cpu_s": med(a, "cpu_s_per_batch"),
                    "ours_cpu_s": med(o, "cpu_s_per_batch"),
                    "speedup_cpu": med(a, "cpu_s_per_batch") / med(o, "cpu_s_per_batch"),
                    "authors_rss_mb": max(r["peak_rss_mb"] for r in a),
                    "ours_rss_mb": max(r["peak_rss_mb"] for r in o),
                    "authors_gflop_per_cpu_s": med(a, "gflop_per_cpu_s"),
                    "ours_gflop_per_cpu_s": med(o, "gflop_per_cpu_s"),
                    "ours_gflop_per_s": med(o, "gflop_per_s"),
                    "others_cpu_share": statistics.median(r["others_cpu_share"] or 0 for r in a + o),
                }
            )
    out = {
        "started": started,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "size", "peaks")},
        "matmul_peaks_gflops": peak_runs,
        "rows": rows,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nmatmul peaks GFLOP/s (start, end): {peak_runs}; threads {args.threads}, batch {args.batch}\n")
    unit = "step" if args.what == "step" else "batch"
    print(
        f"| size | ours precision | authors s/{unit} (CPU s) | ours s/{unit} (CPU s) | x speed wall | x speed CPU s "
        "| authors / ours peak MB | GFLOP per CPU s authors / ours | others' CPU share |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(
            f"| {s['size']} | {s['precision']} ({'bf16' if s['ours_bf16'] else 'fp32'}) "
            f"| {s['authors_s']:.2f} ({s['authors_cpu_s']:.2f}) | {s['ours_s']:.2f} ({s['ours_cpu_s']:.2f}) "
            f"| {s['speedup_wall']:.2f} | {s['speedup_cpu']:.2f} | {s['authors_rss_mb']:.0f} / {s['ours_rss_mb']:.0f} "
            f"| {s['authors_gflop_per_cpu_s']:.0f} / {s['ours_gflop_per_cpu_s']:.0f} | {s['others_cpu_share']:.2f} |"
        )


if __name__ == "__main__":
    main()
