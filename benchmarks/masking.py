"""Speed and statistics of the spatiotemporal masker on the paper's 450 x 10 token grid.

    python benchmarks/masking.py [--calls 500] [--stat-batches 1000]

Prints the numbers and writes them to benchmarks/results/masking.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from brainjepa.masking import SpatiotemporalMasker

R, P, BATCH = 450, 10, 16


def time_per_call(fn, calls: int, warmup: int = 50) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
    }


def statistics(masker: SpatiotemporalMasker, batches: int, rng: np.random.Generator) -> dict[str, float]:
    keys = ("context", "alpha", "beta", "gamma", "target")
    sums = dict.fromkeys([*keys, *(f"{k}_fraction" for k in keys)], 0.0)
    empty_batches = last_visible = samples = 0
    valid_entries = total_entries = trimmed_entries = 0
    for _ in range(batches):
        mb = masker(BATCH, rng)
        for key, value in mb.counts().items():
            sums[key] += value / batches
        empty_batches += bool((mb.target_valid.sum(-1) == 0).any())
        last_visible += int(((mb.context_idx % P == P - 1) & mb.context_valid).any(1).sum())
        samples += BATCH
        valid_entries += int(mb.target_valid.sum())
        total_entries += mb.target_valid.numel()
        trimmed_entries += sum(mb.block(k)[1].numel() for k in range(mb.n_blocks))
    return {
        **{f"mean_{k}": v for k, v in sums.items()},
        "fraction_batches_with_empty_region": empty_batches / batches,
        "fraction_samples_last_patch_visible": last_visible / samples,
        "target_padding_efficiency": valid_entries / total_entries,
        "target_padding_efficiency_per_block": valid_entries / trimmed_entries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="timed calls (after 50 warm-up calls)")
    parser.add_argument("--stat-batches", type=int, default=1000, help="batches of 16 for the statistics")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "masking.json")
    args = parser.parse_args()

    torch.set_num_threads(1)  # as in a DataLoader worker, where collate runs during training
    masker = SpatiotemporalMasker(R, P, seed=0)
    rng = np.random.default_rng(0)
    samples = [torch.randn(R, 16 * P) for _ in range(BATCH)]
    result = {
        "grid": [R, P],
        "batch_size": BATCH,
        "n_blocks": masker.n_blocks,
        "settings": masker.describe(),
        "masks_per_batch": time_per_call(lambda: masker(BATCH, rng), args.calls),
        "collate_per_batch": time_per_call(lambda: masker.collate(samples), args.calls),
        "statistics": statistics(masker, args.stat_batches, rng),
        "stat_batches": args.stat_batches,
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
    }
    for name in ("masks_per_batch", "collate_per_batch"):
        t = result[name]
        print(f"{name:18s} median {t['median_ms']:.3f} ms  (p10 {t['p10_ms']:.3f}, p90 {t['p90_ms']:.3f})")
    for key, value in result["statistics"].items():
        print(f"{key:38s} {value:10.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
