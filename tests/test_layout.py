"""The layout of issue 43, read from the source by ast: the top level holds the paper's pieces and the
stage entry points, at most 14 modules; the run machinery is in machinery/, and imports between the two
run one way only: nothing the folder imports (directly or through other modules) imports the folder back.
An import counts wherever it stands, inside a function too, but for the block under
`if __name__ == "__main__":`, which runs only when the file is the program (data.py's command), never
when machinery/ imports it."""
import ast
import os

from conftest import ROOT

FOLDER = "machinery"
# the stage entry points: they parse flags, load models and write runs, so they use the machinery
ENTRY_POINTS = {"r2rank", "evaluate", "sft", "algorithm1"}


def is_main_block(node):
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def project_modules():
    """{name: path} of every module: top level ("data"), machinery/ ("machinery.runs"), baselines/, tools/."""
    modules = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")}
    for folder in (FOLDER, "baselines", "tools"):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py") and name != "__init__.py":
                modules[f"{folder}.{name[:-3]}"] = os.path.join(ROOT, folder, name)
    return modules


def imports(path, modules):
    """The project modules the file at path imports, outside its __main__ block."""
    found = set()

    def visit(node):
        if is_main_block(node):
            return
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name in modules or name == FOLDER)
        for child in ast.iter_child_nodes(node):
            visit(child)
    with open(path) as f:
        visit(ast.parse(f.read()))
    return found


def in_folder(name):
    return name == FOLDER or name.startswith(FOLDER + ".")


def test_the_top_level_holds_at_most_14_modules():
    top = sorted(name[:-3] for name in os.listdir(ROOT) if name.endswith(".py"))
    assert len(top) <= 14, top
    assert ENTRY_POINTS <= set(top)


def test_imports_between_machinery_and_the_top_level_run_one_way():
    modules = project_modules()
    graph = {name: imports(path, modules) for name, path in modules.items()}
    # the paper's pieces at the top import nothing from the folder
    for name in sorted(n for n in modules if "." not in n and n not in ENTRY_POINTS):
        assert not [m for m in graph[name] if in_folder(m)], f"{name}.py imports {sorted(m for m in graph[name] if in_folder(m))}"
    # everything the folder reaches outside itself, at any depth, imports nothing of the folder
    reached, todo = set(), [m for name in modules if in_folder(name) for m in graph[name] if not in_folder(m)]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += [m for m in graph[name] if not in_folder(m)]
    for name in sorted(reached):
        back = sorted(m for m in graph[name] if in_folder(m))
        assert not back, f"machinery/ imports {name}, which imports the folder back ({back})"
    assert not reached & ENTRY_POINTS
    assert {"data", "rollout", "head", "protocol"} <= reached  # the rule has something to check


def test_the_rule_sees_an_import_inside_a_function_and_skips_the_main_block(tmp_path):
    path = tmp_path / "piece.py"
    path.write_text("def f():\n    from machinery import runs\n\nif __name__ == '__main__':\n    import machinery.stops\n")
    assert imports(str(path), project_modules()) == {"machinery", "machinery.runs"}
