"""The shape of the Rust crates, measured: no cycle between the top-level modules of a
crate, and no module leaning on an item of the crate root (``lib.rs`` declares modules,
re-exports and registers; it holds no code of its own that a module needs). A cycle is
where the layers (``dtype``/``error`` → ``format``/``rules``/``values`` → ``plan`` →
``exec``) stop being layers. Read from the source text: nothing is compiled or imported.

A file's module path is its path under ``src/`` (``foo.rs`` and ``foo/mod.rs`` are
``crate::foo``); a reference is any ``crate::``/``super::``/``self::`` path, in ``use``
trees or in code, resolved against the module it is written in. Test code (``tests.rs``,
``tests/``, ``#[cfg(test)]`` items) is left out. A module using its children, or a child
using its ancestors, is not a cycle: only the top-level modules of a crate are compared.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

RUST = Path(__file__).resolve().parent.parent / "rust"
CRATES = sorted(p.parent for p in RUST.glob("*/src"))

Module = tuple[str, ...]
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


RAW_STRING = re.compile(r'\b(?:b|c)?r(#*)"')
CHAR = re.compile(r"'(?:\\u\{[0-9a-fA-F]+\}|\\x..|\\.|[^\\'])'")
SPECIAL = re.compile(r'//|/\*|"|\'|\b(?:b|c)?r#*"')


def strip(source: str) -> str:
    """`source` with comments, string and char literals blanked (same length, newlines
    kept), so that a path in a doc comment or a message is not taken for a reference."""
    out = []
    i, n = 0, len(source)
    while m := SPECIAL.search(source, i):
        out.append(source[i : m.start()])
        i, token = m.start(), m.group(0)
        if token == "//":
            j = source.find("\n", i)
            j = n if j < 0 else j
        elif token == "/*":
            depth, j = 1, i + 2
            while j < n and depth:
                if source.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif source.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
        elif raw := RAW_STRING.match(source, i):
            close = '"' + raw.group(1)
            j = source.find(close, raw.end())
            j = n if j < 0 else j + len(close)
        elif token == '"':
            j = i + 1
            while j < n and source[j] != '"':
                j += 2 if source[j] == "\\" else 1
            j += 1
        elif char := CHAR.match(source, i):
            j = char.end()
        else:  # a lifetime ('a): kept
            out.append(token)
            i += len(token)
            continue
        out.append(re.sub(r"[^\n]", " ", source[i:j]))
        i = j
    out.append(source[i:])
    return "".join(out)


def block_end(text: str, i: int) -> int:
    """The end of the item starting at `i`: past its `;`, or past the `}` matching
    its first `{` (a `;` inside brackets, as in `[u8; 4]`, ends nothing)."""
    braces = brackets = 0
    for j in range(i, len(text)):
        c = text[j]
        if c in "([":
            brackets += 1
        elif c in ")]":
            brackets -= 1
        elif c == "{":
            braces += 1
        elif c == "}":
            braces -= 1
            if braces == 0:
                return j + 1
        elif c == ";" and braces == 0 and brackets == 0:
            return j + 1
    return len(text)


#: `#[cfg(test)]`, `#[cfg(all(test, ...))]`: an item compiled for tests only.
CFG_TEST = re.compile(r"#\s*\[\s*cfg\s*\(\s*(?:all\s*\(\s*)?test\b[^\]]*\]")


#: `mod name;` (after attributes and a visibility): a module in a file of its own.
MOD_DECL = re.compile(rf"\s*(?:#\s*\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+({IDENT})\s*;")


def without_tests(text: str) -> tuple[str, set[str]]:
    """`text` (stripped) without its `#[cfg(test)]` items, and the names of the
    file modules (`mod x;`) those items declare."""
    test_mods = set()
    while m := CFG_TEST.search(text):
        item = text[m.end() :]
        if decl := MOD_DECL.match(item):
            test_mods.add(decl.group(1))
        end = block_end(text, m.end())
        text = text[: m.start()] + re.sub(r"[^\n]", " ", text[m.start() : end]) + text[end:]
    return text, test_mods


def use_paths(tree: str) -> list[list[str]]:
    """Every path of a `use` tree (`a::{b, c::{d as e, self}}`), as segments."""
    tokens = re.findall(rf"{IDENT}|[{{}},]", tree)
    pos = 0

    def parse(prefix: list[str]) -> list[list[str]]:
        nonlocal pos
        paths: list[list[str]] = []
        path: list[str] | None = list(prefix)
        named = False  # whether `path` names something (`self` names the prefix)
        while pos < len(tokens):
            tok = tokens[pos]
            pos += 1
            if tok == "{":
                paths += parse(path or [])
                path = None
            elif tok in (",", "}"):
                if path is not None and named:
                    paths.append(path)
                if tok == "}":
                    return paths
                path, named = list(prefix), False
            elif tok == "as":
                pos += 1  # the alias names nothing new
            elif path is not None:
                path = path if tok == "self" else [*path, tok]
                named = True
        if path is not None and named:
            paths.append(path)
        return paths

    return parse([])


def references(text: str) -> list[tuple[int, list[str]]]:
    """`(offset, segments)` of every path in `text` that starts at `crate`, `super` or
    `self`: the paths of each `use` tree, then the paths written in code."""
    found = []
    for m in re.finditer(r"\buse\s+([^;]*);", text):
        found += [(m.start(), p) for p in use_paths(m.group(1))]
    code = re.sub(r"\buse\s+[^;]*;", lambda m: " " * len(m.group(0)), text)
    for m in re.finditer(rf"\b(?:crate|super|self)(?:\s*::\s*{IDENT})+", code):
        found.append((m.start(), re.findall(IDENT, m.group(0))))
    return [(at, p) for at, p in found if p and p[0] in ("crate", "super", "self")]


def inline_modules(text: str) -> list[tuple[int, int, str]]:
    """`(start, end, name)` of each `mod name { ... }` written inside a file."""
    return [
        (m.start(), block_end(text, m.start()), m.group(1))
        for m in re.finditer(rf"\bmod\s+({IDENT})\s*\{{", text)
    ]


def module_of(rel: str) -> Module | None:
    """The module a file (path under `src/`) defines; None for the crate root's
    siblings that are no module (a `bin/`) and for test files."""
    parts = rel.removesuffix(".rs").split("/")
    if parts[-1] in ("lib", "main") and len(parts) == 1:
        return ()
    if parts[-1] == "mod":
        parts.pop()
    if "tests" in parts:
        return None
    return tuple(parts)


def resolve(path: list[str], here: Module) -> Module:
    """`path` (starting at `crate`, `super` or `self`) as an absolute path."""
    if path[0] == "crate":
        return tuple(path[1:])
    at = list(here)
    rest = path
    while rest and rest[0] in ("super", "self"):
        if rest[0] == "super":
            at = at[:-1]
        rest = rest[1:]
    return (*at, *rest)


def graph(files: dict[str, str]) -> tuple[dict[str, set[str]], list[str]]:
    """For one crate (`files`: path under `src/` → source), the top-level modules
    each top-level module refers to, and the references to the crate root's own
    items (not modules, not re-exports), as `"file: crate::item"`."""
    stripped = {}
    test_files: set[Module] = set()
    for rel, source in files.items():
        here = module_of(rel)
        if here is None:
            continue
        text, test_mods = without_tests(strip(source))
        stripped[rel] = (here, text)
        test_files |= {(*here, name) for name in test_mods}
    modules = {here for here, _ in stripped.values()}
    top = {m[0] for m in modules if m and m[:1] not in test_files}
    root = next((text for here, text in stripped.values() if here == ()), "")
    # Names the root re-exports (`pub use a::b::C;`): `crate::C` is `crate::a::b::C`.
    reexports = {}
    for m in re.finditer(r"\bpub\s+use\s+([^;]*);", root):
        for p in use_paths(m.group(1)):
            reexports[p[-1]] = tuple(p[1:] if p[0] == "crate" else p)
    root_items = set(re.findall(rf"\b(?:fn|struct|enum|const|static|type|trait)\s+({IDENT})", root))
    edges: dict[str, set[str]] = {t: set() for t in top}
    root_uses = []
    for rel, (here, text) in sorted(stripped.items()):
        if here == () or any(here[: len(t)] == t for t in test_files):
            continue
        inline = inline_modules(text)
        for at, path in references(text):
            inner = [name for start, end, name in inline if start < at < end]
            target = resolve(path, (*here, *inner))
            if not target:
                continue
            if target[0] not in top and target[0] in reexports:
                target = (*reexports[target[0]], *target[1:])
            if target[0] in top:
                if target[0] != here[0]:
                    edges[here[0]].add(target[0])
            elif target[0] in root_items:
                root_uses.append(f"{rel}: crate::{target[0]}")
    return edges, sorted(set(root_uses))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(groups)


def describe(edges: dict[str, set[str]], group: list[str]) -> str:
    """A cycle in words: each module of `group` and what of the group it uses."""
    return "; ".join(f"{m} -> {', '.join(sorted(edges[m] & set(group)))}" for m in group)


def crate_files(crate: Path) -> dict[str, str]:
    src = crate / "src"
    return {p.relative_to(src).as_posix(): p.read_text() for p in sorted(src.rglob("*.rs"))}


@pytest.mark.parametrize("crate", CRATES, ids=[c.name for c in CRATES])
def test_top_level_modules_form_no_cycle(crate: Path) -> None:
    edges, _ = graph(crate_files(crate))
    found = cycles(edges)
    assert not found, f"{crate.name}: module cycles: " + " | ".join(
        describe(edges, g) for g in found
    )


@pytest.mark.parametrize("crate", CRATES, ids=[c.name for c in CRATES])
def test_no_module_uses_an_item_of_the_crate_root(crate: Path) -> None:
    _, root_uses = graph(crate_files(crate))
    assert not root_uses, f"{crate.name}: lib.rs items used by its modules: {root_uses}"


def test_there_are_crates_to_check() -> None:
    assert {c.name for c in CRATES} >= {"fastcast-core", "fastcast-py"}


# The checker, on synthetic crates.

PLANTED = {
    "lib.rs": "pub mod a;\npub mod b;\npub mod c;\n",
    "a.rs": "use crate::b::Thing;\n",
    "b/mod.rs": "mod inner;\npub struct Thing;\n",
    "b/inner.rs": "use super::super::a::Other; // b uses a through its child\n",
    "c.rs": "use crate::a::Other;\n",
}


def test_the_checker_finds_a_planted_cycle() -> None:
    edges, _ = graph(PLANTED)
    assert edges == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(edges) == [["a", "b"]]
    assert describe(edges, ["a", "b"]) == "a -> b; b -> a"


def test_parents_and_children_are_no_cycle() -> None:
    files = {
        "lib.rs": "pub mod exec;\npub mod plan;\n",
        "exec/mod.rs": "mod input;\nuse crate::plan::Plan;\nuse input::Input;\n",
        "exec/input.rs": "use super::Job;\nuse crate::exec::Progress;\n",
        "plan/mod.rs": "pub struct Plan;\n",
    }
    edges, _ = graph(files)
    assert edges == {"exec": {"plan"}, "plan": set()}
    assert cycles(edges) == []


def test_use_trees_reexports_code_paths_and_what_is_ignored() -> None:
    files = {
        "lib.rs": (
            "pub mod a;\npub mod b;\npub mod c;\npub mod d;\n"
            "pub use d::{Error, Result as R};\n"
            "fn helper() {}\n"
        ),
        "a.rs": (
            "use crate::{b::{self, X}, c::Y as Z};\n"
            'fn f() -> crate::Error { let s = "crate::d::nope"; crate::helper() }\n'
        ),
        "b.rs": "/// See [`crate::a`].\n// crate::a::f\nfn g() { let c = '\"'; }\n",
        "c.rs": "#[cfg(test)]\nmod tests {\n    use crate::a::f;\n}\n",
        "d.rs": (
            "#[cfg(test)]\nuse crate::a::f;\nmod e { use super::super::c::Y; }\n"
            "#[cfg(all(test, unix))]\nfn t() -> [u8; 4] { crate::a::f() }\n"
        ),
        "a/tests.rs": "use crate::d::Error;\n",
    }
    edges, root_uses = graph(files)
    assert edges == {"a": {"b", "c", "d"}, "b": set(), "c": set(), "d": {"c"}}
    assert root_uses == ["a.rs: crate::helper"]


def test_use_paths_expand_groups() -> None:
    assert use_paths("crate::{a::{self, B}, c::D as E, f::*}") == [
        ["crate", "a"],
        ["crate", "a", "B"],
        ["crate", "c", "D"],
        ["crate", "f"],
    ]
