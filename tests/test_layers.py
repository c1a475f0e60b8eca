"""The package's layers only import downwards.

Low to high: errors < devices < data < model < infer < train < parity < plan < pipeline
< the commands on top (cli, demo, __main__). A module sits at the layer of its own
package (`chipshift.train.cli` is in `train`); it may import its own layer and the layers
below, never one above. Imports inside functions count too: a late import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import chipshift

pytestmark = pytest.mark.any_class  # nothing here asks the precision policy (conftest checks)

LAYERS = [
    {"errors"},
    {"devices"},
    {"data"},
    {"model"},
    {"infer"},
    {"train"},  # RL post-training samples its rollouts with the engine
    {"parity"},  # judges what training and serving compute (the trainer-to-server check)
    {"plan"},
    {"pipeline"},
    {"cli", "demo", "__main__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
PACKAGE = Path(chipshift.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, module) of every `chipshift.*` import in the file, wherever it sits."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from chipshift import train` imports the submodule `chipshift.train`
            names = [f"{target}.{a.name}" for a in node.names] if target == "chipshift" else [target]
            found += [(node.lineno, name) for name in names]
    return [(line, name) for line, name in found if name.startswith("chipshift.")]


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_top_level_name_has_a_layer():
    names = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    names |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert names - RANK.keys() == set(), "give these modules a layer in LAYERS"


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        own = layer_of(module)
        if own is None:  # chipshift/__init__.py
            continue
        for line, target in imported_modules(path, module):
            dep = layer_of(target)
            if dep in RANK and RANK[dep] > RANK[own]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {target} ({dep})")
    assert upward == [], "imports that run up the layers:\n" + "\n".join(upward)
