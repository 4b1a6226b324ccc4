"""Brain states: task blocks in the simulator, per-scan normalisation, window-level decoding,
and the objectives that keep the variance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from brainjepa.bundle import BrainJEPA
from brainjepa.cli import main
from brainjepa.data import WindowDataset, open_cohort
from brainjepa.errors import ConfigError, DataError
from brainjepa.evaluate import random_init_like
from brainjepa.evaluate.states import (
    cohort_states,
    events_states,
    probe_states,
    probe_windows,
    scan_scaled,
    state_labels,
    subject_split,
    window_features,
    window_states,
)
from brainjepa.masking import SpatiotemporalMasker
from brainjepa.model import ModelConfig
from brainjepa.objective import sigreg_penalty, target_features, vicreg_penalty
from brainjepa.pretrain import load_config
from brainjepa.pretrain.step import Trainer
from brainjepa.synthetic import block_design, simulate_cohort, write_cohort
from brainjepa.transforms import normalize, scan_statistics

pytestmark = pytest.mark.usefixtures("one_thread")
R, TR = 24, 0.72


@pytest.fixture(scope="module")
def task_sim():
    return simulate_cohort(24, R, tr=TR, minutes=3, seed=2, task_network="DorsAttn", task_drive=0.03, task_coupling=2.0)


def model_for(n_timepoints=24, patch_size=8, scope="scan", seed=0) -> BrainJEPA:
    cfg = ModelConfig(
        n_rois=R,
        n_timepoints=n_timepoints,
        patch_size=patch_size,
        embed_dim=24,
        depth=2,
        num_heads=2,
        predictor_embed_dim=12,
        predictor_depth=1,
        predictor_num_heads=2,
        n_gradients=4,
    )
    torch.manual_seed(seed)
    g = np.random.default_rng(seed).normal(size=(R, 4))
    return BrainJEPA(cfg, g, normalization={"method": "psc", **_unit_stats(), "scope": scope}, target_tr=TR).eval()


def _unit_stats():
    return {"median": [0.0] * R, "iqr": [1.0] * R, "n_timepoints": 100}


# --------------------------------------------------------------------------- simulator


def test_block_design_alternates_within_the_block_lengths():
    rng = np.random.default_rng(0)
    on = block_design(2000, 0.5, (20.0, 60.0), rng)
    edges = np.flatnonzero(np.diff(on)) + 1
    lengths = np.diff(edges) * 0.5  # seconds of every complete block
    assert set(np.unique(on)) == {0, 1}
    assert lengths.min() >= 20.0 - 0.5 and lengths.max() <= 60.0 + 0.5
    assert (on[edges] != on[edges - 1]).all()


def test_resting_cohort_is_unchanged_by_the_task_options():
    rest = simulate_cohort(4, 16, tr=TR, minutes=1, seed=5)
    silent = simulate_cohort(4, 16, tr=TR, minutes=1, seed=5, task_network="DorsAttn")  # no drive, no gain
    assert rest.states == [] and rest.task_network is None
    assert all(np.array_equal(a, b) for a, b in zip(rest.timeseries, silent.timeseries))
    assert len(silent.states) == 4 and silent.states[0].shape == (rest.timeseries[0].shape[1],)


def test_task_blocks_raise_the_driven_networks_level(task_sim):
    task = np.array([task_sim.network_names[k] == "DorsAttn" for k in task_sim.networks])
    on, off = [], []
    for x, s in zip(task_sim.timeseries, task_sim.states):
        psc = scan_scaled(x)[task].mean(axis=0)
        lagged = np.roll(s, int(round(6 / TR)))  # the BOLD follows the neural state by ~6 s
        on.append(psc[lagged == 1].mean())
        off.append(psc[lagged == 0].mean())
    assert np.mean(on) - np.mean(off) > 0.1  # percent signal change
    assert (np.array(on) > np.array(off)).mean() > 0.8


def test_unknown_task_network_and_bad_blocks_are_errors():
    with pytest.raises(ConfigError, match="task_network"):
        simulate_cohort(2, 16, minutes=1, task_network="Nope")
    with pytest.raises(ConfigError, match="block_seconds"):
        simulate_cohort(2, 16, minutes=1, task_network="Vis", block_seconds=(30.0, 10.0))


def test_window_states_majority_and_purity():
    states = np.array([0] * 10 + [1] * 10, dtype=np.int8)  # frames of 1 s
    y, purity = window_states(states, 1.0, [0.0, 7.0, 10.0, 6.0], 8.0, lag=0.0)
    assert y.tolist() == [0, 1, 1, 0] and purity.tolist() == [1.0, 0.625, 1.0, 0.5]  # a tie is rest
    y, _ = window_states(states, 1.0, [4.0], 8.0, lag=6.0)  # the state shows 6 s later
    assert y.tolist() == [0]


# --------------------------------------------------------------------------- normalisation scope


def test_scope_scan_keeps_a_windows_level_and_scope_window_removes_it():
    rng = np.random.default_rng(0)
    x = 500 + rng.normal(size=(R, 96)).astype(np.float32)
    x[:, 48:] += 5.0  # the second half is 1% higher
    for scope, expect_gap in (("scan", True), ("window", False)):
        w, _ = model_for(48, 8, scope).prepare_windows(x, tr=TR)
        gap = float(w[1].mean() - w[0].mean())
        assert (gap > 0.9) == expect_gap and (abs(gap) < 1e-3) != expect_gap, (scope, gap)
    # the scan's statistics are those of the whole scan
    mean, std = scan_statistics(x)
    np.testing.assert_allclose(mean[:, 0], x.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(normalize(x[:, :48], "zscore", None, (mean, std)), (x[:, :48] - mean) / std, atol=1e-4)


def test_training_windows_match_inference_windows_in_scope_scan():
    rng = np.random.default_rng(1)
    x = 500 + rng.normal(size=(R, 96)).astype(np.float32)
    model = model_for(48, 8, "scan")
    scaler = model.normalization
    from brainjepa.transforms import RobustScaler

    ds = WindowDataset(
        open_cohort([x], tr=TR),
        48,
        target_tr=TR,
        train=False,
        normalization="psc",
        scaler=RobustScaler.from_dict(scaler),
        scope="scan",
    )
    start = ds.start(0)
    expected = normalize(x[:, start : start + 48], "psc", RobustScaler.from_dict(scaler), scan_statistics(x))
    np.testing.assert_allclose(ds.window(0), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="scope"):
        WindowDataset(open_cohort([x], tr=TR), 48, normalization="psc", scope="subject")


def test_config_scope_key_is_checked():
    assert load_config("tiny")["data"]["normalization_scope"] == "scan"
    with pytest.raises(ConfigError, match="normalization_scope"):
        load_config("tiny", ["data.normalization_scope=subject"])


# --------------------------------------------------------------------------- window-level decoding


def test_subject_split_is_a_partition():
    train, val, test = subject_split(20, seed=3)
    assert len(train) == 12 and len(val) == 4 and len(test) == 4
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(20))
    with pytest.raises(DataError, match="at least 3"):
        subject_split(2, 0)


def test_window_features_cover_every_window_with_the_baselines(task_sim):
    model = model_for()
    feats, scan, start = window_features({"brainjepa": model}, task_sim.timeseries[:3], TR, readouts=("mean", "fc"))
    n = task_sim.timeseries[0].shape[1]
    per_scan = -(-n // 24)
    assert len(scan) == 3 * per_scan and np.bincount(scan).tolist() == [per_scan] * 3
    assert start[0] == 0 and start[per_scan - 1] == pytest.approx((n - 24) * TR, abs=TR)
    assert feats["brainjepa:mean"].shape == (len(scan), 24)
    assert feats["fc_window"].shape == (len(scan), R * (R - 1) // 2)
    assert feats["level"].shape == feats["amplitude"].shape == (len(scan), R)
    # the level baseline is the window's mean relative to its scan
    x = scan_scaled(task_sim.timeseries[0])
    np.testing.assert_allclose(feats["level"][1], x[:, int(round(start[1] / TR)) :][:, :24].mean(axis=1), atol=1e-4)


def test_probe_states_decodes_task_blocks_next_to_every_reference(task_sim):
    model = model_for()
    res = probe_states(
        model,
        task_sim.timeseries,
        task_sim.states,
        tr=TR,
        seeds=3,
        readouts=("mean", "roi"),
        random_init_seeds=2,
        progress=False,
    )
    methods = {r["method"] for r in res.records}
    assert {
        "brainjepa:mean",
        "random_init#1:roi",
        "random_init(best):roi",
        "fc_window",
        "amplitude",
        "level",
    } <= methods
    auroc = {row["method"]: row["mean"] for row in res.rows if row["metric"] == "auroc"}
    assert auroc["level"] > 0.7  # the drive is strong here: the level decodes the state
    baselines = {c["baseline"] for c in res.comparisons if c["method"] == "brainjepa:roi"}
    assert {"random_init(best):roi", "level", "fc_window", "amplitude"} <= baselines


def test_probe_states_min_purity_probes_only_the_pure_windows(task_sim, monkeypatch):
    model = model_for()
    series = task_sim.timeseries[:6]
    features = window_features({"brainjepa": model}, series, TR, readouts=("mean",))
    _, scan, start = features
    _, purity = state_labels(task_sim.states[:6], TR, scan, start, 24 * TR, 6.0)
    seen = {}

    def spy(feats, y, subject, *, seeds, target, progress):
        seen.update(n=len(y), rows={k: len(v) for k, v in feats.items()}, subjects=len(subject), target=target)
        raise StopIteration

    monkeypatch.setattr("brainjepa.evaluate.states.probe_windows", spy)
    with pytest.raises(StopIteration):
        probe_states(model, series, task_sim.states[:6], tr=TR, features=features, min_purity=0.9, target="pure")
    n = int((purity >= 0.9).sum())
    assert 0 < n < len(purity)  # the cohort has both kinds of window
    assert seen["n"] == seen["subjects"] == n and set(seen["rows"].values()) == {n} and seen["target"] == "pure"
    with pytest.raises(ConfigError, match="min_purity"):
        probe_states(model, series, task_sim.states[:6], tr=TR, features=features, min_purity=1.5)
    flicker = [np.arange(s.shape[0]) // 2 % 2 for s in task_sim.states[:6]]  # a state change every 2 frames
    with pytest.raises(DataError, match="no window has 95%"):
        probe_states(model, series, flicker, tr=TR, features=features, min_purity=0.95)


def test_probe_windows_keeps_subjects_apart(monkeypatch):
    seen = []

    class Spy:
        def fit(self, X, y, Xv, yv, n_classes=None):
            seen.append((set(X[:, 0].tolist()), set(Xv[:, 0].tolist())))

        def predict_proba(self, X):
            seen[-1] += (set(X[:, 0].tolist()),)
            return np.full((len(X), 2), 0.5)

    monkeypatch.setattr("brainjepa.evaluate.states.make_probe", lambda *a, **k: Spy())
    subject = np.repeat(np.arange(10), 4)
    X = subject[:, None].astype(float)  # the feature is the subject id
    probe_windows({"m": X}, np.tile([0, 1], 20), subject, seeds=2, progress=False)
    for train, val, test in seen:
        assert not (train & val or train & test or val & test)
    with pytest.raises(DataError, match="same state"):
        probe_windows({"m": X}, np.zeros(40, dtype=int), subject, progress=False)


def test_state_labels_read_each_scans_own_states():
    states = [np.array([0] * 20 + [1] * 20), np.array([1] * 40)]
    y, purity = state_labels(states, 1.0, np.array([0, 0, 1]), np.array([0.0, 26.0, 0.0]), 10.0, lag=0.0)
    assert y.tolist() == [0, 1, 1] and purity.tolist() == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------- objectives


def test_variance_penalties_tell_collapse_from_a_gaussian():
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(4, 300, dtype=torch.bool)
    gauss = torch.randn(4, 300, 16, generator=g)
    collapsed = torch.randn(4, 300, 1, generator=g).expand(4, 300, 16)
    assert vicreg_penalty(gauss, valid) < 0.05 < 0.5 < vicreg_penalty(collapsed, valid)
    assert sigreg_penalty(gauss, valid, g) < 0.01 < 0.1 < sigreg_penalty(collapsed, valid, g)
    assert sigreg_penalty(0.1 * gauss, valid, g) > 0.1  # a shrunken cloud is penalised too
    # padding tokens do not count
    padded = torch.cat([gauss, torch.zeros(4, 50, 16)], 1)
    mask = torch.cat([valid, torch.zeros(4, 50, dtype=torch.bool)], 1)
    assert vicreg_penalty(padded, mask) == pytest.approx(float(vicreg_penalty(gauss, valid)), rel=1e-5)


def _trainer(**train):
    cfg = load_config("tiny", [f"train.{k}={v}" for k, v in train.items()] + ["optim.batch_size=4"])
    arch = ModelConfig(
        n_rois=R,
        n_timepoints=32,
        patch_size=8,
        embed_dim=24,
        depth=2,
        num_heads=2,
        predictor_embed_dim=12,
        predictor_depth=1,
        predictor_num_heads=2,
        n_gradients=4,
    )
    g = torch.as_tensor(np.random.default_rng(0).normal(size=(R, 4)), dtype=torch.float32)
    return Trainer(arch, g, cfg, total_steps=10)


def _batch(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(4, R, 32)
    masks = SpatiotemporalMasker(R, 4, seed=seed)(4)
    return x, masks


@pytest.mark.parametrize("name", ["vicreg", "sigreg"])
def test_regularizer_enters_the_step_and_its_record(name):
    plain, reg = _trainer(), _trainer(regularizer=name, reg_weight=5.0)
    x, masks = _batch()
    a = plain.step([(x, masks)], 0)
    b = reg.step([(x, masks)], 0)
    assert "reg" not in a and float(b["reg"]) > 0
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)  # same start, same prediction loss
    moved = [not torch.allclose(p, q) for p, q in zip(plain.encoder.parameters(), reg.encoder.parameters())]
    assert any(moved)  # the penalty's gradient reached the encoder


def test_target_layers_average_the_last_blocks():
    t = _trainer()
    x, masks = _batch()
    idx = masks.context_idx[:, :5]
    with torch.no_grad():
        one = target_features(t.target_encoder, x, idx, center=True, layers=1)
        also_one = target_features(t.target_encoder, x, idx, center=True)
        two = target_features(t.target_encoder, x, idx, center=True, layers=2)
    torch.testing.assert_close(one, also_one)
    assert not torch.allclose(one, two)
    assert two.shape == one.shape


def test_random_init_like_keeps_the_scope():
    model = model_for(scope="scan")
    assert random_init_like(model, 1).normalization["scope"] == "scan"


# --------------------------------------------------------------------------- events files and the command line


def test_events_files_round_trip_and_bad_files_are_named(tmp_path):
    sim = simulate_cohort(3, 16, tr=TR, minutes=2, seed=0, task_network="Vis", task_drive=0.01)
    manifest = write_cohort(sim, tmp_path / "data", "npy")
    cohort = open_cohort(manifest)
    assert cohort.labels["events"][0] == "sub-0001_task-blocks_events.tsv"
    for got, want in zip(cohort_states(cohort, "events"), sim.states):
        np.testing.assert_array_equal(got, want)
    bad = tmp_path / "bad_events.tsv"
    bad.write_text("start\tlength\n0\t10\n")
    with pytest.raises(DataError, match="bad_events.tsv.*onset and duration"):
        events_states(bad, 50, 1.0)
    bad.write_text("onset\tduration\ttrial_type\n0\t10\tmotor\n")
    with pytest.raises(DataError, match="line 2.*'motor'"):
        events_states(bad, 50, 1.0)
    with pytest.raises(DataError, match="no column 'events2'"):
        cohort_states(cohort, "events2")


def test_probe_states_on_the_command_line(tmp_path, capsys):
    assert (
        main(
            [
                "simulate",
                "--subjects",
                "9",
                "--rois",
                str(R),
                "--minutes",
                "2",
                "--format",
                "npy",
                "--task-network",
                "DorsAttn",
                "--task-drive",
                "0.03",
                "--out",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    model_for().save_pretrained(tmp_path / "m")
    out = tmp_path / "r.json"
    args = [
        "-q",
        "probe",
        "--model",
        str(tmp_path / "m"),
        "--data",
        str(tmp_path / "d" / "manifest.csv"),
        "--states",
        "events",
        "--seeds",
        "2",
        "--readout",
        "mean",
        "--random-init-seeds",
        "1",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows if r["target"] == "state"} >= {"brainjepa:mean", "level", "fc_window"}
    assert "state" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="min_purity must lie in"):
        main(["--debug", *args[1:], "--state-min-purity", "1.5"])
    with pytest.raises(ConfigError, match="--target COLUMN"):
        main(["--debug", "probe", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d" / "manifest.csv")])
