"""BIDS file names (entities, the parcellation name) and JSON sidecars (the TR they record)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DataError
from .series import _check_uniform, _positive_tr, file_suffix


def bids_entities(path: str | Path) -> dict[str, str]:
    """BIDS key-value entities of a file name.

    XCP-D names its parcellation ``atlas-`` in older releases and ``seg-`` in newer ones; both are
    returned under their own key and :func:`atlas_name` reads either.

    Args:
        path: a file name or path.

    Returns:
        The entities, e.g. {'sub': '01', 'ses': '1', 'seg': '4S456Parcels'}.
    """
    name = Path(path).name
    stem = name[: len(name) - len(file_suffix(name))] if file_suffix(name) else Path(name).stem
    out = {}
    for part in stem.split("_"):
        key, sep, value = part.partition("-")
        if sep and key.isalnum() and value:
            out[key] = value
    return out


def atlas_name(path: str | Path) -> str | None:
    """The parcellation named in a BIDS/XCP-D file name.

    Args:
        path: a file name or path.

    Returns:
        The ``seg-`` entity, else the older ``atlas-`` one, else None.
    """
    ent = bids_entities(path)
    return ent.get("seg") or ent.get("atlas")


def sidecar_path(path: str | Path) -> Path:
    """The BIDS JSON sidecar of a data file.

    Args:
        path: the data file.

    Returns:
        The same name with the format suffix replaced by ``.json``.
    """
    path = Path(path)
    suffix = file_suffix(path) or path.suffix
    return path.with_name(path.name[: len(path.name) - len(suffix)] + ".json")


def read_sidecar(path: str | Path) -> dict:
    """The JSON sidecar of a data file.

    Args:
        path: the data file (not the sidecar).

    Returns:
        The sidecar's contents, {} when there is none (or it is not a JSON object).

    Raises:
        DataError: the sidecar exists but cannot be read or parsed.
    """
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        with open(side) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{side}: cannot read JSON sidecar ({exc}); fix or remove it") from exc
    return meta if isinstance(meta, dict) else {}


def _tr_from_sidecar(path: Path, meta: dict) -> float | None:
    if "VolumeTiming" in meta:
        vt = np.asarray(meta["VolumeTiming"], dtype=float)
        _check_uniform(vt, path, "VolumeTiming in the JSON sidecar")
        if len(vt) > 1:
            return float(np.median(np.diff(vt)))
    if "RepetitionTime" in meta:
        return _positive_tr(meta["RepetitionTime"], path, "RepetitionTime in the JSON sidecar")
    fs = meta.get("SamplingFrequency")
    if isinstance(fs, (int, float)) and fs > 0:
        return 1.0 / float(fs)
    return None
