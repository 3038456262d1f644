"""The layer contract of `megatron_rlp`: imports run only downward and the graph has no cycle.

Every module is parsed with `ast` (module-level and function-local imports alike, nothing is
imported), its `megatron_rlp` imports resolved to modules, and each edge checked against
`LAYERS`, the package's data flow from the bottom up. A module may import its own layer or a
lower one; a cycle is refused even inside one layer. The planted-import tests show that the
checker reports what it should.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "megatron_rlp"

# Bottom to top. A module belongs to the layer of the longest entry that names it or a package
# above it (names relative to megatron_rlp).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("objective", "tokenizer", "utils"),  # pure tensor math; tokenizers; small helpers
    ("config",),  # typed sections and the pure rules
    ("backends", "parallel", "distributed"),  # Megatron-Core on this machine, process groups
    ("models",),  # providers, specs, Mamba layers
    ("data", "rollout", "scoring", "packing"),  # the RLP step's phases
    ("interop",),  # Megatron-LM checkpoint formats and names (its export is a tool, below)
    ("train", "checkpoint"),  # builder, update, steps, loop; checkpoints
    ("convert", "interop.megatron_lm_export", "eval"),  # tools over checkpoints
    ("startup", "plugin"),  # entry points' start-up, the Megatron-LM plugin
)


def module_sources(root: Path = ROOT / PACKAGE) -> dict[str, str]:
    """{dotted module name: source} of every module of the package under `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path.read_text()
    return out


def import_graph(sources: dict[str, str]) -> dict[str, set[tuple[str, int]]]:
    """{module: {(imported module, line)}} over the package's own modules, from every
    `import` / `from ... import` anywhere in a module (function bodies included).
    `from pkg import name` counts as an import of `pkg.name` when that is a module, else of
    `pkg`; a module importing a name resolves to the deepest module that holds it."""
    def resolve(name: str) -> str | None:
        while name and name not in sources:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[tuple[str, int]]] = {}
    for module, text in sources.items():
        is_package = any(other.startswith(module + ".") for other in sources)
        edges = set()
        for node in ast.walk(ast.parse(text)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    package = module.split(".")
                    if not is_package:
                        package = package[:-1]
                    package = package[:len(package) - node.level + 1]
                    base = ".".join(package + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in sources else base)
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    found = resolve(target)
                    if found and found != module:
                        edges.add((found, node.lineno))
        graph[module] = edges
    return graph


def layer_of(module: str, layers=LAYERS) -> int:
    """Index in `layers` of the longest entry naming `module` or a package above it."""
    rel = module.removeprefix(PACKAGE).lstrip(".")
    best, level = -1, None
    for i, names in enumerate(layers):
        for name in names:
            if (rel == name or rel.startswith(name + ".")) and len(name) > best:
                best, level = len(name), i
    if level is None:
        raise LookupError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return level


def upward_imports(graph, layers=LAYERS) -> list[str]:
    """`module:line -> target` for every import from a lower layer into a higher one."""
    return [f"{m}:{line} -> {t}" for m, edges in sorted(graph.items())
            for t, line in sorted(edges)
            if m != PACKAGE and t != PACKAGE and layer_of(t, layers) > layer_of(m, layers)]


def find_cycle(graph) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    adjacent = {m: sorted({t for t, _ in edges}) for m, edges in graph.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in adjacent.get(m, ()):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(adjacent):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_every_module_is_in_a_layer():
    for module in module_sources():
        if module != PACKAGE:
            layer_of(module)


def test_no_import_cycle():
    assert find_cycle(import_graph(module_sources())) is None


def test_imports_run_only_downward():
    assert upward_imports(import_graph(module_sources())) == []


def test_rollout_does_not_import_packing():
    """Inside the phases' layer: the rollout is handed its shared-prefix engine and prefill
    (`packing.prefill.SharedWindows.engine/.prefill`); it never imports packing/ itself."""
    graph = import_graph(module_sources())
    bad = [f"{m}:{line} -> {t}" for m, edges in sorted(graph.items())
           if m.startswith(f"{PACKAGE}.rollout") for t, line in sorted(edges)
           if t.startswith(f"{PACKAGE}.packing")]
    assert bad == []


def _planted(module: str, line: str) -> dict[str, str]:
    sources = module_sources()
    sources[module] += f"\n\ndef _planted():\n    {line}\n"
    return sources


def test_a_planted_upward_import_is_reported():
    """A function-local import of the training loop from a config module, the kind of import
    config.py used to hold, is named with its module, line and target."""
    graph = import_graph(_planted("megatron_rlp.config.run",
                                  "from megatron_rlp.train.loop import train"))
    bad = upward_imports(graph)
    assert len(bad) == 1 and bad[0].startswith("megatron_rlp.config.run:")
    assert bad[0].endswith("-> megatron_rlp.train.loop")


def test_a_planted_cycle_is_reported():
    """tasks.py imports task_space.py; an import back closes a cycle inside one layer."""
    graph = import_graph(_planted("megatron_rlp.eval.task_space",
                                  "import megatron_rlp.eval.tasks"))
    assert upward_imports(graph) == []  # same layer: allowed, but not as a cycle
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"megatron_rlp.eval.tasks", "megatron_rlp.eval.task_space"} <= set(cycle)


@pytest.mark.parametrize("line, target", [
    ("from megatron_rlp import startup", "megatron_rlp.startup"),
    ("from megatron_rlp.packing.tree import pack_branches", "megatron_rlp.packing.tree"),
    ("import megatron_rlp.eval.loading as loading", "megatron_rlp.eval.loading"),
])
def test_planted_import_forms_resolve_to_modules(line, target):
    """`from pkg import module`, `from module import name` and `import a.b as c` all resolve
    to the module imported (here upward from models/)."""
    graph = import_graph(_planted("megatron_rlp.models.masks", line))
    assert [b.split(" -> ")[1] for b in upward_imports(graph)] == [target]
