"""User-facing errors.

Anything a researcher can fix (a bad file, a wrong flag, a missing optional dependency) raises
:class:`BrainJEPAError` with a message that says *which* input, *what* is wrong and *what to do*.
The CLI prints these as one line and exits non-zero; everything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import importlib


class BrainJEPAError(Exception):
    """An error the user can act on (bad input, bad configuration, missing extra)."""


class DataError(BrainJEPAError, ValueError):
    """A data file or array is unusable (NaN, wrong shape, unreadable, ...)."""


class ConfigError(BrainJEPAError, ValueError):
    """A configuration key or value is wrong."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or say which pip extra installs it.

    Args:
        module: the module to import, e.g. ``"matplotlib"`` or ``"sklearn.linear_model"``.
        extra: the brainjepa extra that provides it (``pip install 'brainjepa[EXTRA]'``).
        purpose: what needs it, for the error message.

    Returns:
        The imported module.

    Raises:
        BrainJEPAError: the module cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BrainJEPAError(
            f"{purpose} needs the optional package '{module.split('.')[0]}': "
            f"install it with  pip install 'brainjepa[{extra}]'"
        ) from exc
