"""The simulated cohort: plausible BOLD, labels a linear FC model recovers (not perfectly), files."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest

from brainjepa.cli import main
from brainjepa.data import open_cohort
from brainjepa.errors import ConfigError
from brainjepa.synthetic import make_connectome, simulate_cohort, write_cohort


@pytest.fixture(scope="module")
def sim():
    return simulate_cohort(n_subjects=80, n_rois=40, tr=0.72, minutes=5, seed=0)


def fc_upper(sim):
    iu = np.triu_indices(len(sim.roi_labels), 1)
    return np.stack([np.arctanh(np.clip(np.corrcoef(x)[iu], -0.999, 0.999)) for x in sim.timeseries])


def test_shapes_labels_and_determinism(sim):
    assert len(sim.timeseries) == 80 and sim.timeseries[0].shape == (40, round(5 * 60 / 0.72))
    assert all(x.dtype == np.float32 and np.isfinite(x).all() for x in sim.timeseries)
    assert sim.labels["age"].dtype == np.float64 and 20 <= sim.labels["age"].min() < sim.labels["age"].max() <= 80
    assert set(np.unique(sim.labels["patient"])) == {0, 1}
    assert set(np.unique(sim.labels["site"])) == {0, 1, 2}
    assert sim.networks.shape == (40,) and len(sim.roi_labels) == 40 and sim.coords.shape == (40, 3)
    again = simulate_cohort(n_subjects=3, n_rois=40, minutes=1, seed=0)
    other = simulate_cohort(n_subjects=3, n_rois=40, minutes=1, seed=1)
    np.testing.assert_array_equal(again.timeseries[2], simulate_cohort(3, 40, minutes=1, seed=0).timeseries[2])
    assert not np.allclose(again.timeseries[0], other.timeseries[0])
    with pytest.raises(ConfigError):
        simulate_cohort(n_subjects=0)
    with pytest.raises(ConfigError, match="patient_network"):
        simulate_cohort(2, 20, minutes=1, n_networks=3)


def test_connectome_is_modular_symmetric_and_distance_dependent():
    coords, networks, w = make_connectome(60, 6, np.random.default_rng(0))
    np.testing.assert_allclose(w, w.T)
    assert np.all(np.diag(w) == 0) and np.all(w >= 0)
    assert np.bincount(networks).min() >= 4  # balanced, no empty network
    for n_rois in (14, 32, 33, 101):  # every network has members whatever the sizes
        nets = make_connectome(n_rois, 7, np.random.default_rng(1))[1]
        assert np.bincount(nets, minlength=7).min() >= 2
    np.testing.assert_array_equal(networks[:30], networks[30:])  # bilateral networks
    same = networks[:, None] == networks[None, :]
    off = ~np.eye(60, dtype=bool)
    assert w[same & off].mean() > 2 * w[~same].mean()
    d = np.linalg.norm(coords[:, None] - coords[None], axis=2)
    near, far = (d < 30) & off & ~same, (d > 100) & ~same
    assert w[near].mean() > 3 * w[far].mean()


def test_bold_is_slow_and_networks_show_in_fc(sim):
    x = sim.timeseries[0]
    x = x - x.mean(axis=1, keepdims=True)
    power = np.abs(np.fft.rfft(x, axis=1)) ** 2
    freqs = np.fft.rfftfreq(x.shape[1], d=sim.tr)
    assert power[:, freqs < 0.1].sum() > 0.5 * power.sum()  # resting-state BOLD is slow
    fc = np.mean([np.corrcoef(s) for s in sim.timeseries], axis=0)
    same = sim.networks[:, None] == sim.networks[None, :]
    off = ~np.eye(len(fc), dtype=bool)
    assert fc[same & off].mean() > fc[~same].mean() + 0.1
    # the latents act in the intended direction
    within = sim.networks == sim.network_names.index("Default")
    dmn = np.array([np.corrcoef(s[within])[np.triu_indices(within.sum(), 1)].mean() for s in sim.timeseries])
    assert dmn[sim.labels["patient"] == 1].mean() < dmn[sim.labels["patient"] == 0].mean()
    mean_fc = np.array([np.corrcoef(s)[np.triu_indices(len(fc), 1)].mean() for s in sim.timeseries])
    assert np.corrcoef(mean_fc, sim.labels["age"])[0, 1] < -0.2  # coupling falls with age


def test_fc_baseline_recovers_labels_above_chance_below_ceiling(sim):
    pytest.importorskip("sklearn")
    from scipy.stats import pearsonr
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = fc_upper(sim)
    y = sim.labels
    ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(0, 6, 13)))
    pred = cross_val_predict(ridge, X, y["age"], cv=KFold(5, shuffle=True, random_state=0))
    r = pearsonr(pred, y["age"])[0]
    assert 0.25 < r < 0.9, r
    for label in ("patient", "site"):
        chance = np.bincount(y[label]).max() / len(y[label])
        logistic = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acc = cross_val_score(logistic, X, y[label], cv=StratifiedKFold(5, shuffle=True, random_state=0)).mean()
        assert chance + 0.1 < acc < 0.95, (label, acc, chance)


def test_write_cohort_mixed_exercises_every_reader(tmp_path):
    small = simulate_cohort(n_subjects=9, n_rois=20, minutes=1, seed=3)
    manifest = write_cohort(small, tmp_path, fmt="mixed")
    rows = list(csv.DictReader(open(manifest)))
    assert [r["subject"] for r in rows] == small.subjects
    kinds = {r["path"].split("_")[-1] for r in rows}
    assert {
        "timeseries.tsv",
        "parcellated.csv.gz",
        "bold.npy",
        "bold.npz",
        "bold.mat",
        "bold.h5",
        "bold.nii.gz",
    } <= kinds
    assert any("_seg-" in r["path"] for r in rows) and any("_atlas-" in r["path"] for r in rows)
    assert [r["tr"] for r in rows if r["path"].endswith(".csv.gz")] == ["0.72"]
    c = open_cohort(manifest)
    assert len(c) == 9 and c.roi_labels == small.roi_labels
    for i in range(9):
        np.testing.assert_allclose(c.series(i), small.timeseries[i], rtol=1e-5)
        assert c.tr(i) == pytest.approx(0.72)
    np.testing.assert_array_equal(c.labels["patient"], small.labels["patient"])
    np.testing.assert_allclose(c.labels["age"], small.labels["age"])
    rois = list(csv.DictReader(open(tmp_path / "rois.tsv"), delimiter="\t"))
    assert [r["name"] for r in rois] == small.roi_labels
    with pytest.raises(ConfigError):
        write_cohort(small, tmp_path / "x", fmt="xls")


def test_to_cohort_and_cli_simulate(tmp_path, capsys):
    small = simulate_cohort(n_subjects=4, n_rois=16, minutes=1, seed=1)
    c = small.to_cohort()
    assert c.subjects == small.subjects and c.tr(0) == 0.72 and c.roi_labels == small.roi_labels
    np.testing.assert_array_equal(c.labels["site"], small.labels["site"])
    assert (
        main(
            [
                "simulate",
                "--subjects",
                "4",
                "--rois",
                "16",
                "--minutes",
                "1",
                "--format",
                "npy",
                "--seed",
                "1",
                "--out",
                str(tmp_path / "sim"),
            ]
        )
        == 0
    )
    assert "simulated 4 subjects x 16 ROIs" in capsys.readouterr().out
    cohort = open_cohort(tmp_path / "sim")  # the folder's manifest.csv
    assert len(cohort) == 4 and set(cohort.labels) == {"age", "patient", "site"}
    np.testing.assert_allclose(cohort.series(1), small.timeseries[1])


def test_labels_are_not_readable_from_raw_intensity_offsets():
    """The simulator's scanner baselines are drawn independently of every label, so a probe on
    the per-scan ROI means (what robust scaling without per-scan centring leaves in) is at
    chance, while the fluctuations themselves (per-ROI amplitude of percent signal change) carry
    the labels."""
    from brainjepa.evaluate import ClosedFormProbe, classification_metrics, regression_metrics, split_indices

    sim = simulate_cohort(150, 16, tr=2.0, minutes=4.0, seed=3)
    offsets = np.stack([x.mean(axis=1) for x in sim.timeseries])
    amplitude = np.stack([np.log((x / x.mean(axis=1, keepdims=True)).std(axis=1)) for x in sim.timeseries])
    age, patient = sim.labels["age"], sim.labels["patient"]

    def scores(features):
        r, auc = [], []
        for seed in range(3):
            sp = split_indices(age, "regression", seed)
            p = ClosedFormProbe("regression").fit(features[sp.train], age[sp.train], features[sp.val], age[sp.val])
            r.append(regression_metrics(age[sp.test], p.predict(features[sp.test]))["pearson_r"])
            sp = split_indices(patient, "classification", seed)
            p = ClosedFormProbe("classification").fit(
                features[sp.train], patient[sp.train], features[sp.val], patient[sp.val], n_classes=2
            )
            proba = p.predict_proba(features[sp.test])
            auc.append(classification_metrics(patient[sp.test], proba.argmax(1), proba)["auroc"])
        return np.mean(r), np.mean(auc)

    r_off, auc_off = scores(offsets)
    r_amp, auc_amp = scores(amplitude)
    assert abs(r_off) < 0.25 and abs(auc_off - 0.5) < 0.15
    assert auc_amp > 0.65 and auc_amp > auc_off + 0.15  # measured 0.71 vs 0.46
