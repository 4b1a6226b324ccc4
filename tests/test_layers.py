"""The package is layered: a module imports only from its own layer or the layers below it.

Every import statement in the package is checked, including imports inside functions, so a
lower layer can never come to depend on a higher one (training on evaluation, the model on
training, ...). CONTRIBUTING.md explains the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "brainjepa"

# lowest first; a top-level module or package name -> its layer
LAYERS = [
    ["errors"],
    ["runio", "plotting", "schedules"],
    ["io", "transforms"],
    ["data", "synthetic", "gradients"],
    ["masking", "native", "fused", "attention", "precision"],
    ["model"],
    ["fast", "objective", "diagnostics"],
    ["inputs", "bundle_files", "modelcard", "bundle", "convert"],
    ["pretrain"],
    ["evaluate"],
    ["report", "sklearn", "brainmarks"],
    ["cli", "__main__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
LAYER[""] = 0  # the package root holds only the version and the error types


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _top(path: Path) -> str:
    """The top-level module or package of a file: src/brainjepa/pretrain/loop.py -> 'pretrain'."""
    rel = path.relative_to(PACKAGE)
    return "" if rel.parts == ("__init__.py",) else rel.parts[0].removesuffix(".py")


def _imported(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, top-level brainjepa module) of every import of the package in a file (its text, or
    ``source`` as if it were at ``path``)."""
    package = list(path.relative_to(PACKAGE).parts[:-1])
    out = []
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:  # `from . import x` at the root: x may be a module
                    out += [(node.lineno, a.name if a.name in LAYER else "") for a in node.names]
                    continue
                out.append((node.lineno, parts[0]))
            elif node.module and node.module.split(".")[0] == "brainjepa":
                out.append((node.lineno, (node.module.split(".") + [""])[1]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, (a.name.split(".") + [""])[1]) for a in node.names if a.name.startswith("brainjepa")]
    return out


def test_every_module_has_a_layer():
    missing = sorted({_top(p) for p in _modules()} - set(LAYER))
    assert not missing, f"give these modules a layer in tests/test_layers.py and CONTRIBUTING.md: {missing}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(path):
    here = _top(path)
    upward = [
        f"line {line}: {target or 'brainjepa'} (layer {LAYER[target]}) from {here or 'brainjepa'} (layer {LAYER[here]})"
        for line, target in _imported(path)
        if LAYER.get(target, -1) > LAYER[here]
    ]
    assert not upward, f"{path.relative_to(PACKAGE)} imports from a higher layer: {upward}"


def test_the_scan_sees_relative_absolute_and_function_level_imports():
    """The checker itself finds every form of import, so the rule cannot pass vacuously."""
    assert {"attention", "errors"} <= {t for _, t in _imported(PACKAGE / "model.py")}
    loop = {t for _, t in _imported(PACKAGE / "pretrain" / "loop.py")}
    assert {"bundle", "data", "pretrain"} <= loop  # `from ..bundle`, `from .config`
    source = "def f():\n    from ..evaluate import x\n    import brainjepa.report\nfrom brainjepa.cli import main\n"
    probe = PACKAGE / "pretrain" / "probe.py"  # never written: the source is parsed as if it were there
    assert sorted(t for _, t in _imported(probe, source)) == ["cli", "evaluate", "report"]
    assert sorted(t for _, t in _imported(PACKAGE / "bundle.py", "from . import __version__, inputs\n")) == [
        "",
        "inputs",
    ]
