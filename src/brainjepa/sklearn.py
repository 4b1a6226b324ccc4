"""scikit-learn estimators: a brainjepa model and the FC baseline as pipeline steps (extra ``eval``).

:class:`BrainJEPAEmbedder` and :class:`FCEmbedder` are transformers that follow scikit-learn's
estimator rules (parameters set in ``__init__`` only, ``get_params`` / ``set_params``,
``clone``, fitted attributes ending in ``_``, ``NotFittedError`` before ``fit``), so they go into
a ``Pipeline`` with a scaler and a linear model and work with ``cross_val_score`` and
``GridSearchCV``::

    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(BrainJEPAEmbedder(model="path/to/bundle", tr=0.72), StandardScaler(), RidgeCV())
    scores = cross_val_score(pipe, scans, ages, cv=5)

Their input X is a list of scans, not a 2-D matrix: each scan an (R, T) array (ROIs by time
points; scans may differ in length), a 3-D array (N, R, T), brainjepa
:class:`~brainjepa.io.TimeSeries`, or paths to files any brainjepa reader opens (the TR from the
file or its BIDS sidecar). Indexing X by subject, as cross-validation does, keeps working.

The encoding itself is :class:`brainjepa.evaluate.BrainJEPAEmbedder` (a fitted attribute
``embedder_``), so the estimator gives the same embeddings as ``brainjepa embed`` and
``brainjepa probe``; the FC baseline is :func:`brainjepa.evaluate.fc_features`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .bundle import BrainJEPA, load_model
from .errors import ConfigError, DataError, require
from .evaluate.baselines import fc_features
from .evaluate.features import READOUTS, WINDOWS
from .evaluate.features import BrainJEPAEmbedder as _Embedder
from .inputs import InputWarning, window_starts
from .io import TimeSeries, read_timeseries

_base = require("sklearn.base", "eval", "brainjepa.sklearn")
_validation = require("sklearn.utils.validation", "eval", "brainjepa.sklearn")
_covariance = require("sklearn.covariance", "eval", "brainjepa.sklearn")

FC_KINDS = ("correlation", "partial correlation", "covariance")


# ------------------------------------------------------------------------------- the input


def _scan(item, tr: float | None, index: int) -> tuple[np.ndarray, float | None, str]:
    """One item of X as ((R, T) float32 array, its TR, a name for messages)."""
    if isinstance(item, (str, Path)):
        ts = read_timeseries(item)
        return ts.data, _agree(ts.tr, tr, str(item)), str(item)
    if isinstance(item, TimeSeries):
        name = item.path or f"X[{index}]"
        return np.asarray(item.data, dtype=np.float32), _agree(item.tr, tr, name), name
    x = np.asarray(item)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise DataError(
            f"X[{index}]: expected a scan, an (R, T) array of numbers (ROIs by time points), or a file "
            f"path; got {type(item).__name__} of shape {x.shape}"
        )
    return x.astype(np.float32, copy=False), tr, f"X[{index}]"


def _agree(own: float | None, given: float | None, name: str) -> float | None:
    if own is not None and given is not None and abs(float(own) - float(given)) > 1e-6 * float(given):
        raise DataError(
            f"{name}: the file says TR {own:g} s but the estimator's tr is {given:g} s; "
            "set tr=None to use the files' TRs, or fix the file"
        )
    return float(own) if own is not None else given


def _items(X) -> Sequence:
    """X as a sequence of scans, refusing the 2-D feature matrices scikit-learn usually passes."""
    if isinstance(X, (str, Path)):
        raise DataError("X is one path; pass a list of scans (paths or ROI x time arrays), one per subject")
    if isinstance(X, np.ndarray):
        if X.ndim == 3:
            return X
        raise DataError(
            f"X is a {X.ndim}-D array of shape {X.shape}; these estimators take scans: a list of "
            "(ROIs x time points) arrays or file paths, or a 3-D array (scans, ROIs, time points)"
        )
    if hasattr(X, "iloc") or not hasattr(X, "__len__") or not hasattr(X, "__getitem__"):
        raise DataError(
            f"X is a {type(X).__name__}; pass a list of scans: (ROIs x time points) arrays, "
            "brainjepa TimeSeries or file paths"
        )
    if len(X) == 0:
        raise DataError("X holds no scans")
    return X


def iter_scans(X, tr: float | None = None, n_rois: int | None = None, who: str = "the model"):
    """The scans of X, read one at a time, with their TRs and names.

    Args:
        X: a list of (R, T) arrays, TimeSeries or file paths, or a 3-D array (N, R, T).
        tr: the TR in seconds of scans that do not carry one (arrays, files without a TR); a
            file that says another TR is an error.
        n_rois: the ROI count every scan must have; None: the first scan's.
        who: what has ``n_rois`` ROIs, for the message.

    Yields:
        (float32 (R, T_i) array, TR or None, name) per scan.

    Raises:
        DataError: X is not a list of scans, an item is not a scan, a file's TR disagrees, or
            a scan has another ROI count.
    """
    items = _items(X)
    for i in range(len(items)):
        x, t, name = _scan(items[i], tr, i)
        if n_rois is None:
            n_rois, who = x.shape[0], f"the first scan ({name})"
        if x.shape[0] != n_rois:
            raise DataError(
                f"{name}: {x.shape[0]} ROIs, but {who} has {n_rois}; every scan needs the same parcellation"
            )
        yield x, t, name


def _check_tr(tr) -> None:
    if tr is not None and not (isinstance(tr, (int, float)) and tr > 0):
        raise ConfigError(f"tr must be a positive number of seconds or None, got {tr!r}")


class _ScanInput:
    """Tags shared by the two estimators: the input is scans, not a 2-D array."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.requires_fit = True
        tags.target_tags.required = False
        return tags


# ------------------------------------------------------------------------------- estimators


class BrainJEPAEmbedder(_ScanInput, _base.ClassNamePrefixFeaturesOutMixin, _base.TransformerMixin, _base.BaseEstimator):
    """A frozen brainjepa model as a scikit-learn transformer: scans -> (n_scans, F) embeddings.

    ``fit`` loads the model (frozen, in eval mode) and checks the scans; ``transform`` resamples
    each scan to the model's TR, cuts it into the model's windows, normalises each as in
    pretraining and averages the readout over them (:class:`brainjepa.evaluate.BrainJEPAEmbedder`).

    Args:
        model: a bundle folder, a run folder, a checkpoint or a Hugging Face Hub id
            (:func:`brainjepa.load_model`), or a loaded :class:`~brainjepa.bundle.BrainJEPA`
            (``clone`` copies a loaded model; a path is cheaper to clone).
        readout: ``"mean"`` (F = D), ``"roi"`` (F = R * 2D) or ``"fc"`` (F = R(R-1)/2)
            (:func:`brainjepa.evaluate.readout_features`).
        windows: ``"all"`` (evenly spaced windows covering each scan) or ``"center"``.
        tr: the TR in seconds of scans that carry none (arrays); files give their own.
        batch_size: scans prepared together, and at most this many windows per forward pass.
        device: where to encode: None / ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"``.

    Attributes:
        model_: the loaded, frozen :class:`~brainjepa.bundle.BrainJEPA`.
        embedder_: the :class:`brainjepa.evaluate.BrainJEPAEmbedder` doing the encoding.
        n_rois_: R, the ROIs every scan must have.
        n_features_out_: F, the embedding size.
    """

    def __init__(
        self,
        model=None,
        readout: str = "mean",
        windows: str = "all",
        tr: float | None = None,
        batch_size: int = 16,
        device: str | None = None,
        precision: str = "fp32",
    ):
        self.model = model
        self.readout = readout
        self.windows = windows
        self.tr = tr
        self.batch_size = batch_size
        self.device = device
        self.precision = precision

    def _loaded(self) -> BrainJEPA:
        if self.model is None:
            raise ConfigError("BrainJEPAEmbedder needs model=: a bundle folder, a Hugging Face Hub id or a BrainJEPA")
        if isinstance(self.model, BrainJEPA):
            return self.model
        if isinstance(self.model, (str, Path)):
            return load_model(self.model)
        raise ConfigError(
            "model must be a bundle folder, run folder, checkpoint, hub id or BrainJEPA, "
            f"not {type(self.model).__name__}"
        )

    def fit(self, X, y=None) -> BrainJEPAEmbedder:
        """Load the model (frozen) and check the scans; nothing is learned.

        Args:
            X: scans (see the module docstring).
            y: ignored.

        Returns:
            self.

        Raises:
            ConfigError: a bad parameter or model.
            DataError: X is not scans, or a scan has another ROI count than the model.
        """
        if self.readout not in READOUTS:
            raise ConfigError(f"readout must be one of {READOUTS}, got {self.readout!r}")
        if self.windows not in WINDOWS:
            raise ConfigError(f"windows must be one of {WINDOWS}, got {self.windows!r}")
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        _check_tr(self.tr)
        model = self._loaded()
        model.requires_grad_(False)
        cfg = model.config
        for _ in iter_scans(X, self.tr, cfg.n_rois):  # checked one at a time, nothing kept
            pass
        self.model_ = model.eval()
        self.embedder_ = _Embedder(
            model,
            readout=self.readout,
            windows=self.windows,
            batch_size=int(self.batch_size),
            device=self.device,
            precision=self.precision,
        )
        self.n_rois_ = cfg.n_rois
        sizes = {"mean": cfg.embed_dim, "roi": 2 * cfg.n_rois * cfg.embed_dim, "fc": cfg.n_rois * (cfg.n_rois - 1) // 2}
        self.n_features_out_ = sizes[self.readout]
        return self

    @property
    def _n_features_out(self) -> int:  # for get_feature_names_out
        return self.n_features_out_

    def transform(self, X) -> np.ndarray:
        """Embeddings of the scans.

        Args:
            X: scans (see the module docstring), read batch by batch.

        Returns:
            (n_scans, F) float32.

        Raises:
            sklearn.exceptions.NotFittedError: before ``fit``.
            DataError: X is not scans, or a scan does not fit the model.
        """
        _validation.check_is_fitted(self)
        items = _items(X)
        out = []
        for start in range(0, len(items), self.batch_size):  # files are read one batch at a time
            chunk = [items[i] for i in range(start, min(start + self.batch_size, len(items)))]
            scans, trs, _ = zip(*iter_scans(chunk, self.tr, self.n_rois_))
            out.append(self.embedder_.transform(list(scans), tr=list(trs)))
        return np.concatenate(out).astype(np.float32, copy=False)


class FCEmbedder(_ScanInput, _base.ClassNamePrefixFeaturesOutMixin, _base.TransformerMixin, _base.BaseEstimator):
    """Functional connectivity as a scikit-learn transformer: the reference every model is read against.

    Each scan gives the strict upper triangle of its ROI x ROI matrix, row by row:

    - ``"correlation"``: Pearson correlation, Fisher-z (|r| clipped below 1 - 1e-7), exactly
      :func:`brainjepa.evaluate.fc_features`, the ``fc_full`` baseline of ``brainjepa probe``;
    - ``"partial correlation"``: from the Ledoit-Wolf shrunk precision matrix, Fisher-z;
    - ``"covariance"``: the Ledoit-Wolf shrunk covariance (the diagonal included).

    With ``window`` the scan is cut into ceil(T / window) windows of ``window`` frames at evenly
    spaced starts that cover it (as the model's windows are placed), and the Fisher-z values (or
    covariances) are averaged over them.

    Args:
        kind: one of :data:`FC_KINDS`.
        window: None (the whole scan) or a window length in frames (at least 3).

    Attributes:
        n_rois_: R, the ROIs every scan must have.
        n_features_out_: F, R(R-1)/2 (R(R+1)/2 for covariance).
    """

    def __init__(self, kind: str = "correlation", window: int | None = None):
        self.kind = kind
        self.window = window

    def fit(self, X, y=None) -> FCEmbedder:
        """Check the parameters and the scans (FC needs nothing fitted).

        Args:
            X: scans (see the module docstring).
            y: ignored.

        Returns:
            self.

        Raises:
            ConfigError: an unknown kind or a bad window.
            DataError: X is not scans, or the scans differ in ROI count.
        """
        if self.kind not in FC_KINDS:
            raise ConfigError(f"kind must be one of {FC_KINDS}, got {self.kind!r}")
        if self.window is not None and (not isinstance(self.window, (int, np.integer)) or self.window < 3):
            raise ConfigError(f"window must be None or a number of frames >= 3, got {self.window!r}")
        n_rois = next(iter_scans(X))[0].shape[0]
        for _ in iter_scans(X, None, n_rois, "the first scan"):
            pass
        self.n_rois_ = n_rois
        tri = n_rois * (n_rois + 1) // 2 if self.kind == "covariance" else n_rois * (n_rois - 1) // 2
        self.n_features_out_ = tri
        return self

    @property
    def _n_features_out(self) -> int:
        return self.n_features_out_

    def _one(self, x: np.ndarray, name: str) -> np.ndarray:
        T = x.shape[1]
        length = T if self.window is None else min(int(self.window), T)
        if length < 3:
            raise DataError(f"{name}: {T} time points; FC needs at least 3")
        if self.window is not None and T < self.window:
            warnings.warn(
                f"{name}: {T} frames, shorter than window={self.window}: one window", InputWarning, stacklevel=3
            )
        parts = [x[:, s : s + length] for s in window_starts(T, length)]
        if self.kind == "correlation":
            return fc_features(parts).mean(axis=0)
        rows = []
        for part in parts:
            cov = _covariance.LedoitWolf().fit(part.T.astype(np.float64)).covariance_
            if self.kind == "covariance":
                rows.append(cov[np.triu_indices(len(cov))])
                continue
            prec = np.linalg.inv(cov)
            d = np.sqrt(np.diag(prec))
            pc = -prec / np.outer(d, d)
            rows.append(np.arctanh(np.clip(pc[np.triu_indices(len(pc), k=1)], -1 + 1e-7, 1 - 1e-7)))
        return np.mean(rows, axis=0).astype(np.float32)

    def transform(self, X) -> np.ndarray:
        """The connectivity features of the scans.

        Args:
            X: scans (see the module docstring).

        Returns:
            (n_scans, F) float32.

        Raises:
            sklearn.exceptions.NotFittedError: before ``fit``.
            DataError: X is not scans, or a scan has another ROI count or fewer than 3 frames.
        """
        _validation.check_is_fitted(self)
        rows = [self._one(x, name) for x, _, name in iter_scans(X, None, self.n_rois_, "the fitted scans")]
        return np.stack(rows).astype(np.float32)
