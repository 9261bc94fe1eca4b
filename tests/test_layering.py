"""The modules form layers: a shared module never imports a script, nor a module of a layer above its own.

The shared modules live in the package ``gravity_flows``, one folder a layer; ``forward.py`` (the
physics) sits at the top level beside the scripts, below every folder:

    forward  ->  flows, scoring  ->  inference  ->  reporting  ->  command  ->  scripts

Every import counts, a lazy one inside a function too (``import sweep`` inside ``cli.run`` once made a
circle ``cli -> sweep -> cli`` that the module-level imports did not show). The imports are read
from the source with ``ast``, so nothing is imported or run here.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "gravity_flows"


def _dotted(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


MODULES = {_dotted(path): path for path in [*sorted(ROOT.glob("*.py")), *sorted((ROOT / PACKAGE).rglob("*.py"))]}
SCRIPTS = {name for name in MODULES if name.startswith("Gravity_") or name == "compare"}
SHARED = set(MODULES) - SCRIPTS
# The rank of each layer: a module imports modules of its own rank or below, never above.
LAYERS = {"forward": 0, "flows": 1, "scoring": 1, "inference": 2, "reporting": 3, "command": 4}


def layer(name):
    """The layer a module belongs to: ``forward``, a folder of the package, or ``script``."""
    if name in SCRIPTS:
        return "script"
    if name == PACKAGE:
        return "package"
    if name.startswith(PACKAGE + "."):
        return name.split(".")[1]
    return name


def rank(name):
    return {"script": len(LAYERS), "package": len(LAYERS)}.get(layer(name), LAYERS.get(layer(name)))


def _resolve(name):
    """The project module that an imported name refers to (``a.b.c`` may name a module or a thing in ``a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def project_imports(path):
    """The project's modules that ``path`` imports anywhere in its source (module level or inside a function)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            imported |= {_resolve(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from package.folder import module`` imports the module; ``from module import thing`` the module
            imported |= {_resolve(f"{node.module}.{alias.name}") for alias in node.names}
    return imported - {None}


def import_graph():
    return {name: project_imports(path) - {name} for name, path in MODULES.items()}


def find_circle(graph, nodes):
    """One circle of imports among ``nodes`` as a list ``[a, b, ..., a]``, or None if there is none."""
    state, path = {}, []  # state: 1 on the current path, 2 done

    def visit(node):
        state[node] = 1
        path.append(node)
        for following in sorted(graph[node] & nodes):
            if state.get(following) == 1:
                return path[path.index(following):] + [following]
            if following not in state and (circle := visit(following)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(nodes):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_the_project_has_the_modules_this_test_expects():
    assert {"forward", f"{PACKAGE}.command.cli", f"{PACKAGE}.reporting.output", f"{PACKAGE}.command.sweep",
            f"{PACKAGE}.command.runner", f"{PACKAGE}.inference.vi", f"{PACKAGE}.scoring.reference"} <= SHARED
    assert {"Gravity_MCMC", "Gravity_planar", "compare"} <= SCRIPTS
    assert {layer(name) for name in SHARED} <= set(LAYERS) | {"package"}, "a shared module outside the layers"


def test_the_root_holds_the_scripts_the_physics_and_the_comparison_only():
    root = {path.stem for path in ROOT.glob("*.py")}
    assert root == {name for name in SCRIPTS} | {"forward"}


def test_the_import_finder_sees_every_form_of_import():
    graph = import_graph()
    assert f"{PACKAGE}.flows.layers" in graph["Gravity_planar"]  # from gravity_flows.flows.layers import Planar
    assert f"{PACKAGE}.command.flow" in graph["Gravity_planar"]  # from gravity_flows.command import flow, runner
    assert "forward" in graph[f"{PACKAGE}.scoring.reference"]  # import forward


def test_no_shared_module_imports_a_script():
    graph = import_graph()
    offenders = {name: sorted(graph[name] & SCRIPTS) for name in SHARED if graph[name] & SCRIPTS}
    assert not offenders


def test_no_module_imports_a_layer_above_its_own():
    """Inference never imports reporting or the command line; nothing below the command imports it."""
    graph = import_graph()
    offenders = {name: sorted(other for other in graph[name] if rank(other) > rank(name))
                 for name in SHARED if layer(name) != "package"}
    assert not {name: above for name, above in offenders.items() if above}


def test_the_shared_modules_import_each_other_without_a_circle():
    circle = find_circle(import_graph(), SHARED)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_finder_finds_a_lazy_circle():
    graph = {"cli": {"output"}, "output": set(), "sweep": {"cli"}}
    assert find_circle(graph, set(graph)) is None
    graph["cli"].add("sweep")  # what cli.run's lazy ``import sweep`` did
    assert find_circle(graph, set(graph)) in (["cli", "sweep", "cli"], ["sweep", "cli", "sweep"])


def test_the_top_level_of_a_command_lives_above_cli_and_sweep():
    graph = import_graph()
    runner = f"{PACKAGE}.command.runner"
    assert {f"{PACKAGE}.command.cli", f"{PACKAGE}.command.sweep"} <= graph[runner]
    assert runner not in set().union(*(graph[name] for name in SHARED))  # only scripts import it
    for script in SCRIPTS:
        tree = ast.parse(MODULES[script].read_text())
        last = tree.body[-1]
        assert ast.unparse(last) == "if __name__ == '__main__':\n    runner.run(main)", script
