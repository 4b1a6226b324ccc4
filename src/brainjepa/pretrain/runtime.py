"""Where pretraining runs: precision, devices, processes, and the CPU's memory.

- :func:`use_bf16`: bf16 autocast where it is measured faster (:mod:`brainjepa.precision`).
- :func:`setup_distributed` / :class:`Dist`: one process, or one per GPU under torchrun
  (WORLD_SIZE > 1: the process group from env://, NCCL on GPUs, gloo on CPUs).
  :meth:`Dist.from_rank0` runs start-up work on rank 0 and hands every rank its result or its
  error, so a failure there ends every rank instead of leaving them waiting.
- :class:`ShardSampler`: each rank's share of a per-epoch permutation of the samples.
- :class:`StepMemory` (:data:`CPU_KERNEL_CACHES`, :func:`free_memory_to_os`): keep a long CPU
  run's memory flat; the training step only wraps itself in :meth:`StepMemory.step`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..errors import BrainJEPAError, ConfigError
from ..precision import use_bf16 as precision_choice

# Kernels oneDNN keeps compiled (its default, 1,024, is ~600 MB at these shapes); a step uses a
# few dozen shapes, a miss costs ~0.3 ms. Above it, PyTorch's ideep layer keeps its own cache of
# matmul objects (LRU_CACHE_CAPACITY, default 1,024): ~270 MB after five tiny bf16 steps, for no
# measurable speed (16 entries: same step time, peak 811-816 MB instead of 1,107). Both are set
# before the first bf16 matmul; the user's values win.
CPU_KERNEL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "16"}


def _glibc():
    """The C library if it is glibc (it has malloc_trim), else None."""
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        getattr(libc, "malloc_trim")  # noqa: B009 (AttributeError outside glibc)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def free_memory_to_os() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim) after a step on CPU: tensors
    of varying sizes otherwise leave free holes that the process keeps (measured: +250 MB RSS
    over 24 tiny bf16 steps; the call takes 20-40 ms, ~1.5% of such a step). No-op where glibc
    is not the allocator."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux: /proc/self/statm), or None where unknown."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# The heap is trimmed after a step only when the process holds this much more than the largest
# it held after any of the first TRIM_WARMUP_STEPS steps: a trim after every step kept a long run
# flat but made every step fault its activations in afresh (150,000-220,000 page faults, 3-5% of
# a small bf16 step at batch 2). The masks' sizes vary from step to step, and with them what a
# step needs, so one step is not enough to learn it: measured from the first step alone, the
# first step with a larger context went over the limit, and the trim made the next one fault
# everything in again.
TRIM_GROWTH = 1.25
TRIM_WARMUP_STEPS = 10


class StepMemory:
    """The training process's memory devices for its device; on a CPU: bounded kernel caches
    (:data:`CPU_KERNEL_CACHES`, set when this is made, which must be before the first bf16
    matmul) and, once the first :data:`TRIM_WARMUP_STEPS` steps have shown what a step holds,
    the heap trimmed (:func:`free_memory_to_os`) after a step that leaves the process
    :data:`TRIM_GROWTH` times larger than that (after every step where the resident size
    cannot be read). Nothing on a GPU.

    Args:
        device: the training device.
    """

    def __init__(self, device: torch.device):
        self.cpu = torch.device(device).type == "cpu"
        self.steps = 0
        self.baseline = 0  # the largest resident size after a warm-up step
        if self.cpu:
            for name, value in CPU_KERNEL_CACHES.items():
                os.environ.setdefault(name, value)

    @contextmanager
    def step(self) -> Iterator[None]:
        """Wrap one optimizer step: on a CPU, the heap's free pages go back to the OS after it
        when the process has grown (see the class)."""
        yield
        if not self.cpu:
            return
        rss = resident_bytes()
        self.steps += 1
        if rss is None:
            free_memory_to_os()
        elif self.steps <= TRIM_WARMUP_STEPS:
            self.baseline = max(self.baseline, rss)
        elif rss > self.baseline * TRIM_GROWTH:
            free_memory_to_os()


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to train under bf16 autocast (:func:`brainjepa.precision.use_bf16`).

    ``auto`` chooses bf16 on CUDA GPUs that support it and, on a CPU, only where a short timed
    probe finds bf16 clearly faster than fp32 on this machine (cached per machine and thread
    count; :func:`brainjepa.precision.cpu_prefers_bf16`), fp32 elsewhere.

    Args:
        precision: "auto", "bf16" or "fp32" (train.precision).
        device: the training device.

    Returns:
        True for bf16.
    """
    return precision_choice(precision, device)


@dataclass
class Dist:
    """This process's place in the run: rank, process count and device.

    Args:
        rank: this process's rank (0: the one that writes files).
        world_size: the number of processes.
        device: this process's device.
        created: this call initialised the process group (and tears it down).
    """

    rank: int
    world_size: int
    device: torch.device
    created: bool

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def from_rank0(self, fn, what: str = "preparing the run", group=None):
        """Run ``fn`` on rank 0 while the other ranks wait, and give every rank its result.

        Rank 0 tells the others whether ``fn`` succeeded before anyone waits any further, so a
        failure there stops every rank instead of leaving them waiting for rank 0 forever.

        Args:
            fn: the work to do on rank 0 only (no arguments); its result must be picklable.
            what: what ``fn`` does, for the other ranks' error message.
            group: the process group to hand the result over in (default: every process, with
                the backend's time limit; a gloo group with a longer one lets ``fn`` take longer).

        Returns:
            ``fn``'s result, on every rank.

        Raises:
            Exception: on rank 0, whatever ``fn`` raised.
            BrainJEPAError: on the other ranks, when ``fn`` failed on rank 0.
        """
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as exc:
                if self.world_size == 1:
                    raise
                error = f"{type(exc).__name__}: {exc}"
                dist.broadcast_object_list([(None, error)], src=0, group=group)  # before raising: nobody waits
                raise
        if self.world_size > 1:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0, group=group)
            result, error = box[0]
        if error is not None:
            raise BrainJEPAError(
                f"rank {self.rank} of {self.world_size} stops: rank 0 failed while {what}: {error} "
                "(rank 0's output has its traceback)"
            )
        return result


def setup_distributed(device_option: str, setting: str = "train.device", fix: str = "--set train.device=cpu") -> Dist:
    """Choose the device and join the process group under torchrun.

    With WORLD_SIZE > 1 the process group is initialised from env:// (NCCL on GPUs, gloo on CPUs);
    each process takes the GPU of its LOCAL_RANK.

    Args:
        device_option: train.device: "auto" (this process's GPU if there is one, else the CPU),
            "cpu", "cuda" or "cuda:N".
        setting: the option's name, for messages.
        fix: how to choose the CPU instead, for messages.

    Returns:
        The process's :class:`Dist`.

    Raises:
        ConfigError: not a device, or CUDA asked for where it is not available.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_option == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device_option)
        except RuntimeError:
            raise ConfigError(f"{setting}={device_option!r} is not a device (auto, cpu, cuda, cuda:N)") from None
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={device_option!r} but CUDA is not available; use {fix}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
        created = True
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), device, created)
    return Dist(0, 1, device, created)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far, in MiB.

    Args:
        device: on CUDA the peak allocated by tensors, else the process's peak resident memory.

    Returns:
        The peak in MiB.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class ShardSampler(torch.utils.data.Sampler):
    """This rank's share of a per-epoch permutation, cut to whole batches.

    The permutation of the ``n`` samples is a function of (seed, epoch) only; it is padded by
    wrapping around to a multiple of ``world_size`` (as DistributedSampler does) and rank r takes
    every world_size-th entry from r. Each rank yields ``n_batches * batch_size`` indices.

    Args:
        n: the number of samples.
        batch_size: samples per batch.
        rank: this process's rank.
        world_size: the number of processes.
        seed: the run's seed.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed = seed
        self.per_rank = -(-n // world_size)
        self.n_batches = self.per_rank // batch_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose the epoch to iterate, and where in it to start.

        Args:
            epoch: the epoch (sets the permutation).
            skip_batches: start after the epoch's first ``skip_batches`` batches (resume).
        """
        self.epoch, self.skip = int(epoch), int(skip_batches)

    def __len__(self) -> int:
        return max(self.n_batches - self.skip, 0) * self.batch_size

    def __iter__(self):
        seed = int(np.random.SeedSequence((self.seed, self.epoch)).generate_state(1)[0])
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
        order += order[: self.per_rank * self.world_size - self.n]
        mine = order[self.rank :: self.world_size][: self.n_batches * self.batch_size]
        return iter(mine[self.skip * self.batch_size :])


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile's default backend cannot work on ``device``, or None if it can.

    On CPU it compiles C++ kernels at the first step, so a machine without a C++ compiler would
    fail there, in the middle of training.

    Args:
        device: the training device.

    Returns:
        The reason in words, or None (also when the check itself is unavailable).
    """
    if device.type != "cpu":
        return None
    try:  # here, not at the top: loading the compiler stack costs a second and ~70 MB
        from torch._inductor.cpp_builder import get_cpp_compiler  # private: may move
    except ImportError:
        return None
    try:
        get_cpp_compiler()
    except Exception as exc:  # InvalidCxxCompiler (no working compiler) and its relatives
        return f"{type(exc).__name__}: {exc}"
    return None
