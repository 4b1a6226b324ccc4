"""Method names, the random-init summaries, paired comparisons over split seeds, and their
tables.

Methods in every table, on the same splits: ``brainjepa:<readout>`` (the pretrained encoder,
frozen, then a probe); ``random_init#<k>:<readout>`` (the same architecture initialised with seed
k, probed identically), summarised as ``random_init(mean):<readout>`` (the mean over init seeds
per split seed) and ``random_init(best):<readout>`` (the init seed with the best mean headline
metric; that choice looks at test results, so it is an optimistic reference); and the baselines
:data:`BASELINES`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

from ..errors import ConfigError
from .features import READOUTS, check_readouts
from .metrics import HEADLINE_METRIC, LOWER_IS_BETTER, METRIC_NAMES

BASELINES = ("fc_full", "fc_window", "amplitude")
MODEL = "brainjepa"
RANDOM_INIT = "random_init"
COMPARISON_COLUMNS = ("target", "metric", "method", "baseline", "n", "mean diff", "95% CI", "p (paired t)", "wins")


def method_name(base: str, readout: str | None = None) -> str:
    """The name of a method in records and tables.

    Args:
        base: 'brainjepa', 'random_init#<k>', 'random_init(best)', 'random_init(mean)' or a
            baseline.
        readout: the readout, or None for a baseline.

    Returns:
        '<base>:<readout>' (e.g. 'brainjepa:fc', 'random_init#1:roi', 'random_init(best):mean');
        a baseline's name as it is.
    """
    return base if readout is None else f"{base}:{readout}"


def init_seeds(random_init_seeds) -> list[int]:
    """Random-init seeds from a count (seeds 0..n-1) or a list.

    Args:
        random_init_seeds: a count >= 0, or distinct seeds.

    Returns:
        The seeds.

    Raises:
        ConfigError: a negative count or repeated seeds.
    """
    if isinstance(random_init_seeds, (int, np.integer)):
        if random_init_seeds < 0:
            raise ConfigError(f"random_init_seeds must be >= 0, got {random_init_seeds}")
        return list(range(int(random_init_seeds)))
    seeds = [int(s) for s in random_init_seeds]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"random_init_seeds has repeated seeds: {seeds}")
    return seeds


def probe_method_names(readouts: Sequence[str] = READOUTS, random_init_seeds=3) -> list[str]:
    """Names of the methods :func:`~brainjepa.evaluate.cohort.probe_cohort` fits.

    Args:
        readouts: the encoder readouts.
        random_init_seeds: a count or a list of random-init seeds (see :func:`init_seeds`).

    Returns:
        brainjepa:<r>, random_init#<k>:<r> per readout r and seed k, then the baselines (the
        random-init summaries are not fitted and are left out).
    """
    readouts = check_readouts(readouts)
    names = [method_name(MODEL, r) for r in readouts]
    names += [method_name(f"{RANDOM_INIT}#{k}", r) for k in init_seeds(random_init_seeds) for r in readouts]
    return names + list(BASELINES)


def headline_metric(records: list[dict], target: str) -> str:
    """The metric that ranks methods on a target.

    Args:
        records: per-seed records.
        target: the target.

    Returns:
        'auroc' for a classification target, 'pearson_r' for a regression target (a target is
        taken as classification when its records have an AUROC).
    """
    metrics = {r["metric"] for r in records if r["target"] == target}
    return HEADLINE_METRIC["classification" if "auroc" in metrics else "regression"]


def _mean_finite(values) -> float:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    return float(v.mean()) if len(v) else float("nan")


def random_init_summaries(records: list[dict], readouts: Sequence[str], init_seeds: Sequence[int]) -> list[dict]:
    """Records of the random-init summaries, for each target and readout r.

    ``random_init(mean):<r>``: per split seed and metric, the mean over init seeds (NaN values
    left out). ``random_init(best):<r>``: every record of the init seed whose headline metric has
    the best mean over split seeds (ties: the first seed); its records carry "source", the
    seed's method name.

    Args:
        records: per-seed records of the random-init methods (others are ignored).
        readouts: the readouts.
        init_seeds: the random-init seeds.

    Returns:
        The new records.
    """
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

    Args:
        records: per-seed records.
        target: the target.
        metric: the metric.
        method: the method.
        baseline: the reference it is compared with.

    Returns:
        {"n", "mean_diff" (method - baseline), "std" (sample std of the differences),
        "ci95_low", "ci95_high" (t interval of the mean), "p_value" (two-sided paired t-test;
        NaN for n < 2 or when every difference is 0), "wins" (seeds where the method is better:
        higher, or lower for MSE / MAE)}.
    """
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
    """The paired comparisons of the pretrained model with every reference present.

    For each target and each readout r of the pretrained model: brainjepa:r against
    random_init(best):r, random_init(mean):r, fc_window, fc_full, amplitude and level (those
    present; ``level`` is a baseline of brain-state decoding, :mod:`brainjepa.evaluate.states`).

    Args:
        records: per-seed records, the random-init summaries included.
        metric: the metric to compare on (default: each target's headline metric).

    Returns:
        One dict per comparison: {"target", "metric", "method", "baseline"} + :func:`compare`,
        and for random_init(best) "baseline_source", the init seed's method name.
    """
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
                "level",
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
    """A p value for tables.

    Args:
        p: the p value, None or NaN.

    Returns:
        The value with 3 decimals, '<0.001' below that, 'n/a' when undefined.
    """
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def comparison_cells(c: dict) -> list[str]:
    """The cells of one comparison in table order.

    Args:
        c: one comparison (a row of :func:`comparison_rows`).

    Returns:
        One string per column of :data:`COMPARISON_COLUMNS`; a random_init(best) baseline shows
        its init seed, e.g. 'random_init(best):fc (#1)'.
    """
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


def format_comparisons(comparisons: list[dict]) -> str:
    """Plain-text table of paired comparisons.

    Columns: method - baseline per split seed, mean, 95% CI, two-sided paired t-test p, wins.

    Args:
        comparisons: rows of :func:`comparison_rows`.

    Returns:
        The table, one line per comparison after a header (ends with a newline), or
        'no paired comparisons' when there are none.
    """
    if not comparisons:
        return "no paired comparisons\n"
    body = [comparison_cells(c) for c in comparisons]
    widths = [max(len(row[i]) for row in [list(COMPARISON_COLUMNS)] + body) for i in range(len(COMPARISON_COLUMNS))]

    def fmt(row):
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    lines = [fmt(COMPARISON_COLUMNS), fmt(["-" * w for w in widths])] + [fmt(r) for r in body]
    return "\n".join(lines) + "\n"


def method_rank(name: str) -> tuple:
    """Sort key of a method in tables.

    Order: brainjepa, random_init(best), random_init(mean), each by readout; then
    random_init#k by readout and seed; then the baselines; then anything else.

    Args:
        name: the method's name.

    Returns:
        A tuple that sorts in that order.
    """
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
