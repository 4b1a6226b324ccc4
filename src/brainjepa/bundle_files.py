"""The files of a model bundle folder, read and checked one by one.

```
BUNDLE/ config.json          architecture (ModelConfig), target TR, normalisation method, loss,
                             which encoder the weights are, brainjepa version, format version
        model.safetensors    encoder.* (the EMA target encoder by default), optional predictor.*
        gradients.csv        (R, m) brain gradients, one row per ROI in model order, ROI labels
        normalization.json   {"method": "robust", "median": [...], "iqr": [...]} | zscore | none
                             | unknown (statistics not shipped: prepare() asks the user to choose)
        provenance.json      where the weights come from: source, steps, training data and config
                             (with its sha256), and the sha256 of model.safetensors
```

Every reader names the file and what to do when it is missing, damaged or inconsistent.
:func:`load_torch_file` is the one place a PyTorch pickle is read: with ``weights_only=True``,
and fully unpickled only with ``trust_pickle=True`` (the authors' checkpoint converter).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import BrainJEPAError, require
from .gradients import load_gradients_csv
from .runio import incomplete_path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GRADIENTS_FILE = "gradients.csv"
NORMALIZATION_FILE = "normalization.json"
PROVENANCE_FILE = "provenance.json"
BUNDLE_FILES = (CONFIG_FILE, WEIGHTS_FILE, GRADIENTS_FILE, NORMALIZATION_FILE, PROVENANCE_FILE)
ENCODERS = {"target": "target_encoder", "context": "encoder"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

SPATIAL_POSITIONS = {
    "gradient": "Linear(gradients) of the ROI",
    "sincos": "sine-cosine of the ROI index",
    "learned": "a learned row per ROI",
}


def bundle_config(model, version: str) -> dict:
    """The content of config.json for a model.

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA` to save.
        version: the brainjepa version writing the bundle.

    Returns:
        The JSON-ready dict: format and versions, architecture, target TR, normalisation method,
        positional embedding in words, loss, which encoder the weights are, whether a predictor is
        included.
    """
    cfg = model.config
    return {
        "format": "brainjepa-bundle",
        "format_version": FORMAT_VERSION,
        "brainjepa_version": version,
        "architecture": cfg.to_dict(),
        "target_tr": model.target_tr,
        "normalization": model.normalization["method"],
        "pos_embed": (
            "sine-cosine of the time patch | "
            + SPATIAL_POSITIONS[cfg.pos_embed]
            + (
                ", spatial half min-max rescaled to [-1, 1] over all tokens (authors' convention)"
                if cfg.pos_minmax and cfg.pos_embed != "sincos"
                else ""
            )
        ),
        "loss": model.info.get("loss"),
        "encoder_weights": model.info.get("encoder_weights"),
        "predictor": model.predictor is not None,
    }


# ------------------------------------------------------------------------------ file helpers


def load_torch_file(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, with clear errors.

    Arbitrary unpickling happens only with ``trust_pickle=True`` (and a warning), when the safe
    load refuses the file.

    Args:
        path: the PyTorch file.
        trust_pickle: allow full unpickling, which can run code embedded in the file.

    Returns:
        The loaded object.

    Raises:
        BrainJEPAError: a missing or unreadable file, or one the safe loader refuses without
            ``trust_pickle``.
    """
    path = Path(path)
    if not path.is_file():
        raise BrainJEPAError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise BrainJEPAError(
                f"{path}: refused to load ({_unpickling_reason(exc)}): the file holds something "
                "other than tensors and plain containers; either it is not a checkpoint, or "
                "unpickling it could run arbitrary code. Only `brainjepa convert-official "
                "--trust-pickle` loads such files; use it only for a file from a source you "
                "trust"
            ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise BrainJEPAError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    warnings.warn(
        f"{path}: the safe loader refused this file; fully unpickling it because "
        "trust_pickle=True, which runs any code embedded in it",
        stacklevel=2,
    )
    logger.warning("unpickling %s with weights_only=False (--trust-pickle)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # anything can fail inside an arbitrary pickle
        raise BrainJEPAError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc


def _unpickling_reason(exc: Exception) -> str:
    """The informative line of torch's weights_only refusal (it is wrapped in boilerplate)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = [ln for ln in lines[1:] if not ln.startswith(("Please file an issue", "Check the documentation"))]
    return detail[0] if detail else (lines[0] if lines else type(exc).__name__)


def resolve_bundle(path: str | Path) -> Path:
    """The local folder of a bundle, downloading it first for a Hugging Face Hub id.

    From the hub, only the bundle's files are fetched (never a pickle).

    Args:
        path: a bundle folder, or a hub id "owner/name" (extra ``hub``).

    Returns:
        The bundle folder.

    Raises:
        BrainJEPAError: an incomplete save, a folder without config.json, a file, a failed
            download, or a path that is neither a folder nor a hub id.
    """
    p = Path(path)
    partial = incomplete_path(p)
    if not (p / CONFIG_FILE).exists() and partial.is_dir():
        raise BrainJEPAError(
            f"{p}: the bundle was not completed (an interrupted save or export left {partial}); save or export it again"
        )
    if p.is_dir():
        if not (p / CONFIG_FILE).exists():
            raise BrainJEPAError(
                f"{p}: not a model bundle (no {CONFIG_FILE}); bundles are made by "
                "save_pretrained, `brainjepa export` or `brainjepa convert-official`"
            )
        return p
    if p.exists():
        raise BrainJEPAError(
            f"{p}: a bundle is a folder, not a file; for a training checkpoint "
            "use brainjepa.load_model or BrainJEPA.from_checkpoint"
        )
    if _HUB_ID.match(str(path)):
        hub = require(
            "huggingface_hub", "hub", f"{str(path)!r} is not a local folder; loading it from the Hugging Face Hub"
        )
        try:  # only the bundle's files: a hub repository's pickles are never fetched
            return Path(hub.snapshot_download(repo_id=str(path), allow_patterns=list(BUNDLE_FILES)))
        except Exception as exc:  # network, authentication, missing repository, ...
            raise BrainJEPAError(
                f"{path}: not a local folder, and downloading it from the "
                f"Hugging Face Hub failed ({type(exc).__name__}: {exc})"
            ) from exc
    raise BrainJEPAError(f"{path}: no such bundle folder (nor a Hugging Face Hub id 'owner/name')")


def upload_bundle(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
):
    """Upload a bundle folder to a Hugging Face Hub model repository (extra ``hub``).

    The repository is created when it does not exist. Only the bundle's files and its model
    card (README.md) are uploaded.

    Args:
        folder: the bundle folder.
        repo_id: "owner/name".
        private: create the repository as private.
        token: a Hub token; None: the one huggingface_hub finds (login, HF_TOKEN).
        commit_message: the commit message; default names the brainjepa version.

    Returns:
        What ``HfApi.upload_folder`` returns (the commit's information).

    Raises:
        BrainJEPAError: a repo id that is not "owner/name", a folder that is not a bundle, or a
            failed upload.
    """
    if not _HUB_ID.match(str(repo_id)):
        raise BrainJEPAError(f"push_to_hub: {repo_id!r} is not a Hugging Face Hub id 'owner/name'")
    folder = resolve_bundle(folder)
    hub = require("huggingface_hub", "hub", f"uploading {folder} to the Hugging Face Hub")
    version = read_json(folder / CONFIG_FILE).get("brainjepa_version")
    try:
        api = hub.HfApi(token=token)
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            allow_patterns=[*BUNDLE_FILES, "README.md"],
            commit_message=commit_message or f"brainjepa {version} bundle",
        )
    except Exception as exc:  # network, authentication, permissions, ...
        raise BrainJEPAError(
            f"push_to_hub: uploading {folder} to {repo_id!r} failed ({type(exc).__name__}: {exc})"
        ) from exc


def read_json(path: Path) -> dict:
    """Read a bundle's JSON file.

    Args:
        path: the file.

    Returns:
        Its object.

    Raises:
        BrainJEPAError: a missing file, invalid JSON, or JSON that is not an object.
    """
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError as exc:
        raise BrainJEPAError(f"{path}: missing; a bundle needs {', '.join(BUNDLE_FILES[:4])}") from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BrainJEPAError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise BrainJEPAError(f"{path}: expected a JSON object")
    return value


def read_yaml(path: Path) -> dict:
    """Read a YAML file (a run's config.yaml).

    Args:
        path: the file.

    Returns:
        Its mapping; an empty file gives {}.
    """
    with open(path) as f:
        return yaml.safe_load(f) or {}


def sha256_json(value) -> str:
    """The sha256 of a JSON value, independent of key order and spacing.

    Args:
        value: anything JSON can write (other objects as their ``str``).

    Returns:
        The hex digest.
    """
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes.

    Args:
        path: the file.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_safetensors(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """Read model.safetensors on the CPU, checking its recorded sha256.

    Args:
        path: the weights file.
        sha256: its digest from provenance.json; None: not checked.

    Returns:
        {name: tensor}.

    Raises:
        BrainJEPAError: a missing, damaged or replaced file.
    """
    if not path.is_file():
        raise BrainJEPAError(f"{path}: missing; the bundle has no weights")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BrainJEPAError(
            f"{path}: not a valid safetensors file, it is truncated or corrupted "
            f"({exc}); download or export the bundle again"
        ) from exc
    if sha256 is not None and sha256_file(path) != sha256:
        raise BrainJEPAError(
            f"{path}: contents do not match the sha256 recorded in "
            f"{PROVENANCE_FILE} (corrupted or replaced); download or export the "
            "bundle again (weights replaced on purpose: re-save with "
            "save_pretrained)"
        )
    return tensors


def check_gradients_csv(path: Path, gradients: torch.Tensor) -> list[str] | None:
    """Check that gradients.csv holds the model's gradient buffer.

    Args:
        path: the bundle's gradients.csv.
        gradients: (R, m) the weights' gradient buffer.

    Returns:
        The file's ROI labels, or None when it has none.

    Raises:
        BrainJEPAError: a missing file, or gradients that differ from the buffer.
    """

    if not path.exists():
        raise BrainJEPAError(f"{path}: missing; the bundle needs its ROI order and gradients")
    values, labels = load_gradients_csv(path)
    g = gradients.detach().cpu().double().numpy()
    if values.shape != g.shape or not np.allclose(values, g, rtol=1e-5, atol=1e-6):
        raise BrainJEPAError(
            f"{path}: gradients (shape {values.shape}) differ from the model's "
            f"tensor 'gradients' (shape {g.shape}); the bundle was edited "
            "inconsistently, export it again"
        )
    return labels


def strip_wrappers(state: dict) -> dict:
    """Drop DDP ``module.`` and torch.compile ``_orig_mod.`` prefixes from a state dict's keys.

    Args:
        state: the state dict.

    Returns:
        A new dict with the plain keys.
    """
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def state_tensors(model) -> dict[str, torch.Tensor]:
    """A model's state dict ready for safetensors.

    Args:
        model: the module.

    Returns:
        {name: tensor}, detached, on the CPU, contiguous, tensors that shared storage cloned
        (safetensors refuses shared storage).
    """
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return tensors


def load_tensors(model, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load a flat {"encoder.*", "predictor.*"} dict into a model, naming any tensor that does not fit.

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA`.
        tensors: {name: tensor}, every tensor of the model's state dict and no other.
        source: the file the tensors come from, for messages.

    Raises:
        BrainJEPAError: missing or unexpected tensors, a shape that differs from the architecture,
            or NaN/Inf values.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise BrainJEPAError(f"{source}: weights do not match the architecture in the config ({'; '.join(parts)})")
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise BrainJEPAError(
                f"{source}: tensor '{name}' has shape {tuple(tensors[name].shape)} "
                f"but the config's architecture needs {tuple(ref.shape)}; config "
                "and weights disagree"
            )
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BrainJEPAError(
                f"{source}: tensor '{name}' holds NaN/Inf values; the weights are "
                "damaged (a diverged run?): export an earlier checkpoint "
                "(brainjepa export RUN_DIR --step N)"
            )
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
