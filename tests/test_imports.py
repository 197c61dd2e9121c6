"""The import graph of `velocitune`: no cycles (lazy imports included), no upward imports, no private names
imported across modules. Read from the source with `ast`: nothing is imported, no dependency is added.

What counts as an import of module T by module M: every `import` / `from ... import` anywhere in M, at module
level or inside a function (a lazy import only hides a cycle until the function runs). `from P import a`
imports P.a when that is a module, else P. Importing T also runs the `__init__` of every package above T
that is not above M (importing `velocitune.prepare.split` from `velocitune.shards` runs
`velocitune/prepare/__init__.py`), so those packages count as imported too; the root package `velocitune`
is always initialised first and counts only when named (`from velocitune import __version__`). Imports
under `if TYPE_CHECKING:` never run: they count for the layers, not for cycles.

The layers, lowest first (a module may import its own layer and those below; tests/ and studies/ are
outside the map). Every module must be in one: a new module is placed here when it is added.

0. base: `errors`, `fileio`.
1. maths, schema and file formats: `mixing`, `peers` (the newer rules' maths), `laws`, `quota`,
   `permutation`, `sampler`, `schedule` (numpy/scipy), the typed config (`config`, a package) and the rule
   registry (`rules`), the run files (`runfiles`), the token shards and the prepared manifest (`shards`,
   `manifest`), and the root package (whose lazy attributes re-export mixing and laws).
2. the training runtime: `model`, `losses`, `evaluate`, `dist`, `dist_checkpoint`, `checkpoint`,
   `metrics`, `loggers`, `memory`, `preempt`, `smollm`, and the trainer's parts `layout`, `engine`, `overhead`,
   `announce`.
3. one run: `prepare`, `controller`, `summary`, `train`, `downstream`.
4. reading runs: `report` (tables and plots of finished run directories; it runs nothing).
5. orchestration: `targets`, `plan` (they run proxies through `train` and draw with the report), `sweep`.
6. the front: `integrations`, `demo`, `cli`, `__main__`.

So the trainer may not import the report (plots are the caller's), `shards` may not import `prepare`, and
`dist` may not import the trainer.

Private names: `from velocitune.x import _y` and `x._y` (x bound to a velocitune module) in another module
fail; dunder names (`__version__`) are public. A name used by two modules is public: drop the underscore,
give it a docstring, or move it to the module that owns the job.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("errors", "fileio")),
    ("maths, schema and file formats", ("", "mixing", "peers", "laws", "quota", "permutation", "sampler", "schedule",
                                        "config", "rules", "runfiles", "shards", "manifest")),
    ("training runtime", ("model", "losses", "evaluate", "dist", "dist_checkpoint", "checkpoint", "metrics",
                          "loggers", "memory", "preempt", "smollm", "layout", "engine", "overhead", "announce")),
    ("one run", ("prepare", "online", "controller", "summary", "train", "downstream")),
    ("reading runs", ("report",)),
    ("orchestration", ("targets", "plan", "sweep")),
    ("front", ("integrations", "demo", "cli", "__main__")),
]


# ------------------------------------------------------------------------------------------------ the checker


@dataclass(frozen=True)
class Import:
    target: str  # the module imported (dotted)
    line: int
    lazy: bool  # inside a function
    typing_only: bool  # under `if TYPE_CHECKING:`


@dataclass
class Module:
    name: str
    path: Path
    imports: list[Import] = field(default_factory=list)
    private: list[str] = field(default_factory=list)  # "path:line: what", private names taken from other modules


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_typing_guard(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, lazy: bool = False, typing_only: bool = False):
    """(node, inside a function?, under TYPE_CHECKING?) for every node below `node`."""
    for child in ast.iter_child_nodes(node):
        child_lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        child_typing = typing_only or (isinstance(node, ast.If) and _is_typing_guard(node) and child in node.body)
        yield child, child_lazy, child_typing
        yield from _walk(child, child_lazy, child_typing)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def scan_package(src: Path, package: str) -> dict[str, Module]:
    """Every module of `package` (a directory under `src`) with its imports and the private names it takes."""
    files = sorted((src / package).rglob("*.py"))
    modules = {_module_name(src, p): Module(_module_name(src, p), p) for p in files}
    for mod in modules.values():
        _scan_module(mod, modules, package, src)
    return modules


def _resolve_from(mod: Module, node: ast.ImportFrom) -> str | None:
    if node.level == 0:
        return node.module
    base = mod.name.split(".")
    is_pkg = mod.path.name == "__init__.py"
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _scan_module(mod: Module, modules: dict[str, Module], package: str, src: Path) -> None:
    tree = ast.parse(mod.path.read_text(encoding="utf-8"), filename=str(mod.path))
    where = mod.path.relative_to(src).as_posix()
    bound: dict[str, str] = {}  # local name -> the package module it is bound to

    def ours(name: str | None) -> bool:
        return bool(name) and (name == package or name.startswith(package + "."))

    nodes = list(_walk(tree))
    for node, lazy, typing_only in nodes:
        targets: list[str] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if ours(alias.name):
                    targets.append(alias.name)
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else package
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(mod, node)
            if not ours(base):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    targets.append(sub)
                    bound[alias.asname or alias.name] = sub
                else:
                    targets.append(base)
                    if _is_private(alias.name) and base != mod.name:
                        mod.private.append(f"{where}:{node.lineno}: `from {base} import {alias.name}`")
        for target in targets:
            implicit = [a for a in _ancestors(target) if a != package and a not in _ancestors(mod.name)
                        and a != mod.name]
            for t in [*implicit, target]:
                if t != mod.name:
                    mod.imports.append(Import(t, node.lineno, lazy, typing_only))
    for node, _, _ in nodes:
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = _dotted(node.value, bound, modules)
            if owner is not None and owner != mod.name:
                mod.private.append(f"{where}:{node.lineno}: `{ast.unparse(node)}` ({owner}.{node.attr})")


def _dotted(node: ast.AST, bound: dict[str, str], modules: dict[str, Module]) -> str | None:
    """The package module an expression names (`dist`, `velocitune.prepare.pipeline`), else None."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, bound, modules)
        if base is not None and f"{base}.{node.attr}" in modules:
            return f"{base}.{node.attr}"
    return None


def _describe(imp: Import) -> str:
    return f"line {imp.line}" + (", lazy" if imp.lazy else "")


def find_cycles(modules: dict[str, Module]) -> list[str]:
    """One line per import cycle (a strongly connected group of modules): a cycle through it, with lines."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for mod in modules.values():
        for imp in mod.imports:
            if not imp.typing_only and imp.target in modules:
                edges[mod.name].setdefault(imp.target, imp)
    out = []
    for group in _strongly_connected(edges):
        start = min(group)
        path = _path_back(edges, start, set(group))
        steps = [f"{a} ({_describe(edges[a][b])}) -> " for a, b in zip(path, path[1:])]
        others = sorted(set(group) - set(path))
        out.append("".join(steps) + path[-1] + (f" (the same cycle group holds {', '.join(others)})" if others else ""))
    return sorted(out)


def _strongly_connected(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm; groups of two or more modules, or one that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges[v]:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def _path_back(edges: dict[str, dict[str, Import]], start: str, group: set[str]) -> list[str]:
    """The shortest import path start -> ... -> start inside `group` (breadth first)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w in group and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def layer_of(name: str, package: str, layers: list[tuple[str, tuple[str, ...]]]) -> int | None:
    """The index of the layer whose entry names `name` or a package above it (the longest match wins)."""
    best, best_len = None, -1
    for i, (_, entries) in enumerate(layers):
        for entry in entries:
            full = f"{package}.{entry}" if entry else package  # "" is the root package alone
            if (name == full or (entry and name.startswith(full + "."))) and len(full) > best_len:
                best, best_len = i, len(full)
    return best


def upward_imports(modules: dict[str, Module], package: str,
                   layers: list[tuple[str, tuple[str, ...]]]) -> list[str]:
    """One line per import of a higher layer, and per module the layer map does not place."""
    out = []
    for mod in sorted(modules.values(), key=lambda m: m.name):
        mine = layer_of(mod.name, package, layers)
        if mine is None:
            out.append(f"{mod.name} is in no layer: add it to LAYERS in tests/test_imports.py")
            continue
        seen = set()
        for imp in mod.imports:
            theirs = layer_of(imp.target, package, layers)
            if theirs is not None and theirs > mine and imp.target not in seen:
                seen.add(imp.target)
                out.append(f"{mod.name} ({layers[mine][0]}) imports {imp.target} ({layers[theirs][0]}), "
                           f"{_describe(imp)}")
    return out


def private_imports(modules: dict[str, Module]) -> list[str]:
    return sorted(p for mod in modules.values() for p in mod.private)


# ------------------------------------------------------------------------------------------------ velocitune


def _velocitune() -> dict[str, Module]:
    return scan_package(REPO, "velocitune")


def _fail(what: str, lines: Iterable[str]) -> None:
    lines = list(lines)
    assert not lines, f"{len(lines)} {what}:\n  " + "\n  ".join(lines)


def test_no_import_cycles():
    _fail("import cycle(s) (lazy imports included)", find_cycles(_velocitune()))


def test_no_upward_imports():
    _fail("upward import(s), see the layers in tests/test_imports.py's docstring",
          upward_imports(_velocitune(), "velocitune", LAYERS))


def test_no_private_name_crosses_a_module():
    _fail("private name(s) used outside their module", private_imports(_velocitune()))


def test_the_scan_sees_velocitune_as_it_is():
    """Guards against a checker that passes because it reads nothing."""
    modules = _velocitune()
    assert {"velocitune", "velocitune.shards", "velocitune.manifest", "velocitune.prepare.split"} <= set(modules)
    shards = {imp.target for imp in modules["velocitune.shards"].imports}
    assert {"velocitune.errors", "velocitune.fileio", "velocitune.manifest"} <= shards
    pipeline = modules["velocitune.prepare.pipeline"].imports
    # `from velocitune import manifest` is the module, not the root package.
    assert "velocitune.manifest" in {i.target for i in pipeline} and "velocitune" not in {i.target for i in pipeline}
    encode = [i for i in modules["velocitune.prepare.encode"].imports if i.target == "velocitune.model"]
    assert encode and all(i.lazy for i in encode)  # vocab_fingerprint, imported inside load_tokenizer


# ------------------------------------------------------------------------------------------------ the checker itself


def _toy(tmp_path: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in {"toy/__init__.py": "", **files}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return scan_package(tmp_path, "toy")


TOY_LAYERS = [("low", ("", "base", "util")), ("mid", ("core", "sub")), ("top", ("app",))]

CLEAN = {
    "toy/base.py": "X = 1\n",
    "toy/util.py": "from toy.base import X\nimport toy.base as b\nY = b.X + X\n",
    "toy/core.py": "from toy import util\nfrom . import base\n\ndef f():\n    from toy.util import Y\n    return Y\n",
    "toy/sub/__init__.py": "from toy.sub.inner import g\n",
    "toy/sub/inner.py": "from typing import TYPE_CHECKING\nfrom toy.core import f\nif TYPE_CHECKING:\n"
                        "    from toy.app import App\n\ndef g() -> 'App':\n    return f()\n",
    "toy/app.py": "from toy.sub import g\nfrom toy import __version__\nclass App: ...\n",
}


def test_checker_passes_a_clean_package(tmp_path):
    modules = _toy(tmp_path, CLEAN)
    assert find_cycles(modules) == []
    # The TYPE_CHECKING import of toy.app is upward (it counts for layers, not for cycles).
    assert upward_imports(modules, "toy", TOY_LAYERS) == [
        "toy.sub.inner (mid) imports toy.app (top), line 4"]
    assert private_imports(modules) == []
    core = {(i.target, i.lazy) for i in modules["toy.core"].imports}
    assert core == {("toy.util", False), ("toy.base", False), ("toy.util", True)}
    # toy.app imports toy.sub's __init__ explicitly; toy.sub.inner does not count its own package.
    assert {i.target for i in modules["toy.app"].imports} == {"toy.sub", "toy"}
    assert {i.target for i in modules["toy.sub.inner"].imports} == {"toy.core", "toy.app"}


def test_checker_catches_a_cycle_and_a_lazy_one(tmp_path):
    modules = _toy(tmp_path, {**CLEAN, "toy/base.py": "from toy.util import Y\nX = 1\n"})
    assert find_cycles(modules) == ["toy.base (line 1) -> toy.util (line 1) -> toy.base"]
    lazy = {**CLEAN, "toy/base.py": "X = 1\n\ndef later():\n    import toy.core\n    return toy.core\n"}
    cycles = find_cycles(_toy(tmp_path / "lazy", lazy))
    assert cycles == ["toy.base (line 4, lazy) -> toy.core (line 2) -> toy.base (the same cycle group holds toy.util)"]


def test_checker_catches_a_cycle_through_a_package_init(tmp_path):
    """toy.base imports toy.sub.leaf (which imports nothing), but that runs toy/sub/__init__.py first, which
    imports toy.sub.inner -> toy.core -> toy.base."""
    files = {**CLEAN, "toy/base.py": "def h():\n    from toy.sub.leaf import K\n    return K\nX = 1\n",
             "toy/sub/leaf.py": "K = 3\n"}
    assert find_cycles(_toy(tmp_path, files)) == [
        "toy.base (line 2, lazy) -> toy.sub (line 1) -> toy.sub.inner (line 2) -> toy.core (line 2) -> toy.base "
        "(the same cycle group holds toy.util)"]
    # Without the package's re-export there is no cycle.
    assert find_cycles(_toy(tmp_path / "flat", {**files, "toy/sub/__init__.py": ""})) == []


def test_checker_catches_an_upward_import_and_an_unplaced_module(tmp_path):
    files = {**CLEAN, "toy/util.py": "from toy.base import X\n\ndef f():\n    from toy.core import f as g\n    return g\n",
             "toy/extra.py": "X = 2\n"}
    assert upward_imports(_toy(tmp_path, files), "toy", TOY_LAYERS) == [
        "toy.extra is in no layer: add it to LAYERS in tests/test_imports.py",
        "toy.sub.inner (mid) imports toy.app (top), line 4",
        "toy.util (low) imports toy.core (mid), line 4, lazy",
    ]


def test_checker_catches_private_names_imported_or_reached_into(tmp_path):
    files = {**CLEAN,
             "toy/base.py": "X = 1\n_Y = 2\n__version__ = '1'\n",
             "toy/core.py": "from toy.base import _Y, X\nfrom toy import base, util\nimport toy.base\n"
                            "Z = base._Y + toy.base._Y + util.Y + base.__name__.count('x')\n",
             "toy/app.py": "from toy import __version__\nfrom toy.sub import g\n"}
    assert private_imports(_toy(tmp_path, files)) == [
        "toy/core.py:1: `from toy.base import _Y`",
        "toy/core.py:4: `base._Y` (toy.base._Y)",
        "toy/core.py:4: `toy.base._Y` (toy.base._Y)",
    ]
