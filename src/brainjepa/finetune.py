"""Fine-tuning (docs/method.md, "Evaluation"): the whole encoder plus a head, AdamW, cosine schedule, layer-wise LR
decay 0.75 and drop path 0.1, epoch chosen on validation.

Both regularisers are known to have silently done nothing in the authors' code, so here they are
explicit and tested: :func:`param_groups` gives every depth its own learning-rate scale
(patch / positional embedding = layer 0, block i = layer i + 1, final norm and head = top layer
L + 1; scale = decay ** (L + 1 - layer)), and :func:`set_drop_path` sets the rate of every
:class:`~brainjepa.model.DropPath` of the copied encoder (linearly increasing with depth, as
in pretraining). The pretrained model passed in is never modified: each fit works on a copy.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .evaluate import (
    METHODS,
    BrainJEPAEmbedder,
    CohortSeries,
    Results,
    _Probe,
    _progress,
    _user_split,
    cohort_fc,
    make_loss,
    make_probe,
    random_init_like,
    resolve_device,
    run_protocol,
    target_labels,
)
from .schedules import warmup_cosine

log = logging.getLogger(__name__)


class FineTuneModel(nn.Module):
    """Encoder + head: tokens (B, N, D) -> mean over tokens -> LayerNorm -> Linear -> (B, K)."""

    def __init__(self, encoder: nn.Module, n_outputs: int):
        super().__init__()
        D = encoder.cfg.embed_dim
        self.encoder = encoder
        self.norm = nn.LayerNorm(D, eps=encoder.cfg.layernorm_eps)
        self.head = nn.Linear(D, n_outputs)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, R, T) -> (B, n_outputs)."""
        return self.head(self.norm(self.encoder(x).mean(dim=1)))


def layer_id(name: str, depth: int) -> int:
    """Depth of a FineTuneModel parameter: embeddings 0, block i -> i + 1, norms/head depth + 1."""
    if name.startswith(("encoder.patch_embed.", "encoder.pos_embed.")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def param_groups(model: FineTuneModel, weight_decay: float, layer_decay: float = 0.75) -> list[dict]:
    """AdamW parameter groups, one per (layer, decayed or not), each with ``lr_scale`` =
    layer_decay ** (L + 1 - layer). Biases, norms and other 1-D parameters get no weight decay."""
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decay = layer_id(name, depth), p.ndim > 1
        g = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "names": [],
                "layer": layer,
                "lr_scale": layer_decay ** (depth + 1 - layer),
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def make_optimizer(
    model: FineTuneModel, lr: float, weight_decay: float, layer_decay: float = 0.75
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; every group's lr is ``lr * lr_scale`` (see :func:`set_lr`)."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay, layer_decay), lr=lr)
    set_lr(opt, lr)
    return opt


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the base learning rate: each group gets ``lr * group["lr_scale"]``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]


def set_drop_path(encoder: nn.Module, rate: float) -> None:
    """Stochastic depth rate ``rate`` for the deepest block, linearly less for earlier ones."""
    depth = len(encoder.blocks)
    for i, block in enumerate(encoder.blocks):
        block.drop_path.p = rate * i / max(depth - 1, 1)


class FineTuner(_Probe):
    """Fine-tune a copy of ``model``'s encoder (a BrainJEPA or a BrainEncoder) with a new head.

    ``fit(X, y, X_val, y_val)``: X (N, R, T) model inputs (:meth:`BrainJEPAEmbedder.windows`),
    y class indices or values (regression labels normalised with train statistics). Trains for
    ``epochs`` and keeps the epoch with the lowest validation loss. Learned: ``model_``
    (FineTuneModel, eval mode), ``best_epoch_``, ``train_losses_`` and ``val_losses_`` per epoch.
    """

    def __init__(
        self,
        model,
        task: str,
        *,
        epochs: int = 50,
        lr: float = 5e-4,
        min_lr: float = 1e-6,
        warmup_epochs: int = 5,
        weight_decay: float = 0.05,
        layer_decay: float = 0.75,
        drop_path: float = 0.1,
        batch_size: int = 16,
        class_weight: str | None = None,
        seed: int = 0,
        device: str | None = None,
        progress: bool = False,
    ):
        self.model = model
        self.task = task
        self.epochs = epochs
        self.lr = lr
        self.min_lr = min_lr
        self.warmup_epochs = warmup_epochs
        self.weight_decay = weight_decay
        self.layer_decay = layer_decay
        self.drop_path = drop_path
        self.batch_size = batch_size
        self.class_weight = class_weight
        self.seed = seed
        self.device = device
        self.progress = progress

    def build(self, n_outputs: int) -> FineTuneModel:
        """A fresh FineTuneModel on a copy of the encoder, drop path set."""
        encoder = copy.deepcopy(getattr(self.model, "encoder", self.model)).float()
        set_drop_path(encoder, self.drop_path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return FineTuneModel(encoder, n_outputs)

    def fit(self, X, y, X_val, y_val, n_classes: int | None = None) -> FineTuner:
        device = resolve_device(self.device)
        y = np.asarray(y)
        t, t_val = torch.as_tensor(self._fit_labels(y, n_classes)), torch.as_tensor(self._labels(y_val))
        out_dim = self.n_classes_ if self.task == "classification" else 1
        net = self.build(out_dim).to(device)
        opt = make_optimizer(net, self.lr, self.weight_decay, self.layer_decay)
        loss_fn = make_loss(self.task, y, out_dim, self.class_weight)
        X = torch.as_tensor(X)
        n_batches = max(1, math.ceil(len(X) / self.batch_size))
        total, warmup = self.epochs * n_batches, self.warmup_epochs * n_batches
        gen = torch.Generator().manual_seed(self.seed)
        best, step = None, 0
        self.train_losses_, self.val_losses_ = [], []
        epochs = _progress(range(self.epochs), self.epochs, "fine-tuning", self.progress)
        with torch.random.fork_rng(devices=[]):  # drop path draws from the global generator
            torch.manual_seed(self.seed)
            for epoch in epochs:
                net.train()
                running = 0.0
                for idx in torch.randperm(len(X), generator=gen).tensor_split(n_batches):
                    set_lr(opt, warmup_cosine(step, total, warmup, self.lr, self.lr / max(warmup, 1), self.min_lr))
                    loss = loss_fn(net(X[idx].to(device)), t[idx].to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    running += float(loss.detach()) * len(idx)
                    step += 1
                self.train_losses_.append(running / len(X))
                val = float(loss_fn(self._forward(net, X_val, device), t_val.to(device), weighted=False))
                self.val_losses_.append(val)
                if hasattr(epochs, "set_postfix"):
                    epochs.set_postfix(train=f"{self.train_losses_[-1]:.3f}", val=f"{val:.3f}")
                if best is None or val < best[0]:
                    best = (val, epoch, {k: v.detach().clone() for k, v in net.state_dict().items()})
        net.load_state_dict(best[2])
        self.model_, self.best_epoch_ = net.eval(), best[1]
        return self

    @torch.no_grad()
    def _forward(self, net: FineTuneModel, X, device) -> torch.Tensor:
        net.eval()
        return torch.cat([net(x.to(device)) for x in torch.as_tensor(X).split(self.batch_size)])

    def _output(self, X) -> np.ndarray:
        device = next(self.model_.parameters()).device
        out = self._forward(self.model_, X, device).double().cpu()
        return out.softmax(dim=1).numpy() if self.task == "classification" else out[:, 0].numpy()


def finetune_cohort(
    model,
    cohort,
    targets: Sequence[str],
    *,
    task: str = "auto",
    seeds=5,
    split_column: str | None = None,
    fc_input: str = "full",
    class_weight: str | None = None,
    epochs: int = 50,
    lr: float = 5e-4,
    layer_decay: float = 0.75,
    drop_path: float = 0.1,
    weight_decay: float = 0.05,
    warmup_epochs: int = 5,
    batch_size: int = 16,
    device: str | None = None,
    random_init_seed: int = 0,
    progress: bool = True,
) -> Results:
    """Fine-tune ``model`` on a cohort's label columns; the same recipe applied to the randomly
    initialised architecture (``random_init``) and the FC baseline share every split."""
    labels = {t: target_labels(cohort, t, task) for t in targets}  # fail before the slow part
    splits = {t: _user_split(cohort, split_column, labels[t][0]) for t in targets}
    series = CohortSeries(cohort)
    windows = BrainJEPAEmbedder(model, batch_size=batch_size, progress=progress).windows(series, series.trs())
    fc = cohort_fc(cohort, model, fc_input, progress)
    starts = {"brainjepa": model, "random_init": random_init_like(model, random_init_seed)}
    results = Results()
    for target in targets:
        keep, y, t_task, classes = labels[target]
        split = splits[target]
        log.info("fine-tuning on %s (%s, %d subjects, %d epochs)", target, t_task, len(keep), epochs)

        def tuner(start, seed, t_task=t_task):
            return FineTuner(
                start,
                t_task,
                epochs=epochs,
                lr=lr,
                layer_decay=layer_decay,
                drop_path=drop_path,
                weight_decay=weight_decay,
                warmup_epochs=warmup_epochs,
                batch_size=batch_size,
                class_weight=class_weight,
                seed=seed,
                device=device,
                progress=progress,
            )

        methods = {
            name: (lambda seed, start=starts[name]: tuner(start, seed), windows[keep])
            for name in METHODS
            if name != "fc_baseline"
        }
        methods["fc_baseline"] = (
            lambda seed, t_task=t_task: make_probe("closed-form", t_task, seed, class_weight),
            fc[keep],
        )
        results.extend(
            run_protocol(
                y,
                methods,
                target=target,
                task=t_task,
                n_classes=len(classes) if classes else None,
                seeds=seeds,
                split=split,
                progress=progress,
            )
        )
    return results
