"""Array containers: NumPy ``.npy``/``.npz``, MATLAB ``.mat`` (v7.3 read as HDF5) and HDF5
``.h5``; reading (the series chosen by name, a conventional name or as the only 2-D array, with
ROI labels, TR and orientation stored beside it) and writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.io import loadmat, savemat

from ..errors import DataError, require
from .series import TimeSeries, _as_float32, _labels_or_none, _orient, _positive_tr

# names under which array containers (.npz/.mat/.h5) conventionally keep the series
_DATA_KEYS = ("timeseries", "time_series", "ts", "data", "X", "bold")
_LABEL_KEYS = ("roi_labels", "labels", "roi_names", "label_names")
_TR_KEYS = ("tr", "TR", "RepetitionTime", "repetition_time")


def _read_npy(path: Path, orientation) -> TimeSeries:
    arr = np.load(path, allow_pickle=False)
    return TimeSeries(_as_float32(_orient(arr, orientation, path), path))


def _pick_array(arrays: dict, variable, path, what: str):
    """Choose the series among named arrays: by name, a conventional name, or the only 2-D one."""
    if variable is not None:
        if variable not in arrays:
            raise DataError(f"{path}: no {what} named {variable!r}; it has {sorted(arrays)}")
        return variable
    two_d = [k for k, v in arrays.items() if getattr(v, "ndim", 0) == 2 and np.issubdtype(v.dtype, np.number)]
    if len(two_d) == 1:
        return two_d[0]
    for key in _DATA_KEYS:
        if key in two_d:
            return key
    if not two_d:
        raise DataError(f"{path}: no 2-D numeric {what} found (it has {sorted(arrays)})")
    raise DataError(
        f"{path}: several 2-D {what}s ({', '.join(sorted(two_d))}); choose one with "
        "variable=... (--variable, or a 'variable' manifest column)"
    )


def _meta_from(arrays: dict, path):
    labels = next((arrays[k] for k in _LABEL_KEYS if k in arrays), None)
    tr = next((arrays[k] for k in _TR_KEYS if k in arrays), None)
    orient = arrays.get("orientation")
    if orient is not None:
        orient = str(np.asarray(orient).reshape(-1)[0])
    return labels, (None if tr is None else _positive_tr(tr, path, "the tr stored in the file")), orient


def _read_npz(path: Path, orientation, variable) -> TimeSeries:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    key = _pick_array(arrays, variable, path, "array")
    labels, tr, file_orient = _meta_from(arrays, path)
    data = _as_float32(_orient(arrays[key], orientation or file_orient, path), path)
    return TimeSeries(data, _labels_or_none(labels, data.shape[0], path), tr)


def _read_mat(path: Path, orientation, variable) -> TimeSeries:
    with open(path, "rb") as f:
        head = f.read(128)
    if b"MATLAB 7.3" in head:  # v7.3 .mat files are HDF5 underneath
        return _read_h5(path, orientation, variable)
    raw = loadmat(path, squeeze_me=True, chars_as_strings=True)
    arrays = {k: np.asarray(v) for k, v in raw.items() if not k.startswith("__")}
    key = _pick_array(arrays, variable, path, "variable")
    labels, tr, file_orient = _meta_from(arrays, path)
    data = _as_float32(_orient(arrays[key], orientation or file_orient, path), path)
    return TimeSeries(data, _labels_or_none(labels, data.shape[0], path), tr)


def _read_h5(path: Path, orientation, variable) -> TimeSeries:
    h5py = require("h5py", "hdf5", f"reading {path.name}")
    with h5py.File(path, "r") as f:
        datasets = {}
        f.visititems(lambda name, obj: datasets.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
        shapes = {k: _Shape(v) for k, v in datasets.items()}
        key = _pick_array(shapes, variable, path, "dataset")
        ds = datasets[key]
        attrs = {k: ds.attrs[k] for k in ds.attrs}
        attrs.update({k: f.attrs[k] for k in f.attrs if k not in attrs})
        for k in _LABEL_KEYS + _TR_KEYS:
            if k in datasets and k not in attrs:
                attrs[k] = datasets[k][()]
        labels, tr, file_orient = _meta_from(attrs, path)
        if labels is not None:
            labels = [s.decode() if isinstance(s, bytes) else s for s in np.asarray(labels).reshape(-1)]
        arr = ds[()]
    data = _as_float32(_orient(np.asarray(arr), orientation or file_orient, path), path)
    return TimeSeries(data, _labels_or_none(labels, data.shape[0], path), tr)


class _Shape:
    """ndim/dtype of an h5py dataset without reading it (for _pick_array)."""

    def __init__(self, ds):
        self.ndim = ds.ndim
        self.dtype = ds.dtype if ds.dtype.kind in "fiub" else np.dtype(object)


def _write_npz(path: Path, data: np.ndarray, labels: list[str], tr: float | None) -> None:
    extra = {"tr": np.float64(tr)} if tr is not None else {}
    np.savez(path, timeseries=data, roi_labels=np.asarray(labels), **extra)


def _write_mat(path: Path, data: np.ndarray, labels: list[str], tr: float | None) -> None:
    extra = {"tr": float(tr)} if tr is not None else {}
    savemat(path, {"timeseries": data, "roi_labels": np.asarray(labels, dtype=object), **extra})


def _write_h5(path: Path, data: np.ndarray, labels: list[str], tr: float | None) -> None:
    h5py = require("h5py", "hdf5", f"writing {path.name}")
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("timeseries", data=data)
        ds.attrs["orientation"] = "roi-by-time"
        ds.attrs["roi_labels"] = np.asarray(labels, dtype=h5py.string_dtype())
        if tr is not None:
            ds.attrs["tr"] = float(tr)
