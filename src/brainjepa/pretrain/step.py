"""One JEPA optimizer step (:class:`Trainer`), in the marked stages of :meth:`Trainer.step`.

For each of ``accum_steps`` micro-batches (x: B x R x T with its spatiotemporal masks):

1. targets: the EMA target encoder's features at the target tokens, layer-normed; with
   ``train.center_targets`` (default) each position's batch mean is subtracted, so position
   alone predicts nothing (:func:`brainjepa.objective.target_features`);
2. context: the online encoder on the context tokens -> z (B x Nc x D);
3. prediction and loss: one predictor pass per target block, blocks grouped by region (alpha,
   beta, gamma); loss = mean over blocks of the mean over the block's valid tokens of Smooth-L1
   or squared error (:func:`brainjepa.objective.block_loss_sum`). Each group is backpropagated
   as soon as its loss is known into a detached copy of z, so only one group's predictor
   activations are alive at a time;
4. backward through the encoder once, from z's accumulated gradient;

then, once per optimizer step:

5. gradient clipping (optional), AdamW (no weight decay on biases and norms), and the EMA update
   of the target encoder.

The step shows the method only; the exact shortcuts and memory devices sit behind two seams:
:mod:`brainjepa.fast` (the networks are :class:`~brainjepa.fast.FastEncoder` /
:class:`~brainjepa.fast.FastPredictor`; token lists padded for the CPU kernel cache,
:func:`~brainjepa.fast.step_tokens`; the split backward and, where the CPU attention kernel runs
(bf16 on CPU, one process, not compiled), the predictor's first-block context part computed once
per micro-batch and shared by every pass, :class:`~brainjepa.fast.SplitContext` and
:meth:`Trainer.share_context`) and :mod:`brainjepa.pretrain.runtime` (precision, torch.compile,
and on CPU the kernel caches and the heap trim after a step that grew the process,
:class:`~brainjepa.pretrain.runtime.StepMemory`).
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext

import torch
from torch import nn

from ..attention import uses_chunked_attention
from ..diagnostics import diagnose_batch, feature_stats
from ..errors import ConfigError
from ..fast import FastEncoder, FastPredictor, SplitContext, step_tokens
from ..masking import MaskBatch
from ..model import ModelConfig
from ..objective import LOSSES, block_loss_sum, group_tokens, regularizer_penalty, split_targets, target_features
from ..schedules import Schedule
from .runtime import StepMemory, compile_problem, use_bf16

log = logging.getLogger(__name__)


class Trainer:
    """Encoder, EMA target encoder, predictor, AdamW, and one optimizer step.

    Args:
        model_config: the architecture.
        gradients: (R, m) brain gradients for the positions.
        config: the resolved pretraining config (:mod:`brainjepa.pretrain.config`).
        total_steps: the schedule's horizon.
        device: where the networks live.
        ddp: wrap the encoder and the predictor in DistributedDataParallel (the process group
            must exist).
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
        self.target_layers = train["target_layers"]
        self.regularizer, self.reg_weight = train["regularizer"], train["reg_weight"]
        self.reg_generator = torch.Generator().manual_seed(train["seed"])  # SIGReg's directions
        if self.center_targets and optim["batch_size"] < 2:
            raise ConfigError(
                "train.center_targets subtracts each position's mean over the micro-batch, which needs "
                "optim.batch_size >= 2; raise the batch size or set train.center_targets=false"
            )
        torch.manual_seed(train["seed"])  # same initial weights on every rank
        self.encoder = FastEncoder(model_config, gradients).to(self.device)
        self.predictor = FastPredictor(model_config, gradients).to(self.device)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False).eval()
        self.ddp = ddp
        # torch.compile where it can work (a CPU needs a C++ compiler for its kernels)
        problem = compile_problem(self.device) if train["compile"] else None
        if problem is not None:
            log.warning(
                "train.compile=true, but torch.compile cannot build kernels on this machine (%s): training "
                "without compiling (slower); install a C++ compiler (g++ or clang++, or name one in the CXX "
                "environment variable) to compile",
                problem,
            )
        self.compiled = train["compile"] and problem is None
        self.encoder_run: nn.Module = self.encoder
        self.predictor_run: nn.Module = self.predictor
        self.target_run: nn.Module = self.target_encoder
        if ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # the only buffers (gradients, sine-cosine tables) are equal on every rank and small
            self.encoder_run = nn.parallel.DistributedDataParallel(self.encoder, device_ids=ids)
            self.predictor_run = nn.parallel.DistributedDataParallel(self.predictor, device_ids=ids)
        if self.compiled:
            self.encoder_run = torch.compile(self.encoder_run, dynamic=True)
            self.predictor_run = torch.compile(self.predictor_run, dynamic=True)
            self.target_run = torch.compile(self.target_encoder, dynamic=True)
        self.params = [p for m in (self.encoder, self.predictor) for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in self.params if p.ndim > 1], "apply_wd": True},
                {"params": [p for p in self.params if p.ndim <= 1], "weight_decay": 0.0, "apply_wd": False},
            ],
            lr=optim["lr"],
            weight_decay=optim["weight_decay"],
            betas=tuple(optim["betas"]),
        )
        self.schedule = Schedule.from_config(optim, total_steps)
        self.clip_grad = optim["clip_grad"]
        self.bf16 = use_bf16(train["precision"], self.device)
        self.memory = StepMemory(self.device)  # before the first matmul

    def share_context(self) -> bool:
        """Whether the predictor's context part is computed once per micro-batch.

        It is where the CPU attention kernel runs anyway (its log-sum-exp output makes the sharing
        exact), and neither DDP (its gradient hooks expect one backward per forward) nor torch.compile
        (it compiles the predictor's plain forward) is in use.

        Returns:
            True when the context part is shared.
        """
        if self.ddp or self.compiled:
            return False
        return uses_chunked_attention(self.device, torch.bfloat16 if self.bf16 else torch.float32)

    def autocast(self):
        """The autocast context of this run's forward passes.

        Returns:
            bf16 autocast on the training device, disabled in fp32.
        """
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _sync(self, module: nn.Module, sync: bool):
        """DDP: accumulate locally unless ``sync`` (the last backward of the optimizer step)."""
        return module.no_sync() if self.ddp and not sync else nullcontext()

    def step(self, micro_batches: list[tuple[torch.Tensor, MaskBatch]], step: int, monitor: bool = False) -> dict:
        """One optimizer step at schedule step ``step``.

        Args:
            micro_batches: (x B x R x T, masks) pairs, accumulated into one step.
            step: the optimizer step (0-based), which sets lr, weight decay and EMA momentum.
            monitor: also return grad_norm, target_std and target_cos.

        Returns:
            lr, wd, momentum (floats) and loss (mean over micro-batches), plus the monitored
            values (tensors, so nothing waits for the device unless asked).
        """
        with self.memory.step():
            out = self._set_schedule(step)
            self.encoder.train()
            self.predictor.train()
            n = len(micro_batches)
            loss_sum = torch.zeros((), device=self.device)
            reg_sum = torch.zeros((), device=self.device)
            for i, (x, masks) in enumerate(micro_batches):
                last = i == n - 1
                x, t = x.to(self.device, non_blocking=True), step_tokens(masks, self.device)
                with self._sync(self.encoder_run, last):
                    # 1. targets: the EMA target encoder's (centred) features at the target tokens
                    with torch.no_grad(), self.autocast():
                        h = target_features(
                            self.target_run, x, group_tokens(t.groups)[0], self.center_targets, self.target_layers
                        )
                    # 2. context: the online encoder on the context tokens
                    with self.autocast():
                        z = self.encoder_run(x, t.context_idx, t.context_valid)
                    # 3. prediction and loss, one region group at a time, each backpropagated at
                    #    once into the predictor and a detached copy of z (split.z)
                    with self.autocast():
                        split = SplitContext(self.predictor, z, t.context_idx, t.context_valid, self.share_context())
                    for g, ((idx, valid), targets) in enumerate(zip(t.groups, split_targets(h, t.groups))):
                        with self._sync(self.predictor_run, last and g == len(t.groups) - 1):
                            with self.autocast():
                                block_sum = block_loss_sum(
                                    self.predictor_run,
                                    split.z,
                                    t.context_idx,
                                    t.context_valid,
                                    idx,
                                    valid,
                                    targets,
                                    self.loss,
                                    split.shared,
                                )
                            (block_sum / (t.blocks * n)).backward()
                        loss_sum += block_sum.detach() / t.blocks
                    # 4. backward through the encoder, once, from z's accumulated gradient and the
                    #    optional penalty on z (train.regularizer: VICReg's or SIGReg)
                    reg = None
                    if self.regularizer != "none":
                        reg = self.reg_weight * regularizer_penalty(
                            self.regularizer, z, t.context_valid, self.reg_generator
                        )
                        reg_sum += reg.detach()
                    split.backward(z, None if reg is None else reg / n)
            # 5. optimizer step (optional clipping), then the EMA update of the target encoder
            out["loss"] = loss_sum / n
            if reg is not None:
                out["reg"] = reg_sum / n
            if self.clip_grad is not None:
                out["grad_norm"] = nn.utils.clip_grad_norm_(self.params, self.clip_grad)
            elif monitor:
                out["grad_norm"] = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params if p.grad is not None])
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # target <- m target + (1 - m) online
                torch._foreach_lerp_(
                    list(self.target_encoder.parameters()), list(self.encoder.parameters()), 1.0 - out["momentum"]
                )
            if monitor:  # on the last micro-batch's valid target tokens
                stats = feature_stats(h[group_tokens(t.groups)[1]])
                out.update(target_std=stats["std"], target_cos=stats["cos"])
            return out

    def _set_schedule(self, step: int) -> dict:
        """Set the optimizer's lr and weight decay for ``step``; returns them and the momentum."""
        lr, wd = self.schedule.lr_at(step), self.schedule.weight_decay_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["apply_wd"]:
                group["weight_decay"] = wd
        return {"lr": lr, "wd": wd, "momentum": self.schedule.momentum_at(step)}

    def diagnose(self, x: torch.Tensor, masks: MaskBatch) -> dict[str, float]:
        """:func:`brainjepa.diagnostics.diagnose_batch` on one micro-batch.

        With this run's modules, loss and target centring.

        Args:
            x: (B, R, T) input.
            masks: its masks.

        Returns:
            The diagnostics, a flat dict of floats.
        """
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
        """What a checkpoint holds of the trainer.

        Returns:
            The state dicts of the encoder, the target encoder, the predictor and the optimizer.
        """
        return {
            "encoder": self.encoder.state_dict(),
            "target_encoder": self.target_encoder.state_dict(),
            "predictor": self.predictor.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the networks and the optimizer from a checkpoint.

        Args:
            state: a checkpoint with the entries of :meth:`state_dict`.
        """
        self.encoder.load_state_dict(state["encoder"])
        self.target_encoder.load_state_dict(state["target_encoder"])
        self.predictor.load_state_dict(state["predictor"])
        self.optimizer.load_state_dict(state["optimizer"])
