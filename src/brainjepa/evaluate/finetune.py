"""Fine-tuning (docs/method.md, "Fine-tuning"): the whole encoder plus a head, AdamW, warm-up +
cosine schedule, layer-wise LR decay 0.75 and drop path 0.1, early stopping on the validation
loss with the best epoch restored.

Both regularisers are known to have silently done nothing in the authors' code, so here they are
explicit and tested: :func:`param_groups` gives every depth its own learning-rate scale
(patch / positional embedding = layer 0, block i = layer i + 1, final norm and head = top layer
L + 1; scale = decay ** (L + 1 - layer)), and :func:`set_drop_path` sets the rate of every
:class:`~brainjepa.model.DropPath` of the copied encoder (linearly increasing with depth, as
in pretraining). The pretrained model passed in is never modified: each fit works on a copy.
For small cohorts the defaults differ from the paper's recipe, by measurement: the head reads
the token features' FC and starts as the fitted closed-form probe (kept when no epoch beats
it), and each subject gives a few windows (:mod:`.finetune_data`), one drawn per epoch in
training and all averaged at test time.
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
from ..errors import ConfigError
from ..schedules import warmup_cosine
from .cohort import cohort_amplitude, cohort_fc
from .features import random_init_like, readout_features, resolve_device
from .finetune_data import finetune_windows
from .labels import cohort_targets
from .metrics import HEADLINE_METRIC, classification_metrics, regression_metrics
from .probes import ClosedFormProbe, ProbeBase, _standardize_fit, make_probe
from .protocol import Results, run_targets
from .training import make_loss, predict_batches, set_lr, train_keep_best

log = logging.getLogger(__name__)

# the methods of fine-tuning; linear probing names its methods with probe_method_names()
METHODS = ("brainjepa", "random_init", "fc_baseline", "amplitude")
HEADS = ("mean", "fc")  # the readouts a fine-tuning head can read (FineTuneModel)
# The recipe's defaults, chosen by measurement on the demo cohort (docs/method.md, "Fine-tuning")
DEFAULT_EPOCHS = 100  # at most; early stopping usually ends far sooner
DEFAULT_PATIENCE = 10
DEFAULT_LR = 1e-4  # the head starts as a fitted probe: a gentle rate, not one that relearns it
DEFAULT_WARMUP_EPOCHS = 3
DEFAULT_WINDOWS = 2
DEFAULT_READOUT = "fc"
HEAD_INITS = ("probe", "random")
DEFAULT_HEAD_INIT = "probe"


class FineTuneModel(nn.Module):
    """Encoder + head on one readout of the token features (:data:`HEADS`).

    ``mean`` (the paper's): tokens (B, N, D) -> mean over tokens -> LayerNorm, D features.
    ``fc``: the token features' ROI x ROI correlation over time, Fisher-z, R(R-1)/2 features
    (:func:`~brainjepa.evaluate.features.readout_features` 'fc'): the readout that carries the
    subject in frozen embeddings of small cohorts (docs/method.md, "Fine-tuning"). The features
    are then standardised with fixed statistics (buffers ``shift`` and ``scale``, 0 and 1 until
    :meth:`FineTuner.fit` sets them from the training set) and a Linear layer gives the outputs.

    Input may hold several windows per subject, (B, W, R, T): in training mode each subject
    contributes one window drawn at random (from the global torch generator) per forward pass,
    so the windows act as augmentation; in eval mode every window is encoded and the head's
    outputs (logits, or values) are averaged over the W windows.

    Args:
        encoder: the encoder (a :class:`~brainjepa.model.BrainEncoder`, trained with the head).
        n_outputs: K, the head's outputs (classes, or 1 for regression).
        readout: 'mean' or 'fc'.

    Raises:
        ConfigError: another readout.
    """

    def __init__(self, encoder: nn.Module, n_outputs: int, readout: str = "mean"):
        super().__init__()
        if readout not in HEADS:
            raise ConfigError(f"the fine-tuning readout must be one of {HEADS}, got {readout!r}")
        cfg = encoder.cfg
        self.encoder, self.readout = encoder, readout
        width = cfg.embed_dim if readout == "mean" else cfg.n_rois * (cfg.n_rois - 1) // 2
        if readout == "mean":
            self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)
        self.register_buffer("shift", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))
        self.head = nn.Linear(width, n_outputs)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs of the head.

        Args:
            x: (B, R, T) model inputs, or (B, W, R, T): W windows per subject.

        Returns:
            (B, n_outputs): per subject, of one random window (training) or averaged over its
            windows (eval).
        """
        if x.ndim == 4:
            B, W = x.shape[:2]
            if self.training:
                pick = torch.randint(W, (B,)).to(x.device)
                x = x[torch.arange(B, device=x.device), pick]
            else:
                return (
                    self.head((self.features(x.flatten(0, 1)) - self.shift) / self.scale).unflatten(0, (B, W)).mean(1)
                )
        return self.head((self.features(x) - self.shift) / self.scale)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The readout the head reads, before standardisation.

        Args:
            x: (B, R, T) model inputs.

        Returns:
            (B, F) float32.
        """
        h = self.encoder(x)
        if self.readout == "mean":
            return self.norm(h.mean(dim=1))
        cfg = self.encoder.cfg
        return readout_features(h.reshape(len(h), cfg.n_rois, cfg.n_patches, -1), "fc")


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

    ``fit(X, y, X_val, y_val)``: X (N, R, T) model inputs, or (N, W, R, T) with W windows per
    subject (:func:`finetune_windows`: one random window per subject and epoch in training,
    outputs averaged over the windows in evaluation; see :class:`FineTuneModel`); y class
    indices or values (regression labels normalised with train statistics). Trains for at most
    ``epochs``, stops early after ``patience`` epochs without a lower validation loss, and keeps
    the epoch with the lowest one (:func:`~brainjepa.evaluate.training.train_keep_best`).
    Learned: ``model_`` (FineTuneModel, eval mode), ``best_epoch_``, ``stopped_early_``, and per
    epoch run ``train_losses_``, ``val_losses_`` and ``val_scores_`` (the validation AUROC or
    Pearson r, :data:`~brainjepa.evaluate.metrics.HEADLINE_METRIC`).

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
        patience: stop after this many epochs without a lower validation loss (None: never).
        readout: what the head reads, 'mean' or 'fc' (:class:`FineTuneModel`).
        head_init: 'probe': the head starts as the closed-form probe (ridge / logistic,
            strength chosen on validation) of the starting encoder's readout, then everything is
            fine-tuned (linear probing then fine-tuning); 'random': a small random head.
        seed: the seed of the head's initialisation, the shuffles, the windows drawn and drop
            path.
        device: where to train (:func:`~brainjepa.evaluate.features.resolve_device`).
        progress: show a progress bar over epochs.
    """

    def __init__(
        self,
        model,
        task: str,
        *,
        epochs: int = DEFAULT_EPOCHS,
        lr: float = DEFAULT_LR,
        min_lr: float = 1e-6,
        warmup_epochs: int = DEFAULT_WARMUP_EPOCHS,
        weight_decay: float = 0.05,
        layer_decay: float = 0.75,
        drop_path: float = 0.1,
        batch_size: int = 16,
        class_weight: str | None = None,
        patience: int | None = DEFAULT_PATIENCE,
        readout: str = DEFAULT_READOUT,
        head_init: str = DEFAULT_HEAD_INIT,
        seed: int = 0,
        device: str | None = None,
        progress: bool = False,
    ):
        if head_init not in HEAD_INITS:
            raise ConfigError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        self.model = model
        self.patience = patience
        self.readout = readout
        self.head_init = head_init
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
            return FineTuneModel(encoder, n_outputs, self.readout)

    def fit(self, X, y, X_val, y_val, n_classes: int | None = None) -> FineTuner:
        """Fine-tune, keeping the epoch with the lowest validation loss.

        Args:
            X: (n, R, T) or (n, W, R, T) training inputs.
            y: (n,) training labels: class indices or values.
            X_val: (n_val, R, T) or (n_val, W, R, T) validation inputs.
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
        X = torch.as_tensor(X)
        self.probe_val_score_ = self._init_head(net, X, y, X_val, y_val, n_classes)
        opt = make_optimizer(net, self.lr, self.weight_decay, self.layer_decay)
        n_batches = max(1, math.ceil(len(X) / self.batch_size))
        scores: list[float] = []

        def score(epoch, net, out_val):
            scores.append(self._score(np.asarray(y_val), self._from_head(out_val)))

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
                patience=self.patience,
                on_epoch=score,
                keep_initial=self.head_init == "probe",  # the probe itself, if fine-tuning never beats it
            )
        self.model_, self.best_epoch_, self.stopped_early_ = net, history.best_epoch, history.stopped_early
        self.train_losses_, self.val_losses_, self.val_scores_ = history.train_losses, history.val_losses, scores
        return self

    @torch.no_grad()
    def _subject_features(self, net: FineTuneModel, X) -> np.ndarray:
        """The head's input features of every subject (averaged over its windows), eval mode."""
        net.eval()
        device = next(net.parameters()).device
        X = torch.as_tensor(X)
        rows = []
        for x in X.split(self.batch_size):
            x = x.to(device)
            if x.ndim == 4:
                rows.append(net.features(x.flatten(0, 1)).unflatten(0, x.shape[:2]).mean(dim=1))
            else:
                rows.append(net.features(x))
        return torch.cat(rows).double().cpu().numpy()

    def _init_head(self, net: FineTuneModel, X, y, X_val, y_val, n_classes) -> float | None:
        """Standardise the head's input with training statistics; with head_init='probe', start
        the head as the closed-form probe. Returns the probe's validation score (or None)."""
        F = self._subject_features(net, X)
        probe = ClosedFormProbe(self.task, class_weight=self.class_weight)
        mean, scale = _standardize_fit(F)
        net.shift.copy_(torch.as_tensor(mean, dtype=torch.float32))
        net.scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
        if self.head_init != "probe":
            return None
        F_val = self._subject_features(net, X_val)
        probe.fit(F, y, F_val, y_val, n_classes=n_classes)
        coef = np.asarray(probe.coef_, dtype=np.float64).reshape(F.shape[1], -1)
        # an absent class has a -1e9 intercept in the probe: a large but finite logit offset here
        bias = np.clip(np.asarray(probe.intercept_, dtype=np.float64).reshape(-1), -30.0, None)
        with torch.no_grad():
            net.head.weight.copy_(torch.as_tensor(coef.T, dtype=torch.float32))
            net.head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        return self._score(np.asarray(y_val), probe._output(F_val))

    def _score(self, y_true: np.ndarray, out: np.ndarray) -> float:
        """The headline metric of outputs as ``_output`` gives them (probabilities, or values)."""
        if self.task == "classification":
            return classification_metrics(y_true, out.argmax(axis=1), out)[HEADLINE_METRIC[self.task]]
        return regression_metrics(y_true, self._finish(out))[HEADLINE_METRIC[self.task]]

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
    epochs: int = DEFAULT_EPOCHS,
    patience: int | None = DEFAULT_PATIENCE,
    lr: float = DEFAULT_LR,
    layer_decay: float = 0.75,
    drop_path: float = 0.1,
    weight_decay: float = 0.05,
    warmup_epochs: int = DEFAULT_WARMUP_EPOCHS,
    batch_size: int = 16,
    n_windows: int = DEFAULT_WINDOWS,
    readout: str = DEFAULT_READOUT,
    device: str | None = None,
    random_init_seed: int = 0,
    progress: bool = True,
) -> Results:
    """Fine-tune ``model`` on a cohort's label columns, next to its references.

    The same recipe applied to the randomly initialised architecture (``random_init``), the FC
    baseline and the amplitude baseline (closed-form probes) share every split.

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
        epochs: the most training epochs.
        patience: stop after this many epochs without a lower validation loss (None: never).
        lr: the top layer's peak learning rate.
        layer_decay: the learning-rate factor per layer below the top.
        drop_path: the deepest block's stochastic depth rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warmup epochs.
        batch_size: inputs per step.
        n_windows: windows per subject (:func:`finetune_windows`).
        readout: what the head reads, 'mean' or 'fc' (:class:`FineTuneModel`).
        device: where to train.
        random_init_seed: the initialisation seed of ``random_init``.
        progress: show progress and log results.

    Returns:
        :class:`~brainjepa.evaluate.protocol.Results` of the methods :data:`METHODS`.
    """
    labelled = cohort_targets(cohort, targets, task, split_column)  # fail before the slow part
    series = CohortSeries(cohort)
    windows = finetune_windows(model, series, series.trs(), n_windows, progress)
    fc = cohort_fc(cohort, model, fc_input, progress)
    amplitude = cohort_amplitude(cohort, model, progress)
    starts = {"brainjepa": model, "random_init": random_init_like(model, random_init_seed)}
    recipe = dict(
        epochs=epochs,
        patience=patience,
        lr=lr,
        layer_decay=layer_decay,
        drop_path=drop_path,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        batch_size=batch_size,
        readout=readout,
        class_weight=class_weight,
        device=device,
        progress=progress,
    )

    def methods(t):
        log.info("fine-tuning on %s (%s, %d subjects, at most %d epochs)", t.name, t.task, len(t.keep), epochs)
        out = {
            name: (lambda seed, start=start: FineTuner(start, t.task, seed=seed, **recipe), windows[t.keep])
            for name, start in starts.items()
        }
        for name, features in (("fc_baseline", fc), ("amplitude", amplitude)):
            out[name] = (lambda seed: make_probe("closed-form", t.task, seed, class_weight), features[t.keep])
        return out

    return run_targets(labelled, methods, seeds=seeds, progress=progress)
