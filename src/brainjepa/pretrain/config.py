"""The pretraining config: one schema with every key, its type and its default.

A config is plain data, five sections of scalars (``model``, ``data``, ``mask``, ``optim``,
``train``). :data:`SCHEMA` holds every key with its default: the architecture defaults come
from :class:`~brainjepa.model.ModelConfig`, the masking defaults from
:class:`~brainjepa.masking.SpatiotemporalMasker`'s signature, the rest (the recipe, see
docs/method.md) are written here, and they are the ``tiny`` preset. A partial config, as a
dict in Python or a YAML file on the command line, means *the defaults plus its keys*.

The built-in presets (``brainjepa/configs/*.yaml``) hold only what differs from the defaults:
``tiny`` (the defaults), ``base`` (the full-scale recipe, ViT-B), ``small`` and ``large`` (the
full-scale recipe at those sizes: ``extends: base``), ``authors`` (the authors' recipe). Any
YAML file may start from another config with ``extends: NAME_OR_PATH``.

:func:`load_config` returns the *resolved* config: every key present, every value checked. A
key that does not exist or a value of the wrong type raises :class:`ConfigError` naming the
key. Numbers written like ``1e-3`` are strings to YAML 1.1 (PyYAML); a string that parses as a
number is therefore accepted for a numeric key.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import fields
from pathlib import Path

import yaml

from ..data import DEFAULT_NORMALIZATION
from ..data.manifest import TR_SOURCES
from ..data.validate import ON_ERROR
from ..errors import ConfigError, DataError
from ..io import ORIENTATIONS
from ..masking import STRATEGIES, SpatiotemporalMasker
from ..model import MODEL_SIZES, POS_EMBEDS, ModelConfig
from ..objective import LOSSES, REGULARIZERS
from ..precision import PRECISIONS
from ..transforms import NORMALIZATIONS, SCOPES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BUILTIN_CONFIGS = (*MODEL_SIZES, "authors")

_ARCH = {f.name: f.default for f in fields(ModelConfig)}
_MASK = {
    name: list(p.default) if isinstance(p.default, tuple) else p.default
    for name, p in inspect.signature(SpatiotemporalMasker).parameters.items()
    if p.default is not inspect.Parameter.empty
}

# section -> key -> (default, kind, bounds): kind is int, float, bool, str, tr or pair (two
# numbers), with a trailing '?' when the key may also be null; bounds are the allowed strings for
# str, (low, high) (None = open) for numbers. A key whose default is None may be null.
SCHEMA: dict[str, dict[str, tuple]] = {
    "model": {
        "size": ("tiny", "str", tuple(MODEL_SIZES)),
        "n_rois": (None, "int", (2, None)),  # null: from the data
        "n_timepoints": (_ARCH["n_timepoints"], "int", (1, None)),
        "patch_size": (_ARCH["patch_size"], "int", (1, None)),
        "n_gradients": (_ARCH["n_gradients"], "int", (1, None)),
        "pos_minmax": (_ARCH["pos_minmax"], "bool", None),
        "pos_embed": (_ARCH["pos_embed"], "str", POS_EMBEDS),
        # the recipe normalises the embedded patches (docs/method.md, "Recipe"); the authors'
        # architecture (ModelConfig's default) does not
        "patch_norm": (True, "bool", None),
        "drop_path": (_ARCH["drop_path"], "float", (0.0, 1.0)),
        # null: the value of the size preset (MODEL_SIZES), else ModelConfig's default
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
        "normalization": (DEFAULT_NORMALIZATION, "str", ("auto", *NORMALIZATIONS)),  # auto: psc or center
        # where psc / center / zscore take each ROI's mean (and std): the whole scan (a window
        # keeps its level relative to its scan: brain states survive) or each window on its own
        "normalization_scope": ("scan", "str", SCOPES),
        "on_error": (ON_ERROR[0], "str", ON_ERROR),
        "num_workers": (0, "int", (0, None)),
        "gradients": (None, "str", None),  # CSV path; null: computed from the data
        "tr_source": (TR_SOURCES[0], "str", TR_SOURCES),  # manifest tr vs file TR
    },
    "mask": {
        "n_blocks": (_MASK["n_blocks"], "int", (1, None)),
        **{
            f"{part}_{axis}_scale": (_MASK[f"{part}_{axis}_scale"], "pair", (0.0, 1.0))
            for part in ("obs", "alpha", "beta", "gamma")
            for axis in ("roi", "time")
        },
        "min_context": (_MASK["min_context"], "int", (0, None)),
        "strategy": (_MASK["strategy"], "str", STRATEGIES),
    },
    "optim": {
        "epochs": (20, "int", (1, None)),
        "batch_size": (8, "int", (1, None)),  # per process
        "accum_steps": (1, "int", (1, None)),
        "lr": (1e-3, "float", (0.0, None)),
        "start_lr": (1e-4, "float", (0.0, None)),
        "final_lr": (1e-5, "float", (0.0, None)),
        "warmup_epochs": (2.0, "float", (0.0, None)),
        "weight_decay": (0.04, "float", (0.0, None)),
        "final_weight_decay": (0.4, "float", (0.0, None)),
        "ema_start": (0.99, "float", (0.0, 1.0)),
        "ema_end": (0.999, "float", (0.0, 1.0)),  # below 1: the target keeps learning to the end
        "clip_grad": (1.0, "float?", (0.0, None)),  # null: no clipping
        "betas": ([0.9, 0.999], "pair", (0.0, 1.0)),
    },
    "train": {
        "loss": ("smooth_l1", "str", LOSSES),
        "precision": ("auto", "str", PRECISIONS),
        "compile": (False, "bool", None),
        "seed": (0, "int", (0, None)),
        "max_steps": (None, "int", (1, None)),  # null: epochs x steps per epoch
        "log_every": (5, "int", (1, None)),
        "checkpoint_every": (100, "int", (1, None)),
        "keep_last": (2, "int", (1, None)),
        "device": ("auto", "str", None),
        "collapse_std": (0.1, "float", (0.0, None)),  # warn below (token cosine ~0.99)
        "center_targets": (True, "bool", None),  # subtract the batch mean per position
        # the target: the mean of the last k blocks' layer-normed outputs (1: the final output)
        "target_layers": (1, "int", (1, None)),
        # a penalty on the context encoder's outputs that keeps their variance (docs/method.md)
        "regularizer": ("none", "str", REGULARIZERS),
        "reg_weight": (1.0, "float", (0.0, None)),
        "diagnose_every": (100, "int", (0, None)),  # representation diagnostics; 0: off
    },
}

# keys that may change when a run is resumed (they do not change the numbers)
RESUMABLE_CHANGES = {
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_last",
    "train.device",
    "train.precision",
    "train.compile",
    "train.collapse_std",
    "data.num_workers",
    "data.on_error",
}


def default_config() -> dict:
    """Every key at its default (the schema's defaults).

    Returns:
        A new resolved config dict (the ``tiny`` preset).
    """
    return {s: {k: copy.deepcopy(spec[0]) for k, spec in keys.items()} for s, keys in SCHEMA.items()}


def _known(section: str) -> str:
    return ", ".join(SCHEMA[section])


def _checked(section: str, key: str, value):
    """``value`` checked against the schema entry of ``section.key``."""
    default, kind, bounds = SCHEMA[section][key]
    nullable = default is None or kind.endswith("?")
    return _check_value(f"{section}.{key}", value, kind.rstrip("?"), bounds, nullable)


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
    """The defaults plus the keys of a (possibly partial) config dict, every value checked.

    Args:
        config: sections of keys; an ``extends`` entry (a built-in name or a YAML path) starts
            from that config instead of the defaults.
        source: where the config comes from, for error messages.

    Returns:
        The resolved config: every section and key of :data:`SCHEMA`.

    Raises:
        ConfigError: an unknown section or key, or a value of the wrong type or range.
    """
    if not isinstance(config, dict):
        raise ConfigError(
            f"{source}: a config is a mapping of sections ({', '.join(SCHEMA)}), got {type(config).__name__}"
        )
    config = _merged(config, source, ())
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
            out[section][key] = _checked(section, key, value)
    return out


def _merged(config: dict, source: str, seen: tuple) -> dict:
    """``config`` on top of the config it ``extends`` (recursively), section by section."""
    if "extends" not in config:
        return config
    config = dict(config)
    parent = config.pop("extends")
    path = _config_path(parent)
    if path in seen:
        raise ConfigError(f"{source}: 'extends: {parent}' makes a loop ({' -> '.join(map(str, seen + (path,)))})")
    base = _merged(_read_yaml(path), str(path), seen + (path,))
    out = {section: dict(values or {}) for section, values in base.items()}
    for section, values in config.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def _config_path(name_or_path) -> Path:
    path = Path(name_or_path)
    if str(name_or_path) in BUILTIN_CONFIGS and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"config {str(name_or_path)!r} is neither a built-in config "
            f"({', '.join(BUILTIN_CONFIGS)}) nor an existing YAML file"
        )
    return path.resolve()


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections ({', '.join(SCHEMA)})")
    return raw


def parse_override(text: str) -> tuple[str, str, object]:
    """Parse one ``--set`` override, e.g. ``"optim.lr=5e-4"``.

    Args:
        text: ``"section.key=value"``; the value is parsed as YAML, an empty value is null.

    Returns:
        (section, key, value), e.g. ("optim", "lr", "5e-4"): YAML 1.1 leaves such a number a
        string, which the schema check accepts.

    Raises:
        ConfigError: no ``section.key=``, an unknown section or key, or a value that is not YAML.
    """
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
    """A built-in config or a YAML file, with overrides, resolved.

    Args:
        name_or_path: a built-in name (:data:`BUILTIN_CONFIGS`) or a YAML file.
        overrides: ``"section.key=value"`` strings (``--set`` on the command line).

    Returns:
        The resolved config dict (:func:`resolve_config`).
    """
    path = _config_path(name_or_path)
    config = resolve_config(_read_yaml(path), str(path))
    for text in overrides:
        section, name, value = parse_override(text)
        config[section][name] = _checked(section, name, value)
    return config


def dump_config(config: dict) -> str:
    """The resolved config as YAML: one block per section, one line per key.

    Args:
        config: the resolved config.

    Returns:
        The YAML text.
    """

    def value(v) -> str:
        """One value as a single line of flow-style YAML.

        Args:
            v: the value.

        Returns:
            Its YAML text.
        """
        return yaml.safe_dump(v, default_flow_style=True).replace("\n...", "").strip()

    return "".join(
        f"{section}:\n" + "".join(f"  {k}: {value(v)}\n" for k, v in keys.items()) for section, keys in config.items()
    )


def config_diff(old: dict, new: dict) -> list[str]:
    """The keys whose values differ between two resolved configs, except :data:`RESUMABLE_CHANGES`.

    Args:
        old: the checkpoint's config.
        new: this run's config.

    Returns:
        One line per differing key: ``"section.key: OLD in the checkpoint, NEW now"``.
    """
    out = []
    for section in new:
        for key, value in new[section].items():
            name = f"{section}.{key}"
            before = old.get(section, {}).get(key)
            if name not in RESUMABLE_CHANGES and before != value:
                out.append(f"{name}: {before!r} in the checkpoint, {value!r} now")
    return out


def recipe_changes(cfg: dict) -> dict:
    """How a resolved config differs from the preset of its model size (for the model card).

    Args:
        cfg: the resolved config.

    Returns:
        {"preset": the size's built-in config name, "changes": {"section.key": [preset value,
        this value]}} for every key whose value differs (an empty dict of changes: the preset).
    """
    preset = cfg["model"]["size"]
    ref = load_config(preset) if preset in BUILTIN_CONFIGS else default_config()
    changes = {
        f"{section}.{key}": [ref.get(section, {}).get(key), value]
        for section, keys in cfg.items()
        for key, value in keys.items()
        if ref.get(section, {}).get(key) != value
    }
    return {"preset": preset, "changes": changes}


def model_config(cfg: dict, n_rois: int, n_gradients: int) -> ModelConfig:
    """The architecture of a resolved config for data with ``n_rois`` ROIs.

    Args:
        cfg: the resolved config; a null model key takes the size preset's value (else ModelConfig's
            default).
        n_rois: the data's ROI count.
        n_gradients: brain gradients per ROI.

    Returns:
        The architecture.

    Raises:
        DataError: ``model.n_rois`` is set and differs from the data's.
    """
    m = cfg["model"]
    if m["n_rois"] is not None and m["n_rois"] != n_rois:
        raise DataError(
            f"model.n_rois={m['n_rois']} but the data has {n_rois} ROIs; set model.n_rois=null to take it from the data"
        )
    overrides = {k: v for k, v in m.items() if k not in ("size", "n_rois", "n_gradients") and v is not None}
    return ModelConfig.from_size(m["size"], n_rois=n_rois, n_gradients=n_gradients, **overrides)
