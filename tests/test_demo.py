"""Report figures and ``brainjepa demo --quick`` end to end (the README's first command)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import check_png, line_data

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from brainjepa.cli import main  # noqa: E402
from brainjepa.evaluate import comparison_rows  # noqa: E402
from brainjepa.pretrain.plots import plot_loss_curve  # noqa: E402
from brainjepa.report import (  # noqa: E402
    comparisons_markdown,
    pca,
    plot_embedding_pca,
    plot_results,
    reading,
    results_markdown,
    save_attention,
    write_report,
)


def _rows():
    rows = []
    for target, metrics in (("age", ("mse", "pearson_r", "r2")), ("patient", ("balanced_acc", "auroc"))):
        for i, method in enumerate(("brainjepa:fc", "random_init(best):fc", "random_init#0:fc", "fc_window")):
            rows += [
                {"method": method, "target": target, "metric": m, "mean": 0.5 + 0.1 * i, "std": 0.05, "n_seeds": 3}
                for m in metrics
            ]
    return rows


def test_pca_matches_svd_of_centred_data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 6)) @ np.diag([5, 3, 1, 0.5, 0.2, 0.1]) + 7
    scores, ratio = pca(X)
    Xc = X - X.mean(0)
    eig = np.sort(np.linalg.eigvalsh(Xc.T @ Xc))[::-1]
    np.testing.assert_allclose(ratio, eig[:2] / eig.sum(), rtol=1e-8)
    np.testing.assert_allclose(scores.var(0) * len(X), eig[:2], rtol=1e-8)


def _bars(ax) -> dict[str, float]:
    """Bar heights of a matplotlib Axes by their tick label."""
    return {t.get_text(): round(p.get_height(), 6) for t, p in zip(ax.get_xticklabels(), ax.patches)}


def test_figures_and_markdown(tmp_path, saved_figures):
    records = [{"step": s, "loss": 1 / (s + 1), "lr": 1e-3} for s in range(0, 50, 5)]
    steps, losses = [float(r["step"]) for r in records], [r["loss"] for r in records]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for path in (plot_loss_curve(records, tmp_path / "loss.png"), plot_loss_curve(metrics, tmp_path / "loss2.png")):
        loss_axes, lr_axes = saved_figures[path].axes
        assert line_data(loss_axes) == [(steps, losses)] and line_data(lr_axes) == [(steps, [1e-3] * 10)]
        check_png(path, saved_figures[path])

    X = np.random.default_rng(0).normal(size=(30, 8))
    age, patient = np.linspace(20, 80, 30), np.arange(30) % 2
    path = plot_embedding_pca(X, {"age": age, "patient": patient}, tmp_path / "pca.png")
    scores, ratio = pca((X - X.mean(0)) / X.std(0))
    age_axes, patient_axes = saved_figures[path].axes[:2]  # then the age colour bar
    [points] = age_axes.collections
    np.testing.assert_allclose(points.get_offsets(), scores, atol=1e-12)
    np.testing.assert_allclose(points.get_array(), age)  # coloured by age
    assert age_axes.get_xlabel() == f"PC1 ({ratio[0]:.0%})"
    for k, group in enumerate(patient_axes.collections):  # one colour per class
        np.testing.assert_allclose(group.get_offsets(), scores[patient == k], atol=1e-12)
    check_png(path, saved_figures[path])

    path = plot_results(_rows(), tmp_path / "results.png")
    panels = saved_figures[path].axes
    assert [ax.get_title() for ax in panels] == ["age: r", "age: R2", "patient: BACC", "patient: AUROC"]
    for ax in panels:  # mean per method; single random-init seeds left out
        assert _bars(ax) == {"brainjepa\nfc": 0.5, "random_init(best)\nfc": 0.6, "fc_window": 0.8}
    assert saved_figures[path].texts[0].get_text() == "test metrics, mean ± std over 3 seeds"
    check_png(path, saved_figures[path])

    values = np.array([1.1, 0.9, 1.0, 1.0])
    paths = save_attention(tmp_path / "att", values, ["a", "b", "c", "d"], ["X", "Y", "X", "Y"])
    assert paths["network_csv"].read_text().splitlines() == ["network,attention,n_rois", "X,1.050000,2", "Y,0.950000,2"]
    assert paths["png"].name == "network_attention.png"
    assert _bars(saved_figures[paths["png"]].axes[0]) == {"X": 1.05, "Y": 0.95}
    check_png(paths["png"], saved_figures[paths["png"]])
    roi_png = save_attention(tmp_path / "att2", values, None, None)["png"]
    assert roi_png.name == "roi_attention.png"
    assert _bars(saved_figures[roi_png].axes[0]) == {"roi0": 1.1, "roi1": 0.9, "roi2": 1.0, "roi3": 1.0}
    check_png(roi_png, saved_figures[roi_png])

    md = results_markdown(_rows())
    assert "| method | MSE | r | R2 |" in md and "| random_init#0:fc | 0.700 ± 0.050 |" in md
    assert "**patient** (test split, mean ± std over 3 seeds)" in md
    report = write_report(tmp_path / "report.md", "T", [("Results", md)])
    assert report.read_text().startswith("# T\n\n## Results\n")


def _auroc_records(values: dict) -> list[dict]:
    return [
        {"method": m, "target": "dx", "seed": seed, "metric": "auroc", "value": v}
        for m, vals in values.items()
        for seed, v in enumerate(vals)
    ]


def test_paired_reading_tells_the_truth_either_way():
    records = _auroc_records(
        {
            "brainjepa:mean": [0.5, 0.5, 0.5, 0.5],
            "brainjepa:fc": [0.7, 0.8, 0.9, 0.8],
            "random_init#0:fc": [0.5, 0.6, 0.6, 0.6],
            "random_init#1:fc": [0.6, 0.6, 0.7, 0.5],
            "random_init#1:mean": [0.4, 0.4, 0.4, 0.4],
            "fc_full": [0.9, 0.9, 0.9, 0.9],
        }
    )
    text = reading(records)
    # best readout vs best init seed (over seeds and readouts), with the paired test
    assert "**dx** (AUROC)" in text and "`brainjepa:fc` (0.800) beats" in text
    assert "`random_init#1:fc` (0.600)" in text and "+0.200" in text and "p 0.0" in text
    assert "better on 4 of 4 splits" in text
    # the other way round: worse, and no difference
    worse = _auroc_records({"brainjepa:fc": [0.5, 0.55, 0.6, 0.5], "random_init#2:roi": [0.7, 0.8, 0.9, 0.8]})
    assert "`brainjepa:fc` (0.537) is worse than the best random-init seed" in reading(worse)
    tie = _auroc_records({"brainjepa:fc": [0.7, 0.6, 0.8, 0.6], "random_init#0:fc": [0.6, 0.7, 0.7, 0.7]})
    assert "does not significantly differ from" in reading(tie)
    md = comparisons_markdown(comparison_rows(records))
    assert md.startswith("| target | metric | method | baseline |")
    assert "| dx | AUROC | brainjepa:fc | fc_full | 4 | -0.100 |" in md


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed and "fc_window" in printed
    for name in (
        "report.md",
        "results.json",
        "gradients.csv",
        "figures/loss.png",
        "figures/gradients.png",
        "figures/embedding_pca.png",
        "figures/results.png",
        "attention/network_attention.png",
        "attention/network_attention.csv",
        "run/bundle/model.safetensors",
        "data/eval/manifest.csv",
        "data/pretrain/manifest.csv",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    rows = saved["rows"]
    readouts = ("mean", "roi", "fc")
    bases = ("brainjepa", "random_init#0", "random_init#1", "random_init#2", "random_init(best)", "random_init(mean)")
    encoders = {f"{b}:{r}" for b in bases for r in readouts}
    traits = encoders | {"fc_full", "fc_window", "amplitude"}
    states = encoders | {"fc_window", "amplitude", "level"}  # brain states: every window a sample
    assert {(r["method"], r["target"]) for r in rows} == {(m, t) for m in traits for t in ("age", "patient")} | {
        (m, "state") for m in states
    }
    assert set(rows[0]) == {"method", "target", "metric", "mean", "std", "n_seeds"}
    assert all(r["n_seeds"] == 3 for r in rows if r["metric"] != "auroc")
    assert len(saved["comparisons"]) == 3 * len(readouts) * 5
    report = (out / "report.md").read_text()
    results = report.split("## Results")[1].split("## ")[0]
    for target in ("age", "patient", "state"):  # one verdict per target, with its p value
        line = next(ln for ln in results.splitlines() if ln.startswith(f"- **{target}**"))
        assert "the best random-init seed" in line and "paired t-test p" in line
        assert any(v in line for v in ("beats", "is worse than", "does not significantly differ"))
    assert "| target | metric | method | baseline | n | mean diff | 95% CI | p (paired t) | wins |" in results
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / image).is_file(), image
    networks = (out / "attention/network_attention.csv").read_text().splitlines()[1:]
    rois = (out / "data/eval/rois.tsv").read_text().splitlines()[1:]
    assert len(networks) == len({line.split("\t")[2] for line in rois}) > 1  # one bar per network
    # a second run refuses to overwrite silently
    assert main(["demo", "--quick", "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
