"""The evaluation protocol and its results.

For every target and split seed: split the subjects 60/20/20 into train / validation / test
(stratified for classification, or a user-given split), fit every method on train, choose its
regularisation or epoch on validation only, and evaluate the test split exactly once. Results
are mean +- std (sample std, ddof = 1) over split seeds, one row per (method, target, metric),
and every method sees the same splits, so methods can be compared pair by pair, seed by seed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .comparisons import format_comparisons
from .labels import Split, Target, split_indices
from .metrics import METRIC_NAMES, classification_metrics, regression_metrics

log = logging.getLogger(__name__)

Method = tuple[Callable[[int], object], object]  # (make_estimator(seed), inputs indexable by subject)


@dataclass
class Results:
    """Per-seed test metrics (``records``), their summary (``rows``) and paired comparisons.

    A record: {"method", "target", "seed", "metric", "value"} (``seed``: the split seed).
    A row: {"method", "target", "metric", "mean", "std", "n_seeds"}; std is the sample std
    (ddof = 1) over seeds, 0 for a single seed; NaN metrics (e.g. AUROC with one class in a test
    split) are left out of mean and std and of n_seeds. ``comparisons``: dicts from
    :func:`~brainjepa.evaluate.comparisons.comparison_rows` ({"target", "metric", "method",
    "baseline"} + :func:`~brainjepa.evaluate.comparisons.compare`).

    Args:
        records: per-seed records.
        comparisons: paired comparisons.
    """

    records: list[dict] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)

    @property
    def rows(self) -> list[dict]:
        """The summary rows, one per (method, target, metric) in order of first record."""
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
        """Append another result's records and comparisons.

        Args:
            other: the results to append.

        Returns:
            self.
        """
        self.records.extend(other.records)
        self.comparisons.extend(other.comparisons)
        return self

    def table(self) -> str:
        """The summary rows as a plain-text table.

        Returns:
            :func:`format_table` of :attr:`rows`.
        """
        return format_table(self.rows)

    def comparison_table(self) -> str:
        """The paired comparisons as a plain-text table.

        Returns:
            :func:`~brainjepa.evaluate.comparisons.format_comparisons` of ``comparisons``.
        """
        return format_comparisons(self.comparisons)

    def save(self, path: str | Path) -> Path:
        """Write the summary rows and paired comparisons as JSON.

        The file holds {"rows": summary rows, "comparisons": paired comparisons}; NaN becomes
        null.

        Args:
            path: the file to write (its folder is created).

        Returns:
            The path.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def clean(items):
            nan_to_none = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
            return [{k: nan_to_none(v) for k, v in r.items()} for r in items]

        path.write_text(json.dumps({"rows": clean(self.rows), "comparisons": clean(self.comparisons)}, indent=2) + "\n")
        return path


def format_mean_std(row: dict) -> str:
    """One result row's cell.

    Args:
        row: a summary row (:attr:`Results.rows`).

    Returns:
        'mean ± std' with 3 decimals, or 'n/a' where the mean is undefined (None or NaN).
    """
    mean = row["mean"]
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.3f} ± {row['std']:.3f}"


def result_grid(rows: list[dict]) -> list[tuple[str, int, list[str], list[str], dict]]:
    """Result rows grouped per target, in order of appearance; the shared layout of every
    results table.

    Args:
        rows: summary rows (:attr:`Results.rows`).

    Returns:
        Per target: (target, n_seeds, metrics, methods, {(method, metric): 'mean ± std'}).
    """
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
    """Plain-text results tables.

    Args:
        rows: summary rows (:attr:`Results.rows`).

    Returns:
        Per target a header with its n_seeds, then one line per method and one column per
        metric ('mean ± std', '-' where missing); ends with a newline.
    """
    lines = []
    for target, n, metrics, methods, cell in result_grid(rows):
        header = [f"{target} (n_seeds={n})"] + [METRIC_NAMES.get(m, m) for m in metrics]
        body = [[m] + [cell.get((m, k), "-") for k in metrics] for m in methods]
        widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]

        def fmt(row):
            return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

        lines += [fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in body] + [""]
    return "\n".join(lines).rstrip() + "\n"


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
    split_for: Callable[[int], Split] | None = None,
) -> Results:
    """The evaluation protocol on encoded labels (see :func:`~brainjepa.evaluate.labels.encode_labels`).

    Every method sees the same split for a given seed; the test split is evaluated once per seed.

    Args:
        y: (N,) encoded labels.
        methods: {name: (make_estimator(seed), X)}: the estimator has
            ``fit(X_train, y_train, X_val, y_val, n_classes=...)``, ``predict`` and
            (classification) ``predict_proba``; X is anything indexable by an index array
            (features, windows).
        target: the target's name, for the records.
        task: 'classification' or 'regression'.
        n_classes: K (default: the largest class index + 1).
        seeds: a count (seeds 0..n-1) or the split seeds.
        split: a fixed split (a user-given column): the seeds then only vary the estimators.
        progress: log every fit's test metrics.
        split_for: the split of a seed, instead of :func:`~brainjepa.evaluate.labels.split_indices`
            (e.g. windows split by subject).

    Returns:
        :class:`Results` with one record per (method, seed, metric).
    """
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if task == "classification":
        n_classes = n_classes or int(y.max() + 1)
    results = Results()
    for seed in seeds:
        sp = split or (split_for(seed) if split_for is not None else split_indices(y, task, seed))
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


def run_targets(
    targets: Sequence[Target],
    methods: Callable[[Target], dict[str, Method]],
    *,
    seeds: int | Sequence[int] = 5,
    progress: bool = True,
) -> Results:
    """:func:`run_protocol` on several targets of a cohort.

    Args:
        targets: the encoded targets (:func:`~brainjepa.evaluate.labels.cohort_targets`).
        methods: the methods of a target, with inputs for its labelled subjects (``keep``).
        seeds: a count or the split seeds.
        progress: log every fit's test metrics.

    Returns:
        The records of every target, in order.
    """
    results = Results()
    for t in targets:
        results.extend(
            run_protocol(
                t.y,
                methods(t),
                target=t.name,
                task=t.task,
                n_classes=t.n_classes,
                seeds=seeds,
                split=t.split,
                progress=progress,
            )
        )
    return results
