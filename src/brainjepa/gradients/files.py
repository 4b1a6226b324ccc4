"""Brain gradients on disk (CSV, one row per ROI) and in figures; connectivity matrices from files."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..plotting import pyplot, save_figure


def save_gradients_csv(gradients: np.ndarray, path: str | Path, roi_labels: Sequence[str] | None = None) -> Path:
    """Write gradients as CSV, one row per ROI, one column per gradient.

    Values are written with full float64 precision; folders are created.

    Args:
        gradients: R x m gradients.
        path: the CSV file.
        roi_labels: one label per ROI; with them the file has a header ``roi,g1,...,gm`` and the
            labels in the first column; without, it is the authors' header-less format (their
            code reads it unchanged).

    Returns:
        ``path``, as a Path.

    Raises:
        DataError: not a 2-D array, or a wrong number of labels.
    """
    g = np.asarray(gradients, dtype=np.float64)
    if g.ndim != 2:
        raise DataError(f"gradients must be an R x m array, got shape {g.shape}")
    if roi_labels is not None and len(roi_labels) != g.shape[0]:
        raise DataError(f"{len(roi_labels)} ROI labels for {g.shape[0]} ROIs in the gradients")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        if roi_labels is not None:
            writer.writerow(["roi"] + [f"g{j + 1}" for j in range(g.shape[1])])
        for i, row in enumerate(g):
            values = [repr(float(v)) for v in row]
            writer.writerow(values if roi_labels is None else [str(roi_labels[i])] + values)
    return path


def load_connectivity(path: str | Path) -> np.ndarray:
    """Read an R x R connectivity matrix.

    Args:
        path: a .npy file, or a header-less delimited text file (comma, tab or space separated).

    Returns:
        R x R float64 matrix (not checked for symmetry here).

    Raises:
        DataError: the file is missing, unreadable, not numeric or not square.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: connectivity file not found")
    try:
        if path.suffix.lower() == ".npy":
            fc = np.load(path, allow_pickle=False)
        else:
            with open(path) as f:
                sample = f.readline()
            fc = np.loadtxt(path, delimiter="," if "," in sample else None, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path}: cannot read a connectivity matrix ({exc}); expected .npy or a header-less "
            "comma/tab/space-separated R x R matrix"
        ) from exc
    try:
        fc = np.asarray(fc, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: connectivity values are not numeric ({exc})") from exc
    if fc.ndim != 2 or fc.shape[0] != fc.shape[1]:
        raise DataError(
            f"{path}: expected a square R x R connectivity matrix, got shape {fc.shape} "
            "(time series files go in as positional arguments, not --fc)"
        )
    return fc


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_gradients_csv(path: str | Path) -> tuple[np.ndarray, list[str] | None]:
    """Read a gradient CSV.

    Reads both the files :func:`save_gradients_csv` writes (optional header, optional first
    column of ROI labels) and the authors' header-less comma-separated matrix.

    Args:
        path: the CSV file.

    Returns:
        ``(gradients, labels)``: R x m float64, and the ROI labels or None when the file has
        none.

    Raises:
        DataError: an unreadable or empty file, ragged rows, or non-numeric or non-finite values.
    """
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = [[c.strip() for c in row] for row in csv.reader(f) if any(c.strip() for c in row)]
    except OSError as exc:
        raise DataError(f"{path}: cannot read gradient file ({exc})") from exc
    if not rows:
        raise DataError(f"{path}: empty gradient file")
    first = rows[0]
    header = (
        first[0].lower() == "roi"
        or not all(_is_number(c) for c in first[1:])
        or (not _is_number(first[0]) and len(rows) > 1 and _is_number(rows[1][0]))
    )
    data = rows[1:] if header else rows
    has_labels = (header and first[0].lower() == "roi") or not all(_is_number(r[0]) for r in data)
    if not data:
        raise DataError(f"{path}: gradient file has a header but no rows")
    width = len(data[0])
    labels = [r[0] for r in data] if has_labels else None
    values = []
    for i, r in enumerate(data, start=2 if header else 1):
        if len(r) != width:
            raise DataError(f"{path}, line {i}: {len(r)} columns, expected {width}")
        cells = r[1:] if has_labels else r
        try:
            values.append([float(c) for c in cells])
        except ValueError as exc:
            raise DataError(f"{path}, line {i}: non-numeric gradient value ({exc})") from exc
    g = np.asarray(values, dtype=np.float64)
    if g.shape[1] == 0:
        raise DataError(f"{path}: no gradient columns")
    if not np.isfinite(g).all():
        raise DataError(f"{path}: gradient values contain NaN/Inf")
    return g, labels


def plot_gradients(
    gradients: np.ndarray,
    path: str | Path,
    roi_labels: Sequence[str] | None = None,
    networks: Sequence[str] | None = None,
) -> Path:
    """Save a PNG of the ROIs in gradient space: G1 vs G2, plus G1 vs G3 and G2 vs G3 if m >= 3.

    Needs matplotlib (extra ``viz``).

    Args:
        gradients: R x m gradients, m >= 2.
        path: the image file.
        roi_labels: one label per ROI; the ROIs at both ends of each axis are then named.
        networks: one network name per ROI, to colour the ROIs by; without, they are coloured
            by their G1 value.

    Returns:
        ``path``, as a Path.

    Raises:
        DataError: fewer than 2 gradients, or labels or networks of the wrong length.
        BrainJEPAError: matplotlib is not installed.
    """
    g = np.asarray(gradients, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] < 2:
        raise DataError(f"plotting needs at least 2 gradients (R x m, m >= 2), got shape {g.shape}")
    for name, seq in (("roi_labels", roi_labels), ("networks", networks)):
        if seq is not None and len(seq) != g.shape[0]:
            raise DataError(f"{name} has {len(seq)} entries for {g.shape[0]} ROIs")
    plt = pyplot("plotting gradients")
    pairs = [(0, 1), (0, 2), (1, 2)] if g.shape[1] >= 3 else [(0, 1)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4.0), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        if networks is not None:
            for net in dict.fromkeys(networks):  # first-appearance order
                idx = [i for i, n in enumerate(networks) if n == net]
                ax.scatter(g[idx, a], g[idx, b], s=12, label=str(net))
        else:
            ax.scatter(g[:, a], g[:, b], s=12, c=g[:, 0], cmap="viridis")
        if roi_labels is not None:
            for i in {
                int(np.argmin(g[:, a])),
                int(np.argmax(g[:, a])),
                int(np.argmin(g[:, b])),
                int(np.argmax(g[:, b])),
            }:
                ax.annotate(str(roi_labels[i]), (g[i, a], g[i, b]), fontsize=6)
        ax.locator_params(nbins=5)  # keep tick labels of small values from overlapping
        ax.set_xlabel(f"gradient {a + 1}")
        ax.set_ylabel(f"gradient {b + 1}")
        ax.axhline(0, color="0.85", lw=0.5, zorder=0)
        ax.axvline(0, color="0.85", lw=0.5, zorder=0)
    if networks is not None:
        axes[0][-1].legend(fontsize=6, markerscale=0.8, loc="best")
    fig.suptitle(f"{g.shape[0]} ROIs in gradient space")
    return save_figure(fig, path)
