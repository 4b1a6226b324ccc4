"""The recipe's options: per-scan normalisations, position and patch options, random masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainjepa.bundle import BrainJEPA
from brainjepa.data import fit_scaler, open_cohort
from brainjepa.errors import ConfigError, DataError
from brainjepa.masking import SpatiotemporalMasker
from brainjepa.model import BrainEncoder, ModelConfig
from brainjepa.transforms import (
    normalization_from_dict,
    normalization_to_dict,
    normalize,
    percent_signal_change,
    scan_transform,
)

CFG = dict(
    n_rois=16,
    n_timepoints=48,
    n_gradients=4,
    embed_dim=32,
    depth=1,
    num_heads=2,
    predictor_embed_dim=16,
    predictor_depth=1,
    predictor_num_heads=2,
)


def _raw(n_scans=6, seed=0):
    """Raw-BOLD-like scans: baseline 300-900 per scan and ROI, 1% fluctuation of amplitude a_i."""
    rng = np.random.default_rng(seed)
    amp = rng.uniform(0.5, 2.0, size=n_scans)
    signal = [a * rng.standard_normal((16, 200)) for a in amp]
    base = rng.uniform(300, 900, size=(n_scans, 16, 1))
    return [(b * (1 + 0.01 * s)).astype(np.float32) for b, s in zip(base, signal)], signal


def test_psc_recovers_the_signal_and_refuses_centred_data():
    raw, signal = _raw()
    psc = percent_signal_change(raw[0])
    s = signal[0]
    expected = 100 * 0.01 * (s - s.mean(1, keepdims=True)) / (1 + 0.01 * s.mean(1, keepdims=True))
    np.testing.assert_allclose(psc, expected, atol=2e-3)
    with pytest.raises(DataError, match="looks centred or scaled already"):
        percent_signal_change(raw[0] - raw[0].mean(1, keepdims=True))
    centred = scan_transform(raw[0], "center")
    np.testing.assert_allclose(centred.mean(1), 0, atol=1e-3)


@pytest.mark.parametrize("method", ["psc", "center"])
def test_fitted_per_scan_normalisations_remove_offsets_and_keep_amplitude(method):
    raw, signal = _raw()
    cohort = open_cohort(raw)
    scaler = fit_scaler(cohort, np.arange(6), method=method)
    d = normalization_to_dict(method, scaler)
    assert d["method"] == method and len(d["median"]) == 16
    back_method, back = normalization_from_dict(d)
    assert back_method == method
    out = [normalize(x, method, back) for x in raw]
    for x in out:  # per-scan offsets gone
        assert np.abs(np.median(x, axis=1)).max() < 0.2
    stds = [float(x.std()) for x in out]
    amps = [float(s.std()) for s in signal]
    # amplitude differences between scans survive (psc: exactly proportional)
    assert np.corrcoef(stds, amps)[0, 1] > (0.99 if method == "psc" else 0.5)
    z = [normalize(x, "zscore") for x in raw]
    assert np.ptp([float(x.std()) for x in z]) < 1e-3  # z-scoring removes them


def test_psc_scaler_on_centred_data_names_the_scan():
    raw, _ = _raw()
    cohort = open_cohort([x - x.mean(1, keepdims=True) for x in raw])
    with pytest.raises(DataError, match="array 0.*'psc' needs raw BOLD"):
        fit_scaler(cohort, np.arange(6), method="psc")


@pytest.mark.parametrize("kind", ["gradient", "sincos", "learned"])
def test_position_kinds_and_patch_norm_round_trip_through_a_bundle(kind, tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig.from_size("tiny", pos_embed=kind, patch_norm=True, **CFG)
    model = BrainJEPA(cfg, torch.randn(16, 4), normalization={"method": "zscore"}, predictor=True)
    pos = model.encoder.pos_embed(model.encoder.gradients)
    assert pos.shape == (16 * 3, 32)
    spatial = pos[:, 16:].reshape(16, 3, 16)
    assert torch.equal(spatial[:, 0], spatial[:, 2])  # shared across time patches
    assert spatial[:, 0].unique(dim=0).shape[0] == 16  # differs between ROIs
    x = torch.randn(2, 16, 48)
    with torch.no_grad():
        before = model.embed(x)
    model.save_pretrained(tmp_path / "b")
    loaded = BrainJEPA.from_pretrained(tmp_path / "b")
    assert loaded.config.pos_embed == kind and loaded.config.patch_norm
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), before)


def test_patch_norm_puts_content_on_the_scale_of_positions():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 48)
    plain = BrainEncoder(ModelConfig.from_size("tiny", **CFG), torch.randn(16, 4))
    normed = BrainEncoder(ModelConfig.from_size("tiny", patch_norm=True, **CFG), torch.randn(16, 4))
    patches = x.reshape(2, 48, 16)
    torch.set_grad_enabled(False)
    assert float(plain.patch_embed(patches).std()) < 0.2  # small init: content << positions (~0.7)
    content = normed.patch_norm(normed.patch_embed(patches))
    torch.set_grad_enabled(True)
    assert float(content.std()) == pytest.approx(1.0, abs=0.05)


def test_unknown_position_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="pos_embed"):
        ModelConfig.from_size("tiny", pos_embed="anatomical", **CFG)


def test_random_masking_keeps_every_count_and_loses_the_structure():
    st = SpatiotemporalMasker(40, 10, seed=0)
    rnd = SpatiotemporalMasker(40, 10, strategy="random", seed=0)
    a, b = st(32, np.random.default_rng(1)), rnd(32, np.random.default_rng(1))
    torch.testing.assert_close(a.context_valid.sum(1), b.context_valid.sum(1))
    torch.testing.assert_close(a.target_valid.sum(-1), b.target_valid.sum(-1))

    def rectangular(m, s, k):  # is block k of sample s a ROI set x patch span?
        tok = m.target_idx[s, k][m.target_valid[s, k]]
        rois, patches = set((tok // 10).tolist()), set((tok % 10).tolist())
        return len(tok) == len(rois) * len(patches)

    assert all(rectangular(a, s, k) for s in range(32) for k in range(3))
    assert sum(rectangular(b, s, 0) for s in range(32)) < 8  # alpha blocks: big, now scattered
    for m in (a, b):  # no target token is visible in the context
        for s in range(32):
            ctx = set(m.context_idx[s][m.context_valid[s]].tolist())
            tgt = set(m.target_idx[s][m.target_valid[s]].tolist())
            assert not ctx & tgt
    with pytest.raises(ConfigError, match="strategy"):
        SpatiotemporalMasker(40, 10, strategy="blocks")


def test_per_scan_statistics_read_at_most_max_scaler_scans(monkeypatch):
    import brainjepa.data.scaling as data

    raw, _ = _raw(n_scans=6)
    cohort = open_cohort(raw)
    read = []
    series = cohort.series
    monkeypatch.setattr(cohort, "series", lambda i: read.append(i) or series(i))
    monkeypatch.setattr(data, "MAX_SCALER_SCANS", 3)
    fit_scaler(cohort, np.arange(6), method="psc", seed=1)
    first = list(read)
    assert len(first) == 3 and len(set(first)) == 3
    read.clear()
    fit_scaler(cohort, np.arange(6), method="psc", seed=1)
    assert read == first  # a seeded sample: the same scans again
    read.clear()
    fit_scaler(cohort, np.arange(6), method="robust")
    assert len(read) == 6  # the authors' method samples frames from every scan
