"""Cohort-scale embedding: shards, resume after a crash, refusal of a changed job, --on-error
skip for embed/probe/finetune, and several processes (gloo) giving one process's file."""

from __future__ import annotations

import hashlib
import json
import socket

import numpy as np
import pytest
import torch
from conftest import write_manifest

from brainjepa.bundle import BrainJEPA
from brainjepa.cli import main
from brainjepa.data import open_cohort
from brainjepa.errors import BrainJEPAError, DataError
from brainjepa.evaluate import embed_cohort
from brainjepa.evaluate.embedjob import embed_to_file
from brainjepa.evaluate.scans import ScanList, usable_cohort
from brainjepa.evaluate.shards import EmbeddingJob
from brainjepa.model import ModelConfig
from brainjepa.runio import write_npz

pytestmark = pytest.mark.usefixtures("one_thread")

R = 16


def tiny_model(seed: int = 0) -> BrainJEPA:
    cfg = ModelConfig.from_size(
        "tiny", n_rois=R, n_timepoints=32, n_gradients=4, embed_dim=32, depth=1, num_heads=2, patch_size=16
    )
    torch.manual_seed(seed)
    g = np.random.default_rng(0).normal(size=(R, 4)).astype(np.float32)
    return BrainJEPA(cfg, g, normalization={"method": "zscore"}, target_tr=2.0, roi_labels=[f"r{i}" for i in range(R)])


def cohort_dir(folder, n=11, bad=None):
    """n scans (.npy, TR 2 s, 40-100 frames) with age labels; ``bad``: {k: kind} replaces scan k
    by a short, NaN, wrong-ROI or missing file."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    rows = []
    for k in range(n):
        x = rng.normal(size=(R, 40 + 6 * k)).cumsum(axis=1).astype(np.float32)
        kind = (bad or {}).get(k)
        if kind == "short":
            x = x[:, :10]  # fewer frames than one 16-frame patch
        elif kind == "nan":
            x[2, 3] = np.nan
        elif kind == "rois":
            x = x[:12]
        if kind != "missing":
            np.save(folder / f"sub-{k:02d}.npy", x)
        rows.append([f"sub-{k:02d}.npy", f"sub-{k:02d}", 2.0, 20 + k])
    return write_manifest(folder, rows, ("path", "subject", "tr", "age"))


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_sharded_file_holds_what_the_in_memory_embedding_gives(tmp_path):
    m = cohort_dir(tmp_path / "data")
    model = tiny_model()
    out = tmp_path / "emb.npz"
    report = embed_to_file(model, m, out, shard_size=4, batch_size=2, tokens=True, device="cpu")
    assert report.n_embedded == 11 and report.n_features == 32 and not report.skipped
    assert not (tmp_path / ".emb.npz.incomplete").exists()  # the job folder goes once the file is in place
    cohort = open_cohort(m)
    z = np.load(out)
    assert list(z["subjects"]) == cohort.subjects and z["label_age"].dtype == np.int64
    assert str(z["readout"]) == "mean" and str(z["windows"]) == "all" and list(z["roi_labels"])[:2] == ["r0", "r1"]
    # the same batches as one pass over the cohort: equal to the last bit
    np.testing.assert_array_equal(z["embeddings"], embed_cohort(model, cohort, batch_size=2, progress=False))
    tokens = embed_cohort(model, cohort, batch_size=2, tokens=True, progress=False)
    np.testing.assert_array_equal(z["tokens"], tokens)  # NaN (no data) in the same places
    assert z["tokens"].shape == (11, R, 2, 32)


def test_npz_writer_is_byte_reproducible_and_streams_chunks(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    chunks = ("<f4", (4, 3), iter([a[:1], a[1:]]))
    write_npz(tmp_path / "x.npz", [("names", np.array(["a", "bb"])), ("a", chunks)])
    write_npz(tmp_path / "y.npz", [("names", np.array(["a", "bb"])), ("a", a)])
    assert (tmp_path / "x.npz").read_bytes() == (tmp_path / "y.npz").read_bytes()  # no time stamps
    z = np.load(tmp_path / "x.npz")
    np.testing.assert_array_equal(z["a"], a)
    assert list(z["names"]) == ["a", "bb"]


class Crash(Exception):
    pass


def test_a_run_killed_mid_job_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    m = cohort_dir(tmp_path / "data")
    model = tiny_model()
    whole = tmp_path / "whole.npz"
    embed_to_file(model, m, whole, shard_size=3, batch_size=2, device="cpu")

    out = tmp_path / "emb.npz"
    real = EmbeddingJob._encode
    calls = {"n": 0}

    def crash_in_third_shard(self, batch, record, files):
        calls["n"] += 1
        if record["shard"] == 2 and calls["n"] > 1:  # inside a shard, after a batch was written
            raise Crash("power cut")
        return real(self, batch, record, files)

    monkeypatch.setattr(EmbeddingJob, "_encode", crash_in_third_shard)
    with pytest.raises(Crash):
        embed_to_file(model, m, out, shard_size=3, batch_size=2, device="cpu")
    folder = tmp_path / ".emb.npz.incomplete"
    assert sorted(p.name for p in folder.iterdir()) == ["job.json", "lock", "shard-000000", "shard-000001"]
    assert not out.exists()
    monkeypatch.setattr(EmbeddingJob, "_encode", real)

    done = []
    real_shard = EmbeddingJob.run_shard
    monkeypatch.setattr(EmbeddingJob, "run_shard", lambda self, k: done.append(k) or real_shard(self, k))
    report = embed_to_file(model, m, out, shard_size=3, batch_size=2, device="cpu")
    assert done == [2, 3] and report.resumed_shards == 2  # the saved shards are not computed again
    assert sha(out) == sha(whole)

    # a shard folder left half-written by a kill (no shard.json) is not taken as done
    job = EmbeddingJob(model, ScanList.open(m), tmp_path / "again.npz", shard_size=3)
    job.start()
    (job.folder / ".shard-000001.tmp-host-1").mkdir()
    (job.folder / ".shard-000001.tmp-host-1" / "embeddings.bin").write_bytes(b"\0" * 12)
    assert job.start() == [0, 1, 2, 3] and not (job.folder / ".shard-000001.tmp-host-1").exists()


def test_a_changed_model_readout_or_scan_list_is_refused_not_mixed(tmp_path, monkeypatch):
    m = cohort_dir(tmp_path / "data")
    out = tmp_path / "emb.npz"
    monkeypatch.setattr(EmbeddingJob, "_encode", lambda *a: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        embed_to_file(tiny_model(), m, out, shard_size=3, device="cpu")
    (tmp_path / ".emb.npz.incomplete" / "shard-000000").mkdir()  # as if a shard were done
    monkeypatch.undo()
    with pytest.raises(DataError, match="another model .*--overwrite"):
        embed_to_file(tiny_model(seed=1), m, out, shard_size=3, device="cpu")
    with pytest.raises(DataError, match="other options: readout 'mean'"):
        embed_to_file(tiny_model(), m, out, shard_size=3, readout="roi", device="cpu")
    with pytest.raises(DataError, match="other options: shard_size 3"):
        embed_to_file(tiny_model(), m, out, shard_size=4, device="cpu")
    with pytest.raises(DataError, match="other options: precision 'fp32'"):
        embed_to_file(tiny_model(), m, out, shard_size=3, device="cpu", precision="bf16")
    rows = (tmp_path / "data" / "manifest.csv").read_text().splitlines()
    (tmp_path / "data" / "manifest.csv").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(DataError, match=r"another list of scans \(11 scans from .*now 10"):
        embed_to_file(tiny_model(), m, out, shard_size=3, device="cpu")
    report = embed_to_file(tiny_model(), m, out, shard_size=3, device="cpu", overwrite=True)
    assert report.n_embedded == 10 and report.resumed_shards == 0


def test_on_error_skip_leaves_out_and_lists_bad_scans_and_fail_names_the_first(tmp_path, capsys):
    m = cohort_dir(tmp_path / "data", n=7, bad={1: "short", 3: "nan", 4: "rois", 6: "missing"})
    bundle = tiny_model().save_pretrained(tmp_path / "bundle")
    out = tmp_path / "emb.npz"
    args = ["embed", "--model", str(bundle), "--data", str(m), "--out", str(out), "--shard-size", "2"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "sub-01.npy: 10 time points" in err and "fewer than one time patch" in err and len(err.splitlines()) == 1
    assert "1 of 4 shards are saved" not in err  # shard 0 holds sub-01: nothing saved, nothing left
    assert not out.exists() and not (tmp_path / ".emb.npz.incomplete").exists()

    assert main([*args, "--on-error", "skip"]) == 3
    printed = capsys.readouterr().out
    assert "3 subjects" in printed and "skipped 4 of 7 scans" in printed
    z = np.load(out)
    assert list(z["subjects"]) == ["sub-00", "sub-02", "sub-05"] and list(z["label_age"]) == [20, 22, 25]
    lines = (tmp_path / "emb.skipped.tsv").read_text().splitlines()
    assert lines[0] == "path\tproblem" and len(lines) == 5
    reasons = dict(line.split("\t") for line in lines[1:])
    assert "fewer than one time patch" in reasons[str(tmp_path / "data" / "sub-01.npy")]
    assert "NaN/Inf" in reasons[str(tmp_path / "data" / "sub-03.npy")]
    assert "12 ROIs" in reasons[str(tmp_path / "data" / "sub-04.npy")]
    assert "not found" in reasons[str(tmp_path / "data" / "sub-06.npy")]

    # an empty manifest says so
    (tmp_path / "empty.csv").write_text("")
    assert main(["embed", "--model", str(bundle), "--data", str(tmp_path / "empty.csv"), "--out", str(out)]) == 1
    assert "the manifest is empty" in capsys.readouterr().err


def test_probe_and_finetune_skip_unusable_scans(tmp_path, capsys):
    m = cohort_dir(tmp_path / "data", n=24, bad={2: "short", 5: "nan"})
    model = tiny_model()
    cohort = open_cohort(m, on_error="skip")
    assert len(cohort) == 23  # the NaN file is refused when read; the short one only by the model
    with pytest.raises(DataError, match="sub-02.npy: 10 time points"):
        usable_cohort(model, cohort)
    kept = usable_cohort(model, cohort, "skip")
    assert len(kept) == 22 and "sub-02" not in kept.subjects and len(kept.skipped) == 2
    np.testing.assert_array_equal(kept.series(2), cohort.series(3))
    # fine-tuning trains on one full window: a scan with one patch but less than a window is left out
    short = open_cohort([np.random.default_rng(k).normal(size=(R, 24 if k == 1 else 64)) for k in range(3)], tr=2.0)
    assert len(usable_cohort(model, short, "skip", "all")) == 3
    assert usable_cohort(model, short, "skip", "input").subjects == ["sub-0000", "sub-0002"]
    bundle = model.save_pretrained(tmp_path / "bundle")
    common = ["--model", str(bundle), "--data", str(m), "--target", "age", "--seeds", "2"]
    out = tmp_path / "probe.json"
    probe = ["probe", *common, "--random-init-seeds", "0", "--readout", "mean", "--out", str(out)]
    assert main([*probe, "--on-error", "skip"]) == 3
    assert "skipped 2 scan(s)" in capsys.readouterr().out
    assert len((tmp_path / "probe.skipped.tsv").read_text().splitlines()) == 3
    assert main(probe) == 1
    assert "sub-05.npy" in capsys.readouterr().err  # the first unusable scan, by name


def _rank_worker(rank: int, world: int, port: int, manifest, out) -> None:
    """One rank of ``torchrun``: embeds a cohort with a bad scan (every rank must stop), then,
    once rank 0 has replaced the scan, again; writes what each call returned or raised."""
    import os

    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # one group for both calls (embed_to_file joins it)
    outcome = []
    for attempt in range(2):
        try:
            report = embed_to_file(tiny_model(), manifest, out, shard_size=3, batch_size=2, device="cpu")
            outcome.append(f"wrote {report.n_embedded}")
        except BrainJEPAError as exc:
            outcome.append(str(exc))
        if attempt == 0 and rank == 0:
            bad = manifest.parent / "sub-04.npy"
            np.save(bad, np.random.default_rng(9).normal(size=(R, 70)).astype(np.float32))
        dist.barrier()
    dist.destroy_process_group()
    (out.parent / f"rank{rank}.json").write_text(json.dumps(outcome))


def test_two_gloo_processes_write_the_single_process_file(tmp_path):
    m = cohort_dir(tmp_path / "data", bad={4: "nan"})
    out = tmp_path / "two" / "emb.npz"
    out.parent.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_worker, args=(2, port, m, out), nprocs=2)
    first, second = zip(*(json.loads((out.parent / f"rank{r}.json").read_text()) for r in range(2)))
    # shards of 3: sub-04 is in shard 1, rank 1's; rank 0 stops too, with rank 1's message, and
    # keeps the shards done (0 and 2) for the second call
    assert all(e.startswith("rank 1 of 2 stopped: ") and "sub-04.npy: 1 NaN/Inf" in e for e in first), first
    assert "2 of 4 shards are saved" in first[0]
    assert second == ("wrote 11", "wrote 11")
    single = tmp_path / "single.npz"
    embed_to_file(tiny_model(), m, single, shard_size=3, batch_size=2, device="cpu")
    assert sha(out) == sha(single)


def test_shards_are_handed_out_round_robin_over_what_is_left(tmp_path):
    m = cohort_dir(tmp_path / "data", n=10)
    job = EmbeddingJob(tiny_model(), ScanList.open(m), tmp_path / "e.npz", shard_size=2)
    assert job.n_shards == 5
    todo = job.start()
    job.run_shard(1)
    todo = job.start()
    assert todo == [0, 2, 3, 4] and [todo[r::2] for r in range(2)] == [[0, 3], [2, 4]]
    with pytest.raises(BrainJEPAError):
        EmbeddingJob(tiny_model(), ScanList.open(m), tmp_path / "e.npz", shard_size=0)


def test_a_second_run_of_a_live_job_is_refused_and_a_shard_written_twice_is_kept_once(tmp_path):
    m = cohort_dir(tmp_path / "data", n=4)
    first = EmbeddingJob(tiny_model(), ScanList.open(m), tmp_path / "e.npz", shard_size=2)
    first.start()
    second = EmbeddingJob(tiny_model(), ScanList.open(m), tmp_path / "e.npz", shard_size=2)
    with pytest.raises(DataError, match=r"another embed is writing these results \(host .*, pid \d+\)"):
        second.start()
    first.run_shard(0)
    first.release()  # as when its process ends, even by kill -9
    assert second.start() == [1]
    second.run_shard(0)  # e.g. workers a killed launcher left running: the shard is already there
    assert second.run_shard(1)["embedded"] == [2, 3]
    assert second.assemble().n_embedded == 4
    second.release()
