"""Shared test fixtures."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brainjepa.model import ModelConfig


def pytest_configure(config):
    """brainjepa's per-machine cache (the ``precision: auto`` probe) goes to a fresh folder for
    the session, never to the user's ~/.cache."""
    import os
    import tempfile

    os.environ["BRAINJEPA_CACHE_DIR"] = tempfile.mkdtemp(prefix="brainjepa-test-cache-")


def write_manifest(folder, rows, columns=("path", "subject", "tr", "age", "group")):
    """folder/manifest.csv with ``columns`` as header and ``rows``; returns its path."""
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy 2-core machine:
    modules that train or encode use ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures brainjepa saves during the test, by path: matplotlib Figures, still readable
    after they are closed, to check what a plot shows rather than only that a file exists."""
    from brainjepa import plotting

    real = plotting.save_figure
    figures = {}

    def spy(fig, path, *args, **kwargs):
        figures[Path(path)] = fig
        return real(fig, path, *args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "brainjepa" and getattr(module, "save_figure", None) is real:
            monkeypatch.setattr(module, "save_figure", spy)
    return figures


def check_png(path, fig, dpi: int = 120) -> np.ndarray:
    """Check that ``path`` is ``fig`` rendered at ``dpi`` (its pixel size) and not blank; returns
    its pixels (H x W x channels, floats in [0, 1])."""
    from matplotlib.image import imread

    pixels = imread(path)
    width, height = fig.get_size_inches() * dpi
    assert pixels.shape[:2] == (round(height), round(width)), (path, pixels.shape)
    ink = (pixels[..., :3] < 0.9).any(-1).mean()  # share of pixels that are not (near) white
    assert 0.01 < ink < 0.9, (path, ink)
    return pixels


def line_data(ax) -> list[tuple[list, list]]:
    """(x, y) of every line drawn on a matplotlib Axes, as plain lists."""
    return [(list(map(float, line.get_xdata())), list(map(float, line.get_ydata()))) for line in ax.get_lines()]


def tiny_cfg(**kw) -> ModelConfig:
    """A 6-ROI, 64-frame model config small enough for exact float64 checks, with changes ``kw``."""
    base = dict(
        n_rois=6,
        n_timepoints=64,
        embed_dim=32,
        depth=2,
        num_heads=4,
        predictor_embed_dim=16,
        predictor_depth=1,
        predictor_num_heads=2,
    )
    return ModelConfig(**{**base, **kw})


def tiny_run_model(**kw) -> dict:
    """The ``model`` section of a pretraining config small enough for a 2-core CI machine
    (width 32, 48 frames, 2 blocks), with changes ``kw``."""
    base = dict(
        size="tiny",
        n_timepoints=48,
        n_gradients=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        predictor_embed_dim=16,
        predictor_depth=1,
        predictor_num_heads=2,
    )
    return {**base, **kw}
