"""Brain gradients: parity with BrainSpace, diffusion-map properties, FC, alignment, files, CLI."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from conftest import check_png

from brainjepa.cli import main
from brainjepa.errors import ConfigError, DataError
from brainjepa.gradients import (
    BrainGradients,
    affinity,
    compute_gradients,
    connectivity,
    load_connectivity,
    load_gradients_csv,
    plot_gradients,
    procrustes_align,
    save_gradients_csv,
)

FIXTURES = Path(__file__).parent / "fixtures" / "official_parity"
SCHAEFER = (100, 200, 300, 400)


@cache
def schaefer_fc(n: int) -> np.ndarray:
    """BrainSpace's shipped group FC (read with numpy: its datasets module needs VTK)."""
    brainspace = pytest.importorskip("brainspace")
    path = (
        Path(brainspace.__file__).parent
        / "datasets"
        / "matrices"
        / "main_group"
        / f"schaefer_{n}_mean_connectivity_matrix.csv"
    )
    return np.loadtxt(path, delimiter=",")


def brainspace_gradients(fc, random_state=0, **kw):
    """BrainSpace's GradientMaps; kw: kernel, n_components, sparsity, alpha, diffusion_time."""
    gradient = pytest.importorskip("brainspace.gradient")
    gm = gradient.GradientMaps(
        n_components=kw.pop("n_components", 30),
        approach="dm",
        kernel=kw.pop("kernel", "normalized_angle"),
        random_state=random_state,
    )
    gm.fit(fc, **kw)  # sparsity goes to the affinity, alpha/diffusion_time to diffusion maps
    return gm.gradients_, gm.lambdas_


def exact_eigsh(a, k, which="LM", tol=0, v0=None):
    """Stand-in for scipy's eigsh inside BrainSpace: an exact dense eigensolver for its
    non-symmetric random-walk matrix (k largest-magnitude eigenpairs, ascending, unit norm)."""
    assert which == "LM"
    w, v = scipy.linalg.eig(a)
    idx = np.argsort(-np.abs(w))[:k]
    idx = idx[np.argsort(w[idx].real)]
    v = v[:, idx].real
    return w[idx].real, v / np.linalg.norm(v, axis=0)


def match_signs(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return a * np.sign((a * ref).sum(axis=0))


def synthetic_series(n_subjects=3, n_rois=40, n_time=120, seed=0) -> list[np.ndarray]:
    """Subjects sharing a low-rank ROI structure (so FC has real gradients), each R x T."""
    rng = np.random.default_rng(seed)
    loadings = rng.standard_normal((n_rois, 4))
    return [
        (loadings @ rng.standard_normal((4, n_time)) + rng.standard_normal((n_rois, n_time))).astype(np.float32)
        for _ in range(n_subjects)
    ]


# --------------------------------------------------------------------------- BrainSpace parity


@pytest.mark.parametrize("n", SCHAEFER)
def test_affinity_is_bit_identical_to_brainspace(n):
    kernels = pytest.importorskip("brainspace.gradient.kernels")
    fc = schaefer_fc(n)
    # int(R * (1 - 0.9)) in floating point: 39 kept entries per row for R = 400, not 40
    ref = kernels.compute_affinity(fc, kernel="normalized_angle", sparsity=0.9)
    np.testing.assert_array_equal(affinity(fc), ref)


@pytest.mark.parametrize("n", SCHAEFER)
def test_gradients_match_brainspace_with_exact_eigensolver(n, monkeypatch):
    """Every one of the 30 components equals BrainSpace's pipeline once its eigsh call (a
    symmetric solver applied to a non-symmetric matrix) is replaced by an exact dense solve.
    Observed max |diff|: about 4e-15 (100-300) and 4e-14 (400)."""
    embedding = pytest.importorskip("brainspace.gradient.embedding")
    monkeypatch.setattr(embedding, "eigsh", exact_eigsh)
    fc = schaefer_fc(n)
    ref_g, ref_l = brainspace_gradients(fc)
    g, lam = compute_gradients(fc)
    assert g.shape == (n, 30) and g.dtype == np.float64
    np.testing.assert_allclose(lam, ref_l, rtol=0, atol=1e-12)
    np.testing.assert_allclose(g, ref_g, rtol=0, atol=1e-10)  # signs too: same convention


@pytest.mark.parametrize(
    "options",
    [
        dict(kernel="cosine"),
        dict(alpha=0.0),
        dict(alpha=1.0),
        dict(diffusion_time=2),
        dict(sparsity=0.75, n_components=10),
    ],
)
def test_options_match_brainspace_with_exact_eigensolver(options, monkeypatch):
    embedding = pytest.importorskip("brainspace.gradient.embedding")
    monkeypatch.setattr(embedding, "eigsh", exact_eigsh)
    fc = schaefer_fc(100)
    ref_g, ref_l = brainspace_gradients(fc, **dict(options))
    g, lam = compute_gradients(fc, **options)
    np.testing.assert_allclose(lam, ref_l, rtol=0, atol=1e-12)
    np.testing.assert_allclose(g, ref_g, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", SCHAEFER)
def test_gradients_agree_with_stock_brainspace_within_its_own_solver_noise(n):
    """Stock BrainSpace is only approximate (eigsh on a non-symmetric matrix): changing its
    random_state moves components 3-30 by up to 2.3e-3 and the first pair by 4e-3 to 1.2e-2 (the
    most for the nearly tied Schaefer-400 pair, eigenvalues 0.0719 vs 0.0708), on values up to 0.19.
    So each component must be as close to BrainSpace(random_state=0) as BrainSpace's other seeds
    are (x2, + 2e-4), and components 1-2 must span the same plane. Observed max |ours -
    BrainSpace(0)| over all 30 components: 1.1e-3, 6.5e-3, 1.3e-3, 1.3e-3 (Schaefer 100-400)."""
    fc = schaefer_fc(n)
    g, lam = compute_gradients(fc)
    ref_g, ref_l = brainspace_gradients(fc, random_state=0)
    others = [brainspace_gradients(fc, random_state=s)[0] for s in (1, 2, 3)]
    spread = np.max([np.abs(match_signs(o, ref_g) - ref_g).max(axis=0) for o in others], axis=0)
    diff = np.abs(match_signs(g, ref_g) - ref_g).max(axis=0)
    assert np.all(diff <= 2 * spread + 2e-4), (diff, spread)
    np.testing.assert_allclose(lam, ref_l, rtol=1e-2)
    for j in range(30):
        assert abs(np.corrcoef(g[:, j], ref_g[:, j])[0, 1]) > 0.995
    q_ours = np.linalg.qr(g[:, :2])[0]
    q_ref = np.linalg.qr(ref_g[:, :2])[0]
    cos_max_angle = np.linalg.svd(q_ours.T @ q_ref, compute_uv=False).min()
    assert np.sqrt(1 - cos_max_angle**2) < 1e-2


# --------------------------------------------------------------------------- properties


def test_gradients_are_diffusion_map_eigenvectors():
    fc = connectivity(synthetic_series(n_subjects=2, n_rois=60, n_time=150))
    g, lam = compute_gradients(fc, n_components=10)
    assert g.shape == (60, 10) and lam.shape == (10,)
    # the random-walk matrix, built literally from the definition
    a = affinity(fc)
    d = a.sum(1) ** -0.5
    lap = a * np.outer(d, d)
    p = lap / lap.sum(1, keepdims=True)
    mu = lam / (1 + lam)  # lambdas are the multi-scale multipliers mu / (1 - mu)
    psi = g / lam
    np.testing.assert_allclose(p @ psi, psi * mu, atol=1e-12)
    assert np.all(np.diff(mu) <= 0) and np.all((mu > 0) & (mu < 1))
    # each eigenvector has norm sqrt(R), so a (nearly zero-mean) column's std is its multiplier
    np.testing.assert_allclose(np.linalg.norm(psi, axis=0), np.sqrt(60), rtol=1e-12)
    np.testing.assert_allclose(g.std(axis=0), lam, rtol=1e-2)
    # sign convention: the largest-magnitude entry of each column is positive
    assert np.all(g[np.abs(g).argmax(axis=0), np.arange(10)] > 0)
    g2, _ = compute_gradients(fc, n_components=10)
    np.testing.assert_array_equal(g, g2)  # deterministic


def test_diffusion_time_scales_by_eigenvalue_power():
    fc = connectivity(synthetic_series(n_rois=30))
    g0, lam0 = compute_gradients(fc, n_components=5)
    g3, lam3 = compute_gradients(fc, n_components=5, diffusion_time=3)
    mu = lam0 / (1 + lam0)
    np.testing.assert_allclose(lam3, mu**3, rtol=1e-10)
    np.testing.assert_allclose(g3 / lam3, g0 / lam0, atol=1e-10)


def test_authors_fixture_gradient_file_loads():
    """The parity fixture's gradient file is the authors' header-less format, 450 x 30. (Its
    values are random, not diffusion-map gradients, so it has none of their properties.)"""
    path = FIXTURES / "r450_tiny" / "gradients.csv"
    g, labels = load_gradients_csv(path)
    assert g.shape == (450, 30) and labels is None
    np.testing.assert_array_equal(g, np.loadtxt(path, delimiter=","))
    g20, _ = load_gradients_csv(FIXTURES / "r20_tiny" / "gradients.csv")
    assert g20.shape == (20, 30)


# --------------------------------------------------------------------------- connectivity


def test_connectivity_single_subject_is_pearson():
    x = synthetic_series(n_subjects=1)[0]
    np.testing.assert_allclose(connectivity([x], fisher_z=False), np.corrcoef(x), atol=1e-12)
    fc = connectivity([x])  # Fisher-z round trip of one subject changes nothing
    np.testing.assert_allclose(fc, np.corrcoef(x), atol=1e-9)
    assert np.all(np.diag(fc) == 1.0) and fc.dtype == np.float64


def test_connectivity_fisher_z_mean():
    subjects = synthetic_series(n_subjects=3)
    subjects[1] = subjects[1][:, :80]  # subjects may have different lengths
    rs = [np.corrcoef(x) for x in subjects]
    off = ~np.eye(40, dtype=bool)
    expect = np.tanh(np.mean([np.arctanh(r[off]) for r in rs], axis=0))
    fc = connectivity(subjects)
    np.testing.assert_allclose(fc[off], expect, atol=1e-9)
    np.testing.assert_allclose(connectivity(subjects, fisher_z=False), np.mean(rs, axis=0), atol=1e-12)
    assert not np.allclose(fc[off], np.mean(rs, axis=0)[off], atol=1e-4)
    np.testing.assert_array_equal(np.diag(fc), 1.0)


def test_connectivity_errors_name_subject_and_roi():
    good = synthetic_series(n_subjects=1, n_rois=10)[0]
    with pytest.raises(DataError, match=r"subject 1 has 9 ROIs but subject 0 has 10"):
        connectivity([good, good[:9]])
    bad = good.copy()
    bad[4, 7] = np.nan
    with pytest.raises(DataError, match=r"subject 1, ROI 4: NaN"):
        connectivity([good, bad])
    flat = good.copy()
    flat[6] = 3.0
    with pytest.raises(DataError, match=r"sub-02\.npy, ROI 6: constant"):
        connectivity([good, flat], names=["sub-01.npy", "sub-02.npy"])
    with pytest.raises(DataError, match="at least 3"):
        connectivity([good[:, :2]])


# --------------------------------------------------------------------------- input checks


def test_compute_gradients_input_errors():
    fc = connectivity(synthetic_series(n_rois=20))
    nan = fc.copy()
    nan[2, 3] = np.nan
    with pytest.raises(DataError, match="NaN/Inf.*row 2, column 3"):
        compute_gradients(nan, n_components=5)
    with pytest.raises(DataError, match="square"):
        compute_gradients(fc[:, :15], n_components=5)
    asym = fc.copy()
    asym[0, 1] += 0.1
    with pytest.raises(DataError, match="not symmetric"):
        compute_gradients(asym, n_components=5)
    with pytest.raises(DataError, match="30 gradients need at least 32 ROIs.*20"):
        compute_gradients(fc)
    compute_gradients(fc, n_components=18)  # R = m + 2 is enough
    with pytest.raises(ConfigError, match="kernel"):
        compute_gradients(fc, n_components=5, kernel="gaussian")
    with pytest.raises(ConfigError, match="sparsity"):
        compute_gradients(fc, n_components=5, sparsity=1.0)
    with pytest.raises(ConfigError, match="alpha"):
        compute_gradients(fc, n_components=5, alpha=2.0)
    empty = fc.copy()
    empty[7, :] = empty[:, 7] = 0.0
    with pytest.raises(DataError, match="ROI 7 has an all-zero connectivity row"):
        compute_gradients(empty, n_components=5)


def test_disconnected_affinity_is_an_error():
    block = connectivity(synthetic_series(n_rois=20))
    fc = scipy.linalg.block_diag(block, block)  # two unrelated halves: cosine affinity 0 between
    with pytest.raises(DataError, match="not connected"):
        compute_gradients(fc, n_components=5, kernel="cosine")
    compute_gradients(fc, n_components=5)  # the normalized angle is >= 1/2: always connected


# --------------------------------------------------------------------------- estimator, alignment


def test_brain_gradients_fit_and_align():
    subjects = synthetic_series()
    bg = BrainGradients(n_components=6).fit(subjects)
    fc = connectivity(subjects)
    np.testing.assert_allclose(bg.connectivity_, fc)
    g, lam = compute_gradients(fc, n_components=6)
    np.testing.assert_array_equal(bg.gradients_, g)
    np.testing.assert_array_equal(bg.lambdas_, lam)
    np.testing.assert_array_equal(BrainGradients(n_components=6).fit(fc).gradients_, g)
    with pytest.raises(DataError, match="R x R connectivity"):
        BrainGradients().fit(subjects[0])

    q = scipy.linalg.qr(np.random.default_rng(1).standard_normal((6, 6)))[0]
    rotated = g @ q
    aligned = bg.align_to(rotated)
    np.testing.assert_allclose(aligned, rotated, atol=1e-12)
    assert bg.aligned_ is aligned
    np.testing.assert_allclose(procrustes_align(rotated, g), g, atol=1e-12)
    with pytest.raises(DataError, match="shape"):
        procrustes_align(g, g[:, :5])


# --------------------------------------------------------------------------- files and plots


def test_gradient_csv_round_trip(tmp_path):
    g = np.random.default_rng(0).standard_normal((12, 4))
    labels = [f"7Networks_LH_Vis_{i}" for i in range(12)]
    path = save_gradients_csv(g, tmp_path / "g.csv", labels)
    assert path.read_text().splitlines()[0] == "roi,g1,g2,g3,g4"
    back, back_labels = load_gradients_csv(path)
    np.testing.assert_array_equal(back, g)
    assert back_labels == labels

    bare = save_gradients_csv(g, tmp_path / "bare.csv")
    np.testing.assert_array_equal(np.loadtxt(bare, delimiter=","), g)  # the authors' format
    back, back_labels = load_gradients_csv(bare)
    np.testing.assert_array_equal(back, g)
    assert back_labels is None

    bg = BrainGradients(n_components=3).fit(synthetic_series(n_rois=12))
    back, _ = load_gradients_csv(bg.save_csv(tmp_path / "fit.csv"))
    np.testing.assert_array_equal(back, bg.gradients_)

    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(DataError, match="line 2"):
        load_gradients_csv(tmp_path / "ragged.csv")
    with pytest.raises(DataError, match="ROI labels"):
        save_gradients_csv(g, tmp_path / "x.csv", labels[:3])


def test_load_connectivity(tmp_path):
    fc = connectivity(synthetic_series(n_rois=8))
    np.save(tmp_path / "fc.npy", fc)
    np.savetxt(tmp_path / "fc.csv", fc, delimiter=",")
    np.savetxt(tmp_path / "fc.tsv", fc, delimiter="\t")
    for name in ("fc.npy", "fc.csv", "fc.tsv"):
        np.testing.assert_allclose(load_connectivity(tmp_path / name), fc, atol=1e-15)
    (tmp_path / "bad.csv").write_text("1,a\n2,3\n")
    with pytest.raises(DataError, match="bad.csv"):
        load_connectivity(tmp_path / "bad.csv")
    np.save(tmp_path / "ts.npy", np.zeros((8, 50)))
    with pytest.raises(DataError, match=r"ts.npy: expected a square R x R"):
        load_connectivity(tmp_path / "ts.npy")


def test_plot_gradients_writes_png(tmp_path, saved_figures):
    pytest.importorskip("matplotlib")
    g = np.random.default_rng(0).standard_normal((20, 3))
    nets = ["Vis"] * 10 + ["Default"] * 10
    out = plot_gradients(g, tmp_path / "g.png", roi_labels=[f"r{i}" for i in range(20)], networks=nets)
    fig = saved_figures[out]
    assert fig.texts[0].get_text() == "20 ROIs in gradient space"
    for ax, (a, b) in zip(fig.axes, [(0, 1), (0, 2), (1, 2)], strict=True):  # G1-G2, G1-G3, G2-G3
        assert (ax.get_xlabel(), ax.get_ylabel()) == (f"gradient {a + 1}", f"gradient {b + 1}")
        vis, default = ax.collections  # one colour per network, ROIs 0-9 and 10-19
        np.testing.assert_array_equal(vis.get_offsets(), g[:10][:, [a, b]])
        np.testing.assert_array_equal(default.get_offsets(), g[10:][:, [a, b]])
        ends = {int(np.argmin(g[:, a])), int(np.argmax(g[:, a])), int(np.argmin(g[:, b])), int(np.argmax(g[:, b]))}
        assert sorted(t.get_text() for t in ax.texts) == sorted(f"r{i}" for i in ends)  # the extreme ROIs named
    assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == ["Vis", "Default"]
    check_png(out, fig)
    two = plot_gradients(g[:, :2], tmp_path / "two.png")
    [ax] = saved_figures[two].axes
    [points] = ax.collections
    np.testing.assert_array_equal(points.get_offsets(), g[:, :2])
    np.testing.assert_array_equal(points.get_array(), g[:, 0])  # coloured by G1 without networks
    check_png(two, saved_figures[two])
    with pytest.raises(DataError, match="at least 2 gradients"):
        plot_gradients(g[:, :1], tmp_path / "one.png")
    with pytest.raises(DataError, match="networks"):
        plot_gradients(g, tmp_path / "n.png", networks=nets[:5])


# --------------------------------------------------------------------------- CLI


def test_cli_from_timeseries_and_fc(tmp_path, capsys, saved_figures):
    subjects = synthetic_series(n_rois=40, n_time=120)
    files = []
    for i, x in enumerate(subjects):
        files.append(str(tmp_path / f"sub-{i}.npy"))
        np.save(files[-1], x)
    out = tmp_path / "grad" / "gradients.csv"
    assert main(["gradients", *files, "--out", str(out), "--n-components", "5"]) == 0
    assert "40 ROIs x 5 gradients" in capsys.readouterr().out
    g, labels = load_gradients_csv(out)
    np.testing.assert_allclose(g, compute_gradients(connectivity(subjects), n_components=5)[0], atol=1e-12)
    assert labels is None
    g1_g2 = saved_figures[out.with_suffix(".png")].axes[0]  # the plot shows the gradients written
    np.testing.assert_allclose(g1_g2.collections[0].get_offsets(), g[:, :2], atol=1e-12)
    check_png(out.with_suffix(".png"), saved_figures[out.with_suffix(".png")])

    # --fc mode (header-less CSV), --no-plot, and --align-to a rotated reference
    fc_file = tmp_path / "fc.csv"
    np.savetxt(fc_file, connectivity(subjects), delimiter=",")
    q = scipy.linalg.qr(np.random.default_rng(2).standard_normal((5, 5)))[0]
    save_gradients_csv(g @ q, tmp_path / "ref.csv")
    out2 = tmp_path / "fc_grad.csv"
    assert (
        main(
            [
                "gradients",
                "--fc",
                str(fc_file),
                "--out",
                str(out2),
                "--n-components",
                "5",
                "--align-to",
                str(tmp_path / "ref.csv"),
                "--no-plot",
            ]
        )
        == 0
    )
    np.testing.assert_allclose(load_gradients_csv(out2)[0], g @ q, atol=1e-9)
    assert not out2.with_suffix(".png").exists()

    # time-by-roi files
    np.save(tmp_path / "t.npy", subjects[0].T)
    out3 = tmp_path / "t.csv"
    assert (
        main(
            [
                "gradients",
                str(tmp_path / "t.npy"),
                "--orientation",
                "time-by-roi",
                "--out",
                str(out3),
                "--n-components",
                "4",
                "--no-plot",
            ]
        )
        == 0
    )
    assert load_gradients_csv(out3)[0].shape == (40, 4)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["gradients", "--out", str(tmp_path / "g.csv")]) == 1
    assert "exactly one" in capsys.readouterr().err
    x = synthetic_series(n_subjects=1, n_rois=10)[0]
    np.save(tmp_path / "s.npy", x)
    assert main(["gradients", str(tmp_path / "s.npy"), "--out", str(tmp_path / "g.csv")]) == 1
    assert "30 gradients need at least 32 ROIs" in capsys.readouterr().err
