"""brainjepa.sklearn: the estimators follow scikit-learn's rules and work in pipelines,
cross-validation and grid search, on scans given as arrays or files."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_cfg

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import NotFittedError, SkipTestWarning  # noqa: E402
from sklearn.linear_model import RidgeCV  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils import estimator_checks as ec  # noqa: E402

from brainjepa.bundle import BrainJEPA  # noqa: E402
from brainjepa.errors import ConfigError, DataError  # noqa: E402
from brainjepa.evaluate import BrainJEPAEmbedder as EvaluateEmbedder  # noqa: E402
from brainjepa.evaluate import fc_features  # noqa: E402
from brainjepa.sklearn import BrainJEPAEmbedder, FCEmbedder  # noqa: E402
from brainjepa.synthetic import simulate_cohort  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = tiny_cfg(n_rois=14, n_timepoints=32, n_gradients=3)

# The checks of sklearn.utils.estimator_checks that apply to estimators whose input is a list
# of scans. Every other check fits on a 2-D (n_samples, n_features) float matrix, which is not
# a scan: these estimators refuse it (test_two_d_matrix_is_refused), their tags say so
# (two_d_array=False), and check_estimator therefore skips them all (test_check_estimator_skips).
# What those checks verify about fit and transform (fit returns self, parameters unchanged by
# fit, idempotent fit, subset invariance, pickling, check_is_fitted) is tested on scans below.
APPLICABLE_CHECKS = [
    ec.check_estimator_cloneable,
    ec.check_estimator_tags_renamed,
    ec.check_valid_tag_types,
    ec.check_estimator_repr,
    ec.check_no_attributes_set_in_init,
    ec.check_do_not_raise_errors_in_init_or_set_params,
    ec.check_mixin_order,
    ec.check_parameters_default_constructible,
    ec.check_get_params_invariance,
    ec.check_set_params,
    ec.check_estimators_unfitted,
    ec.check_transformers_unfitted,
    ec.check_get_feature_names_out_error,
]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A tiny bundle (zscore, TR 2 s) and 18 simulated scans of 14 ROIs x 75 frames."""
    folder = tmp_path_factory.mktemp("sk")
    torch.manual_seed(0)
    gradients = np.random.default_rng(0).normal(size=(14, 3))
    model = BrainJEPA(CFG, gradients, normalization={"method": "zscore"}, target_tr=2.0)
    model.save_pretrained(folder / "bundle")
    sim = simulate_cohort(18, 14, tr=2.0, minutes=2.5, seed=3)
    return folder, sim


def estimators(bundle):
    return [BrainJEPAEmbedder(model=str(bundle), tr=2.0, batch_size=4), FCEmbedder()]


@pytest.mark.parametrize("check", APPLICABLE_CHECKS, ids=lambda c: c.__name__)
def test_applicable_estimator_checks(cohort, check):
    for est in estimators(cohort[0] / "bundle"):
        check(type(est).__name__, est)


def test_check_estimator_skips_because_input_is_scans(cohort):
    for est in estimators(cohort[0] / "bundle"):
        with pytest.warns(SkipTestWarning, match="requires input"):
            ec.check_estimator(est, on_fail=None)


def test_two_d_matrix_is_refused(cohort):
    for est in estimators(cohort[0] / "bundle"):
        with pytest.raises(DataError, match="2-D array of shape \\(5, 4\\); these estimators take scans"):
            est.fit(np.zeros((5, 4)))


def test_sklearn_rules_on_scans(cohort):
    folder, sim = cohort
    X = sim.timeseries
    for est in estimators(folder / "bundle"):
        with pytest.raises(NotFittedError):
            est.transform(X)
        params = est.get_params()
        assert est.fit(X) is est  # fit returns self
        assert est.get_params() == params  # fit leaves the parameters alone
        assert not hasattr(clone(est), "n_features_out_")  # clone: unfitted, same parameters
        assert clone(est).get_params() == params
        full = est.transform(X)
        assert full.shape == (18, est.n_features_out_) and full.dtype == np.float32
        np.testing.assert_allclose(est.fit(X).transform(X), full, atol=1e-6)  # idempotent
        np.testing.assert_allclose(est.transform(X[5:11]), full[5:11], atol=1e-5)  # subset invariance
        again = pickle.loads(pickle.dumps(est))
        np.testing.assert_allclose(again.transform(X[:3]), full[:3], atol=1e-6)
        assert len(est.get_feature_names_out()) == est.n_features_out_
    assert "readout='fc'" in repr(BrainJEPAEmbedder(model="b", readout="fc"))


def test_same_embeddings_as_the_library_embedder(cohort):
    folder, sim = cohort
    model = BrainJEPA.from_pretrained(folder / "bundle")
    for readout in ("mean", "fc"):
        ref = EvaluateEmbedder(model, readout=readout).transform(sim.timeseries, tr=2.0)
        got = BrainJEPAEmbedder(model=model, readout=readout, tr=2.0, batch_size=5).fit_transform(sim.timeseries)
        np.testing.assert_allclose(got, ref, atol=1e-6)
    np.testing.assert_allclose(FCEmbedder().fit_transform(sim.timeseries), fc_features(sim.timeseries))
    # a 3-D array is a list of scans too
    np.testing.assert_allclose(FCEmbedder().fit_transform(np.stack(sim.timeseries)), fc_features(sim.timeseries))


def test_pipeline_cross_validation_and_grid_search(cohort):
    folder, sim = cohort
    X, ages = sim.timeseries, sim.labels["age"]
    emb = BrainJEPAEmbedder(model=str(folder / "bundle"), tr=2.0)
    scores = cross_val_score(make_pipeline(emb, StandardScaler(), RidgeCV()), X, ages, cv=3)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    fc_scores = cross_val_score(make_pipeline(FCEmbedder(), StandardScaler(), RidgeCV()), X, ages, cv=3)
    assert np.isfinite(fc_scores).all()
    search = GridSearchCV(
        make_pipeline(emb, StandardScaler(), RidgeCV()),
        param_grid={"brainjepaembedder__readout": ["mean", "fc"], "brainjepaembedder__windows": ["all", "center"]},
        cv=3,
    ).fit(X, ages)
    assert len(search.cv_results_["mean_test_score"]) == 4 and np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_params_["brainjepaembedder__readout"] in ("mean", "fc")
    fc_search = GridSearchCV(
        make_pipeline(FCEmbedder(), RidgeCV()), {"fcembedder__kind": ["correlation", "partial correlation"]}, cv=3
    ).fit(X, ages)
    assert np.isfinite(fc_search.cv_results_["mean_test_score"]).all()


def test_files_with_their_tr_and_conflicts(cohort, tmp_path):
    folder, sim = cohort
    paths = []
    for i, x in enumerate(sim.timeseries[:4]):
        p = tmp_path / f"sub-{i}_bold.tsv"
        np.savetxt(p, x.T, delimiter="\t", header="\t".join(f"roi{j}" for j in range(14)), comments="")
        (tmp_path / f"sub-{i}_bold.json").write_text(json.dumps({"RepetitionTime": 1.0}))
        paths.append(str(p))
    est = BrainJEPAEmbedder(model=str(folder / "bundle"))  # TR from the sidecars: 1.0 s, resampled to 2.0
    got = est.fit_transform(paths)
    model = BrainJEPA.from_pretrained(folder / "bundle")
    np.testing.assert_allclose(got, EvaluateEmbedder(model).transform(sim.timeseries[:4], tr=1.0), atol=1e-5)
    with pytest.raises(DataError, match="the file says TR 1 s but the estimator's tr is 2 s"):
        BrainJEPAEmbedder(model=str(folder / "bundle"), tr=2.0).fit(paths)


def test_fc_kinds_and_windows(cohort):
    _, sim = cohort
    X = sim.timeseries[:3]
    est = FCEmbedder(window=25).fit(X)
    x = X[0]  # 75 frames: 3 windows at 0, 25, 50
    ref = fc_features([x[:, 0:25], x[:, 25:50], x[:, 50:75]]).mean(axis=0)
    np.testing.assert_allclose(est.transform(X)[0], ref, atol=1e-6)
    cov = FCEmbedder(kind="covariance").fit_transform(X)
    assert cov.shape == (3, 14 * 15 // 2)
    pc = FCEmbedder(kind="partial correlation").fit_transform(X)
    assert pc.shape == (3, 91) and np.isfinite(pc).all()
    # partial correlations from a precision matrix with known structure: a chain x0 - x1 - x2
    rng = np.random.default_rng(0)
    a = rng.normal(size=20000)
    b = a + rng.normal(size=20000)
    c = b + rng.normal(size=20000)
    pc3 = FCEmbedder(kind="partial correlation").fit_transform([np.stack([a, b, c])])[0]
    assert abs(pc3[1]) < 0.03 and pc3[0] > 0.5 and pc3[2] > 0.5  # (0, 2) conditionally independent


def test_bad_parameters_and_inputs(cohort):
    folder, sim = cohort
    X = sim.timeseries[:3]
    with pytest.raises(ConfigError, match="readout must be one of"):
        BrainJEPAEmbedder(model=str(folder / "bundle"), readout="max").fit(X)
    with pytest.raises(ConfigError, match="needs model="):
        BrainJEPAEmbedder().fit(X)
    with pytest.raises(ConfigError, match="tr must be a positive number"):
        BrainJEPAEmbedder(model=str(folder / "bundle"), tr=-1).fit(X)
    with pytest.raises(ConfigError, match="kind must be one of"):
        FCEmbedder(kind="tangent").fit(X)
    with pytest.raises(ConfigError, match="window must be None or a number of frames"):
        FCEmbedder(window=2).fit(X)
    with pytest.raises(DataError, match=r"X\[1\]: 13 ROIs, but the model has 14"):
        BrainJEPAEmbedder(model=str(folder / "bundle"), tr=2.0).fit([X[0], X[1][:13]])
    with pytest.raises(DataError, match="X is one path"):
        FCEmbedder().fit("scans.csv")
    est = FCEmbedder().fit(X)
    with pytest.raises(DataError, match="the fitted scans has 14"):
        est.transform([X[0][:5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FCEmbedder(window=50).fit(X).transform(X)  # no warning when every scan has a window
