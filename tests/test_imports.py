"""The import rules of DESIGN.md (Layout), read from the source with `ast`: no module is run.

1. Imports point one way: down `LAYERS`. A module may import one in its own row or below.
2. No module imports or uses another gapnet module's private (``_name``) names.
3. Imports sit at the top of a module; inside a function only the optional extras
   (`OPTIONAL_EXTRAS`), and the gapnet modules that import one of them at their top.
4. `gapnet.reference` imports only NumPy and `gapnet._shapes` (besides the standard library).
5. ``import gapnet`` (and the CLI's import) loads none of Triton, onnx, fastapi, matplotlib.

A failure names the module, the line and the import, e.g.
``gapnet.data:12: from gapnet.train import TrainConfig imports gapnet.train, which is above``.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gapnet"

# The layers, top to bottom: a module may import modules of its own row and the rows below it.
# A package's ``__init__.py`` is the package's name (``gapnet.serve``, ``gapnet.kernels``).
LAYERS: list[tuple[str, ...]] = [
    # `python -m gapnet`: runs the CLI
    ("gapnet.__main__",),
    # the `gapnet` command: every subcommand's module
    ("gapnet.cli",),
    # the web demo (its __init__ starts the app lazily; the app reads MAX_BYTES from it),
    # ONNX export, the tutorial's figures
    (
        "gapnet.serve",
        "gapnet.serve.app",
        "gapnet.serve.predictor",
        "gapnet.export",
        "gapnet.explain",
    ),
    # a comparison of heads: trains, evaluates, localizes, writes results.json
    ("gapnet.compare",),
    # the report reads results.json (and a run's TrainConfig); CAM; the training loop
    ("gapnet.report", "gapnet.cam", "gapnet.train"),
    # evaluation and prediction on a model: used by train, compare and serve; uses data
    ("gapnet.inference",),
    # every file gapnet writes; the datasets
    ("gapnet.checkpoint", "gapnet.data"),
    # backbones, heads, the registry
    ("gapnet.models",),
    # `import gapnet`: the public names of functional and nn
    ("gapnet",),
    # the pooling modules
    ("gapnet.nn",),
    # the ops with autograd, picking a backend
    ("gapnet.functional",),
    # the CPU paths and the kernels as autograd Functions
    ("gapnet._ops", "gapnet._strided"),
    # compiled C for CPU max pooling, built on first use and loaded by ctypes
    ("gapnet._cpu_kernels",),
    # Triton only
    ("gapnet.kernels", "gapnet.kernels.global_pool", "gapnet.kernels.window_pool"),
    # the NumPy spec: tests and docs use it (and explain, for its pictures)
    ("gapnet.reference",),
    # argument rules and output sizes; the config dataclasses' machinery (standard library only)
    ("gapnet._shapes", "gapnet.config"),
]
RANK = {module: rank for rank, row in enumerate(LAYERS) for module in row}

# Imported lazily, inside the function that needs them: `import gapnet` must not pull them in
OPTIONAL_EXTRAS = {
    "triton", "onnx", "onnxruntime", "onnxscript", "fastapi", "uvicorn", "starlette",
    "matplotlib", "playwright",
}  # fmt: skip
# gapnet modules that import an optional extra at their top, so they too load lazily
LAZY_MODULES = {"gapnet.kernels.global_pool", "gapnet.kernels.window_pool", "gapnet.serve.app"}
# Required dependencies: imported at the top, never inside a function
REQUIRED = {"torch", "numpy", "PIL", "safetensors"}

# Violations in modules another engineer is rewriting (_shapes, reference, functional, _strided,
# _ops, kernels, nn): (module, the name the failure names). The lead removes this set once that
# work is merged; a pair that no longer fails makes `test_pending_is_still_needed` fail.
PENDING: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    """One import statement's target, or one use of a module's attribute (``x._y``)."""

    module: str  # the importing module, e.g. "gapnet.cam"
    line: int
    text: str  # the statement as written, e.g. "from gapnet.data import _mask_boxes"
    target: str  # the module imported, e.g. "gapnet.data" (or "torch")
    name: str | None  # the name taken from it (``from target import name``), if any
    in_function: bool

    def where(self) -> str:
        return f"{self.module}:{self.line}: {self.text}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def absolute(node: ast.ImportFrom, module: str) -> str:
    """The module a ``from ... import`` reads, with a relative one made absolute."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


@functools.cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imports_of(module: str) -> list[Import]:
    """Every import in `module` (at module level, under its ifs and trys, and in functions)."""
    tree = parse(MODULES[module])
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            text = ast.unparse(child) if isinstance(child, ast.Import | ast.ImportFrom) else ""
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(module, child.lineno, text, alias.name, None, in_function))
            elif isinstance(child, ast.ImportFrom) and child.module != "__future__":
                source = absolute(child, module)
                for alias in child.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in MODULES:  # `from gapnet import data`: imports gapnet.data
                        found.append(
                            Import(module, child.lineno, text, submodule, None, in_function)
                        )
                    else:
                        found.append(
                            Import(module, child.lineno, text, source, alias.name, in_function)
                        )
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            visit(child, inner or isinstance(child, ast.Lambda))

    visit(tree, False)
    return found


def private_uses(module: str) -> list[Import]:
    """``x._y`` where ``x`` names another gapnet module (``from gapnet import data``, ...)."""
    tree = parse(MODULES[module])
    bound: dict[str, str] = {}  # local name -> the gapnet module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gapnet":
                    bound[alias.asname or "gapnet"] = alias.name if alias.asname else "gapnet"
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node, module)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{source}.{alias.name}"
    uses = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not is_private(node.attr):
            continue
        owner = dotted(node.value, bound)
        if owner in MODULES and owner != module and f"{owner}.{node.attr}" not in MODULES:
            uses.append(Import(module, node.lineno, ast.unparse(node), owner, node.attr, False))
    return uses


def dotted(node: ast.expr, bound: dict[str, str]) -> str | None:
    """The module an expression like ``data`` or ``gapnet.data`` names, if it names one."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = dotted(node.value, bound)
        return f"{owner}.{node.attr}" if owner else None
    return None


def gapnet_target(imp: Import) -> str | None:
    """The gapnet module (or package) an import loads; None for any other import."""
    if imp.target.split(".")[0] != "gapnet":
        return None
    return imp.target if imp.target in MODULES else None


class Problem(NamedTuple):
    """One violation: PENDING names it by (module, name)."""

    module: str
    name: str  # the module imported (layers, imports in functions) or the private name taken
    line: int
    message: str


def layer_problems(modules: Iterable[str]) -> list[Problem]:
    """Each import of a gapnet module above the importer."""
    problems = []
    for module in modules:
        for imp in imports_of(module):
            target = gapnet_target(imp)
            if target is not None and RANK[target] < RANK[module]:
                message = f"{imp.where()} imports {target}, which is above"
                problems.append(Problem(module, target, imp.line, message))
    return problems


def private_problems(modules: Iterable[str]) -> list[Problem]:
    """Each private name taken from another gapnet module, by import or as ``x._y``."""
    problems = []
    for module in modules:
        for imp in imports_of(module) + private_uses(module):
            from_gapnet = imp.target.split(".")[0] == "gapnet" and imp.target != module
            if from_gapnet and imp.name is not None and is_private(imp.name):
                message = f"{imp.where()} uses {imp.target}'s private {imp.name}"
                problems.append(Problem(module, imp.name, imp.line, message))
    return problems


def function_import_problems(modules: Iterable[str]) -> list[Problem]:
    """Each import of a gapnet module or a required dependency inside a function."""
    problems = []
    for module in modules:
        for imp in imports_of(module):
            top = imp.target.split(".")[0]
            lazy = top in OPTIONAL_EXTRAS or imp.target in LAZY_MODULES
            if imp.in_function and not lazy and (top == "gapnet" or top in REQUIRED):
                message = f"{imp.where()} imports {imp.target} inside a function"
                problems.append(Problem(module, imp.target, imp.line, message))
    return problems


# Each rule and what finds its violations (``from x import a, b`` is one import of x)
RULES: dict[str, Callable[[Iterable[str]], list[Problem]]] = {
    "imports point down LAYERS": layer_problems,
    "no other module's private names": private_problems,
    "gapnet and required imports at the top": function_import_problems,
}


def problems(rule: str, modules: Iterable[str] = MODULES) -> list[Problem]:
    """The rule's violations once each, in line order."""
    return sorted(set(RULES[rule](modules)), key=lambda p: (p.module, p.line, p.name))


def test_every_module_has_a_layer() -> None:
    # a new module must be placed in LAYERS, or the layer rule would skip it
    assert sorted(set(MODULES) - set(RANK)) == []
    assert sorted(set(RANK) - set(MODULES)) == []  # and the table names no module that is gone


@pytest.mark.parametrize("rule", RULES)
def test_rule(rule: str) -> None:
    found = [p.message for p in problems(rule) if (p.module, p.name) not in PENDING]
    assert found == [], "\n".join([rule, *found])


def test_pending_is_still_needed() -> None:
    # each PENDING pair still fails some rule: a fixed one must leave the set
    failing = {(p.module, p.name) for rule in RULES for p in problems(rule)}
    assert sorted(PENDING - failing) == []


def test_lazy_modules_import_an_optional_extra_at_their_top() -> None:
    # the allowance for LAZY_MODULES holds only while they do
    for module in sorted(LAZY_MODULES):
        tops = {i.target.split(".")[0] for i in imports_of(module) if not i.in_function}
        assert tops & OPTIONAL_EXTRAS, f"{module} imports no optional extra at its top"


def test_reference_imports_only_numpy_and_shapes() -> None:
    allowed = {"numpy", "gapnet._shapes"}
    found = [
        imp.where()
        for imp in imports_of("gapnet.reference")
        if imp.target not in allowed and imp.target.split(".")[0] not in sys.stdlib_module_names
    ]
    assert found == []


# Each case: a rule, a tiny source standing in for gapnet.models (mid-table), the name its
# violation names (or None). They keep the rules above from passing by finding nothing.
DETECTOR_CASES = [
    # a private name imported from another module
    ("no other module's private names", "from gapnet.data import _mask_boxes\n", "_mask_boxes"),
    # a private name used through a module bound by import
    ("no other module's private names", "from gapnet import data\nx = data._mask_boxes\n",
     "_mask_boxes"),
    # ... also through the package
    ("no other module's private names", "import gapnet.data\nx = gapnet.data._mask_boxes\n",
     "_mask_boxes"),
    # a private submodule is a module, not a private name
    ("no other module's private names", "from gapnet import _shapes\nx = _shapes.window2d\n",
     None),
    # a dunder is public
    ("no other module's private names", "from gapnet import __version__\n", None),
    # a gapnet import inside a function
    ("gapnet and required imports at the top", "def f():\n    from gapnet import data\n",
     "gapnet.data"),
    # a required dependency inside a method
    ("gapnet and required imports at the top",
     "class A:\n    def f(self):\n        import torch\n", "torch"),
    # an optional extra inside a function is how it should be
    ("gapnet and required imports at the top", "def f():\n    import matplotlib.pyplot\n", None),
    # an import under a module-level try is at the top
    ("gapnet and required imports at the top",
     "try:\n    import torch\nexcept ImportError:\n    pass\n", None),
    # models importing train goes up, also inside an if
    ("imports point down LAYERS", "if True:\n    from gapnet.train import TrainConfig\n",
     "gapnet.train"),
    # ... and relatively
    ("imports point down LAYERS", "from .train import TrainConfig\n", "gapnet.train"),
    # models importing nn goes down
    ("imports point down LAYERS", "from gapnet.nn import GeM\n", None),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "source", "expected"), DETECTOR_CASES)
def test_rules_on_small_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rule: str, source: str, expected: str | None
) -> None:
    path = tmp_path / "models.py"
    path.write_text(source)
    monkeypatch.setitem(MODULES, "gapnet.models", path)
    names = [p.name for p in problems(rule, ["gapnet.models"])]
    assert names == ([expected] if expected else [])


def test_import_gapnet_loads_no_optional_extra() -> None:
    # one fresh interpreter: what `import gapnet`, then the CLI's import, put in sys.modules
    extras = ["triton", "onnx", "fastapi", "matplotlib"]
    script = (
        "import sys\n"
        "def loaded():\n"
        f"    return sorted({{m.split('.')[0] for m in sys.modules}} & set({extras!r}))\n"
        "import gapnet\n"
        "print('gapnet', loaded())\n"
        "import gapnet.cli\n"
        "print('gapnet.cli', loaded())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["gapnet []", "gapnet.cli []"]
