"""The GPU check: everything to run the day a CUDA machine is available, in one go (< 10 minutes).

    bash benchmarks/gpu_check.sh          # or: python benchmarks/gpu_check.py [--quick]

On a machine without CUDA it prints that no GPU is present and exits 0. With CUDA it

1. runs the test suite's CUDA tests (``pytest -m cuda``);
2. checks bf16 attention against fp32 on the GPU: PyTorch's SDPA with each fused kernel forced
   (flash, memory-efficient) and brainjepa's ``attention`` with a key-padding mask, at the base
   model's shape (12 heads x 4,500 tokens x 64), and the base encoder's bf16 output against fp32;
3. measures the ``base`` model (ViT-B, 450 x 160 windows, 4,500 tokens): embedding (bf16
   autocast, inference mode, pinned input copied without blocking) and a full training step
   (brainjepa's Trainer in bf16), as tokens/s and model FLOP/s, and MFU against the GPU's dense
   bf16 peak from its datasheet (when the GPU is in :data:`PEAK_TFLOPS`) and against the bf16
   matmul peak measured here.

It prints one table (check, result, numbers) and writes benchmarks/results/gpu_check.json.
Exit status: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
R, T = 450, 160
# dense bf16 tensor-core peaks (TFLOP/s, without sparsity), from the vendors' datasheets
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
               "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}  # fmt: skip
TOLERANCE = {"attention": 2e-2, "encoder": 5e-2}  # max |bf16 - fp32| / max |fp32|


def datasheet_peak(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (the longest matching key), or None."""
    hits = [k for k in PEAK_TFLOPS if k.lower() in name.lower()]
    return PEAK_TFLOPS[max(hits, key=len)] if hits else None


def timed(fn, warmup: int, reps: int) -> list[float]:
    """Seconds per call of ``fn`` on the GPU (synchronised), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def measured_peak() -> float:
    """Best bf16 TFLOP/s of an 8192^3 matmul."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / min(timed(lambda: a @ b, 3, 10)) / 1e12


def run_cuda_tests(rows: list) -> None:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", str(HERE.parent / "tests")]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    rows.append(("pytest -m cuda", done.returncode == 0, f"{last} ({time.perf_counter() - t:.0f} s)"))
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max())


def check_attention(rows: list, tokens: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from brainjepa.attention import attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 12, tokens, 64, device="cuda", generator=gen) for _ in range(3))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("memory-efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb)
                ms = statistics.median(
                    timed(lambda: torch.nn.functional.scaled_dot_product_attention(qb, kb, vb), 2, 5)
                )
            err = rel_err(out, ref)
            tflops = 4 * 2 * 12 * tokens**2 * 64 / ms / 1e12
            rows.append(
                (f"SDPA {name} bf16 vs fp64", err < TOLERANCE["attention"], f"err {err:.1e}, {tflops:.0f} TFLOP/s")
            )
        except RuntimeError as exc:  # the kernel is not available for this GPU / build
            rows.append((f"SDPA {name} bf16 vs fp64", False, f"unavailable: {str(exc)[:80]}"))
    # brainjepa's attention with key padding at the end (the layout of ragged token lists)
    valid = torch.arange(tokens, device="cuda") < torch.tensor([[tokens], [tokens - 500]], device="cuda")
    with sdpa_kernel([SDPBackend.MATH]):
        ref_m = attention(q.double(), k.double(), v.double(), valid).float()
    out_m = attention(qb, kb, vb, valid)
    err = rel_err(out_m[1, :, : tokens - 500], ref_m[1, :, : tokens - 500])
    rows.append(("brainjepa attention, padded keys, bf16", err < TOLERANCE["attention"], f"err {err:.1e}"))


def base_config():
    from brainjepa.model import ModelConfig

    return ModelConfig.from_size("base", n_rois=R, n_timepoints=T)


def check_embedding(rows: list, batch: int, peaks: dict) -> None:
    from versus_authors import SIZES, embed_flops

    from brainjepa.bundle import BrainJEPA
    from brainjepa.evaluate import encode_windows

    cfg = base_config()
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == SIZES["base"]
    model = BrainJEPA(cfg, torch.randn(R, cfg.n_gradients)).cuda().eval()
    x_host = torch.randn(batch, R, T).pin_memory()
    with torch.inference_mode():
        x = x_host.to("cuda", non_blocking=True)
        h32 = encode_windows(model, x[:2], precision="fp32")
        h16 = encode_windows(model, x[:2], precision="bf16")
        err = rel_err(h16, h32)
        rows.append(("base encoder bf16 vs fp32", err < TOLERANCE["encoder"], f"err {err:.1e}"))
        times = timed(lambda: encode_windows(model, x_host.to("cuda", non_blocking=True), precision="bf16"), 2, 5)
    s = statistics.median(times)
    add_speed(
        rows, f"embedding base, batch {batch}", batch * R * cfg.n_patches / s, embed_flops("base", batch) / s, peaks
    )


def check_step(rows: list, batch: int, steps: int, peaks: dict, compile: bool) -> None:
    import numpy as np
    from pretrain_step import step_flops

    from brainjepa.masking import SpatiotemporalMasker
    from brainjepa.pretrain import Trainer
    from brainjepa.pretrain.config import resolve_config

    cfg = base_config()
    run_cfg = resolve_config(
        {
            "model": {"size": "base"},
            "optim": {"batch_size": batch},
            "train": {"precision": "bf16", "seed": 0, "compile": compile, "device": "cuda"},
        }
    )
    trainer = Trainer(cfg, torch.randn(R, cfg.n_gradients), run_cfg, total_steps=1000, device="cuda")
    masker = SpatiotemporalMasker(R, cfg.n_patches)
    rng = np.random.default_rng(0)
    x = torch.randn(batch, R, T).pin_memory()
    batches = [masker(batch, rng) for _ in range(steps + 3)]
    times, flops, losses = [], [], []
    for i, masks in enumerate(batches):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = trainer.step([(x, masks.pin_memory())], i)["loss"].item()  # the Trainer copies without blocking
        torch.cuda.synchronize()
        losses.append(loss)
        if i >= 3:  # warm-up: kernel selection (and compilation)
            times.append(time.perf_counter() - t)
            flops.append(step_flops(cfg, masks, trainer.share_context(), trainer.center_targets))
    s = statistics.median(times)
    ok = all(np.isfinite(losses))
    name = f"training step base, batch {batch}" + (", compiled" if compile else "")
    add_speed(rows, name, batch * R * cfg.n_patches / s, float(np.mean(flops)) / s, peaks, ok)
    rows[-1] = (*rows[-1][:2], rows[-1][2] + f", loss {losses[0]:.4f} -> {losses[-1]:.4f}")


def add_speed(rows, name, tokens_per_s, flop_per_s, peaks, ok=True) -> None:
    tf = flop_per_s / 1e12
    mfu = [f"MFU {tf / p:.2f} of {label}" for label, p in peaks.items() if p]
    rows.append((name, ok, f"{tokens_per_s:,.0f} tokens/s, {tf:.0f} TFLOP/s, " + ", ".join(mfu)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller batches and fewer steps")
    p.add_argument("--no-tests", action="store_true", help="skip pytest -m cuda")
    p.add_argument("--out", default=str(HERE / "results" / "gpu_check.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(
            f"gpu_check: no GPU present (torch {torch.__version__}: torch.cuda.is_available() is False); "
            "nothing to check."
        )
        return 0
    started = time.perf_counter()
    name = torch.cuda.get_device_name()
    rows: list[tuple[str, bool, str]] = []
    if not args.no_tests:
        run_cuda_tests(rows)
    peaks = {"datasheet": datasheet_peak(name), "measured matmul": measured_peak()}
    rows.append(("bf16 matmul peak 8192^3", True, f"{peaks['measured matmul']:.0f} TFLOP/s measured; datasheet "
                 + (f"{peaks['datasheet']:.0f}" if peaks["datasheet"] else "unknown for this GPU")))  # fmt: skip
    check_attention(rows, 4500)
    check_embedding(rows, 8 if args.quick else 32, peaks)
    check_step(rows, 4 if args.quick else 16, 3 if args.quick else 10, peaks, compile=False)
    if not args.quick:
        check_step(rows, 16, 10, peaks, compile=True)
    print(f"\n{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {time.perf_counter() - started:.0f} s\n")
    print("| check | ok | result |\n|---|---|---|")
    for check, ok, result in rows:
        print(f"| {check} | {'yes' if ok else 'NO'} | {result} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"gpu": name, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
