"""Brain-JEPA pretraining (docs/method.md).

- :mod:`~brainjepa.pretrain.config`: the config schema, its defaults and the presets.
- :mod:`~brainjepa.pretrain.step`: one optimizer step, in marked stages (:class:`Trainer`).
- :mod:`~brainjepa.pretrain.runtime`: precision, devices, processes, data sharding, CPU memory.
- :mod:`~brainjepa.pretrain.loop`: :func:`pretrain`, the loop with its checkpoints and exact resume.
- :mod:`~brainjepa.pretrain.monitor`: progress, metrics.jsonl, diagnostics and warnings.
- :mod:`~brainjepa.pretrain.plots`: the run folder's figures.
"""

from ..schedules import Schedule
from .config import SCHEMA, default_config, dump_config, load_config, parse_override, resolve_config
from .loop import pretrain
from .runtime import ShardSampler
from .step import Trainer

__all__ = [
    "pretrain",
    "load_config",
    "resolve_config",
    "default_config",
    "dump_config",
    "parse_override",
    "SCHEMA",
    "Schedule",
    "ShardSampler",
    "Trainer",
]
