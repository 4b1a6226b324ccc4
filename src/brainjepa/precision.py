"""``precision: auto`` on CPUs: bf16 only where this machine measures it faster than fp32.

Whether bf16 pays on a CPU is not a matter of its feature flags: a CPU with AVX512-BF16 units
can still run brainjepa's bf16 paths slower than fp32 (on one Intel Xeon the tiny model's
embedding took nearly twice as long in bf16), while another (an AMD EPYC) runs them twice as
fast. So :func:`cpu_prefers_bf16` times a short probe in both precisions (:func:`run_probe`: a
linear layer's matmul and one attention at a transformer block's shape, a fraction of a second
in all) and chooses bf16 only when it is clearly faster (:func:`decide`, :data:`MARGIN`).

The result is cached per machine (its CPU model), thread count, torch version and softmax
(compiled or PyTorch's, :mod:`brainjepa.native`) in
``precision.json`` under the cache folder (:func:`cache_dir`: ``BRAINJEPA_CACHE_DIR``, else
``$XDG_CACHE_HOME/brainjepa``, else ``~/.cache/brainjepa``), so the probe runs once per
machine; it is logged with its numbers either way. Delete the file (or set another folder) to
measure again.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from . import native
from .attention import attention
from .errors import ConfigError
from .runio import write_json_atomic

logger = logging.getLogger(__name__)

CACHE_FILE = "precision.json"
MARGIN = 0.9  # bf16 must take at most this fraction of fp32's time: a tie keeps fp32 (exact)
# the probe: a (tokens x width) @ (width x 4 width) matmul, as an MLP's first layer, and one
# self-attention over `tokens` tokens in `heads` heads of 64, as in brainjepa's small model
PROBE = {"tokens": 1024, "width": 384, "heads": 2, "head_dim": 64, "reps": 5}


def cache_dir() -> Path:
    """The folder of brainjepa's per-machine cache.

    Returns:
        ``BRAINJEPA_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/brainjepa``, else ``~/.cache/brainjepa``.
    """
    if os.environ.get("BRAINJEPA_CACHE_DIR"):
        return Path(os.environ["BRAINJEPA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "brainjepa"


def cpuinfo(*fields: str) -> str | None:
    """The first /proc/cpuinfo line naming one of ``fields`` (lower case), its value; None
    where there is no such line or file."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(fields):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """This machine's CPU model name.

    Returns:
        The ``model name`` of /proc/cpuinfo, else :func:`platform.processor`, else the machine type.
    """
    return cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cache_key(threads: int | None = None) -> str:
    """The cache entry of this machine, thread count and torch version.

    Args:
        threads: the thread count the decision is for (default: torch's current one).

    Returns:
        ``"<CPU model> | <threads> threads | torch <version> | softmax <compiled or torch>"``: the
        last part says whether bf16 attention runs brainjepa's compiled softmax
        (:mod:`brainjepa.native`), which changes what bf16 is worth.
    """
    threads = torch.get_num_threads() if threads is None else int(threads)
    softmax = "compiled" if native.softmax_fn() is not None else "torch"
    return f"{cpu_model()} | {threads} threads | torch {torch.__version__.split('+')[0]} | softmax {softmax}"


def run_probe(spec: dict | None = None) -> dict:
    """Time the probe in fp32 and in bf16 on the CPU, with torch's current thread count.

    The two precisions alternate, rep by rep, and each keeps its best time: on a machine shared
    with other work both then meet the same load, and a rep that lost its core does not count.

    Args:
        spec: the probe's sizes (default :data:`PROBE`).

    Returns:
        ``{"fp32": {...}, "bf16": {...}}``, each with the best seconds of the matmul and of the
        attention (``matmul_s``, ``attention_s``), their sum (``total_s``) and the matmul's GFLOP/s.
    """
    s = dict(PROBE, **(spec or {}))
    n, c, h, d = s["tokens"], s["width"], s["heads"], s["head_dim"]
    gen = torch.Generator().manual_seed(0)
    x32, w32 = torch.randn(n, c, generator=gen), torch.randn(c, 4 * c, generator=gen)
    qkv32 = torch.randn(3, 1, h, n, d, generator=gen)
    work = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, w, (q, k, v) = x32.to(dtype), w32.to(dtype), qkv32.to(dtype)
        work[name] = {"matmul_s": lambda x=x, w=w: x @ w, "attention_s": lambda q=q, k=k, v=v: attention(q, k, v)}
    best = {name: {part: float("inf") for part in parts} for name, parts in work.items()}
    with torch.inference_mode():
        for rep in range(s["reps"] + 1):  # rep 0 is a warm-up (kernel selection, first-touch pages)
            for name, parts in work.items():
                for part, fn in parts.items():
                    t = time.perf_counter()
                    fn()
                    if rep:
                        best[name][part] = min(best[name][part], time.perf_counter() - t)
    for b in best.values():
        b["total_s"] = b["matmul_s"] + b["attention_s"]
        b["matmul_gflops"] = 2 * n * c * 4 * c / b["matmul_s"] / 1e9
    return best


def decide(timings: dict, margin: float = MARGIN) -> bool:
    """Whether bf16 is clearly faster in a probe's timings.

    Args:
        timings: :func:`run_probe`'s result (only the two ``total_s`` are used).
        margin: bf16 wins only when its time is below ``margin`` x fp32's.

    Returns:
        True for bf16.
    """
    return timings["bf16"]["total_s"] < margin * timings["fp32"]["total_s"]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cpu_prefers_bf16(threads: int | None = None, refresh: bool = False, probe=run_probe) -> bool:
    """``precision: auto`` on this CPU: bf16 where the probe measures it clearly faster.

    Looks up this machine's entry in the cache (:func:`cache_key`) and otherwise runs the probe
    once and stores its numbers. A cache that cannot be read or written is no error: the probe
    then runs again next time.

    Args:
        threads: the thread count to decide for (default: torch's current one); the probe runs
            with it.
        refresh: ignore a cached entry and measure again.
        probe: the timing function (:func:`run_probe`; tests pass fixed timings).

    Returns:
        True for bf16.
    """
    threads = torch.get_num_threads() if threads is None else int(threads)
    key = cache_key(threads)
    path = cache_dir() / CACHE_FILE
    cache = _read_cache(path)
    entry = None if refresh else cache.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("bf16"), bool):
        logger.info("precision auto: %s (cached for %s in %s)", "bf16" if entry["bf16"] else "fp32", key, path)
        return entry["bf16"]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timings = probe()
    finally:
        torch.set_num_threads(previous)
    bf16 = decide(timings)
    logger.info(
        "precision auto: %s on %s (probe: fp32 %.1f ms, %.0f GFLOP/s matmul; bf16 %.1f ms, %.0f GFLOP/s matmul)",
        "bf16" if bf16 else "fp32",
        key,
        1e3 * timings["fp32"]["total_s"],
        timings["fp32"].get("matmul_gflops", float("nan")),
        1e3 * timings["bf16"]["total_s"],
        timings["bf16"].get("matmul_gflops", float("nan")),
    )
    cache[key] = {"bf16": bf16, "timings": timings, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, cache)
    except OSError as exc:
        logger.debug("precision auto: could not write the cache %s: %s", path, exc)
    return bf16


PRECISIONS = ("auto", "fp32", "bf16")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`.

    Raises:
        ConfigError: another value.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return precision


def use_bf16(precision: str, device: torch.device | str) -> bool:
    """Whether to compute in bf16.

    ``auto``: on CUDA, bf16 where the GPU supports it; on a CPU, :func:`cpu_prefers_bf16`;
    fp32 elsewhere.

    Args:
        precision: ``"auto"``, ``"bf16"`` or ``"fp32"``.
        device: the device.

    Returns:
        True for bf16.

    Raises:
        ConfigError: another precision.
    """
    if check_precision(precision) != "auto":
        return precision == "bf16"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_prefers_bf16()
