"""A compiled row softmax for the chunked bf16 attention on CPUs, built on this machine at first use.

Attention's softmax is most of what the chunked kernel (:mod:`brainjepa.attention`) spends
outside its matrix products: PyTorch's CPU softmax makes three passes over each score tile and
costs about 0.6 ns per score on the machine this project is developed on, a third of the
embedding's time. ``kernels/softmax_bf16.c`` (shipped with the package) does it in two passes
over each row while the row is in the L1 cache, with a polynomial exponential: about 0.25 ns per
score there, with the same single bf16 rounding of the probabilities, and the log-sum-exp of
each row for free. It is plain C (no PyTorch headers) called through :mod:`ctypes`, which
releases the GIL; its rows are split over torch's thread count.

It is compiled once per machine with the C compiler at hand (``$CC``, else ``cc``, ``gcc`` or
``clang``) and ``-O3 -march=native`` into the cache folder
(:func:`brainjepa.precision.cache_dir`), under a name that hashes the source, the compiler's
version, the flags and the CPU's features, so a home folder shared by different machines keeps
one build per kind of CPU. The library is checked against PyTorch's softmax before it is used.
Where no compiler works (or ``BRAINJEPA_NATIVE=0``), attention uses PyTorch's softmax: the same
results to bf16 rounding, only slower; the reason is logged once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "softmax_bf16.c"
FLAG_SETS = (["-O3", "-march=native"], ["-O3"])  # the second where -march=native is unknown
COMMON_FLAGS = ["-fPIC", "-shared", "-pthread", "-std=c99", "-D_POSIX_C_SOURCE=200809L"]
COMPILE_TIMEOUT_S = 120

_state: dict = {"fn": None, "tried": False, "reason": ""}


def enabled() -> bool:
    """Whether the compiled softmax may be used (``BRAINJEPA_NATIVE`` is not ``0``/``false``/``off``).

    Returns:
        False when the environment variable turns it off.
    """
    return os.environ.get("BRAINJEPA_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC``, else the first of ``cc``, ``gcc``, ``clang`` on the PATH.

    Returns:
        The command as a list of words, or None when there is none.
    """
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _library_path(cc: list[str], flags: list[str]) -> Path:
    from .precision import cache_dir, cpuinfo

    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(cc).encode(), version.encode(), " ".join(flags).encode()):
        h.update(part + b"\0")
    h.update((cpuinfo("flags", "features") or f"{platform.machine()} {platform.processor()}").encode())
    suffix = ".dll" if os.name == "nt" else ".so"
    return cache_dir() / "kernels" / f"softmax_bf16-{h.hexdigest()[:16]}{suffix}"


def _compile(cc: list[str], flags: list[str], target: Path) -> None:
    """Compile the source into ``target`` (atomically: a concurrent process sees it whole or not
    at all). Raises OSError / subprocess errors / RuntimeError with the compiler's message."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=target.suffix)
    os.close(fd)
    try:
        cmd = [*cc, *flags, *COMMON_FLAGS, "-o", tmp, str(SOURCE)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(path: Path):
    fn = ctypes.CDLL(str(path)).brainjepa_softmax_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]  # fmt: skip
    return fn


def _self_check(fn) -> str:
    """'' when the library agrees with PyTorch's softmax on awkward rows, else what differs."""
    gen = torch.Generator().manual_seed(0)
    for rows, n in ((7, 5), (33, 130), (4, 1000)):
        x = (torch.randn(rows, n, generator=gen) * 4).to(torch.bfloat16)
        x[1, ::3] = float("-inf")  # masked keys
        x[2] = float("-inf")  # a row without keys
        y, lse = torch.empty_like(x), torch.empty(rows)
        if fn(x.data_ptr(), n, y.data_ptr(), n, rows, n, lse.data_ptr(), 2) != 0:
            return "it reported an error"
        ref = torch.softmax(x.float(), -1).nan_to_num(0.0)
        ref_lse = torch.logsumexp(x.float(), -1)
        if not torch.allclose(y.float(), ref, rtol=8e-3, atol=1e-6):
            return f"softmax differs by {(y.float() - ref).abs().max():.3g} at {rows} x {n}"
        if not torch.allclose(lse, ref_lse, rtol=1e-5, atol=1e-5, equal_nan=True) or bool(y[2].any()):
            return f"log-sum-exp differs at {rows} x {n}"
    return ""


def _load():
    if not enabled():
        return None, "BRAINJEPA_NATIVE=0"
    if not SOURCE.is_file():
        return None, f"{SOURCE} is missing from the installation"
    cc = compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    errors = []
    for flags in FLAG_SETS:
        path = _library_path(cc, flags)
        try:
            if not path.is_file():
                _compile(cc, flags, path)
                logger.info("compiled the bf16 softmax kernel: %s", path)
            fn = _bind(path)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
            continue
        problem = _self_check(fn)
        if not problem:
            return fn, ""
        errors.append(f"{path} failed its check: {problem}")
    return None, "; ".join(errors)


def softmax_fn():
    """The compiled softmax, building it on first call.

    Returns:
        The ctypes function, or None (the reason: :func:`unavailable_reason`).
    """
    if not _state["tried"]:
        _state["tried"] = True
        _state["fn"], _state["reason"] = _load()
        if _state["fn"] is None:
            logger.warning("bf16 attention uses PyTorch's softmax (slower): %s", _state["reason"])
    return _state["fn"]


def unavailable_reason() -> str:
    """Why the compiled softmax is not in use ('' when it is, or has not been tried yet)."""
    return _state["reason"]


def reset() -> None:
    """Forget the loaded library, so that the next use tries again (tests, a changed ``CC``)."""
    _state.update(fn=None, tried=False, reason="")


def softmax_bf16(scores: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None = None) -> bool:
    """Row softmax of a bf16 CPU matrix with the compiled kernel.

    Args:
        scores: (rows, n) bf16, unit stride along n; entries of -inf are masked keys (a row of
            only -inf gets zeros, log-sum-exp -inf).
        out: (rows, n) bf16, unit stride along n; may be ``scores`` itself.
        lse: (rows,) contiguous fp32 for each row's log-sum-exp, or None.

    Returns:
        False (nothing written) when the kernel is unavailable or the tensors do not fit it; the
        caller then uses PyTorch's softmax.

    Raises:
        MemoryError: the kernel could not allocate its row buffer or start its threads.
    """
    ok = (
        scores.dtype == out.dtype == torch.bfloat16
        and scores.device.type == out.device.type == "cpu"
        and scores.dim() == out.dim() == 2
        and scores.shape == out.shape
        and scores.stride(1) == out.stride(1) == 1
        and (lse is None or (lse.dtype == torch.float32 and lse.is_contiguous() and lse.numel() == len(scores)))
    )
    fn = softmax_fn() if ok else None
    if fn is None:
        return False
    rows, n = scores.shape
    threads = max(1, min(torch.get_num_threads(), rows // 16))
    status = fn(scores.data_ptr(), scores.stride(0), out.data_ptr(), out.stride(0), rows, n,
                None if lse is None else lse.data_ptr(), threads)  # fmt: skip
    if status != 0:
        raise MemoryError("the bf16 softmax kernel could not allocate its row buffer or start its threads")
    return True
