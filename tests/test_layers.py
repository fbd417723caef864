"""The layers of ddm hold: a walk over every import in ddm/ (also those inside functions).

- the library core (models, flow path, ensemble, sampling, metrics and the small
  shared helpers) is plain PyTorch: nothing it imports, directly or through other
  ddm modules, reaches Lightning, Hydra, OmegaConf or the stages, training,
  launching, experiment and command-line code built on top of it;
- the data, clustering, growing and distillation libraries, and the small shared
  helpers, hold to the same rule; the launchers never reach the stages or training;
- Lightning is imported only by the training modules (``ddm.train``, and the
  distillation's ``ddm.distill.training``); Hydra only by the command line
  (``ddm.cli``) and the config composer (``ddm.config``), and OmegaConf only there
  and by the key check (``ddm.config_check``): below the door every stage and
  library function takes typed settings (``ddm.settings``), never the config object;
- ``ddm/stages/`` holds the stages and their runner, nothing else, and no stage
  imports another stage;
- no ddm module imports itself back through a cycle, and no folder of ddm does
  either (``ddm.data`` importing ``ddm.cluster`` while ``ddm.cluster`` imports ``ddm.data``).
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
    "ddm.job_names",
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
# The launchers start jobs by command line: they never run a stage or a training loop themselves.
LAUNCH = "ddm.launch"
ABOVE_LAUNCH = ("lightning", "pytorch_lightning", "hydra", "ddm.stages", "ddm.train", "ddm.experiments", "ddm.cli")
TRAINING = ("ddm.train", "ddm.distill.training")
ONLY_IMPORTED_BY = {
    "lightning": TRAINING,
    "pytorch_lightning": TRAINING,
    "hydra": ("ddm.cli", "ddm.config"),
    # the config object stays at the door: below it, stages and the library take ddm.settings.Settings
    "omegaconf": ("ddm.cli", "ddm.config", "ddm.config_check"),
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
    assert "ddm.data.shards" in graph["ddm.cluster.shard_split"]
    assert "ddm.train.modules" in graph["ddm.distill.training"]


def test_the_core_never_reaches_the_layers_above_it(graph):
    bad = []
    for name in graph:
        if not within(name, CORE):
            continue
        via = reachable(graph, name)
        bad += [chain(via, m) for m in via if within(m, ABOVE_CORE)]
    assert not bad, "the core imports a layer above it:\n" + "\n".join(sorted(bad))


def test_the_launchers_never_reach_stages_or_training(graph):
    bad = []
    for name in graph:
        if within(name, (LAUNCH,)):
            via = reachable(graph, name)
            bad += [chain(via, m) for m in via if within(m, ABOVE_LAUNCH)]
    assert not bad, "a launcher imports a stage or training:\n" + "\n".join(sorted(bad))


def test_stages_only_run(graph):
    from ddm.stages import STAGES

    stage_modules = {f"ddm.stages.{s.module}" for s in STAGES.values()}
    allowed = {"ddm.stages", "ddm.stages.runner"}
    here = {name for name in graph if within(name, ("ddm.stages",))}
    assert stage_modules <= here, "a stage in the registry has no module"
    others = sorted(here - stage_modules - allowed)
    assert not others, f"ddm/stages/ holds only the stages and their runner; move these to their layer: {others}"
    bad = sorted(
        f"{name} -> {m}"
        for name in stage_modules
        for m in graph[name]
        if within(m, ("ddm.stages",)) and m not in allowed
    )
    assert not bad, "a stage imports another stage (move what they share to its layer):\n" + "\n".join(bad)


def folder(name: str) -> str:
    """The folder (top-level package) of a ddm module: ``ddm.data.shards`` -> ``ddm.data``; ``ddm.flow`` itself."""
    return ".".join(name.split(".")[:2])


def test_no_cycles_between_folders(graph):
    folders: dict[str, set[str]] = {}
    for name, imported in graph.items():
        if name == "ddm":
            continue
        folders.setdefault(folder(name), set()).update(
            folder(m) for m in imported if m.startswith("ddm.") and folder(m) != folder(name)
        )
    bad = []
    for start in sorted(folders):
        via = reachable(folders, start)
        bad += [f"{chain(via, m)} -> {start}" for m in via if m != start and start in folders.get(m, ())]
    assert not bad, "folders import each other in a cycle:\n" + "\n".join(sorted(set(bad)))


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
