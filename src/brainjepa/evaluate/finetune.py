"""Fine-tuning (docs/method.md, "Evaluation"): the whole encoder plus a head, AdamW, warmup +
cosine schedule, layer-wise LR decay 0.75 and drop path 0.1, epoch chosen on validation.

Both regularisers are known to have silently done nothing in the authors' code, so here they are
explicit and tested: :func:`param_groups` gives every depth its own learning-rate scale
(patch / positional embedding = layer 0, block i = layer i + 1, final norm and head = top layer
L + 1; scale = decay ** (L + 1 - layer)), and :func:`set_drop_path` sets the rate of every
:class:`~brainjepa.model.DropPath` of the copied encoder (linearly increasing with depth, as
in pretraining). The pretrained model passed in is never modified: each fit works on a copy.
Every method of :data:`METHODS` sees one centre window per subject, as the recipe trains on.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..data import CohortSeries
from ..schedules import warmup_cosine
from .cohort import cohort_fc
from .features import BrainJEPAEmbedder, random_init_like, resolve_device
from .labels import cohort_targets
from .probes import ProbeBase, make_probe
from .protocol import Results, run_targets
from .training import make_loss, predict_batches, set_lr, train_keep_best

log = logging.getLogger(__name__)

# the methods of fine-tuning; linear probing names its methods with probe_method_names()
METHODS = ("brainjepa", "random_init", "fc_baseline")


class FineTuneModel(nn.Module):
    """Encoder + head: tokens (B, N, D) -> mean over tokens -> LayerNorm -> Linear -> (B, K).

    Args:
        encoder: the encoder (a :class:`~brainjepa.model.BrainEncoder`, trained with the head).
        n_outputs: K, the head's outputs (classes, or 1 for regression).
    """

    def __init__(self, encoder: nn.Module, n_outputs: int):
        super().__init__()
        D = encoder.cfg.embed_dim
        self.encoder = encoder
        self.norm = nn.LayerNorm(D, eps=encoder.cfg.layernorm_eps)
        self.head = nn.Linear(D, n_outputs)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs of the head.

        Args:
            x: (B, R, T) model inputs.

        Returns:
            (B, n_outputs).
        """
        return self.head(self.norm(self.encoder(x).mean(dim=1)))


def layer_id(name: str, depth: int) -> int:
    """The depth of a FineTuneModel parameter, for layer-wise learning-rate decay.

    Args:
        name: the parameter's name in the FineTuneModel.
        depth: L, the encoder's number of blocks.

    Returns:
        0 for the patch and positional embeddings, i + 1 for block i, L + 1 for everything else
        (the final norm and the head).
    """
    if name.startswith(("encoder.patch_embed.", "encoder.pos_embed.")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def param_groups(model: FineTuneModel, weight_decay: float, layer_decay: float = 0.75) -> list[dict]:
    """AdamW parameter groups, one per (layer, decayed or not).

    Args:
        model: the model to fine-tune.
        weight_decay: the decay of matrices; biases, norms and other 1-D parameters get none.
        layer_decay: the learning-rate factor per layer below the top.

    Returns:
        Groups with "params", "names", "layer", "lr_scale" = layer_decay ** (L + 1 - layer)
        and "weight_decay", in order of (layer, decayed).
    """
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
    """AdamW over :func:`param_groups`.

    Args:
        model: the model to fine-tune.
        lr: the base learning rate; every group's lr is ``lr * lr_scale`` (see :func:`set_lr`).
        weight_decay: the decay of matrices (none for 1-D parameters).
        layer_decay: the learning-rate factor per layer below the top.

    Returns:
        The optimizer, its learning rates set.
    """
    opt = torch.optim.AdamW(param_groups(model, weight_decay, layer_decay), lr=lr)
    set_lr(opt, lr)
    return opt


def set_drop_path(encoder: nn.Module, rate: float) -> None:
    """Set the stochastic depth of every block, linearly increasing with depth.

    Args:
        encoder: the encoder whose blocks' :class:`~brainjepa.model.DropPath` rates are set
            (in place).
        rate: the deepest block's rate; block i of L gets ``rate * i / (L - 1)`` (the first 0).
    """
    depth = len(encoder.blocks)
    for i, block in enumerate(encoder.blocks):
        block.drop_path.p = rate * i / max(depth - 1, 1)


class FineTuner(ProbeBase):
    """Fine-tune a copy of ``model``'s encoder (a BrainJEPA or a BrainEncoder) with a new head.

    ``fit(X, y, X_val, y_val)``: X (N, R, T) model inputs (:meth:`BrainJEPAEmbedder.windows`),
    y class indices or values (regression labels normalised with train statistics). Trains for
    ``epochs`` and keeps the epoch with the lowest validation loss
    (:func:`~brainjepa.evaluate.training.train_keep_best`). Learned: ``model_`` (FineTuneModel,
    eval mode), ``best_epoch_``, ``train_losses_`` and ``val_losses_`` per epoch.

    Args:
        model: the starting point, a BrainJEPA or a BrainEncoder (never modified).
        task: 'classification' or 'regression'.
        epochs: training epochs.
        lr: the top layer's peak learning rate.
        min_lr: the learning rate at the end of the cosine schedule.
        warmup_epochs: linear warmup epochs.
        weight_decay: AdamW weight decay of matrices.
        layer_decay: the learning-rate factor per layer below the top (:func:`param_groups`).
        drop_path: the deepest block's stochastic depth rate (:func:`set_drop_path`).
        batch_size: inputs per step (and per validation forward pass).
        class_weight: None or 'balanced'.
        seed: the seed of the head's initialisation, the shuffles and drop path.
        device: where to train (:func:`~brainjepa.evaluate.features.resolve_device`).
        progress: show a progress bar over epochs.
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
        """A fresh FineTuneModel on a copy of the encoder.

        Args:
            n_outputs: K, the head's outputs.

        Returns:
            The model (float32), drop path set, the head initialised with ``seed``.
        """
        encoder = copy.deepcopy(getattr(self.model, "encoder", self.model)).float()
        set_drop_path(encoder, self.drop_path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return FineTuneModel(encoder, n_outputs)

    def fit(self, X, y, X_val, y_val, n_classes: int | None = None) -> FineTuner:
        """Fine-tune, keeping the epoch with the lowest validation loss.

        Args:
            X: (n, R, T) training inputs.
            y: (n,) training labels: class indices or values.
            X_val: (n_val, R, T) validation inputs.
            y_val: (n_val,) validation labels.
            n_classes: K (default: the largest training class index + 1).

        Returns:
            self, fitted.
        """
        device = resolve_device(self.device)
        y = np.asarray(y)
        t, t_val = torch.as_tensor(self._fit_labels(y, n_classes)), torch.as_tensor(self._labels(y_val))
        out_dim = self.n_classes_ if self.task == "classification" else 1
        net = self.build(out_dim).to(device)
        opt = make_optimizer(net, self.lr, self.weight_decay, self.layer_decay)
        X = torch.as_tensor(X)
        n_batches = max(1, math.ceil(len(X) / self.batch_size))
        total, warmup = self.epochs * n_batches, self.warmup_epochs * n_batches
        with torch.random.fork_rng(devices=[]):  # drop path draws from the global generator
            torch.manual_seed(self.seed)
            history = train_keep_best(
                net,
                opt,
                make_loss(self.task, y, out_dim, self.class_weight),
                X,
                t,
                X_val,
                t_val,
                epochs=self.epochs,
                n_batches=n_batches,
                lr_at=lambda step: warmup_cosine(step, total, warmup, self.lr, self.lr / max(warmup, 1), self.min_lr),
                generator=torch.Generator().manual_seed(self.seed),
                val_batch_size=self.batch_size,
                progress="fine-tuning" if self.progress else None,
            )
        self.model_, self.best_epoch_ = net, history.best_epoch
        self.train_losses_, self.val_losses_ = history.train_losses, history.val_losses
        return self

    def _output(self, X) -> np.ndarray:
        return self._from_head(predict_batches(self.model_, X, self.batch_size))


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
    """Fine-tune ``model`` on a cohort's label columns, next to its references.

    The same recipe applied to the randomly initialised architecture (``random_init``) and the
    FC baseline (closed-form probe) share every split.

    Args:
        model: the pretrained model.
        cohort: the cohort.
        targets: label columns.
        task: 'classification', 'regression' or 'auto' (per column).
        seeds: a count or the split seeds.
        split_column: a label column (or 'split') that fixes the split.
        fc_input: the FC baseline's input, 'full' or 'window'
            (:func:`~brainjepa.evaluate.cohort.cohort_fc`).
        class_weight: None or 'balanced'.
        epochs: training epochs.
        lr: the top layer's peak learning rate.
        layer_decay: the learning-rate factor per layer below the top.
        drop_path: the deepest block's stochastic depth rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warmup epochs.
        batch_size: inputs per step.
        device: where to train.
        random_init_seed: the initialisation seed of ``random_init``.
        progress: show progress and log results.

    Returns:
        :class:`~brainjepa.evaluate.protocol.Results` of the methods :data:`METHODS`.
    """
    labelled = cohort_targets(cohort, targets, task, split_column)  # fail before the slow part
    series = CohortSeries(cohort)
    windows = BrainJEPAEmbedder(model, batch_size=batch_size, progress=progress).windows(series, series.trs())
    fc = cohort_fc(cohort, model, fc_input, progress)
    starts = {"brainjepa": model, "random_init": random_init_like(model, random_init_seed)}

    def methods(t):
        log.info("fine-tuning on %s (%s, %d subjects, %d epochs)", t.name, t.task, len(t.keep), epochs)

        def tuner(start, seed):
            return FineTuner(
                start,
                t.task,
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

        out = {
            name: (lambda seed, start=starts[name]: tuner(start, seed), windows[t.keep])
            for name in METHODS
            if name != "fc_baseline"
        }
        out["fc_baseline"] = (lambda seed: make_probe("closed-form", t.task, seed, class_weight), fc[t.keep])
        return out

    return run_targets(labelled, methods, seeds=seeds, progress=progress)
