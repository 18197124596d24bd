"""The shape of the code a newcomer reads: layers that import one way, no import circles, no
function longer than a page, no file longer than a sitting (DESIGN.md section 1, STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500
ARGPARSE_BUILDERS = {"build_parser"}  # one add_argument per line: long, and flat
DISPATCHERS = {"wan_tune/cli.py", "wan_tune/demo.py"}  # reach data_prep lazily, as commands


def _sources(*packages: str) -> dict[str, ast.Module]:
    return {f.relative_to(ROOT).as_posix(): ast.parse(f.read_text()) for p in packages for f in sorted((ROOT / p).rglob("*.py"))}


def _module_name(rel: str) -> str:
    name = rel.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def _imports(rel: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Modules of `known` that `rel` imports anywhere (function-level imports included)."""
    name = _module_name(rel)
    package = name if rel.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in known} - {name}


def test_functions_fit_on_a_page_and_files_in_a_sitting():
    long_functions, long_files = [], []
    for rel, tree in _sources("wan_tune", "data_prep").items():
        lines = len((ROOT / rel).read_text().splitlines())
        if lines > MAX_FILE_LINES:
            long_files.append(f"{rel} ({lines} lines)")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in ARGPARSE_BUILDERS:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.lineno} {node.name} ({length} lines)")
    assert not long_functions and not long_files, long_functions + long_files


def test_wan_tune_never_imports_the_prep_stage():
    """Prep imports wan_tune; training, models, data and export never import data_prep (footage is
    read by wan_tune.media.footage, which both use). Only the commands dispatch to it."""
    sources = _sources("wan_tune", "data_prep")
    known = {_module_name(rel) for rel in sources}
    offenders = sorted(f"{rel} imports {m}" for rel, tree in sources.items() if rel.startswith("wan_tune/")
                       and rel not in DISPATCHERS for m in _imports(rel, tree, known) if m.startswith("data_prep"))
    assert not offenders, offenders


def test_no_import_circles():
    sources = _sources("wan_tune", "data_prep")
    known = {_module_name(rel) for rel in sources}
    graph = {_module_name(rel): _imports(rel, tree, known) for rel, tree in sources.items()}
    circles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not circles, circles


# Which packages of wan_tune may import which (DESIGN.md section 1): the layers read bottom-up, data
# and media under the model, the memory rungs over it, spreading over many GPUs over those, then
# the loop, the planner and export. The entry points at the root (cli, train, demo, sampling) may
# use any. `training.errors` is a leaf every stage raises from.
MAY_IMPORT = {
    "data": set(),
    "media": {"data"},
    "config": {"models"},  # the variant registry, for the cross-field checks
    "models": {"config", "data", "media"},
    "memory": {"config", "data", "models"},
    "parallel": {"config", "data", "models", "memory"},
    "training": {"config", "data", "media", "models", "memory", "parallel"},
    "plan": {"config", "data", "models", "memory", "parallel", "training"},
    "export": {"config", "data", "media", "models", "training"},
}
LEAVES = {"wan_tune.training.errors"}


def test_packages_import_only_the_layers_under_them():
    sources = _sources("wan_tune")
    known = {_module_name(rel) for rel in sources}
    assert {rel.split("/")[1] for rel in sources if rel.count("/") == 2} == set(MAY_IMPORT)  # every package has a rule
    offenders = []
    for rel, tree in sources.items():
        if rel.count("/") != 2:  # the root's entry points
            continue
        package = rel.split("/")[1]
        for m in _imports(rel, tree, known):
            other = m.split(".")[1] if m.count(".") >= 1 else ""
            if m not in LEAVES and other != package and other in MAY_IMPORT and other not in MAY_IMPORT[package]:
                offenders.append(f"{rel} imports {m}")
    assert not offenders, offenders


def test_the_root_holds_entry_points_and_packages_only():
    root = sorted(p.name for p in (ROOT / "wan_tune").glob("*.py"))
    assert root == ["__init__.py", "cli.py", "demo.py", "sampling.py", "train.py"], root
