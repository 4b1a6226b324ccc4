"""Model bundles: round trips, run export, input checks, the authors' checkpoint converter, safety."""

from __future__ import annotations

import json
import os
import shlex
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

import brainjepa
from brainjepa.bundle import (
    BrainJEPA,
    InputWarning,
    export_run,
    load_model,
    load_torch_file,
)
from brainjepa.bundle_files import sha256_json
from brainjepa.cli import main
from brainjepa.convert import convert_official
from brainjepa.errors import BrainJEPAError, ConfigError, DataError
from brainjepa.gradients import save_gradients_csv
from brainjepa.model import BrainEncoder, BrainPredictor, ModelConfig
from brainjepa.transforms import RobustScaler, center_window, normalize, resample_tr, zscore

FIXTURES = Path(__file__).parent / "fixtures" / "official_parity"
R = 6


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        n_rois=R,
        n_timepoints=32,
        embed_dim=32,
        depth=1,
        num_heads=2,
        predictor_embed_dim=16,
        predictor_depth=1,
        predictor_num_heads=2,
    )
    return ModelConfig(**{**base, **kw})


def labels(n=R):
    return [f"roi{i}" for i in range(n)]


def robust_norm(seed=0):
    rng = np.random.default_rng(seed)
    return RobustScaler().fit([rng.normal(3.0, 2.0, (R, 300)) for _ in range(3)]).to_dict()


def tiny_model(predictor=True, normalization=None, **kw) -> BrainJEPA:
    torch.manual_seed(0)
    return BrainJEPA(
        tiny_cfg(**kw),
        torch.randn(R, 30),
        normalization=normalization or robust_norm(),
        roi_labels=labels(),
        target_tr=2.0,
        predictor=predictor,
        info={"loss": "smooth_l1", "encoder_weights": "target_encoder"},
    ).eval()


def scaled_batch(b=2, t=32, seed=1):
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 0.75, (b, R, t)).astype(np.float32))


def assert_no_warnings(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kw)


# --- bundles ---------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model()
    out = model.save_pretrained(tmp_path / "b", provenance={"training_data": "simulated"})
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "gradients.csv", "normalization.json", "provenance.json", "README.md"]
    )
    config = json.loads((out / "config.json").read_text())
    arch = config["architecture"]
    assert (arch["n_rois"], arch["patch_size"], arch["n_timepoints"], arch["pos_minmax"]) == (R, 16, 32, True)
    assert config["target_tr"] == 2.0 and config["loss"] == "smooth_l1"
    assert config["normalization"] == "robust" and config["brainjepa_version"] == brainjepa.__version__
    assert config["encoder_weights"] == "target_encoder" and config["predictor"] is True
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["training_data"] == "simulated" and len(prov["model_sha256"]) == 64
    assert prov["config_sha256"] == sha256_json(arch)

    loaded = brainjepa.BrainJEPA.from_pretrained(out, device="cpu")
    assert isinstance(loaded, BrainJEPA) and not loaded.training
    assert loaded.config == model.config and loaded.roi_labels == labels()
    assert loaded.target_tr == 2.0 and loaded.normalization == model.normalization
    assert loaded.info["loss"] == "smooth_l1" and loaded.provenance == prov
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    x = scaled_batch()
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x), model.encode(x), atol=1e-6)  # BLAS alignment noise only

    bare = tiny_model(predictor=False).save_pretrained(tmp_path / "bare")
    assert not any(k.startswith("predictor.") for k in load_file(str(bare / "model.safetensors")))
    assert BrainJEPA.from_pretrained(bare).predictor is None


def test_pos_minmax_false_round_trips(tmp_path):
    """A model without the authors' min-max rescaling of the spatial positions keeps it off
    through save_pretrained / from_pretrained: the flag, and the encoder's and the predictor's
    outputs (which the flag changes)."""
    model = tiny_model(pos_minmax=False)
    out = model.save_pretrained(tmp_path / "b")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"]["pos_minmax"] is False and "min-max" not in config["pos_embed"]
    loaded = BrainJEPA.from_pretrained(out)
    assert loaded.config.pos_minmax is False and loaded.config == model.config
    assert loaded.encoder.pos_embed.minmax is False and loaded.predictor.pos_embed.minmax is False
    x = scaled_batch()
    context, target = torch.tensor([[0, 2, 5, 7, 9]] * 2), torch.tensor([[1, 3, 4]] * 2)
    with torch.no_grad():
        tokens = model.encode(x)
        assert torch.allclose(loaded.encode(x), tokens, atol=1e-6)
        z = model.encoder(x, context)
        assert torch.allclose(loaded.encoder(x, context), z, atol=1e-6)
        pred = model.predictor(z, context, target)
        assert torch.allclose(loaded.predictor(z, context, target), pred, atol=1e-6)
        # the same weights with the flag on give other outputs: the flag is what was kept
        minmax = tiny_model(pos_minmax=True)
        minmax.load_state_dict(loaded.state_dict())
        assert (minmax.encode(x) - tokens).abs().max() > 1e-2
        assert (minmax.predictor(z, context, target) - pred).abs().max() > 1e-2


def test_encode_and_embed(tmp_path):
    model = tiny_model()
    x = scaled_batch(b=3)
    with torch.no_grad():
        tokens = assert_no_warnings(model.encode, x)
        emb = model.embed(x.numpy())  # numpy input is accepted too
    assert tokens.shape == (3, R * 2, 32)
    assert torch.equal(tokens, model.encoder(x))
    assert emb.shape == (3, 32)
    assert torch.allclose(emb, F.layer_norm(tokens.mean(1), (32,), eps=1e-6), atol=1e-6)
    assert torch.allclose(emb.mean(1), torch.zeros(3), atol=1e-5)


def test_prepare_resamples_windows_and_normalises():
    model = tiny_model()
    rng = np.random.default_rng(0)
    series = rng.normal(3.0, 2.0, (R, 120)).astype(np.float32)
    scaler = RobustScaler.from_dict(model.normalization)
    x = model.prepare(series, tr=0.8)
    expected = normalize(center_window(resample_tr(series, 0.8, 2.0), 32), "robust", scaler)
    assert isinstance(x, torch.Tensor) and x.shape == (R, 32)
    assert np.allclose(x.numpy(), expected, atol=1e-6)
    assert np.allclose(
        model.prepare(series, tr=2.0, window="start").numpy(), scaler.transform(series[:, :32]), atol=1e-6
    )
    assert np.allclose(
        model.prepare(series, tr=2.0, normalization="zscore").numpy(), zscore(center_window(series, 32)), atol=1e-6
    )
    with pytest.warns(InputWarning, match="tr=") as caught:
        model.prepare(series)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    with pytest.raises(DataError, match="ROIs"):
        model.prepare(series[:4], tr=2.0)
    with pytest.raises(DataError, match="shorter"):
        model.prepare(series[:, :20], tr=2.0)
    with pytest.raises(ConfigError, match="window"):
        model.prepare(series, tr=2.0, window="random")
    with pytest.raises(ConfigError, match="needs statistics"):
        model.prepare(series, tr=2.0, normalization="robust")


def test_unknown_normalization_refuses_to_guess_until_set(tmp_path):
    model = tiny_model(normalization={"method": "unknown", "note": "scale like the authors"})
    series = np.random.default_rng(0).normal(3.0, 2.0, (R, 40)).astype(np.float32)
    with pytest.raises(ConfigError, match="scale like the authors"):
        model.prepare(series, tr=2.0)
    scaler = RobustScaler().fit([series])
    model.set_normalization(scaler)
    assert np.allclose(model.prepare(series, tr=2.0).numpy(), scaler.transform(center_window(series, 32)))
    loaded = BrainJEPA.from_pretrained(model.save_pretrained(tmp_path / "b"))
    assert loaded.normalization["method"] == "robust"
    assert np.allclose(loaded.normalization["median"], scaler.median_)
    with pytest.raises(DataError, match="statistics for 4 ROIs"):
        model.set_normalization(RobustScaler().fit([series[:4]]))
    with pytest.raises(ConfigError, match="one of"):
        model.set_normalization("minmax")


# --- input checks ----------------------------------------------------------------------------


def test_check_input_errors():
    model = tiny_model()
    with pytest.raises(DataError, match="trained on 6"):
        model.encode(torch.randn(2, R + 1, 32))
    with pytest.raises(DataError, match="x\\[None\\]"):
        model.encode(torch.randn(R, 32))
    with pytest.raises(DataError, match="needs 32"):
        model.encode(torch.randn(2, R, 16))
    x = scaled_batch()
    x[0, 1, 3] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        model.encode(x)


def test_check_input_warnings():
    model = tiny_model()
    x = scaled_batch()
    assert_no_warnings(model.check_input, x, labels())
    wrong = labels()
    wrong[2], wrong[3] = wrong[3], wrong[2]
    with pytest.warns(InputWarning, match="ROI labels differ .* 2 of 6"):
        model.check_input(x, wrong)
    with pytest.raises(DataError, match="5 ROI labels"):
        model.check_input(x.numpy(), labels(5))
    with pytest.warns(InputWarning, match="raw BOLD"):
        model.encode(x + 5000.0)
    with pytest.warns(InputWarning, match="robust-scaled"):
        model.check_input(x * 100)
    with pytest.warns(InputWarning, match="robust-scaled"):
        model.check_input(x + 20)
    with pytest.warns(InputWarning, match="only the first 32"):
        model.check_input(scaled_batch(t=48))

    zmodel = tiny_model(normalization={"method": "zscore"})
    assert_no_warnings(zmodel.check_input, torch.from_numpy(zscore(x.numpy())))
    with pytest.warns(InputWarning, match="z-scored"):
        zmodel.check_input(x * 10)
    raw = tiny_model(normalization={"method": "none"})
    assert_no_warnings(raw.check_input, x + 5000.0)


# --- run folders -----------------------------------------------------------------------------


def make_run(root: Path, steps=(10, 20), payload=None) -> Path:
    """A pretraining run folder in the documented format, with random weights."""
    cfg = tiny_cfg()
    g = torch.randn(R, 30)
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = {
        "model": {"size": "tiny", "n_rois": R, "n_timepoints": 32},
        "data": {"target_tr": 2.0, "normalization": "robust", "num_workers": 0, "gradients": None},
        "mask": {"n_blocks": 1},
        "optim": {"epochs": 1, "batch_size": 2, "lr": 1e-3},
        "train": {"loss": "l2", "seed": 0},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    save_gradients_csv(g.numpy(), run / "gradients.csv", labels())
    (run / "normalization.json").write_text(json.dumps(robust_norm()))
    for step in steps:
        torch.manual_seed(step)
        ckpt = {
            "step": step,
            "epoch": step // 10,
            "model_config": cfg.to_dict(),
            "config": config,
            "encoder": BrainEncoder(cfg, g).state_dict(),
            "target_encoder": BrainEncoder(cfg, g).state_dict(),
            "predictor": BrainPredictor(cfg, g).state_dict(),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
            "rng": {"torch": torch.get_rng_state()},
            "data_state": {"epoch": step // 10},
            "loss_name": "l2",
        }
        if payload is not None:
            ckpt["payload"] = payload
        torch.save(ckpt, run / "checkpoints" / f"step_{step:08d}.pt")
    return run


def test_export_run_latest_and_by_step(tmp_path):
    run = make_run(tmp_path)
    out = export_run(run)
    assert out == run / "bundle"
    model = BrainJEPA.from_pretrained(out)
    ckpt = torch.load(run / "checkpoints" / "step_00000020.pt", weights_only=True)
    got = model.encoder.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ckpt["target_encoder"].items())
    assert not torch.equal(got["patch_embed.weight"], ckpt["encoder"]["patch_embed.weight"])
    assert model.predictor is not None and model.info["loss"] == "l2"
    assert model.target_tr == 2.0 and model.roi_labels == labels()
    assert model.normalization == json.loads((run / "normalization.json").read_text())
    prov = model.provenance
    assert (prov["step"], prov["epoch"], prov["source"]) == (20, 2, "brainjepa pretrain")
    assert prov["config_sha256"] == sha256_json(ckpt["config"])
    assert prov["training_data"]["target_tr"] == 2.0

    assert (
        main(
            [
                "export",
                str(run),
                "--step",
                "10",
                "--out",
                str(tmp_path / "b10"),
                "--encoder",
                "context",
                "--no-predictor",
            ]
        )
        == 0
    )
    m10 = BrainJEPA.from_pretrained(tmp_path / "b10")
    c10 = torch.load(run / "checkpoints" / "step_00000010.pt", weights_only=True)
    assert torch.equal(m10.encoder.state_dict()["patch_embed.weight"], c10["encoder"]["patch_embed.weight"])
    assert m10.predictor is None and m10.provenance["step"] == 10
    assert main(["export", str(run), "--step", "30"]) == 1  # clear error: available steps listed
    with pytest.raises(BrainJEPAError, match=r"available steps: \[10, 20\]"):
        export_run(run, step=30)


def test_load_model_accepts_bundle_run_checkpoint(tmp_path):
    run = make_run(tmp_path, steps=(5,))
    x = scaled_batch()
    with torch.no_grad():
        from_ckpt = load_model(run).encode(x)  # no bundle yet: latest checkpoint
        assert torch.equal(load_model(run / "checkpoints" / "step_00000005.pt").encode(x), from_ckpt)
        export_run(run)
        # the bundle: same weights (equal up to BLAS alignment noise)
        assert torch.allclose(load_model(run).encode(x), from_ckpt, atol=1e-6)
        assert torch.allclose(load_model(run / "bundle").encode(x), from_ckpt, atol=1e-6)
    with pytest.raises(BrainJEPAError, match="neither a model bundle"):
        load_model(tmp_path)


def test_checkpoint_outside_run_folder_has_unknown_normalization(tmp_path):
    run = make_run(tmp_path, steps=(5,))
    lone = tmp_path / "lone"
    lone.mkdir()
    (run / "checkpoints" / "step_00000005.pt").rename(lone / "step_00000005.pt")
    with pytest.warns(InputWarning, match="normalization.json not found"):
        model = BrainJEPA.from_checkpoint(lone / "step_00000005.pt")
    assert model.normalization["method"] == "unknown" and model.roi_labels is None


def test_hub_ids(tmp_path, monkeypatch):
    bundle = tiny_model().save_pretrained(tmp_path / "b")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(BrainJEPAError, match=r"brainjepa\[hub\]"):
        BrainJEPA.from_pretrained("someone/brainjepa-tiny")
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(bundle)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    model = load_model("someone/brainjepa-tiny")
    assert model.roi_labels == labels()
    assert calls[0][0] == "someone/brainjepa-tiny" and "model.safetensors" in calls[0][1]

    def offline(repo_id, allow_patterns):
        raise OSError("network unreachable")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=offline))
    with pytest.raises(BrainJEPAError, match="someone/missing: not a local folder.*network unreachable"):
        BrainJEPA.from_pretrained("someone/missing")
    with pytest.raises(BrainJEPAError, match="no such bundle"):
        BrainJEPA.from_pretrained(tmp_path / "a" / "b" / "c")
    with pytest.raises(BrainJEPAError, match="not a model bundle"):
        BrainJEPA.from_pretrained(tmp_path)


# --- the authors' checkpoint -----------------------------------------------------------------


def fixture(name):
    folder = FIXTURES / name
    if not folder.exists():
        pytest.skip(f"parity fixture {folder} missing")
    return folder, load_file(str(folder / "tensors.safetensors"))


def convert_args(folder, out, *extra):
    return [
        "convert-official",
        str(folder / "checkpoint.pth.tar"),
        "--gradients",
        str(folder / "gradients.csv"),
        "--out",
        str(out),
        "--num-heads",
        "4",
        "--predictor-num-heads",
        "4",
        *extra,
    ]


@pytest.mark.parametrize("name", ["r20_tiny", "r450_tiny"])
@pytest.mark.parametrize("encoder", ["target", "context"])
def test_convert_official_reproduces_authors_outputs(tmp_path, name, encoder):
    folder, t = fixture(name)
    assert main(convert_args(folder, tmp_path / "b", "--encoder", encoder)) == 0
    model = BrainJEPA.from_pretrained(tmp_path / "b")
    x = t["x"][:, 0]
    with torch.no_grad():
        errs = {
            "encode": (model.encode(x) - t[f"{encoder}_encoder_full" if encoder == "target" else "encoder_full"])
            .abs()
            .max()
        }
        if encoder == "context":
            ctx = model.encoder(x, t["masks_enc"])
            errs["encoder_context"] = (ctx - t["encoder_context"]).abs().max()
            errs["predictor_out"] = (
                (model.predictor(ctx, t["masks_enc"], t["masks_pred"]) - t["predictor_out"]).abs().max()
            )
        assert model.embed(x).shape == (x.shape[0], 96)
    bad = {k: float(v) for k, v in errs.items() if v > 1e-5}
    assert not bad, bad

    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["architecture"]["pos_minmax"] is True and "min-max" in config["pos_embed"]
    assert config["encoder_weights"] == ("target_encoder" if encoder == "target" else "encoder")
    assert model.normalization["method"] == "unknown"
    assert model.provenance["epoch"] == 1 and "UK Biobank" in model.provenance["training_data"]
    with pytest.raises(ConfigError, match="no normalisation statistics"):
        model.prepare(x[0].numpy())
    with pytest.warns(InputWarning, match="raw BOLD"):
        model.encode(x + 8000.0)


def test_convert_official_options_and_errors(tmp_path):
    folder, t = fixture("r20_tiny")
    roi_file = tmp_path / "rois.txt"
    roi_file.write_text("\n".join(labels(20)) + "\n")
    out = convert_official(
        folder / "checkpoint.pth.tar",
        folder / "gradients.csv",
        tmp_path / "b",
        predictor=False,
        target_tr=2.2,
        roi_labels=labels(20),
    )
    model = BrainJEPA.from_pretrained(out)
    assert model.predictor is None and model.target_tr == 2.2 and model.roi_labels == labels(20)
    assert model.config.num_heads == 1 and model.config.predictor_num_heads == 1  # 64-dim heads
    assert not any(k.startswith("predictor.") for k in load_file(str(out / "model.safetensors")))
    assert main(convert_args(folder, tmp_path / "c", "--no-predictor", "--roi-labels", str(roi_file))) == 0
    assert BrainJEPA.from_pretrained(tmp_path / "c").roi_labels == labels(20)

    other, _ = fixture("r450_tiny")
    with pytest.raises(DataError, match="gradients.csv: gradients have shape \\(450, 30\\)"):
        convert_official(folder / "checkpoint.pth.tar", other / "gradients.csv", tmp_path / "d")
    not_authors = tmp_path / "run_ckpt.pt"
    torch.save({"step": 1, "model": {}}, not_authors)
    with pytest.raises(DataError, match="not an authors' Brain-JEPA checkpoint"):
        convert_official(not_authors, folder / "gradients.csv", tmp_path / "e")


# --- safety ----------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command that creates ``marker`` (a harmless stand-in)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_crafted_pickle_is_refused_everywhere_except_trust_pickle(tmp_path):
    folder, t = fixture("r20_tiny")
    marker = tmp_path / "pwned"
    official = torch.load(folder / "checkpoint.pth.tar", weights_only=True)
    evil = tmp_path / "jepa-ep300.pth.tar"
    torch.save({**official, "payload": Payload(marker)}, evil)
    run = make_run(tmp_path, steps=(1,), payload=Payload(marker))
    evil_ckpt = run / "checkpoints" / "step_00000001.pt"
    fake_bundle = tiny_model().save_pretrained(tmp_path / "fake_bundle")
    (fake_bundle / "model.safetensors").write_bytes(evil.read_bytes())

    attempts = {
        "convert_official": lambda: convert_official(evil, folder / "gradients.csv", tmp_path / "o"),
        "export_run": lambda: export_run(run),
        "from_checkpoint": lambda: BrainJEPA.from_checkpoint(evil_ckpt),
        "load_model(run)": lambda: load_model(run),
        "load_model(file)": lambda: load_model(evil_ckpt),
        "load_torch_file": lambda: load_torch_file(evil),
    }
    for what, attempt in attempts.items():
        with pytest.raises(BrainJEPAError, match="refused to load .*GLOBAL posix.system.*--trust-pickle"):
            attempt()
        assert not marker.exists(), what
    with pytest.raises(BrainJEPAError, match="not a valid safetensors file"):
        BrainJEPA.from_pretrained(fake_bundle)
    args = convert_args(folder, tmp_path / "o")
    args[1] = str(evil)
    assert main(args) == 1
    assert not marker.exists()

    # the explicit flag is the one way in: it does unpickle (and warns)
    with pytest.warns(UserWarning, match="trust_pickle"):
        args = convert_args(folder, tmp_path / "trusted", "--trust-pickle")
        args[1] = str(evil)
        assert main(args) == 0
    assert marker.exists()
    with torch.no_grad():
        out = BrainJEPA.from_pretrained(tmp_path / "trusted").encode(t["x"][:, 0])
    assert (out - t["target_encoder_full"]).abs().max() < 1e-5


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "step_00000001.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(BrainJEPAError, match="refused to load .*Unsupported operand.*not a checkpoint"):
        load_torch_file(bad)
    with pytest.warns(UserWarning, match="trust_pickle"):
        with pytest.raises(BrainJEPAError, match="not a readable PyTorch checkpoint"):
            load_torch_file(bad, trust_pickle=True)
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(BrainJEPAError, match="not a readable PyTorch checkpoint"):
        load_torch_file(bad)
    with pytest.raises(BrainJEPAError, match="not found"):
        load_torch_file(tmp_path / "missing.pt")


def test_truncated_or_corrupted_safetensors(tmp_path):
    src = tiny_model().save_pretrained(tmp_path / "b")
    weights = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(BrainJEPAError, match="model.safetensors: not a valid safetensors file"):
        BrainJEPA.from_pretrained(src)
    (src / "model.safetensors").write_bytes(b"\xff" * 8 + weights[8:])
    with pytest.raises(BrainJEPAError, match="model.safetensors: not a valid safetensors file"):
        BrainJEPA.from_pretrained(src)
    flipped = bytearray(weights)
    flipped[-5] ^= 0xFF  # inside the tensor data: only the recorded checksum can see it
    (src / "model.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(BrainJEPAError, match="model.safetensors: contents do not match the sha256"):
        BrainJEPA.from_pretrained(src)


def edit_json(path: Path, **changes):
    d = json.loads(path.read_text())
    for key, value in changes.items():
        target = d
        *parents, last = key.split("__")
        for p in parents:
            target = target[p]
        target[last] = value
    path.write_text(json.dumps(d))


def test_config_and_tensors_disagreeing_is_refused_naming_the_tensor(tmp_path):
    b = tiny_model().save_pretrained(tmp_path / "b")
    edit_json(b / "config.json", architecture__mlp_ratio=2.0)
    with pytest.raises(
        BrainJEPAError,
        match="tensor 'encoder.blocks.0.mlp.fc1.weight' has shape "
        r"\(128, 32\) but .* needs \(64, 32\)",
    ):
        BrainJEPA.from_pretrained(b)

    b = tiny_model().save_pretrained(tmp_path / "c")
    edit_json(b / "config.json", architecture__n_rois=7)
    with pytest.raises(BrainJEPAError, match="tensor 'encoder.gradients' has shape \\(6, 30\\)"):
        BrainJEPA.from_pretrained(b)

    b = tiny_model(predictor=False).save_pretrained(tmp_path / "d")
    edit_json(b / "config.json", predictor=True)
    with pytest.raises(BrainJEPAError, match="missing tensors \\['predictor."):
        BrainJEPA.from_pretrained(b)

    b = tiny_model().save_pretrained(tmp_path / "e")
    g = np.loadtxt(b / "gradients.csv", delimiter=",", skiprows=1, usecols=range(1, 31))
    save_gradients_csv(g[::-1], b / "gradients.csv", labels())  # ROI order scrambled
    with pytest.raises(BrainJEPAError, match="gradients.csv: gradients .* differ"):
        BrainJEPA.from_pretrained(b)

    b = tiny_model().save_pretrained(tmp_path / "f")
    (b / "normalization.json").write_text(json.dumps({"method": "minmax"}))
    with pytest.raises(ConfigError, match="normalization.json: normalization method"):
        BrainJEPA.from_pretrained(b)
    (b / "normalization.json").unlink()
    with pytest.raises(BrainJEPAError, match="normalization.json: missing"):
        BrainJEPA.from_pretrained(b)
