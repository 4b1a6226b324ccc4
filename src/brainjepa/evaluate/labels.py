"""Targets: missing values, task inference, label encoding, and train / validation / test splits
(random and stratified, or given by a label column)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

TASKS = ("auto", "classification", "regression")  # auto: infer_task

# A label with at most this many distinct integer values is a classification target under "auto".
MAX_AUTO_CLASSES = 10
MISSING = {"", "na", "n/a", "nan", "none", "null"}


def present_mask(values: Sequence) -> np.ndarray:
    """Which labels are present.

    Args:
        values: (N,) labels, numbers or text.

    Returns:
        (N,) bool, False where a label is NaN, empty or a missing-value word such as 'NA'.
    """
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
    """The task a label column asks for.

    Args:
        values: (N,) present labels.

    Returns:
        'classification' for text labels or at most 10 distinct integers, else 'regression'.
    """
    values = np.asarray(values)
    numbers = _as_numbers(values)
    if numbers is None:
        return "classification"
    distinct = np.unique(numbers)
    if len(distinct) <= MAX_AUTO_CLASSES and np.all(distinct == np.round(distinct)):
        return "classification"
    return "regression"


def encode_labels(values: Sequence, task: str, name: str = "target") -> tuple[np.ndarray, list | None]:
    """Labels as the probes take them.

    Args:
        values: (N,) present labels.
        task: 'classification' or 'regression'.
        name: the target's name, for messages.

    Returns:
        (y, classes). Classification: y the class index 0..K-1 in sorted class order (numeric
        order for numbers, so 0/1 labels keep 1 as the positive class) and the classes;
        regression: float y and None.

    Raises:
        DataError: regression labels that are not numbers, or a single class.
        ConfigError: an unknown task.
    """
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
    """Sorted subject indices of the train, validation and test parts.

    Args:
        train: the training subjects' indices.
        val: the validation subjects' indices.
        test: the test subjects' indices.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_indices(
    y: np.ndarray, task: str, seed: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> Split:
    """A random train / validation / test split of N subjects.

    Args:
        y: (N,) encoded labels.
        task: 'classification' (the split is stratified by class) or 'regression'.
        seed: the split seed.
        fractions: train, validation and test fractions (per class when stratified).

    Returns:
        The split; every part gets at least one subject of every class.

    Raises:
        DataError: a class with fewer than 3 subjects.
    """
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
    """A user-given split.

    Args:
        values: per subject 'train', 'val' (or 'validation') or 'test'.
        name: the column's name, for messages.

    Returns:
        The split.

    Raises:
        DataError: other values, or a part without subjects.
    """
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


def target_labels(cohort, target: str, task: str = "auto") -> tuple[np.ndarray, np.ndarray, str, list | None]:
    """One label column of a cohort, encoded.

    Args:
        cohort: a cohort with a ``labels`` dict of (N,) columns.
        target: the label column.
        task: 'classification', 'regression' or 'auto' (:func:`infer_task`).

    Returns:
        (subject indices with a label, encoded y, resolved task, classes or None).

    Raises:
        DataError: the column does not exist, or its labels cannot be encoded.
    """
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
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


@dataclass
class Target:
    """One label column of a cohort, ready for the protocol (see :func:`cohort_targets`).

    Args:
        name: the column's name.
        keep: indices of the subjects with a label.
        y: their encoded labels (:func:`encode_labels`).
        task: 'classification' or 'regression'.
        classes: the classes in index order, or None for regression.
        split: a user-given split of ``keep`` (indices into ``keep``), or None for random splits.
    """

    name: str
    keep: np.ndarray  # indices of the subjects with a label
    y: np.ndarray  # their encoded labels
    task: str
    classes: list | None
    split: Split | None  # a user-given split of ``keep``, or None for random splits

    @property
    def n_classes(self) -> int | None:
        """K for classification, None for regression."""
        return len(self.classes) if self.classes else None


def cohort_targets(cohort, targets: Sequence[str], task: str = "auto", split_column: str | None = None) -> list[Target]:
    """Several label columns of a cohort, encoded, each with its user-given split.

    Args:
        cohort: a cohort with ``labels`` (and ``splits``).
        targets: label columns.
        task: 'classification', 'regression' or 'auto' (per column).
        split_column: a column that fixes the split (see :func:`user_split`), or None.

    Returns:
        One :class:`Target` per column, in order.

    Raises:
        DataError: a column that does not exist or cannot be encoded, or an invalid split.
    """
    labels = [(name, *target_labels(cohort, name, task)) for name in targets]
    return [Target(*lab, user_split(cohort, split_column, lab[1])) for lab in labels]


def user_split(cohort, split_column: str | None, keep: np.ndarray) -> Split | None:
    """The split a cohort's label column (or the manifest's reserved 'split' column) gives.

    Args:
        cohort: a cohort with ``labels`` and ``splits``.
        split_column: the column, or None for random splits.
        keep: indices of the subjects that take part (those with a label).

    Returns:
        The split of ``keep`` (indices into ``keep``), or None without a split column.

    Raises:
        DataError: the column does not exist or is not a valid split.
    """
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
