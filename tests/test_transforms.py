"""TR resampling, windows, robust scaling, z-scoring and the normalisation description."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainjepa.errors import ConfigError, DataError
from brainjepa.transforms import (
    RobustScaler,
    WindowResampler,
    center_window,
    normalization_from_dict,
    normalization_to_dict,
    normalize,
    resample_tr,
    resampled_length,
    zscore,
)


def sine(freq, tr, n):
    return np.sin(2 * np.pi * freq * np.arange(n) * tr)[None].astype(np.float32)


def test_resample_keeps_slow_signal_and_removes_aliases():
    tr_in, tr_out, n = 0.735, 2.2, 3000
    slow = resample_tr(sine(0.03, tr_in, n), tr_in, tr_out)
    assert slow.shape == (1, resampled_length(n, tr_in, tr_out))
    expected = sine(0.03, tr_out, slow.shape[1])
    np.testing.assert_allclose(slow[0, 20:-20], expected[0, 20:-20], atol=1e-3)
    # 0.4 Hz is above the new Nyquist (0.227 Hz): stride-3 decimation aliases it at full
    # amplitude, the anti-aliased resampler removes it
    fast = sine(0.4, tr_in, n)
    assert np.abs(fast[:, ::3]).max() > 0.9
    assert np.abs(resample_tr(fast, tr_in, tr_out)[0, 20:-20]).max() < 0.01


def test_resample_lengths_identity_and_upsampling():
    x = np.random.default_rng(0).normal(size=(3, 100)).astype(np.float32)
    assert resample_tr(x, 0.8, 0.8) is x or np.array_equal(resample_tr(x, 0.8, 0.8), x)
    assert resample_tr(x, 0.72, 2.16).shape == (3, 34)  # floor(99 * 1/3) + 1
    up = resample_tr(sine(0.05, 2.0, 200), 2.0, 1.0)
    assert up.shape == (1, 399)
    np.testing.assert_allclose(up[0, 20:-20], sine(0.05, 1.0, 399)[0, 20:-20], atol=2e-3)
    with pytest.raises(DataError, match="positive"):
        resample_tr(x, 0.0, 2.0)


def test_window_resampler_matches_whole_series_resampling():
    x = np.random.default_rng(1).normal(size=(4, 600)).astype(np.float32)
    full = resample_tr(x, 0.7, 2.1)  # step exactly 3 frames
    rs = WindowResampler(0.7, 2.1, 50)
    for k0 in (0, 7, 100, full.shape[1] - 50):  # edges use the same mirror padding
        np.testing.assert_allclose(rs(x, 3 * k0), full[:, k0 : k0 + 50], atol=1e-5)
    assert rs.raw_extent() == 148
    rs2 = WindowResampler(0.735, 2.2, 160)  # any ratio: the window's first output on frame 0
    np.testing.assert_allclose(rs2(x, 0), resample_tr(x, 0.735, 2.2)[:, :160], atol=1e-5)


def test_center_window():
    x = np.arange(3 * 50, dtype=np.float32).reshape(3, 50)
    np.testing.assert_array_equal(center_window(x, 20), x[:, 15:35])
    np.testing.assert_array_equal(center_window(x, 50), x)
    with pytest.raises(DataError, match="shorter than the window"):
        center_window(x, 51)


def test_zscore_per_roi():
    rng = np.random.default_rng(0)
    x = rng.normal(5, 3, (4, 200)).astype(np.float32)
    x[2] = 7.0
    z = zscore(x)
    np.testing.assert_allclose(z[[0, 1, 3]].mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(z[[0, 1, 3]].std(axis=1), 1, atol=1e-4)
    assert np.all(z[2] == 0)


def test_robust_scaler_exact_on_small_cohorts():
    rng = np.random.default_rng(0)
    subjects = [rng.normal(loc=np.arange(4)[:, None] * 10, scale=2, size=(4, t)) for t in (50, 80, 30)]
    scaler = RobustScaler().fit(subjects)
    allx = np.concatenate(subjects, axis=1)
    q25, med, q75 = np.percentile(allx, [25, 50, 75], axis=1)
    np.testing.assert_allclose(scaler.median_, med, rtol=1e-5)
    np.testing.assert_allclose(scaler.iqr_, q75 - q25, rtol=1e-5)
    assert scaler.n_timepoints_seen_ == 160
    y = scaler.transform(subjects[0])
    np.testing.assert_allclose(y, (subjects[0] - med[:, None]) / (q75 - q25)[:, None], rtol=1e-4, atol=1e-5)


def test_robust_scaler_reservoir_streams_large_cohorts():
    rng = np.random.default_rng(1)
    gen = (rng.normal(loc=3.0, scale=2.0, size=(3, 1000)) for _ in range(40))  # 40,000 frames
    scaler = RobustScaler(max_timepoints=4000, seed=0).fit(gen)
    assert scaler.n_timepoints_seen_ == 40_000
    # N(3, 2): median 3, IQR 2 * 1.349; a 4,000-point sample is within a few percent
    np.testing.assert_allclose(scaler.median_, 3.0, atol=0.1)
    np.testing.assert_allclose(scaler.iqr_, 2 * 1.349, rtol=0.06)


def test_robust_scaler_errors():
    with pytest.raises(DataError, match="zero interquartile range"):
        RobustScaler().fit([np.vstack([np.arange(10.0), np.full(10, 3.0)])])
    with pytest.raises(DataError, match="no training series"):
        RobustScaler().fit([])
    with pytest.raises(DataError, match="ROIs"):
        RobustScaler().fit([np.ones((3, 4)), np.ones((2, 4))])
    with pytest.raises(ConfigError, match="not fitted"):
        RobustScaler().transform(np.ones((3, 4)))
    scaler = RobustScaler().fit([np.random.default_rng(0).normal(size=(3, 20))])
    with pytest.raises(DataError, match="fitted on 3"):
        scaler.transform(np.ones((4, 5)))


def test_normalization_description_round_trip():
    x = np.random.default_rng(2).normal(4, 2, (3, 60)).astype(np.float32)
    scaler = RobustScaler().fit([x])
    d = json.loads(json.dumps(normalization_to_dict("robust", scaler)))  # JSON-serialisable
    assert d["method"] == "robust" and len(d["median"]) == 3 and len(d["iqr"]) == 3
    method, back = normalization_from_dict(d)
    assert method == "robust"
    np.testing.assert_allclose(normalize(x, method, back), scaler.transform(x))
    assert scaler.to_dict() == normalization_to_dict("robust", scaler)
    np.testing.assert_allclose(RobustScaler.from_dict(scaler.to_dict()).median_, scaler.median_)
    for m in ("zscore", "none"):
        assert normalization_from_dict(normalization_to_dict(m)) == (m, None)
    np.testing.assert_allclose(normalize(x, "zscore"), zscore(x))
    np.testing.assert_array_equal(normalize(x, "none"), x)
    with pytest.raises(ConfigError):
        normalization_to_dict("minmax")
    with pytest.raises(ConfigError):
        normalization_to_dict("robust")
    with pytest.raises(ConfigError):
        normalization_from_dict({"method": "robust", "median": [0.0], "iqr": [0.0]})
    with pytest.raises(ConfigError):
        normalize(x, "robust")
