"""The prepared store: one memory-mapped array of every scan plus its index (:class:`Store`).

Store (a folder)
    ``data.bin``: one (total_timepoints, R) array, time-major so that a window of every ROI is
    one contiguous read; float32, or float16 of each scan's ROI-centred values (the per-scan ROI
    means are kept in float32 in ``roi_means.npy``, so float16 keeps ~3 significant digits of the
    fluctuations rather than of the raw intensities). ``store.json``: subjects, sessions, source
    paths, TRs, offsets/lengths into the array, splits, labels, ROI names, the robust-scaling
    statistics fitted on the training split, and the files skipped with the reason.
    ``skipped.tsv`` lists the skipped files again for people who do not read JSON.

Writing a store is :mod:`brainjepa.data.prepare`'s work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..runio import INCOMPLETE_SUFFIX, incomplete_path
from ..transforms import reflect_indices
from .cohort import Cohort
from .manifest import _label_array

STORE_FORMAT = "brainjepa-store"
STORE_VERSION = 1


class Store(Cohort):
    """A prepared cohort: one memory-mapped (total_timepoints, R) array plus store.json.

    Windows are read straight from the memory map (contiguous, all ROIs), so the cohort never
    has to fit in RAM. The map is opened lazily in each process and not pickled, so the store
    can be handed to DataLoader workers.

    Args:
        path: the store's folder.

    Raises:
        DataError: store.json is unreadable, of another format or a newer version, or data.bin
            does not have the size the index expects.
    """

    def __init__(self, path):
        self.path = Path(path)
        meta_file = self.path / "store.json"
        try:
            with open(meta_file) as f:
                meta = json.load(f)
        except (OSError, ValueError) as exc:
            raise DataError(f"{meta_file}: cannot read the store's index ({exc})") from exc
        if meta.get("format") != STORE_FORMAT:
            raise DataError(f"{self.path}: not a brainjepa store (store.json has no format '{STORE_FORMAT}')")
        if meta.get("version", 0) > STORE_VERSION:
            raise DataError(
                f"{self.path}: store version {meta['version']} is newer than this brainjepa "
                f"supports ({STORE_VERSION}); upgrade brainjepa"
            )
        self.meta = meta
        self.dtype = np.dtype(meta["dtype"])
        self.offsets = np.asarray(meta["offsets"], dtype=np.int64)
        self.total_timepoints = int(meta["total_timepoints"])
        labels = {}
        for k, v in meta["labels"].items():
            labels[k] = (
                _label_array(["" if x is None else str(x) for x in v])
                if meta.get("label_types", {}).get(k) != "string"
                else np.array(v, dtype=object)
            )
        super().__init__(
            subjects=meta["subjects"],
            trs=meta["trs"],
            lengths=meta["lengths"],
            n_rois=meta["n_rois"],
            roi_labels=meta.get("roi_labels"),
            labels=labels,
            sessions=meta.get("sessions"),
            paths=meta.get("paths"),
            splits=meta.get("splits"),
            skipped=[(s["path"], s["reason"]) for s in meta.get("skipped", [])],
            normalization=meta.get("normalization"),
            levels=meta.get("scan_levels"),
        )
        self.centered = bool(meta.get("centered", False))
        expected = self.total_timepoints * self.n_rois * self.dtype.itemsize
        size = (self.path / "data.bin").stat().st_size if (self.path / "data.bin").is_file() else -1
        if size != expected:
            raise DataError(
                f"{self.path / 'data.bin'}: {size} bytes, the index expects {expected}; "
                "the store is incomplete or corrupt: prepare it again"
            )
        self._data = self._means = self._fd = None

    @property
    def data(self) -> np.memmap:
        """The (total_timepoints, R) memory map (opened on first use in each process)."""
        if self._data is None:
            self._data = np.memmap(
                self.path / "data.bin", dtype=self.dtype, mode="r", shape=(self.total_timepoints, self.n_rois)
            )
        return self._data

    def _roi_means(self, i: int) -> np.ndarray:
        if self._means is None:
            self._means = np.load(self.path / "roi_means.npy")
        return self._means[i][:, None]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_data"] = state["_means"] = state["_fd"] = None  # workers reopen the file themselves
        return state

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of data.bin as a private (stop - start, R) array in the store dtype."""
        if not hasattr(os, "preadv"):  # e.g. Windows: read through the memory map
            return np.array(self.data[start:stop])
        # one read of exactly these bytes: on a cold cache, page faults on a memory map make the
        # kernel read around every fault, several times the window (3.7x measured on 30 GB)
        if self._fd is None:
            self._fd = os.open(self.path / "data.bin", os.O_RDONLY)
        out = np.empty((stop - start, self.n_rois), dtype=self.dtype)
        view = memoryview(out).cast("B")
        done, offset = 0, start * self.n_rois * self.dtype.itemsize
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise DataError(f"{self.path / 'data.bin'}: unexpected end of file; prepare the store again")
            done += got
        return out

    def _frames(self, i: int, lo: int, hi: int) -> np.ndarray:
        """Frames lo..hi-1 (in range) of scan i -> float32 (R, hi - lo)."""
        raw = self._rows(self.offsets[i] + lo, self.offsets[i] + hi)
        if raw.dtype == np.float16:  # torch's half -> float cast is vectorised, numpy's is ~15x slower
            raw = torch.from_numpy(raw).float().numpy()
        block = raw.T
        return block + self._roi_means(i) if self.centered else block

    def series(self, i: int) -> np.ndarray:
        """The raw series of a scan, read from disk (see :meth:`Cohort.series`).

        Args:
            i: the scan's index.

        Returns:
            float32 (R, T_i), with the ROI means added back for a float16 (centred) store.
        """
        return np.ascontiguousarray(self._frames(i, 0, self.length(i)))

    def read(self, i: int, start: int, stop: int) -> np.ndarray:
        """A stretch of frames of a scan, reading only those frames from disk.

        Same result as :meth:`Cohort.read`, without reading the whole scan.


        Args:
            i: the scan's index.
            start: the first frame (may be negative).
            stop: one past the last frame (may exceed the scan's length).

        Returns:
            float32 (R, stop - start), mirror-padded where it runs past the ends.
        """
        n = self.length(i)
        if 0 <= start and stop <= n:
            return self._frames(i, start, stop)
        idx = reflect_indices(start, stop, n)
        lo = int(idx.min())
        return self._frames(i, lo, int(idx.max()) + 1)[:, idx - lo]

    def sample_frames(self, i: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """Random frames of a scan, each read on its own.

        Args:
            i: the scan's index.
            k: how many frames.
            rng: the random generator that picks them.

        Returns:
            float32 (R, k) in time order, or the whole scan when it has at most ``k`` frames.
        """
        n = self.length(i)
        if k >= n:
            return self.series(i)
        idx = np.sort(rng.choice(n, size=k, replace=False))
        block = np.concatenate([self._rows(self.offsets[i] + j, self.offsets[i] + j + 1) for j in idx])
        block = block.astype(np.float32).T
        return block + self._roi_means(i) if self.centered else block


def interrupted_store(path) -> str | None:
    """Say whether a folder is a store whose preparation did not finish.

    Args:
        path: a store's folder, or the destination of one.

    Returns:
        A message saying what happened and what to do when ``path`` is (or is the destination
        of) an unfinished store, else None.
    """
    path = Path(path)
    name = path.name
    if name.startswith(".") and name.endswith(INCOMPLETE_SUFFIX) and path.is_dir():
        final = path.with_name(name[1 : -len(INCOMPLETE_SUFFIX)])
        return (
            f"{path}: a store that 'brainjepa prepare' was still writing when it stopped; use "
            f"{final} once prepared, or prepare it again with --out {final} --overwrite"
        )
    partial = incomplete_path(path)
    if partial.is_dir() and not (path / "store.json").is_file():
        return (
            f"{path}: not prepared: 'brainjepa prepare' was interrupted while writing it (the "
            f"partial store is {partial}); run the prepare command again with --overwrite"
        )
    if path.is_dir() and (path / "data.bin").is_file() and not (path / "store.json").is_file():
        return (
            f"{path}: data.bin without store.json: an interrupted 'brainjepa prepare' (or a copy "
            "that missed store.json); run the prepare command again with --overwrite"
        )
    return None


def open_store(path) -> Store:
    """Open a folder written by :func:`brainjepa.data.prepare_store`.

    Args:
        path: the store's folder.

    Returns:
        The store.

    Raises:
        DataError: the folder is not a (finished) store.
    """
    path = Path(path)
    interrupted = interrupted_store(path)
    if interrupted:
        raise DataError(interrupted)
    if not (path / "store.json").is_file():
        raise DataError(
            f"{path}: not a prepared store (no store.json); create one with brainjepa prepare MANIFEST --out STORE"
        )
    return Store(path)
