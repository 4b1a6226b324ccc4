"""Files that must never be left half-written: atomic writes, folders moved into place,
checkpoints, and a run's metrics log.

Every writer here goes through a temporary name next to its target and a rename
(:func:`os.replace`), so an interrupted process leaves either the previous file or the new one,
never a mixture. Folders (a bundle, a store, embeddings) are built under
``.NAME.incomplete`` next to ``NAME`` and moved into place when complete
(:func:`move_into_place`); readers recognise a left-over ``.incomplete`` folder and say so.

A pretraining run folder (see ``docs/cli.md``)::

    RUN_DIR/config.yaml          the resolved config
            metrics.jsonl        one JSON object per logged step (:class:`MetricsLog`)
            checkpoints/step_00000120.pt   (the last ``train.keep_last``; latest = highest step)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import BrainJEPAError, ConfigError, DataError

CHECKPOINTS = "checkpoints"
INCOMPLETE_SUFFIX = ".incomplete"  # a folder being written: .NAME.incomplete next to NAME

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator:
    """Open a temporary file that replaces ``path`` when the block succeeds.

    The file is created next to ``path``; on success it is flushed, synced to disk and renamed
    to ``path``, on failure deleted (``path`` keeps its previous content).


    Args:
        path: the file to write.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).

    Yields:
        The open temporary file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_file`).

    Args:
        path: the file to write.
        text: its whole content.

    Returns:
        ``path``, as a Path.
    """
    with atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | Path, obj, indent: int | None = 2, allow_nan: bool = True) -> Path:
    """Write ``obj`` as JSON (with a final newline) atomically (:func:`atomic_file`).

    Args:
        path: the file to write.
        obj: a JSON-serialisable object.
        indent: spaces per indentation level; None writes one line.
        allow_nan: whether NaN and infinities may be written (as ``NaN``/``Infinity``, which
            Python reads back but strict JSON readers do not); False raises on them.

    Returns:
        ``path``, as a Path.
    """
    return write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n")


def write_npz(path: str | Path, members) -> Path:
    """Write an .npz that ``np.load`` reads, member by member, in a stream, byte-reproducibly.

    Unlike ``np.savez``, an array can be given as chunks (never held whole in memory), and the
    file's bytes depend only on the arrays (a fixed time stamp in the zip headers), so equal
    contents give identical files. The file is written atomically.

    Args:
        path: the file.
        members: (name, array) or (name, (dtype, shape, iterable of chunks)) in order; the chunks
            are C-ordered arrays whose bytes together make the array.

    Returns:
        ``path``, as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in members:
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o600 << 16
            with zf.open(info, "w", force_zip64=True) as out:
                if isinstance(value, np.ndarray):
                    np.lib.format.write_array(out, value, allow_pickle=False)
                    continue
                dtype, shape, chunks = value
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
                np.lib.format.write_array_header_1_0(out, {**header, "shape": tuple(shape)})
                for chunk in chunks:
                    out.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
    return path


def lock_folder(folder: str | Path, busy: str = "another process is writing it") -> int:
    """Take a folder's lock (``folder/lock``, an advisory ``flock``), or refuse.

    The kernel releases the lock when the holder ends, however it ends (``kill -9`` included),
    so a lock is never left stale; the file names the holder for the message of the next one.

    Args:
        folder: the folder (it must exist).
        busy: what a held lock means, for the message.

    Returns:
        The lock's file descriptor; ``os.close`` it to let go.

    Raises:
        DataError: another process holds the lock.
    """
    fd = os.open(Path(folder) / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "holder unknown"
        os.close(fd)
        raise DataError(
            f"{folder}: {busy} ({holder}); wait for it to end or stop it, or choose another output"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}".encode())
    return fd


def incomplete_path(final: str | Path) -> Path:
    """Where a folder is built before :func:`move_into_place`.

    Args:
        final: the folder's final path, ``.../NAME``.

    Returns:
        ``.../.NAME.incomplete``, next to ``final``.
    """
    final = Path(final)
    return final.with_name(f".{final.name}{INCOMPLETE_SUFFIX}")


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final``.

    An existing ``final`` (which the caller has checked may be replaced) is moved aside first and
    deleted only after the rename, so a crash in between loses neither; an empty ``final`` folder
    is simply removed.

    Args:
        tmp: the finished folder (usually :func:`incomplete_path` of ``final``).
        final: where it goes.
    """
    old = None
    if final.exists():
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        else:
            old = final.with_name(f".{final.name}.replaced-{os.getpid()}")
            os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------- checkpoints


def find_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """The checkpoints of a run folder.

    Args:
        run_dir: the run folder.

    Returns:
        ``{step: RUN_DIR/checkpoints/step_NNNNNNNN.pt}`` in increasing step order; empty when
        there are none (files whose name holds no step number are skipped).
    """
    found = {}
    for p in (Path(run_dir) / CHECKPOINTS).glob("step_*.pt"):
        try:
            found[int(p.stem.split("_", 1)[1])] = p
        except ValueError:
            continue
    return dict(sorted(found.items()))


def checkpoint_path(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint of one step of a run folder.

    Args:
        run_dir: the run folder.
        step: the step; None takes the latest.

    Returns:
        The path of the checkpoint file.

    Raises:
        BrainJEPAError: the run has no checkpoint, or none for ``step``.
    """
    found = find_checkpoints(run_dir)
    folder = Path(run_dir) / CHECKPOINTS
    if not found:
        raise BrainJEPAError(
            f"{folder}: no checkpoints (step_*.pt) found; is {run_dir} a brainjepa pretraining run folder?"
        )
    if step is None:
        return found[max(found)]
    if step not in found:
        raise BrainJEPAError(f"{folder}: no checkpoint for step {step}; available steps: {sorted(found)}")
    return found[step]


def save_checkpoint(state: dict, run_dir: str | Path, keep_last: int) -> Path:
    """Write a checkpoint atomically, then delete all but the newest ones.

    Args:
        state: what to save with :func:`torch.save`; must hold an int ``"step"``.
        run_dir: the run folder; the file is RUN_DIR/checkpoints/step_NNNNNNNN.pt.
        keep_last: how many of the newest checkpoints to keep (this one included).

    Returns:
        The new checkpoint file.
    """
    folder = Path(run_dir) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{int(state['step']):08d}.pt"
    with atomic_file(path, "wb") as f:
        torch.save(state, f)
    for old in list(find_checkpoints(run_dir).values())[:-keep_last]:
        old.unlink()
    return path


def load_latest_checkpoint(run_dir: str | Path) -> dict:
    """The newest readable checkpoint of a run, loaded on the CPU.

    Files are read with ``torch.load(weights_only=True)``; a damaged file is logged and the
    previous one tried.

    Args:
        run_dir: the run folder.

    Returns:
        The checkpoint's state dict.

    Raises:
        ConfigError: the run has no checkpoint to resume from.
        BrainJEPAError: no checkpoint file can be read.
    """
    found = list(find_checkpoints(run_dir).values())
    if not found:
        raise ConfigError(f"{run_dir}: nothing to resume (no {CHECKPOINTS}/step_*.pt); start the run without --resume")
    for path in reversed(found):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            log.warning("cannot read checkpoint %s (%s); trying the previous one", path, exc)
    raise BrainJEPAError(f"{Path(run_dir) / CHECKPOINTS}: no readable checkpoint")


# ------------------------------------------------------------------------------- metrics


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (one JSON object per line; blank lines skipped).

    Args:
        path: the metrics.jsonl file.

    Returns:
        The records, in file order.

    Raises:
        DataError: the file does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist (is this a pretraining run folder?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends records to RUN_DIR/metrics.jsonl, and to TensorBoard when it is installed.

    Args:
        run_dir: the run folder.
        keep_until: None starts a new file; a step keeps the records up to it (a resumed run
            drops what the interrupted one logged after its last checkpoint).
    """

    def __init__(self, run_dir: str | Path, keep_until: int | None = None):
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        kept = []
        if keep_until is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r["step"] <= keep_until]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.debug("tensorboard is not installed: metrics go to metrics.jsonl only")
        else:
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        """Append one record (flushed at once); its numbers also go to TensorBoard.

        Args:
            record: a JSON-serialisable dict with an int ``"step"``; its other int and float
                values are logged to TensorBoard as ``pretrain/KEY``.
        """
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"pretrain/{key}", value, record["step"])

    def close(self) -> None:
        """Close the file (and the TensorBoard writer)."""
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Heartbeat:
    """A log line at most every ``every`` seconds, for runs without a progress bar.

    Call it after each step with the step number and the latest known loss; it logs "step
    k/total" with the loss and the rate when ``every`` seconds have passed since the last line
    (the first call starts the clock).

    Args:
        total: the number of steps of the run.
        every: seconds between lines.
        what: the name at the start of each line.
        clock: a function returning seconds (injectable for tests).
        logger: where the lines go.
    """

    def __init__(
        self,
        total: int,
        every: float = 30.0,
        *,
        what: str = "pretrain",
        clock=None,
        logger: logging.Logger | None = None,
    ):
        self.total, self.every, self.what = int(total), float(every), what
        self.clock = clock or time.monotonic
        self.log = logger or log
        self.start = self.last = self.clock()
        self.first_step: int | None = None

    def __call__(self, step: int, loss: float | None = None) -> bool:
        """Log a line if ``every`` seconds have passed since the last one.

        Args:
            step: the number of steps done, shown as "step k/total" (the rate counts the steps
                since the one before the first call).
            loss: the latest known loss; None shows "n/a".

        Returns:
            Whether a line was logged.
        """
        now = self.clock()
        if self.first_step is None:
            self.first_step = step - 1
        if now - self.last < self.every:
            return False
        self.last = now
        rate = (step - self.first_step) / max(now - self.start, 1e-9) * 60
        shown = "n/a" if loss is None else f"{loss:.4f}"
        self.log.info(
            "%s: step %d/%d (%.0f%%), loss %s, %.1f steps/min",
            self.what,
            step,
            self.total,
            100.0 * step / max(self.total, 1),
            shown,
            rate,
        )
        return True
