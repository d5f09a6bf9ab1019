"""The one layering rule of docs/architecture.md: a module imports only from its own stage or
a stage below it, and no modules import each other in a cycle. Parsed from the source (every
``import`` / ``from ... import``, function-level ones included), so a lazy import counts."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "alignshift")

# lowest first; a module belongs to the stage of its longest listed prefix (docs/architecture.md)
STAGES = [
    ("base", ["alignshift"]),
    ("data", ["alignshift.data"]),
    ("losses", ["alignshift.losses"]),
    ("config", ["alignshift.config"]),
    ("sharding", ["alignshift.parallel"]),
    ("models", ["alignshift.models"]),
    ("forward", ["alignshift.forward"]),
    ("train", ["alignshift.train"]),
    ("eval", ["alignshift.eval"]),
    ("rewards", ["alignshift.rewards"]),
    ("experiment", ["alignshift.experiment", "alignshift.dryrun", "alignshift.cli", "alignshift.doctor"]),
]


def stage_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(STAGES):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"module {module} is in no stage: add it to STAGES and docs/architecture.md"
    return level


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(path: str, module: str, is_pkg: bool) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("alignshift"):
                out.add(name)
                out.update(f"{name}.{a.name}" for a in node.names)  # `from pkg import submodule`
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("alignshift"))
    return out


def _graph(with_packages: bool = False) -> dict[str, set[str]]:
    """Module -> the alignshift modules it imports. ``with_packages``: also every package whose
    ``__init__`` the import runs (importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__``)."""
    mods = _modules()
    graph = {}
    for m, path in mods.items():
        deps = {d for d in _imports(path, m, path.endswith("__init__.py")) if d in mods and d != m}
        if with_packages:
            deps |= {".".join(d.split(".")[:i]) for d in deps for i in range(2, d.count(".") + 1)}
        # its own packages (``from alignshift.models import hf_params`` inside alignshift.models):
        # already initialising when it runs, and they import it, not the other way round
        graph[m] = {d for d in deps if d != m and not m.startswith(d + ".")}
    return graph


def test_every_module_has_a_stage():
    for m in _modules():
        stage_of(m)


def test_no_import_points_up_a_stage():
    graph = _graph(with_packages=True)
    upward = []
    for m, deps in graph.items():
        for d in deps:
            if stage_of(d) > stage_of(m):
                upward.append(f"{m} ({STAGES[stage_of(m)][0]}) imports {d} ({STAGES[stage_of(d)][0]})")
    assert not upward, "imports pointing up the stages:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_checker_catches_an_upward_import(tmp_path):
    """The check itself can fail: a models module importing the train stage is reported."""
    src = tmp_path / "m.py"
    src.write_text("from alignshift.train.steps import init_state\n")
    deps = _imports(str(src), "alignshift.models.m", False)
    assert "alignshift.train.steps" in deps
    assert stage_of("alignshift.train.steps") > stage_of("alignshift.models.m")
