"""Evaluation: metrics, splits, probes, baselines, protocol, embedder, attention, fine-tuning."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

sklearn = pytest.importorskip("sklearn")
from sklearn import metrics as skm  # noqa: E402
from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402

from brainjepa.bundle import BrainJEPA  # noqa: E402
from brainjepa.errors import ConfigError, DataError  # noqa: E402
from brainjepa.evaluate import (  # noqa: E402
    BASELINES,
    COMPARISON_COLUMNS,
    READOUTS,
    BNLinearProbe,
    BrainJEPAEmbedder,
    ClosedFormProbe,
    Results,
    amplitude_features,
    attention_received,
    binary_logistic,
    class_weights,
    classification_metrics,
    compare,
    comparison_rows,
    embed_cohort,
    encode_labels,
    encode_windows,
    encode_with_attention,
    fc_features,
    format_comparisons,
    format_table,
    infer_task,
    network_attention,
    network_labels_from_roi_names,
    present_mask,
    probe_cohort,
    probe_features,
    probe_method_names,
    random_init_like,
    random_init_summaries,
    read_networks,
    readout_features,
    regression_metrics,
    roc_auc,
    roi_attention,
    run_protocol,
    split_from_column,
    split_indices,
    token_index,
    window_fc,
)
from brainjepa.evaluate.finetune import (  # noqa: E402
    FineTuner,
    finetune_cohort,
    layer_id,
    make_optimizer,
    param_groups,
    set_drop_path,
)
from brainjepa.evaluate.training import make_loss, predict_batches, train_keep_best  # noqa: E402
from brainjepa.model import BrainEncoder, ModelConfig  # noqa: E402
from brainjepa.schedules import warmup_cosine  # noqa: E402
from brainjepa.synthetic import simulate_cohort  # noqa: E402
from brainjepa.transforms import zscore  # noqa: E402

R, T_MODEL = 16, 32


def small_model(seed: int = 0, roi_labels=None, **kw) -> BrainJEPA:
    cfg = ModelConfig(
        n_rois=R,
        n_timepoints=T_MODEL,
        embed_dim=24,
        depth=3,
        num_heads=2,
        predictor_embed_dim=12,
        predictor_depth=1,
        predictor_num_heads=2,
        n_gradients=4,
        **kw,
    )
    torch.manual_seed(seed)
    g = np.random.default_rng(seed).normal(size=(R, 4))
    return BrainJEPA(
        cfg,
        g,
        normalization={"method": "zscore"},
        target_tr=1.44,
        roi_labels=roi_labels or [f"roi{i}" for i in range(R)],
    ).eval()


@pytest.fixture(scope="module")
def sim():
    return simulate_cohort(n_subjects=30, n_rois=R, tr=0.72, minutes=1.5, seed=1)


# --------------------------------------------------------------------------- metrics


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = np.clip(0.3 * y + rng.random(60) * 0.8, 0, 1)
    proba = np.stack([1 - s, s], 1)
    m = classification_metrics(y, proba.argmax(1), proba)
    pred = proba.argmax(1)
    assert m["acc"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, pos_label=1))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, s))
    # ties in scores count one half
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.1, 0.9])) == pytest.approx(0.875)
    assert np.isnan(roc_auc(np.ones(4), np.arange(4.0)))

    y3 = rng.integers(0, 3, 90)
    p3 = rng.dirichlet([1, 1, 1], 90)
    p3[np.arange(90), y3] += 0.3
    p3 /= p3.sum(1, keepdims=True)
    m3 = classification_metrics(y3, p3.argmax(1), p3)
    assert m3["f1"] == pytest.approx(skm.f1_score(y3, p3.argmax(1), average="macro"))
    assert m3["auroc"] == pytest.approx(skm.roc_auc_score(y3, p3, multi_class="ovr"))


def test_regression_metrics_match_sklearn_and_scipy():
    rng = np.random.default_rng(1)
    a = rng.normal(size=50)
    b = a + rng.normal(size=50)
    m = regression_metrics(a, b)
    assert m["mse"] == pytest.approx(skm.mean_squared_error(a, b))
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(a, b))
    assert m["r2"] == pytest.approx(skm.r2_score(a, b))
    assert m["pearson_r"] == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert np.isnan(regression_metrics(a, np.ones(50))["pearson_r"])


# --------------------------------------------------------------------------- labels and splits


def test_task_inference_and_label_encoding():
    assert infer_task([0, 1, 1, 0]) == "classification"
    assert infer_task(np.array(["ctl", "pat", "ctl"], dtype=object)) == "classification"
    assert infer_task(np.linspace(20, 80, 30)) == "regression"
    assert infer_task(np.arange(20, 45)) == "regression"  # integer ages: many values
    y, classes = encode_labels(np.array([1, 0, 1, 1]), "classification")
    assert classes == [0, 1] and y.tolist() == [1, 0, 1, 1]  # 1 stays the positive class
    y, classes = encode_labels(np.array(["pat", "ctl", "pat"], dtype=object), "classification")
    assert classes == ["ctl", "pat"] and y.tolist() == [1, 0, 1]
    with pytest.raises(DataError, match="non-numeric"):
        encode_labels(np.array(["a", "b"], dtype=object), "regression", "dx")
    with pytest.raises(DataError, match="single class"):
        encode_labels(np.array([1, 1, 1]), "classification")
    assert present_mask(np.array([1.0, np.nan, 3.0])).tolist() == [True, False, True]
    assert present_mask(np.array(["a", "", "NA", "b"], dtype=object)).tolist() == [True, False, False, True]


def test_stratified_split_sizes_disjoint_and_seeded():
    y = np.array([0] * 70 + [1] * 30)
    sp = split_indices(y, "classification", seed=3)
    parts = [sp.train, sp.val, sp.test]
    assert [len(p) for p in parts] == [60, 20, 20]
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    for p in parts:  # class proportions preserved in every split
        assert y[p].mean() == pytest.approx(0.3)
    again = split_indices(y, "classification", seed=3)
    assert np.array_equal(again.test, sp.test)
    assert not np.array_equal(split_indices(y, "classification", seed=4).test, sp.test)
    reg = split_indices(np.random.default_rng(0).normal(size=50), "regression", seed=0)
    assert [len(reg.train), len(reg.val), len(reg.test)] == [30, 10, 10]
    with pytest.raises(DataError, match="at least 3 per class"):
        split_indices(np.array([0] * 10 + [1] * 2), "classification", 0)


def test_user_split_column():
    sp = split_from_column(["train", "test", "validation", "train", "val"])
    assert sp.train.tolist() == [0, 3] and sp.val.tolist() == [2, 4] and sp.test.tolist() == [1]
    with pytest.raises(DataError, match="use train / val / test"):
        split_from_column(["train", "dev", "test"])
    with pytest.raises(DataError, match="no subject to 'test'"):
        split_from_column(["train", "val"])


# --------------------------------------------------------------------------- features and probes


def test_fc_features_are_fisher_z_upper_triangle():
    rng = np.random.default_rng(0)
    series = [rng.normal(size=(5, 40)).astype(np.float32) for _ in range(3)]
    f = fc_features(series)
    assert f.shape == (3, 10)
    iu = np.triu_indices(5, k=1)
    np.testing.assert_allclose(f[1], np.arctanh(np.corrcoef(series[1])[iu]), atol=1e-5)
    bad = series[0].copy()
    bad[2] = 1.0
    with pytest.raises(DataError, match="constant"):
        fc_features([bad])


def test_closed_form_ridge_matches_sklearn_at_chosen_alpha():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 20)) * rng.uniform(0.5, 5, 20) + 3
    y = X @ rng.normal(size=20) + rng.normal(size=90) * 4 + 50
    tr, va = np.arange(60), np.arange(60, 90)
    probe = ClosedFormProbe("regression").fit(X[tr], y[tr], X[va], y[va])
    Xs = (X - X[tr].mean(0)) / X[tr].std(0)
    t = (y[tr] - y[tr].mean()) / y[tr].std()
    ref = Ridge(alpha=probe.alpha_).fit(Xs[tr], t)
    np.testing.assert_allclose(probe.predict(X[va]), ref.predict(Xs[va]) * y[tr].std() + y[tr].mean(), rtol=1e-6)
    # the chosen strength really is the best on validation
    losses = []
    for rel in probe.grid:
        alt = ClosedFormProbe("regression", grid=[rel]).fit(X[tr], y[tr], X[va], y[va])
        losses.append(alt.val_loss_)
    assert probe.val_loss_ == pytest.approx(min(losses))
    assert regression_metrics(y[va], probe.predict(X[va]))["pearson_r"] > 0.8


def test_closed_form_logistic_matches_sklearn_and_learns():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 15))
    y = (X[:, :3].sum(1) + 0.5 * rng.normal(size=120) > 0).astype(int)
    tr, va, te = np.arange(70), np.arange(70, 95), np.arange(95, 120)
    probe = ClosedFormProbe("classification").fit(X[tr], y[tr], X[va], y[va])
    mean, std = X[tr].mean(0), X[tr].std(0)
    # the reference solved to a tight tolerance: the probe is exact, not just as close as lbfgs
    ref = LogisticRegression(C=1 / probe.alpha_, max_iter=10000, tol=1e-12).fit((X[tr] - mean) / std, y[tr])
    np.testing.assert_allclose(probe.predict_proba(X[te]), ref.predict_proba((X[te] - mean) / std), atol=1e-6)
    # balanced class weights, and a weakly regularised fit (where lbfgs stops early)
    yb = (X[:, 0] > 0.7).astype(int)
    for C in (1e3, 0.05):
        w, b = binary_logistic(X[tr], yb[tr].astype(float), C, class_weights(yb[tr], 2)[yb[tr]])
        ref = LogisticRegression(C=C, class_weight="balanced", max_iter=100000, tol=1e-12).fit(X[tr], yb[tr])
        np.testing.assert_allclose(w, ref.coef_[0], atol=1e-4 * max(1, np.abs(ref.coef_).max()))
        np.testing.assert_allclose(b, ref.intercept_[0], atol=1e-4 * max(1, abs(ref.intercept_[0])))
    proba = probe.predict_proba(X[te])
    assert classification_metrics(y[te], proba.argmax(1), proba)["auroc"] > 0.9
    with pytest.raises(ConfigError):
        ClosedFormProbe("regression").fit(X[tr], y[tr] * 1.0, X[va], y[va] * 1.0).predict_proba(X[te])


def test_closed_form_logistic_with_more_features_than_subjects_matches_sklearn():
    # fitted on the n x n row-space coordinates: must be the full-feature solution
    rng = np.random.default_rng(4)
    X = rng.normal(size=(50, 400))
    y = (X[:, :4].sum(1) + rng.normal(size=50) > 0).astype(int)
    tr, va = np.arange(30), np.arange(30, 50)
    probe = ClosedFormProbe("classification", grid=[0.1]).fit(X[tr], y[tr], X[va], y[va])
    mean, std = X[tr].mean(0), X[tr].std(0)
    ref = LogisticRegression(C=1 / probe.alpha_, max_iter=5000, tol=1e-10).fit((X[tr] - mean) / std, y[tr])
    np.testing.assert_allclose(probe.predict_proba(X[va]), ref.predict_proba((X[va] - mean) / std), atol=1e-6)
    np.testing.assert_allclose(probe.coef_[:, 1], ref.coef_[0], atol=1e-5)
    assert np.abs(ref.coef_).max() > 0.01  # a real model, not all zeros


def test_wide_features_take_the_gram_route_and_warm_starts_change_nothing():
    from sklearn.linear_model import Ridge

    from brainjepa.evaluate.probes import _thin_svd

    rng = np.random.default_rng(5)
    X = rng.normal(size=(40, 300)) @ np.diag(np.linspace(0.1, 3, 300))
    U, s, Vt = _thin_svd(X - X.mean(0))  # centred: rank 39, the null direction is dropped
    assert len(s) == 39 and np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(s, np.linalg.svd(X - X.mean(0), compute_uv=False)[:39], rtol=1e-9)
    np.testing.assert_allclose((U * s) @ Vt, X - X.mean(0), atol=1e-9)
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(39), atol=1e-9)
    # ridge on wide features: the same solution as scikit-learn's at the chosen alpha
    t = X[:, :3].sum(1) + 0.1 * rng.normal(size=40)
    probe = ClosedFormProbe("regression").fit(X[:25], t[:25], X[25:], t[25:])
    mean, std = X[:25].mean(0), X[:25].std(0)
    ref = Ridge(alpha=probe.alpha_).fit((X[:25] - mean) / std, t[:25])
    np.testing.assert_allclose(probe.predict(X[25:]), ref.predict((X[25:] - mean) / std), atol=1e-8)
    # a Newton solve started from a neighbouring solution reaches the same optimum
    y = (t > np.median(t)).astype(float)
    near = binary_logistic(X, y, 0.3)
    cold, warm = binary_logistic(X, y, 0.1), binary_logistic(X, y, 0.1, start=near)
    np.testing.assert_allclose(warm[0], cold[0], atol=1e-8)
    assert warm[1] == pytest.approx(cold[1], abs=1e-8)


def test_bn_linear_probe_learns_and_selects_on_validation():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(100, 8)) * 10 + 5
    y = (X[:, 0] > 5).astype(int)
    probe = BNLinearProbe("classification", epochs=20, seed=0).fit(X[:60], y[:60], X[60:80], y[60:80])
    bn = probe.head_[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine
    assert probe.best_epoch_ == int(np.argmin(probe.val_losses_))
    proba = probe.predict_proba(X[80:])
    assert classification_metrics(y[80:], proba.argmax(1), proba)["acc"] >= 0.85
    yr = X[:, 1] * 3 + 100
    reg = BNLinearProbe("regression", epochs=30, seed=0).fit(X[:60], yr[:60], X[60:80], yr[60:80])
    # predictions come back in the label's units (mean ~115, not ~0)
    assert regression_metrics(yr[80:], reg.predict(X[80:]))["pearson_r"] > 0.9
    assert abs(reg.predict(X[80:]).mean() - yr[80:].mean()) < 10


def test_train_keep_best_restores_the_best_epoch():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    X, X_val = torch.randn(40, 3), torch.randn(20, 3)
    w = torch.tensor([1.0, -2.0, 0.5])
    t, t_val = X @ w, X_val @ w
    loss_fn = make_loss("regression", t.numpy(), 1, None)
    steps = []

    def lr_at(step):  # a sane rate for 3 epochs, then one that makes SGD diverge
        steps.append(step)
        return 0.1 if step < 12 else 3.0

    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    history = train_keep_best(
        net, opt, loss_fn, X, t, X_val, t_val, epochs=6, n_batches=4, lr_at=lr_at, generator=torch.Generator()
    )
    assert steps == list(range(24))  # the rate is set before every step, counted over epochs
    assert len(history.train_losses) == len(history.val_losses) == 6
    assert history.val_losses[5] > history.val_losses[2]  # diverged: the last epoch is not the best
    assert history.best_epoch == int(np.argmin(history.val_losses)) <= 2
    assert not net.training
    # the weights kept are those of the best epoch: its validation loss, recomputed
    val = float(loss_fn(predict_batches(net, X_val, batch_size=7), t_val, weighted=False))
    assert val == pytest.approx(history.val_losses[history.best_epoch], rel=1e-6)


def test_class_weights_balanced():
    w = class_weights(np.array([0, 0, 0, 1]), 2)
    np.testing.assert_allclose(w, [4 / 6, 2.0])


# --------------------------------------------------------------------------- protocol


class _Spy:
    """Estimator recording what it was fitted and evaluated on."""

    log: list = []

    def __init__(self, name, seed):
        self.name, self.seed = name, seed

    def fit(self, X, y, Xv, yv, n_classes=None):
        _Spy.log.append(("fit", self.name, self.seed, tuple(X[:, 0]), tuple(Xv[:, 0])))
        return self

    def predict_proba(self, X):
        _Spy.log.append(("test", self.name, self.seed, tuple(X[:, 0])))
        return np.tile([0.4, 0.6], (len(X), 1))


def test_protocol_same_splits_test_once_and_summary():
    _Spy.log = []
    y = np.array([0, 1] * 15)
    X = np.arange(30.0)[:, None]
    methods = {m: (lambda seed, m=m: _Spy(m, seed), X) for m in ("a", "b")}
    res = run_protocol(y, methods, target="dx", task="classification", seeds=3, progress=False)
    tests = [e for e in _Spy.log if e[0] == "test"]
    assert len(tests) == 6  # once per method and seed
    for seed in range(3):
        a, b = (
            [e for e in _Spy.log if e[2] == seed and e[1] == "a"],
            [e for e in _Spy.log if e[2] == seed and e[1] == "b"],
        )
        assert [e[3:] for e in a] == [e[3:] for e in b]  # identical train/val/test for both methods
        fit, test = a
        assert not set(fit[3]) & set(test[3]) and not set(fit[4]) & set(test[3])
    rows = res.rows
    assert len(rows) == 2 * 4 and {r["n_seeds"] for r in rows} == {3}
    acc = [r for r in rows if r["method"] == "a" and r["metric"] == "acc"][0]
    vals = [r["value"] for r in res.records if r["method"] == "a" and r["metric"] == "acc"]
    assert acc["mean"] == pytest.approx(np.mean(vals)) and acc["std"] == pytest.approx(np.std(vals, ddof=1))
    assert acc["mean"] == pytest.approx(0.5)  # always predicting class 1 on stratified halves
    auroc = [r for r in rows if r["metric"] == "auroc"][0]
    assert auroc["mean"] == pytest.approx(0.5) and auroc["std"] == 0.0


def test_results_json_and_table(tmp_path):
    res = Results(
        [
            {"method": "brainjepa", "target": "age", "seed": s, "metric": "pearson_r", "value": v}
            for s, v in enumerate([0.5, 0.7, float("nan")])
        ]
    )
    path = res.save(tmp_path / "r.json")
    saved = json.loads(path.read_text())
    assert saved["comparisons"] == []
    rows = saved["rows"]
    assert rows == [
        {
            "method": "brainjepa",
            "target": "age",
            "metric": "pearson_r",
            "mean": 0.6,
            "std": pytest.approx(np.std([0.5, 0.7], ddof=1)),
            "n_seeds": 2,
        }
    ]
    # one block per target: the NaN seed left out of n_seeds, mean and sample std
    assert format_table(res.rows) == (
        "age (n_seeds=2)  r\n---------------  -------------\nbrainjepa        0.600 ± 0.141\n"
    )


# --------------------------------------------------------------------------- embedder and baselines


def test_embedder_shapes_determinism_and_tokens(sim):
    model = small_model()
    X = sim.timeseries[:5]
    emb = BrainJEPAEmbedder(model, windows="center", batch_size=2).fit().transform(X, tr=0.72)
    assert emb.shape == (5, 24) and emb.dtype == np.float32
    np.testing.assert_allclose(
        emb, BrainJEPAEmbedder(model, windows="center", batch_size=5).transform(X, tr=[0.72] * 5), atol=1e-5
    )
    with torch.no_grad():
        windows = torch.stack([model.prepare(x, tr=0.72) for x in X])
        np.testing.assert_allclose(emb, model.embed(windows).numpy(), atol=1e-5)
        # every window (the default): the mean readout averaged over the subject's windows
        every = BrainJEPAEmbedder(model, batch_size=3).transform(X, tr=0.72)
        for i in (0, 4):
            w, p = model.prepare_windows(X[i], tr=0.72)
            assert len(w) == 2 and p == T_MODEL // 16
            np.testing.assert_allclose(every[i], model.embed(w).mean(0).numpy(), atol=1e-5)
        assert not np.allclose(every, emb, atol=1e-3)
        tok = BrainJEPAEmbedder(model, tokens=True).transform(X, tr=0.72)
        assert tok.shape == (5, R, T_MODEL // 16, 24)
        np.testing.assert_allclose(tok[:, 3, 1], model.encode(windows)[:, 3 * 2 + 1].numpy(), atol=1e-5)
    with pytest.raises(DataError, match="repetition times"):
        BrainJEPAEmbedder(model).transform(X, tr=[0.72, 0.72])
    with pytest.raises(ConfigError, match="windows='center'"):
        BrainJEPAEmbedder(model, tokens=True, windows="all")
    with pytest.raises(ConfigError, match="readouts must be among"):
        BrainJEPAEmbedder(model, readout="max")


def test_prepare_windows_tiles_the_scan():
    model = small_model()  # TR 1.44, zscore, windows of 32 frames
    x = np.random.default_rng(0).normal(size=(R, 75)).astype(np.float32) * 3 + 1
    w, p = model.prepare_windows(x, tr=1.44)
    # ceil(75 / 32) = 3 windows starting at 0, round(21.5) = 22 and 75 - 32 = 43
    assert w.shape == (3, R, T_MODEL) and w.dtype == torch.float32 and p == 2
    for k, start in enumerate((0, 22, 43)):
        np.testing.assert_allclose(w[k].numpy(), zscore(x[:, start : start + T_MODEL]), atol=1e-5)
    assert model.prepare_windows(x[:, :64], tr=1.44)[0].shape[0] == 2  # exact multiple: no overlap
    np.testing.assert_allclose(
        model.prepare_windows(x[:, :32], tr=1.44)[0][0].numpy(), model.prepare(x[:, :32], tr=1.44).numpy()
    )
    # resampled first (0.72 s -> 1.44 s), exactly as prepare does
    w2, _ = model.prepare_windows(x, tr=0.72)
    assert len(w2) == 2  # 75 frames at 0.72 s span 38 frames at 1.44 s
    np.testing.assert_allclose(w2[0].numpy(), model.prepare(x, tr=0.72, window="start").numpy(), atol=1e-6)
    # a scan shorter than a window: one window, the real frames normalised alone, then zeros
    short, p = model.prepare_windows(x[:, :20], tr=1.44)
    assert short.shape == (1, R, T_MODEL) and p == 1
    np.testing.assert_allclose(short[0, :, :20].numpy(), zscore(x[:, :20]), atol=1e-5)
    assert not short[0, :, 20:].any()
    with pytest.raises(DataError, match="fewer than one time patch"):
        model.prepare_windows(x[:, :10], tr=1.44)
    with pytest.raises(DataError, match="R=16"):
        model.prepare_windows(x[:5], tr=1.44)


def test_short_scan_is_encoded_on_its_valid_patches_only():
    model = small_model()
    x = np.random.default_rng(1).normal(size=(R, 20)).astype(np.float32)
    w, p = model.prepare_windows(x, tr=1.44)
    idx = token_index(R, T_MODEL // 16, p)
    assert idx.tolist() == [r * 2 for r in range(R)]  # patch 0 of every ROI, ROI-major
    with torch.no_grad():
        direct = model.encoder(w, token_idx=idx[None])  # (1, R * p, D)
        h = encode_windows(model, w, p)
        assert h.shape == (1, R, 1, 24)
        torch.testing.assert_close(h.reshape(1, R, -1), direct)
        # the padding takes no part: other values there change nothing
        w_noisy = w.clone()
        w_noisy[:, :, 16:] = torch.randn(R, T_MODEL - 16)
        torch.testing.assert_close(encode_windows(model, w_noisy, p), h)
        emb = BrainJEPAEmbedder(model, readout="roi").transform([x], tr=1.44)
        np.testing.assert_allclose(emb[0], readout_features(h[0], "roi").numpy(), atol=1e-6)
        # a short and a full scan in one batch: each gets its own valid patches
        full = np.random.default_rng(2).normal(size=(R, 40)).astype(np.float32)
        tok = BrainJEPAEmbedder(model, tokens=True).transform([x, full], tr=1.44)
        assert np.isnan(tok[0, :, 1]).all() and not np.isnan(tok[1]).any()
        np.testing.assert_allclose(tok[0, :, 0], h[0, :, 0].numpy(), atol=1e-6)
        np.testing.assert_allclose(
            tok[1], encode_windows(model, model.prepare(full, tr=1.44)[None])[0].numpy(), atol=1e-5
        )


def test_readouts_on_known_token_features():
    rng = np.random.default_rng(2)
    a = torch.as_tensor(rng.normal(size=(4, 3)))  # p = 4 time patches, D = 3
    h = torch.stack([a, a, -a + 5.0, torch.as_tensor(rng.normal(size=(4, 3)))]).float()  # R = 4
    fc = readout_features(h, "fc").numpy()
    assert fc.shape == (6,)  # edges (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    assert fc[0] > 7  # identical features: r = 1, z capped near 8.4
    assert fc[1] < -7 and fc[3] < -7  # negated (the offset is removed by centring over time)
    c = (h - h.mean(1, keepdim=True)).reshape(4, -1).double().numpy()
    norms = np.linalg.norm(c, axis=1)
    r = (c @ c.T) / np.outer(norms, norms)  # cosine of the centred, flattened features
    np.testing.assert_allclose(fc[2], np.arctanh(r[0, 3]), rtol=1e-5)
    np.testing.assert_allclose(fc[5], np.arctanh(r[2, 3]), rtol=1e-5)
    assert not readout_features(h[:, :1], "fc").any()  # one patch: nothing varies over time

    roi = readout_features(h, "roi").numpy()
    hn = h.numpy()
    manual = np.concatenate([hn.mean(1), hn.std(1)], axis=1).reshape(-1)  # per ROI [mean, std]
    np.testing.assert_allclose(roi, manual, atol=1e-6)
    assert roi.shape == (4 * 2 * 3,) and np.allclose(roi[6:9], roi[:3])

    mean = readout_features(h, "mean").numpy()
    m = hn.reshape(-1, 3).mean(0)
    np.testing.assert_allclose(mean, (m - m.mean()) / np.sqrt(m.var() + 1e-6), atol=1e-5)
    # batched: the same per window; and the mean readout is BrainJEPA.embed
    model = small_model()
    xb = torch.randn(2, R, T_MODEL)
    with torch.no_grad():
        hb = encode_windows(model, xb)
        np.testing.assert_allclose(
            readout_features(hb, "mean", model.config.layernorm_eps).numpy(), model.embed(xb).numpy(), atol=1e-5
        )
        assert readout_features(hb, "fc").shape == (2, R * (R - 1) // 2)
        np.testing.assert_allclose(
            readout_features(hb, "fc")[1].numpy(), readout_features(hb[1], "fc").numpy(), atol=1e-6
        )
    with pytest.raises(ConfigError, match="unknown readout"):
        readout_features(h, "max")


def test_amplitude_and_window_fc_baselines():
    rng = np.random.default_rng(3)
    noise = rng.normal(size=(3, 200))
    centred = noise * np.array([[1.0], [2.0], [0.5]])
    np.testing.assert_allclose(amplitude_features([centred])[0], np.log(centred.std(1)), rtol=1e-5)
    # raw BOLD (large offsets): percent signal change, so the offset's size does not matter
    raw = 1000.0 * np.array([[1.0], [2.0], [4.0]]) + 10 * noise
    amp = amplitude_features([raw])[0]
    np.testing.assert_allclose(amp, np.log(100 * raw.std(1) / raw.mean(1)), rtol=1e-5)
    np.testing.assert_allclose(amplitude_features([3 * raw])[0], amp, rtol=1e-5)
    assert amp[0] > amp[2]  # same noise on a lower baseline: more percent change
    assert not np.allclose(amplitude_features([3 * centred])[0], amplitude_features([centred])[0])

    windows = rng.normal(size=(2, 4, 32)).astype(np.float32)
    expect = np.mean([np.arctanh(np.corrcoef(w)[np.triu_indices(4, 1)]) for w in windows], axis=0)
    np.testing.assert_allclose(window_fc(windows, 2, 16), expect, rtol=1e-4)
    # a padded window: only the frames of its valid patches count
    np.testing.assert_allclose(
        window_fc(windows[:1], 1, 16), np.arctanh(np.corrcoef(windows[0, :, :16])[np.triu_indices(4, 1)]), rtol=1e-4
    )


def test_random_init_like_keeps_everything_but_weights():
    model = small_model(seed=5)
    a, b = random_init_like(model, seed=0), random_init_like(model, seed=0)
    assert a.config == model.config and a.normalization == model.normalization
    assert a.target_tr == model.target_tr and a.roi_labels == model.roi_labels
    torch.testing.assert_close(a.encoder.gradients, model.encoder.gradients)
    torch.testing.assert_close(a.encoder.blocks[0].attn.qkv.weight, b.encoder.blocks[0].attn.qkv.weight)
    assert not torch.equal(a.encoder.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)
    assert not torch.equal(
        a.encoder.blocks[0].attn.qkv.weight, random_init_like(model, seed=1).encoder.blocks[0].attn.qkv.weight
    )


def _records(values: dict, target="dx", metric="auroc"):
    """Records {method: [value per split seed]}."""
    return [
        {"method": m, "target": target, "seed": seed, "metric": metric, "value": v}
        for m, vals in values.items()
        for seed, v in enumerate(vals)
    ]


def test_compare_matches_hand_computation_and_scipy():
    from scipy import stats

    a, b = [0.7, 0.8, 0.9, 0.6], [0.5, 0.6, 0.6, 0.7]
    records = _records({"m": a, "base": b})
    c = compare(records, "dx", "auroc", "m", "base")
    d = np.subtract(a, b)  # 0.2, 0.2, 0.3, -0.1
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert c["n"] == 4 and c["wins"] == 3
    assert c["mean_diff"] == pytest.approx(0.15) and c["std"] == pytest.approx(d.std(ddof=1))
    assert (c["ci95_low"], c["ci95_high"]) == pytest.approx((0.15 - half, 0.15 + half))
    t = 0.15 / (d.std(ddof=1) / 2)
    assert c["p_value"] == pytest.approx(2 * stats.t.sf(t, 3))
    assert c["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    # reversed: the same test, the difference negated
    r = compare(records, "dx", "auroc", "base", "m")
    assert r["mean_diff"] == pytest.approx(-0.15) and r["p_value"] == pytest.approx(c["p_value"])
    assert r["wins"] == 1
    # NaN pairs are left out; one pair left: no test
    nan = compare(_records({"m": [0.7, np.nan, 0.9], "base": [0.5, 0.6, np.nan]}), "dx", "auroc", "m", "base")
    assert nan["n"] == 1 and nan["mean_diff"] == pytest.approx(0.2)
    assert np.isnan(nan["p_value"]) and np.isnan(nan["ci95_low"])
    # lower is better for errors: a smaller MSE wins
    mse = compare(_records({"m": [1.0, 2.0], "base": [2.0, 2.5]}, metric="mse"), "dx", "mse", "m", "base")
    assert mse["wins"] == 2 and mse["mean_diff"] == pytest.approx(-0.75)
    same = compare(_records({"m": [0.5, 0.6], "base": [0.5, 0.6]}), "dx", "auroc", "m", "base")
    assert same["mean_diff"] == 0 and np.isnan(same["p_value"])


def test_random_init_summaries_and_comparisons_from_records():
    recs = _records(
        {
            "random_init#0:fc": [0.6, 0.7],
            "random_init#1:fc": [0.9, 0.5],
            "random_init#2:fc": [0.5, np.nan],
            "brainjepa:fc": [0.8, 0.8],
            "fc_window": [0.7, 0.7],
        }
    )
    recs += _records(
        {
            "random_init#0:fc": [0.2, 0.4],
            "random_init#1:fc": [0.0, 0.6],
            "random_init#2:fc": [0.6, 0.6],
            "brainjepa:fc": [0.1, 0.1],
        },
        metric="acc",
    )
    extra = random_init_summaries(recs, ["fc"], [0, 1, 2])
    mean = {(r["seed"], r["metric"]): r["value"] for r in extra if r["method"] == "random_init(mean):fc"}
    assert mean[(0, "auroc")] == pytest.approx(np.mean([0.6, 0.9, 0.5]))
    assert mean[(1, "auroc")] == pytest.approx(0.6)  # the NaN is left out
    assert mean[(1, "acc")] == pytest.approx(np.mean([0.4, 0.6, 0.6]))
    # best on the headline metric (AUROC): seed 0 (0.65) beats seed 1 (0.70)? no: 0.70 > 0.65
    best = [r for r in extra if r["method"] == "random_init(best):fc"]
    assert {r["source"] for r in best} == {"random_init#1:fc"}
    assert sorted((r["metric"], r["value"]) for r in best) == [
        ("acc", 0.0),
        ("acc", 0.6),
        ("auroc", 0.5),
        ("auroc", 0.9),
    ]
    rows = comparison_rows(recs + extra)
    assert [(c["method"], c["baseline"]) for c in rows] == [
        ("brainjepa:fc", "random_init(best):fc"),
        ("brainjepa:fc", "random_init(mean):fc"),
        ("brainjepa:fc", "fc_window"),
    ]
    assert all(c["metric"] == "auroc" for c in rows)
    assert rows[0]["mean_diff"] == pytest.approx(np.mean([0.8 - 0.9, 0.8 - 0.5]))
    assert rows[0]["baseline_source"] == "random_init#1:fc" and "baseline_source" not in rows[1]
    lines = [re.split(r"\s{2,}", line) for line in format_comparisons(rows).splitlines()]
    assert lines[0] == list(COMPARISON_COLUMNS) and len(lines) == 2 + len(rows)
    # differences -0.1 and +0.3: mean 0.1, t interval 0.1 +- 12.706 * 0.283 / sqrt(2), p 0.705
    assert lines[2] == [
        "dx",
        "AUROC",
        "brainjepa:fc",
        "random_init(best):fc (#1)",
        "2",
        "+0.100",
        "[-2.441, +2.641]",
        "0.705",
        "1/2",
    ]
    assert [line[3] for line in lines[3:]] == ["random_init(mean):fc", "fc_window"]


def test_probe_cohort_end_to_end(sim):
    cohort = sim.to_cohort()
    model = small_model(seed=7)
    feats = probe_features(model, cohort, readouts=("mean", "fc"), random_init_seeds=2, progress=False)
    names = probe_method_names(("mean", "fc"), 2)
    assert sorted(feats) == sorted(names) and len(names) == 2 + 4 + 3
    assert feats["brainjepa:fc"].shape == (30, R * (R - 1) // 2) and feats["amplitude"].shape == (30, R)
    np.testing.assert_allclose(feats["fc_full"], fc_features(sim.timeseries), atol=1e-6)
    # the one pass gives what the embedder gives, and init seeds really differ
    np.testing.assert_allclose(
        feats["random_init#1:mean"], embed_cohort(random_init_like(model, 1), cohort, progress=False), atol=1e-5
    )
    assert not np.allclose(feats["random_init#0:mean"], feats["random_init#1:mean"], atol=1e-3)
    assert not np.allclose(feats["random_init#0:fc"], feats["brainjepa:fc"], atol=1e-3)
    w, p = model.prepare_windows(sim.timeseries[3], tr=0.72)
    np.testing.assert_allclose(feats["fc_window"][3], window_fc(w.numpy(), p, 16), atol=1e-5)

    res = probe_cohort(
        model,
        cohort,
        ["age", "patient"],
        seeds=2,
        readouts=("mean", "fc"),
        random_init_seeds=2,
        progress=False,
        features=feats,
    )
    rows = res.rows
    methods = names + [f"random_init({s}):{r}" for s in ("best", "mean") for r in ("mean", "fc")]
    assert {(r["method"], r["target"]) for r in rows} == {(m, t) for m in methods for t in ("age", "patient")}
    assert {r["metric"] for r in rows if r["target"] == "age"} == {"mse", "mae", "pearson_r", "r2"}
    assert {r["metric"] for r in rows if r["target"] == "patient"} == {"acc", "balanced_acc", "f1", "auroc"}
    assert all(r["n_seeds"] == 2 for r in rows if r["metric"] != "auroc")
    table = res.table()
    assert table.index("brainjepa:fc") < table.index("random_init(best):mean") < table.index("fc_full")
    assert len(res.comparisons) == 2 * 2 * 5
    assert {c["baseline"] for c in res.comparisons} == {
        "random_init(best):mean",
        "random_init(mean):mean",
        "random_init(best):fc",
        "random_init(mean):fc",
        *BASELINES,
    }
    assert all(c["n"] == 2 and np.isfinite(c["mean_diff"]) for c in res.comparisons)
    # a user-given split column: the split is fixed, so the closed-form probes repeat exactly
    cohort.labels["fold"] = np.array((["train"] * 3 + ["val", "test"]) * 6, dtype=object)
    fixed = probe_cohort(
        model,
        cohort,
        ["age"],
        seeds=2,
        split_column="fold",
        readouts=("mean", "fc"),
        random_init_seeds=2,
        progress=False,
        features=feats,
    )
    assert all(r["std"] == 0.0 and r["n_seeds"] == 2 for r in fixed.rows)
    with pytest.raises(DataError, match="no subject to 'val'"):  # the manifest's split: all train here
        probe_cohort(
            model,
            cohort,
            ["age"],
            split_column="split",
            readouts=("mean", "fc"),
            random_init_seeds=2,
            progress=False,
            features=feats,
        )
    bn = probe_cohort(
        model,
        cohort,
        ["age"],
        seeds=1,
        probe="bn-linear",
        readouts=("mean",),
        random_init_seeds=0,
        progress=False,
        features={k: v for k, v in feats.items() if k in ("brainjepa:mean", *BASELINES)},
        probe_options={"epochs": 2},
    )
    assert {r["method"] for r in bn.rows} == {"brainjepa:mean", *BASELINES}
    with pytest.raises(ConfigError, match="not methods of this probe"):
        probe_cohort(model, cohort, ["age"], seeds=1, progress=False, features={"fc_baseline": feats["fc_full"]})
    with pytest.raises(DataError, match="not a column"):
        probe_cohort(
            model, cohort, ["iq"], seeds=1, progress=False, readouts=("mean", "fc"), random_init_seeds=2, features=feats
        )
    with pytest.raises(ConfigError, match="unknown probe"):
        probe_cohort(model, cohort, ["age"], probe="mlp", progress=False, features=feats)
    with pytest.raises(ConfigError, match="windows must be one of"):
        probe_cohort(model, cohort, ["age"], windows="random", progress=False)


# --------------------------------------------------------------------------- interpretation


def test_roi_attention_and_networks(sim, tmp_path):
    model = small_model()
    windows = BrainJEPAEmbedder(model).windows(sim.timeseries[:4], tr=0.72)
    att = roi_attention(model.encoder, windows, batch_size=3)
    assert att.shape == (R,)
    assert att.mean() == pytest.approx(1.0, abs=1e-5)  # every query's weights sum to 1
    # by hand for one subject: per layer (N,) received attention -> ROI means -> average
    with torch.no_grad():
        maps = attention_received(model.encoder, windows[:1])
    by_hand = torch.stack(maps).mean(0)[0].reshape(R, -1).mean(1) * R * (T_MODEL // 16)
    np.testing.assert_allclose(roi_attention(model.encoder, windows[:1]), by_hand.numpy(), rtol=1e-5)

    nets = ["A", "B", "A", "C"] * 4
    table = network_attention(att, nets)
    assert [t["network"] for t in table] == ["A", "B", "C"]
    assert table[0]["attention"] == pytest.approx(att[[i for i, n in enumerate(nets) if n == "A"]].mean())
    assert table[0]["n_rois"] == 8

    f = tmp_path / "rois.tsv"
    f.write_text("index\tname\tnetwork\n" + "".join(f"{i}\troi{i}\t{nets[i]}\n" for i in reversed(range(R))))
    assert read_networks(f, model.roi_labels, R) == nets  # matched by name, not row order
    g = tmp_path / "nets.csv"
    g.write_text("network\n" + "\n".join(nets[:5]) + "\n")
    with pytest.raises(DataError, match="5 rows"):
        read_networks(g, None, R)
    assert network_labels_from_roi_names(["7Networks_LH_Vis_1", "7Networks_RH_Default_PFC_2"]) == ["Vis", "Default"]
    assert network_labels_from_roi_names(["roi1", "roi2"]) is None


def test_attention_received_follows_the_encoder():
    enc = small_model().encoder
    x = torch.randn(3, R, T_MODEL)
    n_tokens = R * (T_MODEL // 16)
    with torch.no_grad():
        features, maps = encode_with_attention(enc, x)
        # the explicit path computes the features the encoder computes
        torch.testing.assert_close(features, enc(x), rtol=1e-5, atol=1e-5)
        assert [m.shape for m in maps] == [(3, n_tokens)] * 3
        for m in maps:  # each query's weights sum to 1, so their mean over queries does too
            assert (m >= 0).all()
            torch.testing.assert_close(m.sum(-1), torch.ones(3), rtol=0, atol=1e-5)
        assert not torch.allclose(maps[0], torch.full_like(maps[0], 1 / n_tokens), atol=1e-4)
        for a, b in zip(attention_received(enc, x), maps):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_attention_received_by_hand_on_one_block():
    cfg = ModelConfig(
        n_rois=4,
        n_timepoints=32,
        embed_dim=8,
        depth=1,
        num_heads=2,
        predictor_embed_dim=4,
        predictor_depth=1,
        predictor_num_heads=1,
        n_gradients=2,
    )
    torch.manual_seed(3)
    enc = BrainEncoder(cfg, torch.randn(4, 2)).eval()
    x = torch.randn(2, 4, 32)
    n_tokens, d = 4 * 2, 4  # 4 ROIs x 2 time patches; 8 features in 2 heads of 4
    block = enc.blocks[0]
    with torch.no_grad():
        h = enc.tokens(x).double().numpy()
        z = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + cfg.layernorm_eps)
        a = z * block.norm1.weight.double().numpy() + block.norm1.bias.double().numpy()
        qkv = a @ block.attn.qkv.weight.double().numpy().T + block.attn.qkv.bias.double().numpy()
        expected = np.zeros((2, n_tokens))
        for b in range(2):
            for head in range(2):
                cols = slice(head * d, (head + 1) * d)
                q, k = qkv[b, :, cols], qkv[b, :, 8:16][:, cols]
                scores = q @ k.T / np.sqrt(d)
                w = np.exp(scores - scores.max(1, keepdims=True))
                w /= w.sum(1, keepdims=True)  # row i: how query i spreads its attention
                expected[b] += w.mean(0) / 2  # mean over queries, then over the 2 heads
        (got,) = attention_received(enc, x)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
        # queries of zero: every score is 0, so every token receives exactly 1 / N
        block.attn.qkv.weight[:8] = 0.0
        block.attn.qkv.bias[:8] = 0.0
        (uniform,) = attention_received(enc, x)
        torch.testing.assert_close(uniform, torch.full((2, n_tokens), 1 / n_tokens), rtol=0, atol=1e-7)


# --------------------------------------------------------------------------- fine-tuning


def test_layer_decay_gives_each_depth_its_learning_rate():
    model = small_model()
    net = FineTuner(model, "classification").build(2)
    depth = len(net.encoder.blocks)
    assert layer_id("encoder.patch_embed.weight", depth) == 0
    assert layer_id("encoder.pos_embed.proj.weight", depth) == 0
    assert layer_id("encoder.blocks.1.attn.qkv.weight", depth) == 2
    assert layer_id("head.weight", depth) == depth + 1 == layer_id("encoder.norm.weight", depth)
    opt = make_optimizer(net, lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    lrs = {}
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * 0.75 ** (depth + 1 - g["layer"]))
        assert g["weight_decay"] == (0.05 if all(p.ndim > 1 for p in g["params"]) else 0.0)
        lrs[g["layer"]] = g["lr"]
    assert len(set(lrs.values())) == depth + 2
    assert lrs[0] / lrs[depth + 1] == pytest.approx(0.75 ** (depth + 1))
    assert sum(len(g["params"]) for g in param_groups(net, 0.0)) == len(list(net.parameters()))

    # the rates really act: Adam's first step moves a parameter by about its group's lr
    opt = make_optimizer(net, lr=1e-3, weight_decay=0.0, layer_decay=0.75)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x = torch.randn(4, R, T_MODEL)
    torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    step = {n: float((p.detach() - before[n]).abs().max()) for n, p in net.named_parameters()}
    assert step["head.weight"] == pytest.approx(1e-3, rel=0.05)
    assert step["encoder.patch_embed.weight"] == pytest.approx(1e-3 * 0.75 ** (depth + 1), rel=0.05)
    assert step["encoder.blocks.0.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.75**depth, rel=0.05)


def test_drop_path_changes_training_outputs_only():
    model = small_model()
    x = torch.randn(8, R, T_MODEL)
    net = FineTuner(model, "classification", drop_path=0.5).build(2)
    assert [b.drop_path.p for b in net.encoder.blocks] == pytest.approx([0.0, 0.25, 0.5])
    assert all(b.drop_path.p == 0.0 for b in model.encoder.blocks)  # the pretrained model is untouched
    net.train()
    torch.manual_seed(0)
    a = net(x)
    b = net(x)
    assert not torch.allclose(a, b)
    net.eval()
    torch.testing.assert_close(net(x), net(x))
    set_drop_path(net.encoder, 0.0)
    net.train()
    torch.testing.assert_close(net(x), net(x))


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 101, 10, 1.0, 0.1, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(5, 101, 10, 1.0, 0.0, 0.0) == pytest.approx(0.5)  # linear warmup
    assert warmup_cosine(10, 101, 10, 1.0, 0.1, 0.0) == pytest.approx(1.0)  # the peak ends the warmup
    assert warmup_cosine(55, 101, 10, 1.0, 0.1, 0.0) == pytest.approx(0.5)  # half way down the cosine
    assert warmup_cosine(100, 101, 10, 1.0, 0.1, 0.01) == pytest.approx(0.01)  # final at the last step
    assert warmup_cosine(500, 101, 10, 1.0, 0.1, 0.01) == pytest.approx(0.01)  # and after it


def test_finetuner_trains_and_finetune_cohort_runs(sim):
    model = small_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cohort = sim.to_cohort()
    windows = BrainJEPAEmbedder(model).windows(sim.timeseries, tr=0.72)
    y = np.asarray(sim.labels["patient"])
    ft = FineTuner(model, "classification", epochs=3, warmup_epochs=1, batch_size=8, class_weight="balanced").fit(
        windows[:18], y[:18], windows[18:24], y[18:24]
    )
    assert len(ft.train_losses_) == 3 and ft.best_epoch_ in (-1, int(np.argmin(ft.val_losses_)))  # -1: the probe kept
    proba = ft.predict_proba(windows[24:])
    assert proba.shape == (6, 2) and np.allclose(proba.sum(1), 1)
    reg = FineTuner(model, "regression", epochs=2, batch_size=8).fit(
        windows[:18], sim.labels["age"][:18], windows[18:24], sim.labels["age"][18:24]
    )
    assert 20 < reg.predict(windows[24:]).mean() < 80  # back in years
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    res = finetune_cohort(model, cohort, ["patient"], seeds=1, epochs=1, warmup_epochs=0, batch_size=8, progress=False)
    assert {r["method"] for r in res.rows} == {"brainjepa", "random_init", "fc_baseline", "amplitude"}


# --------------------------------------------------------------------------- commands


def test_commands_end_to_end(sim, tmp_path, capsys):
    from brainjepa.cli import main
    from brainjepa.synthetic import write_cohort

    manifest = write_cohort(sim, tmp_path / "data", fmt="npy")
    bundle = small_model(roi_labels=sim.roi_labels).save_pretrained(tmp_path / "bundle")
    data = ["--model", str(bundle), "--data", str(manifest)]

    assert main(["embed", *data, "--out", str(tmp_path / "emb.npz"), "--tokens", "--batch-size", "7"]) == 0
    z = np.load(tmp_path / "emb.npz")
    assert z["embeddings"].shape == (30, 24) and z["tokens"].shape == (30, R, 2, 24)
    assert z["subjects"][0] == sim.subjects[0] and z["label_age"].shape == (30,)
    assert str(z["readout"]) == "mean" and str(z["windows"]) == "all"
    assert main(["embed", *data, "--out", str(tmp_path / "fc.npz"), "--readout", "fc", "--windows", "center"]) == 0
    assert np.load(tmp_path / "fc.npz")["embeddings"].shape == (30, R * (R - 1) // 2)
    assert "fc readout, center windows" in capsys.readouterr().out

    # every method of the default protocol (3 readouts, 3 init seeds, all baselines)
    out = tmp_path / "results.json"
    assert main(["probe", *data, "--target", "age", "--seeds", "2", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    methods = {r["method"] for r in saved["rows"]}
    expected = {
        f"{base}:{r}"
        for r in READOUTS
        for base in (
            "brainjepa",
            "random_init#0",
            "random_init#1",
            "random_init#2",
            "random_init(best)",
            "random_init(mean)",
        )
    } | set(BASELINES)
    assert methods == expected
    assert all(r["n_seeds"] == 2 and np.isfinite(r["mean"]) and np.isfinite(r["std"]) for r in saved["rows"])
    assert len(saved["comparisons"]) == len(READOUTS) * 5
    assert all(c["n"] == 2 and np.isfinite(c["mean_diff"]) for c in saved["comparisons"])
    # what is printed is what is saved: the results table, then the comparisons
    printed = capsys.readouterr().out
    assert format_table(saved["rows"]) in printed and format_comparisons(saved["comparisons"]) in printed

    assert (
        main(
            [
                "probe",
                *data,
                "--target",
                "patient",
                "--seeds",
                "2",
                "--readout",
                "fc",
                "--random-init-seeds",
                "1",
                "--windows",
                "center",
                "--out",
                str(tmp_path / "patient.json"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "patient.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {
        f"{base}:fc" for base in ("brainjepa", "random_init#0", "random_init(best)", "random_init(mean)")
    } | set(BASELINES)
    assert {r["metric"] for r in rows} == {"acc", "balanced_acc", "f1", "auroc"}
    assert all(r["n_seeds"] == 2 and 0 <= r["mean"] <= 1 for r in rows)
    assert format_table(rows) in capsys.readouterr().out

    assert (
        main(
            [
                "probe",
                *data,
                "--target",
                "site",
                "--task",
                "regression",
                "--seeds",
                "1",
                "--probe",
                "bn-linear",
                "--epochs",
                "3",
                "--readout",
                "mean",
                "--random-init-seeds",
                "0",
                "--out",
                str(tmp_path / "site.json"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "site.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"brainjepa:mean", *BASELINES}
    assert {r["metric"] for r in rows} == {"mse", "mae", "pearson_r", "r2"}
    assert all(r["n_seeds"] == 1 and np.isfinite(r["mean"]) for r in rows)
    assert all(r["mean"] > 0 for r in rows if r["metric"] in ("mse", "mae"))
    assert format_table(rows) in capsys.readouterr().out

    assert (
        main(
            [
                "finetune",
                *data,
                "--target",
                "patient",
                "--seeds",
                "1",
                "--epochs",
                "1",
                "--warmup-epochs",
                "0",
                "--class-weight",
                "balanced",
                "--out",
                str(tmp_path / "finetune.json"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "finetune.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"brainjepa", "random_init", "fc_baseline", "amplitude"}
    assert {r["metric"] for r in rows} == {"acc", "balanced_acc", "f1", "auroc"}
    assert all(r["n_seeds"] == 1 and 0 <= r["mean"] <= 1 for r in rows)
    assert format_table(rows) in capsys.readouterr().out

    assert (
        main(
            [
                "attention",
                *data,
                "--out",
                str(tmp_path / "att"),
                "--networks",
                str(tmp_path / "data" / "rois.tsv"),
                "--max-subjects",
                "5",
            ]
        )
        == 0
    )
    nets = (tmp_path / "att" / "network_attention.csv").read_text().splitlines()
    assert nets[0] == "network,attention,n_rois" and len(nets) == 1 + len(set(sim.networks))
    rois = [line.split(",") for line in (tmp_path / "att" / "roi_attention.csv").read_text().splitlines()[1:]]
    assert [r[1] for r in rois] == [sim.network_names[k] for k in sim.networks]
    assert np.mean([float(r[2]) for r in rois]) == pytest.approx(1.0, abs=1e-5)  # 1.0: the uniform share

    assert main(["probe", *data, "--target", "iq"]) == 1
    assert "'iq' is not a column" in capsys.readouterr().err


def test_encode_windows_in_bf16_is_close_to_fp32(monkeypatch):
    import brainjepa.precision as precision

    model = small_model()
    xb = torch.randn(2, R, T_MODEL)
    with torch.no_grad():
        h32 = encode_windows(model, xb)
        h16 = encode_windows(model, xb, precision="bf16")
        assert h16.dtype == torch.float32 and h16.shape == h32.shape
        assert not torch.equal(h16, h32)  # it did compute in bf16
        torch.testing.assert_close(h16, h32, atol=0.1, rtol=0.05)  # after the final LayerNorm: unit scale
        for faster in (True, False):  # auto follows the probe's decision
            monkeypatch.setattr(precision, "cpu_prefers_bf16", lambda faster=faster: faster)
            torch.testing.assert_close(encode_windows(model, xb, precision="auto"), h16 if faster else h32)
    emb = BrainJEPAEmbedder(model, precision="bf16").transform([xb[0].numpy()], tr=1.44)
    assert emb.shape == (1, model.config.embed_dim) and np.isfinite(emb).all()
