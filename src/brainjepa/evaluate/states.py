"""Brain-state decoding: a label per window, decoded from each window on its own.

Traits (age, diagnosis) belong to a subject and are probed from embeddings averaged over a
scan (:func:`~brainjepa.evaluate.cohort.probe_cohort`). A *brain state* changes within a scan
(task blocks, arousal, a change of coupling regime), so here every window of every scan is one
sample: its token features under each readout, next to the references computed from the very
same frames:

- ``random_init#<k>:<readout>``: the same architecture randomly initialised (seed k);
- ``fc_window``: the window's Pearson FC (Fisher-z, upper triangle);
- ``amplitude``: each ROI's log temporal std in the window;
- ``level``: each ROI's mean in the window, relative to its whole scan (the scan is demeaned,
  or put in percent signal change when it is raw BOLD, before the windows are cut).

The baselines always read the scan scaled per scan, whatever the model's own normalisation,
so they keep a window's level relative to its scan. Splits keep subjects apart: for each split
seed the *subjects* are divided 60/20/20, and every window of a subject falls on the same side,
so a probe never sees the test subject's other windows.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..inputs import resampled_input, window_starts
from ..transforms import has_raw_baseline, resampled_length
from .baselines import fc_features
from .comparisons import (
    MODEL,
    RANDOM_INIT,
    comparison_rows,
    init_seeds,
    method_name,
    method_rank,
    random_init_summaries,
)
from .features import (
    READOUTS,
    check_readouts,
    encode_windows,
    progress_bar,
    random_init_like,
    readout_features,
    repetition_times,
    resolve_device,
)
from .labels import Split
from .probes import make_probe
from .protocol import Results, run_protocol

log = logging.getLogger(__name__)

STATE_BASELINES = ("fc_window", "amplitude", "level")
STATE_TARGET = "state"


def scan_scaled(x: np.ndarray) -> np.ndarray:
    """A scan scaled per scan for the baselines: percent signal change if it is raw BOLD, else
    demeaned.

    Args:
        x: (R, T) series.

    Returns:
        (R, T) float64.
    """
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=1, keepdims=True)
    if has_raw_baseline(x).all():
        return 100.0 * (x / mean - 1.0)
    return x - mean


def window_baselines(x: np.ndarray, starts: Sequence[int], length: int) -> dict[str, np.ndarray]:
    """The reference features of a scan's windows.

    Args:
        x: (R, T) the scan at the model's TR, scaled per scan (:func:`scan_scaled`).
        starts: the windows' start frames.
        length: the window length in frames.

    Returns:
        {"fc_window": (W, R(R-1)/2), "amplitude": (W, R), "level": (W, R)}, float32.
    """
    wins = [x[:, s : s + length] for s in starts]
    return {
        "fc_window": fc_features(wins),
        "amplitude": np.stack([np.log(np.maximum(w.std(axis=1), 1e-12)) for w in wins]).astype(np.float32),
        "level": np.stack([w.mean(axis=1) for w in wins]).astype(np.float32),
    }


@torch.inference_mode()
def window_features(
    models: dict,
    X,
    tr=None,
    *,
    readouts: Sequence[str] = READOUTS,
    batch_size: int = 64,
    device: str | None = None,
    baselines: bool = True,
    progress: bool = False,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per-window features of several encoders and the baselines, from one pass over the data.

    Every scan is cut into the windows :meth:`BrainJEPA.prepare_windows` makes (covering the scan);
    a scan shorter than one window has none and is left out (with a log line).

    Args:
        models: {name: BrainJEPA}, all with the same preprocessing (a model and its
            :func:`~brainjepa.evaluate.features.random_init_like` copies).
        X: a sequence of raw (R, T_i) series.
        tr: one repetition time or one per scan.
        readouts: the encoder readouts.
        batch_size: windows per forward pass.
        device: where to encode.
        baselines: also compute :data:`STATE_BASELINES`.
        progress: show a progress bar.

    Returns:
        ``(features, scan, start)``: {method name: (N_windows, F) float32}, the scan index of each
        window (N_windows,) and its start in seconds at the model's TR (N_windows,).

    Raises:
        ConfigError: no models, or models with different architectures or preprocessing.
        DataError: no scan is long enough for one window.
    """
    readouts = check_readouts(readouts)
    if not models:
        raise ConfigError("window_features needs at least one model")
    names = list(models)
    first = models[names[0]]
    for name in names[1:]:
        if models[name].config != first.config:
            raise ConfigError(f"model {name!r} has another architecture than {names[0]!r}")
    dev = resolve_device(device)
    nets = {name: m.to(dev).eval() for name, m in models.items()}
    cfg = first.config
    trs = repetition_times(tr, len(X))
    step = first.target_tr
    feats: dict[str, list] = {}
    scans, starts, skipped = [], [], []
    for i in progress_bar(range(len(X)), len(X), "encoding windows", progress):
        wins, n_valid = first.prepare_windows(X[i], tr=trs[i])
        if n_valid < cfg.n_patches:
            skipped.append(i)
            continue
        seconds = step if step is not None else (trs[i] or 1.0)
        if baselines:  # the same resampled frames the windows come from
            x, _ = resampled_input(first, X[i], trs[i], f"scan {i}")
            frames = window_starts(x.shape[1], cfg.n_timepoints)
            for k, v in window_baselines(scan_scaled(x), frames, cfg.n_timepoints).items():
                feats.setdefault(k, []).append(v)
        else:
            frames = window_starts(_n_frames(first, X[i], trs[i]), cfg.n_timepoints)
        if len(frames) != len(wins):
            raise DataError(f"scan {i}: {len(wins)} windows but {len(frames)} start frames")
        scans.append(np.full(len(wins), i))
        starts.append(frames * seconds)
        for name, net in nets.items():
            hs = [encode_windows(net, xb.to(dev)) for xb in wins.split(batch_size)]
            h = torch.cat(hs)
            for r in readouts:
                f = readout_features(h, r, cfg.layernorm_eps).cpu().numpy()
                feats.setdefault(method_name(name, r), []).append(f)
    if skipped:
        log.info("%d scan(s) shorter than one window left out of window features: %s", len(skipped), skipped[:10])
    if not scans:
        raise DataError(f"no scan has one full window of {cfg.n_timepoints} frames; use longer scans")
    out = {k: np.concatenate(v).astype(np.float32) for k, v in feats.items()}
    return out, np.concatenate(scans), np.concatenate(starts).astype(np.float64)


def scan_means(features: dict[str, np.ndarray], scan: np.ndarray, n_scans: int) -> dict[str, np.ndarray]:
    """Per-scan means of per-window features.

    For an encoder readout this is exactly the subject embedding of
    :func:`~brainjepa.evaluate.features.encode_readouts` with ``windows="all"`` (every window's
    readout, averaged), and for ``fc_window`` the FC baseline of the trait probes, so one pass
    over the windows serves both task families.

    Args:
        features: {name: (N_windows, F)} (:func:`window_features`).
        scan: (N_windows,) the scan of each window.
        n_scans: the number of scans.

    Returns:
        {name: (n_scans, F) float32}; a scan without windows gets NaN.
    """
    counts = np.bincount(scan, minlength=n_scans).astype(np.float64)
    out = {}
    for name, X in features.items():
        total = np.zeros((n_scans, X.shape[1]))
        np.add.at(total, scan, X)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = (total / counts[:, None]).astype(np.float32)
    return out


def _n_frames(model, series, tr) -> int:
    n = np.shape(series)[-1]
    if model.target_tr is not None and tr is not None:
        n = resampled_length(n, tr, model.target_tr)
    return n


def window_states(
    states: np.ndarray, tr: float, starts, length: float, lag: float = 6.0
) -> tuple[np.ndarray, np.ndarray]:
    """The state label of each window of a scan, seen through the hemodynamic delay.

    A window's label is the state that occupies most of it after shifting the neural state by
    ``lag`` seconds (the BOLD response peaks about 5-6 s after the neural event).

    Args:
        states: (T,) frame-by-frame neural states of the scan (:attr:`SimulatedCohort.states`).
        tr: the frame interval of ``states`` in seconds.
        starts: the windows' start times in seconds.
        length: the window length in seconds.
        lag: the hemodynamic delay in seconds.

    Returns:
        ``(labels, purity)``: (W,) int64 majority states and (W,) the fraction of the window
        in that state.
    """
    t = np.arange(len(states)) * tr + lag  # when each frame's state shows in the BOLD
    labels, purity = [], []
    for s in np.atleast_1d(np.asarray(starts, dtype=float)):
        inside = states[(t >= s) & (t < s + length)]
        frac = float(inside.mean()) if len(inside) else 0.0
        labels.append(int(frac > 0.5))
        purity.append(max(frac, 1 - frac))
    return np.array(labels, dtype=np.int64), np.array(purity)


def events_states(path, n_frames: int, tr: float, classes: Sequence[str] | None = None) -> np.ndarray:
    """A frame-by-frame state time course from a BIDS events file.

    The file is tab-separated with the columns ``onset`` and ``duration`` (seconds from the
    first frame) and ``trial_type``; frame k (acquired at k * tr) takes the trial type of the
    event with onset <= k * tr < onset + duration (the later event where two overlap) and state 0
    where none covers it. The hemodynamic delay is applied later (:func:`window_states`).

    Args:
        path: the ``*_events.tsv`` file.
        n_frames: the scan's frames.
        tr: the scan's repetition time in seconds.
        classes: the state names in order, the first for frames outside every event (default
            ``["rest", "task"]``); an event whose trial type is not among them is an error.

    Returns:
        (n_frames,) int64 state indices into ``classes``.

    Raises:
        DataError: an unreadable file, missing columns, bad numbers or an unknown trial type,
            naming the file.
    """
    classes = list(classes or ("rest", "task"))
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except OSError as e:
        raise DataError(f"{path}: cannot read the events file ({e})") from None
    if rows and not {"onset", "duration"} <= set(rows[0]):
        raise DataError(f"{path}: an events file needs the columns onset and duration (BIDS); found {list(rows[0])}")
    t = np.arange(n_frames) * tr + 1e-4  # onsets written to the millisecond must not miss a frame
    out = np.zeros(n_frames, dtype=np.int64)
    for k, row in enumerate(rows, start=2):
        kind = row.get("trial_type") or classes[-1]
        if kind not in classes:
            raise DataError(f"{path}, line {k}: trial_type {kind!r} is not one of the states {classes}")
        try:
            onset, duration = float(row["onset"]), float(row["duration"])
        except (TypeError, ValueError):
            raise DataError(f"{path}, line {k}: onset and duration must be numbers of seconds") from None
        out[(t >= onset) & (t < onset + duration)] = classes.index(kind)
    return out


def cohort_states(cohort, column: str, base=None, classes: Sequence[str] | None = None) -> list[np.ndarray]:
    """Every scan's state time course from the events files a cohort's label column names.

    Args:
        cohort: a :class:`~brainjepa.data.Cohort` whose ``column`` holds one events file per scan.
        column: the label column (e.g. the manifest's ``events``).
        base: the folder relative paths start from (default: each scan file's folder).
        classes: the state names (:func:`events_states`).

    Returns:
        Per scan, (T_i,) int64 states at the scan's own TR.

    Raises:
        DataError: a missing column or value, a scan without a TR, or a bad events file.
    """
    if column not in cohort.labels:
        raise DataError(f"the cohort has no column {column!r} naming events files; columns: {sorted(cohort.labels)}")
    out = []
    for i, value in enumerate(cohort.labels[column]):
        if value is None or str(value).strip() in ("", "nan", "n/a"):
            raise DataError(f"{cohort.name(i)}: no events file in column {column!r}; every scan needs one")
        if cohort.tr(i) is None:
            raise DataError(f"{cohort.name(i)}: no TR known, so its events cannot be placed on its frames; pass --tr")
        path = Path(str(value))
        if not path.is_absolute():
            folder = Path(base) if base is not None else Path(cohort.paths[i] or ".").parent
            path = folder / path
        out.append(events_states(path, cohort.length(i), cohort.tr(i), classes))
    return out


def state_labels(
    states: Sequence[np.ndarray],
    state_tr,
    scan: np.ndarray,
    start: np.ndarray,
    length: float,
    lag: float = 6.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Each window's state from each scan's frame-by-frame state time course.

    Args:
        states: per scan, (T_i,) integer states, one per frame of the original scan.
        state_tr: the frame interval of ``states`` (one value or one per scan) in seconds.
        scan: (N_windows,) the scan of each window.
        start: (N_windows,) the window starts in seconds.
        length: the window length in seconds.
        lag: the hemodynamic delay in seconds (:func:`window_states`).

    Returns:
        ``(y, purity)``: (N_windows,) the majority state and the fraction of the window in it.
    """
    trs = repetition_times(state_tr, len(states))
    y = np.empty(len(scan), dtype=np.int64)
    purity = np.empty(len(scan))
    for i in np.unique(scan):
        at = np.flatnonzero(scan == i)
        y[at], purity[at] = window_states(np.asarray(states[i]), trs[i], start[at], length, lag)
    return y, purity


def subject_split(n_subjects: int, seed: int, fractions=(0.6, 0.2, 0.2)) -> tuple[np.ndarray, ...]:
    """A random train / validation / test division of subject indices.

    Args:
        n_subjects: the number of subjects (at least 3).
        seed: the split seed.
        fractions: train, validation and test fractions.

    Returns:
        (train, val, test) subject indices.

    Raises:
        DataError: fewer than 3 subjects.
    """
    if n_subjects < 3:
        raise DataError(f"a split that keeps subjects apart needs at least 3 subjects, got {n_subjects}")
    perm = np.random.default_rng(seed).permutation(n_subjects)
    n_train = max(1, int(round(fractions[0] * n_subjects)))
    n_val = max(1, int(round(fractions[1] * n_subjects)))
    n_train = min(n_train, n_subjects - n_val - 1)
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


def probe_windows(
    features: dict[str, np.ndarray],
    y: np.ndarray,
    subject: np.ndarray,
    *,
    seeds=5,
    target: str = STATE_TARGET,
    progress: bool = True,
) -> Results:
    """Linear probes of a per-window label, every method on the same subject-grouped splits.

    Args:
        features: {method name: (N_windows, F)}.
        y: (N_windows,) integer labels.
        subject: (N_windows,) the subject of each window (splits keep subjects apart).
        seeds: a count (seeds 0..n-1) or the split seeds.
        target: the target's name in the records.
        progress: log every fit's test metrics.

    Returns:
        :class:`~brainjepa.evaluate.protocol.Results` with one record per (method, seed, metric).

    Raises:
        DataError: mismatched lengths, or a single class.
    """
    y = np.asarray(y, dtype=np.int64)
    for name, X in features.items():
        if len(X) != len(y):
            raise DataError(f"features[{name!r}] has {len(X)} rows for {len(y)} labelled windows")
    if len(np.unique(y)) < 2:
        raise DataError(f"{target}: every window has the same state; there is nothing to decode")
    ids, subject = np.unique(subject, return_inverse=True)

    def split_for(seed: int) -> Split:  # every window of a subject on the same side
        parts = subject_split(len(ids), seed)
        return Split(*(np.flatnonzero(np.isin(subject, part)) for part in parts))

    methods = {
        name: (lambda seed: make_probe("closed-form", "classification", seed), X) for name, X in features.items()
    }
    return run_protocol(
        y,
        methods,
        target=target,
        task="classification",
        n_classes=int(y.max() + 1),
        seeds=seeds,
        progress=progress,
        split_for=split_for,
    )


def probe_states(
    model,
    series,
    states: Sequence[np.ndarray],
    *,
    tr=None,
    state_tr=None,
    subjects: Sequence | None = None,
    lag: float = 6.0,
    seeds=5,
    readouts: Sequence[str] = READOUTS,
    random_init_seeds=3,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
    features: tuple | None = None,
    min_purity: float = 0.0,
    target: str = STATE_TARGET,
) -> Results:
    """Window-level brain-state decoding with the pretrained encoder and every reference.

    Args:
        model: the pretrained :class:`~brainjepa.bundle.BrainJEPA`.
        series: the raw (R, T_i) scans.
        states: per scan, (T_i,) integer states per frame (e.g.
            :attr:`~brainjepa.synthetic.SimulatedCohort.states`, or a task's block design).
        tr: the scans' repetition time(s).
        state_tr: the frame interval of ``states`` (default ``tr``).
        subjects: the subject of each scan (default: one subject per scan); splits keep subjects
            apart.
        lag: the hemodynamic delay in seconds applied to the states.
        seeds: split seeds (a count or a list).
        readouts: the encoder readouts.
        random_init_seeds: a count or a list of random-init seeds.
        batch_size: windows per forward pass.
        device: where to encode.
        progress: progress bars and logs.
        features: a precomputed ``(features, scan, start)`` from :func:`window_features`.
        min_purity: probe only the windows whose majority state fills at least this fraction
            of them (e.g. 0.9 leaves out windows that straddle a change of state, whose label
            is ambiguous); 0 (default): every window.
        target: the target's name in the records.

    Returns:
        :class:`~brainjepa.evaluate.protocol.Results`: records for ``brainjepa:<readout>``, every
        ``random_init#<k>:<readout>``, their summaries, and :data:`STATE_BASELINES`, with paired
        comparisons (``comparisons``).

    Raises:
        ConfigError: ``min_purity`` outside [0, 1].
        DataError: ``states`` for another number of scans, a single state, or no window as pure
            as ``min_purity``.
    """
    if not 0.0 <= min_purity <= 1.0:
        raise ConfigError(f"min_purity must lie in [0, 1] (a fraction of the window), got {min_purity}")
    if len(states) != len(series):
        raise DataError(f"got states for {len(states)} scans and {len(series)} scans")
    readouts = check_readouts(readouts)
    seeds_init = init_seeds(random_init_seeds)
    if features is None:
        encoders = {MODEL: model, **{f"{RANDOM_INIT}#{k}": random_init_like(model, k) for k in seeds_init}}
        features = window_features(
            encoders, series, tr, readouts=readouts, batch_size=batch_size, device=device, progress=progress
        )
    feats, scan, start = features
    cfg = model.config
    seconds = model.target_tr if model.target_tr is not None else repetition_times(tr, 1)[0] or 1.0
    y, purity = state_labels(
        states, state_tr if state_tr is not None else tr, scan, start, cfg.n_timepoints * seconds, lag
    )
    subject = np.asarray(subjects if subjects is not None else np.arange(len(series)))[scan]
    if min_purity > 0:
        keep = purity >= min_purity
        if not keep.any():
            raise DataError(
                f"no window has {min_purity:.0%} of its frames in one state (largest: {purity.max():.0%}); "
                "lower min_purity (--state-min-purity) or use longer blocks / shorter windows"
            )
        log.info("%s: %d of %d windows have >= %.0f%% of their frames in one state", target, keep.sum(), len(keep),
                 100 * min_purity)  # fmt: skip
        feats, y, subject = {k: v[keep] for k, v in feats.items()}, y[keep], subject[keep]
    results = probe_windows(feats, y, subject, seeds=seeds, target=target, progress=progress)
    results.records += random_init_summaries(results.records, readouts, seeds_init)
    results.records.sort(key=lambda r: method_rank(r["method"]))
    results.comparisons = comparison_rows(results.records)
    return results
