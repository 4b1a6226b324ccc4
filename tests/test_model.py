"""Model: shapes, sizes, masking semantics, autocast, and parity with the authors' model code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from safetensors.torch import load_file

from brainjepa.convert import infer_official_config, map_official_state_dict
from brainjepa.diagnostics import count_parameters
from brainjepa.errors import ConfigError, DataError
from brainjepa.model import (
    BrainEncoder,
    BrainPredictor,
    ModelConfig,
    sincos_1d,
)

FIXTURES = Path(__file__).parent / "fixtures" / "official_parity"


@pytest.mark.parametrize("size,spec", [("small", 21e6), ("base", 85e6), ("large", 302e6)])
def test_encoder_parameter_counts_match_vit_sizes(size, spec):
    cfg = ModelConfig.from_size(size)
    with torch.device("meta"):
        n = count_parameters(BrainEncoder(cfg))
    d, m = cfg.embed_dim, cfg.n_gradients
    # ViT blocks (qkv, proj, fc1, fc2, two LayerNorms) + final norm + patch and gradient maps
    expected = cfg.depth * (12 * d * d + 13 * d) + 2 * d + (16 * d + d) + (m * d // 2 + d // 2)
    assert n == expected
    # the paper quotes about 21M / 85M / 302M: small is 21.3M, i.e. 21M at its precision
    assert round(n / 1e6) == round(spec / 1e6) and abs(n - spec) / spec < 0.015, n


def test_config_validation_and_round_trip():
    with pytest.raises(ConfigError, match="multiple of"):
        ModelConfig(n_timepoints=150)
    with pytest.raises(ConfigError, match="unknown model size"):
        ModelConfig.from_size("huge")
    with pytest.raises(ConfigError, match="unknown model config keys"):
        ModelConfig.from_dict({"n_rois": 3, "bogus": 1})
    cfg = ModelConfig.from_size("tiny", n_rois=20)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.n_patches == 10 and cfg.n_tokens == 200


def test_sincos_values():
    table = sincos_1d(10, 48)
    assert table.shape == (10, 48)
    assert torch.allclose(table[0, :24], torch.zeros(24)) and torch.allclose(table[0, 24:], torch.ones(24))
    assert table[1, 0].item() == pytest.approx(np.sin(1.0), abs=1e-6)
    assert table[3, 1].item() == pytest.approx(np.sin(3 * 10000 ** (-1 / 24)), abs=1e-6)


def test_encoder_shapes_and_token_selection():
    torch.manual_seed(0)
    enc = BrainEncoder(tiny_cfg(depth=1), torch.randn(6, 30)).eval()
    x = torch.randn(2, 6, 64)
    full = enc(x)
    assert full.shape == (2, 24, 32)
    idx = torch.tensor([[0, 5, 23], [1, 2, 3]])
    sub = enc(x, idx)
    tokens = enc.tokens(x)
    by_hand = enc.norm(enc.blocks[0](torch.stack([tokens[0, idx[0]], tokens[1, idx[1]]])))
    torch.testing.assert_close(sub, by_hand, atol=1e-6, rtol=0)
    assert not torch.allclose(sub, torch.stack([full[0, idx[0]], full[1, idx[1]]]), atol=1e-3)


def test_depth_must_be_positive():
    with pytest.raises(ConfigError, match="depth"):
        tiny_cfg(depth=0)


def test_padding_mask_makes_padded_tokens_invisible():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    enc = BrainEncoder(cfg, torch.randn(6, 30)).eval()
    x = torch.randn(2, 6, 64)
    idx = torch.tensor([[0, 4, 9, 0, 0], [1, 2, 3, 7, 8]])
    valid = torch.tensor([[True, True, True, False, False], [True] * 5])
    padded = enc(x, idx, valid)
    alone = enc(x[:1], idx[:1, :3])
    assert torch.allclose(padded[0, :3], alone[0], atol=1e-5)
    # and the padding really matters (without the mask, outputs change)
    assert not torch.allclose(enc(x, idx)[0, :3], alone[0], atol=1e-4)

    pred = BrainPredictor(cfg, torch.randn(6, 30)).eval()
    tidx = torch.tensor([[10, 11, 0], [12, 13, 14]])
    tvalid = torch.tensor([[True, True, False], [True, True, True]])
    out = pred(padded, idx, tidx, valid, tvalid)
    ref = pred(alone, idx[:1, :3], tidx[:1, :2])
    assert out.shape == (2, 3, 32)
    assert torch.allclose(out[0, :2], ref[0], atol=1e-5)


def test_wrong_input_shape_and_gradients_are_clear_errors():
    cfg = tiny_cfg()
    with pytest.raises(DataError, match="gradients have shape"):
        BrainEncoder(cfg, torch.randn(5, 30))
    enc = BrainEncoder(cfg, torch.randn(6, 30))
    with pytest.raises(DataError, match="expects"):
        enc(torch.randn(1, 7, 64))


def test_drop_path_acts_in_training_only():
    torch.manual_seed(0)
    enc = BrainEncoder(tiny_cfg(drop_path=0.5), torch.randn(6, 30))
    x = torch.randn(4, 6, 64)
    enc.train()
    a, b = enc(x), enc(x)
    assert not torch.allclose(a, b)
    enc.eval()
    assert torch.allclose(enc(x), enc(x))


def test_bf16_autocast_cpu_close_to_fp32():
    torch.manual_seed(0)
    enc = BrainEncoder(tiny_cfg(), torch.randn(6, 30)).eval()
    x = torch.randn(2, 6, 64)
    ref = enc(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x)
    err = (out.float() - ref).abs().max()
    assert 0 < err < 0.1  # autocast really ran in bf16 (not bit-identical) and stayed close


# --- parity with the authors' model code ---------------------------------------------------


def _load_fixture(name):
    folder = FIXTURES / name
    if not folder.exists():
        pytest.skip(f"parity fixture {folder} missing")
    tensors = load_file(str(folder / "tensors.safetensors"))
    ckpt = torch.load(folder / "checkpoint.pth.tar", weights_only=True, map_location="cpu")
    meta = json.loads((folder / "config.json").read_text())
    return tensors, ckpt, meta


@pytest.mark.parametrize("name", ["r20_tiny", "r450_tiny"])
def test_parity_with_authors_outputs(name):
    tensors, ckpt, meta = _load_fixture(name)
    cfg = infer_official_config(
        ckpt["encoder"],
        ckpt["predictor"],
        n_timepoints=meta["n_timepoints"],
        num_heads=meta["num_heads"],
        predictor_num_heads=meta["predictor_num_heads"],
    )
    assert (cfg.n_rois, cfg.embed_dim, cfg.depth, cfg.predictor_embed_dim, cfg.predictor_depth) == (
        meta["n_rois"],
        meta["embed_dim"],
        meta["depth"],
        meta["predictor_embed_dim"],
        meta["predictor_depth"],
    )
    g = tensors["gradients"]
    encoder = BrainEncoder(cfg, g).eval()
    target = BrainEncoder(cfg, g).eval()
    predictor = BrainPredictor(cfg, g).eval()
    for module, key, part in [
        (encoder, "encoder", "encoder"),
        (target, "target_encoder", "encoder"),
        (predictor, "predictor", "predictor"),
    ]:
        missing, unexpected = module.load_state_dict(map_official_state_dict(ckpt[key], part), strict=False)
        assert missing == ["gradients"] and unexpected == []

    x = tensors["x"][:, 0]
    with torch.no_grad():
        errs = {
            "pos_embed_encoder": (encoder.pos_embed(encoder.gradients) - tensors["pos_embed_encoder"][0]).abs().max(),
            "pos_embed_predictor": (predictor.pos_embed(predictor.gradients) - tensors["pos_embed_predictor"][0])
            .abs()
            .max(),
            "encoder_full": (encoder(x) - tensors["encoder_full"]).abs().max(),
            "target_encoder_full": (target(x) - tensors["target_encoder_full"]).abs().max(),
            "encoder_context": (encoder(x, tensors["masks_enc"]) - tensors["encoder_context"]).abs().max(),
            "predictor_out": (
                predictor(tensors["encoder_context"], tensors["masks_enc"], tensors["masks_pred"])
                - tensors["predictor_out"]
            )
            .abs()
            .max(),
        }
    bad = {k: float(v) for k, v in errs.items() if v > 1e-5}
    assert not bad, bad


def test_official_mapping_refuses_unknown_keys():
    _, ckpt, _ = _load_fixture("r20_tiny")
    state = dict(ckpt["encoder"])
    state["module.extra.weight"] = torch.zeros(1)
    with pytest.raises(DataError, match="does not know"):
        map_official_state_dict(state, "encoder")
