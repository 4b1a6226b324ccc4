"""Model cards (README.md of a bundle) from a tiny run, the evaluation they carry, and
push_to_hub against a mocked huggingface_hub (no network)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_cfg, tiny_run_model

from brainjepa.bundle import BrainJEPA, export_run
from brainjepa.cli import main
from brainjepa.convert import convert_official
from brainjepa.errors import BrainJEPAError, DataError
from brainjepa.evaluate.comparisons import comparison_rows
from brainjepa.modelcard import evaluation_summary, parameter_count
from brainjepa.pretrain import pretrain
from brainjepa.runio import read_metrics
from brainjepa.synthetic import simulate_cohort

pytestmark = pytest.mark.usefixtures("one_thread")

RUN_CONFIG = {
    "model": tiny_run_model(),
    "optim": {"batch_size": 4, "epochs": 2, "warmup_epochs": 0},
    "train": {"diagnose_every": 2, "log_every": 1, "checkpoint_every": 2},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 4-step run on 10 simulated scans of 8 subjects (one has 3 sessions)."""
    folder = tmp_path_factory.mktemp("modelcard")
    sim = simulate_cohort(10, 16, tr=2.0, minutes=2.0, seed=1)
    rows = []
    for i, x in enumerate(sim.timeseries):
        np.save(folder / f"s{i}.npy", x)
        rows.append(f"s{i}.npy,sub-{min(i, 7)},ses-{max(i - 6, 1)},2.0")
    (folder / "manifest.csv").write_text("path,subject,session,tr\n" + "\n".join(rows) + "\n")
    summary = pretrain(RUN_CONFIG, folder / "manifest.csv", folder / "run", progress=False)
    return Path(summary["run_dir"]), sim


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_exported_bundle_card_numbers_come_from_the_run(run):
    run_dir, sim = run
    card = (run_dir / "bundle" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "brainjepa" and meta["license"] == "mit"
    assert {"brainjepa", "fmri", "self-supervised"} <= set(meta["tags"])
    model = BrainJEPA.from_pretrained(run_dir / "bundle")
    assert f"**{parameter_count(model.encoder):,} parameters**" in card
    assert f"{parameter_count(model.predictor):,} parameters (included)" in card
    assert "16 ROIs" in card and "TR: 2 s" in card and "Window: 48 frames = 96 s" in card
    # the data summary: 10 scans of 8 subjects, 60 frames each at TR 2 s
    assert "Scans: 10 (training split), subjects: 8" in card
    assert f"Frames: {10 * sim.timeseries[0].shape[1]:,} at native TR(s) 2 s" in card
    # the recipe: every key that differs from the tiny preset, with both values
    assert "| `optim.batch_size` | `8` | `4` |" in card and "| `train.diagnose_every` | `100` | `2` |" in card
    assert "`model.size`" not in card  # unchanged keys are not listed
    # the diagnostics: the last diag record of metrics.jsonl (step 4, the last step)
    last = [r for r in read_metrics(run_dir / "metrics.jsonl") if "diag_context_gain" in r][-1]
    assert last["step"] == 4 and "At step 4" in card
    assert f"{last['diag_context_gain']:+.3f}" in card and f"{last['diag_position_share']:.3f}" in card
    assert f"feature std {last['diag_target_std']:.4g}" in card
    assert "Pretrained versus random initialisation: **not recorded**" in card
    assert model.provenance["data_summary"]["n_subjects"] == 8


def test_export_with_evaluation_and_diagnostics_up_to_the_step(run, tmp_path):
    run_dir, _ = run
    # per-seed probe records: the pretrained readout loses to its random init on every split
    records = []
    for seed in range(4):
        for method, value in (("brainjepa:fc", 0.40 + 0.01 * seed), ("random_init(best):fc", 0.60 + 0.02 * seed)):
            records.append({"method": method, "target": "age", "seed": seed, "metric": "pearson_r", "value": value})
    rows = [
        {"method": "brainjepa:fc", "target": "age", "metric": "pearson_r", "mean": 0.415},
        {"method": "random_init(best):fc", "target": "age", "metric": "pearson_r", "mean": 0.63},
    ]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rows": rows, "comparisons": comparison_rows(records)}))
    args = ["export", str(run_dir), "--step", "2", "--out", str(tmp_path / "b"), "--evaluation", str(results)]
    assert main(args) == 0
    card = (tmp_path / "b" / "README.md").read_text()
    # the step-2 checkpoint carries the diagnostics of step 2, not the later ones
    diag2 = next(r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] == 2)
    assert "At step 2" in card and f"{diag2['diag_context_gain']:+.3f}" in card
    assert "Exported at step 2 (epoch 1)" in card
    assert "| age | pearson_r | brainjepa:fc | random_init(best):fc | 0.415 | 0.630 | -0.215 [" in card
    assert "| 0/4 |" in card and "did not beat its random initialisation" in card
    prov = json.loads((tmp_path / "b" / "provenance.json").read_text())
    assert prov["evaluation"]["source"] == "results.json"
    assert prov["evaluation"]["comparisons"][0]["mean_diff"] == pytest.approx(-0.215)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [], "comparisons": []}))
    with pytest.raises(DataError, match="no comparison of the pretrained model"):
        export_run(run_dir, out=tmp_path / "c", evaluation=bad)
    with pytest.raises(DataError, match="not a readable probe results file"):
        evaluation_summary(tmp_path / "missing.json")


def test_card_without_a_run_says_not_recorded(tmp_path):
    model = BrainJEPA(tiny_cfg(n_gradients=3), np.random.default_rng(0).normal(size=(6, 3)))
    model.save_pretrained(tmp_path / "b")
    card = (tmp_path / "b" / "README.md").read_text()
    for section in ("## Pretraining data", "## Recipe", "## Diagnostics"):
        assert card.split(section)[1].split("##")[0].count("not recorded") >= 1, section
    assert "Normalisation: **not recorded**" in card
    assert "ROI labels: not recorded" in card and "TR: not recorded" in card


def test_converted_checkpoint_card(tmp_path):
    fixture = Path(__file__).parent / "fixtures" / "official_parity" / "r20_tiny"
    if not fixture.is_dir():
        pytest.skip("parity fixture missing")
    out = convert_official(fixture / "checkpoint.pth.tar", fixture / "gradients.csv", tmp_path / "conv")
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "other" and "the authors' checkpoint, converted" in card
    assert "UK Biobank" in card  # the converter's description of the authors' data
    assert "terms of their release apply" in card


class FakeHub(types.ModuleType):
    """A stand-in for huggingface_hub: records the calls and what the folder held."""

    def __init__(self, fail: bool = False):
        super().__init__("huggingface_hub")
        self.calls, self.fail = [], fail
        hub = self

        class HfApi:
            def __init__(self, token=None):
                hub.calls.append(("init", token))

            def create_repo(self, **kwargs):
                hub.calls.append(("create_repo", kwargs))

            def upload_folder(self, **kwargs):
                if hub.fail:
                    raise ConnectionError("no network")
                hub.uploaded = {p.name: p.read_bytes() for p in Path(kwargs["folder_path"]).iterdir()}
                hub.calls.append(("upload_folder", kwargs))
                return "commit-info"

        self.HfApi = HfApi


def test_push_to_hub_with_a_mocked_client(monkeypatch):
    model = BrainJEPA(tiny_cfg(n_gradients=3), np.random.default_rng(0).normal(size=(6, 3)), target_tr=0.8)
    hub = FakeHub()
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    assert model.push_to_hub("me/tiny", private=True, token="t0k") == "commit-info"
    (_, token), (_, create), (_, upload) = hub.calls
    assert token == "t0k" and create == {"repo_id": "me/tiny", "repo_type": "model", "private": True, "exist_ok": True}
    assert upload["repo_id"] == "me/tiny" and "README.md" in upload["allow_patterns"]
    assert {"config.json", "model.safetensors", "gradients.csv", "README.md"} <= set(hub.uploaded)
    assert b"library_name: brainjepa" in hub.uploaded["README.md"]
    assert not Path(upload["folder_path"]).exists()  # the temporary bundle is removed
    with pytest.raises(BrainJEPAError, match="not a Hugging Face Hub id"):
        model.push_to_hub("no-slash")
    monkeypatch.setitem(sys.modules, "huggingface_hub", FakeHub(fail=True))
    with pytest.raises(BrainJEPAError, match="failed \\(ConnectionError: no network\\)"):
        model.push_to_hub("me/tiny")
