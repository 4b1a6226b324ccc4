"""Write the inputs of the before/after table in docs/data-formats.md: python make_cases.py FOLDER."""

import csv
import json
import sys
from pathlib import Path

import numpy as np

from brainjepa.io import write_timeseries

root = Path(sys.argv[1])
root.mkdir(parents=True, exist_ok=True)
R = 40
rng = np.random.default_rng(0)


def scan(t, offset=0.0, scale=1.0):
    x = rng.normal(size=(R, t)).cumsum(axis=1) * 0.1 + rng.normal(size=(R, t))
    return (x * scale + offset).astype(np.float32)


def manifest(folder, rows, cols=("path", "subject", "tr")):
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)


labels = [f"roi{i:02d}" for i in range(R)]
# clean cohort (scaled), TR 2.0, 200 frames
d = root / "clean"
rows = []
for k in range(12):
    write_timeseries(d / f"sub-{k:02d}.npy", scan(200), tr=2.0)
    rows.append([f"sub-{k:02d}.npy", f"sub-{k:02d}", ""])
manifest(d, rows)
# mixed TR: 0.72 s x 600 frames and 2.0 s x 240 frames
d = root / "mixed"
rows = []
for k in range(12):
    tr, t = (0.72, 600) if k % 2 == 0 else (2.0, 240)
    write_timeseries(d / f"sub-{k:02d}.npy", scan(t), tr=tr)
    rows.append([f"sub-{k:02d}.npy", f"sub-{k:02d}", ""])
manifest(d, rows)
# raw BOLD: means ~1e4 with a site offset
d = root / "raw"
rows = []
for k in range(12):
    site_offset = 10000.0 if k % 2 == 0 else 14000.0
    x = scan(200, offset=0, scale=20.0) + site_offset + rng.uniform(-2000, 2000, (R, 1)).astype(np.float32)
    write_timeseries(d / f"sub-{k:02d}.npy", x, tr=2.0)
    rows.append([f"sub-{k:02d}.npy", f"sub-{k:02d}", ""])
manifest(d, rows)
# huge values: one file at 1e30
d = root / "huge"
rows = []
for k in range(12):
    x = scan(200)
    if k == 3:
        x = (x * 1e30).astype(np.float32)
    write_timeseries(d / f"sub-{k:02d}.npy", x, tr=2.0)
    rows.append([f"sub-{k:02d}.npy", f"sub-{k:02d}", ""])
manifest(d, rows)
# TR conflict: sidecar 0.72, manifest 2.0
d = root / "trconflict"
write_timeseries(d / "sub-01.npy", scan(300), tr=0.72)
manifest(d, [["sub-01.npy", "sub-01", "2.0"]])
# duplicated column names in a TSV
d = root / "dupcols"
d.mkdir(parents=True, exist_ok=True)
x = scan(200)
hdr = labels[:]
hdr[5] = hdr[4]
with open(d / "sub-01_timeseries.tsv", "w") as f:
    f.write("\t".join(hdr) + "\n")
    for row in x.T:
        f.write("\t".join(f"{v:.5g}" for v in row) + "\n")
json.dump({"RepetitionTime": 2.0}, open(d / "sub-01_timeseries.json", "w"))
manifest(d, [["sub-01_timeseries.tsv", "sub-01", ""]])
# non-UTF-8 manifest
d = root / "latin1"
write_timeseries(d / "sub-01.npy", scan(200), tr=2.0)
(d / "manifest.csv").write_bytes("path,subject,site\nsub-01.npy,sub-01,M\xfcnchen\n".encode("latin-1"))
# an interrupted store (what a killed prepare used to leave behind)
d = root / "interrupted"
d.mkdir(parents=True, exist_ok=True)
(d / "data.bin").write_bytes(b"\0" * 4096)
# 16 ROIs
d = root / "r16"
rows = []
for k in range(12):
    write_timeseries(d / f"sub-{k:02d}.npy", scan(200)[:16], tr=2.0)
    rows.append([f"sub-{k:02d}.npy", f"sub-{k:02d}", ""])
manifest(d, rows)
# a scan shorter than the window
d = root / "short"
write_timeseries(d / "sub-00.npy", scan(200), tr=2.0)
write_timeseries(d / "sub-01.npy", scan(100), tr=2.0)
manifest(d, [["sub-00.npy", "sub-00", ""], ["sub-01.npy", "sub-01", ""]])
# manifest listing the same file twice
d = root / "twice"
write_timeseries(d / "sub-01.npy", scan(200), tr=2.0)
manifest(d, [["sub-01.npy", "sub-01", ""], ["sub-01.npy", "sub-02", ""]])
print("cases in", root)
# a bigger cohort for the interrupted-prepare case (150 scans x 200 ROIs x 1000 frames, 116 MB)
d = root / "big"
rows = []
for k in range(150):
    write_timeseries(d / f"sub-{k:03d}.npy", rng.normal(size=(200, 1000)).astype(np.float32), tr=2.0)
    rows.append([f"sub-{k:03d}.npy", f"sub-{k:03d}", ""])
manifest(d, rows)
