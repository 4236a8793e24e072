"""The kernels avoid a numba miscompile (see "A numba pitfall" in :mod:`fastseg_eval.kernels.cpu`).

In a ``while True:`` loop, a local assigned in a branch that ends in ``break`` and read later in
the loop body is compiled wrongly by numba (0.61 and 0.68 on Python 3.11): the fall-through path
sees the branch's value or a stale one. Found while writing a kernel that listed one stretch's
run starts while counting the previous stretch's (its list index was not reset). A static check
over every module of ``fastseg_eval.kernels`` keeps the pattern out; the minimal case (numba
0.68.1: ``(300, 5)`` where Python gives ``(203, 102)``) shows what it catches.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parent.parent / "fastseg_eval" / "kernels"
_SCOPES = (ast.For, ast.While, ast.FunctionDef, ast.Lambda)

def _minimal_case() -> str:
    """The minimal case as the kernels' module docstring shows it (one copy of it)."""
    doc = Path(KERNELS / "cpu.py").read_text()
    block = doc.split("numba ``(300, 5)``::\n", 1)[1].split("\n\nA loop condition", 1)[0]
    return textwrap.dedent(block)


MINIMAL = _minimal_case()


def _own_nodes(stmts: list[ast.stmt]):
    """The nodes of ``stmts`` that belong to their loop: nested loops and functions left out
    (a ``break`` there ends the nested loop)."""
    todo: list[ast.AST] = list(stmts)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, _SCOPES):
            todo.extend(ast.iter_child_nodes(node))


def hazards(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` for each local assigned in a branch that breaks out of a ``while True:``
    loop and read after that branch anywhere in the loop."""
    found = []
    for loop in ast.walk(ast.parse(source)):
        if not (isinstance(loop, ast.While) and isinstance(loop.test, ast.Constant) and loop.test.value is True):
            continue
        for node in _own_nodes(loop.body):
            if not isinstance(node, ast.If):
                continue
            for branch in (node.body, node.orelse):
                if not any(isinstance(s, ast.Break) for s in branch):
                    continue
                assigned = {
                    n.id for n in _own_nodes(branch) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
                }
                read_later = {
                    n.id
                    for n in ast.walk(loop)
                    if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.lineno > node.end_lineno
                }
                found += [(node.lineno, name) for name in sorted(assigned & read_later)]
    return found


def test_the_check_finds_the_minimal_case_and_its_variants():
    assert hazards(MINIMAL) == [(6, "kk")]
    # the branch assigning another name, a loop condition, a return: nothing to find
    assert hazards(MINIMAL.replace("            kk += 1\n            break", "            pos += 0\n            break")) == []
    assert hazards(MINIMAL.replace("while True:", "while pos <= n:")) == []
    assert hazards(MINIMAL.replace("            break", "            return out, kk")) == []
    # a break of a nested loop is that loop's
    nested = MINIMAL.replace("        if pos == n:", "        for _ in range(1):\n          if pos == n:").replace(
        "            kk += 1\n            break", "            kk += 1\n            break\n        if pos == n:\n            break"
    )
    assert hazards(nested) == []


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_no_kernel_has_the_pattern(path):
    assert hazards(path.read_text()) == [], f"{path.name}: see 'A numba pitfall' in fastseg_eval/kernels/cpu.py"
