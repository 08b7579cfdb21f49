"""The layout, read from the source by ast: every module short enough to read in one sitting, r2rank.py
and what it imports when it starts small enough to read top to bottom, the whole project within a line
budget, and no import cycles among the top-level modules.

Lines are non-blank lines. Imports are those that run when a module is imported: an import inside a function
runs only when that function does (r2rank.main's import of the stage it runs, an optional package), and the
block under `if __name__ == "__main__":` only when the file is the program (data.py's command), so neither
counts. "What r2rank.py imports when it starts" follows them through the project's modules."""
import ast
import os

from conftest import ROOT

MODULE_LINES, R2RANK_LINES = 400, 600
R2RANK_CLOSURE_LINES, R2RANK_CLOSURE_FILES = 1600, 8
PROJECT_LINES = 4500
FOLDERS = ("baselines", "tools")


def python_files():
    """{module name: path} of every .py outside tests/: top level ("data") and in folders ("tools.report")."""
    found = {}
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith((".", "__")) and d != "tests"
                               and not os.path.isfile(os.path.join(folder, d, "pyvenv.cfg")))  # a virtual environment
        for name in files:
            if name.endswith(".py") and name != "__init__.py":
                relative = os.path.relpath(os.path.join(folder, name), ROOT)
                found[relative[:-3].replace(os.sep, ".")] = os.path.join(folder, name)
    return found


def lines(path):
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def is_main_block(node):
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def imports(path, modules):
    """The project modules the file at path imports when it is imported: not in a function, not in its __main__ block."""
    found = set()

    def visit(node):
        if is_main_block(node) or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name in modules)
        for child in ast.iter_child_nodes(node):
            visit(child)
    with open(path) as f:
        visit(ast.parse(f.read()))
    return found


def test_every_module_is_short_enough_to_read_in_one_sitting():
    modules = python_files()
    assert "r2rank" in modules and "ppo" in modules and not any(name.startswith("tests.") for name in modules)
    too_long = {name: lines(path) for name, path in modules.items()
                if lines(path) > (R2RANK_LINES if name == "r2rank" else MODULE_LINES)}
    assert not too_long, f"over {MODULE_LINES} non-blank lines (r2rank.py: {R2RANK_LINES}): {too_long}"


def test_r2rank_and_what_it_imports_at_start_are_small():
    modules = python_files()
    reached, todo = set(), ["r2rank"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += imports(modules[name], modules)
    sizes = {name: lines(modules[name]) for name in sorted(reached)}
    assert len(sizes) <= R2RANK_CLOSURE_FILES and sum(sizes.values()) <= R2RANK_CLOSURE_LINES, sizes
    assert {"r2rank", "ppo", "plackett_luce", "data"} <= reached  # the rule has something to count


def test_the_project_stays_within_its_line_budget():
    sizes = {name: lines(path) for name, path in python_files().items()}
    total = sum(sizes.values())
    assert total <= PROJECT_LINES, f"{total} non-blank lines; the largest: {sorted(sizes.items(), key=lambda kv: -kv[1])[:8]}"


def test_no_import_cycles_among_the_top_level_modules():
    modules = python_files()
    top = {name: path for name, path in modules.items() if "." not in name}
    graph = {name: sorted(m for m in imports(path, top)) for name, path in top.items()}
    state, cycles = {}, []

    def visit(name, path):  # depth-first; a module met again while on the path closes a cycle
        state[name] = "open"
        for other in graph[name]:
            if state.get(other) == "open":
                cycles.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other, path + [other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, " ; ".join(" -> ".join(cycle) for cycle in cycles)
    assert sum(map(len, graph.values())) > 10  # the rule has edges to check


def test_the_rules_see_an_import_inside_a_function_and_skip_the_main_block(tmp_path):
    path = tmp_path / "piece.py"
    path.write_text("import ppo\nfrom metrics import ndcg_at_k\n\n\ndef f():\n    import sft\n    from tools import report\n\n\n"
                    "if __name__ == '__main__':\n    import datasets\n")
    modules = {"ppo": "", "metrics": "", "sft": "", "tools": "", "tools.report": "", "datasets": ""}
    assert imports(str(path), modules) == {"ppo", "metrics"}
    path.write_text("import sft\nfrom tools import report\n")
    assert imports(str(path), modules) == {"sft", "tools", "tools.report"}  # the same lines at module level count
