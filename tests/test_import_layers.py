"""The package's import graph, imports inside functions counted: no circle, and every import runs downward
through the layers written here (a module may import its own layer or a lower one)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lowest first; a module belongs to the first entry that is its name or a package above it
LAYERS = [
    ("headplan.errors", "headplan.progress", "headplan.files", "headplan.lengths", "headplan.kernels",
     "headplan.calibration_data"),
    ("headplan.plan",),
    ("headplan.models", "headplan.candidates", "headplan.data"),
    ("headplan.costmodel.table",),
    ("headplan.runtime",),
    ("headplan.costmodel", "headplan.profile"),
    ("headplan.export",),
    ("headplan.search",),
    ("headplan.eval",),
    ("headplan.report", "headplan.check", "headplan.pipeline"),
    ("headplan.api",),
    ("headplan.cli", "headplan.__main__"),
]
EXACT = {"headplan": 0}  # the package face: its version; its other names load lazily, by string, on first use


def modules() -> dict[str, Path]:
    out = {}
    for base, pkg in ((ROOT / "headplan", "headplan"), (ROOT / "kernels", "headplan.kernels"),
                      (ROOT / "calibration_data", "headplan.calibration_data")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {}
    for name, f in mods.items():
        here = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                for a in node.names:
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        edges[name] = {d for d in deps if d in mods and d != name}
    return edges


def layer(name: str) -> int:
    if name in EXACT:
        return EXACT[name]
    for i, names in enumerate(LAYERS):
        if any(name == n or name.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{name}: in no layer of LAYERS")


def test_no_import_circle():
    edges = graph()
    state, stack = {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(w):] + [w]))
            if w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(edges):
        if v not in state:
            visit(v)


def test_every_import_runs_downward():
    edges = graph()
    bad = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
           for a in sorted(edges) for b in sorted(edges[a]) if layer(b) > layer(a)]
    assert not bad, "\n".join(bad)


def test_the_graph_sees_imports_inside_functions():
    """The test above must be able to fail: an import inside a function counts."""
    edges = graph()
    assert "headplan.lengths" in edges["headplan.eval.ruler"]  # imported inside a function there
    assert all(not n.startswith("headplan.") or layer(n) == 0 for n in edges["headplan.kernels.patterns"])


def test_api_holds_verbs_and_stays_small():
    src = (ROOT / "headplan" / "api.py").read_text()
    assert len(src.splitlines()) < 600
    tree = ast.parse(src)
    public = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]
    assert public and all(n.startswith("do_") for n in public), public


def test_the_list_of_kinds_is_written_once():
    """The kind names as one literal, in kernels/kinds.py; everything else imports it."""
    hits = [f.relative_to(ROOT).as_posix() for f in modules().values()
            if '"full", "streaming", "strided"' in f.read_text()]
    assert hits == ["kernels/kinds.py"], hits


def test_no_function_over_80_lines_outside_kernels():
    long = [f"{f.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for name, f in modules().items() if not name.startswith("headplan.kernels")
            for n in ast.walk(ast.parse(f.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, "\n".join(long)
