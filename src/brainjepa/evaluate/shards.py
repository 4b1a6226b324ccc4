"""A cohort's embedding as shards on disk, resumable (:class:`EmbeddingJob`); the processes
that run it are :mod:`brainjepa.evaluate.embedjob`'s.

The scans of ``--data`` (a :class:`~brainjepa.evaluate.scans.ScanList`, listed but not read) are
cut into shards of ``shard_size`` consecutive scans. Each shard is read, checked, encoded and
written on its own, into the job folder ``.NAME.incomplete/`` next to the output ``NAME``::

    .emb.npz.incomplete/job.json                 what is embedded: model, options, scans
                        lock                     held (flock) by the run in progress
                        shard-000000/shard.json  the scans it embedded and skipped (written last)
                        shard-000000/embeddings.bin   float32 rows of the embedded scans
                        shard-000000/tokens.bin       (--tokens) float32 (n, R, P, D)

A shard is built as ``.shard-000000.tmp-HOST-PID`` and renamed when complete, so a shard folder
is either whole or absent: a run that is killed (even ``kill -9``) loses at most the shards in
progress, and the same command continues from the shards on disk. A job folder made with another
model, readout, windows, batch or shard size, or another list of scans is refused, never mixed.
A job folder another live run holds (its lock) is refused too.

Every shard is computed the same way whoever computes it (the same scans, batches and order),
so on the same machine and thread count the output does not depend on how often the job was
interrupted or how many processes shared it. The output (:func:`~brainjepa.runio.write_npz`) is
written in a stream, shard by shard, so memory stays one batch of scans plus one shard's rows,
whatever the cohort's size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data import NamedSeries, write_skipped
from ..errors import ConfigError, DataError
from ..precision import check_precision
from ..runio import incomplete_path, lock_folder, write_json_atomic, write_npz
from .features import BrainJEPAEmbedder, check_readouts, check_windows, resolve_device
from .scans import ScanList, check_on_error, check_scale, check_scan, report_batch_scale, skipped_path

log = logging.getLogger(__name__)

JOB_FORMAT = "brainjepa-embedding-job"
JOB_VERSION = 1
DEFAULT_SHARD_SIZE = 256  # scans per shard: what a crash can lose, and one file per shard
JOB_FILE = "job.json"
SHARD_FILE = "shard.json"


@dataclass
class EmbedReport:
    """What :func:`embed_to_file` wrote.

    Attributes:
        path: the .npz written.
        n_scans: scans in the input list.
        n_embedded: scans embedded (rows of the file).
        n_features: columns of the embeddings.
        skipped: (file, problem) of each scan left out (``on_error="skip"``).
        skipped_path: the TSV listing them, or None.
        seconds: wall time of this run.
        resumed_shards: shards found done on disk when this run started.
        readout: the readout.
        windows: the windows.
        tokens_shape: (N, R, P, D) of the token features, or None without them.
    """

    path: str
    n_scans: int
    n_embedded: int
    n_features: int
    skipped: list = field(default_factory=list)
    skipped_path: str | None = None
    seconds: float = 0.0
    resumed_shards: int = 0
    readout: str = "mean"
    windows: str = "all"
    tokens_shape: tuple | None = None

    def summary(self) -> str:
        """One line for people: what was written, and how many scans were left out.

        Returns:
            The line.
        """
        text = (
            f"wrote {self.path}: {self.n_embedded} subjects x {self.n_features} dimensions ({self.readout} "
            f"readout, {self.windows} windows)"
        )
        if self.tokens_shape:
            text += ", tokens " + " x ".join(map(str, self.tokens_shape))
        if self.skipped:
            text += f"; skipped {len(self.skipped)} of {self.n_scans} scans, listed in {self.skipped_path}"
        return text


def model_fingerprint(model) -> str:
    """The sha256 of what decides a model's embeddings.

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA`.

    Returns:
        The hex digest of its encoder's tensors (names, dtypes, shapes and bytes), architecture,
        normalisation, TR and ROI names; the predictor does not count.
    """
    h = hashlib.sha256()
    meta = [asdict(model.config), model.normalization, model.target_tr, model.roi_labels]
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, t in sorted(model.encoder.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class EmbeddingJob:
    """One cohort's embedding, shard by shard, in the job folder next to ``out``.

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA`.
        scans: the :class:`~brainjepa.evaluate.scans.ScanList` to embed.
        out: the .npz to write.
        readout: one of :data:`~brainjepa.evaluate.features.READOUTS`.
        windows: 'all' or 'center'.
        tokens: also store the centre window's token features.
        batch_size: scans per forward pass.
        shard_size: scans per shard.
        on_error: 'fail' or 'skip'.
        device: where to encode.
        rank: this process's rank (messages; 0 assembles).
        precision: 'fp32', 'bf16' or 'auto' (:func:`~brainjepa.evaluate.encode_windows`).

    Raises:
        ConfigError: an unknown readout, windows or on_error, or sizes below 1.
    """

    def __init__(
        self,
        model,
        scans: ScanList,
        out: str | Path,
        *,
        readout: str = "mean",
        windows: str = "all",
        tokens: bool = False,
        batch_size: int = 16,
        shard_size: int = DEFAULT_SHARD_SIZE,
        on_error: str = "fail",
        device=None,
        rank: int = 0,
        precision: str = "fp32",
    ):
        if batch_size < 1 or shard_size < 1:
            raise ConfigError(f"batch size and shard size must be at least 1, got {batch_size} and {shard_size}")
        self.model, self.scans, self.out = model, scans, Path(out)
        self.readout, self.windows = check_readouts(readout)[0], check_windows(windows)
        self.tokens, self.batch_size, self.shard_size = bool(tokens), int(batch_size), int(shard_size)
        self.on_error, self.device, self.rank = check_on_error(on_error), device, rank
        self.precision = check_precision(precision)
        self.folder = incomplete_path(self.out)
        self.n_shards = -(-len(scans) // self.shard_size)
        self.resumed = 0
        self._noted: set = set()

    # ---------------------------------------------------------------------------- the folder

    def fingerprint(self) -> dict:
        """What the job embeds: a changed value means shards on disk cannot be reused.

        Returns:
            {"model", "options", "scans"}.
        """
        names = ("readout", "windows", "tokens", "batch_size", "shard_size", "precision")
        options = {k: getattr(self, k) for k in names}
        return {"model": model_fingerprint(self.model), "options": options, "scans": self.scans.identity()}

    def shard_dir(self, k: int) -> Path:
        """The folder of shard ``k``."""
        return self.folder / f"shard-{k:06d}"

    def done(self, k: int) -> bool:
        """Whether shard ``k`` is complete on disk."""
        return (self.shard_dir(k) / SHARD_FILE).is_file()

    def start(self, overwrite: bool = False) -> list[int]:
        """Create the job folder, or check the one an earlier run left; list the shards to do.

        Args:
            overwrite: discard a job folder made for something else instead of refusing it.

        Returns:
            The shards not yet on disk, in order.

        Raises:
            DataError: a job folder of another model, options or scan list (without
                ``overwrite``), or a folder that is not an embedding job.
        """
        mine = {"format": JOB_FORMAT, "version": JOB_VERSION, **self.fingerprint()}
        if self.folder.is_file():  # left by an interrupted embed of an earlier version
            self.folder.unlink()
        if self.folder.is_dir():
            self._lock()
            problem = self._mismatch(mine)
            if problem:
                self.release()
            if problem and not overwrite:
                raise DataError(
                    f"{self.folder}: partial results of an interrupted embed of {self.out} with {problem}; "
                    "they cannot be mixed with this run: run the earlier command again to finish it, "
                    f"choose another --out, or pass --overwrite to discard them"
                )
            if problem:
                log.warning("discarding %s (made with %s)", self.folder, problem)
                shutil.rmtree(self.folder)
            else:
                self._note_device()
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True)
            meta = {**mine, "device": self._device_type(), "created_by": f"brainjepa {__version__}"}
            write_json_atomic(self.folder / JOB_FILE, meta)
            self._lock()
        for p in self.folder.glob(".shard-*.tmp-*"):  # shards in progress when a run was killed
            shutil.rmtree(p, ignore_errors=True)
        todo = [k for k in range(self.n_shards) if not self.done(k)]
        self.resumed = self.n_shards - len(todo)
        if self.resumed:
            log.info(
                "resuming %s: %d of %d shards already done (%s)", self.out, self.resumed, self.n_shards, self.folder
            )
        return todo

    def _lock(self) -> None:
        """Hold the job folder's lock, so that a second run of the same job (a command started
        twice, workers left running by a killed launcher) is refused instead of racing it."""
        if getattr(self, "_lock_fd", None) is None:
            self._lock_fd = lock_folder(self.folder, "another embed is writing these results")

    def release(self) -> None:
        """Let go of the job folder's lock (at the end of a run, whatever its outcome)."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)

    def _device_type(self) -> str:
        return resolve_device(self.device).type

    def _note_device(self) -> None:
        """Shards from another kind of device agree to float precision, not bit for bit: say so."""
        then = json.loads((self.folder / JOB_FILE).read_text()).get("device")
        if then and then != self._device_type():
            log.warning(
                "%s was started on %s and continues on %s: the shards agree to float precision, not bit for bit",
                self.folder,
                then,
                self._device_type(),
            )

    def _mismatch(self, mine: dict) -> str | None:
        try:
            theirs = json.loads((self.folder / JOB_FILE).read_text())
        except (OSError, ValueError):
            return "no readable job.json (not an embedding job of this version)"
        if theirs.get("format") != JOB_FORMAT or theirs.get("version") != JOB_VERSION:
            return f"another format ({theirs.get('format')} version {theirs.get('version')})"
        if theirs.get("model") != mine["model"]:
            return "another model (its weights, architecture, normalisation, TR or ROI names differ)"
        stored = {"precision": "fp32", **theirs["options"]}  # jobs from before the option ran fp32
        changed = [f"{k} {stored.get(k)!r}" for k, v in mine["options"].items() if stored.get(k) != v]
        if changed:
            return "other options: " + ", ".join(changed)
        if theirs.get("scans") != mine["scans"]:
            then, now = theirs.get("scans", {}), mine["scans"]
            return (
                f"another list of scans ({then.get('n_scans')} scans from {then.get('source')}, "
                f"now {now['n_scans']} from {now['source']}, or the same number in another order or with "
                "other files, subjects, sessions, TRs or reading options)"
            )
        return None

    def stopped(self, message: str) -> str:
        """After a failed run: the job folder is removed when it holds no finished shard, else
        kept, and the message says how to continue.

        Args:
            message: the error.

        Returns:
            The message to show.
        """
        n_done = sum(self.done(k) for k in range(self.n_shards))
        if n_done == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
            return message
        return (
            f"{message} [{n_done} of {self.n_shards} shards are saved in {self.folder}: once the file is fixed, "
            "the same command continues from them; --on-error skip leaves such scans out]"
        )

    # ---------------------------------------------------------------------------- one shard

    def run_shard(self, k: int) -> dict:
        """Read, check, encode and write shard ``k``.

        Args:
            k: the shard.

        Returns:
            Its record (what shard.json holds).

        Raises:
            DataError: with on_error 'fail', naming the first unusable scan (the shards written
                so far stay for a re-run).
        """
        start, stop = k * self.shard_size, min((k + 1) * self.shard_size, len(self.scans))
        tmp = self.folder / f".shard-{k:06d}.tmp-{socket.gethostname()}-{os.getpid()}"
        tmp.mkdir()
        record = {"shard": k, "start": start, "stop": stop, "embedded": [], "skipped": [], "features": None}
        files = {}
        try:
            files["embeddings"] = open(tmp / "embeddings.bin", "wb")
            if self.tokens:
                files["tokens"] = open(tmp / "tokens.bin", "wb")
            batch: list = []
            for i in range(start, stop):
                loaded = self._load(i, record)
                if loaded is not None:
                    batch.append(loaded)
                if len(batch) == self.batch_size or (i == stop - 1 and batch):
                    self._encode(batch, record, files)
                    batch = []
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
            write_json_atomic(tmp / SHARD_FILE, record)
            try:
                os.replace(tmp, self.shard_dir(k))
            except OSError:
                if not self.done(k):
                    raise
                shutil.rmtree(tmp)  # another run wrote this shard meanwhile: the same bytes
        except BaseException:
            for f in files.values():
                f.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return record

    def _skip(self, i: int, exc: DataError, record: dict) -> None:
        if self.on_error == "fail":
            raise exc
        log.warning("skipping %s", exc)
        record["skipped"].append([i, str(exc)])

    def _load(self, i: int, record: dict):
        try:
            ts = self.scans.read(i)
            ts.path = ts.path or self.scans.names[i]
            check_scan(self.model, ts)
        except DataError as exc:
            self._skip(i, exc, record)
            return None
        return i, NamedSeries.of(ts.data, ts.path), ts.tr

    def _encode(self, batch: list, record: dict, files: dict) -> None:
        report_batch_scale(self.model, [(b[1], b[2]) for b in batch], self._noted)
        common = {"batch_size": self.batch_size, "device": self.device, "precision": self.precision}
        emb = BrainJEPAEmbedder(self.model, readout=self.readout, windows=self.windows, **common)
        batch, rows = self._transform(emb, batch, self.windows, record)
        finite = np.isfinite(rows).all(axis=1)
        for j in np.flatnonzero(~finite):
            self._skip(batch[j][0], DataError(f"{batch[j][1].source_name}: its embedding is NaN/Inf"), record)
        batch, rows = [b for b, ok in zip(batch, finite) if ok], rows[finite]
        if self.tokens and batch:
            tok = BrainJEPAEmbedder(self.model, tokens=True, **common)
            batch_t, tokens = self._transform(tok, batch, "center", record)
            kept = {b[0] for b in batch_t}
            rows = rows[[b[0] in kept for b in batch]]
            batch = batch_t
            files["tokens"].write(np.ascontiguousarray(tokens, dtype=np.float32).tobytes())
        if batch:
            files["embeddings"].write(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
            record["embedded"] += [b[0] for b in batch]
            record["features"] = int(rows.shape[1])

    def _transform(self, embedder, batch: list, windows: str, record: dict):
        """The embedder's output for the batch. When it fails, the scans at fault are found one
        by one (the model's normalisation refuses them, or the encoder's output for them alone
        is NaN/Inf), skipped (or raised, naming them), and the rest encoded again as a batch."""
        while batch:
            try:
                return batch, embedder.transform([b[1] for b in batch], tr=[b[2] for b in batch])
            except DataError:
                bad = []
                for j, (i, x, tr) in enumerate(batch):
                    try:
                        check_scale(self.model, x, tr, windows)
                        embedder.transform([x], tr=[tr])
                    except DataError as exc:
                        bad.append(j)
                        named = str(exc).startswith(str(x.source_name))
                        self._skip(i, exc if named else DataError(f"{x.source_name}: {exc}"), record)
                if not bad:
                    raise
                batch = [b for j, b in enumerate(batch) if j not in bad]
        return [], np.zeros((0, 0), dtype=np.float32)

    # ---------------------------------------------------------------------------- the output

    def assemble(self, seconds: float = 0.0) -> EmbedReport:
        """Write the output from the shards, the TSV of skipped scans, and remove the job folder.

        Args:
            seconds: the run's wall time so far, for the report.

        Returns:
            What was written.

        Raises:
            DataError: a shard missing or unreadable; with on_error 'fail', a scan an earlier
                run left out with 'skip'; no scan embedded at all.
        """
        shards = [self._shard_record(k) for k in range(self.n_shards)]
        kept = [i for s in shards for i in s["embedded"]]
        skipped = [(self.scans.names[i], reason) for s in shards for i, reason in s["skipped"]]
        if skipped and self.on_error == "fail":
            raise DataError(
                f"{skipped[0][1]} [left out by an earlier run of this job with --on-error skip; run with "
                "--on-error skip, or --overwrite to start again]"
            )
        if not kept:
            first = f"; the first: {skipped[0][1]}" if skipped else ""
            raise DataError(f"{self.scans.source}: no usable scans, all {len(skipped)} were skipped{first}")
        n_features = next(s["features"] for s in shards if s["features"])
        cfg = self.model.config
        members = [
            ("subjects", np.array([self.scans.subjects[i] for i in kept], dtype=str)),
            ("embeddings", ("<f4", (len(kept), n_features), self._rows("embeddings", shards, (n_features,)))),
            ("readout", np.array(self.readout)),
            ("windows", np.array(self.windows)),
        ]
        if self.tokens:
            shape = (cfg.n_rois, cfg.n_patches, cfg.embed_dim)
            members.append(("tokens", ("<f4", (len(kept), *shape), self._rows("tokens", shards, shape))))
        if self.model.roi_labels is not None:
            members.append(("roi_labels", np.array(self.model.roi_labels, dtype=str)))
        for name, values in self.scans.labels(kept).items():
            values = np.asarray(values)
            members.append((f"label_{name}", values.astype(str) if values.dtype == object else values))
        tsv = skipped_path(self.out)
        if self.on_error == "skip":
            write_skipped(tsv, skipped)
        else:
            tsv.unlink(missing_ok=True)  # from an earlier run: it would describe another file
        write_npz(self.out, members)
        shutil.rmtree(self.folder, ignore_errors=True)
        return EmbedReport(
            str(self.out),
            len(self.scans),
            len(kept),
            n_features,
            skipped,
            str(tsv) if self.on_error == "skip" else None,
            seconds,
            self.resumed,
            self.readout,
            self.windows,
            (len(kept), cfg.n_rois, cfg.n_patches, cfg.embed_dim) if self.tokens else None,
        )

    def _shard_record(self, k: int, wait: float = 60.0) -> dict:
        """Shard ``k``'s record; waits up to ``wait`` seconds for one another process wrote to
        become visible (shared filesystems can show a new folder late)."""
        path = self.shard_dir(k) / SHARD_FILE
        deadline = time.monotonic() + wait
        while not path.is_file() and time.monotonic() < deadline:
            time.sleep(1.0)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{path}: shard {k} is missing or unreadable ({exc}); delete {self.shard_dir(k)} and run the "
                "same command again to recompute it"
            ) from None
        return record

    def _rows(self, key: str, shards: list, shape: tuple):
        """The rows of every shard's ``key``.bin in order, one shard at a time."""
        for s in shards:
            n = len(s["embedded"])
            if n == 0:
                continue
            if key == "embeddings" and s["features"] != shape[0]:
                raise DataError(f"{self.shard_dir(s['shard'])}: {s['features']} features, others have {shape[0]}")
            path = self.shard_dir(s["shard"]) / f"{key}.bin"
            rows = np.fromfile(path, dtype="<f4")
            if rows.size != n * int(np.prod(shape)):
                raise DataError(
                    f"{path}: {rows.size} values where {n} x {shape} were written; delete "
                    f"{self.shard_dir(s['shard'])} and run the same command again to recompute it"
                )
            yield rows
