"""What a pretraining run reports while it runs: the progress bar or a heartbeat, metrics.jsonl
records with the representation diagnostics, and warnings in words (collapse, the share of the
random initialisation the EMA leaves in the target encoder)."""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..diagnostics import ema_init_share, problems
from ..errors import BrainJEPAError
from ..masking import MaskBatch
from ..runio import Heartbeat, MetricsLog
from .runtime import peak_memory_mb

log = logging.getLogger(__name__)

COLLAPSE_WARN_EVERY = 1000  # steps between repeated collapse warnings


class Monitor:
    """What a run reports: progress, metrics.jsonl records with the diagnostics, and warnings.

    Progress is a progress bar or a heartbeat line; the warnings are about collapse and the
    EMA's share of the initialisation. Only rank 0 writes and warns.

    Args:
        cfg: the resolved config.
        run_dir: the run folder (metrics.jsonl).
        trainer: the :class:`~brainjepa.pretrain.step.Trainer`.
        batches: the run's data order (batch size, accumulation, steps per epoch).
        total: the schedule's horizon in optimizer steps.
        step: the step the run starts from.
        resume: a resumed run keeps the metrics records up to ``step``.
        progress: show a progress bar (else a heartbeat line every 30 s).
        ctx: the processes (:class:`~brainjepa.pretrain.runtime.Dist`).
    """

    def __init__(self, cfg, run_dir, trainer, batches, total, step, resume, progress, ctx):
        self.cfg, self.trainer, self.batches, self.ctx = cfg, trainer, batches, ctx
        self.train = cfg["train"]
        self.rank0 = ctx.rank == 0
        self.first_step = step
        self.metrics = MetricsLog(run_dir, step if resume else None) if self.rank0 else None
        self.bar = None
        if self.rank0 and progress:
            self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, desc="pretrain")
        self._heartbeat = Heartbeat(total) if self.rank0 and self.bar is None else None  # a line every 30 s
        self.init_share = ema_init_share(trainer.schedule.momentum_at, step)  # of the target encoder
        self.last_time, self.last_step, self.last_warn, self.final_loss = time.perf_counter(), step, None, None
        if self.rank0 and step == 0:  # a new run: will the EMA forget its random initialisation?
            final_share = ema_init_share(trainer.schedule.momentum_at, total)
            if final_share > 0.5:
                log.warning(
                    "the EMA schedule (optim.ema_start %g -> ema_end %g over %d steps) leaves %.0f%% of the target "
                    "encoder's random initialisation in it at the end: lower optim.ema_start / optim.ema_end for "
                    "a run this short",
                    cfg["optim"]["ema_start"],
                    cfg["optim"]["ema_end"],
                    total,
                    100 * final_share,
                )

    def diagnose_at(self, step: int, end: int) -> bool:
        """Whether optimizer step ``step`` runs the diagnostics (on rank 0).

        Args:
            step: the step about to run (0-based).
            end: the step this call stops at.

        Returns:
            True every ``train.diagnose_every`` steps and at the last step (never when it is 0).
        """
        every = self.train["diagnose_every"]
        return self.rank0 and every > 0 and ((step + 1) % every == 0 or step + 1 == end)

    def log_at(self, step: int, end: int) -> bool:
        """Whether optimizer step ``step`` is logged.

        Args:
            step: the step about to run (0-based).
            end: the step this call stops at.

        Returns:
            True every ``train.log_every`` steps, at the first step of this call and at the last.
        """
        return (step + 1) % self.train["log_every"] == 0 or step + 1 == end or step == self.first_step

    def after_step(self, step: int, stats: dict, micro, monitored: bool, diagnose: bool) -> None:
        """Book-keeping after an optimizer step; a record when it was monitored.

        Args:
            step: the step just done (1-based).
            stats: what :meth:`~brainjepa.pretrain.step.Trainer.step` returned.
            micro: the step's (x, masks) micro-batches.
            monitored: the step was monitored: average the loss over ranks and write a record.
            diagnose: also run the diagnostics on the first micro-batch.

        Raises:
            BrainJEPAError: the loss became NaN/Inf.
        """
        self.init_share *= stats["momentum"]
        if self.bar is not None:
            self.bar.update(1)
        if not monitored:
            return
        loss = stats["loss"].detach()
        if self.ctx.world_size > 1:  # all ranks together, so that none waits for another
            dist.all_reduce(loss)
            loss /= self.ctx.world_size
        self.final_loss = float(loss)
        if not math.isfinite(self.final_loss):
            raise BrainJEPAError(
                f"the loss became {self.final_loss} at step {step}; lower optim.lr or set optim.clip_grad, and "
                "resume from the last checkpoint or restart"
            )
        now = time.perf_counter()
        b = self.batches
        tokens = (step - self.last_step) * b.batch * b.accum * self.trainer.model_config.n_tokens * self.ctx.world_size
        rate = tokens / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        if not self.rank0:
            return
        record = _record(step, b.steps_per_epoch, stats, self.final_loss, micro, rate, self.ctx.device)
        record["ema_init_share"] = self.init_share
        if diagnose:
            diag = self.trainer.diagnose(*micro[0])
            record.update({f"diag_{k}": round(v, 6) for k, v in diag.items()})
            for message in problems(diag, self.train["collapse_std"]):
                log.warning("diagnostics at step %d: %s", step, message)
        self.metrics.write(record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.final_loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{rate:,.0f}")
        collapsing = record["target_std"] < self.train["collapse_std"]
        if collapsing and (self.last_warn is None or step - self.last_warn >= COLLAPSE_WARN_EVERY):
            self.last_warn = step
            log.warning(
                "collapse monitor: target feature std %.4f < %.4f at step %d (mean token cosine %.3f); the "
                "representations may be collapsing: check optim.lr, the EMA momentum and the masks",
                record["target_std"],
                self.train["collapse_std"],
                step,
                record["target_cos"],
            )

    def heartbeat(self, step: int) -> None:
        """A heartbeat line (when there is no progress bar), after the step's loss is known.

        Args:
            step: the step just done (1-based).
        """
        if self._heartbeat is not None:  # after the step's loss is known
            self._heartbeat(step, self.final_loss)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()


def log_start(cfg, trainer, batches, n_rois, total, step, ctx) -> None:
    """Log what the run is about to do: model, data, processes, precision and steps.

    Args:
        cfg: the resolved config.
        trainer: the :class:`~brainjepa.pretrain.step.Trainer`.
        batches: the run's data order.
        n_rois: the data's ROI count.
        total: the schedule's horizon in optimizer steps.
        step: the step the run starts from.
        ctx: the processes (:class:`~brainjepa.pretrain.runtime.Dist`).
    """
    log.info(
        "pretraining %s (%s trainable parameters) on %d scans x %d ROIs, %d process(es) on %s, %s; %d steps of "
        "%d x %d samples (%d per epoch), from step %d",
        cfg["model"]["size"],
        f"{sum(p.numel() for p in trainer.params):,}",
        len(batches.dataset),
        n_rois,
        ctx.world_size,
        ctx.device,
        "bf16" if trainer.bf16 else "fp32",
        total,
        batches.batch,
        batches.accum,
        batches.steps_per_epoch,
        step,
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
        **({"reg": float(stats["reg"])} if "reg" in stats else {}),  # train.regularizer's penalty
    }
