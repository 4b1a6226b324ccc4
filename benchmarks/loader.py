"""Loader benchmark: training windows per second from a prepared store vs. per-subject CSV.gz.

Both loaders produce the same kind of item, a 450 x 160 window at TR ~2.2 s from UK Biobank-like
scans (450 ROIs x 490 volumes at TR 0.735 s), robust-scaled with stored median/IQR:

* ``csv.gz`` (the authors' approach, re-implemented here from its description): every item
  opens the subject's gzipped CSV (UKB layout), parses it with ``np.loadtxt``, takes 160 frames
  with stride 3 from a random 480-frame window, and scales them.
* ``store``: :class:`brainjepa.data.WindowDataset` over a store made by ``brainjepa prepare``
  from those same files: a random window is read from the memory map and resampled from each
  scan's own TR to 2.2 s with the anti-aliasing interpolator, then scaled.

``--big-gb N`` also writes an N GB store (synthetic scans, generated on the fly, deleted at the
end), evicts it from the page cache (posix_fadvise DONTNEED, this file only) and streams random
windows through a 2-worker DataLoader, to show a store larger than RAM streams from disk.

Results go to benchmarks/results/loader.json (merged with the previous file, so a run without
--big-gb keeps the last big-store numbers). Not part of the test suite.

    python benchmarks/loader.py                 # ~2-3 minutes
    python benchmarks/loader.py --big-gb 30     # + a 30 GB store (needs the disk space)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from brainjepa.data import Record, WindowDataset, open_store, pack_store, prepare_store
from brainjepa.io import TimeSeries, write_timeseries

R, T, TR_IN, TR_OUT, N_WIN = 450, 490, 0.735, 2.2, 160
RESULTS = Path(__file__).parent / "results" / "loader.json"


def fake_scan(rng: np.random.Generator) -> np.ndarray:
    """(R, T) float32 with BOLD-like smoothness and per-ROI baselines (content does not matter)."""
    x = rng.standard_normal((R, T + 4), dtype=np.float32)
    x = (x[:, :-4] + x[:, 1:-3] + x[:, 2:-2] + x[:, 3:-1] + x[:, 4:]) / 2.2
    return x * 8 + rng.uniform(300, 900, (R, 1)).astype(np.float32)


def authors_style_item(path: Path, median: np.ndarray, iqr: np.ndarray, rng) -> torch.Tensor:
    x = np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(1, T + 1), dtype=np.float32)  # (R, T)
    start = int(rng.integers(0, x.shape[1] - 3 * N_WIN + 1))
    window = x[:, start : start + 3 * N_WIN : 3]
    return torch.from_numpy((window - median[:, None]) / iqr[:, None])


def rate(fn, n: int) -> tuple[float, float]:
    """(items per second, ms per item) over n calls after one warm-up call."""
    fn(0)
    t0 = time.perf_counter()
    for k in range(n):
        fn(k)
    dt = time.perf_counter() - t0
    return n / dt, 1e3 * dt / n


def loader_rate(ds, n_windows: int, workers: int, batch: int = 32, shuffle: bool = True) -> float:
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=n_windows) if shuffle else None
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers)
    it = iter(loader)
    next(it)  # workers started and warm
    t0 = time.perf_counter()
    seen = 0
    for b in it:
        seen += b.shape[0]
    return seen / (time.perf_counter() - t0)


def small_benchmark(work: Path, n_subjects: int) -> dict:
    rng = np.random.default_rng(0)
    folder = work / "csv"
    rows = ["path,subject,tr"]
    for i in range(n_subjects):
        write_timeseries(folder / f"{1000000 + i}_20227_2_0.csv.gz", fake_scan(rng), sidecar=False)
        rows.append(f"{1000000 + i}_20227_2_0.csv.gz,{1000000 + i},{TR_IN}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    files = sorted(folder.glob("*.csv.gz"))
    out = {"n_subjects": n_subjects, "scan": f"{R} x {T} at TR {TR_IN} s", "window": f"{R} x {N_WIN} at TR {TR_OUT} s"}

    t0 = time.perf_counter()
    prepare_store(folder / "manifest.csv", work / "store32", dtype="float32")
    out["prepare_files_per_s"] = round(n_subjects / (time.perf_counter() - t0), 2)
    prepare_store(folder / "manifest.csv", work / "store16", dtype="float16")
    store = open_store(work / "store32")
    median = np.asarray(store.normalization["median"], dtype=np.float32)
    iqr = np.asarray(store.normalization["iqr"], dtype=np.float32)

    wps, ms = rate(lambda k: authors_style_item(files[k % len(files)], median, iqr, rng), 20)
    out["csv_gz_authors_style"] = {"windows_per_s": round(wps, 1), "ms_per_window": round(ms, 1)}

    torch.set_num_threads(1)  # one core per loader process, like a DataLoader worker
    for dtype in ("float32", "float16"):
        ds = WindowDataset(work / f"store{dtype[-2:]}", N_WIN, target_tr=TR_OUT, train=True)
        order = np.random.default_rng(1).integers(0, len(ds), 4000)
        wps1, ms1 = rate(lambda k: ds[int(order[k])], 2000)
        wps2 = loader_rate(ds, 8000, workers=2)
        out[f"store_{dtype}"] = {
            "single_process_windows_per_s": round(wps1, 1),
            "ms_per_window": round(ms1, 3),
            "dataloader_2_workers_windows_per_s": round(wps2, 1),
        }
    best = max(
        out["store_float32"]["dataloader_2_workers_windows_per_s"],
        out["store_float16"]["dataloader_2_workers_windows_per_s"],
    )
    out["speedup_single_process"] = round(
        out["store_float32"]["single_process_windows_per_s"] / out["csv_gz_authors_style"]["windows_per_s"], 1
    )
    out["speedup_best"] = round(best / out["csv_gz_authors_style"]["windows_per_s"], 1)
    return out


def vmstat(key: str) -> int:
    for line in open("/proc/vmstat"):
        name, value = line.split()
        if name == key:
            return int(value)
    return 0


def big_benchmark(work: Path, gigabytes: float, dtype: str, seconds: float) -> dict:
    n_subjects = int(gigabytes * 2**30 // (R * T * np.dtype(dtype).itemsize))
    free = shutil.disk_usage(work).free
    need = n_subjects * R * T * np.dtype(dtype).itemsize
    if need > free - 10 * 2**30:
        raise SystemExit(
            f"--big-gb {gigabytes}: needs {need / 2**30:.1f} GiB, only {free / 2**30:.1f} GiB free "
            "(keeping 10 GiB spare); choose a smaller size"
        )
    rng = np.random.default_rng(0)
    pool = [fake_scan(rng) for _ in range(8)]

    def scans():
        for i in range(n_subjects):  # a pool of scans, shifted per subject: generated, not stored
            x = np.roll(pool[i % 8], i % T, axis=1) + np.float32(i % 97)
            yield Record(path=f"synthetic/{i}", subject=f"sub-{i:06d}", tr=TR_IN), TimeSeries(x, None, TR_IN, None)

    store_dir = work / "big"
    t0 = time.perf_counter()
    pack_store(scans(), store_dir, dtype=dtype, max_scaler_timepoints=20_000)
    write_s = time.perf_counter() - t0
    data = store_dir / "data.bin"
    size = data.stat().st_size
    fd = os.open(data, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # evict this file only: streaming starts cold
    os.close(fd)
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ds = WindowDataset(store_dir, N_WIN, target_tr=TR_OUT, train=True)
    pgin, majflt = vmstat("pgpgin"), vmstat("pgmajfault")
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**9)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, sampler=sampler, num_workers=2)
    t0 = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += batch.shape[0]
        if time.perf_counter() - t0 > seconds:
            break
    elapsed = time.perf_counter() - t0
    read_gib = (vmstat("pgpgin") - pgin) / 2**20  # pgpgin counts KiB read from block devices
    del loader
    return {
        "store_gib": round(size / 2**30, 2),
        "dtype": dtype,
        "n_subjects": n_subjects,
        "ram_gib": round(mem_total / 2**30, 1),
        "write_s": round(write_s, 1),
        "write_gib_per_s": round(size / 2**30 / write_s, 2),
        "stream_seconds": round(elapsed, 1),
        "windows": seen,
        "dataloader_2_workers_windows_per_s": round(seen / elapsed, 1),
        "disk_read_gib_during_stream": round(read_gib, 2),
        "major_page_faults_during_stream": vmstat("pgmajfault") - majflt,
        "note": "page cache evicted for the store before streaming; windows drawn uniformly over all subjects",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=48, help="subjects in the CSV.gz vs store comparison")
    p.add_argument("--big-gb", type=float, default=0.0, help="also stream an N GB store (0: skip)")
    p.add_argument("--big-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--big-seconds", type=float, default=60.0, help="how long to stream the big store")
    p.add_argument("--workdir", default=None, help="scratch folder (default: system temp)")
    args = p.parse_args()

    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    cpu = (
        next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor() or platform.machine(),
        )
        if os.path.exists("/proc/cpuinfo")
        else platform.machine()
    )
    results["machine"] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    work = Path(tempfile.mkdtemp(prefix="brainjepa-bench-", dir=args.workdir))
    try:
        load_before = os.getloadavg()[0]
        results["small"] = small_benchmark(work, args.subjects)
        # other jobs on the machine change these numbers: record how busy it was
        results["small"]["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        print(json.dumps(results["small"], indent=1))
        if args.big_gb > 0:
            key = "big_store" if args.big_dtype == "float32" else f"big_store_{args.big_dtype}"
            results[key] = big_benchmark(work, args.big_gb, args.big_dtype, args.big_seconds)
            results[key]["load_average_1min"] = round(os.getloadavg()[0], 2)
            print(json.dumps(results[key], indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
