"""Downstream evaluation: embeddings, readouts, probes, baselines, metrics and the split protocol.

The protocol, for every target and split seed: split the subjects 60/20/20 into train /
validation / test (stratified for classification, or a user-given split column), fit every
method on train, choose its regularisation or epoch on validation only, and evaluate the test
split exactly once. Results are mean +- std (sample std, ddof = 1) over split seeds, one row per
(method, target, metric), and every method sees the same splits, so methods can be compared
pair by pair, seed by seed.

What the encoder sees. Each scan is resampled to the model's TR and tiled with evenly spaced
windows of the model's length that together cover it (:meth:`BrainJEPA.prepare_windows`; a scan
shorter than one window is encoded on its real time patches only); ``windows="center"`` keeps
only the centre window instead. Each window is encoded once and its token features h (R, p, D)
are summarised by one or more *readouts*; a subject's embedding under a readout is the average
of that readout over its windows:

- ``mean``: mean over all tokens, then LayerNorm without affine (:meth:`BrainJEPA.embed`);
- ``roi``: per ROI, the mean and the std of each feature over the time patches (R * 2D);
- ``fc``: ROI x ROI correlation of the token features over time: each ROI's (p, D) features
  centred over time and flattened, cosine between ROIs, Fisher-z, strict upper triangle.

Mean pooling discards how ROIs co-vary over time, which is what FC measures; the ``roi`` and
``fc`` readouts keep first- and second-order structure, so a weak ``mean`` row does not by
itself show that the features lack the information.

Methods in every table, on the same splits:

- ``brainjepa:<readout>``: the pretrained encoder, frozen, then a probe;
- ``random_init#<k>:<readout>``: the same architecture initialised with seed k (several seeds,
  3 by default: the spread between seeds can exceed the gap to the pretrained model), probed
  identically; ``random_init(mean):<readout>`` averages them per split seed and
  ``random_init(best):<readout>`` is the seed with the best mean headline metric (AUROC or
  Pearson r) over split seeds. That choice looks at test results, so it is an optimistic
  reference for random initialisation: beating it is the stricter test;
- ``fc_full``: the Fisher-z FC upper triangle of the full raw scan (FC at its strongest);
- ``fc_window``: the FC of exactly the windows the encoder sees, Fisher-z averaged over them;
- ``amplitude``: per-ROI log temporal std of the full resampled scan (of percent signal
  change when the scan looks like raw BOLD), a first-order signal that needs no model.

The FC and amplitude baselines always use the closed-form probe. :func:`compare` gives paired
differences over split seeds (mean, 95% t interval, two-sided paired t-test, wins), and
:func:`probe_cohort` reports them for the pretrained model against each reference.

Probes. ``closed-form`` (default): ridge regression or L2 logistic regression on standardised
embeddings, regularisation chosen on validation. ``bn-linear``: the paper's linear probe,
BatchNorm (no affine) + Linear trained with AdamW for 50 epochs, epoch chosen on validation.
Because the encoder is frozen and evaluation windows are deterministic, the embeddings are
computed once and cached: training the head on cached embeddings gives exactly the gradients it
would get from running the encoder every step, at a fraction of the cost. Selection criterion
everywhere: the validation loss (cross-entropy or MSE on normalised labels), which is
continuous where accuracy on a small validation split is not.

Regression labels are normalised with the training split's mean and std; every metric is
reported in the original units. Fine-tuning lives in :mod:`brainjepa.finetune` (methods
:data:`METHODS`: one centre window per subject, as the fine-tuning recipe trains on).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import CohortSeries
from .errors import ConfigError, DataError, require

log = logging.getLogger(__name__)

# the methods of fine-tuning (brainjepa.finetune); linear probing names its methods with
# probe_method_names()
METHODS = ("brainjepa", "random_init", "fc_baseline")
READOUTS = ("mean", "roi", "fc")
WINDOWS = ("all", "center")
BASELINES = ("fc_full", "fc_window", "amplitude")
MODEL = "brainjepa"
RANDOM_INIT = "random_init"
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
PROBES = ("closed-form", "bn-linear")
# Regularisation grid, relative to the mean squared singular value of the standardised training
# features, so one grid fits 192 embedding dimensions and 100k FC edges alike.
RELATIVE_GRID = tuple(np.logspace(-4, 3, 15))
# A label with at most this many distinct integer values is a classification target under "auto".
MAX_AUTO_CLASSES = 10
MISSING = {"", "na", "n/a", "nan", "none", "null"}
# a scan whose ROI means exceed this many temporal stds (median over ROIs) is raw BOLD: its
# amplitude is measured in percent signal change
RAW_BOLD_MEAN_OVER_STD = 5.0


# --------------------------------------------------------------------------- metrics


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Binary AUROC (Mann-Whitney U, ties count one half); NaN when one class is absent."""
    y_true = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray) -> dict:
    """ACC, balanced ACC, F1 and AUROC of class indices 0..K-1; proba: (n, K) probabilities.

    Binary (K = 2): F1 and AUROC of the positive class 1. More classes: macro averages
    (one-vs-rest AUROC over the classes present in y_true).
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
    """MSE, MAE, Pearson r and R^2 (r is NaN when a side is constant)."""
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


# --------------------------------------------------------------------------- labels and splits


def present_mask(values: Sequence) -> np.ndarray:
    """(N,) bool: which labels are present (not NaN / empty / 'NA')."""
    values = np.asarray(values)
    if values.dtype.kind in "fc":
        return np.isfinite(values)
    if values.dtype.kind in "iub":
        return np.ones(len(values), dtype=bool)
    return np.array([v is not None and str(v).strip().lower() not in MISSING for v in values])


def _as_numbers(values: np.ndarray) -> np.ndarray | None:
    try:
        return values.astype(np.float64)
    except (TypeError, ValueError):
        return None


def infer_task(values: Sequence) -> str:
    """'classification' for text labels or at most 10 distinct integers, else 'regression'."""
    values = np.asarray(values)
    numbers = _as_numbers(values)
    if numbers is None:
        return "classification"
    distinct = np.unique(numbers)
    if len(distinct) <= MAX_AUTO_CLASSES and np.all(distinct == np.round(distinct)):
        return "classification"
    return "regression"


def encode_labels(values: Sequence, task: str, name: str = "target") -> tuple[np.ndarray, list | None]:
    """Labels -> (y, classes). Classification: y = class index 0..K-1 in sorted class order
    (numeric order for numbers, so 0/1 labels keep 1 as the positive class); regression: float."""
    values = np.asarray(values)
    numbers = _as_numbers(values)
    if task == "regression":
        if numbers is None:
            raise DataError(
                f"target {name!r} has non-numeric values (e.g. {values[0]!r}) and "
                "cannot be a regression target: use --task classification"
            )
        return numbers, None
    if task != "classification":
        raise ConfigError(f"task must be 'classification', 'regression' or 'auto', got {task!r}")
    keys = numbers if numbers is not None else values.astype(str)
    classes, y = np.unique(keys, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"target {name!r} has a single class ({classes[0]!r}): nothing to classify")
    classes = [c.item() if hasattr(c, "item") else c for c in classes]
    if numbers is not None and all(float(c).is_integer() for c in classes):
        classes = [int(c) for c in classes]
    return y.astype(np.int64), classes


@dataclass
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_indices(
    y: np.ndarray, task: str, seed: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> Split:
    """Random train/val/test split of N subjects, stratified by class for classification."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == k) for k in np.unique(y)] if task == "classification" else [np.arange(len(y))]
    parts: list[list[np.ndarray]] = [[], [], []]
    for idx in groups:
        n = len(idx)
        if n < 3:
            raise DataError(
                f"a class has only {n} subject(s); a stratified train/val/test split "
                "needs at least 3 per class (merge rare classes or add subjects)"
            )
        idx = rng.permutation(idx)
        n_train = max(1, int(round(fractions[0] * n)))
        n_val = max(1, int(round(fractions[1] * n)))
        n_train = min(n_train, n - n_val - 1)
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train : n_train + n_val])
        parts[2].append(idx[n_train + n_val :])
    return Split(*(np.sort(np.concatenate(p)) for p in parts))


def split_from_column(values: Sequence, name: str = "split") -> Split:
    """A user-given split: values 'train', 'val' (or 'validation'), 'test' per subject."""
    values = np.array([str(v).strip().lower() for v in values])
    values[values == "validation"] = "val"
    unknown = sorted(set(values) - {"train", "val", "test"})
    if unknown:
        raise DataError(f"split column {name!r} has values {unknown}; use train / val / test")
    split = Split(*(np.flatnonzero(values == s) for s in ("train", "val", "test")))
    for part in ("train", "val", "test"):
        if len(getattr(split, part)) == 0:
            raise DataError(f"split column {name!r} assigns no subject to {part!r}")
    return split


# --------------------------------------------------------------------------- features


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fc_features(series: Sequence[np.ndarray]) -> np.ndarray:
    """(N, R(R-1)/2) float32: each subject's Pearson FC, Fisher-z, strict upper triangle."""
    from .gradients import connectivity

    rows = []
    for x in series:
        r = connectivity([x], fisher_z=False)
        iu = np.triu_indices(r.shape[0], k=1)
        rows.append(np.arctanh(np.clip(r[iu], -1 + 1e-7, 1 - 1e-7)).astype(np.float32))
    return np.stack(rows)


def window_fc(windows, n_patches_valid: int, patch_size: int) -> np.ndarray:
    """FC of the windows one subject's model input is made of, (R(R-1)/2,) float32: each
    window's Fisher-z FC over the frames the encoder reads (its valid patches), averaged over
    the windows. windows: (W, R, n_timepoints), as from :meth:`BrainJEPA.prepare_windows`."""
    frames = n_patches_valid * patch_size
    return fc_features([np.asarray(w)[:, :frames] for w in windows]).mean(axis=0)


def amplitude_features(series: Sequence[np.ndarray]) -> np.ndarray:
    """(N, R) float32: per ROI, the log of the temporal std of each (R, T) series.

    A series that looks like raw BOLD (median over ROIs of |mean| / std above 5) is measured in
    percent signal change, 100 (x - mean) / |mean|, so scanner-dependent offsets cancel; any
    other series (already centred or scaled) as it is.
    """
    rows = []
    for x in series:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] < 2:
            raise DataError(f"amplitude: expected an (R, T) series with T >= 2, got shape {x.shape}")
        mean, std = x.mean(axis=1), x.std(axis=1)
        ratio = np.abs(mean) / np.maximum(std, 1e-12)
        if np.median(ratio) > RAW_BOLD_MEAN_OVER_STD:
            std = 100.0 * std / np.maximum(np.abs(mean), 1e-12)
        # a constant ROI has no amplitude; a floor keeps its log finite for the probe
        rows.append(np.log(np.maximum(std, 1e-12)).astype(np.float32))
    return np.stack(rows)


def readout_features(h: torch.Tensor, readout: str, eps: float = 1e-6) -> torch.Tensor:
    """One readout of token features h (..., R, p, D) (p time patches) -> (..., F) float32.

    ``mean``: mean over the R * p tokens, then LayerNorm without affine (eps ``eps``), F = D.
    ``roi``: per ROI the mean over time patches of each feature, then their std (ddof 0),
    F = R * 2D laid out ROI by ROI as [mean (D), std (D)] (large: 0.7M values per subject at
    R = 450, D = 768).
    ``fc``: each ROI's (p, D) features centred over time and flattened to p * D, cosine
    between ROIs (Pearson over time and features), Fisher-z (|r| clipped below 1 - 1e-7),
    strict upper triangle in row-major order, F = R(R-1)/2. With one time patch nothing varies
    over time and every edge is 0.
    """
    h = h.float()
    if readout == "mean":
        pooled = h.mean(dim=(-3, -2))
        return F.layer_norm(pooled, pooled.shape[-1:], eps=eps)
    if readout == "roi":
        stats = torch.cat([h.mean(dim=-2), h.std(dim=-2, unbiased=False)], dim=-1)  # (..., R, 2D)
        return stats.flatten(-2)
    if readout == "fc":
        n_rois = h.shape[-3]
        # float64: correlations near 1 must not round to 1 before the Fisher-z
        c = (h - h.mean(dim=-2, keepdim=True)).flatten(-2).double()  # (..., R, p*D)
        c = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        r = (c @ c.transpose(-1, -2)).clamp(-1 + 1e-7, 1 - 1e-7)
        iu = torch.triu_indices(n_rois, n_rois, offset=1, device=h.device)
        return torch.atanh(r[..., iu[0], iu[1]]).float()
    raise ConfigError(f"unknown readout {readout!r}; choose one of {READOUTS}")


def _check_readouts(readouts) -> tuple[str, ...]:
    readouts = (readouts,) if isinstance(readouts, str) else tuple(dict.fromkeys(readouts))
    unknown = [r for r in readouts if r not in READOUTS]
    if unknown or not readouts:
        raise ConfigError(f"readouts must be among {READOUTS}, got {list(readouts) or 'none'}")
    return readouts


def _check_windows(windows: str) -> str:
    if windows not in WINDOWS:
        raise ConfigError(f"windows must be one of {WINDOWS}, got {windows!r}")
    return windows


def token_index(n_rois: int, n_patches: int, n_patches_valid: int) -> torch.Tensor:
    """(R * n_patches_valid,) indices of the tokens (r, t) with t < n_patches_valid, ROI-major
    (token r * n_patches + t), in the order encode_windows returns them."""
    return (torch.arange(n_rois)[:, None] * n_patches + torch.arange(n_patches_valid)).reshape(-1)


def encode_windows(model, windows: torch.Tensor, n_patches_valid: int | None = None) -> torch.Tensor:
    """Token features of prepared windows (B, R, n_timepoints) -> (B, R, p, D), p =
    ``n_patches_valid`` (default all patches): a window padded after its last valid patch is
    encoded on its valid tokens only, so the padding takes no part in attention."""
    cfg = model.config
    p = cfg.n_patches if n_patches_valid is None else int(n_patches_valid)
    if not 1 <= p <= cfg.n_patches:
        raise DataError(f"n_patches_valid must be between 1 and {cfg.n_patches}, got {p}")
    if p == cfg.n_patches:
        h = model.encode(windows)
    else:  # prepare_windows made these inputs, so the input checks have nothing to add
        x = model._as_input(windows)
        idx = token_index(cfg.n_rois, cfg.n_patches, p).to(x.device).expand(len(x), -1)
        h = model.encoder(x, token_idx=idx)
    return h.reshape(len(windows), cfg.n_rois, p, -1)


def subject_windows(model, series, tr: float | None = None, windows: str = "all") -> tuple[torch.Tensor, int]:
    """The windows of one subject the encoder sees: ((W, R, n_timepoints), n_patches_valid).
    ``all``: :meth:`BrainJEPA.prepare_windows`; ``center``: the centre window of
    :meth:`BrainJEPA.prepare` (a scan shorter than a window: its one padded window)."""
    from .transforms import resampled_length

    if _check_windows(windows) == "center":
        n = np.shape(series)[-1]
        if model.target_tr is not None and tr is not None:
            n = resampled_length(n, tr, model.target_tr)
        if n >= model.config.n_timepoints:
            return model.prepare(series, tr=tr)[None], model.config.n_patches
    return model.prepare_windows(series, tr=tr)


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


def _trs(tr, n: int) -> list:
    trs = list(tr) if isinstance(tr, (list, tuple, np.ndarray)) else [tr] * n
    if len(trs) != n:
        raise DataError(f"got {len(trs)} repetition times for {n} series")
    return trs


@torch.inference_mode()
def encode_readouts(
    models: dict,
    X,
    tr=None,
    *,
    readouts: Sequence[str] = READOUTS,
    windows: str = "all",
    batch_size: int = 16,
    device: str | None = None,
    fc_window: bool = False,
    progress: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """Several readouts of several encoders from one pass over the data.

    ``models``: {name: BrainJEPA}, all with the same preprocessing (e.g. a model and its
    :func:`random_init_like` copies): each subject's windows are prepared once, with the first
    model, and every model encodes each window once; every readout is computed from those token
    features. X: a sequence of raw (R, T_i) series read one at a time; ``tr``: one repetition
    time or one per subject. Returns {name: {readout: (N, F) float32}}, each subject's readout
    averaged over its windows; with ``fc_window`` also {"fc_window": {"fc": (N, R(R-1)/2)}},
    the FC of the same windows (see :func:`window_fc`).
    """
    readouts, windows = _check_readouts(readouts), _check_windows(windows)
    if not models:
        raise ConfigError("encode_readouts needs at least one model")
    names = list(models)
    first = models[names[0]]
    for name in names[1:]:
        if models[name].config != first.config:
            raise ConfigError(f"model {name!r} has another architecture than {names[0]!r}; encode them separately")
    dev = resolve_device(device)
    nets = {name: m.to(dev).eval() for name, m in models.items()}
    n = len(X)
    trs = _trs(tr, n)
    cfg = first.config
    out: dict[str, dict[str, list]] = {name: {r: [] for r in readouts} for name in names}
    fcs: list[np.ndarray] = []
    steps = range(0, n, batch_size)
    for start in _progress(steps, len(steps), "encoding", progress):
        chunk = range(start, min(start + batch_size, n))
        items = [subject_windows(first, X[i], tr=trs[i], windows=windows) for i in chunk]
        if fc_window:
            fcs += [window_fc(w.numpy(), p, cfg.patch_size) for w, p in items]
        # windows of equal valid length share a batch (the usual case: all of them)
        groups: dict[int, list[int]] = {}
        for j, (_, p) in enumerate(items):
            groups.setdefault(p, []).append(j)
        for name, net in nets.items():
            sums = {r: None for r in readouts}
            counts = torch.zeros(len(items), dtype=torch.float64)
            for p, members in groups.items():
                x = torch.cat([items[j][0] for j in members])
                owner = torch.cat([torch.full((len(items[j][0]),), j) for j in members])
                counts.index_add_(0, owner, torch.ones(len(owner), dtype=torch.float64))
                for xb, ob in zip(x.split(batch_size), owner.split(batch_size)):
                    h = encode_windows(net, xb.to(dev), p)
                    for r in readouts:
                        f = readout_features(h, r, cfg.layernorm_eps).double().cpu()
                        if sums[r] is None:
                            sums[r] = torch.zeros(len(items), f.shape[1], dtype=torch.float64)
                        sums[r].index_add_(0, ob, f)
            for r in readouts:
                out[name][r].append((sums[r] / counts[:, None]).float().numpy())
    result = {name: {r: np.concatenate(v) for r, v in per.items()} for name, per in out.items()}
    if fc_window:
        result["fc_window"] = {"fc": np.stack(fcs).astype(np.float32)}
    return result


class BrainJEPAEmbedder:
    """scikit-learn style subject embedder around a (frozen) :class:`~brainjepa.bundle.BrainJEPA`.

    ``transform(X, tr=...)``: X is a sequence of (R, T_i) arrays (raw series; anything with
    ``len`` and ``[]``, read lazily batch by batch), ``tr`` their repetition time in seconds (one
    number or one per subject; used to resample to the model's TR). Each series is resampled and
    cut into the windows the model sees (``windows="all"``: evenly spaced windows covering the
    scan, :meth:`BrainJEPA.prepare_windows`; ``"center"``: the centre window), each normalised
    as in pretraining, so the same input always gives the same embedding. Returns (N, F): the
    ``readout`` (one of :data:`READOUTS`, see :func:`readout_features`) averaged over windows;
    :meth:`transform_readouts` gives several readouts from one encoding pass. With
    ``tokens=True``: the centre window's token features (N, R, P, D) (a scan shorter than a
    window: NaN for its patches without data).
    """

    def __init__(
        self,
        model,
        *,
        readout: str = "mean",
        windows: str | None = None,
        batch_size: int = 16,
        device: str | None = None,
        tokens: bool = False,
        progress: bool = False,
    ):
        self.model = model
        self.readout = _check_readouts(readout)[0]
        if tokens and windows not in (None, "center"):
            raise ConfigError(
                "tokens=True returns the token features of one window per "
                "subject: pass windows='center' (or leave windows unset)"
            )
        # tokens are one window's; readouts average every window unless told otherwise
        self.window_set = _check_windows(windows or ("center" if tokens else "all"))
        self.batch_size = batch_size
        self.device = device
        self.tokens = tokens
        self.progress = progress

    def fit(self, X=None, y=None) -> BrainJEPAEmbedder:
        """Nothing to learn (the encoder is frozen); present for pipelines."""
        return self

    def _batches(self, X, tr):
        n = len(X)
        trs = _trs(tr, n)
        steps = range(0, n, self.batch_size)
        for start in _progress(steps, len(steps), "embedding", self.progress):
            stop = min(start + self.batch_size, n)
            yield torch.stack([self.model.prepare(X[i], tr=trs[i]) for i in range(start, stop)])

    def windows(self, X, tr=None) -> torch.Tensor:
        """The model's centre-window input for each series: (N, R, T) float tensor (on the CPU)."""
        return torch.cat(list(self._batches(X, tr)))

    @torch.inference_mode()
    def transform(self, X, tr=None) -> np.ndarray:
        if self.tokens:
            return self._tokens(X, tr)
        return self.transform_readouts(X, tr, (self.readout,))[self.readout]

    def transform_readouts(self, X, tr=None, readouts: Sequence[str] = READOUTS) -> dict[str, np.ndarray]:
        """{readout: (N, F)} for several readouts from one encoding pass."""
        return encode_readouts(
            {"model": self.model},
            X,
            tr,
            readouts=readouts,
            windows=self.window_set,
            batch_size=self.batch_size,
            device=self.device,
            progress=self.progress,
        )["model"]

    @torch.inference_mode()
    def _tokens(self, X, tr) -> np.ndarray:
        model = self.model.to(resolve_device(self.device)).eval()
        cfg = model.config
        trs = _trs(tr, len(X))
        out = np.full((len(X), cfg.n_rois, cfg.n_patches, cfg.embed_dim), np.nan, dtype=np.float32)
        steps = range(0, len(X), self.batch_size)
        for start in _progress(steps, len(steps), "embedding", self.progress):
            chunk = list(range(start, min(start + self.batch_size, len(X))))
            items = [subject_windows(model, X[i], tr=trs[i], windows="center") for i in chunk]
            for p in {p for _, p in items}:  # scans of equal valid length share a pass
                idx = [j for j, (_, q) in enumerate(items) if q == p]
                h = encode_windows(model, torch.cat([items[j][0] for j in idx]), p)
                out[[chunk[j] for j in idx], :, :p] = h.float().cpu().numpy()
        return out

    def fit_transform(self, X, y=None, tr=None) -> np.ndarray:
        return self.transform(X, tr=tr)


def random_init_like(model, seed: int = 0):
    """The same architecture, gradients and preprocessing as ``model``, freshly initialised."""
    from .bundle import BrainJEPA

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BrainJEPA(
            model.config,
            model.encoder.gradients.detach().cpu(),
            normalization=model.normalization,
            roi_labels=model.roi_labels,
            target_tr=model.target_tr,
        )


# --------------------------------------------------------------------------- probes


def _standardize_fit(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-8] = 1.0  # a constant feature stays constant (zero) instead of exploding
    return mean, scale


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """'balanced' weights n / (K * n_k) of class indices y (classes absent from y get 1)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 1.0)


class _Probe:
    """Shared label handling: class count / regression label normalisation, predict_proba."""

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

    def _finish(self, out: np.ndarray) -> np.ndarray:
        if self.task == "classification":
            return out.argmax(axis=1)
        return out * self.y_std_ + self.y_mean_

    def predict(self, X) -> np.ndarray:
        """Class indices (classification) or values in the label's units (regression)."""
        return self._finish(self._output(X))

    def predict_proba(self, X) -> np.ndarray:
        if self.task != "classification":
            raise ConfigError("predict_proba is only defined for classification")
        return self._output(X)


class ClosedFormProbe(_Probe):
    """Ridge (regression) or L2 logistic regression (classification) on standardised features.

    ``fit(X, y, X_val, y_val)`` standardises with training statistics, fits every strength of
    the relative ``grid`` on train and keeps the one with the lowest validation loss.
    Learned: ``mean_``, ``scale_``, ``alpha_`` (ridge alpha; logistic C = 1 / alpha_),
    ``val_loss_``, and ``coef_`` / ``intercept_``.
    """

    def __init__(
        self, task: str, grid: Sequence[float] = RELATIVE_GRID, class_weight: str | None = None, max_iter: int = 500
    ):
        self.task = task
        self.grid = grid
        self.class_weight = class_weight
        self.max_iter = max_iter

    def fit(self, X, y, X_val, y_val, n_classes: int | None = None) -> ClosedFormProbe:
        X, X_val = np.asarray(X, dtype=np.float64), np.asarray(X_val, dtype=np.float64)
        self.mean_, self.scale_ = _standardize_fit(X)
        Xs, Xv = (X - self.mean_) / self.scale_, (X_val - self.mean_) / self.scale_
        t, t_val = self._fit_labels(y, n_classes), self._labels(y_val)
        U, s, Vt = np.linalg.svd(Xs, full_matrices=False)
        unit = float(np.mean(s**2)) or 1.0
        # With more features than subjects the L2-penalised logistic solution lies in the row
        # space of Xs (any other component adds penalty and no fit), so it is fitted exactly on
        # the coordinates U * s (n x n) and mapped back by Vt: the same model, far cheaper.
        reduce = self.task == "classification" and Xs.shape[1] > Xs.shape[0]
        Z = U * s if reduce else Xs
        best = None
        for rel in self.grid:
            alpha = rel * unit
            if self.task == "regression":
                coef = Vt.T @ ((s / (s**2 + alpha)) * (U.T @ t))
                intercept = np.zeros(1)  # features and labels are centred on train
                loss = float(np.mean((Xv @ coef - t_val) ** 2))
            else:
                coef, intercept = self._logistic(Z, t, 1.0 / alpha)
                if reduce:
                    coef = Vt.T @ coef
                loss = _cross_entropy(_softmax(Xv @ coef + intercept), t_val)
            if best is None or loss < best[0]:
                best = (loss, alpha, coef, intercept)
        self.val_loss_, self.alpha_, self.coef_, self.intercept_ = best
        return self

    def _logistic(self, X, y, C):
        present = np.unique(y)
        if len(present) == 2:
            # two classes: Newton's method, exact to ~1e-8 in tens of iterations, where lbfgs
            # stops far from the optimum at the weakly regularised end and costs 50x more
            weights = None
            if self.class_weight == "balanced":
                counts = np.bincount(y, minlength=self.n_classes_)[present].astype(np.float64)
                weights = np.where(y == present[1], len(y) / (2 * counts[1]), len(y) / (2 * counts[0]))
            w, b = binary_logistic(X, (y == present[1]).astype(np.float64), C, weights)
            coef, intercept = np.zeros((X.shape[1], self.n_classes_)), np.full(self.n_classes_, -1e9)
            coef[:, present[1]], intercept[present[1]], intercept[present[0]] = w, b, 0.0
            return coef, intercept
        linear_model = require("sklearn.linear_model", "eval", "the logistic-regression probe")
        from sklearn.exceptions import ConvergenceWarning

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
        return coef, intercept

    def _output(self, X) -> np.ndarray:
        z = ((np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_) @ self.coef_ + self.intercept_
        return _softmax(z) if self.task == "classification" else z


def binary_logistic(
    X: np.ndarray, t: np.ndarray, C: float, sample_weight: np.ndarray | None = None, max_iter: int = 100
) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression of 0/1 targets ``t`` on X (n, d): (w (d,), b), the
    minimiser of C * sum_i s_i log-loss_i + ||w||^2 / 2 (the intercept b is not penalised; the
    objective of scikit-learn's LogisticRegression), by Newton's method with backtracking."""
    n, d = X.shape
    A = np.hstack([np.asarray(X, dtype=np.float64), np.ones((n, 1))])
    s = C * (np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64))
    penalty = np.ones(d + 1)
    penalty[-1] = 0.0

    def objective(theta):
        z = A @ theta
        return float(np.sum(s * (np.logaddexp(0.0, z) - t * z)) + 0.5 * np.sum(penalty * theta**2))

    theta = np.zeros(d + 1)
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


class BNLinearProbe(_Probe):
    """The paper's linear probe: BatchNorm1d (no affine) + Linear, AdamW, cosine schedule.

    ``fit(X, y, X_val, y_val)`` trains on (cached) embeddings for ``epochs`` and keeps the epoch
    with the lowest validation loss. Learned: ``head_`` (eval mode), ``best_epoch_``,
    ``val_losses_`` (one per epoch).
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
        y = np.asarray(y)
        t, t_val = torch.as_tensor(self._fit_labels(y, n_classes)), torch.as_tensor(self._labels(y_val))
        gen = torch.Generator().manual_seed(self.seed)
        X, Xv = (
            torch.as_tensor(np.asarray(X), dtype=torch.float32),
            torch.as_tensor(np.asarray(X_val), dtype=torch.float32),
        )
        out_dim = self.n_classes_ if self.task == "classification" else 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            head = nn.Sequential(nn.BatchNorm1d(X.shape[1], affine=False), nn.Linear(X.shape[1], out_dim))
        loss_fn = make_loss(self.task, y, out_dim, self.class_weight)
        opt = torch.optim.AdamW(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        n_batches = max(1, len(X) // self.batch_size)  # chunks of >= batch_size: BatchNorm needs > 1
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.epochs * n_batches)
        best, self.val_losses_ = None, []
        for epoch in range(self.epochs):
            head.train()
            for idx in torch.randperm(len(X), generator=gen).tensor_split(n_batches):
                loss = loss_fn(head(X[idx]), t[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            head.eval()
            with torch.no_grad():
                val = float(loss_fn(head(Xv), t_val, weighted=False))
            self.val_losses_.append(val)
            if best is None or val < best[0]:
                best = (val, epoch, {k: v.clone() for k, v in head.state_dict().items()})
        head.load_state_dict(best[2])
        self.head_, self.best_epoch_ = head.eval(), best[1]
        return self

    @torch.no_grad()
    def _output(self, X) -> np.ndarray:
        out = self.head_(torch.as_tensor(np.asarray(X), dtype=torch.float32)).double()
        return out.softmax(dim=1).numpy() if self.task == "classification" else out[:, 0].numpy()


def make_loss(task: str, y_train: np.ndarray, n_outputs: int, class_weight: str | None):
    """loss(output (B, K), target (B,), weighted=True): cross-entropy (with optional 'balanced'
    class weights from the training labels) or MSE on normalised labels (output (B, 1))."""
    if task == "regression":
        return lambda out, t, weighted=True: nn.functional.mse_loss(out[:, 0], t.float())
    if class_weight not in (None, "balanced"):
        raise ConfigError(f"class_weight must be None or 'balanced', got {class_weight!r}")
    w = torch.as_tensor(class_weights(y_train, n_outputs), dtype=torch.float32) if class_weight else None

    def loss(out, t, weighted=True):
        return nn.functional.cross_entropy(
            out, t.long(), weight=w.to(out.device) if weighted and w is not None else None
        )

    return loss


def make_probe(kind: str, task: str, seed: int = 0, class_weight: str | None = None, **kwargs):
    """A probe by name: 'closed-form' (:class:`ClosedFormProbe`) or 'bn-linear' (:class:`BNLinearProbe`)."""
    if kind == "closed-form":
        return ClosedFormProbe(task, class_weight=class_weight, **kwargs)
    if kind == "bn-linear":
        return BNLinearProbe(task, seed=seed, class_weight=class_weight, **kwargs)
    raise ConfigError(f"unknown probe {kind!r}; choose one of {PROBES}")


# --------------------------------------------------------------------------- protocol


@dataclass
class Results:
    """Per-seed test metrics (``records``), their summary (``rows``) and paired comparisons.

    A record: {"method", "target", "seed", "metric", "value"} (``seed``: the split seed).
    A row: {"method", "target", "metric", "mean", "std", "n_seeds"}; std is the sample std
    (ddof = 1) over seeds, 0 for a single seed; NaN metrics (e.g. AUROC with one class in a test
    split) are left out of mean and std and of n_seeds. ``comparisons``: dicts from
    :func:`comparison_rows` ({"target", "metric", "method", "baseline"} + :func:`compare`).
    """

    records: list[dict] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)

    @property
    def rows(self) -> list[dict]:
        groups: dict[tuple, list[float]] = {}
        for r in self.records:
            groups.setdefault((r["method"], r["target"], r["metric"]), []).append(r["value"])
        rows = []
        for (method, target, metric), values in groups.items():
            v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
            rows.append(
                {
                    "method": method,
                    "target": target,
                    "metric": metric,
                    "mean": float(v.mean()) if len(v) else float("nan"),
                    "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "n_seeds": int(len(v)),
                }
            )
        return rows

    def extend(self, other: Results) -> Results:
        self.records.extend(other.records)
        self.comparisons.extend(other.comparisons)
        return self

    def table(self) -> str:
        return format_table(self.rows)

    def comparison_table(self) -> str:
        return format_comparisons(self.comparisons)

    def save(self, path: str | Path) -> Path:
        """Write {"rows": summary rows, "comparisons": paired comparisons} as JSON (NaN
        becomes null)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def clean(items):
            nan_to_none = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
            return [{k: nan_to_none(v) for k, v in r.items()} for r in items]

        path.write_text(json.dumps({"rows": clean(self.rows), "comparisons": clean(self.comparisons)}, indent=2) + "\n")
        return path


def format_mean_std(row: dict) -> str:
    """'mean ± std' of a result row, 'n/a' where the metric is undefined."""
    mean = row["mean"]
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.3f} ± {row['std']:.3f}"


def result_grid(rows: list[dict]) -> list[tuple[str, int, list[str], list[str], dict]]:
    """Result rows grouped per target, in order of appearance: (target, n_seeds, metrics,
    methods, {(method, metric): 'mean ± std'}); the shared layout of every results table."""
    grids = []
    for target in dict.fromkeys(r["target"] for r in rows):
        trows = [r for r in rows if r["target"] == target]
        grids.append(
            (
                target,
                max(r["n_seeds"] for r in trows),
                list(dict.fromkeys(r["metric"] for r in trows)),
                list(dict.fromkeys(r["method"] for r in trows)),
                {(r["method"], r["metric"]): format_mean_std(r) for r in trows},
            )
        )
    return grids


def format_table(rows: list[dict]) -> str:
    """One line per (target, method), one column per metric: 'mean ± std'."""
    lines = []
    for target, n, metrics, methods, cell in result_grid(rows):
        header = [f"{target} (n_seeds={n})"] + [METRIC_NAMES.get(m, m) for m in metrics]
        body = [[m] + [cell.get((m, k), "-") for k in metrics] for m in methods]
        widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]

        def fmt(row):
            return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

        lines += [fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in body] + [""]
    return "\n".join(lines).rstrip() + "\n"


Method = tuple[Callable[[int], object], object]  # (make_estimator(seed), inputs indexable by subject)


def run_protocol(
    y: np.ndarray,
    methods: dict[str, Method],
    *,
    target: str,
    task: str,
    n_classes: int | None = None,
    seeds: int | Sequence[int] = 5,
    split: Split | None = None,
    progress: bool = True,
) -> Results:
    """The evaluation protocol on encoded labels ``y`` (see :func:`encode_labels`).

    ``methods`` maps a method name to (make_estimator(seed), X): the estimator has
    ``fit(X_train, y_train, X_val, y_val, n_classes=...)``, ``predict`` and (classification)
    ``predict_proba``; X is anything indexable by an index array (features, windows). Every
    method sees the same split for a given seed; the test split is evaluated once per seed.
    ``split`` fixes the split (a user-given column): seeds then only vary the estimators.
    """
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if task == "classification":
        n_classes = n_classes or int(y.max() + 1)
    results = Results()
    for seed in seeds:
        sp = split or split_indices(y, task, seed)
        for name, (make, X) in methods.items():
            est = make(seed)
            kw = {"n_classes": n_classes} if task == "classification" else {}
            est.fit(X[sp.train], y[sp.train], X[sp.val], y[sp.val], **kw)
            if task == "classification":
                proba = est.predict_proba(X[sp.test])
                metrics = classification_metrics(y[sp.test], proba.argmax(axis=1), proba)
            else:
                metrics = regression_metrics(y[sp.test], est.predict(X[sp.test]))
            results.records += [
                {"method": name, "target": target, "seed": seed, "metric": k, "value": v} for k, v in metrics.items()
            ]
            if progress:
                shown = ", ".join(f"{METRIC_NAMES[k]} {v:.3f}" for k, v in metrics.items())
                log.info("%s | seed %d | %s: %s", target, seed, name, shown)
    return results


# --------------------------------------------------------------------------- method names and comparisons


def method_name(base: str, readout: str | None = None) -> str:
    """'brainjepa:fc', 'random_init#1:roi', 'random_init(best):mean'; a baseline as it is."""
    return base if readout is None else f"{base}:{readout}"


def _init_seeds(random_init_seeds) -> list[int]:
    if isinstance(random_init_seeds, (int, np.integer)):
        if random_init_seeds < 0:
            raise ConfigError(f"random_init_seeds must be >= 0, got {random_init_seeds}")
        return list(range(int(random_init_seeds)))
    seeds = [int(s) for s in random_init_seeds]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"random_init_seeds has repeated seeds: {seeds}")
    return seeds


def probe_method_names(readouts: Sequence[str] = READOUTS, random_init_seeds=3) -> list[str]:
    """Names of the methods :func:`probe_cohort` fits (summaries of the random-init seeds
    excluded): brainjepa:<r>, random_init#<k>:<r> per readout r and seed k, then the baselines."""
    readouts = _check_readouts(readouts)
    names = [method_name(MODEL, r) for r in readouts]
    names += [method_name(f"{RANDOM_INIT}#{k}", r) for k in _init_seeds(random_init_seeds) for r in readouts]
    return names + list(BASELINES)


def headline_metric(records: list[dict], target: str) -> str:
    """AUROC for a classification target, Pearson r for a regression target."""
    metrics = {r["metric"] for r in records if r["target"] == target}
    return HEADLINE_METRIC["classification" if "auroc" in metrics else "regression"]


def _mean_finite(values) -> float:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    return float(v.mean()) if len(v) else float("nan")


def random_init_summaries(records: list[dict], readouts: Sequence[str], init_seeds: Sequence[int]) -> list[dict]:
    """Records of ``random_init(mean):<r>`` (per split seed and metric, the mean over init
    seeds, NaN values left out) and ``random_init(best):<r>`` (every record of the init seed
    whose headline metric has the best mean over split seeds; ties: the first seed; its records
    carry "source": the seed's method name) for each target and readout r."""
    out = []
    for target in dict.fromkeys(r["target"] for r in records):
        headline = headline_metric(records, target)
        sign = -1.0 if headline in LOWER_IS_BETTER else 1.0
        for readout in readouts:
            names = [method_name(f"{RANDOM_INIT}#{k}", readout) for k in init_seeds]
            mine = [r for r in records if r["target"] == target and r["method"] in names]
            if not mine:
                continue
            groups: dict[tuple, list[float]] = {}
            for r in mine:
                groups.setdefault((r["seed"], r["metric"]), []).append(r["value"])
            out += [
                {
                    "method": method_name(f"{RANDOM_INIT}(mean)", readout),
                    "target": target,
                    "seed": seed,
                    "metric": metric,
                    "value": _mean_finite(values),
                }
                for (seed, metric), values in groups.items()
            ]
            scores = [
                sign * _mean_finite([r["value"] for r in mine if r["method"] == n and r["metric"] == headline])
                for n in names
            ]
            finite = [s if np.isfinite(s) else -np.inf for s in scores]
            best = names[int(np.argmax(finite))]
            out += [
                {**r, "method": method_name(f"{RANDOM_INIT}(best)", readout), "source": best}
                for r in mine
                if r["method"] == best
            ]
    return out


def compare(records: list[dict], target: str, metric: str, method: str, baseline: str) -> dict:
    """Paired comparison of two methods on one target and metric over the split seeds both
    were evaluated on (seeds where either value is NaN are left out).

    Returns {"n", "mean_diff" (method - baseline), "std" (sample std of the differences),
    "ci95_low", "ci95_high" (t interval of the mean), "p_value" (two-sided paired t-test;
    NaN for n < 2 or when every difference is 0), "wins" (seeds where the method is better:
    higher, or lower for MSE / MAE)}.
    """
    from scipy import stats

    value = {
        (r["method"], r["seed"]): r["value"]
        for r in records
        if r["target"] == target and r["metric"] == metric and r["method"] in (method, baseline)
    }
    seeds = sorted({s for m, s in value if m == method} & {s for m, s in value if m == baseline})
    a = np.array([value[(method, s)] for s in seeds], dtype=np.float64)
    b = np.array([value[(baseline, s)] for s in seeds], dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    d = a - b
    n = len(d)
    nan = float("nan")
    better = d < 0 if metric in LOWER_IS_BETTER else d > 0
    out = {
        "n": n,
        "mean_diff": float(d.mean()) if n else nan,
        "std": nan,
        "ci95_low": nan,
        "ci95_high": nan,
        "p_value": nan,
        "wins": int(better.sum()),
    }
    if n >= 2:
        std = float(d.std(ddof=1))
        half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
        out.update(std=std, ci95_low=out["mean_diff"] - half, ci95_high=out["mean_diff"] + half)
        if np.any(d != 0):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # equal differences: p is 0
                out["p_value"] = float(stats.ttest_rel(a, b).pvalue)
    return out


def comparison_rows(records: list[dict], metric: str | None = None) -> list[dict]:
    """For each target and each readout r of the pretrained model: brainjepa:r against
    random_init(best):r, random_init(mean):r, fc_window, fc_full and amplitude (those present),
    on the target's headline metric (or ``metric``). Each: {"target", "metric", "method",
    "baseline"} + :func:`compare`, and for random_init(best) "baseline_source", the init seed's
    method name."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    rows = []
    for target in dict.fromkeys(r["target"] for r in records):
        m = metric or headline_metric(records, target)
        for method in [x for x in methods if x.startswith(MODEL + ":")]:
            readout = method.split(":", 1)[1]
            refs = [
                method_name(f"{RANDOM_INIT}(best)", readout),
                method_name(f"{RANDOM_INIT}(mean)", readout),
                "fc_window",
                "fc_full",
                "amplitude",
            ]
            for ref in refs:
                if ref in methods:
                    row = {
                        "target": target,
                        "metric": m,
                        "method": method,
                        "baseline": ref,
                        **compare(records, target, m, method, ref),
                    }
                    source = next(
                        (
                            r["source"]
                            for r in records
                            if r["method"] == ref and r["target"] == target and "source" in r
                        ),
                        None,
                    )
                    if source:  # which init seed random_init(best) is
                        row["baseline_source"] = source
                    rows.append(row)
    return rows


def _fmt(x, spec: str = "+.3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_p(p) -> str:
    """A p value for tables: 3 significant digits, '<0.001' below that."""
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def comparison_cells(c: dict) -> list[str]:
    """The cells of one comparison in table order (see :data:`COMPARISON_COLUMNS`)."""
    baseline = c["baseline"]
    if c.get("baseline_source"):  # random_init(best):fc (#1)
        baseline += f" (#{c['baseline_source'].split('#', 1)[1].split(':', 1)[0]})"
    return [
        c["target"],
        METRIC_NAMES.get(c["metric"], c["metric"]),
        c["method"],
        baseline,
        str(c["n"]),
        _fmt(c["mean_diff"]),
        f"[{_fmt(c['ci95_low'])}, {_fmt(c['ci95_high'])}]",
        format_p(c["p_value"]),
        f"{c['wins']}/{c['n']}",
    ]


COMPARISON_COLUMNS = ("target", "metric", "method", "baseline", "n", "mean diff", "95% CI", "p (paired t)", "wins")


def format_comparisons(comparisons: list[dict]) -> str:
    """Plain-text table of paired comparisons: method - baseline per split seed, mean, 95% CI,
    two-sided paired t-test p, wins."""
    if not comparisons:
        return "no paired comparisons\n"
    body = [comparison_cells(c) for c in comparisons]
    widths = [max(len(row[i]) for row in [list(COMPARISON_COLUMNS)] + body) for i in range(len(COMPARISON_COLUMNS))]

    def fmt(row):
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    lines = [fmt(COMPARISON_COLUMNS), fmt(["-" * w for w in widths])] + [fmt(r) for r in body]
    return "\n".join(lines) + "\n"


def _method_rank(name: str) -> tuple:
    """Table order: brainjepa, random_init(best), (mean), #k, each by readout; then baselines."""
    base, _, readout = name.partition(":")
    r = READOUTS.index(readout) if readout in READOUTS else len(READOUTS)
    if base == MODEL:
        return (0, 0, r)
    if base == f"{RANDOM_INIT}(best)":
        return (1, 0, r)
    if base == f"{RANDOM_INIT}(mean)":
        return (2, 0, r)
    if base.startswith(RANDOM_INIT + "#"):
        return (3, r, int(base.split("#", 1)[1]) if base.split("#", 1)[1].isdigit() else 0)
    if base in BASELINES:
        return (4, BASELINES.index(base), 0)
    return (5, 0, 0)


# --------------------------------------------------------------------------- cohorts


def load_cohort(data: str | Path | Sequence[str | Path], *, tr: float | None = None, orientation: str | None = None):
    """A cohort from one path (manifest, folder, prepared store; see
    :func:`brainjepa.data.open_cohort`) or from several time-series files (one per subject,
    subject ids from the file names; no labels)."""
    from .data import open_cohort, subject_from_path
    from .io import read_timeseries

    paths = [data] if isinstance(data, (str, Path)) else list(data)
    if len(paths) == 1:
        return open_cohort(paths[0], tr=tr, orientation=orientation)
    cohort = open_cohort([read_timeseries(p, orientation=orientation, tr=tr) for p in paths], tr=tr)
    cohort.subjects = [subject_from_path(p)[0] for p in paths]
    return cohort


def target_labels(cohort, target: str, task: str = "auto") -> tuple[np.ndarray, np.ndarray, str, list | None]:
    """(subject indices with a label, encoded y, resolved task, classes) for one label column."""
    if target not in cohort.labels:
        raise DataError(
            f"target {target!r} is not a column of the data's labels; available: "
            f"{sorted(cohort.labels) or 'none (add label columns to the manifest)'}"
        )
    values = np.asarray(cohort.labels[target])
    keep = np.flatnonzero(present_mask(values))
    if len(keep) < len(values):
        log.info(
            "target %s: %d of %d subjects have no value and are left out", target, len(values) - len(keep), len(values)
        )
    task = infer_task(values[keep]) if task == "auto" else task
    y, classes = encode_labels(values[keep], task, target)
    return keep, y, task, classes


def cohort_fc(cohort, model=None, fc_input: str = "full", progress: bool = True) -> np.ndarray:
    """FC baseline features (N, R(R-1)/2) of every subject: from the full raw series
    (``fc_input='full'``, default: the baseline at its strongest) or from exactly the window the
    model sees in fine-tuning (``'window'``: resampled, centre window)."""
    series = CohortSeries(cohort)
    if fc_input == "full":
        items = (series[i] for i in range(len(series)))
    elif fc_input == "window":
        trs = series.trs()
        items = (model.prepare(series[i], tr=trs[i]).numpy() for i in range(len(series)))
    else:
        raise ConfigError(f"fc_input must be 'full' or 'window', got {fc_input!r}")
    return fc_features(list(_progress(items, len(series), "FC baseline", progress)))


def cohort_amplitude(cohort, model=None, progress: bool = True) -> np.ndarray:
    """Amplitude baseline (N, R) of every subject (:func:`amplitude_features`) over the full
    scan, resampled to the model's TR when the model has one (as the encoder's input is)."""
    from .transforms import resample_tr, same_tr

    series = CohortSeries(cohort)
    trs = series.trs()
    target = None if model is None else model.target_tr

    def item(i):
        x = series[i]
        if target is not None and trs[i] is not None and not same_tr(trs[i], target):
            x = resample_tr(np.asarray(x, dtype=np.float32), trs[i], target)
        return x

    items = (item(i) for i in range(len(series)))
    return amplitude_features(list(_progress(items, len(series), "amplitude baseline", progress)))


def embed_cohort(
    model,
    cohort,
    *,
    readout: str = "mean",
    windows: str = "all",
    batch_size: int = 16,
    device: str | None = None,
    tokens: bool = False,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings of every subject of a cohort: (N, F) under ``readout`` averaged over
    ``windows``, or with ``tokens`` the centre window's token features (N, R, P, D)."""
    series = CohortSeries(cohort)
    return BrainJEPAEmbedder(
        model,
        readout=readout,
        windows=None if tokens else windows,
        batch_size=batch_size,
        device=device,
        tokens=tokens,
        progress=progress,
    ).transform(series, tr=series.trs())


def embed_cohort_readouts(
    model,
    cohort,
    *,
    readouts: Sequence[str] = READOUTS,
    windows: str = "all",
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """{readout: (N, F)} of every subject of a cohort, from one encoding pass."""
    series = CohortSeries(cohort)
    return encode_readouts(
        {MODEL: model},
        series,
        series.trs(),
        readouts=readouts,
        windows=windows,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )[MODEL]


def probe_features(
    model,
    cohort,
    *,
    readouts: Sequence[str] = READOUTS,
    random_init_seeds=3,
    windows: str = "all",
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
    skip: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Every feature matrix (N, F) :func:`probe_cohort` probes, keyed by method name (see
    :func:`probe_method_names`), leaving out the names in ``skip``: the pretrained model and
    each random-init seed under every readout (one encoding pass over the cohort for all
    encoders), ``fc_window`` from the same windows, ``fc_full`` and ``amplitude``."""
    readouts, windows = _check_readouts(readouts), _check_windows(windows)
    seeds = _init_seeds(random_init_seeds)
    wanted = [n for n in probe_method_names(readouts, seeds) if n not in set(skip)]
    encoders = {}
    if any(n.startswith(MODEL + ":") for n in wanted):
        encoders[MODEL] = model
    for k in seeds:
        if any(n.startswith(f"{RANDOM_INIT}#{k}:") for n in wanted):
            encoders[f"{RANDOM_INIT}#{k}"] = random_init_like(model, k)
    features: dict[str, np.ndarray] = {}
    if encoders or "fc_window" in wanted:
        if not encoders:  # fc_window alone: the windows still come from the model
            encoders = {MODEL: model}
        log.info("encoding %d subjects (%s windows) with %s", len(cohort), windows, ", ".join(encoders))
        series = CohortSeries(cohort)
        out = encode_readouts(
            encoders,
            series,
            series.trs(),
            readouts=readouts,
            windows=windows,
            batch_size=batch_size,
            device=device,
            fc_window="fc_window" in wanted,
            progress=progress,
        )
        for name, per in out.items():
            for readout, X in per.items():
                key = "fc_window" if name == "fc_window" else method_name(name, readout)
                if key in wanted:
                    features[key] = X
    if "fc_full" in wanted:
        log.info("computing the FC baseline of the full scans")
        features["fc_full"] = cohort_fc(cohort, model, "full", progress)
    if "amplitude" in wanted:
        features["amplitude"] = cohort_amplitude(cohort, model, progress)
    return features


def save_embeddings(
    model,
    cohort,
    path: str | Path,
    *,
    readout: str = "mean",
    windows: str = "all",
    tokens: bool = False,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """Write an .npz: 'subjects' (N,), 'embeddings' (N, F) (``readout`` averaged over
    ``windows``), 'readout' and 'windows' (which ones), 'roi_labels' (R,) when known,
    'label_<name>' (N,) per label column, and with ``tokens`` 'tokens' (N, R, P, D) of the
    centre window. Text is stored as unicode arrays, so ``np.load`` needs no pickle."""
    arrays = {
        "subjects": np.array(cohort.subjects, dtype=str),
        "embeddings": embed_cohort(
            model, cohort, readout=readout, windows=windows, batch_size=batch_size, device=device, progress=progress
        ),
        "readout": np.array(readout),
        "windows": np.array(windows),
    }
    if tokens:
        arrays["tokens"] = embed_cohort(
            model, cohort, batch_size=batch_size, device=device, tokens=True, progress=progress
        )
    if model.roi_labels is not None:
        arrays["roi_labels"] = np.array(model.roi_labels, dtype=str)
    for name, values in cohort.labels.items():
        values = np.asarray(values)
        arrays[f"label_{name}"] = values.astype(str) if values.dtype == object else values
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # a file object: numpy must not append ".npz" to the name
        np.savez(f, **arrays)
    return path


def probe_cohort(
    model,
    cohort,
    targets: Sequence[str],
    *,
    task: str = "auto",
    seeds=5,
    probe: str = "closed-form",
    split_column: str | None = None,
    readouts: Sequence[str] = READOUTS,
    random_init_seeds=3,
    windows: str = "all",
    class_weight: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
    features: dict[str, np.ndarray] | None = None,
    probe_options: dict | None = None,
) -> Results:
    """Linear probing of ``model`` on a cohort's label columns, next to every reference.

    Methods (see the module docstring): brainjepa:<readout> and random_init#<k>:<readout> for
    each readout and init seed k (``random_init_seeds``: a count, seeds 0..n-1, or a list),
    fc_full, fc_window and amplitude, all on the same splits (``seeds`` split seeds); then
    random_init(mean) / random_init(best) per readout from their records. The baselines always
    use the closed-form probe. ``features`` may pass precomputed (N, F) matrices keyed by method
    name (from :func:`probe_features`) to skip their computation; ``probe_options`` go to the
    encoder probes (e.g. {"epochs": 50} for bn-linear). Returns :class:`Results` with records of
    every method and ``comparisons`` (:func:`comparison_rows`).
    """
    if probe not in PROBES:
        raise ConfigError(f"unknown probe {probe!r}; choose one of {PROBES}")
    readouts, windows = _check_readouts(readouts), _check_windows(windows)
    init_seeds = _init_seeds(random_init_seeds)
    if len(init_seeds) < 3:
        log.warning(
            "%d random-init seed(s): initialisations can differ from each other by more "
            "than pretraining gains, so random_init(mean) and (best) need at least 3",
            len(init_seeds),
        )
    names = probe_method_names(readouts, init_seeds)
    features = dict(features or {})
    unknown = sorted(set(features) - set(names))
    if unknown:
        raise ConfigError(
            f"features has entries {unknown} that are not methods of this probe; expected names among {names}"
        )
    labels = {t: target_labels(cohort, t, task) for t in targets}  # fail before the slow part
    splits = {t: _user_split(cohort, split_column, labels[t][0]) for t in targets}
    if any(n not in features for n in names):
        features.update(
            probe_features(
                model,
                cohort,
                readouts=readouts,
                random_init_seeds=init_seeds,
                windows=windows,
                batch_size=batch_size,
                device=device,
                progress=progress,
                skip=list(features),
            )
        )
    for name in names:
        if len(features[name]) != len(cohort):
            raise DataError(f"features[{name!r}] has {len(features[name])} rows for a cohort of {len(cohort)} subjects")
    results = Results()
    for target in targets:
        keep, y, t_task, classes = labels[target]
        split = splits[target]
        log.info(
            "probing %s (%s, %d subjects%s) with the %s probe",
            target,
            t_task,
            len(keep),
            f", classes {classes}" if classes else "",
            probe,
        )
        methods = {
            name: (
                lambda seed, baseline=(name in BASELINES): (
                    make_probe("closed-form", t_task, seed, class_weight)
                    if baseline
                    else make_probe(probe, t_task, seed, class_weight, **(probe_options or {}))
                ),
                np.asarray(features[name])[keep],
            )
            for name in names
        }
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
    results.records += random_init_summaries(results.records, readouts, init_seeds)
    results.records.sort(key=lambda r: _method_rank(r["method"]))  # stable: targets keep order
    results.comparisons = comparison_rows(results.records)
    return results


def _user_split(cohort, split_column: str | None, keep: np.ndarray) -> Split | None:
    """The split given by a label column, or by the manifest's reserved 'split' column."""
    if split_column is None:
        return None
    if split_column in cohort.labels:
        values = np.asarray(cohort.labels[split_column])
    elif split_column == "split":
        values = np.asarray(cohort.splits)
    else:
        raise DataError(
            f"split column {split_column!r} is not in the data's labels; available: {sorted(cohort.labels) + ['split']}"
        )
    return split_from_column(values[keep], split_column)


# --------------------------------------------------------------------------- interpretation


@torch.inference_mode()
def roi_attention(
    encoder: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, device: str | None = None, progress: bool = False
) -> np.ndarray:
    """Attention each ROI receives, (R,): averaged over heads, queries, layers, time patches
    and subjects, scaled so 1.0 is the uniform share (every token receiving 1 / N of the
    attention). windows: (S, R, T) model inputs (see :meth:`BrainJEPAEmbedder.windows`)."""
    device = resolve_device(device)
    encoder = encoder.to(device).eval()
    cfg = encoder.cfg
    total = torch.zeros(cfg.n_rois, dtype=torch.float64)
    batches = windows.split(batch_size)
    for x in _progress(batches, len(batches), "attention", progress):
        sink: list[torch.Tensor] = []
        encoder(x.to(device), attention_sink=sink)
        received = torch.stack(sink).mean(dim=0)  # (B, N), mean over layers
        total += received.reshape(len(x), cfg.n_rois, cfg.n_patches).mean(dim=2).sum(dim=0).double().cpu()
    return (total / len(windows) * cfg.n_tokens).numpy()


def network_labels_from_roi_names(roi_labels: Sequence[str] | None) -> list[str] | None:
    """Networks from Schaefer-style ROI names ('7Networks_LH_Vis_1' -> 'Vis', also without the
    '7Networks_' prefix, as the simulated cohort names them: 'LH_Default_3'), else None."""
    if not roi_labels:
        return None
    nets = []
    for label in roi_labels:
        parts = str(label).split("_")
        if parts[0].endswith("Networks"):
            parts = parts[1:]
        if len(parts) < 3 or parts[0] not in ("LH", "RH"):
            return None
        nets.append(parts[1])
    return nets


def read_networks(path: str | Path, roi_labels: Sequence[str] | None, n_rois: int) -> list[str]:
    """ROI -> network assignment from a CSV/TSV with a ``network`` column: matched to the
    model's ROI labels by a ``roi`` (or ``name``) column when both exist, else one row per ROI
    in model order (the simulated cohort's rois.tsv works as is)."""
    import csv

    path = Path(path)
    if not path.exists():
        raise DataError(f"networks file {path} does not exist")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t" if path.suffix in (".tsv", ".txt") else ","))
    if not rows or "network" not in rows[0]:
        raise DataError(f"{path}: needs a header with a 'network' column (optionally 'roi')")
    key = next((k for k in ("roi", "name") if k in rows[0]), None)
    if key and roi_labels:
        mapping = {r[key]: r["network"] for r in rows}
        missing = [r for r in roi_labels if r not in mapping]
        if missing:
            raise DataError(f"{path}: no network for ROI(s) {missing[:5]} of the model")
        return [mapping[r] for r in roi_labels]
    if len(rows) != n_rois:
        raise DataError(
            f"{path}: {len(rows)} rows but the model has {n_rois} ROIs (one row per "
            "ROI in model order, or add a 'roi' column with the model's ROI labels)"
        )
    return [r["network"] for r in rows]


def network_attention(roi_values: np.ndarray, networks: Sequence) -> list[dict]:
    """Mean of a per-ROI quantity per network: [{"network", "attention", "n_rois"}], in order
    of first appearance."""
    roi_values = np.asarray(roi_values)
    if len(networks) != len(roi_values):
        raise DataError(f"{len(networks)} network labels for {len(roi_values)} ROIs")
    networks = [str(n) for n in networks]
    out = []
    for net in dict.fromkeys(networks):
        idx = [i for i, n in enumerate(networks) if n == net]
        out.append({"network": net, "attention": float(roi_values[idx].mean()), "n_rois": len(idx)})
    return out
