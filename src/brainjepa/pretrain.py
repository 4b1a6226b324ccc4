"""Brain-JEPA pretraining: one CPU, one GPU, or many GPUs via torchrun/DDP (docs/method.md).

One optimizer step (:meth:`Trainer.step`), for each of ``accum_steps`` micro-batches (x: B x R x
T with its spatiotemporal masks), in the marked steps of the code:

1. targets: the EMA target encoder's features at the target tokens, layer-normed; with
   ``train.center_targets`` (default) each position's batch mean is subtracted, so position
   alone predicts nothing (:func:`brainjepa.objective.target_features`). Without centring the
   encoder's last block computes only the target tokens;
2. context: the online encoder on the context tokens -> z (B x Nc x D);
3. prediction and loss: one predictor pass per target block as in I-JEPA, blocks grouped by
   region (alpha, beta, gamma); loss = mean over blocks of the mean over the block's valid
   tokens of Smooth-L1 or squared error (:func:`brainjepa.objective.block_loss_sum`). Each group
   is backpropagated as soon as its loss is known into a detached copy of z (one group's
   predictor activations alive at a time). When the CPU attention kernel runs (bf16 on CPU, one
   process, not compiled) the predictor's first-block context part is computed once and shared
   by every pass (the same numbers: :meth:`brainjepa.model.BrainPredictor.context_state`);
4. backward through the encoder once, from z's accumulated gradient;
5. gradient clipping (optional), AdamW (no weight decay on biases and norms), and the EMA update
   of the target encoder.

Every ``train.diagnose_every`` steps the representation diagnostics
(:mod:`brainjepa.diagnostics`: context reliance, collapse of both encoders, position vs subject
variance, effective rank) go into metrics.jsonl as ``diag_*`` and a problem is logged as a
warning in words; every record also carries ``ema_init_share``, the weight the target encoder
still gives its random initialisation.

Schedules are functions of the optimizer step s = 0 .. H-1 (:class:`Schedule`). The horizon H is
``train.max_steps`` when set (``--max-steps``: a short run still sees the whole schedule), else
``epochs x steps_per_epoch``. Every schedule reaches its final value at step H-1; in particular
the EMA momentum used after the last step is exactly ``ema_end``.

Exact resume. Each epoch has exactly ``steps_per_epoch`` optimizer steps of ``accum_steps``
whole micro-batches (left-over batches are dropped), so the data position is a function of the
step. The data order is a function of (seed, epoch) (:class:`ShardSampler`), every random window
of (seed, epoch, sample) (:class:`brainjepa.data.WindowDataset`), and the masks and the global
torch RNG (drop path) of (seed, rank, step): they are re-derived each step instead of being
carried along. A checkpoint therefore holds the weights, the optimizer state and the step; a run
resumed from it repeats the uninterrupted run's losses exactly (same precision and world
size; tested in fp32 and bf16).

Distributed. Under torchrun (WORLD_SIZE > 1) the process group is initialised from env:// (NCCL
on GPU, gloo on CPU); the encoder and the predictor are DDP modules, each rank reads its own
shard of every epoch, the EMA is applied identically on every rank, rank 0 alone writes files.

Run folder: config.yaml, metrics.jsonl, gradients.csv, normalization.json, checkpoints/,
loss.png, diagnostics.png, bundle/; tensorboard/ when TensorBoard is installed.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import json
import logging
import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import __version__
from .attention import uses_chunked_attention
from .bundle import export_run
from .data import (
    CohortSeries,
    WindowDataset,
    choose_normalization,
    fit_scaler,
    open_cohort,
    report_scaling,
    resolve_target_tr,
)
from .diagnostics import diagnose_batch, ema_init_share, feature_stats, problems
from .errors import BrainJEPAError, ConfigError, DataError
from .gradients import BrainGradients, connectivity, load_gradients_csv, save_gradients_csv
from .masking import MaskBatch, SpatiotemporalMasker
from .model import BrainEncoder, BrainPredictor, ModelConfig
from .objective import (
    LOSSES,
    block_groups,
    block_loss_sum,
    context_tokens,
    group_tokens,
    n_blocks,
    split_targets,
    target_features,
)
from .report import plot_diagnostics_history, plot_loss_curve
from .runio import Heartbeat, MetricsLog, find_checkpoints, load_latest_checkpoint, save_checkpoint, write_text_atomic
from .runs import check_gradient_inputs, dump_config, load_config, nonfinite_loss_error, resolve_config
from .schedules import warmup_cosine
from .transforms import FITTED_NORMALIZATIONS, normalization_from_dict, normalization_to_dict

__all__ = ["pretrain", "load_config", "Schedule", "ShardSampler", "Trainer"]

log = logging.getLogger(__name__)

# config keys that may change when a run is resumed (they do not change the numbers)
RESUMABLE_CHANGES = {
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_last",
    "train.device",
    "train.precision",
    "train.compile",
    "train.collapse_std",
    "data.num_workers",
    "data.on_error",
}
COLLAPSE_WARN_EVERY = 1000  # steps between repeated collapse warnings
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


def _free_memory_to_os() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim) after a step on CPU: tensors
    of varying sizes otherwise leave free holes that the process keeps (measured: +250 MB RSS
    over 24 tiny bf16 steps; the call takes 20-40 ms, ~1.5% of such a step). No-op where glibc
    is not the allocator."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# ------------------------------------------------------------------------------- schedules


@dataclass
class Schedule:
    """Learning rate, weight decay and EMA momentum at optimizer step s = 0 .. total_steps-1.

    lr: linear warmup start_lr -> lr over ``warmup_steps``, then cosine lr -> final_lr reaching
    final_lr at the last step. weight decay: cosine weight_decay -> final_weight_decay over all
    steps. momentum (applied after step s): linear ema_start -> ema_end, ema_end at the last step.
    """

    total_steps: int
    warmup_steps: int
    lr: float
    start_lr: float
    final_lr: float
    weight_decay: float
    final_weight_decay: float
    ema_start: float
    ema_end: float

    @classmethod
    def from_config(cls, optim: dict, total_steps: int) -> Schedule:
        """Warmup is ``warmup_epochs / epochs`` of the horizon ``total_steps``."""
        warmup = min(round(optim["warmup_epochs"] / optim["epochs"] * total_steps), total_steps)
        return cls(
            total_steps,
            warmup,
            optim["lr"],
            optim["start_lr"],
            optim["final_lr"],
            optim["weight_decay"],
            optim["final_weight_decay"],
            optim["ema_start"],
            optim["ema_end"],
        )

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.lr, self.start_lr, self.final_lr)

    def weight_decay_at(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, 0, self.weight_decay, self.weight_decay, self.final_weight_decay)

    def momentum_at(self, step: int) -> float:
        span = self.total_steps - 1
        t = 1.0 if span <= 0 else min(max(step / span, 0.0), 1.0)
        return self.ema_start + (self.ema_end - self.ema_start) * t


# ------------------------------------------------------------------------------- data order


class ShardSampler(torch.utils.data.Sampler):
    """This rank's share of a per-epoch permutation, cut to whole batches.

    The permutation of the ``n`` samples is a function of (seed, epoch) only; it is padded by
    wrapping around to a multiple of ``world_size`` (as DistributedSampler does) and rank r takes
    every world_size-th entry from r. Each rank yields ``n_batches * batch_size`` indices;
    ``set_epoch(epoch, skip_batches=k)`` starts the epoch after its first k batches (resume).
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed = seed
        self.per_rank = -(-n // world_size)
        self.n_batches = self.per_rank // batch_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip_batches)

    def __len__(self) -> int:
        return max(self.n_batches - self.skip, 0) * self.batch_size

    def __iter__(self):
        seed = int(np.random.SeedSequence((self.seed, self.epoch)).generate_state(1)[0])
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
        order += order[: self.per_rank * self.world_size - self.n]
        mine = order[self.rank :: self.world_size][: self.n_batches * self.batch_size]
        return iter(mine[self.skip * self.batch_size :])


# ------------------------------------------------------------------------------- the model


class Trainer:
    """Encoder, EMA target encoder, predictor, AdamW, and one optimizer step.

    ``step(micro_batches, step)`` runs the module docstring's recipe on a list of
    (x B x R x T, MaskBatch) micro-batches. ``ddp=True`` wraps the encoder and the predictor in
    DistributedDataParallel (the process group must exist).

    Memory: each region's predictor pass is backpropagated as soon as its loss is known, into a
    detached copy of the context features z, and the encoder once at the end from z's
    accumulated gradient. The gradients are those of the joint loss, but only one predictor
    pass's activations are alive at a time.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        gradients,
        config: dict,
        total_steps: int,
        device: torch.device | str = "cpu",
        ddp: bool = False,
    ):
        self.device = torch.device(device)
        self.config = config
        self.model_config = model_config
        train, optim = config["train"], config["optim"]
        if train["loss"] not in LOSSES:
            raise ConfigError(f"train.loss must be one of {LOSSES}, got {train['loss']!r}")
        self.loss = train["loss"]
        self.center_targets = train["center_targets"]
        if self.center_targets and optim["batch_size"] < 2:
            raise ConfigError(
                "train.center_targets subtracts each position's mean over the "
                "micro-batch, which needs optim.batch_size >= 2; raise the batch "
                "size or set train.center_targets=false"
            )
        torch.manual_seed(train["seed"])  # same initial weights on every rank
        self.encoder = BrainEncoder(model_config, gradients).to(self.device)
        self.predictor = BrainPredictor(model_config, gradients).to(self.device)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False).eval()
        self.ddp = ddp
        self.encoder_run: nn.Module = self.encoder
        self.predictor_run: nn.Module = self.predictor
        if ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # the only buffers (gradients, sine-cosine table) are equal on every rank and small
            self.encoder_run = nn.parallel.DistributedDataParallel(self.encoder, device_ids=ids)
            self.predictor_run = nn.parallel.DistributedDataParallel(self.predictor, device_ids=ids)
        self.params = [p for m in (self.encoder, self.predictor) for p in m.parameters()]
        decay = [p for p in self.params if p.ndim > 1]
        no_decay = [p for p in self.params if p.ndim <= 1]  # biases and norm weights
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": optim["weight_decay"], "apply_wd": True},
                {"params": no_decay, "weight_decay": 0.0, "apply_wd": False},
            ],
            lr=optim["lr"],
            betas=tuple(optim["betas"]),
        )
        self.schedule = Schedule.from_config(optim, total_steps)
        self.clip_grad = optim["clip_grad"]
        self.bf16 = _use_bf16(train["precision"], self.device)
        if self.device.type == "cpu":
            for name, value in CPU_KERNEL_CACHES.items():
                os.environ.setdefault(name, value)
        self.target_run: nn.Module = self.target_encoder
        self.compiled = False  # train.compile, where torch.compile can work
        if train["compile"]:
            problem = _compile_problem(self.device)
            if problem is None:
                self.compiled = True
                self.encoder_run = torch.compile(self.encoder_run, dynamic=True)
                self.predictor_run = torch.compile(self.predictor_run, dynamic=True)
                self.target_run = torch.compile(self.target_encoder, dynamic=True)
            else:
                log.warning(
                    "train.compile=true, but torch.compile cannot build kernels on this machine (%s): "
                    "training without compiling (slower); install a C++ compiler "
                    "(g++ or clang++, or name one in the CXX environment variable) to compile",
                    problem,
                )

    def _share_context(self) -> bool:
        """Compute the predictor's context part once per micro-batch (see the module notes):
        where the CPU attention kernel runs anyway (its log-sum-exp output is what makes the
        sharing exact), and neither DDP (its gradient hooks expect one backward per forward)
        nor torch.compile (it compiles the predictor's plain forward) is in use."""
        if self.ddp or self.compiled:
            return False
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        return uses_chunked_attention(self.device, dtype)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _sync(self, module: nn.Module, sync: bool):
        """DDP: accumulate locally unless ``sync`` (the last backward of the optimizer step)."""
        return module.no_sync() if self.ddp and not sync else nullcontext()

    def step(self, micro_batches: list[tuple[torch.Tensor, MaskBatch]], step: int, monitor: bool = False) -> dict:
        """One optimizer step at schedule step ``step``. Returns lr, wd, momentum (floats) and
        loss (mean over micro-batches), plus grad_norm, target_std, target_cos with ``monitor``
        (tensors, so nothing waits for the device unless asked)."""
        lr = self.schedule.lr_at(step)
        wd = self.schedule.weight_decay_at(step)
        momentum = self.schedule.momentum_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["apply_wd"]:
                group["weight_decay"] = wd
        self.encoder.train()
        self.predictor.train()
        n = len(micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        for i, (x, masks) in enumerate(micro_batches):
            last = i == n - 1
            x = x.to(self.device, non_blocking=True)
            ctx_idx, ctx_valid = (t.to(self.device, non_blocking=True) for t in context_tokens(masks))
            groups = [
                (idx.to(self.device, non_blocking=True), valid.to(self.device, non_blocking=True))
                for idx, valid in block_groups(masks)
            ]
            blocks = n_blocks(masks)
            with self._sync(self.encoder_run, last):
                # 1. targets: the EMA target encoder's (centred) features at the target tokens
                with torch.no_grad(), self.autocast():
                    h = target_features(self.target_run, x, group_tokens(groups)[0], self.center_targets)
                # 2. context: the online encoder on the context tokens
                with self.autocast():
                    z = self.encoder_run(x, ctx_idx, ctx_valid)
                # 3. prediction and loss, one region group at a time, backpropagated into a
                #    detached copy of z (one group's predictor activations alive at a time)
                z_in = z.detach().requires_grad_()
                shared = shared_in = None
                if self._share_context():  # exact fast path: the first block's context part once
                    with self.autocast():
                        shared = self.predictor.context_state(z_in, ctx_idx, ctx_valid)
                    shared_in = shared.detached()  # collects the gradients of every pass
                for g, ((idx, valid), targets) in enumerate(zip(groups, split_targets(h, groups))):
                    with self._sync(self.predictor_run, last and g == len(groups) - 1):
                        with self.autocast():
                            block_sum = block_loss_sum(
                                self.predictor_run, z_in, ctx_idx, ctx_valid, idx, valid, targets, self.loss, shared_in
                            )
                        (block_sum / (blocks * n)).backward()
                    loss_sum += block_sum.detach() / blocks
                # 4. backward through the encoder, once
                if shared is not None:
                    shared.backward(shared_in)  # into z_in and the predictor's first block
                z.backward(z_in.grad)
        # 5. optimizer step (optional clipping), then the EMA update of the target encoder
        out = {"loss": loss_sum / n, "lr": lr, "wd": wd, "momentum": momentum}
        if self.clip_grad is not None:
            out["grad_norm"] = nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        elif monitor:
            out["grad_norm"] = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params if p.grad is not None])
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            target = list(self.target_encoder.parameters())
            online = list(self.encoder.parameters())
            torch._foreach_lerp_(target, online, 1.0 - momentum)  # t <- m t + (1 - m) online
        if monitor:  # on the last micro-batch's valid target tokens
            stats = feature_stats(h[group_tokens(groups)[1]])
            out.update(target_std=stats["std"], target_cos=stats["cos"])
        if self.device.type == "cpu":
            _free_memory_to_os()
        return out

    def diagnose(self, x: torch.Tensor, masks: MaskBatch) -> dict[str, float]:
        """:func:`brainjepa.diagnostics.diagnose_batch` on one micro-batch, with this run's
        modules, loss and target centring."""
        return diagnose_batch(
            self.encoder,
            self.target_encoder,
            self.predictor,
            x,
            masks,
            loss=self.loss,
            center=self.center_targets,
            autocast=self.autocast(),
        )

    def state_dict(self) -> dict:
        return {
            "encoder": self.encoder.state_dict(),
            "target_encoder": self.target_encoder.state_dict(),
            "predictor": self.predictor.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.target_encoder.load_state_dict(state["target_encoder"])
        self.predictor.load_state_dict(state["predictor"])
        self.optimizer.load_state_dict(state["optimizer"])


def _compile_problem(device: torch.device) -> str | None:
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


def _use_bf16(precision: str, device: torch.device) -> bool:
    """``auto``: bf16 autocast where the hardware computes in bf16 natively (CUDA GPUs that
    support it; CPUs with AVX512-BF16 or AMX, where bf16 matmuls run 4x faster than fp32),
    fp32 elsewhere (bf16 there is emulated and no faster)."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_has_bf16_units()


def _cpu_has_bf16_units() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: may move
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


# ------------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int
    world_size: int
    device: torch.device
    created: bool  # this call initialised the process group (and tears it down)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def from_rank0(self, fn, what: str = "preparing the run"):
        """Run ``fn`` on rank 0 while the other ranks wait, and give every rank its result.

        Rank 0 tells the others whether ``fn`` succeeded before anyone waits any further, so a
        failure there stops every rank instead of leaving them waiting for rank 0 forever.

        Args:
            fn: the work to do on rank 0 only (no arguments); its result must be picklable.
            what: what ``fn`` does, for the other ranks' error message.

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
                dist.broadcast_object_list([(None, error)], src=0)  # before raising: nobody waits
                raise
        if self.world_size > 1:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0)
            result, error = box[0]
        if error is not None:
            raise BrainJEPAError(
                f"rank {self.rank} of {self.world_size} stops: rank 0 failed while {what}: {error} "
                "(rank 0's output has its traceback)"
            )
        return result


def _setup_distributed(device_option: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_option == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device_option)
        except RuntimeError:
            raise ConfigError(f"train.device={device_option!r} is not a device (auto, cpu, cuda, cuda:N)") from None
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={device_option!r} but CUDA is not available; use --set train.device=cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
        created = True
    if dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), device, created)
    return _Dist(0, 1, device, created)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------- entry point


def _config_diff(old: dict, new: dict) -> list[str]:
    out = []
    for section in new:
        for key, value in new[section].items():
            name = f"{section}.{key}"
            before = old.get(section, {}).get(key)
            if name not in RESUMABLE_CHANGES and before != value:
                out.append(f"{name}: {before!r} in the checkpoint, {value!r} now")
    return out


def _prepare_inputs(cfg: dict, cohort, train_idx: np.ndarray, run_dir: Path, n_gradients: int, resume: bool) -> None:
    """Rank 0: create the run folder (removing half-written checkpoints), write gradients.csv
    and normalization.json (kept as they are on resume)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (run_dir / "checkpoints").glob(".*.tmp"):
        stale.unlink()
    grad_file, norm_file = run_dir / "gradients.csv", run_dir / "normalization.json"
    if not (resume and grad_file.is_file()):
        if cfg["data"]["gradients"] is not None:
            g, labels = load_gradients_csv(cfg["data"]["gradients"])
            labels = labels or cohort.roi_labels
        else:
            log.info("computing brain gradients from the group FC of %d training scans", len(train_idx))
            fc = connectivity(CohortSeries(cohort, train_idx))
            g = BrainGradients(n_components=n_gradients).fit(fc).gradients_
            labels = cohort.roi_labels
        save_gradients_csv(g, grad_file, labels)
    if not (resume and norm_file.is_file()):
        method = cfg["data"]["normalization"]
        if method == "auto":
            method = choose_normalization(cohort, train_idx)
            log.info(
                "data.normalization auto: %s (%s)",
                method,
                "the scans look like raw BOLD" if method == "psc" else "the scans are centred or scaled",
            )
        scaler = None
        if method in FITTED_NORMALIZATIONS:
            stored = cohort.normalization
            if stored and stored.get("method") == method and len(stored.get("median", [])) == cohort.n_rois:
                scaler = normalization_from_dict(stored)[1]
            else:
                scaler = fit_scaler(cohort, train_idx, method=method, seed=cfg["train"]["seed"])
        write_text_atomic(norm_file, json.dumps(normalization_to_dict(method, scaler), indent=1) + "\n")


def _model_config(cfg: dict, n_rois: int, n_gradients: int) -> ModelConfig:
    m = cfg["model"]
    if m["n_rois"] is not None and m["n_rois"] != n_rois:
        raise DataError(
            f"model.n_rois={m['n_rois']} but the data has {n_rois} ROIs; set model.n_rois=null to take it from the data"
        )
    overrides = {k: v for k, v in m.items() if k not in ("size", "n_rois", "n_gradients") and v is not None}
    return ModelConfig.from_size(m["size"], n_rois=n_rois, n_gradients=n_gradients, **overrides)


def pretrain(
    config,
    data,
    out_dir,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Pretrain a Brain-JEPA model; see the module docstring for the recipe.

    config: a built-in name or YAML path (:func:`load_config`) or a config dict (partial dicts are
    completed with defaults); data: anything :func:`brainjepa.data.open_cohort` opens (a folder of
    series files, a manifest, a prepared store, a list of R x T arrays) — its training split is
    used; out_dir: the run folder. ``resume`` continues from the latest checkpoint in out_dir;
    ``max_steps`` and ``seed`` override train.max_steps / train.seed. ``stop_after`` ends this
    call after that optimizer step (checkpointed) without changing the schedule, for jobs with a
    time limit that will be resumed.

    Returns {"run_dir", "steps", "total_steps", "final_loss", "bundle" (None unless the run
    finished), "world_size", "rank", "models": {"encoder", "target_encoder", "predictor"}} (the
    trained modules, for interactive use).
    """
    cfg = copy.deepcopy(config) if isinstance(config, dict) else load_config(config)
    train = dict(cfg.get("train") or {})
    if max_steps is not None:
        train["max_steps"] = max_steps
    if seed is not None:
        train["seed"] = seed
    cfg = resolve_config({**cfg, "train": train})
    ctx = _setup_distributed(cfg["train"]["device"])
    try:
        return _run(cfg, data, Path(out_dir), resume, progress, stop_after, ctx)
    finally:
        if ctx.created:
            dist.destroy_process_group()


def _run(cfg: dict, data, run_dir: Path, resume: bool, progress: bool, stop_after: int | None, ctx: _Dist) -> dict:
    train, optim = cfg["train"], cfg["optim"]
    rank0 = ctx.rank == 0
    seed = train["seed"]
    if not resume and find_checkpoints(run_dir):
        raise ConfigError(
            f"{run_dir} already holds checkpoints: pass --resume to continue that run, or choose a new --out folder"
        )
    ckpt = load_latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        if cfg["data"]["target_tr"] == "auto":  # the TR the run resolved when it started
            cfg["data"]["target_tr"] = ckpt["config"].get("data", {}).get("target_tr")
        diff = _config_diff(ckpt["config"], cfg)
        if diff:
            raise ConfigError(
                f"--resume: the config differs from the checkpoint's "
                f"({'; '.join(diff[:5])}); resume with the run's config.yaml"
            )
        if ckpt["data_state"]["world_size"] != ctx.world_size:
            raise ConfigError(
                f"--resume: the checkpoint was written by {ckpt['data_state']['world_size']} "
                f"process(es), this run has {ctx.world_size}; resume with the same number"
            )

    cohort = open_cohort(
        data,
        tr=cfg["data"]["tr"],
        orientation=cfg["data"]["orientation"],
        on_error=cfg["data"]["on_error"],
        tr_source=cfg["data"]["tr_source"],
    )
    train_idx = cohort.split_indices("train")
    if len(train_idx) == 0:
        raise DataError(f"{data}: the cohort has no training scans (split 'train')")
    cfg["data"]["target_tr"] = resolve_target_tr(cfg["data"]["target_tr"], cohort, train_idx)
    report_scaling(cohort, cfg["data"]["normalization"], train_idx)
    check_gradient_inputs(cfg, cohort.n_rois)
    n_grad = cfg["model"]["n_gradients"]
    ctx.from_rank0(
        lambda: _prepare_inputs(cfg, cohort, train_idx, run_dir, n_grad, resume),
        f"preparing the run folder {run_dir}",
    )
    gradients, _ = load_gradients_csv(run_dir / "gradients.csv")
    if gradients.shape[1] < n_grad:
        raise DataError(f"{run_dir / 'gradients.csv'} has {gradients.shape[1]} gradients, model.n_gradients={n_grad}")
    gradients = gradients[:, :n_grad]  # gradients are ordered by eigenvalue: keep the first
    with open(run_dir / "normalization.json") as f:
        method, scaler = normalization_from_dict(json.load(f))
    model_config = _model_config(cfg, cohort.n_rois, n_grad)
    dataset = WindowDataset(
        cohort,
        model_config.n_timepoints,
        target_tr=cfg["data"]["target_tr"],
        train=True,
        normalization=method,
        scaler=scaler,
        seed=seed,
        indices=train_idx,
    )
    batch, accum = optim["batch_size"], optim["accum_steps"]
    sampler = ShardSampler(len(dataset), batch, ctx.rank, ctx.world_size, seed)
    steps_per_epoch = sampler.n_batches // accum
    if steps_per_epoch == 0:
        need = batch * accum * ctx.world_size
        raise DataError(
            f"{len(dataset)} training scans are too few for one optimizer step of "
            f"batch_size {batch} x accum_steps {accum} x {ctx.world_size} process(es) = "
            f"{need}; lower optim.batch_size or optim.accum_steps"
        )
    total = train["max_steps"] or optim["epochs"] * steps_per_epoch
    workers = cfg["data"]["num_workers"]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=False,
    )
    masker = SpatiotemporalMasker(model_config.n_rois, model_config.n_patches, **cfg["mask"])
    trainer = Trainer(
        model_config, torch.as_tensor(gradients, dtype=torch.float32), cfg, total, ctx.device, ddp=ctx.world_size > 1
    )
    data_state = {
        "steps_per_epoch": steps_per_epoch,
        "n_samples": len(dataset),
        "world_size": ctx.world_size,
        "batch_size": batch,
        "accum_steps": accum,
    }
    step = 0
    if ckpt is not None:
        saved = {k: ckpt["data_state"][k] for k in data_state}
        if saved != data_state:
            raise DataError(
                f"--resume: the data or batching changed since the checkpoint ({saved} "
                f"then, {data_state} now); resume with the same data"
            )
        trainer.load_state_dict(ckpt)
        step = int(ckpt["step"])
        del ckpt
    end = total if stop_after is None else min(total, max(stop_after, step))
    if rank0:
        write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
        n_params = sum(p.numel() for p in trainer.params)
        log.info(
            "pretraining %s (%s trainable parameters) on %d scans x %d ROIs, %d process(es) "
            "on %s, %s; %d steps of %d x %d samples (%d per epoch), from step %d",
            cfg["model"]["size"],
            f"{n_params:,}",
            len(dataset),
            cohort.n_rois,
            ctx.world_size,
            ctx.device,
            "bf16" if trainer.bf16 else "fp32",
            total,
            batch,
            accum,
            steps_per_epoch,
            step,
        )
    metrics = MetricsLog(run_dir, step if resume else None) if rank0 else None
    bar = None
    if rank0 and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, desc="pretrain")
    tokens_per_sample = model_config.n_tokens
    init_share = ema_init_share(trainer.schedule.momentum_at, step)  # of the target encoder
    if rank0 and step == 0:
        final_share = ema_init_share(trainer.schedule.momentum_at, total)
        if final_share > 0.5:
            log.warning(
                "the EMA schedule (optim.ema_start %g -> ema_end %g over %d steps) leaves "
                "%.0f%% of the target encoder's random initialisation in it at the end: "
                "lower optim.ema_start / optim.ema_end for a run this short",
                optim["ema_start"],
                optim["ema_end"],
                total,
                100 * final_share,
            )
    last_time, last_step, last_warn, final_loss = time.perf_counter(), step, None, None
    first_step = step
    heartbeat = Heartbeat(total) if rank0 and bar is None else None  # a log line every 30 s
    try:
        while step < end:
            epoch, position = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, skip_batches=position * accum)
            dataset.set_epoch(epoch)
            batches = iter(loader)
            while step < end and step < (epoch + 1) * steps_per_epoch:
                seq = np.random.SeedSequence((seed, ctx.rank, step))
                torch.manual_seed(int(seq.generate_state(1)[0]))  # drop path, per step and rank
                mask_rng = np.random.default_rng(seq)
                micro = []
                for _ in range(accum):
                    x = next(batches)
                    micro.append((x, masker(x.shape[0], mask_rng)))
                diagnose = (
                    rank0
                    and train["diagnose_every"] > 0
                    and ((step + 1) % train["diagnose_every"] == 0 or step + 1 == end)
                )
                monitor = diagnose or (step + 1) % train["log_every"] == 0 or step + 1 == end or step == first_step
                stats = trainer.step(micro, step, monitor)
                # one process: check every step and name the batch's scans (several processes
                # check at the logged steps below, together, so that no rank waits for another)
                if ctx.world_size == 1 and not bool(torch.isfinite(stats["loss"].detach())):
                    replay = ShardSampler(sampler.n, batch, ctx.rank, ctx.world_size, seed)
                    replay.set_epoch(epoch)
                    order = list(replay)
                    first = (step - epoch * steps_per_epoch) * accum * batch
                    names = [cohort.name(int(dataset.indices[i])) for i in order[first : first + accum * batch]]
                    raise nonfinite_loss_error(float(stats["loss"]), step + 1, names)
                init_share *= stats["momentum"]
                step += 1
                if bar is not None:
                    bar.update(1)
                if monitor:
                    loss = stats["loss"].detach()
                    if ctx.world_size > 1:
                        dist.all_reduce(loss)
                        loss /= ctx.world_size
                    final_loss = float(loss)
                    if not math.isfinite(final_loss):
                        raise BrainJEPAError(
                            f"the loss became {final_loss} at step {step}; lower "
                            "optim.lr or set optim.clip_grad, and resume from the "
                            "last checkpoint or restart"
                        )
                    now = time.perf_counter()
                    rate = (
                        (step - last_step)
                        * batch
                        * accum
                        * tokens_per_sample
                        * ctx.world_size
                        / max(now - last_time, 1e-9)
                    )
                    last_time, last_step = now, step
                    if rank0:
                        record = _record(step, steps_per_epoch, stats, final_loss, micro, rate, ctx.device)
                        record["ema_init_share"] = init_share
                        if diagnose:
                            diag = trainer.diagnose(*micro[0])
                            record.update({f"diag_{k}": round(v, 6) for k, v in diag.items()})
                            for message in problems(diag, train["collapse_std"]):
                                log.warning("diagnostics at step %d: %s", step, message)
                        metrics.write(record)
                        if bar is not None:
                            bar.set_postfix(loss=f"{final_loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{rate:,.0f}")
                        if record["target_std"] < train["collapse_std"] and (
                            last_warn is None or step - last_warn >= COLLAPSE_WARN_EVERY
                        ):
                            last_warn = step
                            log.warning(
                                "collapse monitor: target feature std %.4f < %.4f at step %d "
                                "(mean token cosine %.3f); the representations may be "
                                "collapsing: check optim.lr, the EMA momentum and the masks",
                                record["target_std"],
                                train["collapse_std"],
                                step,
                                record["target_cos"],
                            )
                if rank0 and (step % train["checkpoint_every"] == 0 or step == end):
                    state = {
                        "step": step,
                        "epoch": step // steps_per_epoch,
                        "model_config": model_config.to_dict(),
                        "config": cfg,
                        **trainer.state_dict(),
                        "rng": {"scheme": "derived from (seed, rank, step)", "seed": seed},
                        "data_state": {
                            **data_state,
                            "epoch": step // steps_per_epoch,
                            "batches_done": (step % steps_per_epoch) * accum,
                        },
                        "loss_name": train["loss"],
                        "total_steps": total,
                        "brainjepa_version": __version__,
                    }
                    save_checkpoint(state, run_dir, train["keep_last"])
                if heartbeat is not None:  # after the step's loss is known
                    heartbeat(step, final_loss)
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
    bundle = None
    if rank0:
        if (run_dir / "metrics.jsonl").stat().st_size:
            try:
                plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
                if train["diagnose_every"]:
                    plot_diagnostics_history(run_dir / "metrics.jsonl", run_dir / "diagnostics.png")
            except BrainJEPAError as exc:  # matplotlib missing must not fail a finished run
                log.warning("no loss.png / diagnostics.png: %s", exc)
        if step >= total and find_checkpoints(run_dir):
            bundle = str(export_run(run_dir))
    ctx.barrier()
    return {
        "run_dir": str(run_dir),
        "steps": step,
        "total_steps": total,
        "final_loss": final_loss,
        "bundle": bundle,
        "world_size": ctx.world_size,
        "rank": ctx.rank,
        "models": {
            "encoder": trainer.encoder,
            "target_encoder": trainer.target_encoder,
            "predictor": trainer.predictor,
        },
    }


def _record(
    step: int,
    steps_per_epoch: int,
    stats: dict,
    loss: float,
    micro: list[tuple[torch.Tensor, MaskBatch]],
    tokens_per_s: float,
    device,
) -> dict:
    counts = [m.counts() for _, m in micro]
    mean = {k: sum(c[k] for c in counts) / len(counts) for k in ("context", "target", "alpha", "beta", "gamma")}
    return {
        "step": step,
        "epoch": round(step / steps_per_epoch, 4),
        "loss": loss,
        "lr": stats["lr"],
        "wd": stats["wd"],
        "momentum": stats["momentum"],
        "grad_norm": float(stats["grad_norm"]),
        "target_std": float(stats["target_std"]),
        "target_cos": float(stats["target_cos"]),
        "context_tokens": mean["context"],
        "target_tokens": mean["target"],
        "alpha_tokens": mean["alpha"],
        "beta_tokens": mean["beta"],
        "gamma_tokens": mean["gamma"],
        "tokens_per_s": round(tokens_per_s, 1),
        "peak_mem_mb": round(_peak_memory_mb(device), 1),
    }
