"""Test-split metrics: AUROC, classification metrics (ACC, balanced ACC, F1, AUROC) and
regression metrics (MSE, MAE, Pearson r, R^2), with their display names."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

# the metric that ranks methods and that comparisons use, per task
HEADLINE_METRIC = {"classification": "auroc", "regression": "pearson_r"}
LOWER_IS_BETTER = ("mse", "mae")
METRIC_NAMES = {
    "acc": "ACC",
    "balanced_acc": "BACC",
    "f1": "F1",
    "auroc": "AUROC",
    "mse": "MSE",
    "mae": "MAE",
    "pearson_r": "r",
    "r2": "R2",
}


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Binary AUROC by the Mann-Whitney U statistic (ties count one half).

    Args:
        y_true: (n,) labels, truthy for the positive class.
        scores: (n,) scores, higher for the positive class.

    Returns:
        The AUROC, or NaN when one class is absent.
    """
    y_true = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray) -> dict:
    """ACC, balanced ACC, F1 and AUROC of class indices 0..K-1.

    Binary (K = 2): F1 and AUROC of the positive class 1. More classes: macro averages
    (one-vs-rest AUROC over the classes present in ``y_true``).

    Args:
        y_true: (n,) true class indices.
        y_pred: (n,) predicted class indices.
        proba: (n, K) predicted probabilities.

    Returns:
        {"acc", "balanced_acc", "f1", "auroc"}.
    """
    y_true, y_pred, proba = np.asarray(y_true), np.asarray(y_pred), np.asarray(proba)
    n_classes = proba.shape[1]
    present = np.unique(y_true)
    recalls = [np.mean(y_pred[y_true == k] == k) for k in present]

    def f1(k):
        tp = np.sum((y_pred == k) & (y_true == k))
        wrong = np.sum((y_pred == k) != (y_true == k))
        return float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0

    if n_classes == 2:
        f1_score, auroc = f1(1), roc_auc(y_true == 1, proba[:, 1])
    else:
        f1_score = float(np.mean([f1(k) for k in range(n_classes)]))
        aucs = [roc_auc(y_true == k, proba[:, k]) for k in present]
        auroc = float(np.nanmean(aucs)) if len(present) > 1 else float("nan")
    return {
        "acc": float(np.mean(y_true == y_pred)),
        "balanced_acc": float(np.mean(recalls)),
        "f1": f1_score,
        "auroc": auroc,
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """MSE, MAE, Pearson r and R^2 of predictions.

    Args:
        y_true: (n,) true values.
        y_pred: (n,) predicted values.

    Returns:
        {"mse", "mae", "pearson_r", "r2"}; r is NaN when a side is constant, R^2 when the
        true values are.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    err = y_pred - y_true
    ss_tot = np.sum((y_true - y_true.mean()) ** 2)
    if np.std(y_true) > 0 and np.std(y_pred) > 0:
        r = float(np.corrcoef(y_true, y_pred)[0, 1])
    else:
        r = float("nan")
    return {
        "mse": float(np.mean(err**2)),
        "mae": float(np.mean(np.abs(err))),
        "pearson_r": r,
        "r2": float(1 - np.sum(err**2) / ss_tot) if ss_tot > 0 else float("nan"),
    }
