"""Inputs that used to give silent wrong results: TRs, scaling, non-finite values, manifests,
interrupted outputs, and help that names real flags."""

from __future__ import annotations

import copy
import json
import logging
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_run_model, write_manifest

from brainjepa.bundle import BrainJEPA, InputWarning
from brainjepa.cli import COMMANDS, build_parser, main
from brainjepa.data import (
    ArrayCohort,
    check_cohort_for_model,
    open_cohort,
    prepare_store,
    read_manifest,
    report_scaling,
    resolve_target_tr,
    scaling_report,
)
from brainjepa.errors import BrainJEPAError, ConfigError, DataError
from brainjepa.io import read_timeseries, write_timeseries
from brainjepa.model import ModelConfig
from brainjepa.pretrain import Trainer, pretrain
from brainjepa.pretrain.config import load_config
from brainjepa.runio import Heartbeat
from brainjepa.transforms import cohort_offset_problem

R = 16
TINY = {
    "model": tiny_run_model(depth=1),
    "optim": {"batch_size": 4, "epochs": 10, "warmup_epochs": 1, "lr": 1e-3, "start_lr": 1e-4},
    "train": {"log_every": 1, "checkpoint_every": 100, "keep_last": 1, "precision": "fp32"},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**sections) -> dict:
    cfg = copy.deepcopy(TINY)
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def scan(seed, t=120, r=R, offset=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(r, t)).cumsum(axis=1) * 0.2 + rng.normal(size=(r, t))
    return (x * scale + offset).astype(np.float32)


def manifest(folder, rows, columns=("path", "subject", "tr")):
    return write_manifest(folder, rows, columns)


def cohort_files(folder, specs):
    """specs: [(tr, frames, offset)] -> manifest of .npy files with RepetitionTime sidecars."""
    rows = []
    for k, (tr, t, offset) in enumerate(specs):
        name = f"sub-{k:02d}.npy"
        write_timeseries(folder / name, scan(k, t, offset=offset), tr=tr, sidecar=tr is not None)
        rows.append([name, f"sub-{k:02d}", ""])
    return manifest(folder, rows)


def tiny_model(normalization=None, target_tr=2.0, n_timepoints=32):
    cfg = ModelConfig.from_size(
        "tiny", n_rois=R, n_timepoints=n_timepoints, n_gradients=4, embed_dim=32, depth=1, num_heads=2, patch_size=16
    )
    g = np.random.default_rng(0).normal(size=(R, 4)).astype(np.float32)
    return BrainJEPA(cfg, g, normalization=normalization or {"method": "zscore"}, target_tr=target_tr)


# ------------------------------------------------------------------------------ 1. TR


def test_target_tr_auto_is_the_default_and_other_values_are_checked():
    assert load_config("tiny")["data"]["target_tr"] == "auto"
    assert load_config("tiny", ["data.target_tr=null"])["data"]["target_tr"] is None
    assert load_config("tiny", ["data.target_tr=2"])["data"]["target_tr"] == 2.0
    for bad in ("fast", "0", "-1"):
        with pytest.raises(ConfigError, match="auto, null or a positive number"):
            load_config("tiny", [f"data.target_tr={bad}"])


def test_resolve_target_tr_rules(caplog):
    def cohort(trs):
        return ArrayCohort(
            [scan(k) for k in range(len(trs))],
            subjects=[f"s{k}" for k in range(len(trs))],
            trs=trs,
            n_rois=R,
            paths=[f"f{k}.npy" for k in range(len(trs))],
        )

    assert resolve_target_tr("auto", cohort([0.72, 0.72])) == 0.72
    with caplog.at_level(logging.INFO):
        assert resolve_target_tr("auto", cohort([0.72, 2.0, 0.72])) == 2.0  # the coarsest
    assert "resampling every scan to 2 s" in caplog.text
    assert resolve_target_tr("auto", cohort([None, None])) is None  # windows in frames
    with pytest.raises(DataError, match=r"f1\.npy: no TR known .*0\.72 s"):
        resolve_target_tr("auto", cohort([0.72, None, 2.0]))
    assert resolve_target_tr(1.5, cohort([0.72, 2.0])) == 1.5
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resolve_target_tr(None, cohort([0.72, 2.0])) is None
    assert "different durations" in caplog.text


def test_mixed_tr_cohort_trains_at_one_tr_recorded_in_run_and_bundle(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    m = cohort_files(data, [(1.0, 120, 0.0) if k % 2 else (2.0, 60, 0.0) for k in range(8)])
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        pretrain(_config(), m, run, max_steps=2, stop_after=1, progress=False)
    assert "resampling every scan to 2 s" in caplog.text
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["target_tr"] == 2.0
    # resuming with the default (auto) keeps the TR the run resolved, not a config change
    pretrain(_config(), m, run, max_steps=2, progress=False, resume=True)
    assert json.loads((run / "bundle" / "config.json").read_text())["target_tr"] == 2.0


def test_embedding_refuses_a_scan_without_tr_or_too_short_at_the_model_tr_by_name(tmp_path):
    model = tiny_model(target_tr=2.0, n_timepoints=32)
    good = open_cohort([scan(0, 80), scan(1, 80)], tr=2.0)
    check_cohort_for_model(model, good)
    no_tr = open_cohort([scan(0, 80)])
    no_tr.paths = ["a.npy"]
    with pytest.raises(DataError, match=r"a\.npy: no TR known .* model works at TR 2 s"):
        check_cohort_for_model(model, no_tr)
    # 24 frames at 1 s are 12 at the model's 2 s, less than one 16-frame patch: named, up front
    short = open_cohort([scan(0, 24)], tr=1.0)
    short.paths = ["short.npy"]
    with pytest.raises(DataError, match=r"short\.npy: 12 time points at the model's TR 2 s"):
        check_cohort_for_model(model, short)
    # the model's own preparation names the series too
    with pytest.raises(DataError, match=r"sub-9\.npy: 20 time points .*shorter than the model's window"):
        model.prepare(scan(0, 40), tr=1.0, name="sub-9.npy")


# ------------------------------------------------------------------------------ 2. scaling


def test_site_offset_detector():
    levels = [1e4, 1e4 + 5, 1.4e4, 1.4e4 + 5]
    assert "site or scanner offsets" in cohort_offset_problem(levels, [20] * 4, list("abcd"))
    assert cohort_offset_problem([1e4, 1e4 + 5, 1e4 + 10, 1e4 + 2], [20] * 4, list("abcd")) is None


def _raw_cohort(n=6):
    arrays = [scan(k, offset=(1e4 if k % 2 else 1.4e4), scale=20) for k in range(n)]
    return open_cohort(arrays, tr=2.0)


def test_scaling_decisions_per_normalisation():
    raw = _raw_cohort()
    assert scaling_report(raw, "none")[0] == "error"
    with pytest.raises(ConfigError, match="data.normalization=(zscore|center|psc)"):
        report_scaling(raw, "none")
    severity, message = scaling_report(raw, "robust")
    assert severity == "warning" and "site or scanner offsets" in message
    assert scaling_report(raw, "zscore")[0] == "info"
    assert scaling_report(open_cohort([scan(k) for k in range(4)], tr=2.0), "robust") == ("ok", None)


def test_prepare_warns_about_unscaled_bold_and_pretrain_refuses_it_unscaled(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    m = cohort_files(data, [(2.0, 60, 1e4 if k % 2 else 1.4e4) for k in range(8)])
    for k in range(8):  # fluctuations of a few percent, as in BOLD
        x = np.load(data / f"sub-{k:02d}.npy")
        np.save(data / f"sub-{k:02d}.npy", (x - x.mean()) * 20 + x.mean())
    with caplog.at_level(logging.WARNING):
        prepare_store(m, tmp_path / "store")
    assert "look like unscaled BOLD" in caplog.text and re.search(r"data\.normalization[=:]", caplog.text)
    with pytest.raises(ConfigError, match="normalization=none would feed them"):
        pretrain(
            _config(data={"normalization": "none"}), tmp_path / "store", tmp_path / "run", max_steps=1, progress=False
        )


def test_model_prepare_names_the_series_and_never_recommends_itself():
    scaled = scan(0, 80)
    from brainjepa.transforms import RobustScaler

    model = tiny_model(normalization=RobustScaler().fit([scaled]).to_dict())
    # raw BOLD for a model whose statistics came from scaled data: refused, by name
    with pytest.raises(DataError, match=r"sub-07\.npy: after the model's robust scaling"):
        model.prepare(scaled * 20 + 1e4, tr=2.0, name="sub-07.npy")
    # mildly off-scale: a warning that does not ask for the call just made
    with pytest.warns(InputWarning) as record:
        x = model.prepare(scaled + 30 * np.median(model.normalization["iqr"]), tr=2.0, name="s.npy")
    text = " ".join(str(w.message) for w in record)
    assert "s.npy" in text and "model.prepare(series" not in text and "model.prepare applied" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        model.embed(torch.stack([x, x]))  # checked once, in prepare: no second warning


# ------------------------------------------------------------------------------ 3. finite


def test_absurd_and_overflowing_values_are_refused_by_name(tmp_path):
    x = scan(0)
    np.save(tmp_path / "huge.npy", x * 1e30)
    with pytest.raises(DataError, match=r"huge\.npy: values up to .*beyond any BOLD signal"):
        open_cohort([read_timeseries(tmp_path / "huge.npy", tr=2.0)])
    np.save(tmp_path / "f64.npy", x.astype(np.float64) * 1e40)
    with pytest.raises(DataError, match=r"f64\.npy: .*overflow float32"):
        read_timeseries(tmp_path / "f64.npy")
    np.save(tmp_path / "offset.npy", x + 1e8)
    with pytest.raises(DataError, match="float32 keeps about 7 digits"):
        open_cohort([read_timeseries(tmp_path / "offset.npy", tr=2.0)])
    m = manifest(tmp_path, [["huge.npy", "a", "2.0"]])
    with pytest.raises(DataError, match=r"huge\.npy"):
        prepare_store(m, tmp_path / "store")


def test_encoder_output_and_weights_are_checked_for_nan(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        next(model.encoder.parameters()).fill_(float("nan"))
    with pytest.raises(DataError, match="encoder's output is NaN/Inf .*weights hold NaN"):
        model.embed(torch.randn(2, R, 32))
    folder = model.save_pretrained(tmp_path / "b")
    with pytest.raises(BrainJEPAError, match="holds NaN/Inf values"):
        BrainJEPA.from_pretrained(folder)


def test_nan_loss_names_the_batch_scans(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    m = cohort_files(data, [(2.0, 60, 0.0)] * 8)
    real_step = Trainer.step

    def step(self, micro, step, monitor=False):
        out = real_step(self, micro, step, monitor)
        if step == 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Trainer, "step", step)
    with pytest.raises(BrainJEPAError, match=r"loss became nan at step 2, on a batch of .*sub-\d\d\.npy"):
        pretrain(_config(train={"log_every": 10}), m, tmp_path / "run", max_steps=4, progress=False)


def test_metrics_from_the_first_step_and_a_heartbeat_without_progress_bar(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    m = cohort_files(data, [(2.0, 60, 0.0)] * 8)
    run = tmp_path / "run"
    pretrain(_config(train={"log_every": 50}), m, run, max_steps=3, progress=False)
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert steps[0] == 1 and steps[-1] == 3
    now = [0.0]
    beat = Heartbeat(100, every=30, clock=lambda: now[0])
    with caplog.at_level(logging.INFO):
        assert not beat(1, 0.5)
        now[0] = 29.0
        assert not beat(2, 0.5)
        now[0] = 31.0
        assert beat(3, 0.4)
    assert "step 3/100" in caplog.text and "loss 0.4000" in caplog.text


# ------------------------------------------------------------------------------ 4. manifests


@pytest.mark.parametrize(
    "content, message",
    [
        ("path,subject,site\na.npy,a,M\xfcnchen\n".encode("latin-1"), r"line 2: byte 0xfc is not UTF-8"),
        (b"", r"the manifest is empty"),
        (b"path,subject\n", r"header but lists no files"),
        (b"path,subject,age,age\na.npy,a,1,2\n", r"line 1: column 'age' appears 2 times"),
        (b"path,subject\na.npy,a,extra\n", r"line 2: 3 fields but the header has 2"),
        (b"file,subject\na.npy,a\n", r"line 1: a manifest needs a 'path' column"),
    ],
)
def test_bad_manifests_are_errors_naming_the_line(tmp_path, content, message):
    write_timeseries(tmp_path / "a.npy", scan(0), tr=2.0)
    (tmp_path / "m.csv").write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_manifest(tmp_path / "m.csv")


def test_a_file_listed_twice_is_an_error(tmp_path):
    write_timeseries(tmp_path / "a.npy", scan(0), tr=2.0)
    m = manifest(tmp_path, [["a.npy", "s1", ""], ["./a.npy", "s2", ""]])
    with pytest.raises(DataError, match=r"line 3: .*a\.npy is listed twice .*line 2"):
        open_cohort(m)


@pytest.mark.parametrize(
    "header, message",
    [
        (lambda h: h[:3] + [h[2]] + h[4:], r"line 1 names column 3 and column 4 both 'r02'"),
        (lambda h: [""] + h[1:], r"line 1, column 1 has no name"),
        (lambda h: [str(i) for i in range(len(h))], r"line 1 is 0, 1, 2, \.\.\. \(column numbers"),
    ],
)
def test_timeseries_headers_that_are_not_roi_names(tmp_path, header, message):
    x = scan(0)
    names = header([f"r{i:02d}" for i in range(R)])
    with open(tmp_path / "s_timeseries.tsv", "w") as f:
        f.write("\t".join(names) + "\n")
        f.writelines("\t".join(f"{v:.5g}" for v in row) + "\n" for row in x.T)
    with pytest.raises(DataError, match=message):
        read_timeseries(tmp_path / "s_timeseries.tsv")


def test_gradients_from_a_manifest_and_pretrain_with_a_gradient_file(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    m = cohort_files(data, [(2.0, 60, 0.0)] * 8)
    grads = tmp_path / "g.csv"
    assert main(["gradients", str(m), "--out", str(grads), "--n-components", "4", "--no-plot"]) == 0
    assert "8 training scans" in capsys.readouterr().out
    from brainjepa.gradients import load_gradients_csv, save_gradients_csv

    computed, labels = load_gradients_csv(grads)
    grads = tmp_path / "mine.csv"  # a file unlike what pretrain would compute, to see it used
    save_gradients_csv(np.random.default_rng(1).normal(size=computed.shape), grads, labels)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config()))
    run = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                str(cfg),
                "--data",
                str(m),
                "--out",
                str(run),
                "--max-steps",
                "1",
                "--no-progress",
                "--gradients",
                str(grads),
            ]
        )
        == 0
    )
    assert np.allclose(load_gradients_csv(run / "gradients.csv")[0], load_gradients_csv(grads)[0])


# ------------------------------------------------------------------------------ 5. atomic outputs


def test_an_interrupted_prepare_is_recognised_and_rerun_with_overwrite(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    m = cohort_files(data, [(2.0, 60, 0.0)] * 4)
    store = tmp_path / "store"
    # a process that dies in the middle of packing (no clean-up runs, as with SIGKILL)
    script = textwrap.dedent(f"""
        import os
        from brainjepa.data import iter_valid, pack_store, read_manifest
        records, _ = read_manifest({str(m)!r})
        def scans():
            for k, item in enumerate(iter_valid(records)):
                if k == 2:
                    os._exit(3)
                yield item
        pack_store(scans(), {str(store)!r})
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 3
    with pytest.raises(DataError, match="interrupted"):
        open_cohort(store)
    with pytest.raises(DataError, match="interrupted .*--overwrite"):
        prepare_store(m, store)
    prepare_store(m, store, overwrite=True)
    assert len(open_cohort(store)) == 4 and not (tmp_path / ".store.incomplete").exists()


def test_embed_writes_nothing_when_embeddings_are_not_finite(tmp_path, monkeypatch, capsys):
    model = tiny_model(target_tr=2.0)
    bundle = model.save_pretrained(tmp_path / "bundle")
    data = tmp_path / "data"
    data.mkdir()
    m = cohort_files(data, [(2.0, 60, 0.0)] * 3)

    from brainjepa.model import BrainEncoder

    real_forward = BrainEncoder.forward

    def nan_forward(self, *args, **kwargs):
        return real_forward(self, *args, **kwargs) * float("nan")

    monkeypatch.setattr(BrainEncoder, "forward", nan_forward)
    out = tmp_path / "emb.npz"
    assert main(["embed", "--model", str(bundle), "--data", str(m), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "sub-00.npy: the encoder's output is NaN/Inf" in err  # found before anything is saved, by name
    assert not out.exists() and not list(tmp_path.glob(".emb.npz*"))
    # left out with --on-error skip, which then has nothing to write
    assert main(["embed", "--model", str(bundle), "--data", str(m), "--out", str(out), "--on-error", "skip"]) == 1
    assert "no usable scans, all 3 were skipped" in capsys.readouterr().err and not out.exists()


def test_an_interrupted_bundle_save_is_recognised(tmp_path, monkeypatch):
    import brainjepa.bundle as bundle_module

    model = tiny_model()
    real = bundle_module.write_json_atomic

    def failing(path, value, **kwargs):
        if path.name == "config.json":
            raise KeyboardInterrupt
        real(path, value, **kwargs)

    monkeypatch.setattr(bundle_module, "write_json_atomic", failing)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "b")
    monkeypatch.setattr(bundle_module, "write_json_atomic", real)
    assert not (tmp_path / "b").exists()
    with pytest.raises(BrainJEPAError, match="not completed .*interrupted"):
        BrainJEPA.from_pretrained(tmp_path / "b")
    model.save_pretrained(tmp_path / "b")
    assert BrainJEPA.from_pretrained(tmp_path / "b").config.n_rois == R


# ------------------------------------------------------------------------------ 7. help


def test_every_verb_help_shows_defaults_and_ends_with_examples():
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    assert len(verbs) == len(COMMANDS)
    for verb, sub in verbs.items():
        text = sub.format_help()
        tail = re.split(r"\n\nexamples?:\n", text.rstrip())
        assert len(tail) == 2, verb
        assert all(line.strip().startswith(f"brainjepa {verb}") for line in tail[1].splitlines()), verb
        for action in sub._actions:
            if (
                action.option_strings
                and action.default not in (None, False, "==SUPPRESS==")
                and not isinstance(action.default, list)
            ):
                assert "default" in (sub._get_formatter()._get_help_string(action) or "").lower(), (
                    verb,
                    action.option_strings,
                )


def test_hints_name_flags_of_the_command_that_printed_them(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    m = cohort_files(data, [(2.0, 60, 0.0)] * 4)
    assert main(["pretrain", "tiny", "--data", str(m), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "--set model.n_gradients=" in err and "--n-components" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_text_series_cut_short_is_refused(tmp_path):
    x = scan(0, t=20)
    path = write_timeseries(tmp_path / "s_timeseries.tsv", x, tr=2.0)
    raw = path.read_bytes()
    path.write_bytes(raw[:-4])  # the last value loses its last digits: 0.3553727 -> 0.355
    with pytest.raises(DataError, match=r"s_timeseries\.tsv: the last line has no line break"):
        read_timeseries(path)


def test_per_scan_model_refuses_series_in_other_units_by_name():
    from brainjepa.data import fit_scaler
    from brainjepa.transforms import normalization_to_dict

    train = open_cohort([scan(k, 80) for k in range(4)], tr=2.0)
    model = tiny_model(normalization=normalization_to_dict("center", fit_scaler(train, method="center")))
    model.prepare(scan(9, 80), tr=2.0)  # the training units: fine
    # the offset is removed by centring, but unscaled BOLD keeps the scanner's units (x20 here)
    with pytest.raises(DataError, match=r"raw-07\.npy: after the model's center scaling .*IQR\) is .*10 times off"):
        model.prepare(scan(7, 80, offset=1e4, scale=20), tr=2.0, name="raw-07.npy")
    with pytest.warns(InputWarning, match=r"s\.npy: after the model's center scaling the typical ROI spread"):
        model.prepare(scan(7, 80, scale=7), tr=2.0, name="s.npy")
