"""A simulated resting-state cohort: the package works out of the box and tests have real signal.

Model, per subject (vectorised over subjects, Euler-Maruyama):

1. **Connectome** (shared): R ROIs in two mirrored hemispheres of an ellipsoid "brain"; each
   belongs to one of a few bilateral, spatially distributed functional networks (each network
   has an anterior and a posterior hub, like the default-mode network). Structural weights fall
   off with distance (exp(-d / 25 mm)), are boosted within networks and between homotopic ROIs,
   get log-normal jitter, and are normalised to mean row sum 1.
2. **Neural dynamics**: a Stuart-Landau (Hopf normal form) oscillator per ROI just below its
   bifurcation (a = -0.02), natural frequencies 0.04-0.07 Hz, diffusive coupling G * sum_j
   W_ij (z_j - z_i), white noise; integrated at dt <= 50 ms, the first 60 s discarded.
3. **Hemodynamics**: the Balloon-Windkessel model (Friston 2003 / Stephan 2007 constants) driven
   by the oscillators' real part, sampled every TR.
4. **Measurement**: ROI baselines of a few hundred scanner units, thermal noise, and a site's
   noise level and shared artefactual fluctuation (with a site-specific spatial topography).

Subject latents that become labels:

- ``age`` (continuous, 20-80): global coupling G falls with age (with individual scatter).
- ``patient`` (0/1): coupling inside one network (``patient_network``, "Default") is weakened.
- ``site`` (0..n_sites-1, nuisance): noise level and the topography of a shared artefact differ.

Brain states within a scan (optional, ``task_network``): the scan alternates between "rest" and
"task" blocks of random length (``block_seconds``, 20-60 s by default, starting at a random
phase). In task blocks the oscillators of one network receive an external input
(``task_drive``, added to the real part, which raises their activity and the BOLD level with
the hemodynamic delay) and their mutual coupling is strengthened (``task_coupling``, a gain on
the within-network part of the coupling, which raises their synchrony). The frame-by-frame
state is returned in ``states``; :func:`brainjepa.evaluate.states.window_states` turns it into a
label per window.

A linear model on the FC upper triangle recovers each above chance but below ceiling (see
tests/test_synthetic.py and the README), so the cohort can tell good representations from bad.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import open_cohort
from .errors import ConfigError, require
from .io import write_timeseries
from .transforms import single_threaded

log = logging.getLogger(__name__)

NETWORK_NAMES = ["Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont", "Default", "Sub"]
FORMATS = ("tsv", "csv", "npy", "npz", "mat", "h5", "nifti", "mixed")

# Balloon-Windkessel constants (Stephan et al. 2007, 3 T)
_KAPPA, _GAMMA, _TAU, _ALPHA, _E0, _V0 = 0.65, 0.41, 0.98, 0.32, 0.34, 0.02
_K1, _K2, _K3 = 7 * _E0, 2.0, 2 * _E0 - 0.2
_BATCH = 64  # subjects integrated together


@dataclass
class SimulatedCohort:
    """The simulator's output.

    Attributes:
        timeseries: N float32 arrays (R, T), one per subject.
        labels: ``"age"`` (N,) float, ``"patient"`` (N,) int 0/1, ``"site"`` (N,) int.
        networks: (R,) int, each ROI's network index into ``network_names``.
        network_names: the names of the networks.
        roi_labels: R ROI names (hemisphere, network, number).
        coords: (R, 3) ROI coordinates in mm.
        connectome: (R, R) structural weights.
        tr: the repetition time in seconds.
        subjects: N subject IDs (``sub-0001``, ...).
        latents: the hidden per-subject values behind the labels: ``"coupling"`` (N,) global
            coupling, ``"network_cut"`` (N,) fraction of in-network coupling removed.
        states: N int8 arrays (T,), the neural state at each frame (1: task block, 0: rest);
            empty for a resting cohort (no ``task_network``).
        task_network: the network driven in task blocks, or None.
    """

    timeseries: list[np.ndarray]
    labels: dict[str, np.ndarray]
    networks: np.ndarray
    network_names: list[str]
    roi_labels: list[str]
    coords: np.ndarray
    connectome: np.ndarray
    tr: float
    subjects: list[str]
    latents: dict[str, np.ndarray] = field(default_factory=dict)
    states: list[np.ndarray] = field(default_factory=list)
    task_network: str | None = None

    def to_cohort(self):
        """The scans as an in-memory cohort.

        Returns:
            A :class:`brainjepa.data.Cohort` with the labels, subject IDs and ROI labels attached.
        """
        cohort = open_cohort(self.timeseries, tr=self.tr, labels=self.labels)
        cohort.subjects = list(self.subjects)
        cohort.roi_labels = list(self.roi_labels)
        return cohort


def make_connectome(n_rois: int, n_networks: int, rng: np.random.Generator):
    """A modular, distance-dependent structural connectome.

    ROIs lie near the surface of an ellipsoid (70 x 100 x 60 mm half-axes); the right hemisphere
    mirrors the left (homotopic pairs i, i + R // 2; an odd R adds one midline ROI). Networks are
    balanced in size, bilateral, and each gathers the ROIs nearest to its two hubs (one
    anterior, one posterior).

    Args:
        n_rois: the number of ROIs R, at least 2 per network.
        n_networks: the number of networks.
        rng: the random generator (advanced by the call).

    Returns:
        ``(coords, networks, weights)``: (R, 3) mm, (R,) int network indices, and (R, R)
        symmetric weights with a zero diagonal and mean row sum 1.

    Raises:
        ConfigError: fewer than 2 ROIs per network.
    """
    if n_rois < 2 * n_networks:
        raise ConfigError(f"need at least 2 ROIs per network: {n_rois} ROIs for {n_networks} networks")
    radii = np.array([70.0, 100.0, 60.0])
    n_left = n_rois // 2

    def surface(n):
        u = rng.normal(size=(n, 3))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        u[:, 0] = -np.abs(u[:, 0])  # left hemisphere: x < 0
        return u * radii * rng.uniform(0.75, 1.0, size=(n, 1))

    left = surface(n_left)
    hubs = surface(2 * n_networks).reshape(n_networks, 2, 3)
    hubs[:, 0, 1], hubs[:, 1, 1] = np.abs(hubs[:, 0, 1]), -np.abs(hubs[:, 1, 1])
    dist = np.linalg.norm(left[:, None, None] - hubs[None], axis=3).min(axis=2)  # (n_left, K)
    # greedy balanced assignment: closest (ROI, network) pairs first, every network filled to
    # floor(n / K) members, then the remainder to the nearest networks not yet one larger
    net_left = np.full(n_left, -1)
    size = np.zeros(n_networks, dtype=int)
    for cap in (n_left // n_networks, -(-n_left // n_networks)):
        for flat in np.argsort(dist, axis=None):
            r, k = divmod(int(flat), n_networks)
            if net_left[r] < 0 and size[k] < cap:
                net_left[r], size[k] = k, size[k] + 1
    right = left * np.array([-1.0, 1.0, 1.0]) + rng.normal(0, 3, size=left.shape)
    coords, networks = [left, right], [net_left, net_left]
    if n_rois % 2:  # one midline ROI
        mid = surface(1) * np.array([0.0, 1.0, 1.0])
        coords.append(mid)
        networks.append(np.array([np.argmin(np.linalg.norm(mid[:, None, None] - hubs[None], axis=3).min(axis=2))]))
    coords, networks = np.concatenate(coords), np.concatenate(networks).astype(np.int64)
    d = np.linalg.norm(coords[:, None] - coords[None], axis=2)
    w = np.exp(-d / 25.0) + 0.6 * (networks[:, None] == networks[None, :])
    idx = np.arange(n_left)
    w[idx, idx + n_left] += 0.5  # homotopic connections
    w[idx + n_left, idx] += 0.5
    w *= rng.lognormal(0.0, 0.3, size=w.shape)
    w = (w + w.T) / 2
    np.fill_diagonal(w, 0.0)
    w /= w.sum(axis=1).mean()
    return coords, networks, w


def simulate_cohort(
    n_subjects: int = 60,
    n_rois: int = 100,
    tr: float = 0.72,
    minutes: float = 6.0,
    seed: int = 0,
    *,
    n_networks: int = 7,
    n_sites: int = 3,
    patient_fraction: float = 0.5,
    patient_network: str = "Default",
    patient_effect: float = 0.75,
    coupling: tuple[float, float] = (0.25, 0.55),
    noise: float = 0.5,
    max_dt: float = 0.05,
    burn_in: float = 60.0,
    task_network: str | None = None,
    task_drive: float = 0.0,
    task_coupling: float = 0.0,
    block_seconds: tuple[float, float] = (20.0, 60.0),
) -> SimulatedCohort:
    """Simulate a resting-state BOLD cohort (see the module docstring for the model).

    Args:
        n_subjects: the number of subjects (one scan each).
        n_rois: the number of ROIs R.
        tr: the repetition time in seconds.
        minutes: the scan length; T = round(minutes * 60 / tr) time points.
        seed: the random seed; the same arguments give the same cohort.
        n_networks: the number of functional networks (at most 8, the length of
            :data:`NETWORK_NAMES`).
        n_sites: the number of acquisition sites.
        patient_fraction: the probability that a subject is a patient.
        patient_network: the network whose internal coupling is weakened in patients.
        patient_effect: the fraction by which coupling inside ``patient_network`` is cut in
            patients (jittered by +-30 % per patient).
        coupling: global coupling G of the youngest and oldest subjects (G falls with age).
        noise: thermal noise std relative to the BOLD signal's std.
        max_dt: the largest integration step in seconds (the TR is split into equal steps).
        burn_in: seconds simulated and discarded before the first sample.
        task_network: the network driven in task blocks (None: a resting cohort, no states).
        task_drive: the external input to ``task_network``'s oscillators in task blocks.
        task_coupling: the relative gain of the coupling inside ``task_network`` in task blocks.
        block_seconds: the shortest and longest block in seconds (rest and task alternate).

    Returns:
        The cohort: N float32 (R, T) scans of raw-BOLD-like values (baselines of a few hundred
        units, ~1 % signal change), labels, networks, latents and, with ``task_network``, the
        frame-by-frame states.

    Raises:
        ConfigError: invalid sizes, or a ``patient_network`` or ``task_network`` not among the
            networks, or invalid block lengths.
    """
    if n_subjects < 1 or n_rois < 2 or tr <= 0 or minutes <= 0:
        raise ConfigError("simulate_cohort needs n_subjects >= 1, n_rois >= 2, tr > 0, minutes > 0")
    n_networks = min(n_networks, len(NETWORK_NAMES))
    names = NETWORK_NAMES[:n_networks]
    if patient_network not in names:
        raise ConfigError(f"patient_network {patient_network!r} is not one of {names}")
    if task_network is not None and task_network not in names:
        raise ConfigError(f"task_network {task_network!r} is not one of {names}")
    if not 0 < block_seconds[0] <= block_seconds[1]:
        raise ConfigError(
            f"block_seconds must be (shortest, longest) with 0 < shortest <= longest, got {block_seconds}"
        )
    rng = np.random.default_rng(seed)
    coords, networks, w = make_connectome(n_rois, n_networks, rng)
    S, R = n_subjects, n_rois
    n_tr = int(round(minutes * 60 / tr))

    age = rng.uniform(20, 80, size=S)
    patient = (rng.random(S) < patient_fraction).astype(np.int64)
    site = rng.integers(0, n_sites, size=S)
    g = coupling[0] + (coupling[1] - coupling[0]) * (80 - age) / 60  # younger: stronger coupling
    g = g * rng.lognormal(0.0, 0.12, size=S)
    cut = patient * patient_effect * rng.uniform(0.7, 1.3, size=S)

    in_net = networks == names.index(patient_network)
    w_net = w * np.outer(in_net, in_net)  # the part of W that patients lose a fraction of
    omega = 2 * np.pi * rng.uniform(0.04, 0.07, size=R)  # natural frequencies, jittered per subject
    n_burn = int(np.ceil(burn_in / tr))
    # the block design has its own random stream, so a resting cohort is the same with or without it
    on = np.zeros((S, n_burn + n_tr), dtype=np.int8)
    if task_network is not None:
        brng = np.random.default_rng([seed, 2718])
        for i in range(S):
            on[i] = block_design(n_burn + n_tr, tr, block_seconds, brng)
    task = networks == names.index(task_network) if task_network is not None else np.zeros(R, dtype=bool)
    w_task = w * np.outer(task, task)
    phase = 2 * np.pi * np.arange(n_sites) / n_sites
    # sites differ in noise level and in a shared artefactual fluctuation whose topography
    # (e.g. coil sensitivity along the anterior-posterior axis) depends on the scanner
    site_noise = 1.0 + 0.5 * np.arange(n_sites) / max(n_sites - 1, 1)
    topography = 1 + 0.8 * np.cos(np.pi * coords[None, :, 1] / 100 + phase[:, None])  # (sites, R)
    data = []
    for b0 in range(0, S, _BATCH):  # batches bound memory; each has its own random stream
        sl = slice(b0, min(b0 + _BATCH, S))
        brng = np.random.default_rng([seed, b0])
        with single_threaded():
            bold = _hopf_bold(
                g[sl],
                cut[sl],
                omega,
                w,
                w_net,
                tr,
                n_tr,
                max_dt,
                burn_in,
                brng,
                task=(on[sl], task, w_task, task_drive, task_coupling) if task_network is not None else None,
            )
        bold /= bold.std(axis=2, keepdims=True).mean(axis=1, keepdims=True)  # unit BOLD scale
        n, k = bold.shape[0], site[sl]
        shared = _smooth_noise(brng, (n, 1, n_tr), width=max(1, int(round(8 / tr))))
        bold += 0.18 * topography[k][:, :, None] * shared
        bold += noise * site_noise[k][:, None, None] * brng.standard_normal((n, R, n_tr))
        baseline = brng.uniform(300, 900, size=(n, R, 1))
        data.extend((baseline * (1.0 + 0.01 * bold)).astype(np.float32))  # ~1% signal change

    subjects = [f"sub-{i + 1:04d}" for i in range(S)]
    counters: dict[int, int] = {}
    roi_labels = []
    for r in range(R):
        k = int(networks[r])
        counters[k] = counters.get(k, 0) + 1
        roi_labels.append(f"{'LH' if coords[r, 0] < 0 else 'RH'}_{names[k]}_{counters[k]}")
    return SimulatedCohort(
        timeseries=[np.ascontiguousarray(d) for d in data],
        labels={"age": np.round(age, 1), "patient": patient, "site": site.astype(np.int64)},
        networks=networks,
        network_names=names,
        roi_labels=roi_labels,
        coords=coords,
        connectome=w,
        tr=float(tr),
        subjects=subjects,
        latents={"coupling": g, "network_cut": cut},
        states=[on[i, n_burn:].copy() for i in range(S)] if task_network is not None else [],
        task_network=task_network,
    )


def block_design(n_frames: int, tr: float, block_seconds: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Alternating rest (0) and task (1) blocks of random length, one value per frame.

    Args:
        n_frames: the number of frames.
        tr: the frame interval in seconds.
        block_seconds: the shortest and longest block in seconds (uniform in between).
        rng: the random generator (advanced by the call).

    Returns:
        (n_frames,) int8; the first block starts at a random phase and is rest or task at random.
    """
    out = np.zeros(n_frames, dtype=np.int8)
    state = int(rng.integers(0, 2))
    t = -rng.uniform(0, block_seconds[1])  # a random phase: the scan starts inside a block
    while t < n_frames * tr:
        end = t + rng.uniform(*block_seconds)
        first, last = max(0, int(np.ceil(t / tr))), min(n_frames, int(np.ceil(end / tr)))
        out[first:last] = state
        state, t = 1 - state, end
    return out


def _hopf_bold(g, cut, omega, w, w_net, tr, n_tr, max_dt, burn_in, rng, task=None) -> np.ndarray:
    """BOLD (B, R, n_tr) of B subjects: Stuart-Landau network -> Balloon-Windkessel, every TR.

    g: (B,) global coupling; cut: (B,) fraction of ``w_net`` removed; omega: (R,) rad/s;
    task: None, or (on (B, n_burn + n_tr) 0/1 per frame, the task network's (R,) mask, its
    within-network weights, the drive, the coupling gain).
    """
    B, R = len(g), len(omega)
    deg, deg_net = w.sum(axis=1), w_net.sum(axis=1)  # W is symmetric: z @ W == (W z^T)^T
    steps_per_tr = int(np.ceil(tr / max_dt))
    dt = tr / steps_per_tr
    a, sigma = -0.02, 0.04  # just below the Hopf bifurcation: noise-driven oscillations
    freq = omega[None, :] * rng.lognormal(0.0, 0.03, size=(B, R))
    rot = np.stack([-freq, freq])  # d/dt (x, y) gets (-omega y, omega x)
    gs, gcut = g[:, None], (g * cut)[:, None]
    z = rng.normal(0, 0.05, size=(2, B, R))  # z = x + i y, stacked so each step is one matmul
    # Balloon-Windkessel states: vasodilatory signal s, inflow f, volume v, deoxyhemoglobin q
    s = np.zeros((B, R))
    f, v, q = np.ones((B, R)), np.ones((B, R)), np.ones((B, R))
    log_e = np.log(1 - _E0)
    n_burn = int(np.ceil(burn_in / tr))
    bold = np.empty((n_tr, B, R))
    w_t, w_net_t = torch.from_numpy(w), torch.from_numpy(w_net)
    if task is not None:
        on, mask, w_task, drive, gain = task
        w_task_t, deg_task = torch.from_numpy(w_task), w_task.sum(axis=1)

    def times(z, m):  # (2, B, R) @ (R, R) through torch, whose threads single_threaded() limits
        return (torch.from_numpy(z.reshape(2 * B, R)) @ m).numpy().reshape(2, B, R)

    for t in range(n_burn + n_tr):
        kicks = rng.standard_normal((steps_per_tr, 2, B, R)) * (sigma * np.sqrt(dt))
        for k in range(steps_per_tr):
            coupled = gs * (times(z, w_t) - deg * z) - gcut * (times(z, w_net_t) - deg_net * z)
            if task is not None and on[:, t].any():
                now = on[:, t][:, None].astype(float)  # (B, 1): subjects in a task block
                coupled = coupled + gain * now * gs * (times(z, w_task_t) - deg_task * z)
                coupled[0] += drive * now * mask
            z = z + dt * ((a - (z * z).sum(axis=0)) * z + rot * z[::-1] + coupled) + kicks[k]
            u = z[0]  # neural drive of the hemodynamics (std ~0.05: flow changes of ~10-20 %)
            fv = np.exp(np.log(v) / _ALPHA)
            e = 1 - np.exp(log_e / f)
            s, f, v, q = (
                s + dt * (u - _KAPPA * s - _GAMMA * (f - 1)),
                f + dt * s,
                v + dt * (f - fv) / _TAU,
                q + dt * (f * e / _E0 - fv * q / v) / _TAU,
            )
        if t >= n_burn:
            bold[t - n_burn] = _V0 * (_K1 * (1 - q) + _K2 * (1 - q / v) + _K3 * (1 - v))
    return bold.transpose(1, 2, 0)


def _smooth_noise(rng: np.random.Generator, shape: tuple, width: int) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed along the last axis by a boxcar of ``width``."""
    z = rng.standard_normal(shape[:-1] + (shape[-1] + width - 1,))
    c = np.cumsum(z, axis=-1)
    c = np.concatenate([np.zeros(shape[:-1] + (1,)), c], axis=-1)
    out = (c[..., width:] - c[..., :-width]) / np.sqrt(width)
    return out


def _available(fmt: str) -> bool:
    """Whether the optional packages that writing ``fmt`` needs are installed."""
    needs = {"h5": ["h5py"], "nifti": ["nibabel", "nilearn"]}.get(fmt, [])
    return all(importlib.util.find_spec(m) is not None for m in needs)


def write_cohort(cohort: SimulatedCohort, out_dir, fmt: str = "tsv") -> Path:
    """Write every scan in a real file format plus ``manifest.csv`` and ``rois.tsv``.

    The manifest has path (relative), subject, tr (only where the file cannot carry it), atlas
    (NIfTI rows) and the label columns; rois.tsv has each ROI's index, name, network and
    coordinates. A cohort with brain states also gets one BIDS events file per scan
    (``<subject>_task-blocks_events.tsv``: onset, duration, trial_type "task" for every task
    block) and an ``events`` column naming it.

    Args:
        cohort: the simulated cohort (:func:`simulate_cohort`).
        out_dir: the folder to write (created if needed).
        fmt: ``"tsv"`` (XCP-D ``*_seg-..._timeseries.tsv`` + JSON sidecar), ``"csv"`` (UK
            Biobank layout, gzipped; TR in the manifest), ``"npy"`` (+ sidecar), ``"npz"``,
            ``"mat"``, ``"h5"``, ``"nifti"`` (4-D image + a shared label atlas), or ``"mixed"``
            (cycles through all of them, XCP-D files alternating the ``seg-`` and older
            ``atlas-`` entity; h5/nifti only when h5py/nilearn are installed).

    Returns:
        The path of manifest.csv.

    Raises:
        ConfigError: an unknown format, or one whose optional package is not installed.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "mixed":
        cycle = ["tsv", "tsv-atlas", "csv", "npy", "npz", "mat", "h5", "nifti"]
        missing = [c for c in ("h5", "nifti") if not _available(c)]
        if missing:
            log.info("mixed format without %s (optional packages not installed)", ", ".join(missing))
        cycle = [c for c in cycle if c not in missing]
    else:
        if not _available(fmt):
            raise ConfigError(f"format {fmt!r} needs an optional package: pip install 'brainjepa[all]'")
        cycle = [fmt]
    n_rois = len(cohort.roi_labels)
    atlas = None
    rows = []
    for i, (subject, x) in enumerate(zip(cohort.subjects, cohort.timeseries)):
        kind = cycle[i % len(cycle)]
        tr_col = ""
        extra = ""
        if kind in ("tsv", "tsv-atlas"):
            entity = "seg" if kind == "tsv" else "atlas"
            name = f"{subject}_task-rest_space-MNI152NLin2009cAsym_{entity}-Sim{n_rois}_stat-mean_timeseries.tsv"
            write_timeseries(out / name, x, roi_labels=cohort.roi_labels, tr=cohort.tr)
        elif kind == "csv":  # UK Biobank-style: no TR in the file, so the manifest carries it
            name = f"{subject}_bold_parcellated.csv.gz"
            write_timeseries(out / name, x, roi_labels=cohort.roi_labels, sidecar=False, tr=cohort.tr)
            tr_col = f"{cohort.tr:g}"
        elif kind == "nifti":
            if atlas is None:
                atlas = _write_atlas(out, cohort)
            name = f"{subject}_task-rest_bold.nii.gz"
            _write_nifti(out / name, x, cohort.tr, atlas[1])
            extra = atlas[0].name
        else:
            name = f"{subject}_bold.{kind}"
            write_timeseries(out / name, x, roi_labels=cohort.roi_labels, tr=cohort.tr)
        events = (
            [write_events(out / f"{subject}_task-blocks_events.tsv", cohort.states[i], cohort.tr)]
            if cohort.states
            else []
        )
        rows.append([name, subject, tr_col, extra] + [_fmt(cohort.labels[k][i]) for k in cohort.labels] + events)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "subject", "tr", "atlas"] + list(cohort.labels) + (["events"] if cohort.states else []))
        w.writerows(rows)
    with open(out / "rois.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "name", "network", "x", "y", "z"])
        for r, name in enumerate(cohort.roi_labels):
            w.writerow([r, name, cohort.network_names[cohort.networks[r]]] + [f"{c:.1f}" for c in cohort.coords[r]])
    return manifest


def write_events(path: Path, states: np.ndarray, tr: float) -> str:
    """A BIDS events file of a state time course: one row per task block.

    Args:
        path: the ``*_events.tsv`` file to write.
        states: (T,) 0/1 states per frame.
        tr: the frame interval in seconds.

    Returns:
        The file's name.
    """
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(states, dtype=np.int8), [0]])))
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["onset", "duration", "trial_type"])
        for start, stop in zip(edges[::2], edges[1::2]):
            w.writerow([f"{start * tr:.3f}", f"{(stop - start) * tr:.3f}", "task"])
    return path.name


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)


def _atlas_grid(n_rois: int) -> tuple[int, int, int]:
    """A small volume holding n_rois 2x2x2-voxel parcels."""
    side = int(np.ceil(n_rois ** (1 / 3)))
    return (2 * side, 2 * side, 2 * side)


def _write_atlas(out: Path, cohort: SimulatedCohort):
    """Label image (1..R, each a 2x2x2 block) + BIDS look-up table -> (path, label volume)."""
    nib = require("nibabel", "nifti", "writing the simulated cohort as NIfTI")
    n_rois = len(cohort.roi_labels)
    shape = _atlas_grid(n_rois)
    side = shape[0] // 2
    labels = np.zeros(shape, dtype=np.int16)
    for r in range(n_rois):
        i, j, k = np.unravel_index(r, (side, side, side))
        labels[2 * i : 2 * i + 2, 2 * j : 2 * j + 2, 2 * k : 2 * k + 2] = r + 1
    path = out / "atlas-Sim_dseg.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.diag([3.0, 3.0, 3.0, 1.0])), path)
    with open(out / "atlas-Sim_dseg.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "name"])
        w.writerows([[r + 1, name] for r, name in enumerate(cohort.roi_labels)])
    return path, labels


def _write_nifti(path: Path, x: np.ndarray, tr: float, labels: np.ndarray) -> None:
    """A 4-D image whose voxels average exactly to ``x`` (R, T) within each atlas parcel."""
    nib = require("nibabel", "nifti", "writing the simulated cohort as NIfTI")
    vol = np.zeros(labels.shape + (x.shape[1],), dtype=np.float32)
    # voxel texture that sums to zero inside each 2x2x2 parcel, so parcel means are exact
    checker = (np.indices(labels.shape).sum(axis=0) % 2) * 2 - 1
    inside = labels > 0
    vol[inside] = x[labels[inside] - 1] + 0.5 * checker[inside][:, None] * x.std(axis=1).mean()
    img = nib.Nifti1Image(vol, np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    zooms = img.header.get_zooms()
    img.header.set_zooms(zooms[:3] + (tr,))
    nib.save(img, path)
