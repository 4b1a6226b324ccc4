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

Run folder: config.yaml, training.json (the data summary and the recipe's changes from its
preset, for the model card), metrics.jsonl, gradients.csv, normalization.json, checkpoints/,
loss.png, diagnostics.png, bundle/; tensorboard/ when TensorBoard is installed.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import __version__
from ..bundle import export_run
from ..data import (
    CohortSeries,
    WindowDataset,
    open_cohort,
    report_scaling,
    resolve_normalization,
    resolve_target_tr,
)
from ..errors import BrainJEPAError, ConfigError, DataError
from ..gradients import BrainGradients, connectivity, load_gradients_csv, save_gradients_csv
from ..masking import MaskBatch, SpatiotemporalMasker
from ..modelcard import TRAINING_FILE
from ..runio import find_checkpoints, load_latest_checkpoint, save_checkpoint, write_text_atomic
from ..transforms import normalization_from_dict, normalization_to_dict
from .config import config_diff, dump_config, load_config, model_config, recipe_changes, resolve_config
from .monitor import Monitor, log_start
from .plots import plot_diagnostics_history, plot_loss_curve
from .runtime import Dist, ShardSampler, setup_distributed
from .step import Trainer

log = logging.getLogger(__name__)


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

    Args:
        config: a built-in name or YAML path (:func:`load_config`) or a config dict (partial dicts
            are completed with defaults).
        data: anything :func:`brainjepa.data.open_cohort` opens (a folder of series files, a
            manifest, a prepared store, a list of R x T arrays); its training split is used.
        out_dir: the run folder.
        resume: continue from the latest checkpoint in ``out_dir``.
        max_steps: overrides train.max_steps.
        seed: overrides train.seed.
        progress: show a progress bar (else a heartbeat line every 30 s).
        stop_after: end this call after that optimizer step (checkpointed) without changing the
            schedule, for jobs with a time limit that will be resumed.

    Returns:
        {"run_dir", "steps", "total_steps", "final_loss", "bundle" (None unless the run finished),
        "world_size", "rank", "models": {"encoder", "target_encoder", "predictor"}} (the trained
        modules, for interactive use).

    Raises:
        ConfigError: an invalid config, checkpoints in ``out_dir`` without ``resume``, or a
            resume whose config or process count differs from the checkpoint's.
        DataError: data that cannot be trained on (no training scans, too few for one step,
            gradients that do not fit).
        BrainJEPAError: a loss that becomes NaN/Inf.
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
    ckpt = _checked_resume(cfg, run_dir, resume, ctx)
    cohort, train_idx = _training_cohort(cfg, data)
    n_grad = cfg["model"]["n_gradients"]
    ctx.from_rank0(
        lambda: _prepare_inputs(cfg, cohort, train_idx, run_dir, n_grad, resume), f"preparing the run folder {run_dir}"
    )
    gradients, method, scaler, scope = _read_inputs(run_dir, n_grad)
    arch = model_config(cfg, cohort.n_rois, n_grad)
    dataset = WindowDataset(
        cohort,
        arch.n_timepoints,
        target_tr=cfg["data"]["target_tr"],
        train=True,
        normalization=method,
        scaler=scaler,
        seed=cfg["train"]["seed"],
        indices=train_idx,
        scope=scope,
        report=False,  # reported once, by _training_cohort
    )
    batches = _Batches(cfg, dataset, ctx)
    total = cfg["train"]["max_steps"] or cfg["optim"]["epochs"] * batches.steps_per_epoch
    trainer = Trainer(arch, torch.as_tensor(gradients), cfg, total, ctx.device, ddp=ctx.world_size > 1)
    step = 0
    if ckpt is not None:
        saved = {k: ckpt["data_state"][k] for k in batches.state}
        if saved != batches.state:
            raise DataError(
                f"--resume: the data or batching changed since the checkpoint ({saved} then, "
                f"{batches.state} now); resume with the same data"
            )
        trainer.load_state_dict(ckpt)
        step = int(ckpt["step"])
        del ckpt
    end = total if stop_after is None else min(total, max(stop_after, step))
    if ctx.rank == 0:
        write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
        summary = {"data_summary": data_summary(cohort, train_idx, data, cfg), "recipe": recipe_changes(cfg)}
        write_text_atomic(run_dir / TRAINING_FILE, json.dumps(summary, indent=1) + "\n")
        log_start(cfg, trainer, batches, cohort.n_rois, total, step, ctx)
    masker = SpatiotemporalMasker(arch.n_rois, arch.n_patches, **cfg["mask"])
    monitor = Monitor(cfg, run_dir, trainer, batches, total, step, resume, progress, ctx)
    try:
        while step < end:
            micro = batches.step_batches(step, masker)
            diagnose = monitor.diagnose_at(step, end)
            monitored = diagnose or monitor.log_at(step, end)
            stats = trainer.step(micro, step, monitored)
            if ctx.world_size == 1 and not bool(torch.isfinite(stats["loss"].detach())):
                raise nonfinite_loss_error(float(stats["loss"]), step + 1, batches.scan_names(step, cohort))
            step += 1
            monitor.after_step(step, stats, micro, monitored, diagnose)
            if ctx.rank == 0 and (step % cfg["train"]["checkpoint_every"] == 0 or step == end):
                state = _checkpoint(cfg, arch, trainer, batches, step, total)
                save_checkpoint(state, run_dir, cfg["train"]["keep_last"])
            monitor.heartbeat(step)
    finally:
        monitor.close()
    bundle = _finish(cfg, run_dir, step, total) if ctx.rank == 0 else None
    ctx.barrier()
    return {
        "run_dir": str(run_dir),
        "steps": step,
        "total_steps": total,
        "final_loss": monitor.final_loss,
        "bundle": bundle,
        "world_size": ctx.world_size,
        "rank": ctx.rank,
        "models": {
            "encoder": trainer.encoder,
            "target_encoder": trainer.target_encoder,
            "predictor": trainer.predictor,
        },
    }


def _checked_resume(cfg: dict, run_dir: Path, resume: bool, ctx: Dist) -> dict | None:
    """The checkpoint to resume from (None for a new run), after checking it fits this run."""
    if not resume:
        if find_checkpoints(run_dir):
            raise ConfigError(
                f"{run_dir} already holds checkpoints: pass --resume to continue that run, or choose a new --out folder"
            )
        return None
    ckpt = load_latest_checkpoint(run_dir)
    if cfg["data"]["target_tr"] == "auto":  # the TR the run resolved when it started
        cfg["data"]["target_tr"] = ckpt["config"].get("data", {}).get("target_tr")
    diff = config_diff(ckpt["config"], cfg)
    if diff:
        raise ConfigError(
            f"--resume: the config differs from the checkpoint's ({'; '.join(diff[:5])}); resume with the "
            "run's config.yaml"
        )
    if ckpt["data_state"]["world_size"] != ctx.world_size:
        raise ConfigError(
            f"--resume: the checkpoint was written by {ckpt['data_state']['world_size']} process(es), this run "
            f"has {ctx.world_size}; resume with the same number"
        )
    return ckpt


def _training_cohort(cfg: dict, data):
    """The cohort and its training scans, with the target TR resolved and the inputs checked."""
    d = cfg["data"]
    cohort = open_cohort(
        data, tr=d["tr"], orientation=d["orientation"], on_error=d["on_error"], tr_source=d["tr_source"]
    )
    train_idx = cohort.split_indices("train")
    if len(train_idx) == 0:
        raise DataError(f"{data}: the cohort has no training scans (split 'train')")
    d["target_tr"] = resolve_target_tr(d["target_tr"], cohort, train_idx)
    report_scaling(cohort, d["normalization"], train_idx)
    check_gradient_inputs(cfg, cohort.n_rois)
    return cohort, train_idx


def data_summary(cohort, indices, data, cfg: dict) -> dict:
    """What a run trained on, in numbers (for the model card).

    Args:
        cohort: the cohort.
        indices: its training scans.
        data: what the cohort was opened from (a path is recorded; anything else by type).
        cfg: the resolved config (the target TR).

    Returns:
        {"n_scans", "n_subjects", "n_frames" (native frames), "native_trs" (distinct, None left
        out), "target_tr", "n_rois", "source"}.
    """
    idx = [int(i) for i in indices]
    trs = sorted({cohort.trs[i] for i in idx if cohort.trs[i] is not None})
    source = str(data) if isinstance(data, (str, Path)) else f"in-memory {type(data).__name__}"
    return {
        "n_scans": len(idx),
        "n_subjects": len({cohort.subjects[i] for i in idx}),
        "n_frames": int(sum(int(cohort.lengths[i]) for i in idx)),
        "native_trs": trs,
        "target_tr": cfg["data"]["target_tr"],
        "n_rois": cohort.n_rois,
        "source": source,
    }


def _read_inputs(run_dir: Path, n_gradients: int):
    """The run's gradients (R x n_gradients, float32) and normalisation (method, scaler, scope;
    a run folder from before scopes existed normalised each window on its own)."""
    gradients, _ = load_gradients_csv(run_dir / "gradients.csv")
    if gradients.shape[1] < n_gradients:
        raise DataError(
            f"{run_dir / 'gradients.csv'} has {gradients.shape[1]} gradients, model.n_gradients={n_gradients}"
        )
    with open(run_dir / "normalization.json") as f:
        norm = json.load(f)
    method, scaler = normalization_from_dict(norm)
    # gradients are ordered by eigenvalue: keep the first
    return (
        np.ascontiguousarray(gradients[:, :n_gradients], dtype=np.float32),
        method,
        scaler,
        norm.get("scope", "window"),
    )


class _Batches:
    """The data order: this rank's batches of every epoch, ``accum_steps`` per optimizer step,
    and the masks and the global RNG of each step, all functions of (seed, rank, step)."""

    def __init__(self, cfg: dict, dataset: WindowDataset, ctx: Dist):
        self.dataset, self.ctx = dataset, ctx
        self.seed = cfg["train"]["seed"]
        self.batch, self.accum = cfg["optim"]["batch_size"], cfg["optim"]["accum_steps"]
        self.sampler = ShardSampler(len(dataset), self.batch, ctx.rank, ctx.world_size, self.seed)
        self.steps_per_epoch = self.sampler.n_batches // self.accum
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(dataset)} training scans are too few for one optimizer step of batch_size {self.batch} x "
                f"accum_steps {self.accum} x {ctx.world_size} process(es) = {self.batch * self.accum * ctx.world_size}"
                "; lower optim.batch_size or optim.accum_steps"
            )
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch,
            sampler=self.sampler,
            drop_last=True,
            num_workers=cfg["data"]["num_workers"],
            pin_memory=ctx.device.type == "cuda",
            persistent_workers=False,
        )
        self.state = {  # what a resumed run must share with its checkpoint
            "steps_per_epoch": self.steps_per_epoch,
            "n_samples": len(dataset),
            "world_size": ctx.world_size,
            "batch_size": self.batch,
            "accum_steps": self.accum,
        }
        self._epoch, self._iter = None, None

    def step_batches(self, step: int, masker) -> list[tuple[torch.Tensor, MaskBatch]]:
        """The micro-batches of one optimizer step; seeds the global torch RNG (drop path) for it.

        Args:
            step: the optimizer step (0-based).
            masker: draws the masks of a micro-batch.

        Returns:
            ``accum_steps`` pairs (x B x R x T, masks).
        """
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:  # a new epoch, or the first step of this call
            self.sampler.set_epoch(epoch, skip_batches=position * self.accum)
            self.dataset.set_epoch(epoch)
            self._epoch, self._iter = epoch, iter(self.loader)
        seq = np.random.SeedSequence((self.seed, self.ctx.rank, step))
        torch.manual_seed(int(seq.generate_state(1)[0]))
        mask_rng = np.random.default_rng(seq)
        micro = []
        for _ in range(self.accum):
            x = next(self._iter)
            micro.append((x, masker(x.shape[0], mask_rng)))
        return micro

    def scan_names(self, step: int, cohort) -> list[str]:
        """The scans of one optimizer step's batches (for an error message).

        Args:
            step: the optimizer step (0-based).
            cohort: the cohort (its scan names).

        Returns:
            The names, in batch order.
        """
        epoch = step // self.steps_per_epoch
        replay = ShardSampler(self.sampler.n, self.batch, self.ctx.rank, self.ctx.world_size, self.seed)
        replay.set_epoch(epoch)
        order = list(replay)
        first = (step - epoch * self.steps_per_epoch) * self.accum * self.batch
        return [cohort.name(int(self.dataset.indices[i])) for i in order[first : first + self.accum * self.batch]]


def _checkpoint(cfg, arch, trainer, batches, step: int, total: int) -> dict:
    """Everything a resumed run needs: weights, optimizer, step, config and the data position."""
    epoch = step // batches.steps_per_epoch
    return {
        "step": step,
        "epoch": epoch,
        "model_config": arch.to_dict(),
        "config": cfg,
        **trainer.state_dict(),
        "rng": {"scheme": "derived from (seed, rank, step)", "seed": cfg["train"]["seed"]},
        "data_state": {
            **batches.state,
            "epoch": epoch,
            "batches_done": (step % batches.steps_per_epoch) * batches.accum,
        },
        "loss_name": cfg["train"]["loss"],
        "total_steps": total,
        "brainjepa_version": __version__,
    }


def _finish(cfg: dict, run_dir: Path, step: int, total: int) -> str | None:
    """Rank 0 after the loop: the run's figures, and its bundle when the run is complete."""
    if (run_dir / "metrics.jsonl").stat().st_size:
        try:
            plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
            if cfg["train"]["diagnose_every"]:
                plot_diagnostics_history(run_dir / "metrics.jsonl", run_dir / "diagnostics.png")
        except BrainJEPAError as exc:  # matplotlib missing must not fail a finished run
            log.warning("no loss.png / diagnostics.png: %s", exc)
    return str(export_run(run_dir)) if step >= total and find_checkpoints(run_dir) else None


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
        method, scaler = resolve_normalization(
            cohort, cfg["data"]["normalization"], train_idx, seed=cfg["train"]["seed"]
        )
        norm = {**normalization_to_dict(method, scaler), "scope": cfg["data"]["normalization_scope"]}
        write_text_atomic(norm_file, json.dumps(norm, indent=1) + "\n")


def nonfinite_loss_error(loss: float, step: int, names: list[str]) -> BrainJEPAError:
    """The error for a loss that became NaN/Inf, naming the scans of that step's batch.

    Args:
        loss: the loss value.
        step: the optimizer step (1-based).
        names: the scans of the step's batches (repeats are shown once).

    Returns:
        The error, to raise.
    """
    unique = list(dict.fromkeys(names))
    shown = ", ".join(unique[:8]) + (f" and {len(unique) - 8} more" if len(unique) > 8 else "")
    return BrainJEPAError(
        f"the loss became {loss} at step {step}, on a batch of {shown}; check these scans (values, "
        "units, scaling), then lower optim.lr or set optim.clip_grad, and resume from the last "
        "checkpoint (--resume) or restart"
    )


def check_gradient_inputs(cfg: dict, n_rois: int) -> None:
    """Refuse, before any work, gradients that cannot fit the data.

    Args:
        cfg: the resolved config (model.n_gradients, data.gradients).
        n_rois: the data's ROI count.

    Raises:
        ConfigError: too many gradients for the ROI count (computed gradients), or a gradient file
            with another ROI count or too few columns.
    """
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
