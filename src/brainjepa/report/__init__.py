"""Figures, report.md, and the demo.

- :mod:`~brainjepa.report.plots`: embedding PCA, results bars, network attention figures.
- :mod:`~brainjepa.report.report`: results tables, paired comparisons and their reading.
- :mod:`~brainjepa.report.demo`: ``brainjepa demo``, the whole method on a simulated cohort.
"""

from .demo import DEMO_OUTPUTS, DEMO_STAGES, QUICK_DEMO, DemoSettings, run_demo
from .plots import cohort_attention, pca, plot_attention, plot_embedding_pca, plot_results, save_attention
from .report import comparisons_markdown, reading, results_markdown, write_report

__all__ = [
    "run_demo",
    "DemoSettings",
    "QUICK_DEMO",
    "DEMO_STAGES",
    "DEMO_OUTPUTS",
    "cohort_attention",
    "save_attention",
    "pca",
    "plot_attention",
    "plot_embedding_pca",
    "plot_results",
    "results_markdown",
    "comparisons_markdown",
    "write_report",
    "reading",
]
