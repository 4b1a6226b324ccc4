"""report.md: results tables, paired comparisons and the reading of them in words."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..evaluate import (
    COMPARISON_COLUMNS,
    METRIC_NAMES,
    MODEL,
    RANDOM_INIT,
    compare,
    comparison_cells,
    format_p,
    headline_metric,
    result_grid,
)
from .plots import SEED_MARK

# pretrained vs random init is called a difference below this paired t-test p value
ALPHA = 0.05


def results_markdown(rows: list[dict]) -> str:
    """The results as markdown tables.

    Args:
        rows: summary rows (:attr:`brainjepa.evaluate.Results.rows`).

    Returns:
        One table per target, methods x metrics, cells 'mean ± std' ('-' where missing).
    """
    out = []
    for target, n, metrics, methods, cell in result_grid(rows):
        out.append(f"**{target}** (test split, mean ± std over {n} seeds)\n")
        out.append("| method | " + " | ".join(METRIC_NAMES.get(m, m) for m in metrics) + " |")
        out.append("|---" * (len(metrics) + 1) + "|")
        out += [f"| {m} | " + " | ".join(cell.get((m, k), "-") for k in metrics) + " |" for m in methods]
        out.append("")
    return "\n".join(out)


def comparisons_markdown(comparisons: list[dict]) -> str:
    """Paired comparisons as a markdown table.

    Args:
        comparisons: rows of :func:`brainjepa.evaluate.comparison_rows`.

    Returns:
        The table (columns :data:`~brainjepa.evaluate.COMPARISON_COLUMNS`), or an italic
        'no paired comparisons' line when there are none.
    """
    if not comparisons:
        return "_no paired comparisons_\n"
    out = ["| " + " | ".join(COMPARISON_COLUMNS) + " |", "|---" * len(COMPARISON_COLUMNS) + "|"]
    out += ["| " + " | ".join(comparison_cells(c)) + " |" for c in comparisons]
    return "\n".join(out) + "\n"


def write_report(path: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write a markdown report: ``# title``, then one ``## heading`` and its body per section.

    Args:
        path: the .md file to write (its folder is created).
        title: the report's title.
        sections: (heading, markdown body) pairs, in order; images in a body are referenced
            relative to the report's folder.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = [f"# {title}", ""]
    for heading, body in sections:
        text += [f"## {heading}", "", body.strip(), ""]
    path.write_text("\n".join(text))
    return path


def _best(records: list[dict], target: str, metric: str, prefix: str) -> tuple[str, float] | None:
    """(method, mean over split seeds) of the method named prefix... with the best mean."""
    means = {}
    for r in records:
        if r["target"] == target and r["metric"] == metric and r["method"].startswith(prefix):
            means.setdefault(r["method"], []).append(r["value"])
    scored = [
        (m, float(np.mean([v for v in vals if np.isfinite(v)])))
        for m, vals in means.items()
        if any(np.isfinite(v) for v in vals)
    ]
    return max(scored, key=lambda item: item[1]) if scored else None


def _verdict(c: dict, alpha: float = ALPHA) -> str:
    """How a paired comparison reads: only a two-sided p below ``alpha`` counts as a difference."""
    p = c["p_value"]
    if p is None or not np.isfinite(p):
        return "cannot be told apart from" if c["n"] >= 2 else "cannot be tested (under 2 paired splits) against"
    if p < alpha:
        return "beats" if c["mean_diff"] > 0 else "is worse than"
    return "does not significantly differ from"


def reading(records: list[dict], alpha: float = ALPHA) -> str:
    """The reading of probing results in words, one factual line per target.

    Does the pretrained encoder's best readout beat the best random-init seed (with any
    readout) on the headline metric (AUROC or Pearson r), paired over split seeds? Both are
    picked by their mean test score, so neither side gets an advantage; the verdict follows the
    two-sided paired t-test at ``alpha``.

    Args:
        records: per-seed records, with ``brainjepa:<readout>`` and ``random_init#<k>:<readout>``
            methods.
        alpha: the p value below which a difference counts.

    Returns:
        Markdown list items, one per target that has both sides (joined by newlines; empty
        when none has).
    """
    lines = []
    for target in dict.fromkeys(r["target"] for r in records):
        metric = headline_metric(records, target)
        model = _best(records, target, metric, MODEL + ":")
        rand = _best(records, target, metric, RANDOM_INIT + SEED_MARK)
        if model is None or rand is None:
            continue
        c = compare(records, target, metric, model[0], rand[0])
        ci = f", 95% CI [{c['ci95_low']:+.3f}, {c['ci95_high']:+.3f}]" if np.isfinite(c["ci95_low"]) else ""
        lines.append(
            f"- **{target}** ({METRIC_NAMES[metric]}): the pretrained encoder's best readout "
            f"`{model[0]}` ({model[1]:.3f}) {_verdict(c, alpha)} the best random-init seed "
            f"`{rand[0]}` ({rand[1]:.3f}): paired difference {c['mean_diff']:+.3f}{ci}, "
            f"paired t-test p {format_p(c['p_value'])}, better on {c['wins']} of {c['n']} splits."
        )
    return "\n".join(lines)
