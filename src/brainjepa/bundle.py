"""Model bundles: :class:`BrainJEPA`, an encoder with everything needed to use it, safely.

A bundle is a folder (:mod:`brainjepa.bundle_files` lists and reads its files). Loading reads
JSON, CSV and safetensors only, so it never executes code. Pickle (``torch.load``) is read in
two places, always with ``weights_only=True``: checkpoints of our own runs (:func:`export_run`,
:meth:`BrainJEPA.from_checkpoint`) and the authors' released checkpoint
(:func:`brainjepa.convert.convert_official`), where full unpickling is possible only with
``trust_pickle=True``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from torch import nn

from . import __version__
from .bundle_files import (
    CONFIG_FILE,
    ENCODERS,
    FORMAT_VERSION,
    GRADIENTS_FILE,
    NORMALIZATION_FILE,
    PROVENANCE_FILE,
    WEIGHTS_FILE,
    bundle_config,
    check_gradients_csv,
    load_tensors,
    load_torch_file,
    read_json,
    read_safetensors,
    read_yaml,
    resolve_bundle,
    sha256_file,
    sha256_json,
    state_tensors,
    strip_wrappers,
    upload_bundle,
)
from .errors import BrainJEPAError, ConfigError, DataError
from .gradients import save_gradients_csv
from .inputs import (
    InputWarning,
    PreparedInput,
    check_batch,
    check_normalization,
    normalization_dict,
    prepare_series,
    series_windows,
)
from .model import BrainEncoder, BrainPredictor, ModelConfig
from .modelcard import CARD_FILE, evaluation_summary, model_card, run_facts
from .runio import checkpoint_path, incomplete_path, write_json_atomic

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------- the module


class BrainJEPA(nn.Module):
    """A Brain-JEPA encoder with what it needs to be used: gradients, ROI order, normalisation.

    ``BrainJEPA(config, gradients)`` builds a randomly initialised model (the random-init
    baseline); :meth:`from_pretrained` loads a bundle. Attributes: ``config`` (ModelConfig),
    ``encoder`` (BrainEncoder), ``predictor`` (BrainPredictor or None), ``normalization``
    (dict, as in normalization.json), ``roi_labels`` (list or None), ``target_tr`` (seconds or
    None), ``info`` (loss, which encoder the weights are, format and version that wrote them),
    ``provenance`` (dict, as in provenance.json).

    Args:
        config: the architecture.
        gradients: (R, m) brain gradients, array-like.
        normalization: how inputs are scaled, as in normalization.json; None: ``{"method":
            "unknown"}`` (preparing data then asks for a choice).
        roi_labels: the ROI names in model order, or None.
        target_tr: the TR (seconds) the model was trained at, or None.
        predictor: also build a predictor (needed by the diagnostics).
        info: loss, which encoder the weights are, format and version that wrote them.

    Raises:
        DataError: ``roi_labels`` or the normalisation statistics do not match the ROI count, or
            ``gradients`` have the wrong shape.
        ConfigError: an unknown normalisation method.
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
        self.normalization = check_normalization(
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
        """Token features of prepared input.

        Autograd is not switched off: wrap inference in ``torch.no_grad()`` (or
        ``torch.inference_mode()``).

        Args:
            x: (B, R, T) input scaled like the training data (see :meth:`prepare`); it is checked
                first (:meth:`check_input`), its scale only when it does not come from :meth:`prepare`.
            roi_labels: the input's ROI names, compared with the model's (a warning when they differ).

        Returns:
            (B, R*P, D), token r*P + t.

        Raises:
            DataError: input that does not fit the model (:meth:`check_input`), or an output with
                NaN/Inf (naming the samples, and saying whether the weights are damaged).
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
        """Subject embeddings: token features averaged, then LayerNorm (no affine).

        Args:
            x: (B, R, T) prepared input, as for :meth:`encode`.
            roi_labels: the input's ROI names, compared with the model's.

        Returns:
            (B, D).
        """
        h = self.encode(x, roi_labels).mean(dim=1)
        return F.layer_norm(h, h.shape[-1:], eps=self.config.layernorm_eps)

    # preparing raw series and checking prepared input (brainjepa.inputs), as methods
    prepare = prepare_series
    prepare_windows = series_windows
    check_input = check_batch

    def set_normalization(self, normalization: str | dict) -> None:
        """Record how inputs are scaled; saved with :meth:`save_pretrained`.

        Args:
            normalization: "zscore", "none", a robust dict or a fitted RobustScaler (stats per ROI,
                fitted on your cohort).

        Raises:
            ConfigError: an unknown method, or a fitted method given by name without statistics.
            DataError: statistics for another number of ROIs.
        """
        self.normalization = check_normalization(normalization_dict(normalization), self.config.n_rois)

    def _as_input(self, x) -> torch.Tensor:
        p = next(self.encoder.parameters())
        x = torch.as_tensor(x, dtype=p.dtype, device=p.device)
        return x.as_subclass(torch.Tensor) if isinstance(x, PreparedInput) else x

    # --- save / load ----------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, provenance: dict | None = None) -> Path:
        """Write the bundle folder.

        The files are config.json, model.safetensors, gradients.csv, normalization.json,
        provenance.json and README.md, the model card (:func:`brainjepa.modelcard.model_card`);
        the folder is built next to ``directory`` and moved into place, so an
        interrupted save never leaves a half-written bundle.

        Args:
            directory: the bundle folder (created, or its bundle files replaced).
            provenance: entries that extend the model's provenance.

        Returns:
            The bundle folder.
        """

        final = Path(directory)
        final.parent.mkdir(parents=True, exist_ok=True)
        # built in a sibling folder, then moved into place: an interrupted save leaves that
        # folder (recognised by from_pretrained), never a half-written bundle
        out = incomplete_path(final)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        config = bundle_config(self, __version__)
        tensors = state_tensors(self)
        # serialised in memory and written by Python so the file gets the usual permissions
        (out / WEIGHTS_FILE).write_bytes(
            save_safetensors(tensors, metadata={"format": "pt", "brainjepa_format": str(FORMAT_VERSION)})
        )
        save_gradients_csv(self.encoder.gradients.cpu().numpy(), out / GRADIENTS_FILE, self.roi_labels)
        write_json_atomic(out / NORMALIZATION_FILE, self.normalization, allow_nan=False)
        prov = {**self.provenance, **(provenance or {})}
        prov.setdefault("config_sha256", sha256_json(config["architecture"]))
        prov["model_sha256"] = sha256_file(out / WEIGHTS_FILE)
        write_json_atomic(out / PROVENANCE_FILE, prov, allow_nan=False)
        (out / CARD_FILE).write_text(model_card(self, config, prov), encoding="utf-8")
        write_json_atomic(out / CONFIG_FILE, config, allow_nan=False)
        if not final.exists() or (final.is_dir() and not any(final.iterdir())):
            if final.exists():
                final.rmdir()
            os.replace(out, final)
        else:  # a folder with other files: replace the bundle's files one by one, config last
            for name in (WEIGHTS_FILE, GRADIENTS_FILE, NORMALIZATION_FILE, PROVENANCE_FILE, CARD_FILE, CONFIG_FILE):
                os.replace(out / name, final / name)
            out.rmdir()
        self.provenance = prov
        return final

    def push_to_hub(
        self, repo_id: str, *, private: bool = False, token: str | None = None, commit_message: str | None = None
    ):
        """Save the bundle (with its model card) and upload it to the Hugging Face Hub (extra ``hub``).

        Args:
            repo_id: the model repository, "owner/name" (created when missing).
            private: create it as private.
            token: a Hub token; None: the one huggingface_hub finds.
            commit_message: the commit message.

        Returns:
            What ``huggingface_hub.HfApi.upload_folder`` returns.

        Raises:
            BrainJEPAError: a bad repo id, huggingface_hub missing, or a failed upload.
        """
        with tempfile.TemporaryDirectory(prefix="brainjepa-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "bundle")
            return upload_bundle(folder, repo_id, private=private, token=token, commit_message=commit_message)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None) -> BrainJEPA:
        """Load a bundle folder, or a Hugging Face Hub id "owner/name" (extra ``hub``).

        Only JSON, CSV and safetensors are read.

        Args:
            path: the bundle folder or hub id.
            device: where to put the model; None: the CPU.

        Returns:
            The model in eval mode.

        Raises:
            BrainJEPAError: a missing, incomplete, damaged or inconsistent bundle, or one written by a
                newer brainjepa.
            ConfigError: an invalid architecture or normalisation file.
        """
        folder = resolve_bundle(path)
        config = read_json(folder / CONFIG_FILE)
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
        provenance = read_json(folder / PROVENANCE_FILE) if (folder / PROVENANCE_FILE).exists() else {}
        tensors = read_safetensors(folder / WEIGHTS_FILE, provenance.get("model_sha256"))
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
        roi_labels = check_gradients_csv(folder / GRADIENTS_FILE, gradients)
        try:
            normalization = check_normalization(read_json(folder / NORMALIZATION_FILE), cfg.n_rois)
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
        """Load a pretraining checkpoint (RUN_DIR/checkpoints/step_*.pt).

        The file is read with ``torch.load(weights_only=True)``; gradients.csv, normalization.json and
        config.yaml come from its run folder (an unknown normalisation is an :class:`InputWarning`).

        Args:
            checkpoint: the checkpoint file.
            encoder: "target" (the EMA target encoder, default) or "context".
            predictor: also load the predictor.

        Returns:
            The model in eval mode.

        Raises:
            ConfigError: an unknown ``encoder``.
            DataError: not a brainjepa pretraining checkpoint.
            BrainJEPAError: an unreadable file, or weights that do not fit the architecture.
        """
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
        enc_state = strip_wrappers(ckpt[ENCODERS[encoder]])
        gradients = enc_state.get("gradients")
        if gradients is None:
            raise DataError(f"{path}: the {ENCODERS[encoder]} state dict has no 'gradients' buffer")
        roi_labels = (
            check_gradients_csv(run_dir / GRADIENTS_FILE, gradients) if (run_dir / GRADIENTS_FILE).exists() else None
        )
        if (run_dir / NORMALIZATION_FILE).exists():
            normalization = read_json(run_dir / NORMALIZATION_FILE)
        else:
            warnings.warn(
                f"{run_dir / NORMALIZATION_FILE} not found: the model's input "
                "normalisation is unknown; set it with model.set_normalization()",
                InputWarning,
                stacklevel=2,
            )
            normalization = {"method": "unknown"}
        run_config = ckpt.get("config") or (
            read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else {}
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
            tensors.update({f"predictor.{k}": v for k, v in strip_wrappers(ckpt["predictor"]).items()})
        load_tensors(model, tensors, path)
        model.provenance = {
            "source": "brainjepa pretrain",
            "run_dir": str(run_dir.resolve()),
            "checkpoint": path.name,
            "step": ckpt.get("step"),
            "epoch": ckpt.get("epoch"),
            "training_data": {"n_rois": cfg.n_rois, **data_cfg},
            "training_config": run_config,
            "config_sha256": sha256_json(run_config),
            # the data summary, recipe and last diagnostics, for the model card
            **run_facts(run_dir, ckpt.get("step")),
        }
        return model.eval()


# ------------------------------------------------------------------------------ entry points


def load_model(path: str | Path, device: str | torch.device | None = None) -> BrainJEPA:
    """Load a model from whatever holds one.

    Args:
        path: a bundle folder, a run folder (its ``bundle/``, else its latest checkpoint), a
            checkpoint file (.pt) or a Hugging Face Hub id.
        device: where to put the model; None: the CPU.

    Returns:
        The :class:`BrainJEPA` in eval mode.

    Raises:
        BrainJEPAError: a folder that is neither a bundle nor a run folder, or what
            :meth:`BrainJEPA.from_pretrained` / :meth:`BrainJEPA.from_checkpoint` raise.
    """
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
    evaluation: str | Path | None = None,
) -> Path:
    """Bundle a pretraining run's checkpoint, with its model card.

    Args:
        run_dir: the run folder.
        step: the checkpoint's step; None: the latest.
        out: the bundle folder; None: RUN_DIR/bundle.
        encoder: "target" (the EMA target encoder, default) or "context".
        predictor: include the predictor.
        evaluation: a probe results file of this model (``brainjepa probe --out``): its
            pretrained-versus-reference comparisons go into the provenance and the model card.

    Returns:
        The bundle folder.

    Raises:
        DataError: an ``evaluation`` file without such comparisons.
    """
    run_dir = Path(run_dir)
    checkpoint = checkpoint_path(run_dir, step)
    summary = evaluation_summary(evaluation) if evaluation is not None else None
    model = BrainJEPA.from_checkpoint(checkpoint, encoder=encoder, predictor=predictor)
    if summary is not None:
        model.provenance["evaluation"] = summary
    out = Path(out) if out is not None else run_dir / "bundle"
    model.save_pretrained(out)
    logger.info("exported %s (step %s) to %s", checkpoint, model.provenance.get("step"), out)
    return out
