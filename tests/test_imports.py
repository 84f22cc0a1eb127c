"""The import graph of the top-level modules is a tree that can be read bottom-up:
similarity.py, losses.py -> config.py, model.py, shapes.py, distributed.py, gallery.py -> data.py -> figures.py
-> evaluate.py -> train.py, search.py.

Every import is found with `ast`, including imports inside functions and under `if __name__ == ...`.
"""
import ast
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(name[:-3] for name in os.listdir(REPO) if name.endswith(".py"))
TRAINING_CODE = {"data", "evaluate", "train"}
# Project modules each module may import (at the top of the file; nothing inside functions).
ALLOWED = {
    "similarity": set(),
    "losses": set(),
    "shapes": set(),
    "model": set(),
    "distributed": set(),
    "gallery": set(),
    "config": {"similarity", "losses"},
    "data": {"config", "shapes"},
    "figures": {"data", "model", "similarity"},
    "evaluate": {"config", "data", "figures", "model", "shapes", "similarity"},
    "train": {"config", "data", "distributed", "evaluate", "losses", "model", "similarity"},
    "search": {"data", "evaluate", "figures", "gallery", "model", "similarity"},
}


def imports_of(module):
    """[(imported top-level name, line, where)] with where in {'top', 'function', 'main'}."""
    with open(os.path.join(REPO, f"{module}.py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    found = []

    def visit(node, where):
        if isinstance(node, ast.Import):
            found.extend((alias.name.split(".")[0], node.lineno, where) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.module.split(".")[0], node.lineno, where))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, "function")
            elif where == "top" and isinstance(child, ast.If) and "__name__" in ast.unparse(child.test):
                visit(child, "main")
            else:
                visit(child, where)

    visit(tree, "top")
    return found


def project_imports(module):
    return {name for name, _, _ in imports_of(module) if name in MODULES}


def test_every_top_level_module_is_in_the_rule_table():
    assert set(MODULES) == set(ALLOWED), "add the new module to ALLOWED with the modules it may import"


def test_top_level_modules_import_no_cycle():
    graph = {module: project_imports(module) for module in MODULES}
    visiting, done = [], set()

    def walk(module):
        if module in visiting:
            raise AssertionError("import cycle: " + " -> ".join(visiting[visiting.index(module):] + [module]))
        if module in done:
            return
        visiting.append(module)
        for imported in sorted(graph[module]):
            walk(imported)
        visiting.pop()
        done.add(module)

    for module in MODULES:
        walk(module)


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_module_imports_only_the_modules_below_it(module):
    unexpected = project_imports(module) - ALLOWED[module]
    assert not unexpected, f"{module}.py imports {sorted(unexpected)}"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_no_project_import_hides_inside_a_function_or_the_main_block(module):
    hidden = [(name, line, where) for name, line, where in imports_of(module)
              if name in MODULES and where != "top"]
    assert not hidden, f"{module}.py: {hidden}"


def test_distributed_imports_only_torch():
    third_party = {name for name, _, _ in imports_of("distributed") if name not in sys.stdlib_module_names}
    assert third_party == {"torch"}
    assert not project_imports("distributed")


def test_gallery_imports_only_torch_and_numpy():
    third_party = {name for name, _, _ in imports_of("gallery") if name not in sys.stdlib_module_names}
    assert third_party == {"torch", "numpy"}
    assert not project_imports("gallery")


@pytest.mark.parametrize("module", ["similarity", "losses"])
def test_similarity_and_losses_import_only_torch(module):
    third_party = {(name, where) for name, _, where in imports_of(module)
                   if name not in sys.stdlib_module_names}
    assert {name for name, _ in third_party} <= {"torch", "scipy"}
    assert ("scipy", "top") not in third_party, "scipy only lazily, inside the function that needs it"


def test_model_shapes_and_config_import_no_training_code():
    for module in ("model", "shapes", "config"):
        assert not project_imports(module) & TRAINING_CODE, module


def test_no_top_level_module_imports_train():
    importers = [module for module in MODULES if "train" in project_imports(module)]
    assert importers == []
