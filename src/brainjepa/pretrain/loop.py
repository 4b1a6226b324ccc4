"""The pretraining loop: one CPU, one GPU, or many GPUs via torchrun/DDP (docs/method.md).

One optimizer step is :meth:`brainjepa.pretrain.step.Trainer.step` (its docstring lists the
stages). This module runs the loop around it.

Every ``train.diagnose_every`` steps the representation diagnostics
(:mod:`brainjepa.diagnostics`: context reliance, collapse of both encoders, position vs subject
variance, effective rank) go into metrics.jsonl as ``diag_*`` and a problem is logged as a
warning in words; every record also carries ``ema_init_share``, the weight the target encoder
still gives its random initialisation.

Schedules are functions of the optimizer step s = 0 .. H-1 (:class:`brainjepa.schedules.Schedule`). The horizon H is
``train.max_steps`` when set (``--max-steps``: a short run still sees the whole schedule), else
``epochs x steps_per_epoch``. Every schedule reaches its final value at step H-1; in particular
the EMA momentum used after the last step is exactly ``ema_end``.

Exact resume. Each epoch has exactly ``steps_per_epoch`` optimizer steps of ``accum_steps``
whole micro-batches (left-over batches are dropped), so the data position is a function of the
step. The data order is a function of (seed, epoch)
(:class:`~brainjepa.pretrain.runtime.ShardSampler`), every random window of (seed, epoch,
sample) (:class:`brainjepa.data.WindowDataset`), and the masks and the global torch RNG (drop
path) of (seed, rank, step): they are re-derived each step instead of being carried along. A
checkpoint therefore holds the weights, the optimizer state and the step; a run resumed from
it repeats the uninterrupted run's losses exactly (same precision and world size; tested in
fp32 and bf16).

Distributed. Under torchrun (WORLD_SIZE > 1) the process group is initialised from env:// (NCCL
on GPU, gloo on CPU); the encoder and the predictor are DDP modules, each rank reads its own
shard of every epoch, the EMA is applied identically on every rank, rank 0 alone writes files.

Run folder: config.yaml, metrics.jsonl, gradients.csv, normalization.json, checkpoints/,
loss.png, diagnostics.png, bundle/; tensorboard/ when TensorBoard is installed.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import __version__
from ..bundle import export_run
from ..data import (
    CohortSeries,
    WindowDataset,
    choose_normalization,
    fit_scaler,
    open_cohort,
    report_scaling,
    resolve_target_tr,
)
from ..diagnostics import ema_init_share, problems
from ..errors import BrainJEPAError, ConfigError, DataError
from ..gradients import BrainGradients, connectivity, load_gradients_csv, save_gradients_csv
from ..masking import MaskBatch, SpatiotemporalMasker
from ..runio import Heartbeat, MetricsLog, find_checkpoints, load_latest_checkpoint, save_checkpoint, write_text_atomic
from ..transforms import FITTED_NORMALIZATIONS, normalization_from_dict, normalization_to_dict
from .config import config_diff, dump_config, load_config, model_config, resolve_config
from .plots import plot_diagnostics_history, plot_loss_curve
from .runtime import Dist, ShardSampler, peak_memory_mb, setup_distributed
from .step import Trainer

log = logging.getLogger(__name__)

COLLAPSE_WARN_EVERY = 1000  # steps between repeated collapse warnings


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
    ctx = setup_distributed(cfg["train"]["device"])
    try:
        return _run(cfg, data, Path(out_dir), resume, progress, stop_after, ctx)
    finally:
        if ctx.created:
            dist.destroy_process_group()


def _run(cfg: dict, data, run_dir: Path, resume: bool, progress: bool, stop_after: int | None, ctx: Dist) -> dict:
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
        diff = config_diff(ckpt["config"], cfg)
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
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / "checkpoints").glob(".*.tmp"):
            stale.unlink()

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
    ctx.from_rank0(lambda: _prepare_inputs(cfg, cohort, train_idx, run_dir, n_grad, resume))
    gradients, _ = load_gradients_csv(run_dir / "gradients.csv")
    if gradients.shape[1] < n_grad:
        raise DataError(f"{run_dir / 'gradients.csv'} has {gradients.shape[1]} gradients, model.n_gradients={n_grad}")
    gradients = gradients[:, :n_grad]  # gradients are ordered by eigenvalue: keep the first
    with open(run_dir / "normalization.json") as f:
        method, scaler = normalization_from_dict(json.load(f))
    arch = model_config(cfg, cohort.n_rois, n_grad)
    dataset = WindowDataset(
        cohort,
        arch.n_timepoints,
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
    masker = SpatiotemporalMasker(arch.n_rois, arch.n_patches, **cfg["mask"])
    trainer = Trainer(
        arch, torch.as_tensor(gradients, dtype=torch.float32), cfg, total, ctx.device, ddp=ctx.world_size > 1
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
        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, desc="pretrain")
    tokens_per_sample = arch.n_tokens
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
                        "model_config": arch.to_dict(),
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


def _prepare_inputs(cfg: dict, cohort, train_idx: np.ndarray, run_dir: Path, n_gradients: int, resume: bool) -> None:
    """Rank 0: write gradients.csv and normalization.json (kept as they are on resume)."""
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


def nonfinite_loss_error(loss: float, step: int, names: list[str]) -> BrainJEPAError:
    """The error for a loss that became NaN/Inf at optimizer step ``step`` (1-based), naming the
    scans of that step's batch."""
    unique = list(dict.fromkeys(names))
    shown = ", ".join(unique[:8]) + (f" and {len(unique) - 8} more" if len(unique) > 8 else "")
    return BrainJEPAError(
        f"the loss became {loss} at step {step}, on a batch of {shown}; check these scans (values, "
        "units, scaling), then lower optim.lr or set optim.clip_grad, and resume from the last "
        "checkpoint (--resume) or restart"
    )


def check_gradient_inputs(cfg: dict, n_rois: int) -> None:
    """Refuse, before any work, gradients that cannot fit the data: too many gradients for the
    ROI count (computed gradients), or a gradient file with another ROI count or too few columns."""
    n_grad = cfg["model"]["n_gradients"]
    path = cfg["data"]["gradients"]
    if path is None:
        if n_grad > n_rois - 2:
            raise ConfigError(
                f"model.n_gradients={n_grad} needs at least {n_grad + 2} ROIs but the data "
                f"has {n_rois}; pass --set model.n_gradients=N with N at most "
                f"{max(n_rois - 2, 1)}, or a precomputed file with --gradients FILE"
            )
        return
    g, _ = load_gradients_csv(path)
    if g.shape[0] != n_rois:
        raise ConfigError(
            f"{path}: {g.shape[0]} rows (ROIs) of gradients, but the data has {n_rois} "
            "ROIs; use the gradients of this parcellation (brainjepa gradients DATA --out FILE)"
        )
    if g.shape[1] < n_grad:
        raise ConfigError(
            f"{path}: {g.shape[1]} gradients, model.n_gradients={n_grad}; pass "
            f"--set model.n_gradients={g.shape[1]} or a file with more columns"
        )


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
        "peak_mem_mb": round(peak_memory_mb(device), 1),
    }
