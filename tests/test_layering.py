"""The modules form layers: a shared module never imports a script, nor a module above itself.

Every import counts, a lazy one inside a function too (``import sweep`` inside ``cli.run`` made a
circle ``cli -> sweep -> cli`` that the module-level imports did not show). The imports are read
from the source with ``ast``, so nothing is imported or run here.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {path.stem: path for path in sorted(ROOT.glob("*.py"))}
SCRIPTS = {name for name in MODULES if name.startswith("Gravity_") or name == "compare"}
SHARED = set(MODULES) - SCRIPTS


def project_imports(path):
    """The project's modules that ``path`` imports anywhere in its source (module level or inside a function)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            imported |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.partition(".")[0])
    return imported & set(MODULES)


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
    assert {"cli", "output", "sweep", "runner", "forward"} <= SHARED
    assert {"Gravity_MCMC", "Gravity_planar", "compare"} <= SCRIPTS


def test_no_shared_module_imports_a_script():
    graph = import_graph()
    offenders = {name: sorted(graph[name] & SCRIPTS) for name in SHARED if graph[name] & SCRIPTS}
    assert not offenders


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
    assert {"cli", "sweep"} <= graph["runner"]
    assert "runner" not in set().union(*(graph[name] for name in SHARED))  # only scripts import it
    for script in SCRIPTS:
        tree = ast.parse(MODULES[script].read_text())
        last = tree.body[-1]
        assert ast.unparse(last) == "if __name__ == '__main__':\n    runner.run(main)", script
