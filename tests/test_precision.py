"""precision: auto on CPUs decides from a timed probe, cached per machine and thread count."""

from __future__ import annotations

import json

import pytest
import torch

import brainjepa.precision as precision
from brainjepa.errors import ConfigError


def _timings(fp32: float, bf16: float) -> dict:
    return {"fp32": {"total_s": fp32}, "bf16": {"total_s": bf16}}


def test_decide_takes_bf16_only_when_clearly_faster():
    assert precision.decide(_timings(1.0, 0.5))
    assert not precision.decide(_timings(1.0, 1.5))  # slower (a CPU whose bf16 path is slow)
    assert not precision.decide(_timings(1.0, 0.95))  # within the margin: fp32 (exact) wins a tie
    assert precision.decide(_timings(1.0, 0.95), margin=1.0)


def test_cache_is_keyed_by_cpu_and_threads(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BRAINJEPA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision, "cpu_model", lambda: "CPU A")
    calls = []

    def probe(result):
        def run():
            calls.append(torch.get_num_threads())
            return result

        return run

    with caplog.at_level("INFO", logger="brainjepa.precision"):
        assert precision.cpu_prefers_bf16(threads=1, probe=probe(_timings(1.0, 0.4)))
    assert calls == [1] and "bf16" in caplog.text and "400.0 ms" in caplog.text  # logged with its numbers
    # cached: the same machine and thread count does not probe again, whatever it would say
    assert precision.cpu_prefers_bf16(threads=1, probe=probe(_timings(1.0, 2.0)))
    assert calls == [1]
    # another thread count, another CPU: measured again
    assert not precision.cpu_prefers_bf16(threads=2, probe=probe(_timings(1.0, 2.0)))
    monkeypatch.setattr(precision, "cpu_model", lambda: "CPU B")
    assert not precision.cpu_prefers_bf16(threads=1, probe=probe(_timings(1.0, 2.0)))
    assert calls == [1, 2, 1]
    saved = json.loads((tmp_path / precision.CACHE_FILE).read_text())
    assert sorted(k.split(" | ")[:2] == ["CPU A", "1 threads"] for k in saved) == [False, False, True]
    assert {v["bf16"] for v in saved.values()} == {True, False}
    # refresh measures again; a damaged cache file is ignored and rewritten
    assert precision.cpu_prefers_bf16(threads=1, refresh=True, probe=probe(_timings(1.0, 0.1)))
    (tmp_path / precision.CACHE_FILE).write_text("not json")
    assert not precision.cpu_prefers_bf16(threads=1, probe=probe(_timings(1.0, 3.0)))
    assert calls == [1, 2, 1, 1, 1]


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("BRAINJEPA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert precision.cache_dir() == tmp_path / "brainjepa"
    monkeypatch.setenv("BRAINJEPA_CACHE_DIR", str(tmp_path / "x"))
    assert precision.cache_dir() == tmp_path / "x"


def test_probe_is_short_and_times_both_precisions():
    timings = precision.run_probe({"tokens": 256, "width": 64, "reps": 1})
    for name in ("fp32", "bf16"):
        t = timings[name]
        assert 0 < t["matmul_s"] < 1 and 0 < t["attention_s"] < 1
        assert t["total_s"] == pytest.approx(t["matmul_s"] + t["attention_s"])


def test_use_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_prefers_bf16", lambda: True)
    assert precision.use_bf16("auto", "cpu") and precision.use_bf16("bf16", "cpu")
    assert not precision.use_bf16("fp32", "cpu") and not precision.use_bf16("auto", "meta")
    monkeypatch.setattr(precision, "cpu_prefers_bf16", lambda: False)
    assert not precision.use_bf16("auto", "cpu")
    with pytest.raises(ConfigError, match="auto, bf16 or fp32"):
        precision.use_bf16("fp16", "cpu")
