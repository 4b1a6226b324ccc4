"""brainjepa behind Brainmarks' model interface: the transform and wrapper (always tested, they
need only torch) and the plugin against an installed Brainmarks (skipped without it; Brainmarks
is not a test dependency)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from torch.utils.data import default_collate

from brainjepa.brainmarks import EmbeddingWrapper, SampleTransform, authors_pair, brainmarks_pair, space_for
from brainjepa.bundle import BrainJEPA
from brainjepa.convert import convert_official
from brainjepa.errors import ConfigError, DataError
from brainjepa.evaluate.features import encode_windows
from brainjepa.inputs import InputWarning

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = tiny_cfg(n_rois=10, n_timepoints=48, n_gradients=3)
D = CFG.embed_dim
FIXTURE = Path(__file__).parent / "fixtures" / "official_parity" / "r450_tiny"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = BrainJEPA(
        CFG, np.random.default_rng(0).normal(size=(10, 3)), normalization={"method": "zscore"}, target_tr=2.0
    )
    return model.save_pretrained(tmp_path_factory.mktemp("bm") / "bundle")


def sample(n_frames: int, dim: int, tr: float, seed: int) -> dict:
    """A Brainmarks sample: bold z-scored over time per ROI, with the mean and std that undo it."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n_frames, dim)).cumsum(0) + rng.normal(size=dim) * 5
    mean, std = raw.mean(0, keepdims=True), raw.std(0, keepdims=True)
    return {
        "bold": torch.tensor((raw - mean) / std, dtype=torch.float32),
        "mean": torch.tensor(mean, dtype=torch.float32),
        "std": torch.tensor(std, dtype=torch.float32),
        "tr": tr,
    }, raw.T.astype(np.float32)


def test_transform_applies_the_models_own_preparation(bundle):
    transform, wrapper = brainmarks_pair(bundle, space="my_space")
    model = transform.model
    s, raw = sample(120, 10, 1.0, 0)
    out = transform(s)
    # undone z-scoring, resampled from TR 1 to 2 s, centre window, the bundle's zscore
    np.testing.assert_allclose(out["bold"].numpy(), model.prepare(raw, tr=1.0).numpy(), atol=1e-4)
    assert out["n_patches"] == 3 and out["tr"] == 1.0
    short, raw_short = sample(70, 10, 1.0, 1)  # 35 frames at 2 s: 2 patches of data
    out_short = transform(short)
    windows, p = model.prepare_windows(raw_short, tr=1.0)
    assert out_short["n_patches"] == p == 2
    np.testing.assert_allclose(out_short["bold"].numpy(), windows[0].numpy(), atol=1e-4)
    assert wrapper.__space__ == "my_space" and "rois=10" in repr(wrapper)


def test_wrapper_returns_patch_tokens_and_keeps_the_token_mean(bundle):
    transform, wrapper = brainmarks_pair(bundle, space="my_space")
    model = transform.model
    batch = default_collate([transform(sample(n, 10, 2.0, i)[0]) for i, n in enumerate((60, 60, 40))])
    cls, reg, patch = wrapper(batch)
    assert cls is None and reg is None and patch.shape == (3, 10 * 3, D) and patch.dtype == torch.float32
    full = encode_windows(model, batch["bold"][:2], 3)  # (2, R, 3, D), token r * p + t
    torch.testing.assert_close(patch[:2], full.reshape(2, 30, D), atol=1e-5, rtol=1e-5)
    short = encode_windows(model, batch["bold"][2:], 2)  # 40 frames: 2 valid patches
    torch.testing.assert_close(patch[2].reshape(10, 3, D)[:, :2], short[0], atol=1e-5, rtol=1e-5)
    # the padding is each ROI's mean token: the mean over tokens is the mean over real tokens
    torch.testing.assert_close(patch[2].mean(0), short[0].mean((0, 1)), atol=1e-5, rtol=1e-5)
    same = default_collate([transform(sample(40, 10, 2.0, 5)[0]) for _ in range(2)])
    assert wrapper(same).patch_embeds.shape == (2, 20, D)  # one length: only real tokens


def test_short_samples_repeat_to_one_patch_and_errors(bundle, monkeypatch):
    transform, wrapper = brainmarks_pair(bundle, space="x")
    s, _ = sample(16, 10, 1.0, 2)  # 8 frames at the model's 2 s: less than a patch of 16
    with pytest.warns(InputWarning, match="repeated to fill one patch"):
        out = transform(s)
    assert out["n_patches"] == 1 and wrapper(default_collate([out])).patch_embeds.shape == (1, 10, D)
    with pytest.raises(ConfigError, match="no Brainmarks space has that many"):
        space_for(transform.model)
    monkeypatch.delenv("BRAINJEPA_MODEL", raising=False)
    with pytest.raises(ConfigError, match="pass model=PATH_OR_HUB_ID"):
        brainmarks_pair()
    monkeypatch.setenv("BRAINJEPA_MODEL", str(bundle))
    assert brainmarks_pair(space="x")[1].model.config == CFG  # from the environment variable
    with pytest.raises(DataError, match="expected one subject's \\(R=10, T\\) series"):
        transform(sample(60, 12, 2.0, 3)[0])
    with pytest.raises(ConfigError, match="authors' checkpoint converted by"):
        authors_pair(bundle)


def test_fit_fits_robust_statistics_only_without_a_normalisation(bundle):
    model = BrainJEPA.from_pretrained(bundle)
    SampleTransform(model).fit([sample(60, 10, 2.0, 0)[0]])
    assert model.normalization["method"] == "zscore"  # a stored normalisation is kept
    model.normalization = {"method": "unknown"}
    transform = SampleTransform(model)
    with pytest.raises(ConfigError, match="model_kwargs.normalization"):
        transform(sample(60, 10, 2.0, 0)[0])
    data = [sample(60, 10, 2.0, i) for i in range(4)]
    transform.fit([s for s, _ in data])
    norm = model.normalization
    assert norm["method"] == "robust"
    pooled = np.concatenate([raw for _, raw in data], axis=1)
    np.testing.assert_allclose(norm["median"], np.median(pooled, axis=1), rtol=1e-4)


@pytest.fixture(scope="module")
def authors_bundle(tmp_path_factory):
    if not FIXTURE.is_dir():
        pytest.skip("parity fixture missing")
    out = tmp_path_factory.mktemp("authors") / "bundle"
    return convert_official(FIXTURE / "checkpoint.pth.tar", FIXTURE / "gradients.csv", out)


def brainmarks_smoke(name: str, **kwargs):
    """What ``python -m brainmarks.models.test_models NAME`` does, for both of its sample lengths."""
    from brainmarks.models.base import Embeddings
    from brainmarks.models.registry import create_model

    transform, model = create_model(name, **kwargs)
    dim = model.config.n_rois if hasattr(model, "config") else model.model.config.n_rois
    for n_samples in (16, 160):
        batch = [
            {"tr": 1.0, "bold": torch.randn(n_samples, dim), "mean": torch.randn(1, dim), "std": torch.randn(1, dim)}
            for _ in range(2)
        ]
        transform.fit(batch)
        batch = default_collate([transform(s) for s in batch])
        out = model(batch)
        assert isinstance(out, Embeddings)
        cls, reg, patch = out
        assert cls is None and reg is None and patch.ndim == 3 and patch.shape[0] == 2
        assert torch.isfinite(patch).all()
    return transform, model


def has_brainmarks() -> bool:
    """Brainmarks itself, not only the namespace package brainjepa's plugin lives in."""
    try:
        return importlib.util.find_spec("brainmarks.models.registry") is not None
    except ImportError:
        return False


@pytest.mark.skipif(not has_brainmarks(), reason="Brainmarks is not installed (pip install brainmarks==0.1.1)")
def test_brainmarks_registers_and_runs_the_models(bundle, authors_bundle):
    import warnings

    from brainmarks.models.registry import list_models

    assert {"brainjepa", "brainjepa_authors_vitb"} <= set(list_models())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        _, wrapper = brainmarks_smoke("brainjepa", model=str(bundle), space="ten_rois")
        assert wrapper.__space__ == "ten_rois"
        transform, wrapper = brainmarks_smoke("brainjepa_authors_vitb", model=str(authors_bundle))
    assert wrapper.__space__ == "schaefer400_tians3" and transform.model.target_tr == 2.0
    assert transform.model.normalization["method"] == "robust"  # fitted on the training batch
    assert isinstance(wrapper, EmbeddingWrapper)
