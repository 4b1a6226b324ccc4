"""The one matplotlib set-up: figures are written to files only, never shown.

matplotlib is an optional dependency (extra ``viz``); :func:`pyplot` raises a clear error naming
the extra when it is missing.
"""

from __future__ import annotations

from pathlib import Path

from .errors import require


def pyplot(purpose: str = "plotting"):
    """``matplotlib.pyplot`` on the file-only Agg backend.

    Args:
        purpose: what the plot is for, named in the error when matplotlib is missing.

    Returns:
        The ``matplotlib.pyplot`` module.
    """
    matplotlib = require("matplotlib", "viz", purpose)
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out a figure, write it to a file (folders created) and close it.

    Args:
        fig: a matplotlib figure.
        path: the image file; its suffix picks the format.
        dpi: resolution in dots per inch.

    Returns:
        ``path``, as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
