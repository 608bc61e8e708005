"""Imports point down the layers drawn in the README, and nowhere else.

The layer list is read from the README's architecture diagram (the rows between its two rules,
top to bottom; ``a | b`` are parts of one layer that know nothing of each other, ``a, b`` one
part), so the picture a newcomer reads is the rule this test holds the code to. Every module of
monitor/ and retrain/ is walked with ``ast``: every import at any depth counts, including those
inside functions (a lazy import is still a dependency, only a later one) and those under
``if TYPE_CHECKING:`` (a type named from a layer above is the same arrow pointing up, and the
type checker follows it). A package's ``__init__`` is its own module (``monitor.__init__``);
importing ``a.b`` is not counted as importing ``a.__init__`` as well, because the package
``__init__`` files load their contents lazily.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("monitor", "retrain")
RULE = re.compile(r"^ ─{20,}$")


@dataclass(frozen=True)
class Place:
    layer: int    # 0 = the bottom row
    part: int     # which part of its row
    name: str     # the README's name that placed it (the most specific that matches)


def readme_layers(text: str) -> list[list[list[str]]]:
    """The diagram's rows, bottom first: each a list of parts, each part a list of module names."""
    (block,) = [b for b in re.findall(r"```\n(.*?)```", text, flags=re.S) if "tests/test_layers.py" in b]
    lines = block.splitlines()
    rules = [i for i, line in enumerate(lines) if RULE.match(line)]
    assert len(rules) == 2, "the README diagram's layer list must sit between two rules of ─"
    rows = []
    for line in lines[rules[0] + 1:rules[1]]:
        if line[:1] == " " and line[1:2].strip():  # a row; indented lines continue its description
            names = re.split(r"\s{2,}", line.strip())[0]
            rows.append([[n.strip() for n in part.split(",")] for part in names.split("|")])
    return rows[::-1]


LAYERS = readme_layers((REPO / "README.md").read_text(encoding="utf-8"))


def module_files() -> dict[str, Path]:
    """Every module of the packages by name (a package's ``__init__.py`` as ``pkg.__init__``)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            out[".".join(path.relative_to(REPO).with_suffix("").parts)] = path
    return out


MODULES = module_files()


def place(module: str) -> Place | None:
    best: Place | None = None
    for layer, parts in enumerate(LAYERS):
        for part, names in enumerate(parts):
            for name in names:
                covers = module == name or (module.startswith(name + ".") and not name.endswith(".__init__"))
                if covers and (best is None or len(name) > len(best.name)):
                    best = Place(layer, part, name)
    return best


def _target(name: str) -> str:
    """The module an imported name lands in: a package means its ``__init__``."""
    return f"{name}.__init__" if f"{name}.__init__" in MODULES else name


def imports(module: str, path: Path) -> list[tuple[int, str, str]]:
    """(line, target module, the import as written) for every import of the packages in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module.split(".")[:-1]  # for a package's __init__ too, its package is the one it starts
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((node.lineno, _target(alias.name), f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                target = _target(sub) if (sub in MODULES or f"{sub}.__init__" in MODULES) else _target(source)
                out.append((node.lineno, target, f"from {'.' * node.level}{node.module or ''} import {alias.name}"))
    return [(line, target, text) for line, target, text in out if target.split(".")[0] in PACKAGES]


def _row(place: Place) -> str:
    return " | ".join(", ".join(names) for names in LAYERS[place.layer])


def test_the_readme_draws_the_layers_in_the_agreed_order() -> None:
    """The order the architecture was agreed in (issue 15), bottom to top: a violation must be
    fixed in the code, not by moving a row of the diagram."""
    order = ["monitor.configutil", "monitor.ingest", "monitor.engine", "monitor.policy", "retrain",
             "monitor.service.config", "monitor.config", "monitor.service", "monitor.demo", "monitor.cli",
             "monitor.__main__"]
    places = {name: place(name) for name in [*order, "monitor.errors", "monitor.signals"]}
    assert all(p is not None and p.name == name for name, p in places.items()), places
    layers = [places[name].layer for name in order]
    assert layers == sorted(set(layers)), f"the README's rows are out of order: {list(zip(order, layers))}"
    ingest, signals = places["monitor.ingest"], places["monitor.signals"]
    assert ingest.layer == signals.layer and ingest.part != signals.part
    assert places["monitor.errors"] == Place(0, 0, "monitor.errors")


def test_every_module_has_a_layer_and_every_row_a_module() -> None:
    unplaced = sorted(m for m in MODULES if place(m) is None)
    assert not unplaced, f"modules in no layer of the README diagram (add them to a row): {unplaced}"
    used = {place(m).name for m in MODULES}
    listed = {name for parts in LAYERS for names in parts for name in names}
    assert listed <= used, f"rows naming no module (stale names in the README diagram): {sorted(listed - used)}"


def violations(module: str, path: Path) -> list[str]:
    """``file:line: `import`: why`` for each import in ``path`` (module ``module``) against the layers."""
    here = place(module)
    assert here is not None, module
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    out = []
    for line, target, text in imports(module, path):
        there = place(target)
        if there is None:
            out.append(f"{where}:{line}: `{text}`: {target} is in no layer")
        elif there.layer > here.layer:
            out.append(f"{where}:{line}: `{text}` points up: {module} is in [{_row(here)}], "
                       f"{target} above it in [{_row(there)}]")
        elif there.layer == here.layer and there.part != here.part:
            out.append(f"{where}:{line}: `{text}` points across: {module} ({here.name}) and {target} "
                       f"({there.name}) are parts of one row that know nothing of each other")
    return out


def test_imports_point_down_the_layers() -> None:
    found = [v for module, path in MODULES.items() for v in violations(module, path)]
    assert not found, "imports against the layers (README diagram):\n  " + "\n  ".join(found)


@pytest.mark.parametrize("source, module, expected", [
    ("from monitor.config import Config\n", "retrain.data", "monitor.config"),
    ("def f():\n    from monitor.service.daemon import Daemon\n", "monitor.policy.policy", "monitor.service.daemon"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from monitor.cli import main\n", "retrain.job",
     "monitor.cli.__init__"),
    ("from ..service import daemon\n", "monitor.engine.cycle", "monitor.service.daemon"),
    ("from . import notify\n", "monitor.service.__init__", "monitor.service.notify"),
    ("from monitor import __version__\n", "monitor.service.daemon", "monitor.__init__"),
], ids=["top-level", "inside-a-function", "type-checking-only", "relative", "relative-in-init", "package-attribute"])
def test_the_walk_sees_every_kind_of_import(tmp_path: Path, source: str, module: str, expected: str) -> None:
    """The check above can fail: each way of writing an import is found and resolved."""
    path = tmp_path / "m.py"
    path.write_text(source, encoding="utf-8")
    assert [target for _, target, _ in imports(module, path)] == [expected]


def test_an_import_against_the_layers_is_named_with_its_file_and_line(tmp_path: Path) -> None:
    """The check above can fail, and says where: an upward and a sideways import."""
    path = tmp_path / "data.py"
    path.write_text("import os\n\ndef f():\n    from monitor.config import Config\n", encoding="utf-8")
    (found,) = violations("retrain.data", path)
    assert found.startswith(f"{path}:4: `from monitor.config import Config` points up: retrain.data is in [retrain]")
    path.write_text("from monitor.ingest.records import JoinedLabel\n", encoding="utf-8")
    (found,) = violations("monitor.signals.mmd", path)
    assert found.startswith(f"{path}:1: `from monitor.ingest.records import JoinedLabel` points across")
    path.write_text("from monitor.errors import ConfigError\nfrom monitor.ingest import store\n", encoding="utf-8")
    assert violations("retrain.data", path) == []
