"""dvc.yaml's code deps are exactly what each stage's command imports: a missing one leaves a stale result in
DVC's cache (a change to the eval transform would not rerun export), an extra one reruns for nothing."""
import ast
import re

import yaml

from tests.conftest import ROOT

PACKAGES = ("stages", "serve", "flows")


def module_file(name):
    path = ROOT / name.replace(".", "/")
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported(path):
    """Project modules `path` imports anywhere in it (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] in PACKAGES and module_file(n)}


def closure(module):
    """The .py files of `module` and of every project module it imports, transitively (files that hold no
    code, such as a package __init__ with a docstring, left out)."""
    seen, todo = set(), [module]
    while todo:
        path = module_file(todo.pop())
        if path in seen:
            continue
        seen.add(path)
        todo += imported(path)
    return {p.relative_to(ROOT).as_posix() for p in seen if not docstring_only(p)}


def docstring_only(path):
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def stage_deps():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = re.search(r"python -m ([\w.]+)", stage["cmd"]).group(1)
        listed = {d for d in stage.get("deps", []) if str(d).endswith(".py")}
        yield name, closure(module), listed


def test_every_stage_lists_exactly_the_code_it_runs():
    wrong = []
    for name, needed, listed in stage_deps():
        if needed - listed:
            wrong.append(f"{name}: dvc.yaml lacks {', '.join(sorted(needed - listed))}")
        if listed - needed:
            wrong.append(f"{name}: dvc.yaml lists {', '.join(sorted(listed - needed))}, which it does not import")
    assert not wrong, "\n".join(wrong)


def test_the_check_would_catch_a_removed_dep():
    name, needed, _ = next(stage_deps())
    assert "stages/config.py" in needed and f"stages/{name}.py" in needed
