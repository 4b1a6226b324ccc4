"""Pretraining engine: config, schedules, sampler, loss, EMA, checkpoints, resume, DDP, CLI."""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import check_png, line_data, tiny_run_model

import brainjepa.pretrain.step as pretrain_step
from brainjepa.attention import set_attention_backend
from brainjepa.bundle import BrainJEPA
from brainjepa.cli import main
from brainjepa.diagnostics import feature_stats
from brainjepa.errors import ConfigError
from brainjepa.masking import MaskBatch, SpatiotemporalMasker
from brainjepa.model import BrainEncoder, BrainPredictor, ModelConfig
from brainjepa.objective import block_loss_sum
from brainjepa.pretrain import Schedule, ShardSampler, Trainer, load_config, pretrain
from brainjepa.pretrain.config import default_config, dump_config, parse_override, resolve_config
from brainjepa.runio import MetricsLog, checkpoint_path, find_checkpoints, load_latest_checkpoint, save_checkpoint
from brainjepa.synthetic import simulate_cohort

# a model small enough for a 2-core CI machine: 16 ROIs x 3 patches, width 32
TINY = {
    "model": tiny_run_model(),
    "optim": {
        "batch_size": 4,
        "epochs": 10,
        "warmup_epochs": 1,
        "lr": 1e-3,
        "start_lr": 1e-4,
        "final_lr": 1e-6,
        "ema_start": 0.996,
        "clip_grad": None,
    },
    "train": {"log_every": 1, "checkpoint_every": 4, "keep_last": 2},
}
SMALL_MODEL = ModelConfig.from_size(n_rois=16, **tiny_run_model())  # the run configs' model


def _config(**sections) -> dict:
    cfg = copy.deepcopy(TINY)
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """12 simulated scans, 16 ROIs x 90 frames, as a folder of .npy files."""
    folder = tmp_path_factory.mktemp("cohort")
    cohort = simulate_cohort(12, 16, tr=2.0, minutes=3.0, seed=0)
    for i, x in enumerate(cohort.timeseries):
        np.save(folder / f"sub-{i:02d}.npy", x)
    return folder


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]


# ------------------------------------------------------------------------------- config


def test_builtin_configs_and_authors_recipe():
    authors = load_config("authors")
    assert authors["model"]["size"] == "base" and authors["model"]["n_timepoints"] == 160
    assert authors["model"]["patch_size"] == 16
    o = authors["optim"]
    assert (o["batch_size"], o["accum_steps"], o["epochs"], o["lr"], o["warmup_epochs"]) == (16, 8, 300, 1e-3, 40)
    assert (o["start_lr"], o["final_lr"], o["weight_decay"], o["final_weight_decay"]) == (5e-5, 1e-6, 0.04, 0.4)
    assert (o["ema_start"], o["ema_end"]) == (0.996, 1.0)
    assert authors["train"]["loss"] == "smooth_l1" and authors["data"]["normalization"] == "robust"
    assert not authors["model"]["patch_norm"] and not authors["train"]["center_targets"]
    base = load_config("base")  # the same schedule with the default recipe
    assert {k: v for k, v in base["optim"].items() if k != "ema_end"} == {k: v for k, v in o.items() if k != "ema_end"}
    assert base["optim"]["ema_end"] == 0.999 and base["data"]["normalization"] == "auto"
    assert base["model"]["patch_norm"] and base["train"]["center_targets"]
    for name in ("small", "large"):  # the full-scale recipe at another size
        sized = load_config(name)
        assert sized["model"]["size"] == name and {**sized, "model": base["model"]} == base
    # the defaults are the tiny preset: an empty config, or one with only some keys, is tiny plus them
    assert load_config("tiny") == resolve_config({}) == default_config()
    assert resolve_config({"optim": {"lr": 5e-4}}) == load_config("tiny", ["optim.lr=5e-4"])
    # the schema takes the architecture and masking defaults from the model and the masker
    assert default_config()["model"]["n_timepoints"] == ModelConfig().n_timepoints
    assert default_config()["mask"]["alpha_roi_scale"] == list(SpatiotemporalMasker(4, 4).alpha_roi_scale)
    # the resolved config round-trips through config.yaml with its types
    assert resolve_config(yaml.safe_load(dump_config(base))) == base


def test_overrides_types_and_unknown_keys(tmp_path):
    cfg = load_config(
        "tiny",
        [
            "optim.lr=5e-4",
            "model.n_rois=null",
            "train.compile=true",
            "mask.obs_roi_scale=[0.5, 0.9]",
            "optim.clip_grad=2",
        ],
    )
    assert cfg["optim"]["lr"] == 5e-4  # a float, not the string YAML 1.1 makes of "5e-4"
    assert cfg["train"]["compile"] is True and cfg["mask"]["obs_roi_scale"] == [0.5, 0.9]
    assert cfg["optim"]["clip_grad"] == 2.0
    assert parse_override("data.gradients=g.csv") == ("data", "gradients", "g.csv")
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config("tiny", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"optim\.batch_size"):
        load_config("tiny", ["optim.batch_size=many"])
    with pytest.raises(ConfigError, match=r"train\.compile"):
        load_config("tiny", ["train.compile=3"])
    with pytest.raises(ConfigError, match=r"optim\.epochs"):
        load_config("tiny", ["optim.epochs=2.5"])
    with pytest.raises(ConfigError, match=r"train\.loss"):
        load_config("tiny", ["train.loss=l1"])
    with pytest.raises(ConfigError, match="section"):
        load_config("tiny", ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match="neither a built-in"):
        load_config("huge")
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  size: small\noptim:\n  lr: 1e-4\n  betas: [0.9, 0.95]\n")
    mine = load_config(path)
    assert mine["optim"]["lr"] == 1e-4 and mine["optim"]["betas"] == [0.9, 0.95]
    assert mine["optim"]["epochs"] == default_config()["optim"]["epochs"]  # defaults fill the rest
    path.write_text("extends: base\noptim:\n  lr: 1e-4\n")  # or those of another config
    assert load_config(path) == load_config("base", ["optim.lr=1e-4"])
    path.write_text(f"extends: {path}\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(path)
    path.write_text("optim:\n  wamup_epochs: 3\n")
    with pytest.raises(ConfigError, match=r"optim\.wamup_epochs"):
        load_config(path)


# ------------------------------------------------------------------------------- schedules


def test_schedule_endpoints_and_shape():
    optim = resolve_config({"optim": {"epochs": 100, "warmup_epochs": 10, "ema_start": 0.996, "ema_end": 1.0}})["optim"]
    s = Schedule.from_config(optim, 100)
    assert s.warmup_steps == 10
    assert s.lr_at(0) == optim["start_lr"] and s.lr_at(10) == pytest.approx(optim["lr"])
    assert s.lr_at(99) == pytest.approx(optim["final_lr"])
    lrs = [s.lr_at(i) for i in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine falls
    assert s.weight_decay_at(0) == pytest.approx(0.04) and s.weight_decay_at(99) == pytest.approx(0.4)
    assert s.momentum_at(0) == 0.996
    assert s.momentum_at(99) == 1.0  # exactly the final value at the last optimizer step
    assert s.momentum_at(50) == pytest.approx(0.996 + 0.004 * 50 / 99)
    # a horizon from --max-steps compresses the same schedule
    short = Schedule.from_config(optim, 20)
    assert short.warmup_steps == 2 and short.momentum_at(19) == 1.0
    assert Schedule.from_config(optim, 1).momentum_at(0) == 1.0


def test_shard_sampler_order_sharding_and_skip():
    shards = [ShardSampler(10, 2, rank=r, world_size=3, seed=5) for r in range(3)]
    for s in shards:
        s.set_epoch(4)
    lists = [list(s) for s in shards]
    assert all(len(x) == 4 for x in lists)
    assert set().union(*lists) == set(range(10))  # 12 slots: all 10 samples, 2 wrapped around
    again = ShardSampler(10, 2, rank=1, world_size=3, seed=5)
    again.set_epoch(4)
    assert list(again) == lists[1]  # a function of (seed, epoch)
    again.set_epoch(5)
    assert list(again) != lists[1]
    again.set_epoch(4, skip_batches=1)
    assert list(again) == lists[1][2:] and len(again) == 2


# ------------------------------------------------------------------------------- loss and EMA


def _reference_loss(enc, pred, target_encoder, x, masks, loss, center=False):
    """The JEPA loss written plainly: every (sample, block) alone, without padding."""
    h = F.layer_norm(target_encoder(x), (target_encoder.cfg.embed_dim,)).detach()
    if center:  # each position's batch mean removed
        h = h - h.mean(0, keepdim=True)
    per_block = []
    for b in range(x.shape[0]):
        ctx = masks.context_idx[b][masks.context_valid[b]][None]
        z = enc(x[b : b + 1], ctx)
        for j in range(masks.n_blocks):
            tgt = masks.target_idx[b, j][masks.target_valid[b, j]][None]
            p, t = pred(z, ctx, tgt), h[b, tgt[0]][None]
            per_block.append(F.smooth_l1_loss(p, t) if loss == "smooth_l1" else F.mse_loss(p, t))
    return torch.stack(per_block).mean()


@pytest.mark.parametrize(
    "loss,backend,center",
    [("smooth_l1", "auto", False), ("l2", "auto", False), ("smooth_l1", "chunked", False), ("l2", "auto", True)],
)
def test_step_loss_and_update_match_the_plain_joint_loss(loss, backend, center):
    """Padded, region-grouped, split-backward training step == the plain per-block loss, and its
    AdamW update == the one from a single joint backward (also through the chunked attention
    kernel, whose padding shortcuts the unpadded reference never takes, and with centred
    targets)."""
    previous = set_attention_backend(backend)
    try:
        _check_step_against_plain_loss(loss, shares_context=backend == "chunked", center=center)
    finally:
        set_attention_backend(previous)


def _check_step_against_plain_loss(loss, shares_context, center):
    tr = _trainer(loss=loss, center_targets=center)
    # with the chunked kernel the predictor's context part is computed once for all blocks
    assert tr.share_context() == shares_context
    masks = SpatiotemporalMasker(16, 3, n_blocks=2)(3, np.random.default_rng(1))
    assert masks.target_valid.sum(-1).min() < masks.target_idx.shape[-1]  # there is padding
    x = torch.randn(3, 16, 48, generator=torch.Generator().manual_seed(3))
    enc, pred, tgt = (copy.deepcopy(m) for m in (tr.encoder, tr.predictor, tr.target_encoder))
    out = tr.step([(x, masks)], step=2)
    ref = _reference_loss(enc, pred, tgt, x, masks, loss, center)
    torch.testing.assert_close(out["loss"], ref.detach(), atol=1e-6, rtol=1e-5)
    ref.backward()
    params = [p for m in (enc, pred) for p in m.parameters()]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": out["wd"]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=out["lr"],
        betas=(0.9, 0.999),
    )
    opt.step()
    for mine, theirs in ((tr.encoder, enc), (tr.predictor, pred)):
        for (name, a), b in zip(mine.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_block_loss_sum_ignores_padding():
    torch.manual_seed(0)
    pred = BrainPredictor(SMALL_MODEL, torch.randn(16, 4)).eval()
    z, ctx = torch.randn(2, 5, 32), torch.tensor([[0, 3, 4, 7, 9], [1, 2, 5, 6, 8]])
    ctx_valid = torch.ones(2, 5, dtype=torch.bool)
    h = torch.randn(2, 48, 32)
    idx = torch.tensor([[[10, 11, 12]], [[20, 21, 0]]])  # sample 1's block has one padding entry
    valid = torch.tensor([[[True, True, True]], [[True, True, False]]])
    with torch.no_grad():
        got = block_loss_sum(pred, z, ctx, ctx_valid, idx, valid, h[torch.arange(2)[:, None, None], idx], "l2")
        one = [
            F.mse_loss(pred(z[b : b + 1], ctx[b : b + 1], idx[b, :, :n]), h[b, idx[b, 0, :n]][None])
            for b, n in ((0, 3), (1, 2))
        ]
    torch.testing.assert_close(got, sum(one), atol=1e-6, rtol=1e-5)


def test_feature_stats_detects_collapse():
    torch.manual_seed(0)
    healthy = feature_stats(F.layer_norm(torch.randn(2, 300, 64), (64,)))
    collapsed = feature_stats(F.layer_norm(torch.randn(1, 1, 64), (64,)).expand(2, 300, 64))
    assert healthy["std"] > 0.9 and abs(healthy["cos"]) < 0.05
    assert collapsed["std"] < 1e-5 and collapsed["cos"] > 0.999


def test_auto_precision_follows_the_probe(monkeypatch):
    import brainjepa.precision as precision
    import brainjepa.pretrain.runtime as runtime

    cpu = torch.device("cpu")
    for faster in (True, False):
        monkeypatch.setattr(precision, "cpu_prefers_bf16", lambda faster=faster: faster)
        assert runtime.use_bf16("auto", cpu) is faster
        assert runtime.use_bf16("bf16", cpu) and not runtime.use_bf16("fp32", cpu)  # forced either way


def _trainer(precision="fp32", loss="smooth_l1", center_targets=False, compile=False, **optim):
    train = {"precision": precision, "loss": loss, "center_targets": center_targets, "compile": compile}
    cfg = resolve_config(_config(optim=optim, train=train))
    return Trainer(SMALL_MODEL, torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), cfg, 10)


def test_cpu_memory_devices_wrap_the_step(monkeypatch):
    """On CPU the kernel caches are bounded when the trainer is made (the user's values win) and
    the heap is trimmed after a step that leaves the process TRIM_GROWTH times larger than the
    largest it was after a warm-up step (after every step where the size cannot be read), by the
    runtime seam, not the step itself."""
    import brainjepa.pretrain.runtime as runtime

    monkeypatch.setenv("LRU_CACHE_CAPACITY", "5")  # the user's value
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    trims = []
    monkeypatch.setattr(runtime, "free_memory_to_os", lambda: trims.append(1))
    monkeypatch.setattr(runtime, "TRIM_WARMUP_STEPS", 2)
    sizes = iter([1000, 1200, 1300, 1600, 1400, None])  # resident bytes after each step
    monkeypatch.setattr(runtime, "resident_bytes", lambda: next(sizes))
    tr = _trainer()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == runtime.CPU_KERNEL_CACHES["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]
    assert os.environ["LRU_CACHE_CAPACITY"] == "5"
    x = torch.randn(4, 16, 48, generator=torch.Generator().manual_seed(0))
    masks = SpatiotemporalMasker(16, 3)(4, np.random.default_rng(0))
    done = []
    for step in range(6):
        tr.step([(x, masks)], step=step)
        done.append(len(trims))
    # warm-up: 1,000 and 1,200 (the baseline); 1,300 and 1,400 are within 1.25 x 1,200, 1,600 is
    # not; an unknown size trims
    assert done == [0, 0, 0, 1, 1, 2]


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux only")
def test_resident_bytes_sees_touched_memory():
    import mmap

    from brainjepa.pretrain.runtime import resident_bytes

    block = mmap.mmap(-1, 64 * 2**20)  # fresh pages (a heap allocation may reuse resident ones)
    before = resident_bytes()
    for offset in range(0, len(block), mmap.PAGESIZE):  # write every page of the 64 MiB
        block[offset] = 1
    assert resident_bytes() - before > 48 * 2**20
    block.close()


def test_trainer_step_ema_accumulation_and_no_decay_groups():
    tr = _trainer(accum_steps=2)
    groups = tr.optimizer.param_groups
    assert all(p.ndim > 1 for p in groups[0]["params"]) and all(p.ndim <= 1 for p in groups[1]["params"])
    assert groups[1]["weight_decay"] == 0.0
    masker = SpatiotemporalMasker(16, 3)
    rng = np.random.default_rng(0)
    micro = [(torch.randn(4, 16, 48), masker(4, rng)) for _ in range(2)]
    before = [p.detach().clone() for p in tr.target_encoder.parameters()]
    out = tr.step(micro, step=3, monitor=True)
    m = tr.schedule.momentum_at(3)
    assert out["momentum"] == m and out["lr"] == tr.schedule.lr_at(3)
    assert groups[0]["weight_decay"] == tr.schedule.weight_decay_at(3)
    for t, t0, online in zip(tr.target_encoder.parameters(), before, tr.encoder.parameters()):
        torch.testing.assert_close(t, m * t0 + (1 - m) * online)  # one EMA update per optimizer step
    assert not all(torch.equal(t, t0) for t, t0 in zip(tr.target_encoder.parameters(), before))
    assert all(not p.requires_grad for p in tr.target_encoder.parameters())
    assert {"loss", "grad_norm", "target_std", "target_cos"} <= set(out)


def _rows(masks: MaskBatch, rows: slice) -> MaskBatch:
    """The masks of some samples of a MaskBatch (same padding width)."""
    return MaskBatch(
        masks.context_idx[rows],
        masks.context_valid[rows],
        masks.target_idx[rows],
        masks.target_valid[rows],
        masks.regions,
        masks.observation[rows],
    )


def _step_with_grads(tr: Trainer, micro, step: int) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
    """Trainer.step, plus the gradients the optimizer saw and the parameters after the update."""
    seen = []
    optimizer_step = tr.optimizer.step

    def spy(*args, **kwargs):
        seen.extend(p.grad.detach().clone() for p in tr.params)
        return optimizer_step(*args, **kwargs)

    tr.optimizer.step = spy
    try:
        out = tr.step(micro, step, monitor=True)
    finally:
        tr.optimizer.step = optimizer_step
    return out, seen, [p.detach().clone() for p in tr.params]


def test_accumulation_equals_one_batch_of_the_micro_batches_together():
    """optim.accum_steps=2 over two micro-batches of 2 == one step on the batch of 4 with the same
    masks: the same loss, gradients and update (each micro-batch's loss is its mean over its
    blocks, averaged over micro-batches: the mean over all blocks when the micro-batches hold
    as many blocks). Centred targets are not compared: their mean is the micro-batch's."""
    masks = SpatiotemporalMasker(16, 3, n_blocks=2)(4, np.random.default_rng(1))
    x = torch.randn(4, 16, 48, generator=torch.Generator().manual_seed(3))
    whole = _step_with_grads(_trainer(accum_steps=1, batch_size=4), [(x, masks)], step=2)
    halves = [(x[:2], _rows(masks, slice(0, 2))), (x[2:], _rows(masks, slice(2, 4)))]
    accumulated = _step_with_grads(_trainer(accum_steps=2, batch_size=2), halves, step=2)
    torch.testing.assert_close(accumulated[0]["loss"], whole[0]["loss"], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(accumulated[0]["grad_norm"], whole[0]["grad_norm"], atol=1e-7, rtol=1e-6)
    assert float(whole[0]["grad_norm"]) > 0.1
    for a, b in zip(accumulated[1], whole[1]):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    for a, b in zip(accumulated[2], whole[2]):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    # and it is not simply one of the halves: each half alone gives other gradients
    first = _step_with_grads(_trainer(batch_size=2), halves[:1], step=2)
    assert max(float((a - b).abs().max()) for a, b in zip(first[1], whole[1])) > 1e-3


def test_clip_grad_clips_the_total_norm():
    """A step whose gradient norm is under optim.clip_grad is left alone; one above it reaches
    AdamW scaled down to norm clip_grad, and so moves the weights differently."""
    masks = SpatiotemporalMasker(16, 3)(4, np.random.default_rng(0))
    x = torch.randn(4, 16, 48, generator=torch.Generator().manual_seed(2))
    micro = [[(10 * x, masks)], [(x, masks)]]  # gradient norms of about 0.21, then 0.43
    free = _trainer()
    free_steps = [_step_with_grads(free, m, step=3 + i) for i, m in enumerate(micro)]
    norms = [float(out["grad_norm"]) for out, _, _ in free_steps]
    limit = sum(norms) / 2
    assert norms[0] < 0.9 * limit and norms[1] > 1.1 * limit
    clipped = _trainer(clip_grad=limit)
    steps = [_step_with_grads(clipped, m, step=3 + i) for i, m in enumerate(micro)]
    for (out, grads, _), (free_out, free_grads, _) in zip(steps, free_steps):
        assert float(out["grad_norm"]) == pytest.approx(float(free_out["grad_norm"]), rel=1e-6)  # before clipping
        total = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        assert total <= limit * (1 + 1e-6)
        scale = min(1.0, limit / float(free_out["grad_norm"]))
        for g, g0 in zip(grads, free_grads):  # every gradient scaled by the same factor
            torch.testing.assert_close(g, g0 * scale, atol=1e-9, rtol=1e-5)
    assert total == pytest.approx(limit, rel=1e-5)
    # the first step was not clipped: the same weights; the second was: other weights
    for a, b in zip(steps[0][2], free_steps[0][2]):
        assert torch.equal(a, b)
    change = [(a - b).abs().max() for a, b in zip(free_steps[1][2], free_steps[0][2])]
    differ = [(a - b).abs().max() for a, b in zip(steps[1][2], free_steps[1][2])]
    assert float(max(differ)) > 0.1 * float(max(change))  # about 15% of the step


def test_bf16_autocast_on_cpu_matches_fp32_loss():
    masker = SpatiotemporalMasker(16, 3)
    micro = [(torch.randn(4, 16, 48, generator=torch.Generator().manual_seed(2)), masker(4, np.random.default_rng(0)))]
    fp32 = _trainer("fp32").step(micro, 0)["loss"].item()
    bf16 = _trainer("bf16").step(micro, 0)["loss"].item()
    assert np.isfinite(bf16) and bf16 == pytest.approx(fp32, rel=2e-2)


# ------------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_atomic_and_pruned(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        save_checkpoint({"step": step, "w": torch.full((3,), float(step))}, tmp_path, keep_last=2)
    assert [p.name for p in find_checkpoints(tmp_path).values()] == ["step_00000002.pt", "step_00000003.pt"]

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint({"step": 4}, tmp_path, keep_last=2)
    assert checkpoint_path(tmp_path).name == "step_00000003.pt"  # never a half-written latest
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002.pt", "step_00000003.pt"]
    monkeypatch.undo()
    (tmp_path / "checkpoints" / "step_00000009.pt").write_bytes(b"damaged")  # e.g. a copy cut short
    assert load_latest_checkpoint(tmp_path)["step"] == 3  # falls back to the newest readable one


def test_metrics_log_truncates_on_resume_and_feeds_tensorboard(tmp_path, monkeypatch):
    import sys
    import types

    scalars = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step, "lr": 1e-3})
    log.close()
    assert ("pretrain/loss", 0.5, 2) in scalars and scalars[-1] == "closed"
    resumed = MetricsLog(tmp_path, keep_until=2)  # the checkpoint was at step 2
    resumed.write({"step": 3, "loss": 0.3, "lr": 1e-3})
    resumed.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 0.3)]
    fresh = MetricsLog(tmp_path)  # a new run starts a new file
    fresh.close()
    assert fresh.path.read_text() == ""


# ------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("normalization", ["auto", "robust"])
def test_pretraining_resolves_the_normalisation_once(data_dir, tmp_path, monkeypatch, normalization):
    """One scaling report and one fit per run, and the dataset normalises with exactly the
    statistics the run wrote to normalization.json (not a second fit of its own)."""
    import brainjepa.data.scaling as scaling
    import brainjepa.data.windows as windows
    import brainjepa.pretrain.loop as loop
    from brainjepa.transforms import normalization_from_dict

    calls = {"report": 0, "fit": 0}

    def counted(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        return wrapped

    report = counted("report", scaling.scaling_report)
    monkeypatch.setattr(scaling, "scaling_report", report)
    monkeypatch.setattr(windows, "scaling_report", report)
    monkeypatch.setattr(scaling, "fit_scaler", counted("fit", scaling.fit_scaler))
    made = []

    class Recorded(loop.WindowDataset):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(loop, "WindowDataset", Recorded)
    run = tmp_path / "run"
    pretrain(_config(data={"normalization": normalization}), data_dir, run, max_steps=1, progress=False)
    assert calls == {"report": 1, "fit": 1}
    method, scaler = normalization_from_dict(json.loads((run / "normalization.json").read_text()))
    (dataset,) = made
    assert dataset.normalization == method == ("psc" if normalization == "auto" else "robust")
    np.testing.assert_array_equal(dataset.scaler.median_, scaler.median_)
    np.testing.assert_array_equal(dataset.scaler.iqr_, scaler.iqr_)


def test_tiny_pretraining_learns_with_healthy_collapse_monitor(data_dir, tmp_path, caplog, saved_figures):
    run = tmp_path / "run"
    # the authors' recipe (un-centred targets, no patch norm): the loss falls fast as the
    # predictor learns the positional map
    cfg = _config(
        model={"patch_norm": False},
        optim={"accum_steps": 1, "epochs": 12, "ema_end": 1.0},
        train={"log_every": 1, "checkpoint_every": 20, "center_targets": False},
    )
    with caplog.at_level(logging.WARNING):
        summary = pretrain(cfg, data_dir, run, progress=False)
    assert summary["steps"] == summary["total_steps"] == 36  # 12 epochs x 3 steps
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    losses = [r["loss"] for r in records]
    assert np.mean(losses[:5]) > 1.1 * np.mean(losses[-5:])
    assert min(r["target_std"] for r in records) > 0.1  # the default collapse_std
    assert not [r for r in caplog.records if "collapse" in r.getMessage()]
    last = records[-1]
    assert last["momentum"] == 1.0 and last["lr"] == pytest.approx(1e-6)
    assert len({r["momentum"] for r in records}) == len(records)  # stepped once per optimizer step
    for key in (
        "step",
        "epoch",
        "loss",
        "lr",
        "wd",
        "momentum",
        "target_std",
        "target_cos",
        "context_tokens",
        "target_tokens",
        "alpha_tokens",
        "beta_tokens",
        "gamma_tokens",
        "tokens_per_s",
        "peak_mem_mb",
    ):
        assert key in last
    assert last["target_tokens"] > 0 and last["context_tokens"] > 0
    assert last["alpha_tokens"] + last["beta_tokens"] + last["gamma_tokens"] >= last["target_tokens"]
    for name in ("config.yaml", "metrics.jsonl", "gradients.csv", "normalization.json", "loss.png"):
        assert (run / name).is_file(), name
    # loss.png: the logged losses (and the learning rate on a second axis) against the step
    loss_axes, lr_axes = saved_figures[run / "loss.png"].axes
    steps = [float(r["step"]) for r in records]
    assert line_data(loss_axes) == [(steps, losses)]
    assert line_data(lr_axes) == [(steps, [r["lr"] for r in records])]
    check_png(run / "loss.png", saved_figures[run / "loss.png"])
    assert [p.name for p in find_checkpoints(run).values()] == ["step_00000020.pt", "step_00000036.pt"]
    ckpt = torch.load(checkpoint_path(run), weights_only=True)
    assert ckpt["step"] == 36 and ckpt["loss_name"] == "smooth_l1"
    assert ModelConfig.from_dict(ckpt["model_config"]).n_rois == 16
    assert {"encoder", "target_encoder", "predictor", "optimizer", "rng", "data_state", "config"} <= set(ckpt)
    assert summary["bundle"] is not None and (run / "bundle" / "model.safetensors").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["epochs"] == 12


def test_diagnostics_are_logged_while_training(data_dir, tmp_path, caplog):
    run = tmp_path / "run"
    cfg = _config(
        optim={"epochs": 4, "ema_start": 0.99, "ema_end": 0.999},
        train={"log_every": 2, "diagnose_every": 3, "checkpoint_every": 100},
    )
    with caplog.at_level(logging.WARNING):
        pretrain(cfg, data_dir, run, progress=False)
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    diag = [r for r in records if "diag_loss_own" in r]
    assert [r["step"] for r in diag] == [3, 6, 9, 12]  # every 3 steps and the last
    for key in (
        "loss_own",
        "loss_other",
        "loss_zero",
        "loss_position",
        "context_gain",
        "target_std",
        "target_cos",
        "context_std",
        "context_cos",
        "position_share",
        "subject_share",
        "effective_rank",
    ):
        assert np.isfinite(diag[-1][f"diag_{key}"]), key
    schedule = Schedule.from_config(resolve_config(cfg)["optim"], 12)
    for r in records:
        assert r["ema_init_share"] == pytest.approx(np.prod([schedule.momentum_at(s) for s in range(r["step"])]))
    warned = [m.getMessage() for m in caplog.records if "barely uses its context" in m.getMessage()]
    assert len(warned) == sum(r["diag_context_gain"] < 0.1 for r in diag)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_repeats_the_uninterrupted_run(data_dir, tmp_path, precision):
    cfg = _config(
        optim={"accum_steps": 1, "epochs": 4},  # 3 steps per epoch, 12 steps
        train={"precision": precision},
    )
    full, part = tmp_path / "full", tmp_path / "part"
    pretrain(cfg, data_dir, full, progress=False)
    first = pretrain(cfg, data_dir, part, progress=False, stop_after=5)  # mid-epoch 1
    assert first["steps"] == 5 and first["bundle"] is None
    assert checkpoint_path(part).name == "step_00000005.pt"
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(cfg, data_dir, part, progress=False)
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        pretrain(
            _config(optim={"accum_steps": 1, "epochs": 4, "lr": 5e-4}, train={"precision": precision}),
            data_dir,
            part,
            progress=False,
            resume=True,
        )
    resumed = pretrain(cfg, data_dir, part, progress=False, resume=True)
    assert resumed["steps"] == 12
    assert _losses(part) == _losses(full)  # exactly equal, step by step
    assert [json.loads(line)["step"] for line in open(part / "metrics.jsonl")] == list(range(1, 13))
    a = torch.load(checkpoint_path(full), weights_only=True)
    b = torch.load(checkpoint_path(part), weights_only=True)
    for part_name in ("encoder", "target_encoder", "predictor"):
        for k in a[part_name]:
            assert torch.equal(a[part_name][k], b[part_name][k]), (part_name, k)


def test_compile_trains_end_to_end_with_the_same_numbers(data_dir, tmp_path, monkeypatch):
    """train.compile=true: pretrain() runs its modules through torch.compile (dynamo traces them
    as in a real run) and trains, checkpoints and exports to the same numbers as without. The
    traced graphs run on the "eager" backend instead of the default Inductor, whose C++ kernels
    take over a minute to build for this model on one CPU core (and need a compiler)."""
    compiled = []
    real_compile = torch.compile

    def eager_compile(module, **options):
        compiled.append((type(module).__name__, options))
        return real_compile(module, backend="eager", **options)

    monkeypatch.setattr(torch, "compile", eager_compile)
    monkeypatch.setattr(pretrain_step, "compile_problem", lambda device: None)  # "eager" needs no compiler
    runs = {}
    for compile in (False, True):
        cfg = _config(train={"compile": compile, "precision": "fp32", "diagnose_every": 0, "checkpoint_every": 1})
        runs[compile] = tmp_path / f"compile_{compile}"
        summary = pretrain(cfg, data_dir, runs[compile], max_steps=1, progress=False)
        assert summary["steps"] == 1 and np.isfinite(summary["final_loss"])
    assert compiled == [(name, {"dynamic": True}) for name in ("FastEncoder", "FastPredictor", "FastEncoder")]
    assert _losses(runs[True]) == pytest.approx(_losses(runs[False]), rel=1e-5)
    assert [p.name for p in find_checkpoints(runs[True]).values()] == ["step_00000001.pt"]
    ckpt = torch.load(checkpoint_path(runs[True]), weights_only=True)
    reference = torch.load(checkpoint_path(runs[False]), weights_only=True)
    for part in ("encoder", "target_encoder", "predictor"):
        assert ckpt[part].keys() == reference[part].keys()  # plain names, no torch.compile prefix
        for k, v in ckpt[part].items():
            torch.testing.assert_close(v, reference[part][k], atol=1e-6, rtol=1e-5, msg=(part, k))
    bundle = BrainJEPA.from_pretrained(runs[True] / "bundle")
    torch.testing.assert_close(
        bundle.encoder.state_dict()["patch_embed.weight"], ckpt["target_encoder"]["patch_embed.weight"]
    )


def test_compile_without_a_cpp_compiler_trains_uncompiled_with_a_warning(monkeypatch, caplog):
    inductor_config = pytest.importorskip("torch._inductor.config")
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/bin/c++"))
    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)
    with caplog.at_level(logging.WARNING, logger="brainjepa.pretrain"):
        tr = _trainer(compile=True)
    assert not tr.compiled and tr.encoder_run is tr.encoder and tr.predictor_run is tr.predictor
    [record] = [r for r in caplog.records if "train.compile" in r.getMessage()]
    assert "InvalidCxxCompiler" in record.getMessage() and "training without compiling" in record.getMessage()
    masks = SpatiotemporalMasker(16, 3)(4, np.random.default_rng(0))
    micro = [(torch.randn(4, 16, 48, generator=torch.Generator().manual_seed(2)), masks)]
    fallback, plain = tr.step(micro, 0), _trainer().step(micro, 0)
    assert fallback["loss"].item() == plain["loss"].item()


def test_cli_pretrain_and_errors(data_dir, tmp_path, capsys, caplog):
    run = tmp_path / "cli_run"
    argv = [
        "pretrain",
        "tiny",
        "--data",
        str(data_dir),
        "--out",
        str(run),
        "--max-steps",
        "3",
        "--no-progress",
        "--set",
        "model.n_timepoints=32",
        "--set",
        "model.n_gradients=4",
        "--set",
        "optim.batch_size=4",
        "--set",
        "model.depth=1",
        "--set",
        "model.embed_dim=32",
        "--set",
        "model.num_heads=2",
        "--set",
        "model.predictor_embed_dim=16",
        "--set",
        "model.predictor_depth=1",
        "--set",
        "model.predictor_num_heads=2",
        "--set",
        "train.collapse_std=10",
    ]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert "pretrained 3/3 steps" in capsys.readouterr().out
    for name in ("config.yaml", "metrics.jsonl", "gradients.csv", "normalization.json", "loss.png"):
        assert (run / name).is_file(), name
    assert checkpoint_path(run).name == "step_00000003.pt"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["n_timepoints"] == 32 and resolved["train"]["max_steps"] == 3
    # a collapse monitor below its threshold warns, once
    warnings = [r for r in caplog.records if "collapse monitor" in r.getMessage()]
    assert len(warnings) == 1

    assert (
        main(
            [
                "pretrain",
                "tiny",
                "--data",
                str(data_dir),
                "--out",
                str(tmp_path / "bad"),
                "--set",
                "optim.learning_rate=1",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert "optim.learning_rate" in err and len(err.splitlines()) == 1
    assert main(["pretrain", "tiny", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "bad")]) == 1
    assert "missing" in capsys.readouterr().err


# ------------------------------------------------------------------------------- distributed


def _ddp_worker(rank: int, world: int, port: int, data_dir, run_dir, out_dir) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    cfg = _config(optim={"batch_size": 2}, train={"checkpoint_every": 100})
    summary = pretrain(cfg, data_dir, run_dir, max_steps=4, progress=False)
    assert summary["world_size"] == world and summary["rank"] == rank
    torch.save({name: m.state_dict() for name, m in summary["models"].items()}, out_dir / f"rank{rank}.pt")


def test_two_process_gloo_ddp_keeps_ranks_identical(data_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "ddp"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, data_dir, run, tmp_path), nprocs=2)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    ckpt = torch.load(checkpoint_path(run), weights_only=True)
    assert ckpt["step"] == 4 and ckpt["data_state"]["world_size"] == 2
    init = BrainEncoder(SMALL_MODEL).state_dict()  # only for key names
    for name in ("encoder", "target_encoder", "predictor"):
        for k, v in r0[name].items():
            assert torch.equal(v, r1[name][k]), (name, k)  # both ranks hold identical weights
            assert torch.equal(v, ckpt[name][k]), (name, k)  # and rank 0 saved them
    moved = [k for k in init if k != "gradients" and not torch.equal(r0["encoder"][k], r0["target_encoder"][k])]
    assert moved  # the ranks trained (the online encoder left the EMA copy behind)
    assert len(_losses(run)) == 4


def _failing_start_worker(rank: int, world: int, port: int, data_dir, run_dir, out_dir) -> None:
    """One rank of a run whose start-up fails on rank 0 only; writes what this rank raised."""
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        pretrain(_config(optim={"batch_size": 2}), data_dir, run_dir, max_steps=1, progress=False)
        outcome = "finished"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    (out_dir / f"rank{rank}.txt").write_text(outcome)


def test_a_rank0_failure_at_start_up_stops_every_rank(data_dir, tmp_path):
    """Only rank 0 creates the run folder; when it cannot (here --out names an existing file),
    every rank stops with an error naming rank 0's, instead of waiting for rank 0 forever."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "not_a_folder"
    run.write_text("a file where the run folder should go\n")
    spawn = torch.multiprocessing.get_context("spawn")
    ranks = [
        spawn.Process(target=_failing_start_worker, args=(rank, 2, port, data_dir, run, tmp_path)) for rank in range(2)
    ]
    for p in ranks:
        p.start()
    try:
        deadline = time.monotonic() + 120
        for p in ranks:
            p.join(timeout=max(deadline - time.monotonic(), 0.1))
        assert not any(p.is_alive() for p in ranks), "a rank was still waiting 120 s after the start"
    finally:
        for p in ranks:
            if p.is_alive():
                p.terminate()
                p.join(5)
    assert [p.exitcode for p in ranks] == [0, 0]
    rank0, rank1 = ((tmp_path / f"rank{rank}.txt").read_text() for rank in range(2))
    assert rank0.startswith("FileExistsError:") and str(run) in rank0
    assert rank1.startswith("BrainJEPAError: rank 1 of 2 stops: rank 0 failed while preparing the run folder")
    assert rank1.endswith(f"{rank0} (rank 0's output has its traceback)")
    assert run.read_text() == "a file where the run folder should go\n"
