"""The CUDA paths (marked ``cuda``: skipped without a GPU; ``bash benchmarks/gpu_check.sh`` runs
them on a GPU machine), and the GPU check's behaviour on a machine without one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cfg

from brainjepa.attention import attention
from brainjepa.bundle import BrainJEPA
from brainjepa.evaluate import encode_windows
from brainjepa.masking import SpatiotemporalMasker
from brainjepa.pretrain import Trainer
from brainjepa.pretrain.config import resolve_config

ROOT = Path(__file__).resolve().parent.parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message is for machines without CUDA")
def test_gpu_check_without_a_gpu_says_so_and_succeeds():
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert "no GPU present" in done.stdout


@pytest.mark.cuda
@cuda
def test_bf16_attention_on_cuda_matches_fp64():
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 3, 300, 32, device="cuda", generator=gen) for _ in range(3))
    valid = torch.arange(300, device="cuda") < torch.tensor([[300], [250]], device="cuda")
    ref = attention(q.double(), k.double(), v.double(), valid).float()
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), valid)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[1, :, :250].float(), ref[1, :, :250], atol=2e-2, rtol=0)
    torch.testing.assert_close(out[0].float(), ref[0], atol=2e-2, rtol=0)


@pytest.mark.cuda
@cuda
def test_encoding_on_cuda_matches_the_cpu():
    model = BrainJEPA(tiny_cfg(), torch.randn(6, 30)).eval()
    x = torch.randn(3, 6, 64)
    with torch.inference_mode():
        cpu = encode_windows(model, x)
        gpu = encode_windows(model.cuda(), x.pin_memory().cuda(non_blocking=True))
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
        bf16 = encode_windows(model, x.cuda(), precision="bf16")
        torch.testing.assert_close(bf16.cpu(), cpu, atol=0.1, rtol=0.05)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_step_on_cuda(precision):
    cfg = tiny_cfg()
    run = resolve_config({"optim": {"batch_size": 2}, "train": {"precision": precision, "device": "cuda"}})
    trainer = Trainer(cfg, torch.randn(6, 30), run, total_steps=10, device="cuda")
    masker = SpatiotemporalMasker(cfg.n_rois, cfg.n_patches, seed=0)
    x = torch.randn(2, 6, 64).pin_memory()
    losses = [float(trainer.step([(x, masker(2).pin_memory())], i)["loss"]) for i in range(3)]
    assert np.isfinite(losses).all()
    assert all(p.device.type == "cuda" for p in trainer.params)
