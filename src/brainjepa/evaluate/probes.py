"""Probes on (cached) subject features: the closed-form probe (ridge / L2 logistic regression,
regularisation chosen on validation) and the paper's BN-linear probe (BatchNorm + Linear trained
with AdamW, epoch chosen on validation). Selection criterion everywhere: the validation loss
(cross-entropy, or MSE on normalised labels)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, require
from ..schedules import cosine
from .training import make_loss, predict_batches, train_keep_best

PROBES = ("closed-form", "bn-linear")
# Regularisation grid, relative to the mean squared singular value of the standardised training
# features, so one grid fits 192 embedding dimensions and 100k FC edges alike.
RELATIVE_GRID = tuple(np.logspace(-4, 3, 15))


def _standardize_fit(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-8] = 1.0  # a constant feature stays constant (zero) instead of exploding
    return mean, scale


class ProbeBase:
    """Label handling shared by every estimator of the protocol (the probes and fine-tuning).

    Classification: the class count (``n_classes_``); regression: labels normalised with the
    training mean and std (``y_mean_``, ``y_std_``) and predictions mapped back. Subclasses set
    ``task`` and implement ``_output(X)``: (n, K) probabilities or (n,) normalised values.
    """

    task: str

    def _fit_labels(self, y: np.ndarray, n_classes: int | None) -> np.ndarray:
        """Learn the label transform on training labels and return the transformed labels."""
        y = np.asarray(y)
        if self.task == "classification":
            self.n_classes_ = int(n_classes or y.max() + 1)
        else:
            self.y_mean_, self.y_std_ = float(np.mean(y)), float(np.std(y)) or 1.0
        return self._labels(y)

    def _labels(self, y: np.ndarray) -> np.ndarray:
        """Class indices as they are; regression labels normalised with train mean and std."""
        y = np.asarray(y)
        return y if self.task == "classification" else (y - self.y_mean_) / self.y_std_

    def _from_head(self, out: torch.Tensor) -> np.ndarray:
        """A trained head's outputs (n, K) as ``_output`` returns them: softmax, or column 0."""
        out = out.double().cpu()
        return out.softmax(dim=1).numpy() if self.task == "classification" else out[:, 0].numpy()

    def _finish(self, out: np.ndarray) -> np.ndarray:
        if self.task == "classification":
            return out.argmax(axis=1)
        return out * self.y_std_ + self.y_mean_

    def predict(self, X) -> np.ndarray:
        """Predictions of the fitted estimator.

        Args:
            X: (n, ...) inputs, as in ``fit``.

        Returns:
            (n,) class indices (classification) or values in the label's units (regression).
        """
        return self._finish(self._output(X))

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities of the fitted estimator.

        Args:
            X: (n, ...) inputs, as in ``fit``.

        Returns:
            (n, K) class probabilities.

        Raises:
            ConfigError: a regression estimator.
        """
        if self.task != "classification":
            raise ConfigError("predict_proba is only defined for classification")
        return self._output(X)


class ClosedFormProbe(ProbeBase):
    """Ridge (regression) or L2 logistic regression (classification) on standardised features.

    ``fit(X, y, X_val, y_val)`` standardises with training statistics, fits every strength of
    the relative ``grid`` on train and keeps the one with the lowest validation loss.
    Learned: ``mean_``, ``scale_``, ``alpha_`` (ridge alpha; logistic C = 1 / alpha_),
    ``val_loss_``, and ``coef_`` / ``intercept_``.

    Args:
        task: 'classification' or 'regression'.
        grid: regularisation strengths relative to the mean squared singular value of the
            standardised training features (:data:`RELATIVE_GRID`).
        class_weight: None or 'balanced' (classification).
        max_iter: iterations at most of scikit-learn's solver, used for more than two classes
            (two classes: :func:`binary_logistic`).
    """

    def __init__(
        self, task: str, grid: Sequence[float] = RELATIVE_GRID, class_weight: str | None = None, max_iter: int = 500
    ):
        self.task = task
        self.grid = grid
        self.class_weight = class_weight
        self.max_iter = max_iter

    def fit(self, X, y, X_val, y_val, n_classes: int | None = None) -> ClosedFormProbe:
        """Fit at every grid strength and keep the one with the lowest validation loss.

        Args:
            X: (n, F) training features.
            y: (n,) training labels: class indices or values.
            X_val: (n_val, F) validation features.
            y_val: (n_val,) validation labels.
            n_classes: K (default: the largest training class index + 1).

        Returns:
            self, fitted.
        """
        X, X_val = np.asarray(X, dtype=np.float64), np.asarray(X_val, dtype=np.float64)
        self.mean_, self.scale_ = _standardize_fit(X)
        Xs, Xv = (X - self.mean_) / self.scale_, (X_val - self.mean_) / self.scale_
        t, t_val = self._fit_labels(y, n_classes), self._labels(y_val)
        U, s, Vt = _thin_svd(Xs)
        unit = float(np.sum(s**2)) / min(Xs.shape) or 1.0  # the mean squared singular value
        # With more features than subjects the L2-penalised logistic solution lies in the row
        # space of Xs (any other component adds penalty and no fit), so it is fitted exactly on
        # the coordinates U * s (n x n) and mapped back by Vt: the same model, far cheaper.
        reduce = self.task == "classification" and Xs.shape[1] > Xs.shape[0]
        Z = U * s if reduce else Xs
        fits, start = {}, None
        # the logistic fits follow the path from the strongest penalty down, each Newton solve
        # starting from the previous solution (the optimum is unique, so only the time changes)
        for rel in sorted(self.grid, reverse=True):
            alpha = rel * unit
            if self.task == "regression":
                coef = Vt.T @ ((s / (s**2 + alpha)) * (U.T @ t))
                intercept = np.zeros(1)  # features and labels are centred on train
            else:
                coef, intercept, start = self._logistic(Z, t, 1.0 / alpha, start)
                if reduce:
                    coef = Vt.T @ coef
            fits[rel] = (alpha, coef, intercept)
        best = None
        for rel in self.grid:
            alpha, coef, intercept = fits[rel]
            if self.task == "regression":
                loss = float(np.mean((Xv @ coef - t_val) ** 2))
            else:
                loss = _cross_entropy(_softmax(Xv @ coef + intercept), t_val)
            if best is None or loss < best[0]:
                best = (loss, alpha, coef, intercept)
        self.val_loss_, self.alpha_, self.coef_, self.intercept_ = best
        return self

    def _logistic(self, X, y, C, start=None):
        """The fit at inverse strength C: ``(coef, intercept, state)``; ``state`` warm-starts the
        next call on the same data (two classes)."""
        present = np.unique(y)
        if len(present) == 2:
            # two classes: Newton's method, exact to ~1e-8 in tens of iterations, where lbfgs
            # stops far from the optimum at the weakly regularised end and costs 50x more
            weights = None
            if self.class_weight == "balanced":
                counts = np.bincount(y, minlength=self.n_classes_)[present].astype(np.float64)
                weights = np.where(y == present[1], len(y) / (2 * counts[1]), len(y) / (2 * counts[0]))
            w, b = binary_logistic(X, (y == present[1]).astype(np.float64), C, weights, start=start)
            coef, intercept = np.zeros((X.shape[1], self.n_classes_)), np.full(self.n_classes_, -1e9)
            coef[:, present[1]], intercept[present[1]], intercept[present[0]] = w, b, 0.0
            return coef, intercept, (w, b)
        linear_model = require("sklearn.linear_model", "eval", "the logistic-regression probe")
        from sklearn.exceptions import ConvergenceWarning  # optional dependency (extra "eval")

        clf = linear_model.LogisticRegression(C=C, max_iter=self.max_iter, class_weight=self.class_weight)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # weakly regularised grid ends
            clf.fit(X, y)
        coef, intercept = np.zeros((X.shape[1], self.n_classes_)), np.full(self.n_classes_, -1e9)
        if clf.coef_.shape[0] == 1:  # sklearn's binary form: one logit for classes_[1]
            coef[:, clf.classes_[1]], intercept[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
            intercept[clf.classes_[0]] = 0.0
        else:
            coef[:, clf.classes_], intercept[clf.classes_] = clf.coef_.T, clf.intercept_
        return coef, intercept, None

    def _output(self, X) -> np.ndarray:
        z = ((np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_) @ self.coef_ + self.intercept_
        return _softmax(z) if self.task == "classification" else z


def _thin_svd(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U, s, Vt`` of the thin SVD of X (n x p), singular values in descending order.

    With many more columns than rows (window features: thousands of features for hundreds of
    windows) it comes from the eigendecomposition of the Gram matrix X X^T (one matrix product
    and an n x n eigenproblem, several times faster than LAPACK's SVD); directions with a
    singular value below 1e-7 of the largest are dropped (they carry no signal, only rounding).
    """
    n, p = X.shape
    if p < 2 * n:
        return np.linalg.svd(X, full_matrices=False)
    evals, U = np.linalg.eigh(X @ X.T)
    evals, U = evals[::-1], U[:, ::-1]
    keep = evals > (1e-7 * np.sqrt(max(evals[0], 0.0))) ** 2 if evals[0] > 0 else np.zeros(n, dtype=bool)
    s, U = np.sqrt(evals[keep]), U[:, keep]
    return U, s, (U.T @ X) / s[:, None]


def binary_logistic(
    X: np.ndarray,
    t: np.ndarray,
    C: float,
    sample_weight: np.ndarray | None = None,
    max_iter: int = 100,
    start: tuple[np.ndarray, float] | None = None,
) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression by Newton's method with backtracking.

    Minimises C * sum_i s_i log-loss_i + ||w||^2 / 2 (the intercept is not penalised; the
    objective of scikit-learn's LogisticRegression).

    Args:
        X: (n, d) features.
        t: (n,) 0/1 targets.
        C: inverse regularisation strength.
        sample_weight: (n,) weights s_i (default 1).
        max_iter: Newton iterations at most.
        start: ``(w, b)`` to start from (e.g. the solution at a neighbouring C); default zeros.

    Returns:
        (w (d,), b).
    """
    n, d = X.shape
    A = np.hstack([np.asarray(X, dtype=np.float64), np.ones((n, 1))])
    s = C * (np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64))
    penalty = np.ones(d + 1)
    penalty[-1] = 0.0

    def objective(theta):
        z = A @ theta
        return float(np.sum(s * (np.logaddexp(0.0, z) - t * z)) + 0.5 * np.sum(penalty * theta**2))

    theta = np.zeros(d + 1) if start is None else np.append(np.asarray(start[0], dtype=np.float64), start[1])
    f = objective(theta)
    for _ in range(max_iter):
        z = A @ theta
        p = 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, without overflow
        grad = A.T @ (s * (p - t)) + penalty * theta
        # positive definite: the identity on w, and sum_i s_i p_i (1 - p_i) > 0 on b
        hess = (A.T * (s * p * (1.0 - p))) @ A + np.diag(penalty)
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        a = 1.0
        while True:  # backtracking (Armijo): a full Newton step can overshoot far from the optimum
            new = theta - a * step
            f_new = objective(new)
            if f_new <= f - 1e-4 * a * float(grad @ step) or a < 1e-12:
                break
            a *= 0.5
        theta, f = new, f_new
        if np.abs(a * step).max() <= 1e-10 * max(1.0, np.abs(theta).max()):
            break
    return theta[:d], float(theta[d])


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _cross_entropy(proba: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, None))))


class BNLinearProbe(ProbeBase):
    """The paper's linear probe: BatchNorm1d (no affine) + Linear, AdamW, cosine schedule.

    ``fit(X, y, X_val, y_val)`` trains on (cached) embeddings for ``epochs`` and keeps the epoch
    with the lowest validation loss (:func:`~brainjepa.evaluate.training.train_keep_best`).
    Learned: ``head_`` (eval mode), ``best_epoch_``, ``val_losses_`` (one per epoch).

    Args:
        task: 'classification' or 'regression'.
        epochs: training epochs.
        lr: the peak learning rate (cosine schedule to 0).
        weight_decay: AdamW weight decay.
        batch_size: the smallest training batch: each epoch is cut into max(1, n // batch_size)
            nearly equal batches (BatchNorm needs more than one sample).
        class_weight: None or 'balanced'.
        seed: the seed of the head's initialisation and the shuffles.
    """

    def __init__(
        self,
        task: str,
        *,
        epochs: int = 50,
        lr: float = 1e-2,
        weight_decay: float = 1e-4,
        batch_size: int = 16,
        class_weight: str | None = None,
        seed: int = 0,
    ):
        self.task = task
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.class_weight = class_weight
        self.seed = seed

    def fit(self, X, y, X_val, y_val, n_classes: int | None = None) -> BNLinearProbe:
        """Train the head and keep its epoch with the lowest validation loss.

        Args:
            X: (n, F) training features.
            y: (n,) training labels: class indices or values.
            X_val: (n_val, F) validation features.
            y_val: (n_val,) validation labels.
            n_classes: K (default: the largest training class index + 1).

        Returns:
            self, fitted.
        """
        y = np.asarray(y)
        t, t_val = torch.as_tensor(self._fit_labels(y, n_classes)), torch.as_tensor(self._labels(y_val))
        X, Xv = (
            torch.as_tensor(np.asarray(X), dtype=torch.float32),
            torch.as_tensor(np.asarray(X_val), dtype=torch.float32),
        )
        out_dim = self.n_classes_ if self.task == "classification" else 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            head = nn.Sequential(nn.BatchNorm1d(X.shape[1], affine=False), nn.Linear(X.shape[1], out_dim))
        opt = torch.optim.AdamW(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        n_batches = max(1, len(X) // self.batch_size)  # chunks of >= batch_size: BatchNorm needs > 1
        total = self.epochs * n_batches
        history = train_keep_best(
            head,
            opt,
            make_loss(self.task, y, out_dim, self.class_weight),
            X,
            t,
            Xv,
            t_val,
            epochs=self.epochs,
            n_batches=n_batches,
            lr_at=lambda step: cosine(self.lr, 0.0, step / total),  # to 0 one step past the last
            generator=torch.Generator().manual_seed(self.seed),
        )
        self.head_, self.best_epoch_, self.val_losses_ = head, history.best_epoch, history.val_losses
        return self

    def _output(self, X) -> np.ndarray:
        return self._from_head(predict_batches(self.head_, torch.as_tensor(np.asarray(X), dtype=torch.float32)))


def make_probe(kind: str, task: str, seed: int = 0, class_weight: str | None = None, **kwargs):
    """A probe by name.

    Args:
        kind: 'closed-form' (:class:`ClosedFormProbe`) or 'bn-linear' (:class:`BNLinearProbe`).
        task: 'classification' or 'regression'.
        seed: the seed of a trained probe.
        class_weight: None or 'balanced'.
        **kwargs: further options of the probe.

    Returns:
        The unfitted probe.

    Raises:
        ConfigError: an unknown kind.
    """
    if kind == "closed-form":
        return ClosedFormProbe(task, class_weight=class_weight, **kwargs)
    if kind == "bn-linear":
        return BNLinearProbe(task, seed=seed, class_weight=class_weight, **kwargs)
    raise ConfigError(f"unknown probe {kind!r}; choose one of {PROBES}")
