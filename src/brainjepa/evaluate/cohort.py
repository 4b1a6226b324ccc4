"""Evaluation of a cohort: loading it, its baseline features and embeddings, and linear probing
of a model next to every reference (random initialisation, FC, amplitude).

The baselines always use the closed-form probe: ``fc_full`` (the Fisher-z FC upper triangle of
the full raw scan, FC at its strongest), ``fc_window`` (the FC of exactly the windows the encoder
sees, Fisher-z averaged over them) and ``amplitude`` (per-ROI log temporal std of the full
resampled scan). Because the encoder is frozen and evaluation windows are deterministic, the
embeddings are computed once and cached: training a head on cached embeddings gives exactly the
gradients it would get from running the encoder every step, at a fraction of the cost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data import CohortSeries, open_cohort, subject_from_path
from ..errors import ConfigError, DataError
from ..io import read_timeseries
from ..transforms import resample_tr, same_tr
from .baselines import amplitude_features, fc_features
from .comparisons import (
    BASELINES,
    MODEL,
    RANDOM_INIT,
    comparison_rows,
    init_seeds,
    method_name,
    method_rank,
    probe_method_names,
    random_init_summaries,
)
from .features import (
    READOUTS,
    BrainJEPAEmbedder,
    check_readouts,
    check_windows,
    encode_readouts,
    progress_bar,
    random_init_like,
)
from .labels import cohort_targets
from .probes import PROBES, make_probe
from .protocol import Results, run_targets

log = logging.getLogger(__name__)

FC_INPUTS = ("full", "window")  # the FC baseline from the full raw series, or the model's window


def load_cohort(data: str | Path | Sequence[str | Path], *, tr: float | None = None, orientation: str | None = None):
    """A cohort from one path or from several time-series files.

    Args:
        data: one path (manifest, folder, prepared store; see
            :func:`brainjepa.data.open_cohort`) or several time-series files (one per subject,
            subject ids from the file names; no labels).
        tr: the repetition time in seconds, where the data do not give it.
        orientation: how the files lay out ROIs and time (see :func:`brainjepa.io.read_timeseries`).

    Returns:
        The cohort.
    """
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    if len(paths) == 1:
        return open_cohort(paths[0], tr=tr, orientation=orientation)
    cohort = open_cohort([read_timeseries(p, orientation=orientation, tr=tr) for p in paths], tr=tr)
    cohort.subjects = [subject_from_path(p)[0] for p in paths]
    return cohort


def cohort_fc(cohort, model=None, fc_input: str = "full", progress: bool = True) -> np.ndarray:
    """FC baseline features of every subject.

    Args:
        cohort: the cohort.
        model: the model whose input ``'window'`` means.
        fc_input: ``'full'`` (default: the full raw series, the baseline at its strongest) or
            ``'window'`` (exactly the window the model sees in fine-tuning: resampled, centre).
        progress: show a progress bar.

    Returns:
        (N, R(R-1)/2) float32 (:func:`~brainjepa.evaluate.baselines.fc_features`).

    Raises:
        ConfigError: another ``fc_input``.
    """
    series = CohortSeries(cohort)
    if fc_input == "full":
        items = (series[i] for i in range(len(series)))
    elif fc_input == "window":
        trs = series.trs()
        items = (model.prepare(series[i], tr=trs[i]).numpy() for i in range(len(series)))
    else:
        raise ConfigError(f"fc_input must be one of {', '.join(FC_INPUTS)}, got {fc_input!r}")
    return fc_features(list(progress_bar(items, len(series), "FC baseline", progress)))


def cohort_amplitude(cohort, model=None, progress: bool = True) -> np.ndarray:
    """Amplitude baseline of every subject over the full scan.

    Args:
        cohort: the cohort.
        model: when it has a TR, scans are resampled to it first (as the encoder's input is).
        progress: show a progress bar.

    Returns:
        (N, R) float32 (:func:`~brainjepa.evaluate.baselines.amplitude_features`).
    """
    series = CohortSeries(cohort)
    trs = series.trs()
    target = None if model is None else model.target_tr

    def item(i):
        x = series[i]
        if target is not None and trs[i] is not None and not same_tr(trs[i], target):
            x = resample_tr(np.asarray(x, dtype=np.float32), trs[i], target)
        return x

    items = (item(i) for i in range(len(series)))
    return amplitude_features(list(progress_bar(items, len(series), "amplitude baseline", progress)))


def embed_cohort(
    model,
    cohort,
    *,
    readout: str = "mean",
    windows: str = "all",
    batch_size: int = 16,
    device: str | None = None,
    tokens: bool = False,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings of every subject of a cohort (:class:`~brainjepa.evaluate.features.BrainJEPAEmbedder`).

    Args:
        model: the model (a :class:`~brainjepa.bundle.BrainJEPA`).
        cohort: the cohort.
        readout: one of :data:`~brainjepa.evaluate.features.READOUTS`.
        windows: 'all' or 'center' (ignored with ``tokens``: always the centre window).
        batch_size: windows per forward pass.
        device: where to encode.
        tokens: return the centre window's token features instead of a readout.
        progress: show a progress bar.

    Returns:
        (N, F) under ``readout`` averaged over ``windows``, or with ``tokens`` the centre
        window's token features (N, R, P, D).
    """
    series = CohortSeries(cohort)
    return BrainJEPAEmbedder(
        model,
        readout=readout,
        windows=None if tokens else windows,
        batch_size=batch_size,
        device=device,
        tokens=tokens,
        progress=progress,
    ).transform(series, tr=series.trs())


def probe_features(
    model,
    cohort,
    *,
    readouts: Sequence[str] = READOUTS,
    random_init_seeds=3,
    windows: str = "all",
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
    skip: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Every feature matrix :func:`probe_cohort` probes.

    The pretrained model and each random-init seed under every readout come from one encoding
    pass over the cohort for all encoders, ``fc_window`` from the same windows; then
    ``fc_full`` and ``amplitude``.

    Args:
        model: the pretrained model.
        cohort: the cohort.
        readouts: the encoder readouts.
        random_init_seeds: a count or a list of random-init seeds.
        windows: 'all' or 'center'.
        batch_size: windows per forward pass.
        device: where to encode.
        progress: show progress bars.
        skip: method names to leave out.

    Returns:
        {method name (see :func:`~brainjepa.evaluate.comparisons.probe_method_names`): (N, F)}.
    """
    readouts, windows = check_readouts(readouts), check_windows(windows)
    seeds = init_seeds(random_init_seeds)
    wanted = [n for n in probe_method_names(readouts, seeds) if n not in set(skip)]
    encoders = {}
    if any(n.startswith(MODEL + ":") for n in wanted):
        encoders[MODEL] = model
    for k in seeds:
        if any(n.startswith(f"{RANDOM_INIT}#{k}:") for n in wanted):
            encoders[f"{RANDOM_INIT}#{k}"] = random_init_like(model, k)
    features: dict[str, np.ndarray] = {}
    if encoders or "fc_window" in wanted:
        if not encoders:  # fc_window alone: the windows still come from the model
            encoders = {MODEL: model}
        log.info("encoding %d subjects (%s windows) with %s", len(cohort), windows, ", ".join(encoders))
        series = CohortSeries(cohort)
        out = encode_readouts(
            encoders,
            series,
            series.trs(),
            readouts=readouts,
            windows=windows,
            batch_size=batch_size,
            device=device,
            fc_window="fc_window" in wanted,
            progress=progress,
        )
        for name, per in out.items():
            for readout, X in per.items():
                key = "fc_window" if name == "fc_window" else method_name(name, readout)
                if key in wanted:
                    features[key] = X
    if "fc_full" in wanted:
        log.info("computing the FC baseline of the full scans")
        features["fc_full"] = cohort_fc(cohort, model, "full", progress)
    if "amplitude" in wanted:
        features["amplitude"] = cohort_amplitude(cohort, model, progress)
    return features


def save_embeddings(
    model,
    cohort,
    path: str | Path,
    *,
    readout: str = "mean",
    windows: str = "all",
    tokens: bool = False,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """Write a cohort's embeddings as an .npz.

    Arrays: 'subjects' (N,), 'embeddings' (N, F) (``readout`` averaged over ``windows``),
    'readout' and 'windows' (which ones), 'roi_labels' (R,) when known, 'label_<name>' (N,) per
    label column, and with ``tokens`` 'tokens' (N, R, P, D) of the centre window. Text is stored
    as unicode arrays, so ``np.load`` needs no pickle.

    Args:
        model: the model (a :class:`~brainjepa.bundle.BrainJEPA`).
        cohort: the cohort.
        path: the .npz file to write (its folder is created; the name is kept as given).
        readout: one of :data:`~brainjepa.evaluate.features.READOUTS`.
        windows: 'all' or 'center'.
        tokens: also store the centre window's token features.
        batch_size: windows per forward pass.
        device: where to encode.
        progress: show progress bars.

    Returns:
        The path written.
    """
    arrays = {
        "subjects": np.array(cohort.subjects, dtype=str),
        "embeddings": embed_cohort(
            model, cohort, readout=readout, windows=windows, batch_size=batch_size, device=device, progress=progress
        ),
        "readout": np.array(readout),
        "windows": np.array(windows),
    }
    if tokens:
        arrays["tokens"] = embed_cohort(
            model, cohort, batch_size=batch_size, device=device, tokens=True, progress=progress
        )
    if model.roi_labels is not None:
        arrays["roi_labels"] = np.array(model.roi_labels, dtype=str)
    for name, values in cohort.labels.items():
        values = np.asarray(values)
        arrays[f"label_{name}"] = values.astype(str) if values.dtype == object else values
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # a file object: numpy must not append ".npz" to the name
        np.savez(f, **arrays)
    return path


def probe_cohort(
    model,
    cohort,
    targets: Sequence[str],
    *,
    task: str = "auto",
    seeds=5,
    probe: str = "closed-form",
    split_column: str | None = None,
    readouts: Sequence[str] = READOUTS,
    random_init_seeds=3,
    windows: str = "all",
    class_weight: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
    features: dict[str, np.ndarray] | None = None,
    probe_options: dict | None = None,
) -> Results:
    """Linear probing of ``model`` on a cohort's label columns, next to every reference.

    Methods: brainjepa:<readout> and random_init#<k>:<readout> for each readout and init seed
    k, fc_full, fc_window and amplitude, all on the same splits; then random_init(mean) /
    random_init(best) per readout from their records. The baselines always use the
    closed-form probe.

    Args:
        model: the pretrained model.
        cohort: the cohort.
        targets: label columns.
        task: 'classification', 'regression' or 'auto' (per column).
        seeds: a count or the split seeds.
        probe: one of :data:`~brainjepa.evaluate.probes.PROBES`, for the encoders.
        split_column: a label column (or 'split') that fixes the split.
        readouts: the encoder readouts.
        random_init_seeds: a count (seeds 0..n-1) or a list of random-init seeds.
        windows: 'all' or 'center'.
        class_weight: None or 'balanced'.
        batch_size: windows per forward pass.
        device: where to encode.
        progress: show progress and log results.
        features: precomputed (N, F) matrices keyed by method name (from
            :func:`probe_features`), whose computation is then skipped.
        probe_options: options of the encoder probes (e.g. {"epochs": 50} for bn-linear).

    Returns:
        :class:`~brainjepa.evaluate.protocol.Results` with the records of every method and
        ``comparisons`` (:func:`~brainjepa.evaluate.comparisons.comparison_rows`).

    Raises:
        ConfigError: an unknown probe, readout or windows, or features of unknown methods.
        DataError: a missing target or split column, or features with the wrong row count.
    """
    if probe not in PROBES:
        raise ConfigError(f"unknown probe {probe!r}; choose one of {PROBES}")
    readouts, windows = check_readouts(readouts), check_windows(windows)
    seeds_init = init_seeds(random_init_seeds)
    if len(seeds_init) < 3:
        log.warning(
            "%d random-init seed(s): initialisations can differ from each other by more "
            "than pretraining gains, so random_init(mean) and (best) need at least 3",
            len(seeds_init),
        )
    names = probe_method_names(readouts, seeds_init)
    features = dict(features or {})
    unknown = sorted(set(features) - set(names))
    if unknown:
        raise ConfigError(
            f"features has entries {unknown} that are not methods of this probe; expected names among {names}"
        )
    labelled = cohort_targets(cohort, targets, task, split_column)  # fail before the slow part
    if any(n not in features for n in names):
        features.update(
            probe_features(
                model,
                cohort,
                readouts=readouts,
                random_init_seeds=seeds_init,
                windows=windows,
                batch_size=batch_size,
                device=device,
                progress=progress,
                skip=list(features),
            )
        )
    for name in names:
        if len(features[name]) != len(cohort):
            raise DataError(f"features[{name!r}] has {len(features[name])} rows for a cohort of {len(cohort)} subjects")

    def methods(t):
        log.info(
            "probing %s (%s, %d subjects%s) with the %s probe",
            t.name,
            t.task,
            len(t.keep),
            f", classes {t.classes}" if t.classes else "",
            probe,
        )
        return {
            name: (
                lambda seed, baseline=(name in BASELINES): (
                    make_probe("closed-form", t.task, seed, class_weight)
                    if baseline
                    else make_probe(probe, t.task, seed, class_weight, **(probe_options or {}))
                ),
                np.asarray(features[name])[t.keep],
            )
            for name in names
        }

    results = run_targets(labelled, methods, seeds=seeds, progress=progress)
    results.records += random_init_summaries(results.records, readouts, seeds_init)
    results.records.sort(key=lambda r: method_rank(r["method"]))  # stable: targets keep order
    results.comparisons = comparison_rows(results.records)
    return results
