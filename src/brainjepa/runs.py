"""What a pretraining run keeps on disk: its configuration and its run folder.

Configuration. A config is plain data, five sections of scalars (``model``, ``data``, ``mask``,
``optim``, ``train``). :func:`load_config` reads a built-in name (tiny, small, base, large; the
YAML files in ``brainjepa/configs/``) or a YAML path, applies ``section.key=value`` overrides and
returns the *resolved* config: every key present, every value checked against :data:`SCHEMA`. A
key that does not exist or a value of the wrong type raises :class:`ConfigError` naming the key.

Numbers written like ``1e-3`` are strings to YAML 1.1 (PyYAML); a string that parses as a number
is therefore accepted for a numeric key.

Run folder (written by :func:`brainjepa.pretrain.pretrain` on rank 0)::

    RUN_DIR/config.yaml          the resolved config
            metrics.jsonl        one JSON object per logged step
            gradients.csv        normalization.json
            checkpoints/step_00000120.pt   (the last ``train.keep_last``; latest = highest step)
            loss.png             bundle/    tensorboard/ (when TensorBoard is installed)

Files are replaced atomically (temp file + rename), so an interrupted run never leaves a
half-written checkpoint or config behind.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import yaml

from .errors import BrainJEPAError, ConfigError
from .io import ORIENTATIONS
from .masking import STRATEGIES
from .model import MODEL_SIZES, POS_EMBEDS
from .objective import LOSSES
from .transforms import NORMALIZATIONS

CONFIG_DIR = Path(__file__).parent / "configs"
BUILTIN_CONFIGS = (*MODEL_SIZES, "authors")  # the sizes with the default recipe; the authors' ViT-B recipe

PRECISIONS = ("auto", "fp32", "bf16")

log = logging.getLogger(__name__)

# section -> key -> (default, kind, bounds): kind is int, float, bool, str or pair (two numbers);
# bounds are the allowed strings for str, (low, high) (None = open) for numbers. A key whose
# default is None may be null.
SCHEMA: dict[str, dict[str, tuple]] = {
    "model": {
        "size": ("tiny", "str", tuple(MODEL_SIZES)),
        "n_rois": (None, "int", (2, None)),  # null: from the data
        "n_timepoints": (160, "int", (1, None)),
        "patch_size": (16, "int", (1, None)),
        "n_gradients": (30, "int", (1, None)),
        "pos_minmax": (True, "bool", None),
        "pos_embed": ("gradient", "str", POS_EMBEDS),
        "patch_norm": (True, "bool", None),
        "drop_path": (0.0, "float", (0.0, 1.0)),
        # null: the value of the size preset
        "embed_dim": (None, "int", (4, None)),
        "depth": (None, "int", (1, None)),
        "num_heads": (None, "int", (1, None)),
        "mlp_ratio": (None, "float", (0.0, None)),
        "qkv_bias": (None, "bool", None),
        "predictor_embed_dim": (None, "int", (4, None)),
        "predictor_depth": (None, "int", (1, None)),
        "predictor_num_heads": (None, "int", (1, None)),
        "layernorm_eps": (None, "float", (0.0, None)),
    },
    "data": {
        # auto: the cohort's TR if all scans share one, else the coarsest (see
        # brainjepa.data.resolve_target_tr); a number: resample to it; null: each file's own TR
        "target_tr": ("auto", "tr", (0.0, None)),
        "tr": (None, "float", (0.0, None)),  # TR of files that do not say
        "orientation": (None, "str", ORIENTATIONS),
        "normalization": ("auto", "str", ("auto", *NORMALIZATIONS)),  # auto: psc or center
        "on_error": ("fail", "str", ("fail", "skip")),
        "num_workers": (0, "int", (0, None)),
        "gradients": (None, "str", None),  # CSV path; null: computed from the data
        "tr_source": ("check", "str", ("check", "manifest", "file")),  # manifest tr vs file TR
    },
    "mask": {
        "n_blocks": (1, "int", (1, None)),
        "obs_roi_scale": ([0.84, 1.0], "pair", (0.0, 1.0)),
        "obs_time_scale": ([0.84, 1.0], "pair", (0.0, 1.0)),
        "alpha_roi_scale": ([0.45, 0.6], "pair", (0.0, 1.0)),
        "alpha_time_scale": ([0.2, 0.6], "pair", (0.0, 1.0)),
        "beta_roi_scale": ([0.15, 0.3], "pair", (0.0, 1.0)),
        "beta_time_scale": ([0.0, 0.4], "pair", (0.0, 1.0)),
        "gamma_roi_scale": ([0.15, 0.3], "pair", (0.0, 1.0)),
        "gamma_time_scale": ([0.0, 0.4], "pair", (0.0, 1.0)),
        "min_context": (1, "int", (0, None)),
        "strategy": ("spatiotemporal", "str", STRATEGIES),
    },
    "optim": {
        "epochs": (300, "int", (1, None)),
        "batch_size": (16, "int", (1, None)),  # per process
        "accum_steps": (1, "int", (1, None)),
        "lr": (1e-3, "float", (0.0, None)),
        "start_lr": (5e-5, "float", (0.0, None)),
        "final_lr": (1e-6, "float", (0.0, None)),
        "warmup_epochs": (40.0, "float", (0.0, None)),
        "weight_decay": (0.04, "float", (0.0, None)),
        "final_weight_decay": (0.4, "float", (0.0, None)),
        "ema_start": (0.996, "float", (0.0, 1.0)),
        "ema_end": (0.999, "float", (0.0, 1.0)),
        "clip_grad": (None, "float", (0.0, None)),
        "betas": ([0.9, 0.999], "pair", (0.0, 1.0)),
    },
    "train": {
        "loss": ("smooth_l1", "str", LOSSES),
        "precision": ("auto", "str", PRECISIONS),
        "compile": (False, "bool", None),
        "seed": (0, "int", (0, None)),
        "max_steps": (None, "int", (1, None)),  # null: epochs x steps per epoch
        "log_every": (10, "int", (1, None)),
        "checkpoint_every": (500, "int", (1, None)),
        "keep_last": (3, "int", (1, None)),
        "device": ("auto", "str", None),
        "collapse_std": (0.1, "float", (0.0, None)),  # warn below (token cosine ~0.99)
        "center_targets": (True, "bool", None),  # subtract the batch mean per position
        "diagnose_every": (100, "int", (0, None)),  # representation diagnostics; 0: off
    },
}


def default_config() -> dict:
    """Every key at its default (the schema's defaults)."""
    return {s: {k: copy.deepcopy(spec[0]) for k, spec in keys.items()} for s, keys in SCHEMA.items()}


def _known(section: str) -> str:
    return ", ".join(SCHEMA[section])


def _check_value(key: str, value, kind: str, bounds, nullable: bool):
    """Return ``value`` converted to ``kind`` or raise ConfigError naming ``key``."""
    if kind == "tr":  # "auto", null, or a positive number of seconds
        if value is None or value == "auto":
            return value
        if isinstance(value, str) and value.strip().lower() in ("null", "none", "native"):
            return None
        try:
            seconds = _check_value(key, value, "float", bounds, False)
        except ConfigError:
            seconds = 0.0
        if not seconds > 0:
            raise ConfigError(f"config key {key} must be auto, null or a positive number of seconds, got {value!r}")
        return seconds
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"config key {key} may not be null")
    if kind in ("int", "float") and isinstance(value, str):
        try:
            value = float(value) if kind == "float" else int(value)
        except ValueError:
            pass
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key} must be true or false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"config key {key} must be a string, got {value!r}")
        if bounds is not None and value not in bounds:
            raise ConfigError(f"config key {key} must be one of {', '.join(bounds)}; got {value!r}")
        return value
    if kind == "pair":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"config key {key} must be a pair [low, high], got {value!r}")
        return [_check_value(key, v, "float", bounds, False) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config key {key} must be a{'n integer' if kind == 'int' else ' number'}, got {value!r}")
    if kind == "int":
        if value != int(value):
            raise ConfigError(f"config key {key} must be an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    lo, hi = bounds
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(
            f"config key {key} = {value} is outside [{lo if lo is not None else '-inf'}, "
            f"{hi if hi is not None else 'inf'}]"
        )
    return value


def resolve_config(config: dict, source: str = "config") -> dict:
    """Check a (possibly partial) config dict against :data:`SCHEMA` and fill in the defaults."""
    if not isinstance(config, dict):
        raise ConfigError(
            f"{source}: a config is a mapping of sections ({', '.join(SCHEMA)}), got {type(config).__name__}"
        )
    unknown = [s for s in config if s not in SCHEMA]
    if unknown:
        raise ConfigError(f"{source}: unknown config section {unknown[0]!r}; sections are {', '.join(SCHEMA)}")
    out = default_config()
    for section, values in config.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: config section {section} must be a mapping of keys")
        for key, value in values.items():
            if key not in SCHEMA[section]:
                raise ConfigError(
                    f"{source}: unknown config key {section}.{key}; known keys in {section}: {_known(section)}"
                )
            default, kind, bounds = SCHEMA[section][key]
            out[section][key] = _check_value(f"{section}.{key}", value, kind, bounds, default is None)
    return out


def parse_override(text: str) -> tuple[str, str, object]:
    """``"optim.lr=5e-4"`` -> ("optim", "lr", "5e-4" parsed as YAML)."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. optim.lr=5e-4")
    if section not in SCHEMA:
        raise ConfigError(f"--set {text!r}: unknown config section {section!r}; sections are {', '.join(SCHEMA)}")
    if name not in SCHEMA[section]:
        raise ConfigError(
            f"--set {text!r}: unknown config key {section}.{name}; known keys in {section}: {_known(section)}"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from None
    return section, name, value


def load_config(name_or_path: str | Path, overrides=()) -> dict:
    """A built-in config name (tiny, small, base, large) or a YAML file, with ``overrides``
    (``"section.key=value"`` strings) applied -> the resolved config dict."""
    path = Path(name_or_path)
    if str(name_or_path) in BUILTIN_CONFIGS and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"config {str(name_or_path)!r} is neither a built-in config "
            f"({', '.join(BUILTIN_CONFIGS)}) nor an existing YAML file"
        )
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc})") from None
    config = resolve_config(raw, str(path))
    for text in overrides:
        section, name, value = parse_override(text)
        default, kind, bounds = SCHEMA[section][name]
        config[section][name] = _check_value(f"{section}.{name}", value, kind, bounds, default is None)
    return config


def dump_config(config: dict) -> str:
    """The resolved config as YAML: one block per section, one line per key."""

    def value(v) -> str:
        return yaml.safe_dump(v, default_flow_style=True).replace("\n...", "").strip()

    return "".join(
        f"{section}:\n" + "".join(f"  {k}: {value(v)}\n" for k, v in keys.items()) for section, keys in config.items()
    )


def nonfinite_loss_error(loss: float, step: int, names: list[str]) -> BrainJEPAError:
    """The error for a loss that became NaN/Inf at optimizer step ``step`` (1-based), naming the
    scans of that step's batch."""
    unique = list(dict.fromkeys(names))
    shown = ", ".join(unique[:8]) + (f" and {len(unique) - 8} more" if len(unique) > 8 else "")
    return BrainJEPAError(
        f"the loss became {loss} at step {step}, on a batch of {shown}; check these scans (values, "
        "units, scaling), then lower optim.lr or set optim.clip_grad, and resume from the last "
        "checkpoint (--resume) or restart"
    )


def check_gradient_inputs(cfg: dict, n_rois: int) -> None:
    """Refuse, before any work, gradients that cannot fit the data: too many gradients for the
    ROI count (computed gradients), or a gradient file with another ROI count or too few columns."""
    n_grad = cfg["model"]["n_gradients"]
    path = cfg["data"]["gradients"]
    if path is None:
        if n_grad > n_rois - 2:
            raise ConfigError(
                f"model.n_gradients={n_grad} needs at least {n_grad + 2} ROIs but the data "
                f"has {n_rois}; pass --set model.n_gradients=N with N at most "
                f"{max(n_rois - 2, 1)}, or a precomputed file with --gradients FILE"
            )
        return
    from .gradients import load_gradients_csv

    g, _ = load_gradients_csv(path)
    if g.shape[0] != n_rois:
        raise ConfigError(
            f"{path}: {g.shape[0]} rows (ROIs) of gradients, but the data has {n_rois} "
            "ROIs; use the gradients of this parcellation (brainjepa gradients DATA --out FILE)"
        )
    if g.shape[1] < n_grad:
        raise ConfigError(
            f"{path}: {g.shape[1]} gradients, model.n_gradients={n_grad}; pass "
            f"--set model.n_gradients={g.shape[1]} or a file with more columns"
        )
