"""NIfTI 4-D images parcellated with a label atlas: the mean of each label's voxels per volume
(nilearn), ROI names from the atlas's BIDS look-up table, the TR from the image header."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..errors import DataError, require
from .series import TimeSeries, file_suffix


def _read_nifti(path: Path, atlas) -> TimeSeries:
    if atlas is None:
        raise DataError(
            f"{path}: a NIfTI image needs a label atlas to be parcellated; pass atlas=PATH "
            "(--atlas, or an 'atlas' manifest column)"
        )
    nib = require("nibabel", "nifti", f"reading {path.name}")
    maskers = require("nilearn.maskers", "nifti", f"parcellating {path.name}")
    img = nib.load(str(path))
    if len(img.shape) != 4:
        raise DataError(f"{path}: expected a 4-D image (x, y, z, time), got shape {img.shape}")
    atlas_img = nib.load(str(atlas)) if isinstance(atlas, (str, Path)) else atlas
    ids = np.unique(np.asarray(atlas_img.dataobj)).astype(int)
    ids = ids[ids != 0]
    nilearn = require("nilearn", "nifti", f"parcellating {path.name}")
    # "no standardisation" is spelled None from nilearn 0.14 on (False warns), False before
    version = tuple(int(p) for p in nilearn.__version__.split(".")[:2] if p.isdigit())
    no_scaling = None if version >= (0, 14) else False
    masker = maskers.NiftiLabelsMasker(labels_img=atlas_img, standardize=no_scaling, resampling_target="data")
    data = np.asarray(masker.fit_transform(img), dtype=np.float32).T  # (R, T)
    if data.shape[0] != len(ids):
        raise DataError(
            f"{path}: the atlas has {len(ids)} labels but only {data.shape[0]} overlap the "
            "image; check that atlas and image are in the same space"
        )
    names = _atlas_names(atlas, ids)
    tr = None
    zooms = img.header.get_zooms()
    if len(zooms) > 3 and zooms[3] > 0:
        unit = img.header.get_xyzt_units()[1]
        tr = round(float(zooms[3]) / (1000.0 if unit == "msec" else 1.0), 6)  # header is float32
    return TimeSeries(np.ascontiguousarray(data), names, tr)


def _atlas_names(atlas, ids: np.ndarray) -> list[str]:
    """ROI names from the atlas's BIDS look-up table (``<atlas>.tsv`` with index/name), else ids."""
    if isinstance(atlas, (str, Path)):
        lut = Path(str(atlas)[: -len(file_suffix(atlas))] + ".tsv") if file_suffix(atlas) else None
        if lut is not None and lut.is_file():
            with open(lut, newline="") as f:
                table = {int(r["index"]): r["name"] for r in csv.DictReader(f, delimiter="\t")}
            if all(int(i) in table for i in ids):
                return [table[int(i)] for i in ids]
    return [str(int(i)) for i in ids]
