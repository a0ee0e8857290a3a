"""The package's import structure: no import circles in fewstep/, and no import from a lower layer to a higher one,
with the layers read from the table in docs/architecture.md (each layer imports only from layers listed above it).

Imports are read from the source (module level and inside functions alike: a lazy import is still a dependency);
an import of a module's parent package that Python makes implicitly is not counted. The checker itself is tested
on a small package made in a temporary folder.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_files(root: Path, package: str = "fewstep") -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `package` under `root`."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(root: Path, package: str = "fewstep") -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`import a.b`, `from a.b import c` where c may be a submodule,
    relative imports), anywhere in its source."""
    mods = module_files(root, package)

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else known(base) for a in node.names]
            graph[mod].update(t for t in targets if t and t != mod)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_table(doc: Path) -> list[tuple[str, list[str]]]:
    """(layer name, its paths) for each row of the table under '## Layers', in order (lowest layer first)."""
    text = doc.read_text()
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not line.lstrip().startswith("|") or set(cells[0]) <= {"-", " "} or cells[0] == "layer":
            continue
        paths = re.findall(r"`(fewstep/[^`]*)`", cells[1])
        if paths:
            rows.append((cells[0], paths))
    return rows


def module_layers(mods: dict[str, Path], root: Path, table) -> dict[str, int]:
    """Module -> index of its layer: the row naming its file, else the row naming its deepest folder."""
    out = {}
    for mod, path in mods.items():
        rel = path.relative_to(root).as_posix()
        best, depth = None, -1
        for i, (_, paths) in enumerate(table):
            for p in paths:
                hit = rel == p if p.endswith(".py") else rel.startswith(p.rstrip("/") + "/")
                d = len(p)
                if hit and d > depth:
                    best, depth = i, d
        if best is not None:
            out[mod] = best
    return out


def upward_imports(graph, layers, table) -> list[str]:
    return sorted(f"{a} ({table[layers[a]][0]}) imports {b} ({table[layers[b]][0]})"
                  for a, targets in graph.items() for b in targets
                  if a in layers and b in layers and layers[b] > layers[a])


# -- the checks on fewstep ---------------------------------------------------------------------------------
def test_no_import_cycles_in_the_package():
    assert import_cycles(import_graph(ROOT)) == []


def test_every_module_belongs_to_a_layer_of_the_architecture_table():
    table = layer_table(ROOT / "docs" / "architecture.md")
    assert len(table) >= 10, table  # errors/files, math, data, networks, teachers, sampling, eval, ..., CLI
    mods = module_files(ROOT)
    layers = module_layers(mods, ROOT, table)
    assert sorted(set(mods) - set(layers)) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    table = layer_table(ROOT / "docs" / "architecture.md")
    graph = import_graph(ROOT)
    assert upward_imports(graph, module_layers(module_files(ROOT), ROOT, table), table) == []


def test_the_api_is_the_entrance_of_every_command():
    """Command modules call fewstep.api (and their shared helpers), nothing below it except config types."""
    graph = import_graph(ROOT)
    allowed = {"fewstep.api", "fewstep.errors", "fewstep.commands.common", "fewstep.training.config",
               "fewstep.eval"}  # the eval group lists fewstep.eval.METRICS, the distill flags DistillConfig's fields
    for mod, targets in graph.items():
        if mod.startswith("fewstep.commands.") and mod != "fewstep.commands.common":
            extra = {t for t in targets if not t.startswith("fewstep.commands")} - allowed
            if mod == "fewstep.commands.distill":
                extra -= {"fewstep.methods"}  # the methods' own flags (sCM's --mode)
            assert not extra, f"{mod} imports {sorted(extra)}"
    assert graph["fewstep.cli"] <= {f"fewstep.commands.{m}" for m in
                                     ("common", "distill", "evaluate", "export", "pairs", "sample", "teacher")}


def test_importing_a_lower_layer_does_not_load_the_ones_above():
    """`fewstep/__init__.py` loads the API on first use, so the layers hold at run time too."""
    import subprocess
    import sys

    code = ("import sys, fewstep.diffusion, fewstep.models, fewstep.sampling\n"
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['fewstep', 'api'], ['fewstep', 'training'],"
            " ['fewstep', 'methods'], ['fewstep', 'cli'])))\n"
            "import fewstep\n"
            "assert fewstep.sample.__module__ == 'fewstep.api'\n"
            "assert fewstep.FewstepError.__module__ == 'fewstep.errors'\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"


# -- the checker itself ------------------------------------------------------------------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checker_finds_a_cycle_through_a_lazy_import(tmp_path):
    root = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import f\n",
        "pkg/b.py": "def f():\n    from pkg import a\n",  # a submodule named in `from pkg import a`
        "pkg/c.py": "import pkg.a\n",
    })
    graph = import_graph(root, "pkg")
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b"]]


def test_checker_finds_an_upward_import_and_an_unplaced_module(tmp_path):
    root = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/x.py": "from ..high import y\n",  # relative import into a higher layer
        "pkg/high.py": "from pkg.low import x\n",
        "pkg/stray.py": "",
    })
    doc = tmp_path / "arch.md"
    doc.write_text("# A\n\n## Layers\n\n| layer | package | what |\n|---|---|---|\n| low | `fewstep/low/` | x |\n"
                   "| high | `fewstep/high.py` | y |\n\n## Other\n| z | `fewstep/z.py` |\n")
    table = [(name, [p.replace("fewstep/", "pkg/") for p in paths]) for name, paths in layer_table(doc)]
    assert [name for name, _ in table] == ["low", "high"]
    mods = module_files(root, "pkg")
    layers = module_layers(mods, root, table)
    assert {m for m in mods if m not in layers} == {"pkg", "pkg.stray"}
    graph = import_graph(root, "pkg")
    assert upward_imports(graph, layers, table) == ["pkg.low.x (low) imports pkg.high (high)"]
