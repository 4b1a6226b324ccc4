"""brainjepa models behind Brainmarks' model interface (a transform and a wrapper).

Brainmarks, the open evaluation suite for fMRI foundation models, asks a model for a
``(transform, wrapper)`` pair. Its samples are dicts: ``bold`` (T, D), each of the D ROIs
z-scored over time, with the ``mean`` and ``std`` (1, D) that undo it and the ``tr`` in seconds.
The wrapper takes a collated batch and returns ``Embeddings(cls_embeds, reg_embeds,
patch_embeds)``.

- :class:`SampleTransform` undoes Brainmarks' z-scoring (the model has its own normalisation),
  then does what brainjepa does to every scan: resample to the model's TR, take the centre
  window (a shorter scan: its real time patches only) and apply the model's stored
  normalisation (:meth:`BrainJEPA.prepare`). A scan shorter than one time patch at the model's
  TR is repeated to fill one patch (with a warning): Brainmarks' smoke test sends 16 frames.
- :class:`EmbeddingWrapper` encodes the windows and returns the patch tokens (B, R * p, D),
  token r * p + t, with no class or register tokens. Windows in a batch that hold fewer time
  patches than others are padded with each ROI's mean token, which leaves the mean over tokens
  (Brainmarks' pooling for linear probes) exactly the mean over the real tokens.

:func:`brainmarks_pair` builds both; the ``brainmarks.models.brainjepa_bundles`` plugin module
shipped with brainjepa registers it with Brainmarks under ``brainjepa`` (any bundle) and
``brainjepa_authors_vitb`` (the authors' checkpoint converted by ``brainjepa
convert-official``). This module needs only torch; Brainmarks passes its own ``Embeddings``
type.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .bundle import BrainJEPA, load_model
from .errors import BrainJEPAError, ConfigError
from .evaluate.features import encode_windows
from .inputs import InputWarning, PreparedInput
from .transforms import RobustScaler, resample_tr

log = logging.getLogger(__name__)

# Brainmarks' parcellated spaces by ROI count (its readers' dimensions)
SPACES = {400: "schaefer400", 424: "a424", 450: "schaefer400_tians3", 457: "schaefer400_tians3_buckner7"}
ENV_MODEL = "BRAINJEPA_MODEL"
ENV_AUTHORS_MODEL = "BRAINJEPA_AUTHORS_MODEL"
# the authors' checkpoint records no TR; their windows of 160 frames are about 2 s apart
AUTHORS_TR = 2.0


class Embeddings(NamedTuple):
    """The wrapper's output, field for field Brainmarks' ``Embeddings`` (used without Brainmarks)."""

    cls_embeds: torch.Tensor | None
    reg_embeds: torch.Tensor | None
    patch_embeds: torch.Tensor | None


def _raw_series(sample: dict) -> np.ndarray:
    """A sample's (R, T) series in its original units (Brainmarks' z-scoring undone)."""
    bold = torch.as_tensor(sample["bold"], dtype=torch.float64)
    if "mean" in sample and "std" in sample:
        bold = bold * torch.as_tensor(sample["std"], dtype=torch.float64) + torch.as_tensor(
            sample["mean"], dtype=torch.float64
        )
    return bold.T.numpy().astype(np.float32)


class SampleTransform:
    """Brainmarks sample -> the model's input window (see the module docstring).

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA` (its TR, window and normalisation).
        max_fit_samples: the most training samples :meth:`fit` reads.
    """

    def __init__(self, model: BrainJEPA, max_fit_samples: int = 512):
        self.model = model
        self.max_fit_samples = int(max_fit_samples)
        self._warned_short = False

    def fit(self, train_dataset) -> None:
        """Fit the robust scaling statistics when the model has none (the authors' checkpoint).

        A model with a stored normalisation keeps it: nothing is fitted. Otherwise a per-ROI
        (x - median) / IQR :class:`~brainjepa.transforms.RobustScaler`, the authors'
        pretraining scaling, is fitted on up to ``max_fit_samples`` evenly spaced training
        samples and stored in the model.

        Args:
            train_dataset: Brainmarks' training samples (anything with ``len`` and ``[]``).
        """
        if self.model.normalization["method"] != "unknown":
            return
        n = len(train_dataset)
        picks = np.unique(np.linspace(0, n - 1, min(n, self.max_fit_samples)).round().astype(int))
        scaler = RobustScaler().fit(_raw_series(train_dataset[int(i)]) for i in picks)
        self.model.set_normalization(scaler)
        log.info("fitted robust scaling statistics on %d training samples", len(picks))

    def __call__(self, sample: dict) -> dict:
        """The model's window of one sample.

        Args:
            sample: {"bold": (T, D), "mean": (1, D), "std": (1, D), "tr": seconds, ...}.

        Returns:
            The sample with ``bold`` replaced by the (R, n_timepoints) float32 window and
            ``n_patches``, the time patches that hold data.

        Raises:
            DataError: a sample that does not fit the model (ROI count, values).
            ConfigError: a model without a normalisation and no :meth:`fit` (or
                ``normalization=``) before.
        """
        model, cfg = self.model, self.model.config
        x = _raw_series(sample)
        tr = float(sample["tr"]) if sample.get("tr") is not None else None
        if model.target_tr is not None and tr is not None:
            x, tr = resample_tr(x, tr, model.target_tr), model.target_tr
        if x.shape[-1] < cfg.patch_size:  # repeated to fill one time patch
            if not self._warned_short:
                warnings.warn(
                    f"a sample has {x.shape[-1]} frames at the model's TR, fewer than one time patch "
                    f"({cfg.patch_size}); it is repeated to fill one patch",
                    InputWarning,
                    stacklevel=2,
                )
                self._warned_short = True
            x = np.tile(x, (1, -(-cfg.patch_size // x.shape[-1])))[:, : cfg.patch_size]
        try:
            if x.shape[-1] >= cfg.n_timepoints:
                window, n_patches = model.prepare(x, tr=tr, name="brainmarks sample"), cfg.n_patches
            else:
                windows, n_patches = model.prepare_windows(x, tr=tr, name="brainmarks sample")
                window = windows[0]
        except BrainJEPAError as exc:  # the same message, with where Brainmarks takes the fix
            raise type(exc)(
                f"{exc} (in Brainmarks a normalisation is chosen with --overrides model_kwargs.normalization=NAME)"
            ) from exc
        out = dict(sample)
        out["bold"] = window.as_subclass(torch.Tensor).contiguous()
        out["n_patches"] = int(n_patches)
        return out


class EmbeddingWrapper(nn.Module):
    """A frozen brainjepa encoder returning Brainmarks' embeddings (see the module docstring).

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA`.
        space: Brainmarks' name of the input space (its readers give D = R values per frame).
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (:func:`brainjepa.evaluate.encode_windows`).
        embeddings: the output type (Brainmarks' ``Embeddings``; default the same-shaped
            :class:`Embeddings`).
    """

    __space__: str = "unknown"

    def __init__(self, model: BrainJEPA, space: str, precision: str = "fp32", embeddings=Embeddings):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.__space__ = space
        self.precision = precision
        self.embeddings = embeddings

    def extra_repr(self) -> str:
        cfg = self.model.config
        return f"space={self.__space__!r}, rois={cfg.n_rois}, dim={cfg.embed_dim}, precision={self.precision!r}"

    @torch.no_grad()
    def forward(self, batch: dict):
        """Patch embeddings of a collated batch of :class:`SampleTransform` outputs.

        Args:
            batch: {"bold": (B, R, n_timepoints), "n_patches": (B,), ...}.

        Returns:
            ``embeddings(None, None, patch_embeds)``, patch_embeds (B, R * p, D) float32, p the
            batch's largest number of valid time patches.
        """
        cfg = self.model.config
        x = batch["bold"]
        n = batch.get("n_patches")
        valid = [cfg.n_patches] * len(x) if n is None else [int(v) for v in torch.as_tensor(n).tolist()]
        p_max = max(valid)
        out = None
        for p in sorted(set(valid)):
            idx = [i for i, v in enumerate(valid) if v == p]
            # made by SampleTransform (BrainJEPA.prepare), whose scale checks already ran
            windows = x[idx].as_subclass(PreparedInput)
            h = encode_windows(self.model, windows, p, self.precision)  # (b, R, p, D)
            if p < p_max:  # each ROI's mean token keeps the mean over tokens exact
                h = torch.cat([h, h.mean(dim=2, keepdim=True).expand(-1, -1, p_max - p, -1)], dim=2)
            if out is None:
                out = h.new_empty((len(x), *h.shape[1:]))
            out[idx] = h
        return self.embeddings(None, None, out.reshape(len(x), cfg.n_rois * p_max, cfg.embed_dim))


def space_for(model: BrainJEPA, space: str | None = None) -> str:
    """Brainmarks' input space of a model.

    Args:
        model: the model.
        space: the space to use; None: the Brainmarks space with the model's ROI count.

    Returns:
        The space name (the ROI order of its reader must be the model's).

    Raises:
        ConfigError: no space given and none with the model's ROI count.
    """
    if space is not None:
        return str(space)
    n = model.config.n_rois
    if n not in SPACES:
        raise ConfigError(
            f"the model has {n} ROIs and no Brainmarks space has that many ({SPACES}); pass space=NAME "
            "(model_kwargs.space) for data already parcellated the model's way"
        )
    return SPACES[n]


def _load(model, env: str) -> BrainJEPA:
    model = model if model is not None else os.environ.get(env)
    if model is None or model == "":
        raise ConfigError(
            f"no brainjepa model: pass model=PATH_OR_HUB_ID (Brainmarks: --overrides model_kwargs.model=...) "
            f"or set {env}"
        )
    return model if isinstance(model, BrainJEPA) else load_model(model)


def brainmarks_pair(
    model=None,
    *,
    space: str | None = None,
    normalization=None,
    precision: str = "fp32",
    device: str | None = None,
    embeddings=Embeddings,
    env: str = ENV_MODEL,
) -> tuple[SampleTransform, EmbeddingWrapper]:
    """A brainjepa model as Brainmarks' ``(transform, wrapper)`` pair.

    Args:
        model: a bundle folder, run folder, checkpoint or Hugging Face Hub id, or a
            :class:`~brainjepa.bundle.BrainJEPA`; None: the path in the environment variable
            ``env``.
        space: Brainmarks' input space; None: the one with the model's ROI count (:data:`SPACES`).
        normalization: replaces the model's normalisation (e.g. ``"zscore"``); None: keep it.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"``.
        device: where to put the model (Brainmarks moves it again to its own device).
        embeddings: the output type; Brainmarks passes its ``Embeddings``.
        env: the environment variable read when ``model`` is None.

    Returns:
        (SampleTransform, EmbeddingWrapper), sharing the model.

    Raises:
        ConfigError: no model, or no space for its ROI count.
    """
    net = _load(model, env)
    if normalization is not None:
        net.set_normalization(normalization)
    if device is not None:
        net = net.to(device)
    wrapper = EmbeddingWrapper(net, space_for(net, space), precision=precision, embeddings=embeddings)
    return SampleTransform(net), wrapper


def authors_pair(model=None, *, target_tr: float = AUTHORS_TR, **kwargs) -> tuple[SampleTransform, EmbeddingWrapper]:
    """The authors' Brain-JEPA checkpoint, converted by ``brainjepa convert-official``, for Brainmarks.

    Their checkpoint ships no normalisation statistics: unless ``normalization`` is given,
    :meth:`SampleTransform.fit` fits their robust scaling on Brainmarks' training split.

    Args:
        model: the converted bundle (folder or hub id); None: ``BRAINJEPA_AUTHORS_MODEL``.
        target_tr: the TR to resample to when the bundle records none.
        **kwargs: as :func:`brainmarks_pair`.

    Returns:
        (SampleTransform, EmbeddingWrapper).

    Raises:
        ConfigError: a bundle that is not a conversion of the authors' checkpoint, or not 450 ROIs.
    """
    net = _load(model, ENV_AUTHORS_MODEL)
    if "convert-official" not in str(net.provenance.get("source", "")):
        raise ConfigError(
            "brainjepa_authors_vitb takes the authors' checkpoint converted by `brainjepa convert-official`; "
            f"this bundle's source is {net.provenance.get('source')!r} (use the 'brainjepa' model for it)"
        )
    if net.config.n_rois != 450:
        raise ConfigError(f"the authors' checkpoint has 450 ROIs; this conversion has {net.config.n_rois}")
    if net.target_tr is None:
        net.target_tr = float(target_tr)
    return brainmarks_pair(net, **kwargs)


__all__ = [
    "SPACES",
    "Embeddings",
    "SampleTransform",
    "EmbeddingWrapper",
    "space_for",
    "brainmarks_pair",
    "authors_pair",
]
