"""Diffusion-map gradients of functional connectivity (the method is described in the
package docstring, :mod:`brainjepa.gradients`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.linalg import eigh, orthogonal_procrustes

from ..errors import ConfigError, DataError
from .files import save_gradients_csv

KERNELS = ("normalized_angle", "cosine")


# --------------------------------------------------------------------------- connectivity


def connectivity(
    timeseries: Sequence[np.ndarray], fisher_z: bool = True, names: Sequence[str] | None = None
) -> np.ndarray:
    """Group functional connectivity of a list of subjects.

    Args:
        timeseries: S arrays, each R x T (ROIs x time points; T may differ between subjects);
            a single 2-D array is one subject.
        fisher_z: average the per-subject correlations as z = arctanh(r) and map the mean back
            with tanh, the usual way to average correlations; False averages r itself.
        names: one name per subject (e.g. file paths), replacing "subject <index>" in error
            messages.

    Returns:
        The R x R float64 mean Pearson correlation, with a unit diagonal.

    Raises:
        DataError: no subjects, a wrong shape, different numbers of ROIs, fewer than 3 time
            points, NaN/Inf, or a constant ROI.
    """
    if isinstance(timeseries, np.ndarray) and timeseries.ndim == 2:
        timeseries = [timeseries]  # one subject
    if len(timeseries) == 0:
        raise DataError("connectivity: no time series given; pass a list of (R, T) arrays")
    if names is not None and len(names) != len(timeseries):
        raise DataError(f"connectivity: {len(names)} names for {len(timeseries)} subjects")
    n_rois = None
    total = None
    for i, x in enumerate(timeseries):
        s = f"subject {i}" if names is None else str(names[i])
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise DataError(f"{s}: expected an (R, T) array, got shape {x.shape}")
        if n_rois is None:
            n_rois, first = x.shape[0], s
        elif x.shape[0] != n_rois:
            raise DataError(
                f"{s} has {x.shape[0]} ROIs but {first} has {n_rois}: all subjects "
                "must use the same parcellation (and the same orientation, ROIs as rows)"
            )
        if x.shape[1] < 3:
            raise DataError(
                f"{s} has {x.shape[1]} time points: correlations need at least 3 "
                "(is the array transposed? ROIs must be rows)"
            )
        bad = ~np.isfinite(x)
        if bad.any():
            roi, t = np.argwhere(bad)[0]
            raise DataError(
                f"{s}, ROI {roi}: NaN/Inf at time point {t} "
                f"({int(bad.any(axis=1).sum())} ROIs affected); clean or drop the bad ROIs first"
            )
        x = x - x.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(x, axis=1)
        flat = np.flatnonzero(norm <= 1e-12 * max(1.0, float(np.abs(x).max(initial=0.0))))
        if flat.size:
            raise DataError(
                f"{s}, ROI {flat[0]}: constant time series ({flat.size} constant ROIs: "
                f"{flat[:10].tolist()}{'...' if flat.size > 10 else ''}); its correlation is "
                "undefined: remove the ROI from every subject or fix the extraction"
            )
        x /= norm[:, None]
        r = np.clip(x @ x.T, -1.0, 1.0)
        if fisher_z:
            # arctanh(+-1) is infinite; the diagonal is reset below, off-diagonal +-1 is clipped
            r = np.arctanh(np.clip(r, -1.0 + 1e-7, 1.0 - 1e-7))
        total = r if total is None else total + r
    fc = total / len(timeseries)
    if fisher_z:
        fc = np.tanh(fc)
    np.fill_diagonal(fc, 1.0)
    return fc


# --------------------------------------------------------------------------- diffusion maps


def _check_fc(fc: np.ndarray, n_components: int) -> np.ndarray:
    fc = np.asarray(fc, dtype=np.float64)
    if fc.ndim != 2 or fc.shape[0] != fc.shape[1]:
        raise DataError(
            f"connectivity matrix must be square (R x R), got shape {fc.shape}; "
            "to start from time series, use connectivity() or BrainGradients().fit(list_of_RxT)"
        )
    bad = ~np.isfinite(fc)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise DataError(
            f"connectivity matrix has {int(bad.sum())} NaN/Inf entries (first at row {i}, "
            f"column {j}); usually a constant or empty ROI: fix or drop it before computing gradients"
        )
    asym = float(np.abs(fc - fc.T).max())
    if asym > 1e-5 * max(1.0, float(np.abs(fc).max())):
        raise DataError(
            f"connectivity matrix is not symmetric (max |C - C^T| = {asym:.3g}); a functional "
            "connectivity matrix is symmetric: check that the file holds an R x R correlation matrix"
        )
    if fc.shape[0] < n_components + 2:
        raise DataError(
            f"{n_components} gradients need at least {n_components + 2} ROIs, the matrix has "
            f"{fc.shape[0]}: lower n_components (--n-components) below {fc.shape[0] - 1}"
        )
    return fc


def affinity(fc: np.ndarray, kernel: str = "normalized_angle", sparsity: float = 0.9) -> np.ndarray:
    """Affinity between ROIs from a connectivity matrix.

    Each row of ``fc`` keeps its top ``int(R * (1 - sparsity))`` entries (the rest are zeroed;
    the count is computed in floating point exactly as BrainSpace does, so 44 for R = 450 and 39
    for R = 400); then rows are compared with the cosine similarity, turned into the normalized
    angle 1 - arccos(cos) / pi when ``kernel="normalized_angle"``; negative affinities are zeroed.

    Args:
        fc: R x R connectivity matrix.
        kernel: ``"normalized_angle"`` or ``"cosine"``.
        sparsity: the fraction of each row zeroed, in [0, 1); 0 keeps every entry.

    Returns:
        R x R float64 affinity, non-negative and symmetric.

    Raises:
        ConfigError: an unknown kernel, or a sparsity out of range or keeping no entry.
        DataError: a row is all zeros after thresholding.
    """
    if kernel not in KERNELS:
        raise ConfigError(f"unknown gradient kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1) (fraction of each row zeroed), got {sparsity}")
    x = np.asarray(fc, dtype=np.float64)
    n = x.shape[1]
    if sparsity > 0:
        k = int(n * (1 - sparsity))
        if k < 1:
            raise ConfigError(f"sparsity={sparsity} keeps no entry of a {n}-ROI row; lower the sparsity")
        # same selection call as BrainSpace so that ties at the threshold resolve identically
        top = np.argpartition(x, n - k, axis=1)[:, -k:]
        rows = np.arange(x.shape[0])[:, None]
        kept = np.zeros_like(x)
        kept[rows, top] = x[rows, top]
        x = kept
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))  # scikit-learn's rounding, as BrainSpace uses it
    empty = np.flatnonzero(norm == 0)
    if empty.size:
        raise DataError(
            f"ROI {empty[0]} has an all-zero connectivity row after thresholding "
            f"({empty.size} such ROIs); remove empty ROIs before computing gradients"
        )
    x = x / norm[:, None]
    a = np.clip(x @ x.T, -1.0, 1.0)
    if kernel == "normalized_angle":
        a = 1.0 - np.arccos(a) / np.pi
    a[a < 0] = 0.0
    return a


def diffusion_map(
    a: np.ndarray, n_components: int = 30, alpha: float = 0.5, diffusion_time: float = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion-map embedding (Coifman & Lafon) of an affinity matrix (R x R).

    L = D^-alpha A D^-alpha, P = rowsum(L)^-1 L (random walk). P = E^-1/2 S E^1/2 with the
    symmetric S = E^-1/2 L E^-1/2 (E = diag(rowsum(L))), so P's right eigenvectors are
    E^-1/2 u for S's eigenvectors u: one exact, deterministic symmetric solve. Like BrainSpace,
    the m + 1 eigenvalues of largest magnitude are kept and sorted descending, the trivial
    (constant, eigenvalue 1) eigenvector is dropped, each eigenvector is scaled to Euclidean norm
    sqrt(R) (BrainSpace divides unit eigenvectors by the trivial one, 1/sqrt(R)), then multiplied
    by lambda / (1 - lambda) (diffusion_time = 0, multi-scale) or lambda ** diffusion_time, and
    its sign is fixed so that its largest-magnitude entry is positive.

    Args:
        a: R x R affinity matrix (:func:`affinity`).
        n_components: the number of gradients m.
        alpha: the anisotropic diffusion parameter, in [0, 1].
        diffusion_time: 0 for the multi-scale scaling lambda / (1 - lambda), else the power of
            lambda.

    Returns:
        ``(gradients, lambdas)``: gradients R x m float64, and lambdas (m,), the multipliers
        applied (BrainSpace's ``lambdas_``); the eigenvalue itself is lambdas / (1 + lambdas)
        for diffusion_time = 0.

    Raises:
        ConfigError: alpha or diffusion_time out of range.
        DataError: the affinity graph is not connected.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1] (anisotropic diffusion), got {alpha}")
    if diffusion_time < 0:
        raise ConfigError(f"diffusion_time must be >= 0 (0 = multi-scale), got {diffusion_time}")
    n = a.shape[0]
    d = a.sum(axis=1) ** -alpha
    lap = a * d[:, None] * d[None, :]
    e = lap.sum(axis=1) ** -0.5
    s = lap * e[:, None] * e[None, :]
    s = (s + s.T) / 2  # exact symmetry for the symmetric solver (rounding only)
    w, u = eigh(s)
    keep = np.sort(np.argsort(-np.abs(w), kind="stable")[: n_components + 1])[::-1]
    w, u = w[keep], u[:, keep]
    if w[1] > 1 - 1e-10:
        # a second unit eigenvalue: the random walk never leaves some group of ROIs, and the
        # multi-scale weight lambda / (1 - lambda) blows up
        raise DataError(
            "the ROI affinity graph is not connected (some ROIs share no connectivity with the "
            "rest), so diffusion-map gradients are undefined; use kernel='normalized_angle' "
            "or a lower sparsity"
        )
    psi = u * e[:, None]  # right eigenvectors of P
    psi *= np.sqrt(n) / np.linalg.norm(psi, axis=0)
    w = w / w[0]  # the trivial eigenvalue is 1 up to rounding, as BrainSpace normalises it
    w, psi = w[1:], psi[:, 1:]
    lambdas = w / (1 - w) if diffusion_time == 0 else w**diffusion_time
    g = psi * lambdas[None, :]
    g *= np.sign(g[np.abs(g).argmax(axis=0), np.arange(g.shape[1])])[None, :]
    return g, lambdas


def compute_gradients(
    fc: np.ndarray,
    n_components: int = 30,
    kernel: str = "normalized_angle",
    sparsity: float = 0.9,
    alpha: float = 0.5,
    diffusion_time: float = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Connectivity gradients of a group FC matrix.

    The defaults are Brain-JEPA's and BrainSpace's ``GradientMaps(kernel="normalized_angle",
    approach="dm", alpha=0.5)``: top-10% row thresholding, normalized-angle affinity,
    alpha = 0.5 diffusion maps, multi-scale scaling lambda / (1 - lambda). See :func:`affinity`
    and :func:`diffusion_map` for each step.

    Args:
        fc: R x R symmetric, finite connectivity matrix, with at least n_components + 2 ROIs.
        n_components: the number of gradients m.
        kernel: the affinity kernel (:func:`affinity`).
        sparsity: the fraction of each FC row zeroed (:func:`affinity`).
        alpha: the anisotropic diffusion parameter (:func:`diffusion_map`).
        diffusion_time: 0 for multi-scale scaling (:func:`diffusion_map`).

    Returns:
        ``(gradients, lambdas)``: R x m float64 and (m,), as from :func:`diffusion_map`.

    Raises:
        ConfigError: invalid settings.
        DataError: an unusable matrix (not square, not symmetric, NaN/Inf, too few ROIs).
    """
    if int(n_components) != n_components or n_components < 1:
        raise ConfigError(f"n_components must be a positive integer, got {n_components}")
    fc = _check_fc(fc, int(n_components))
    return diffusion_map(affinity(fc, kernel, sparsity), int(n_components), alpha, diffusion_time)


def procrustes_align(gradients: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Rotate/reflect gradients onto reference gradients by orthogonal Procrustes.

    This lines up gradients from another cohort with a model's reference gradients.

    Args:
        gradients: R x m gradients to align.
        reference: R x m reference gradients.

    Returns:
        R x m float64 ``gradients @ Q``, with Q the orthogonal m x m matrix minimising
        ||gradients Q - reference||_F.

    Raises:
        DataError: the shapes differ, or the reference has NaN/Inf.
    """
    g = np.asarray(gradients, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if ref.shape != g.shape:
        raise DataError(
            f"reference gradients have shape {ref.shape} but the gradients to align have "
            f"{g.shape}: use the same parcellation (R) and number of gradients (m)"
        )
    if not np.isfinite(ref).all():
        raise DataError("reference gradients contain NaN/Inf")
    q, _ = orthogonal_procrustes(g, ref)
    return g @ q


class BrainGradients:
    """Diffusion-map brain gradients, scikit-learn style (BrainSpace's ``GradientMaps``).

    >>> bg = BrainGradients(n_components=30).fit(list_of_R_by_T_arrays)   # or an R x R FC
    >>> bg.gradients_.shape
    (R, 30)

    Attributes after ``fit``: ``connectivity_`` (R x R FC used), ``gradients_`` (R x m),
    ``lambdas_`` (m,), and after ``align_to`` also ``aligned_`` (R x m).

    Args:
        n_components: the number of gradients m.
        kernel: the affinity kernel, ``"normalized_angle"`` or ``"cosine"`` (:func:`affinity`).
        sparsity: the fraction of each FC row zeroed (:func:`affinity`).
        alpha: the anisotropic diffusion parameter (:func:`diffusion_map`).
        diffusion_time: 0 for multi-scale scaling (:func:`diffusion_map`).
        fisher_z: average subjects' correlations through Fisher's z (:func:`connectivity`).
    """

    def __init__(
        self,
        n_components: int = 30,
        kernel: str = "normalized_angle",
        sparsity: float = 0.9,
        alpha: float = 0.5,
        diffusion_time: float = 0,
        fisher_z: bool = True,
    ):
        self.n_components = n_components
        self.kernel = kernel
        self.sparsity = sparsity
        self.alpha = alpha
        self.diffusion_time = diffusion_time
        self.fisher_z = fisher_z

    def fit(self, X) -> BrainGradients:
        """Compute the connectivity (unless given) and its gradients.

        Args:
            X: a list of subjects' time series (each R x T), an S x R x T array, or one R x R FC.

        Returns:
            This object, with ``connectivity_``, ``gradients_`` and ``lambdas_`` set.

        Raises:
            DataError: a non-square 2-D input, or unusable series or matrix.
        """
        if isinstance(X, np.ndarray) and X.ndim == 2:
            if X.shape[0] != X.shape[1]:
                raise DataError(
                    f"a single 2-D input must be an R x R connectivity matrix, got shape {X.shape}; "
                    "pass time series as a list of (R, T) arrays, one per subject"
                )
            self.connectivity_ = np.asarray(X, dtype=np.float64)
        else:
            self.connectivity_ = connectivity(list(X), fisher_z=self.fisher_z)
        self.gradients_, self.lambdas_ = compute_gradients(
            self.connectivity_,
            n_components=self.n_components,
            kernel=self.kernel,
            sparsity=self.sparsity,
            alpha=self.alpha,
            diffusion_time=self.diffusion_time,
        )
        return self

    def align_to(self, reference: np.ndarray) -> np.ndarray:
        """Procrustes-align the fitted gradients to reference gradients (:func:`procrustes_align`).

        Args:
            reference: R x m reference gradients.

        Returns:
            R x m aligned gradients, also stored as ``aligned_``.

        Raises:
            DataError: not fitted yet, or the shapes differ.
        """
        if not hasattr(self, "gradients_"):
            raise DataError("BrainGradients.align_to: call fit() first")
        self.aligned_ = procrustes_align(self.gradients_, reference)
        return self.aligned_

    def save_csv(self, path: str | Path, roi_labels: Sequence[str] | None = None) -> Path:
        """Write the fitted gradients as CSV (:func:`save_gradients_csv`).

        Args:
            path: the CSV file.
            roi_labels: one label per ROI; with them the file gets a header and a label column.

        Returns:
            ``path``, as a Path.

        Raises:
            DataError: not fitted yet, or a wrong number of labels.
        """
        if not hasattr(self, "gradients_"):
            raise DataError("BrainGradients.save_csv: call fit() first")
        return save_gradients_csv(self.gradients_, path, roi_labels)
