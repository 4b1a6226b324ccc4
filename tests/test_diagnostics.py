"""Representation diagnostics, the JEPA objective's target centring, and `brainjepa diagnose`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import check_png, line_data, tiny_run_model
from torch import nn

from brainjepa.diagnostics import diagnose_batch, effective_rank, ema_init_share, problems, variance_shares
from brainjepa.masking import SpatiotemporalMasker
from brainjepa.model import BrainEncoder, BrainPredictor, ModelConfig
from brainjepa.objective import block_groups, group_tokens, target_features

CFG = ModelConfig.from_size(n_rois=16, **tiny_run_model())  # the run configs' model


pytestmark = pytest.mark.usefixtures("one_thread")


def test_variance_shares_separate_position_from_subject():
    g = torch.Generator().manual_seed(0)
    position = torch.randn(1, 50, 8, generator=g).expand(6, 50, 8)
    subject = torch.randn(6, 1, 8, generator=g).expand(6, 50, 8)
    noise = 0.01 * torch.randn(6, 50, 8, generator=g)
    by_pos = variance_shares(position + noise)
    by_subj = variance_shares(subject + noise)
    assert by_pos["position_share"] > 0.99 and by_pos["subject_share"] < 0.01
    assert by_subj["subject_share"] > 0.99 and by_subj["position_share"] < 0.01


def test_effective_rank_of_rank_one_and_isotropic_rows():
    g = torch.Generator().manual_seed(0)
    rank_one = torch.randn(20, 1, generator=g) * torch.randn(1, 16, generator=g)
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=1e-4)
    iso = torch.linalg.qr(torch.randn(16, 16, generator=g))[0][:8]  # 8 orthonormal rows
    iso = torch.cat([iso, -iso])  # centred: 8 equal singular values
    assert effective_rank(iso) == pytest.approx(8.0, rel=1e-4)


def test_ema_init_share_is_the_product_of_momenta():
    assert ema_init_share(lambda s: 0.99, 10) == pytest.approx(0.99**10)
    assert ema_init_share(lambda s: 0.99 + 0.001 * s, 3) == pytest.approx(0.99 * 0.991 * 0.992)
    assert ema_init_share(lambda s: 1.0, 0) == 1.0


def test_centred_targets_have_zero_batch_mean_at_every_position():
    torch.manual_seed(0)
    enc = BrainEncoder(CFG, torch.randn(16, 4)).eval()
    x = torch.randn(4, 16, 48)
    idx = torch.arange(CFG.n_tokens).expand(4, -1)
    with torch.no_grad():
        centred = target_features(enc, x, idx, center=True)
        plain = target_features(enc, x, idx, center=False)
    torch.testing.assert_close(centred.mean(0), torch.zeros_like(centred[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(centred, plain - plain.mean(0, keepdim=True), atol=1e-5, rtol=1e-5)
    ln = F.layer_norm(enc(x), (32,))
    torch.testing.assert_close(plain, ln, atol=1e-5, rtol=1e-5)


def test_centred_targets_of_a_few_tokens_match_the_full_grid():
    """The fast target encoder computes only the positions some sample targets in its last
    block; the centred targets at each sample's own tokens are those of the full grid."""
    from brainjepa.fast import FastEncoder

    torch.manual_seed(1)
    enc = FastEncoder(CFG, torch.randn(16, 4)).eval()
    x = torch.randn(3, 16, 48)
    idx = torch.stack([torch.randperm(CFG.n_tokens)[:20].sort().values for _ in range(3)])
    idx[2, -5:] = 0  # padding entries, as a ragged target list has
    with torch.no_grad():
        full = F.layer_norm(enc(x), (32,))
        expected = torch.gather(full - full.mean(0, keepdim=True), 1, idx[..., None].expand(-1, -1, 32))
        torch.testing.assert_close(target_features(enc, x, idx, center=True), expected, atol=1e-5, rtol=1e-5)


class PositionOnly(nn.Module):
    """A predictor that ignores its context: a fixed vector per target token position."""

    def __init__(self, n_tokens, dim):
        super().__init__()
        self.table = nn.Parameter(torch.randn(n_tokens, dim))

    def forward(self, context, context_idx, target_idx, context_valid=None, target_valid=None, shared=None):
        return self.table[target_idx]


def _setup(seed=0):
    torch.manual_seed(seed)
    grads = torch.randn(16, 4)
    enc, pred = BrainEncoder(CFG, grads), BrainPredictor(CFG, grads)
    x = torch.randn(4, 16, 48, generator=torch.Generator().manual_seed(1))
    masks = SpatiotemporalMasker(16, 3)(4, np.random.default_rng(2))
    return enc, pred, x, masks


def test_context_reliance_of_a_position_only_and_a_real_predictor():
    enc, pred, x, masks = _setup()
    blind = diagnose_batch(enc, enc, PositionOnly(CFG.n_tokens, 32), x, masks, loss="l2", center=False)
    assert blind["loss_own"] == blind["loss_other"] == blind["loss_zero"]
    assert blind["context_gain"] == 0.0
    assert any("barely uses its context" in p for p in problems(blind))
    real = diagnose_batch(enc, enc, pred, x, masks, loss="l2", center=False)
    assert real["loss_own"] != real["loss_other"]  # a transformer predictor reads its context
    for key in (
        "target_std",
        "target_cos",
        "context_std",
        "context_cos",
        "position_share",
        "subject_share",
        "effective_rank",
        "loss_position",
    ):
        assert math.isfinite(real[key]), key
    assert enc.training and pred.training  # modes restored


def test_position_floor_is_the_other_samples_mean_at_each_target():
    enc, _, x, masks = _setup()
    x = x[:2]
    masks = SpatiotemporalMasker(16, 3)(2, np.random.default_rng(5))
    out = diagnose_batch(enc, enc, PositionOnly(CFG.n_tokens, 32), x, masks, loss="l2", center=False)
    with torch.no_grad():
        full = F.layer_norm(enc.eval()(x), (32,))
    per_block = []  # with two samples, the floor predicts each one's target by the other's
    for b in range(2):
        for k in range(masks.n_blocks):
            tok = masks.target_idx[b, k][masks.target_valid[b, k]]
            per_block.append(((full[1 - b, tok] - full[b, tok]) ** 2).mean())
    assert out["loss_position"] == pytest.approx(float(torch.stack(per_block).mean()), rel=1e-4)


def test_problems_flag_collapse_and_position_dominated_tokens():
    healthy = {
        "context_gain": 0.3,
        "loss_own": 1.0,
        "loss_other": 1.3,
        "loss_position": 1.5,
        "target_cos": 0.3,
        "target_std": 0.8,
        "context_cos": 0.2,
        "context_std": 0.9,
        "position_share": 0.4,
        "subject_share": 0.3,
    }
    assert problems(healthy) == []
    sick = dict(healthy, context_cos=0.99, position_share=0.97)
    found = problems(sick)
    assert len(found) == 2
    assert "context encoder" in found[0] and "97.0%" in found[1]


def test_group_tokens_concatenates_the_region_groups():
    masks = SpatiotemporalMasker(16, 3, n_blocks=2)(3, np.random.default_rng(0))
    groups = block_groups(masks)
    tokens, valid = group_tokens(groups)
    assert tokens.shape == valid.shape == (3, sum(idx[0].numel() for idx, _ in groups))
    torch.testing.assert_close(tokens[:, : groups[0][0][0].numel()], groups[0][0].reshape(3, -1))
    torch.testing.assert_close(valid[:, -groups[-1][1][0].numel() :], groups[-1][1].reshape(3, -1))


def test_cli_diagnose_on_a_tiny_run(tmp_path, capsys, saved_figures):
    from brainjepa.cli import main
    from brainjepa.pretrain import pretrain
    from brainjepa.synthetic import simulate_cohort

    sim = simulate_cohort(8, 16, tr=2.0, minutes=2.0, seed=0)
    for i, x in enumerate(sim.timeseries):
        np.save(tmp_path / f"sub-{i:02d}.npy", x)
    cfg = {
        "model": tiny_run_model(depth=1),
        "optim": {"batch_size": 4, "epochs": 2, "warmup_epochs": 1},
        "train": {"log_every": 1, "diagnose_every": 2, "precision": "fp32"},
    }
    pretrain(cfg, tmp_path, tmp_path / "run", progress=False)
    # diagnostics.png: the logged diagnostics against the step (every 2 steps and the last)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    logged = [r for r in records if "diag_loss_own" in r]
    history = saved_figures[tmp_path / "run" / "diagnostics.png"]
    losses, shares = history.axes
    steps = [float(r["step"]) for r in logged]
    assert steps == [2.0, 4.0]
    assert line_data(losses) == [
        (steps, [r[f"diag_{key}"] for r in logged]) for key in ("loss_own", "loss_other", "loss_zero", "loss_position")
    ]
    assert line_data(shares) == [
        (steps, [r[f"diag_{key}"] for r in logged])
        for key in ("target_cos", "context_cos", "position_share", "subject_share")
    ]
    check_png(tmp_path / "run" / "diagnostics.png", history)
    code = main(
        [
            "-q",
            "diagnose",
            "--model",
            str(tmp_path / "run"),
            "--data",
            str(tmp_path),
            "--tr",
            "2.0",
            "--batch-size",
            "4",
            "--batches",
            "2",
            "--out",
            str(tmp_path / "diag"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "diag" / "diagnostics.json").read_text())
    m = result["mean"]
    rows = out.split("\n\n")[0].splitlines()  # the table, then the verdicts
    table = {name.strip(): value for name, value in (row.rsplit("  ", 1) for row in rows)}
    assert table == {
        "predictor loss, own context": f"{m['loss_own']:.4f}",
        "predictor loss, another sample's context": f"{m['loss_other']:.4f}",
        "predictor loss, all-zero input": f"{m['loss_zero']:.4f}",
        "position-only floor": f"{m['loss_position']:.4f}",
        "context gain (other / own - 1)": f"{m['context_gain']:.4f}",
        "target encoder: feature std / token cosine": f"{m['target_std']:.4f} / {m['target_cos']:.3f}",
        "context encoder: feature std / token cosine": f"{m['context_std']:.4f} / {m['context_cos']:.3f}",
        "variance share: position / subject": f"{m['position_share']:.3f} / {m['subject_share']:.3f}",
        "effective rank of subject embeddings": f"{m['effective_rank']:.4f}",
    }
    assert len(result["batches"]) == 2 and result["settings"]["center_targets"] is True
    for batch in result["batches"]:
        assert batch["context_gain"] == pytest.approx(batch["loss_other"] / batch["loss_own"] - 1, rel=1e-6)
    assert result["mean"]["context_gain"] == pytest.approx(
        np.mean([b["context_gain"] for b in result["batches"]]), rel=1e-6
    )
    bars, shares = saved_figures[tmp_path / "diag" / "diagnostics.png"].axes
    heights = [p.get_height() for p in bars.patches]
    assert heights == pytest.approx([m["loss_own"], m["loss_other"], m["loss_zero"], m["loss_position"]], rel=1e-6)
    assert [p.get_height() for p in shares.patches] == pytest.approx([m["position_share"], m["subject_share"]])
    assert bars.get_title() == f"context reliance (gain {100 * m['context_gain']:+.1f}%)"
    check_png(tmp_path / "diag" / "diagnostics.png", saved_figures[tmp_path / "diag" / "diagnostics.png"])
