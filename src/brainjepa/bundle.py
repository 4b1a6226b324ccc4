"""Model bundles: a folder that carries everything needed to use a Brain-JEPA encoder, safely.

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

Loading reads JSON, CSV and safetensors only, so it never executes code. Pickle (``torch.load``)
is read in two places, always with ``weights_only=True``: checkpoints of our own runs
(:func:`export_run`, :meth:`BrainJEPA.from_checkpoint`) and the authors' released checkpoint
(:func:`brainjepa.convert.convert_official`), where full unpickling is possible only with ``trust_pickle=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from .errors import BrainJEPAError, ConfigError, DataError, require
from .model import BrainEncoder, BrainPredictor, ModelConfig
from .runio import checkpoint_path, incomplete_path, write_json_atomic
from .transforms import FITTED_NORMALIZATIONS, NORMALIZATIONS

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GRADIENTS_FILE = "gradients.csv"
NORMALIZATION_FILE = "normalization.json"
PROVENANCE_FILE = "provenance.json"
BUNDLE_FILES = (CONFIG_FILE, WEIGHTS_FILE, GRADIENTS_FILE, NORMALIZATION_FILE, PROVENANCE_FILE)
# "unknown": the weights came without statistics (the authors' checkpoint); prepare() then
# refuses to guess until the user chooses
NORMALIZATION_METHODS = (*NORMALIZATIONS, "unknown")
ENCODERS = {"target": "target_encoder", "context": "encoder"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

OFFICIAL_NORMALIZATION_NOTE = (
    "The authors' checkpoint ships no normalisation statistics. Their pipeline scaled every ROI "
    "as (x - median) / IQR with statistics computed over their pretraining cohort; their "
    "downstream scripts z-score each sample instead. Choose one before preparing data: fit a "
    "brainjepa.transforms.RobustScaler on your own cohort and call "
    "model.set_normalization(scaler), or call model.set_normalization('zscore'), or pass "
    "normalization=... to model.prepare()."
)


SPATIAL_POSITIONS = {
    "gradient": "Linear(gradients) of the ROI",
    "sincos": "sine-cosine of the ROI index",
    "learned": "a learned row per ROI",
}


class InputWarning(UserWarning):
    """The data given to a model looks unlike the data it was trained on."""


# Prepared input lies within a few units of 0 (robust: IQRs from the training median; z-scores);
# beyond this the series is on another scale than the model's training data.
MAX_SCALED_VALUE = 1e3
# typical per-ROI IQR that prepared input of a per-scan method (center, psc) may have: the
# method divides by the training cohort's IQR, so the training data sit near 1
PER_SCAN_IQR = (0.2, 5.0)  # outside: a warning
PER_SCAN_IQR_LIMIT = (0.1, 10.0)  # outside: an error


class PreparedInput(torch.Tensor):
    """A tensor made by :meth:`BrainJEPA.prepare` (stacking or moving keeps the type): its scale
    was checked against the model's normalisation there, naming the series, so the model does
    not check it again."""


# ------------------------------------------------------------------------------- the module


class BrainJEPA(nn.Module):
    """A Brain-JEPA encoder with what it needs to be used: gradients, ROI order, normalisation.

    ``BrainJEPA(config, gradients)`` builds a randomly initialised model (the random-init
    baseline); :meth:`from_pretrained` loads a bundle. Attributes: ``config`` (ModelConfig),
    ``encoder`` (BrainEncoder), ``predictor`` (BrainPredictor or None), ``normalization``
    (dict, as in normalization.json), ``roi_labels`` (list or None), ``target_tr`` (seconds or
    None), ``info`` (loss, which encoder the weights are, format and version that wrote them),
    ``provenance`` (dict, as in provenance.json).
    """

    def __init__(
        self,
        config: ModelConfig,
        gradients,
        normalization: dict | None = None,
        roi_labels: Sequence[str] | None = None,
        target_tr: float | None = None,
        predictor: bool = False,
        info: dict | None = None,
    ):
        super().__init__()
        gradients = torch.as_tensor(np.asarray(gradients, dtype=np.float32))
        self.config = config
        self.encoder = BrainEncoder(config, gradients)
        self.predictor = BrainPredictor(config, gradients.clone()) if predictor else None
        self.normalization = _check_normalization(
            normalization if normalization is not None else {"method": "unknown"}, config.n_rois
        )
        if roi_labels is not None and len(roi_labels) != config.n_rois:
            raise DataError(f"{len(roi_labels)} ROI labels for a model with {config.n_rois} ROIs")
        self.roi_labels = None if roi_labels is None else [str(r) for r in roi_labels]
        self.target_tr = None if target_tr is None else float(target_tr)
        self.info = dict(info or {})
        self.provenance: dict = {}

    # --- use -------------------------------------------------------------------------------

    def encode(self, x, roi_labels: Sequence[str] | None = None) -> torch.Tensor:
        """Token features of prepared input: x (B, R, T) -> (B, R*P, D), token r*P + t.

        ``x`` must be scaled like the training data (see :meth:`prepare`); the input is checked
        first (:meth:`check_input`). Autograd is not switched off: wrap inference in
        ``torch.no_grad()`` (or ``torch.inference_mode()``).
        """
        prepared = isinstance(x, PreparedInput)
        x = self._as_input(x)
        self.check_input(x, roi_labels, scale_checked=prepared)
        h = self.encoder(x)
        if not bool(torch.isfinite(h).all()):
            bad = torch.nonzero(~torch.isfinite(h.reshape(len(h), -1)).all(1)).flatten().tolist()
            weights = (
                ""
                if all(bool(torch.isfinite(t).all()) for t in self.encoder.parameters())
                else " (the encoder's weights hold NaN/Inf: the model is damaged)"
            )
            raise DataError(
                f"the encoder's output is NaN/Inf for sample(s) {bad[:10]} of this batch"
                f"{weights}; nothing was written: check those inputs' scale"
            )
        return h

    def embed(self, x, roi_labels: Sequence[str] | None = None) -> torch.Tensor:
        """Subject embeddings (B, D): token features averaged, then LayerNorm (no affine)."""
        h = self.encode(x, roi_labels).mean(dim=1)
        return F.layer_norm(h, h.shape[-1:], eps=self.config.layernorm_eps)

    def prepare(
        self,
        series,
        tr: float | None = None,
        window: str = "center",
        normalization: str | dict | None = None,
        name: str | None = None,
    ) -> torch.Tensor:
        """One subject's raw (R, T) series -> the model's (R, n_timepoints) float32 input.

        Resamples from ``tr`` to the model's ``target_tr`` (when the bundle has one), takes the
        centre window (``window="start"``: the first n_timepoints) and applies the bundle's
        normalisation, or ``normalization`` ("robust" dict / RobustScaler, "zscore", "none")
        when given. A bundle without statistics (method "unknown") needs that choice. ``name``
        (default: the series' ``source_name`` attribute, set for cohort scans) starts every
        message. Errors: wrong shape, NaN/Inf, absurd magnitudes, too short, and values that
        the model's scaling leaves far outside the training data's range (another scale);
        a milder mismatch of scale is an :class:`InputWarning`.
        """
        from .transforms import center_window

        cfg = self.config
        who = name or getattr(series, "source_name", None) or "prepare"
        if window not in ("center", "start"):
            raise ConfigError(f"prepare: window must be 'center' or 'start', not {window!r}")
        x, at = _resampled_input(self, series, tr, who)
        if x.shape[1] < cfg.n_timepoints:
            raise DataError(
                f"{who}: {x.shape[1]} time points{at}, shorter than the model's window of "
                f"{cfg.n_timepoints}; use longer scans or leave this one out"
            )
        x = center_window(x, cfg.n_timepoints) if window == "center" else x[:, : cfg.n_timepoints]
        out, problem = _normalized_window(self, x, normalization, who)
        if problem:
            warnings.warn(f"{who}: {problem}", InputWarning, stacklevel=2)
        return torch.from_numpy(out).as_subclass(PreparedInput)

    def prepare_windows(
        self, series, tr: float | None = None, normalization: str | dict | None = None, name: str | None = None
    ) -> tuple[torch.Tensor, int]:
        """One subject's raw (R, T) series -> every window of it: ((W, R, n_timepoints) float32,
        n_patches_valid).

        Resampled to ``target_tr`` as in :meth:`prepare`; then W = ceil(T / n_timepoints)
        windows (T counted after resampling) start at evenly spaced frames from 0 to
        T - n_timepoints (rounded), so together they cover the whole scan and the last one ends
        at its final frame. Each window is normalised on its own, exactly as :meth:`prepare`
        normalises its one window. A scan shorter than one window gives one window: its real
        frames normalised (using only them), then zeros; ``n_patches_valid`` = T // patch_size
        says how many time patches hold data (all ``n_patches`` otherwise), and only the tokens
        of those patches should be encoded (``token_idx``).
        """
        cfg = self.config
        who = name or getattr(series, "source_name", None) or "prepare_windows"
        x, _ = _resampled_input(self, series, tr, who)
        n_frames, length = x.shape[1], cfg.n_timepoints
        if n_frames < length:
            n_valid = n_frames // cfg.patch_size
            if n_valid == 0:
                raise DataError(
                    f"{who}: the series has {n_frames} time points at the "
                    f"model's TR, fewer than one time patch ({cfg.patch_size}); use "
                    "a longer scan"
                )
            window = np.zeros((cfg.n_rois, length), dtype=np.float32)
            # statistics of the real frames only: the padding must not shift the scaling
            window[:, :n_frames], problem = _normalized_window(self, x, normalization, who)
            if problem:
                warnings.warn(f"{who}: {problem}", InputWarning, stacklevel=2)
            return torch.from_numpy(window[None]).as_subclass(PreparedInput), n_valid
        n_windows = -(-n_frames // length)
        starts = np.rint(np.linspace(0, n_frames - length, n_windows)).astype(int)
        scaled = [_normalized_window(self, x[:, s : s + length], normalization, who) for s in starts]
        problem = next((pr for _, pr in scaled if pr), None)
        if problem:  # once per series
            warnings.warn(f"{who}: {problem}", InputWarning, stacklevel=2)
        windows = np.stack([w for w, _ in scaled])
        return (
            torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).as_subclass(PreparedInput),
            cfg.n_patches,
        )

    def set_normalization(self, normalization: str | dict) -> None:
        """Record how inputs are scaled: "zscore", "none", a robust dict or a fitted RobustScaler
        (stats per ROI, fitted on your cohort); saved with :meth:`save_pretrained`."""
        self.normalization = _check_normalization(_normalization_dict(normalization), self.config.n_rois)

    def check_input(self, x, roi_labels: Sequence[str] | None = None, *, scale_checked: bool = False) -> None:
        """Check a prepared batch (B, R, T) against the model.

        Errors (DataError): not 3-D, wrong ROI count, too few time points, NaN/Inf.
        Warnings (InputWarning): ROI labels that differ from the model's; more time points
        than the model uses; statistics unlike the model's normalisation (e.g. raw BOLD with
        offsets of 1e3-1e4 fed to a model trained on scaled data, which gives chance-level
        results).
        """
        cfg = self.config
        x = torch.as_tensor(x)
        if x.ndim != 3:
            raise DataError(
                f"expected a batch of shape (B, R={cfg.n_rois}, T={cfg.n_timepoints}), "
                f"got shape {tuple(x.shape)} (use x[None] for a single subject)"
            )
        B, R, T = x.shape
        if R != cfg.n_rois:
            raise DataError(
                f"input has {R} ROIs but the model was trained on {cfg.n_rois}; use "
                "the same parcellation, with ROIs in the order of the model's "
                "gradients.csv"
            )
        if T < cfg.n_timepoints:
            raise DataError(
                f"input has {T} time points but the model needs {cfg.n_timepoints}; "
                f"use model.prepare(series, tr=...) to resample and window"
            )
        if not bool(torch.isfinite(x).all()):
            raise DataError("input contains NaN or Inf values")
        if T > cfg.n_timepoints:
            warnings.warn(
                f"input has {T} time points; the model uses only the first "
                f"{cfg.n_timepoints} (model.prepare takes the centre window)",
                InputWarning,
                stacklevel=3,
            )
        if roi_labels is not None and self.roi_labels is not None:
            labels = [str(r) for r in roi_labels]
            if len(labels) != R:
                raise DataError(f"{len(labels)} ROI labels given for an input with {R} ROIs")
            if labels != self.roi_labels:
                diff = [i for i, (a, b) in enumerate(zip(labels, self.roi_labels)) if a != b]
                shown = ", ".join(f"#{i} {labels[i]!r} vs {self.roi_labels[i]!r}" for i in diff[:3])
                warnings.warn(
                    f"ROI labels differ from the model's at {len(diff)} of {R} "
                    f"positions ({shown}); reorder your ROIs to the model's "
                    "gradients.csv or results will be meaningless",
                    InputWarning,
                    stacklevel=3,
                )
        if scale_checked or isinstance(x, PreparedInput):  # model.prepare checked each series
            return
        problem = _statistics_problem(x[:, :, : cfg.n_timepoints], self.normalization)
        if problem:
            warnings.warn(problem, InputWarning, stacklevel=3)

    def _as_input(self, x) -> torch.Tensor:
        p = next(self.encoder.parameters())
        x = torch.as_tensor(x, dtype=p.dtype, device=p.device)
        return x.as_subclass(torch.Tensor) if isinstance(x, PreparedInput) else x

    # --- save / load ----------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, provenance: dict | None = None) -> Path:
        """Write the bundle folder (config.json, model.safetensors, gradients.csv,
        normalization.json, provenance.json); ``provenance`` entries extend the model's."""
        from . import __version__
        from .gradients import save_gradients_csv

        final = Path(directory)
        final.parent.mkdir(parents=True, exist_ok=True)
        # built in a sibling folder, then moved into place: an interrupted save leaves that
        # folder (recognised by from_pretrained), never a half-written bundle
        out = incomplete_path(final)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        out.mkdir()
        config = bundle_config(self, __version__)
        tensors = _state_tensors(self)
        # serialised in memory and written by Python so the file gets the usual permissions
        (out / WEIGHTS_FILE).write_bytes(
            save_safetensors(tensors, metadata={"format": "pt", "brainjepa_format": str(FORMAT_VERSION)})
        )
        save_gradients_csv(self.encoder.gradients.cpu().numpy(), out / GRADIENTS_FILE, self.roi_labels)
        write_json_atomic(out / NORMALIZATION_FILE, self.normalization, allow_nan=False)
        prov = {**self.provenance, **(provenance or {})}
        prov.setdefault("config_sha256", _sha256_json(config["architecture"]))
        prov["model_sha256"] = sha256_file(out / WEIGHTS_FILE)
        write_json_atomic(out / PROVENANCE_FILE, prov, allow_nan=False)
        write_json_atomic(out / CONFIG_FILE, config, allow_nan=False)
        if not final.exists() or (final.is_dir() and not any(final.iterdir())):
            if final.exists():
                final.rmdir()
            os.replace(out, final)
        else:  # a folder with other files: replace the bundle's files one by one, config last
            for name in (WEIGHTS_FILE, GRADIENTS_FILE, NORMALIZATION_FILE, PROVENANCE_FILE, CONFIG_FILE):
                os.replace(out / name, final / name)
            out.rmdir()
        self.provenance = prov
        return final

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None) -> BrainJEPA:
        """Load a bundle folder, or a Hugging Face Hub id "owner/name" (extra ``hub``).

        Only JSON, CSV and safetensors are read. Returns the model in eval mode.
        """
        folder = _resolve_bundle(path)
        config = _read_json(folder / CONFIG_FILE)
        if config.get("format_version", 0) > FORMAT_VERSION:
            raise BrainJEPAError(
                f"{folder / CONFIG_FILE}: bundle format "
                f"{config['format_version']} is newer than this brainjepa "
                f"understands ({FORMAT_VERSION}); upgrade brainjepa"
            )
        if "architecture" not in config:
            raise BrainJEPAError(f"{folder / CONFIG_FILE}: no 'architecture' entry; not a brainjepa bundle")
        try:
            cfg = ModelConfig.from_dict(config["architecture"])
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{folder / CONFIG_FILE}: invalid architecture: {exc}") from exc
        provenance = _read_json(folder / PROVENANCE_FILE) if (folder / PROVENANCE_FILE).exists() else {}
        tensors = _read_safetensors(folder / WEIGHTS_FILE, provenance.get("model_sha256"))
        if "encoder.gradients" not in tensors:
            raise BrainJEPAError(
                f"{folder / WEIGHTS_FILE}: tensor 'encoder.gradients' is missing; not a brainjepa bundle"
            )
        gradients = tensors["encoder.gradients"]
        if tuple(gradients.shape) != (cfg.n_rois, cfg.n_gradients):
            raise BrainJEPAError(
                f"{folder / WEIGHTS_FILE}: tensor 'encoder.gradients' has shape "
                f"{tuple(gradients.shape)} but config.json says (n_rois={cfg.n_rois}, "
                f"n_gradients={cfg.n_gradients}); config and weights disagree"
            )
        roi_labels = _check_gradients_csv(folder / GRADIENTS_FILE, gradients)
        try:
            normalization = _check_normalization(_read_json(folder / NORMALIZATION_FILE), cfg.n_rois)
        except (ConfigError, DataError) as exc:
            raise ConfigError(f"{folder / NORMALIZATION_FILE}: {exc}") from exc
        model = cls(
            cfg,
            gradients,
            normalization=normalization,
            roi_labels=roi_labels,
            target_tr=config.get("target_tr"),
            predictor=bool(config.get("predictor", False)),
            info={k: config.get(k) for k in ("loss", "encoder_weights", "brainjepa_version", "format_version")},
        )
        load_tensors(model, tensors, folder / WEIGHTS_FILE)
        model.provenance = provenance
        return model.to(device).eval() if device is not None else model.eval()

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, encoder: str = "target", predictor: bool = True) -> BrainJEPA:
        """Load a pretraining checkpoint (RUN_DIR/checkpoints/step_*.pt) with
        ``torch.load(weights_only=True)``; gradients.csv and normalization.json come from its
        run folder. ``encoder``: "target" (EMA, default) or "context"."""
        path = Path(checkpoint)
        if encoder not in ENCODERS:
            raise ConfigError(f"encoder must be one of {sorted(ENCODERS)}, not {encoder!r}")
        ckpt = load_torch_file(path)
        missing = [
            k
            for k in ("model_config", ENCODERS[encoder]) + (("predictor",) if predictor else ())
            if not isinstance(ckpt, dict) or k not in ckpt
        ]
        if missing:
            raise DataError(f"{path}: not a brainjepa pretraining checkpoint (missing {missing})")
        cfg = ModelConfig.from_dict(ckpt["model_config"])
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        enc_state = _strip_wrappers(ckpt[ENCODERS[encoder]])
        gradients = enc_state.get("gradients")
        if gradients is None:
            raise DataError(f"{path}: the {ENCODERS[encoder]} state dict has no 'gradients' buffer")
        roi_labels = (
            _check_gradients_csv(run_dir / GRADIENTS_FILE, gradients) if (run_dir / GRADIENTS_FILE).exists() else None
        )
        if (run_dir / NORMALIZATION_FILE).exists():
            normalization = _read_json(run_dir / NORMALIZATION_FILE)
        else:
            warnings.warn(
                f"{run_dir / NORMALIZATION_FILE} not found: the model's input "
                "normalisation is unknown; set it with model.set_normalization()",
                InputWarning,
                stacklevel=2,
            )
            normalization = {"method": "unknown"}
        run_config = ckpt.get("config") or (
            _read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else {}
        )
        data_cfg = run_config.get("data") or {}
        loss = ckpt.get("loss_name") or (run_config.get("train") or {}).get("loss")
        model = cls(
            cfg,
            gradients,
            normalization=normalization,
            roi_labels=roi_labels,
            target_tr=data_cfg.get("target_tr"),
            predictor=predictor,
            info={"loss": loss, "encoder_weights": ENCODERS[encoder]},
        )
        tensors = {f"encoder.{k}": v for k, v in enc_state.items()}
        if predictor:
            tensors.update({f"predictor.{k}": v for k, v in _strip_wrappers(ckpt["predictor"]).items()})
        load_tensors(model, tensors, path)
        model.provenance = {
            "source": "brainjepa pretrain",
            "run_dir": str(run_dir.resolve()),
            "checkpoint": path.name,
            "step": ckpt.get("step"),
            "epoch": ckpt.get("epoch"),
            "training_data": {"n_rois": cfg.n_rois, **data_cfg},
            "training_config": run_config,
            "config_sha256": _sha256_json(run_config),
        }
        return model.eval()


# ------------------------------------------------------------------------------ entry points


def load_model(path: str | Path, device: str | torch.device | None = None) -> BrainJEPA:
    """A bundle folder, a run folder (its ``bundle/``, else its latest checkpoint), a
    checkpoint file (.pt) or a Hugging Face Hub id -> BrainJEPA in eval mode."""
    p = Path(path)
    if p.is_file():
        model = BrainJEPA.from_checkpoint(p)
        return model.to(device) if device is not None else model
    if p.is_dir() and not (p / CONFIG_FILE).exists():
        if (p / "bundle" / CONFIG_FILE).exists():
            return BrainJEPA.from_pretrained(p / "bundle", device)
        if (p / "checkpoints").is_dir():
            model = BrainJEPA.from_checkpoint(checkpoint_path(p, None))
            return model.to(device) if device is not None else model
        raise BrainJEPAError(
            f"{p}: neither a model bundle (no {CONFIG_FILE}) nor a pretraining run folder (no bundle/ or checkpoints/)"
        )
    return BrainJEPA.from_pretrained(p, device)


def export_run(
    run_dir: str | Path,
    step: int | None = None,
    out: str | Path | None = None,
    *,
    encoder: str = "target",
    predictor: bool = True,
) -> Path:
    """Bundle a pretraining run's checkpoint (the latest, or ``step``) into ``out``
    (default RUN_DIR/bundle); returns the bundle folder."""
    run_dir = Path(run_dir)
    checkpoint = checkpoint_path(run_dir, step)
    model = BrainJEPA.from_checkpoint(checkpoint, encoder=encoder, predictor=predictor)
    out = Path(out) if out is not None else run_dir / "bundle"
    model.save_pretrained(out)
    logger.info("exported %s (step %s) to %s", checkpoint, model.provenance.get("step"), out)
    return out


def bundle_config(model: BrainJEPA, version: str) -> dict:
    """The content of config.json for ``model``."""
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
    """``torch.load(weights_only=True)`` with clear errors; arbitrary unpickling only with
    ``trust_pickle=True`` (and a warning), when the safe load refuses the file."""
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


def _resolve_bundle(path: str | Path) -> Path:
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


def _read_json(path: Path) -> dict:
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


def _read_yaml(path: Path) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def _sha256_json(value) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_safetensors(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
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


def _check_gradients_csv(path: Path, gradients: torch.Tensor) -> list[str] | None:
    """gradients.csv must hold the model's gradient buffer; returns its ROI labels."""
    from .gradients import load_gradients_csv

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


def _strip_wrappers(state: dict) -> dict:
    """Drop DDP ``module.`` and torch.compile ``_orig_mod.`` prefixes."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def _state_tensors(model: BrainJEPA) -> dict[str, torch.Tensor]:
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return tensors


def load_tensors(model: BrainJEPA, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load a flat {"encoder.*", "predictor.*"} dict, naming any tensor that does not fit."""
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


# ------------------------------------------------------------------------------ normalisation


def _normalization_dict(normalization) -> dict:
    from .transforms import RobustScaler

    if isinstance(normalization, RobustScaler):
        return normalization.to_dict()
    if isinstance(normalization, str):
        if normalization in FITTED_NORMALIZATIONS:
            raise ConfigError(
                f"normalization={normalization!r} needs statistics: pass a fitted "
                "brainjepa.transforms.RobustScaler or its to_dict()"
            )
        return {"method": normalization}
    if isinstance(normalization, dict):
        return dict(normalization)
    raise ConfigError(
        f"normalization must be 'zscore', 'none', a robust dict or a RobustScaler, not {type(normalization).__name__}"
    )


def _check_normalization(d: dict, n_rois: int) -> dict:
    from .transforms import normalization_from_dict

    method = d.get("method")
    if method not in NORMALIZATION_METHODS:
        raise ConfigError(f"normalization method must be one of {NORMALIZATION_METHODS}, got {method!r}")
    if method in FITTED_NORMALIZATIONS:
        normalization_from_dict(d)  # validates median / iqr
        if len(d["median"]) != n_rois:
            raise DataError(
                f"{method} normalization has statistics for {len(d['median'])} ROIs but the model has {n_rois}"
            )
    return d


def _scale_fix(method: str) -> str:
    """What to do when series stay off-scale after the model's own normalisation."""
    if method == "robust":
        return (
            "its statistics are the training cohort's median/IQR per ROI, so series with other "
            "offsets stay off-scale: use a model trained with per-scan centring (pretrain "
            "--set data.normalization=zscore), or fit statistics on your cohort "
            "(model.set_normalization(RobustScaler().fit(series))) knowing the model never saw "
            "that scale"
        )
    if method == "center":
        return (
            "this method removes each scan's offset but keeps its units: bring the series to "
            "the units of the model's training data, or use a model trained with psc (percent "
            "signal change) for unscaled BOLD"
        )
    return "check the series' units and export"


def _statistics_problem(x: torch.Tensor, normalization: dict, prepared: bool = False) -> str | None:
    """A message when prepared input (B, R, T) looks unlike what the model was trained on.
    ``prepared``: the input came out of model.prepare (the message then cannot ask for it)."""
    method = normalization["method"]
    if method == "unknown":
        method = normalization.get("expected", "unknown")
    if method == "none":
        return None
    x = x[:8].float()  # a few samples tell enough and keep the check cheap
    q25, med, q75 = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], device=x.device), dim=-1)
    level = float(med.abs().median())  # typical per-ROI offset
    iqr = float((q75 - q25).median())  # typical per-ROI spread
    if prepared:
        fix = "model.prepare applied the model's own normalisation and the series is still off: " + _scale_fix(method)
    else:
        fix = (
            "prepare raw series with model.prepare(series, tr=...), which applies the model's normalisation"
            if normalization["method"] != "unknown"
            else "scale each ROI as the model's training data was (see the note in its "
            "normalization.json), e.g. model.set_normalization(...) then model.prepare(series)"
        )
    if level > 100:
        return (
            f"input looks like raw BOLD signal (typical ROI median {level:.3g}) but the model "
            f"was trained on {method}-scaled data; features will be meaningless (chance-level "
            f"results): {fix}"
        )
    if prepared and method in ("center", "psc") and not PER_SCAN_IQR[0] < iqr < PER_SCAN_IQR[1]:
        return (
            f"after the model's {method} scaling the typical ROI spread (IQR) is {iqr:.3g}, "
            "while its training data had about 1: the series is in other units than the "
            f"training data (e.g. unscaled BOLD for a model trained on scaled data): {fix}"
        )
    if method == "zscore":
        std = float(x.std(dim=-1).median())
        mean = float(x.mean(dim=-1).abs().median())
        if mean > 1 or not 0.25 < std < 4:
            return (
                f"input does not look z-scored per ROI (typical |mean| {mean:.3g}, std "
                f"{std:.3g}) but the model was trained on z-scored data: {fix}"
            )
    elif method in FITTED_NORMALIZATIONS and (level > 5 or not 0.01 < iqr < 20):
        return (
            f"input does not look {method}-scaled (typical ROI |median| {level:.3g}, IQR "
            f"{iqr:.3g}; expected near 0 and 1) but the model was trained on {method}-scaled "
            f"data: {fix}"
        )
    return None


def _resampled_input(model: BrainJEPA, series, tr: float | None, who: str) -> tuple[np.ndarray, str]:
    """A checked (R, T) float32 series at the model's TR, and a note on the resampling for
    messages (shared by prepare and prepare_windows). ``who`` starts every message."""
    from .transforms import magnitude_problem, resample_tr, same_tr

    cfg = model.config
    x = np.asarray(series, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != cfg.n_rois:
        raise DataError(
            f"{who}: expected one subject's (R={cfg.n_rois}, T) series, got "
            f"shape {x.shape}; the model was trained with {cfg.n_rois} ROIs"
        )
    if not np.isfinite(x).all():
        raise DataError(f"{who}: the series contains NaN or Inf values")
    problem = magnitude_problem(x)
    if problem:
        raise DataError(f"{who}: {problem}")
    at = ""
    if model.target_tr is not None:
        if tr is None:
            warnings.warn(
                f"{who}: the model was trained at TR {model.target_tr} s; pass "
                "tr=<seconds> so the series is resampled to it",
                InputWarning,
                stacklevel=3,
            )
        elif not same_tr(tr, model.target_tr):
            n_raw = x.shape[1]
            x = resample_tr(x, tr, model.target_tr)
            at = f" ({n_raw} frames at TR {tr:g} s resampled to the model's TR {model.target_tr:g} s)"
    return x, at


def _normalized_window(model: BrainJEPA, x: np.ndarray, normalization, who: str) -> tuple[np.ndarray, str | None]:
    """One (R, t) window scaled by the model's normalisation, or by ``normalization`` when given,
    and a message when it is mildly off the training scale (None when not). A window the scaling
    leaves far off (beyond MAX_SCALED_VALUE) is an error naming ``who``."""
    from .transforms import normalization_from_dict, normalize

    norm = (
        model.normalization
        if normalization is None
        else _check_normalization(_normalization_dict(normalization), model.config.n_rois)
    )
    if norm["method"] == "unknown":
        raise ConfigError(
            f"{who}: this model does not know how its training data was "
            "normalised. " + norm.get("note", OFFICIAL_NORMALIZATION_NOTE)
        )
    method, scaler = normalization_from_dict(norm)
    out = np.ascontiguousarray(normalize(x, method, scaler), dtype=np.float32)
    if method == "none":
        return out, None
    peak = float(np.abs(out).max())
    if not np.isfinite(peak) or peak > MAX_SCALED_VALUE:
        raise DataError(
            f"{who}: after the model's {method} scaling the values reach {peak:.3g} (its training "
            "data lay within a few units of 0): this series is on another scale (unscaled BOLD for "
            "a model whose statistics came from scaled data, other units, another scanner); "
            f"{_scale_fix(method)}"
        )
    if method in ("center", "psc"):
        q25, q75 = np.percentile(out, [25, 75], axis=-1)
        iqr = float(np.median(q75 - q25))
        if not PER_SCAN_IQR_LIMIT[0] < iqr < PER_SCAN_IQR_LIMIT[1]:
            raise DataError(
                f"{who}: after the model's {method} scaling the typical ROI spread (IQR) is "
                f"{iqr:.3g}, more than 10 times off the training data's (about 1): the series is in "
                f"other units than the model was trained on; {_scale_fix(method)}"
            )
    return out, _statistics_problem(torch.from_numpy(out)[None], norm, prepared=True)
