"""Subject features: the encoder's readouts over a subject's windows, the embedder, and
random-init copies of a model (the FC and amplitude baselines are in
:mod:`brainjepa.evaluate.baselines`).

Each scan is resampled to the model's TR and tiled with evenly spaced windows of the model's
length that cover it (:meth:`BrainJEPA.prepare_windows`; a scan shorter than one window is
encoded on its real time patches only); ``windows="center"`` keeps only the centre window.
Each window is encoded once; a subject's embedding under a readout (:func:`readout_features`)
is that readout averaged over its windows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..bundle import BrainJEPA
from ..errors import ConfigError, DataError
from ..precision import use_bf16
from ..transforms import resampled_length
from .baselines import window_fc

READOUTS = ("mean", "roi", "fc")
WINDOWS = ("all", "center")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to compute on.

    Args:
        device: a device, or None / 'auto' for CUDA when available, else the CPU.

    Returns:
        The torch device.
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    """``iterable`` wrapped in a transient tqdm progress bar.

    Args:
        iterable: what to iterate over.
        total: its length.
        desc: the bar's description.
        enabled: show the bar; otherwise it is disabled (iteration is unchanged).

    Returns:
        The tqdm iterator (it disappears when done).
    """
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


def repetition_times(tr, n: int) -> list:
    """One repetition time per series.

    Args:
        tr: one repetition time (or None) for all, or a sequence of one per series.
        n: the number of series.

    Returns:
        A list of n repetition times.

    Raises:
        DataError: a sequence of another length.
    """
    trs = list(tr) if isinstance(tr, (list, tuple, np.ndarray)) else [tr] * n
    if len(trs) != n:
        raise DataError(f"got {len(trs)} repetition times for {n} series")
    return trs


def readout_features(h: torch.Tensor, readout: str, eps: float = 1e-6) -> torch.Tensor:
    """One readout of token features.

    ``mean``: mean over the R * p tokens, then LayerNorm without affine (eps ``eps``), F = D.
    ``roi``: per ROI the mean over time patches of each feature, then their std (ddof 0),
    F = R * 2D laid out ROI by ROI as [mean (D), std (D)] (large: 0.7M values per subject at
    R = 450, D = 768).
    ``fc``: each ROI's (p, D) features centred over time and flattened to p * D, cosine
    between ROIs (Pearson over time and features), Fisher-z (|r| clipped below 1 - 1e-7),
    strict upper triangle in row-major order, F = R(R-1)/2. With one time patch nothing varies
    over time and every edge is 0.

    Args:
        h: (..., R, p, D) token features (p time patches).
        readout: one of :data:`READOUTS`.
        eps: the LayerNorm epsilon of ``mean``.

    Returns:
        (..., F) float32.

    Raises:
        ConfigError: an unknown readout.
    """
    h = h.float()
    if readout == "mean":
        pooled = h.mean(dim=(-3, -2))
        return F.layer_norm(pooled, pooled.shape[-1:], eps=eps)
    if readout == "roi":
        stats = torch.cat([h.mean(dim=-2), h.std(dim=-2, unbiased=False)], dim=-1)  # (..., R, 2D)
        return stats.flatten(-2)
    if readout == "fc":
        n_rois = h.shape[-3]
        # float64: correlations near 1 must not round to 1 before the Fisher-z
        c = (h - h.mean(dim=-2, keepdim=True)).flatten(-2).double()  # (..., R, p*D)
        c = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        r = (c @ c.transpose(-1, -2)).clamp(-1 + 1e-7, 1 - 1e-7)
        iu = torch.triu_indices(n_rois, n_rois, offset=1, device=h.device)
        return torch.atanh(r[..., iu[0], iu[1]]).float()
    raise ConfigError(f"unknown readout {readout!r}; choose one of {READOUTS}")


def check_readouts(readouts) -> tuple[str, ...]:
    """Checked readout names.

    Args:
        readouts: one readout name or several (see :data:`READOUTS`).

    Returns:
        The readouts as a tuple without repeats, in order.

    Raises:
        ConfigError: an unknown readout, or none.
    """
    readouts = (readouts,) if isinstance(readouts, str) else tuple(dict.fromkeys(readouts))
    unknown = [r for r in readouts if r not in READOUTS]
    if unknown or not readouts:
        raise ConfigError(f"readouts must be among {READOUTS}, got {list(readouts) or 'none'}")
    return readouts


def check_windows(windows: str) -> str:
    """A checked choice of windows.

    Args:
        windows: 'all' or 'center' (:data:`WINDOWS`).

    Returns:
        ``windows``.

    Raises:
        ConfigError: another value.
    """
    if windows not in WINDOWS:
        raise ConfigError(f"windows must be one of {WINDOWS}, got {windows!r}")
    return windows


def token_index(n_rois: int, n_patches: int, n_patches_valid: int) -> torch.Tensor:
    """The tokens of a window's valid time patches.

    Args:
        n_rois: R.
        n_patches: time patches per window.
        n_patches_valid: the valid ones (the first).

    Returns:
        (R * n_patches_valid,) indices of the tokens (r, t) with t < n_patches_valid, ROI-major
        (token r * n_patches + t), in the order :func:`encode_windows` returns them.
    """
    return (torch.arange(n_rois)[:, None] * n_patches + torch.arange(n_patches_valid)).reshape(-1)


def encode_windows(
    model, windows: torch.Tensor, n_patches_valid: int | None = None, precision: str = "fp32"
) -> torch.Tensor:
    """Token features of prepared windows.

    A window padded after its last valid patch is encoded on its valid tokens only, so the
    padding takes no part in attention. On a CPU the windows go through the encoder a few at a
    time (:func:`cpu_sub_batch`): the same numbers, and activations small enough for the C
    allocator to reuse instead of mapping fresh pages for every block.

    Args:
        model: a :class:`~brainjepa.bundle.BrainJEPA`.
        windows: (B, R, n_timepoints) prepared windows.
        n_patches_valid: valid time patches p (default all).
        precision: ``"fp32"``, ``"bf16"`` (bf16 autocast: matmuls and, on a CPU, the chunked
            attention kernel in bf16) or ``"auto"`` (:func:`brainjepa.precision.use_bf16`).

    Returns:
        (B, R, p, D), in fp32.

    Raises:
        DataError: ``n_patches_valid`` outside 1..n_patches.
    """
    cfg = model.config
    p = cfg.n_patches if n_patches_valid is None else int(n_patches_valid)
    if not 1 <= p <= cfg.n_patches:
        raise DataError(f"n_patches_valid must be between 1 and {cfg.n_patches}, got {p}")
    device = next(model.parameters()).device
    bf16 = use_bf16(precision, device)
    step = cpu_sub_batch(cfg, p, bf16) if device.type == "cpu" else max(len(windows), 1)
    parts = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, max(len(windows), 1), step):  # one call for an empty batch, as before
            part = windows[start : start + step]
            if p == cfg.n_patches:
                h = model.encode(part)
            else:  # prepare_windows made these inputs, so the input checks have nothing to add
                x = model._as_input(part)
                idx = token_index(cfg.n_rois, cfg.n_patches, p).to(x.device).expand(len(x), -1)
                h = model.encoder(x, token_idx=idx)
            parts.append(h.float())
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.reshape(len(windows), cfg.n_rois, p, -1)


CPU_ACTIVATION_BYTES = 16 * 2**20  # glibc serves blocks below 32 MiB from its heap, reused


def cpu_sub_batch(cfg, n_patches_valid: int, bf16: bool) -> int:
    """Windows per encoder call on a CPU: as many as keep the largest activation (the MLP's
    hidden layer) under :data:`CPU_ACTIVATION_BYTES`, at least one.

    Args:
        cfg: the model's :class:`~brainjepa.model.ModelConfig`.
        n_patches_valid: the time patches encoded per window.
        bf16: whether the activations are bf16 (else fp32).

    Returns:
        The sub-batch size.
    """
    hidden = cfg.n_rois * n_patches_valid * int(cfg.embed_dim * cfg.mlp_ratio) * (2 if bf16 else 4)
    return max(1, CPU_ACTIVATION_BYTES // hidden)


def subject_windows(model, series, tr: float | None = None, windows: str = "all") -> tuple[torch.Tensor, int]:
    """The windows of one subject the encoder sees.

    Args:
        model: a :class:`~brainjepa.bundle.BrainJEPA`.
        series: (R, T) raw series.
        tr: its repetition time in seconds.
        windows: ``all``: :meth:`BrainJEPA.prepare_windows`; ``center``: the centre window of
            :meth:`BrainJEPA.prepare` (a scan shorter than a window: its one padded window).

    Returns:
        ((W, R, n_timepoints) windows, n_patches_valid).
    """
    if check_windows(windows) == "center":
        n = np.shape(series)[-1]
        if model.target_tr is not None and tr is not None:
            n = resampled_length(n, tr, model.target_tr)
        if n >= model.config.n_timepoints:
            return model.prepare(series, tr=tr)[None], model.config.n_patches
    return model.prepare_windows(series, tr=tr)


@torch.inference_mode()
def encode_readouts(
    models: dict,
    X,
    tr=None,
    *,
    readouts: Sequence[str] = READOUTS,
    windows: str = "all",
    batch_size: int = 16,
    device: str | None = None,
    fc_window: bool = False,
    progress: bool = False,
    precision: str = "fp32",
) -> dict[str, dict[str, np.ndarray]]:
    """Several readouts of several encoders from one pass over the data.

    Each subject's windows are prepared once, with the first model, and every model encodes
    each window once; every readout is computed from those token features.

    Args:
        models: {name: BrainJEPA}, all with the same preprocessing (e.g. a model and its
            :func:`random_init_like` copies).
        X: a sequence of raw (R, T_i) series, read one at a time.
        tr: one repetition time or one per subject.
        readouts: readouts to compute (:func:`readout_features`).
        windows: 'all' or 'center' (:func:`subject_windows`).
        batch_size: windows per forward pass.
        device: where to encode (:func:`resolve_device`).
        fc_window: also return the FC of the same windows (:func:`~brainjepa.evaluate.baselines.window_fc`).
        progress: show a progress bar.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (:func:`encode_windows`).

    Returns:
        {name: {readout: (N, F) float32}}, each subject's readout averaged over its windows;
        with ``fc_window`` also {"fc_window": {"fc": (N, R(R-1)/2)}}.

    Raises:
        ConfigError: no models, or models of different architectures.
    """
    readouts, windows = check_readouts(readouts), check_windows(windows)
    if not models:
        raise ConfigError("encode_readouts needs at least one model")
    names = list(models)
    first = models[names[0]]
    for name in names[1:]:
        if models[name].config != first.config:
            raise ConfigError(f"model {name!r} has another architecture than {names[0]!r}; encode them separately")
    dev = resolve_device(device)
    nets = {name: m.to(dev).eval() for name, m in models.items()}
    n = len(X)
    trs = repetition_times(tr, n)
    cfg = first.config
    out: dict[str, dict[str, list]] = {name: {r: [] for r in readouts} for name in names}
    fcs: list[np.ndarray] = []
    steps = range(0, n, batch_size)
    for start in progress_bar(steps, len(steps), "encoding", progress):
        chunk = range(start, min(start + batch_size, n))
        items = [subject_windows(first, X[i], tr=trs[i], windows=windows) for i in chunk]
        if fc_window:
            fcs += [window_fc(w.numpy(), p, cfg.patch_size) for w, p in items]
        # windows of equal valid length share a batch (the usual case: all of them)
        groups: dict[int, list[int]] = {}
        for j, (_, p) in enumerate(items):
            groups.setdefault(p, []).append(j)
        for name, net in nets.items():
            sums = {r: None for r in readouts}
            counts = torch.zeros(len(items), dtype=torch.float64)
            for p, members in groups.items():
                x = torch.cat([items[j][0] for j in members])
                owner = torch.cat([torch.full((len(items[j][0]),), j) for j in members])
                counts.index_add_(0, owner, torch.ones(len(owner), dtype=torch.float64))
                for xb, ob in zip(x.split(batch_size), owner.split(batch_size)):
                    if dev.type == "cuda":  # page-locked, so the copy overlaps the previous batch's work
                        xb = xb.pin_memory().to(dev, non_blocking=True)
                    h = encode_windows(net, xb.to(dev), p, precision)
                    for r in readouts:
                        f = readout_features(h, r, cfg.layernorm_eps).double().cpu()
                        if sums[r] is None:
                            sums[r] = torch.zeros(len(items), f.shape[1], dtype=torch.float64)
                        sums[r].index_add_(0, ob, f)
            for r in readouts:
                out[name][r].append((sums[r] / counts[:, None]).float().numpy())
    result = {name: {r: np.concatenate(v) for r, v in per.items()} for name, per in out.items()}
    if fc_window:
        result["fc_window"] = {"fc": np.stack(fcs).astype(np.float32)}
    return result


class BrainJEPAEmbedder:
    """scikit-learn style subject embedder around a (frozen) :class:`~brainjepa.bundle.BrainJEPA`.

    :meth:`transform` resamples each raw series to the model's TR and cuts it into the windows
    the model sees, each normalised as in pretraining (so the same input always gives the same
    embedding); :meth:`transform_readouts` gives several readouts from one encoding pass.

    Args:
        model: the frozen model.
        readout: the readout of :meth:`transform`, one of :data:`READOUTS` (:func:`readout_features`).
        windows: ``"all"``: evenly spaced windows covering the scan (:meth:`BrainJEPA.prepare_windows`);
            ``"center"``: the centre window; None: ``"center"`` with ``tokens``, else ``"all"``.
        batch_size: subjects prepared together, and at most this many windows per forward pass.
        device: where to encode (:func:`resolve_device`).
        tokens: :meth:`transform` returns the centre window's token features (N, R, P, D)
            instead (a scan shorter than a window: NaN for its patches without data).
        progress: show progress bars.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"auto"``: bf16 where it is measured
            faster here (:func:`encode_windows`).

    Raises:
        ConfigError: an unknown readout or windows, or ``tokens`` with windows='all'.
    """

    def __init__(
        self,
        model,
        *,
        readout: str = "mean",
        windows: str | None = None,
        batch_size: int = 16,
        device: str | None = None,
        tokens: bool = False,
        progress: bool = False,
        precision: str = "fp32",
    ):
        self.model = model
        self.readout = check_readouts(readout)[0]
        if tokens and windows not in (None, "center"):
            raise ConfigError(
                "tokens=True returns the token features of one window per "
                "subject: pass windows='center' (or leave windows unset)"
            )
        # tokens are one window's; readouts average every window unless told otherwise
        self.window_set = check_windows(windows or ("center" if tokens else "all"))
        self.batch_size = batch_size
        self.device = device
        self.tokens = tokens
        self.progress = progress
        self.precision = precision

    def fit(self, X=None, y=None) -> BrainJEPAEmbedder:
        """Nothing to learn (the encoder is frozen); present for pipelines.

        Args:
            X: ignored.
            y: ignored.

        Returns:
            self.
        """
        return self

    def _batches(self, X, tr):
        n = len(X)
        trs = repetition_times(tr, n)
        steps = range(0, n, self.batch_size)
        for start in progress_bar(steps, len(steps), "embedding", self.progress):
            stop = min(start + self.batch_size, n)
            yield torch.stack([self.model.prepare(X[i], tr=trs[i]) for i in range(start, stop)])

    def windows(self, X, tr=None) -> torch.Tensor:
        """The model's centre-window input for each series (:meth:`BrainJEPA.prepare`).

        Args:
            X: a sequence of raw (R, T_i) series, read batch by batch.
            tr: one repetition time in seconds or one per series (used to resample to the
                model's TR).

        Returns:
            (N, R, T) float tensor on the CPU.
        """
        return torch.cat(list(self._batches(X, tr)))

    @torch.inference_mode()
    def transform(self, X, tr=None) -> np.ndarray:
        """Embeddings of the series X.

        Args:
            X: a sequence of raw (R, T_i) series (anything with ``len`` and ``[]``, read lazily
                batch by batch).
            tr: one repetition time in seconds or one per series (used to resample to the
                model's TR).

        Returns:
            (N, F) float32: the readout averaged over windows, or with ``tokens`` the centre
            window's token features (N, R, P, D).
        """
        if self.tokens:
            return self._tokens(X, tr)
        return self.transform_readouts(X, tr, (self.readout,))[self.readout]

    def transform_readouts(self, X, tr=None, readouts: Sequence[str] = READOUTS) -> dict[str, np.ndarray]:
        """Several readouts of the series X from one encoding pass.

        Args:
            X: a sequence of raw (R, T_i) series, read batch by batch.
            tr: one repetition time in seconds or one per series.
            readouts: the readouts (:func:`readout_features`).

        Returns:
            {readout: (N, F) float32}, each averaged over the embedder's windows.
        """
        return encode_readouts(
            {"model": self.model},
            X,
            tr,
            readouts=readouts,
            windows=self.window_set,
            batch_size=self.batch_size,
            device=self.device,
            progress=self.progress,
            precision=self.precision,
        )["model"]

    @torch.inference_mode()
    def _tokens(self, X, tr) -> np.ndarray:
        model = self.model.to(resolve_device(self.device)).eval()
        cfg = model.config
        trs = repetition_times(tr, len(X))
        out = np.full((len(X), cfg.n_rois, cfg.n_patches, cfg.embed_dim), np.nan, dtype=np.float32)
        steps = range(0, len(X), self.batch_size)
        for start in progress_bar(steps, len(steps), "embedding", self.progress):
            chunk = list(range(start, min(start + self.batch_size, len(X))))
            items = [subject_windows(model, X[i], tr=trs[i], windows="center") for i in chunk]
            for p in {p for _, p in items}:  # scans of equal valid length share a pass
                idx = [j for j, (_, q) in enumerate(items) if q == p]
                h = encode_windows(model, torch.cat([items[j][0] for j in idx]), p, self.precision)
                out[[chunk[j] for j in idx], :, :p] = h.float().cpu().numpy()
        return out

    def fit_transform(self, X, y=None, tr=None) -> np.ndarray:
        """The same as :meth:`transform` (nothing to fit).

        Args:
            X: a sequence of raw (R, T_i) series.
            y: ignored.
            tr: one repetition time in seconds or one per series.

        Returns:
            What :meth:`transform` returns.
        """
        return self.transform(X, tr=tr)


def random_init_like(model, seed: int = 0) -> BrainJEPA:
    """A freshly initialised copy of a model's architecture.

    Args:
        model: a :class:`~brainjepa.bundle.BrainJEPA`.
        seed: the initialisation seed.

    Returns:
        A BrainJEPA with the same configuration, gradients, normalisation, ROI labels and TR,
        and new weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BrainJEPA(
            model.config,
            model.encoder.gradients.detach().cpu(),
            normalization=model.normalization,
            roi_labels=model.roi_labels,
            target_tr=model.target_tr,
        )
