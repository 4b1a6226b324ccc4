"""Embedding a cohort of any size in one process or many (:func:`embed_to_file`): the
:class:`~brainjepa.evaluate.shards.EmbeddingJob` run by every process of ``torchrun``.

With WORLD_SIZE > 1 (``torchrun --nproc_per_node K``, or several nodes) the process group is
joined as in pretraining (:func:`~brainjepa.pretrain.runtime.setup_distributed`: NCCL on GPUs,
gloo on CPUs, each rank on the GPU of its LOCAL_RANK). Rank 0 checks (or creates) the job folder
and hands out the shards still missing round-robin; each rank computes and writes its own; the
ranks then tell each other whether they succeeded (an error on one rank stops every rank with
its message, instead of leaving them waiting) and rank 0 writes the output. The hand-over at the
end goes through a gloo group without a practical time limit, since ranks can finish a shard
apart. Every shard is computed the same way by whichever rank computes it, so the file equals a
single-process run's.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from ..errors import BrainJEPAError, DataError
from ..pretrain.runtime import setup_distributed
from .scans import ScanList
from .shards import DEFAULT_SHARD_SIZE, EmbeddingJob, EmbedReport

log = logging.getLogger(__name__)


def embed_to_file(
    model,
    data,
    out: str | Path,
    *,
    readout: str = "mean",
    windows: str = "all",
    tokens: bool = False,
    batch_size: int = 16,
    shard_size: int = DEFAULT_SHARD_SIZE,
    on_error: str = "fail",
    overwrite: bool = False,
    device: str = "auto",
    tr: float | None = None,
    orientation: str | None = None,
    tr_source: str = "check",
    precision: str = "fp32",
) -> EmbedReport | None:
    """Embed every scan of ``data`` into ``out`` (:class:`EmbeddingJob`), resuming a job an
    earlier run of the same command left, in one process or as every rank of ``torchrun``.

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA`.
        data: a manifest, folder, prepared store, several files, or a cohort.
        out: the .npz to write (arrays as :func:`~brainjepa.evaluate.save_embeddings` writes).
        readout: one of :data:`~brainjepa.evaluate.features.READOUTS`.
        windows: 'all' or 'center'.
        tokens: also store the centre window's token features.
        batch_size: scans per forward pass.
        shard_size: scans per shard.
        on_error: 'fail' or 'skip' (listed in ``NAME.skipped.tsv``).
        overwrite: discard a job folder made for something else.
        device: 'auto', 'cpu', 'cuda' or 'cuda:N' (under torchrun each rank takes its GPU).
        tr: a TR in seconds for files that do not give one.
        orientation: the orientation of files that do not give one.
        tr_source: which TR wins when a manifest's tr column and a file disagree.
        precision: 'fp32' (default), 'bf16' or 'auto' (bf16 where this machine runs it faster:
            :func:`~brainjepa.precision.use_bf16`).

    Returns:
        What was written (on every rank).

    Raises:
        DataError: see :meth:`EmbeddingJob.start`, :meth:`EmbeddingJob.run_shard` and
            :meth:`EmbeddingJob.assemble`; on every rank when one rank failed.
    """
    t0 = time.monotonic()
    ctx = setup_distributed(device, "--device", "--device cpu")
    job = None
    try:
        scans = ScanList.open(data, tr=tr, orientation=orientation, tr_source=tr_source)
        if len(scans) == 0:
            raise DataError(f"{scans.source}: no scans to embed")
        job = EmbeddingJob(
            model.to(ctx.device).eval(),
            scans,
            out,
            readout=readout,
            windows=windows,
            tokens=tokens,
            batch_size=batch_size,
            shard_size=shard_size,
            on_error=on_error,
            device=ctx.device,
            rank=ctx.rank,
            precision=precision,
        )
        who = f"rank {ctx.rank}/{ctx.world_size}: " if ctx.world_size > 1 else ""
        todo = ctx.from_rank0(lambda: job.start(overwrite), f"checking the job folder {job.folder}")
        # one gloo group without a deadline for the end, whatever the backend: ranks may finish
        # a shard apart
        group = dist.new_group(backend="gloo", timeout=timedelta(days=7)) if ctx.world_size > 1 else None
        error = None
        try:
            _run_shards(job, todo[ctx.rank :: ctx.world_size], who, t0)
        except Exception as exc:  # every rank must hear of it, or the others wait forever
            error = exc
        errors = [None if error is None else str(error)]
        if ctx.world_size > 1:
            errors = [None] * ctx.world_size
            dist.all_gather_object(errors, None if error is None else str(error), group=group)
        if error is not None and not isinstance(error, BrainJEPAError):
            raise error  # a fault of the program: its traceback
        if any(errors):
            r = next(r for r, e in enumerate(errors) if e)
            message = errors[r] if ctx.world_size == 1 else f"rank {r} of {ctx.world_size} stopped: {errors[r]}"
            if ctx.rank == 0:  # every rank has stopped writing
                message = job.stopped(message)
            raise (type(error) if error is not None else BrainJEPAError)(message) from error
        return ctx.from_rank0(lambda: job.assemble(time.monotonic() - t0), f"writing {out}", group=group)
    finally:
        if job is not None:
            job.release()
        if ctx.created:
            dist.destroy_process_group()


def _run_shards(job: EmbeddingJob, shards: list[int], who: str, t0: float) -> None:
    n_scans, done, skipped = 0, 0, 0
    total = sum(min((k + 1) * job.shard_size, len(job.scans)) - k * job.shard_size for k in shards)
    for count, k in enumerate(shards, start=1):
        record = job.run_shard(k)
        n_scans += record["stop"] - record["start"]
        done += len(record["embedded"])
        skipped += len(record["skipped"])
        rate = n_scans / max(time.monotonic() - t0, 1e-9)
        log.info(
            "%sembed: shard %d (%d of %d this run), %d/%d scans (%.0f%%), %d embedded, %d skipped, "
            "%.2f scans/s, about %.0f s left",
            who,
            k,
            count,
            len(shards),
            n_scans,
            total,
            100 * n_scans / max(total, 1),
            done,
            skipped,
            rate,
            (total - n_scans) / max(rate, 1e-9),
        )
