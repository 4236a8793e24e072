"""The layering cannot rot: imports point down the layers of DESIGN.md, and nothing imports in a circle.

* import-linter checks the contracts written in pyproject.toml (``[tool.importlinter]``);
* independently of import-linter's contracts, the import graph of the package (grimp, the graph
  library import-linter is built on; module-level and function-level imports, ``if
  TYPE_CHECKING:`` imports left out) has no cycle: every strongly connected component is one module;
* every module of the package belongs to a layer named in the layers contract, so a new module
  cannot slip outside the contract (import-linter only checks the modules a contract names);
* every ``.py`` file of the package is a module the graph sees (a folder without ``__init__.py``
  would be a namespace package that grimp, and so import-linter, silently skips).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "fastseg_eval"


def _config() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f).get("tool", {}).get("importlinter", {})


def _package_modules() -> dict[str, Path]:
    """Dotted name -> file, for every ``.py`` file under the package directory."""
    out = {}
    root = REPO / PACKAGE
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        if "__pycache__" in rel.parts:
            continue
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _graph():
    grimp = pytest.importorskip("grimp")  # installed with import-linter (the test extra)
    spec = importlib.util.find_spec(PACKAGE)
    where = [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []
    assert (REPO / PACKAGE).resolve() in where, (
        f"{PACKAGE} imports from {where}, not from this checkout ({REPO}): "
        f"run the tests with the checkout first on the path (PYTHONPATH={REPO})"
    )
    return grimp.build_graph(PACKAGE, exclude_type_checking_imports=True, cache_dir=None)


# ------------------------------------------------------------------------------ import-linter
def test_import_contracts_hold():
    exe = Path(sys.executable).parent / ("lint-imports.exe" if os.name == "nt" else "lint-imports")
    assert exe.exists(), f"{exe} not found: install the test extra (import-linter)"
    assert _config().get("root_package") == PACKAGE or PACKAGE in _config().get("root_packages", []), (
        "pyproject.toml has no [tool.importlinter] section with root_package = 'fastseg_eval'"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [str(exe), "--no-cache", "pyproject.toml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"lint-imports exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


# ------------------------------------------------------------------------------------ cycles
def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit); components in reverse topological order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return out


@pytest.mark.parametrize(
    "edges, cycles",
    [
        ({}, []),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"a"}}, []),  # a self-import is not a cycle between modules
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        (
            {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c", "e"}, "e": set(), "f": {"f", "e"}},
            [["a", "b"], ["c", "d"]],
        ),
        ({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": {"a"}}, [["a", "b", "c", "d"]]),
        ({"x": {"y"}}, []),  # an edge to a node with no entry of its own
    ],
)
def test_tarjan_on_toy_graphs(edges, cycles):
    comps = strongly_connected_components(edges)
    assert sorted(c for c in comps if len(c) > 1) == cycles
    assert sorted(m for c in comps for m in c) == sorted(
        set(edges) | {w for ws in edges.values() for w in ws}
    )


def test_tarjan_on_a_long_chain_and_ring():
    n = 5000  # deeper than Python's default recursion limit
    chain = {f"m{i}": {f"m{i + 1}"} for i in range(n)}
    assert all(len(c) == 1 for c in strongly_connected_components(chain))
    ring = {**chain, f"m{n}": {"m0"}}
    assert [len(c) for c in strongly_connected_components(ring)] == [n + 1]


def test_no_import_cycles():
    g = _graph()
    modules = sorted(m for m in g.modules if m == PACKAGE or m.startswith(PACKAGE + "."))
    edges = {m: {w for w in g.find_modules_directly_imported_by(m) if w in g.modules} for m in modules}
    cycles = [c for c in strongly_connected_components(edges) if len(c) > 1]
    lines = []
    for comp in cycles:
        lines.append(f"cycle of {len(comp)} modules: {', '.join(comp)}")
        inside = set(comp)
        for m in comp:
            for w in sorted(edges[m] & inside):
                for d in g.get_import_details(importer=m, imported=w):
                    lines.append(f"    {m}:{d['line_number']} -> {w}   {d['line_contents']}")
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(lines)


def test_every_file_is_a_module_of_the_graph():
    g = _graph()
    missing = sorted(set(_package_modules()) - set(g.modules))
    assert not missing, (
        "modules the import graph does not see (a folder without __init__.py?), so no contract "
        f"covers them: {missing}"
    )


# ------------------------------------------------------------------------------------ layers
def layer_names(config: dict) -> list[str]:
    """Absolute module names of every layer of every ``layers`` contract in ``config``.

    Understands import-linter's layer syntax: ``a | b`` (independent siblings), ``a : b``
    (siblings that may import each other), ``(a)`` (optional layer), and ``containers``.
    """
    names = []
    for contract in config.get("contracts", []):
        if contract.get("type") != "layers":
            continue
        containers = contract.get("containers") or [""]
        if isinstance(containers, str):
            containers = [containers]
        for layer in contract.get("layers", []):
            for part in re.split(r"[|:]", layer):
                name = part.strip().strip("()").strip()
                if not name:
                    continue
                for c in containers:
                    names.append(f"{c}.{name}" if c else name)
    return names


def test_layer_syntax_is_understood():
    cfg = {
        "contracts": [
            {"type": "forbidden", "source_modules": ["p.x"], "forbidden_modules": ["p.y"]},
            {"type": "layers", "layers": ["p.cli | p.api", "(p.report)", "p.kernels : p.io", "p.errors"]},
            {"type": "layers", "containers": ["p.engine"], "layers": ["threads", "plan"]},
        ]
    }
    assert layer_names(cfg) == [
        "p.cli", "p.api", "p.report", "p.kernels", "p.io", "p.errors", "p.engine.threads", "p.engine.plan",
    ]  # fmt: skip


def test_every_module_belongs_to_a_layer():
    config = _config()
    layers = layer_names(config)
    assert layers, "pyproject.toml's [tool.importlinter] has no layers contract"
    outside = sorted(
        m
        for m in _package_modules()
        if m != PACKAGE and not any(m == lay or m.startswith(lay + ".") for lay in layers)
    )
    assert not outside, (
        f"modules in no layer of the import contract (add each to a layer in pyproject.toml's "
        f"[tool.importlinter]): {outside}"
    )
