"""The layers of ddm hold: a walk over every import in ddm/ (also those inside functions).

- the library core (models, flow path, ensemble, sampling, metrics and the small
  shared helpers) is plain PyTorch: nothing it imports, directly or through other
  ddm modules, reaches Lightning, Hydra, OmegaConf or the stages, training,
  launching, experiment and command-line code built on top of it;
- Lightning is imported only inside ``ddm.train``; Hydra only by the command line
  (``ddm.cli``) and the config composer (``ddm.config``);
- no ddm module imports itself back through a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ddm"

CORE = (
    "ddm.models",
    "ddm.latent",
    "ddm.text",
    "ddm.flow",
    "ddm.ensemble",
    "ddm.sampling",
    "ddm.eval",
    "ddm.images",
    "ddm.markdown",
    "ddm.errors",
    "ddm.seeds",
    "ddm.devices",
    "ddm.io",
    "ddm.jobs",
    "ddm.artifacts",
)
ABOVE_CORE = (
    "lightning",
    "pytorch_lightning",
    "hydra",
    "omegaconf",
    "ddm.stages",
    "ddm.train",
    "ddm.experiments",
    "ddm.launch",
    "ddm.cli",
    "ddm.cli_help",
    "ddm.config",
)
ONLY_IMPORTED_BY = {
    "lightning": ("ddm.train",),
    "pytorch_lightning": ("ddm.train",),
    "hydra": ("ddm.cli", "ddm.config"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (ROOT / Path(*name.split(".")) / "__init__.py").exists()


def exists(name: str) -> bool:
    return is_package(name) or (ROOT / Path(*name.split("."))).with_suffix(".py").exists()


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in its body: ddm modules by their full name, others by their top name."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            found.add(source)
            for alias in node.names:  # `from ddm.stages import evaluate` imports the submodule
                if exists(f"{source}.{alias.name}"):
                    found.add(f"{source}.{alias.name}")
    out = set()
    for name in found:
        if name.startswith("ddm"):
            while name and not exists(name):  # `ddm.flow.FlowPath` style access: the module is ddm.flow
                name = name.rpartition(".")[0]
            if name and name != me:
                out.add(name)
        else:
            out.add(name.split(".")[0])
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def parents(name: str) -> list[str]:
    """Importing ``a.b.c`` first runs ``a`` and ``a.b``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module importing ``start`` loads, with the module that imported it (for the error message)."""
    seen, todo = {start: ""}, [start]
    while todo:
        current = todo.pop()
        for nxt in graph.get(current, set()) | set(parents(current)):
            if nxt not in seen:
                seen[nxt] = current
                todo.append(nxt)
    return seen


def chain(via: dict[str, str], end: str) -> str:
    steps = [end]
    while via.get(steps[-1]):
        steps.append(via[steps[-1]])
    return " -> ".join(reversed(steps))


def test_the_walk_sees_the_imports_it_must_see(graph):
    # guards against a walk that finds nothing and so passes every rule
    assert "lightning" in graph["ddm.train.trainer"]
    assert "ddm.flow" in graph["ddm.sampling.solvers"]
    assert "ddm.stages.runner" in graph["ddm.stages.pipeline"]
    assert "hydra" in graph["ddm.cli"]


def test_the_core_never_reaches_the_layers_above_it(graph):
    bad = []
    for name in graph:
        if not within(name, CORE):
            continue
        via = reachable(graph, name)
        bad += [chain(via, m) for m in via if within(m, ABOVE_CORE)]
    assert not bad, "the core imports a layer above it:\n" + "\n".join(sorted(bad))


@pytest.mark.parametrize("library", sorted(ONLY_IMPORTED_BY))
def test_frameworks_are_imported_only_where_they_belong(graph, library):
    allowed = ONLY_IMPORTED_BY[library]
    bad = sorted(name for name, imported in graph.items() if library in imported and not within(name, allowed))
    assert not bad, f"{library} is imported by {bad}; only {allowed} may import it"


def test_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    cycles: list[str] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph.get(name, ())):
            if nxt not in graph:
                continue  # a third-party module
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
