"""Shared test fixtures."""

from __future__ import annotations

import csv

import pytest
import torch


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
