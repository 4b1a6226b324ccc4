"""Brainmarks model plugin shipped with brainjepa: brainjepa bundles as Brainmarks models.

Brainmarks imports every module of its ``brainmarks.models`` namespace package; this one is
installed with brainjepa and registers two models (the transform and wrapper are
:mod:`brainjepa.brainmarks`):

- ``brainjepa``: any brainjepa bundle, any ROI count:
  ``create_model("brainjepa", model=PATH_OR_HUB_ID)``, or the path in ``BRAINJEPA_MODEL``;
- ``brainjepa_authors_vitb``: the authors' ViT-B checkpoint converted by
  ``brainjepa convert-official`` (``model=`` or ``BRAINJEPA_AUTHORS_MODEL``).

Options (Brainmarks' ``model_kwargs``): ``space``, ``normalization``, ``precision``, ``device``.
Without Brainmarks nothing imports this module.
"""

from brainmarks.models.base import Embeddings
from brainmarks.models.registry import register_model

from brainjepa.brainmarks import authors_pair, brainmarks_pair


@register_model("brainjepa")
def brainjepa(model=None, **kwargs):
    """A brainjepa bundle: ``(transform, wrapper)`` (:func:`brainjepa.brainmarks.brainmarks_pair`)."""
    return brainmarks_pair(model, embeddings=Embeddings, **kwargs)


@register_model("brainjepa_authors_vitb")
def brainjepa_authors_vitb(model=None, **kwargs):
    """The authors' converted ViT-B checkpoint (:func:`brainjepa.brainmarks.authors_pair`)."""
    return authors_pair(model, embeddings=Embeddings, **kwargs)
