"""The training loop shared by the trained probes and fine-tuning: train for some epochs (or
until the validation loss stops improving), keep the weights of the epoch with the lowest
validation loss; and the losses it minimises."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from .features import progress_bar

CLASS_WEIGHTS = ("balanced",)  # inverse class frequency in the training loss


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """'balanced' class weights.

    Args:
        y: class indices.
        n_classes: K.

    Returns:
        (K,) weights n / (K * n_k); classes absent from y get 1.
    """
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 1.0)


def make_loss(task: str, y_train: np.ndarray, n_outputs: int, class_weight: str | None):
    """The training and selection loss of a head.

    Args:
        task: 'classification' (cross-entropy) or 'regression' (MSE on normalised labels,
            output (B, 1)).
        y_train: training labels (for 'balanced' class weights).
        n_outputs: K, the head's outputs.
        class_weight: None or 'balanced'.

    Returns:
        loss(output (B, K), target (B,), weighted=True) -> scalar tensor; ``weighted=False``
        leaves the class weights out (the validation loss).

    Raises:
        ConfigError: another ``class_weight``.
    """
    if task == "regression":
        return lambda out, t, weighted=True: nn.functional.mse_loss(out[:, 0], t.float())
    if class_weight is not None and class_weight not in CLASS_WEIGHTS:
        raise ConfigError(f"class_weight must be None or one of {CLASS_WEIGHTS}, got {class_weight!r}")
    w = torch.as_tensor(class_weights(y_train, n_outputs), dtype=torch.float32) if class_weight else None

    def loss(out, t, weighted=True):
        return nn.functional.cross_entropy(
            out, t.long(), weight=w.to(out.device) if weighted and w is not None else None
        )

    return loss


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the base learning rate of every parameter group.

    Args:
        optimizer: the optimizer, changed in place.
        lr: the base learning rate; each group gets ``lr * group["lr_scale"]`` (scale 1 if
            unset).
    """
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


@torch.no_grad()
def predict_batches(net: nn.Module, X: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Outputs of ``net`` in eval mode.

    Args:
        net: the model; it is put in eval mode.
        X: (N, ...) inputs, moved batch by batch to the model's device.
        batch_size: inputs per forward pass; None for all at once.

    Returns:
        (N, ...) outputs on the model's device.
    """
    net.eval()
    device = next(net.parameters()).device
    X = torch.as_tensor(X)
    parts = [X] if batch_size is None else X.split(batch_size)
    return torch.cat([net(x.to(device)) for x in parts])


@dataclass
class EpochLog:
    """What :func:`train_keep_best` saw: the chosen epoch and the mean losses of every epoch.

    Args:
        best_epoch: the epoch with the lowest validation loss (0-based; ties: the first); -1 when
            the starting weights were kept (``keep_initial``).
        train_losses: per epoch run, the mean training loss over samples.
        val_losses: per epoch run, the validation loss.
        stopped_early: training ended before ``epochs`` because the validation loss had not
            improved for ``patience`` epochs.
    """

    best_epoch: int
    train_losses: list[float]
    val_losses: list[float]
    stopped_early: bool = False


def train_keep_best(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn,
    X: torch.Tensor,
    t: torch.Tensor,
    X_val: torch.Tensor,
    t_val: torch.Tensor,
    *,
    epochs: int,
    n_batches: int,
    lr_at: Callable[[int], float],
    generator: torch.Generator,
    val_batch_size: int | None = None,
    progress: str | None = None,
    patience: int | None = None,
    on_epoch: Callable[[int, nn.Module, torch.Tensor], None] | None = None,
    keep_initial: bool = False,
) -> EpochLog:
    """Train ``net`` for ``epochs`` and keep the weights of the epoch with the lowest validation loss.

    Each epoch shuffles the training set (with ``generator``) into ``n_batches`` nearly equal
    batches; before every optimizer step the learning rate is set to ``lr_at(step)`` (step
    counted from 0 over all epochs, scaled per group by its ``lr_scale``, see :func:`set_lr`).
    After each epoch the validation loss (unweighted) is computed in eval mode; with
    ``patience``, training stops once that many epochs in a row have not lowered it (early
    stopping; the schedule is not shortened). At the end the best epoch's weights are loaded back
    (ties: the first) and ``net`` is left in eval mode.

    Args:
        net: the model to train, on its device.
        optimizer: the optimizer over its parameters.
        loss_fn: loss(output, target, weighted=True), as from :func:`make_loss`.
        X: (N, ...) training inputs (moved batch by batch to the model's device).
        t: (N,) training targets.
        X_val: validation inputs.
        t_val: validation targets.
        epochs: training epochs.
        n_batches: batches per epoch.
        lr_at: the learning rate of a step.
        generator: the random generator of the shuffles.
        val_batch_size: validation inputs per forward pass (None: all at once).
        progress: the description of a progress bar over epochs; None shows none.
        patience: stop after this many epochs without a lower validation loss (None: never).
        on_epoch: called as ``on_epoch(epoch, net, val_outputs)`` after each epoch's
            validation (``net`` in eval mode with that epoch's weights; ``val_outputs`` its
            outputs on ``X_val``), e.g. to record validation metrics per epoch.
        keep_initial: the starting weights are a candidate too (epoch -1, validated before
            training, not in the per-epoch lists): when no epoch lowers their validation loss
            they are kept.

    Returns:
        The best epoch, the per-epoch training (mean over samples) and validation losses, and
        whether training stopped early.
    """
    if patience is not None and patience < 1:
        raise ConfigError(f"patience must be at least 1 epoch (or None for no early stopping), got {patience}")
    device = next(net.parameters()).device
    bar = progress_bar(range(epochs), epochs, progress or "", progress is not None)
    best, step = None, 0
    if keep_initial:
        val = float(loss_fn(predict_batches(net, X_val, val_batch_size), t_val.to(device), weighted=False))
        best = (val, -1, {k: v.detach().clone() for k, v in net.state_dict().items()})
    train_losses: list[float] = []
    val_losses: list[float] = []
    for epoch in bar:
        net.train()
        running = 0.0
        for idx in torch.randperm(len(X), generator=generator).tensor_split(n_batches):
            set_lr(optimizer, lr_at(step))
            loss = loss_fn(net(X[idx].to(device)), t[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += float(loss.detach()) * len(idx)
            step += 1
        train_losses.append(running / len(X))
        out_val = predict_batches(net, X_val, val_batch_size)
        val = float(loss_fn(out_val, t_val.to(device), weighted=False))
        val_losses.append(val)
        if progress is not None:
            bar.set_postfix(train=f"{train_losses[-1]:.3f}", val=f"{val:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, net, out_val)
        if best is None or val < best[0]:
            best = (val, epoch, {k: v.detach().clone() for k, v in net.state_dict().items()})
        elif patience is not None and epoch - best[1] >= patience:
            break
    net.load_state_dict(best[2])
    net.eval()
    return EpochLog(best[1], train_losses, val_losses, stopped_early=len(val_losses) < epochs)
