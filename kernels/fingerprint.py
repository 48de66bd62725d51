"""A kernel fingerprint that changes only when something deciding legality or speed changes.

A table records the fingerprint of the kernels it was tuned against. It covers:
- every ``@triton.jit`` function of the op's kernel modules, as its syntax tree: comments, docstrings, blank
  lines and formatting do not count, so tidying a kernel file leaves a table fresh;
- the search space (each parameter's name and legal values);
- the constraints: each constraint function's syntax tree, with every module-level function it calls and
  every constant it reads (name and value), followed transitively;
- the device records the constraints take (per architecture family: shared memory per block, ...).

The tree is written out by :func:`_canonical`, not ``ast.dump`` or ``ast.unparse``: both print differently
across Python versions (3.12 adds ``type_params``, 3.13 drops empty fields), and a table tuned under the GPU
machine's Python must read as fresh under the CI machine's.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
import types
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

FINGERPRINT_CHARS = 16
# Fields that carry no meaning for what the code computes, or that exist in some Python versions only.
_IGNORED_FIELDS = frozenset({"ctx", "type_comment", "type_params", "kind"})
_CONSTANT_TYPES = (int, float, str, bool, tuple, frozenset, type(None))


def _is_constant(value: Any) -> bool:
    """A plain value (a limit, a tuple of legal values); records such as the space's Params (whose docs would
    count) are hashed through their own field instead."""
    if isinstance(value, (tuple, frozenset)):
        return all(_is_constant(item) for item in value)
    return isinstance(value, _CONSTANT_TYPES)


def _is_bare_string(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Drop every statement that is a bare string (docstrings, and strings used as block comments): no-ops."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list) and any(isinstance(s, ast.stmt) and _is_bare_string(s) for s in block):
                setattr(node, field, [s for s in block if not _is_bare_string(s)] or [ast.Pass()])
    return tree


def _canonical(node: Any) -> str:
    """A version-independent text of a syntax tree: node types and non-empty fields, no positions."""
    if isinstance(node, ast.AST):
        fields = []
        for name, value in ast.iter_fields(node):
            if name in _IGNORED_FIELDS or value is None or value == []:
                continue
            fields.append(f"{name}={_canonical(value)}")
        return f"{type(node).__name__}(" + ",".join(fields) + ")"
    if isinstance(node, list):
        return "[" + ",".join(_canonical(item) for item in node) + "]"
    return repr(node)


def _function_tree(fn: Callable[..., Any]) -> ast.AST:
    return _strip_docstrings(ast.parse(textwrap.dedent(inspect.getsource(fn))))


def _is_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
    return name == "jit"


def jit_sources(path: Path) -> list[tuple[str, str]]:
    """(name, canonical tree) of each ``@triton.jit`` function defined at the top level of a source file."""
    tree = _strip_docstrings(ast.parse(Path(path).read_text()))
    return [
        (node.name, _canonical(node))
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list)
    ]


def constraint_sources(constraints: Iterable[Callable[..., Any]]) -> list[tuple[str, str]]:
    """(name, canonical text) of each constraint, of the module-level functions it calls and the constants it
    reads, transitively: a changed limit (say the shared-memory bound) changes the fingerprint."""
    seen: dict[str, str] = {}
    pending = list(constraints)
    while pending:
        fn = pending.pop()
        key = f"{fn.__module__}.{fn.__qualname__}"
        if key in seen:
            continue
        tree = _function_tree(fn)
        seen[key] = _canonical(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Name):
                continue
            # A cached helper (functools.lru_cache) is followed into the function it wraps.
            value = getattr(fn.__globals__.get(node.id), "__wrapped__", fn.__globals__.get(node.id))
            if isinstance(value, types.FunctionType) and value.__module__ == fn.__module__:
                pending.append(value)
            elif isinstance(value, tuple) and any(isinstance(item, types.FunctionType) for item in value):
                pending.extend(item for item in value if isinstance(item, types.FunctionType))
            elif node.id.isupper() and _is_constant(value):
                seen.setdefault(f"{fn.__module__}.{node.id}", repr(value))
    return sorted(seen.items())


def fingerprint(
    jit_files: Sequence[Path],
    space: Sequence[tuple[str, Sequence[Any]]],
    constraints: Iterable[Callable[..., Any]],
    devices: Iterable[Any] = (),
) -> str:
    """Short sha256 of what decides which configs are legal and how fast they run (see the module docstring)."""
    digest = hashlib.sha256()

    def add(*parts: str) -> None:
        for part in parts:
            digest.update(part.encode() + b"\0")

    for path in jit_files:
        for name, text in jit_sources(path):
            # The file name goes in too: moving a kernel between files moves it between ops' fingerprints.
            add("jit", Path(path).name, name, text)
    for name, values in space:
        add("param", name, repr(tuple(values)))
    for name, text in constraint_sources(constraints):
        add("constraint", name, text)
    # The device records the constraints read their limits from (kernels.spec.DeviceLimits: frozen, plain fields):
    # a changed shared-memory figure changes which configs are legal.
    for device in devices:
        add("device", repr(device))
    return digest.hexdigest()[:FINGERPRINT_CHARS]
