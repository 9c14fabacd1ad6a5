"""The shape of the package, measured: no import cycles (function-local imports
included), no function body over 80 lines, no function with more than 8 positional
parameters. A cycle or a long function is where a maintainer trips; these keep the
redesign of issue 27 from eroding. Read from the source with ``ast``: nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "fastcast"
#: The extension module: a leaf.
EXTENSION = "fastcast._core"
MAX_BODY_LINES = 80
MAX_POSITIONAL = 8


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, tree: ast.AST, known: set[str]) -> set[str]:
    """The package's modules ``tree`` imports, at any depth: ``from fastcast import x``
    is an import of ``fastcast.x`` where that is a module, else of ``fastcast``."""
    package = name if (PACKAGE / "/".join(name.split(".")[1:]) / "__init__.py").exists() else (
        name.rsplit(".", 1)[0]
    )  # fmt: skip
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                if full in known:
                    found.add(full)
                elif base in known:
                    found.add(base)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    known = set(modules()) | {EXTENSION}
    edges = {EXTENSION: set()}
    for name, path in modules().items():
        edges[name] = imports_of(name, ast.parse(path.read_text()), known)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((name, node))
    return found


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of the body, its docstring aside."""
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    assert node.end_lineno is not None
    return node.end_lineno - body[0].lineno + 1


def positional(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    names = [a.arg for a in [*node.args.posonlyargs, *node.args.args]]
    return len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_no_function_body_over_80_lines():
    long = [
        f"{m}.{f.name}: {body_lines(f)} lines"
        for m, f in functions()
        if body_lines(f) > MAX_BODY_LINES
    ]
    assert long == []


def test_no_function_with_more_than_8_positional_parameters():
    many = [
        f"{m}.{f.name}: {positional(f)}" for m, f in functions() if positional(f) > MAX_POSITIONAL
    ]
    assert many == []


# --- the checks can fail -------------------------------------------------------------


def test_a_cycle_is_found_local_imports_included():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from fastcast._batch import run\n")
    known = {"fastcast._batch.run", "fastcast._batch", "fastcast"}
    assert imports_of("fastcast._execute.ray_pool", tree, known) == {"fastcast._batch.run"}


@pytest.mark.parametrize(
    ("source", "lines", "params"),
    [
        ("def f(a, b):\n    '''doc'''\n    x = 1\n    return x\n", 2, 2),
        ("class C:\n    def m(self, a, *, b):\n        return a\n", 1, 1),
        ("def g(a, b, c, d, e, f, g, h, i, /):\n" + "    pass\n" * 90, 90, 9),
    ],
)
def test_the_measures(source, lines, params):
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef))
    assert (body_lines(node), positional(node)) == (lines, params)
