"""The kernel fingerprint that decides a table's freshness: blind to comments, docstrings and formatting, and
sensitive to kernel code, the search space, the constraints and the device records (kernels/fingerprint.py)."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from gdn2_tune.kernels import config as kconfig
from gdn2_tune.kernels import fingerprint as fp
from gdn2_tune.kernels import spec as spec_module
from gdn2_tune.kernels.spec import SM90, known_devices
from gdn2_tune.profiles import table

JIT_FILES = table.FWD_JIT_FILES


def _copy_kernels(dst: Path) -> Path:
    dst.mkdir()
    for name in JIT_FILES:
        shutil.copy(table.KERNELS_DIR / name, dst / name)
    return dst


def _hash(root: Path) -> str:
    table.kernel_source_hash.cache_clear()
    try:
        return table.kernel_source_hash(root)
    finally:
        table.kernel_source_hash.cache_clear()


def _first_jit(path: Path) -> tuple[int, int]:
    """0-based lines of the first jit kernel's decorator and of its first body statement."""
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.decorator_list)
    return fn.decorator_list[0].lineno - 1, fn.body[0].lineno - 1


def test_comments_docstrings_and_blank_lines_leave_the_fingerprint_unchanged(tmp_path: Path) -> None:
    root = _copy_kernels(tmp_path / "k")
    before = _hash(root)
    for name in JIT_FILES:
        path = root / name
        lines = path.read_text().splitlines()
        at, body = _first_jit(path)
        # A comment above the kernel, a docstring and a comment inside its body, and blank lines.
        lines[body:body] = ['    """A docstring someone added while tidying."""', "", "    # why, not what", ""]
        lines[at:at] = ["# a comment between kernels", ""]
        path.write_text("\n".join(lines) + "\n# trailing comment\n")
    assert _hash(root) == before


def test_a_code_edit_in_a_kernel_changes_the_fingerprint(tmp_path: Path) -> None:
    root = _copy_kernels(tmp_path / "k")
    before = _hash(root)
    path = root / "state.py"
    lines = path.read_text().splitlines()
    _, body = _first_jit(path)
    lines.insert(body, "    unused = 1")
    path.write_text("\n".join(lines) + "\n")
    assert _hash(root) != before


def test_the_shipped_fingerprint_is_short_hex() -> None:
    value = table.kernel_source_hash()
    assert len(value) == fp.FINGERPRINT_CHARS and int(value, 16) >= 0


def test_a_constraint_constant_changes_the_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _hash(table.KERNELS_DIR)
    # state_shared_memory reads the limit from the device record; a different card's limit must not pass for the
    # same table.
    halved = dataclasses.replace(SM90, shared_memory_per_block=SM90.shared_memory_per_block // 2)
    monkeypatch.setitem(spec_module._KNOWN_DEVICES, "sm90", halved)
    assert _hash(table.KERNELS_DIR) != before


def test_a_space_change_changes_the_fingerprint() -> None:
    space = [(p.name, p.values) for p in kconfig.SPACE]
    files = [table.KERNELS_DIR / n for n in JIT_FILES]
    narrowed = [(name, values[:-1] if name == "chunk" else values) for name, values in space]
    assert fp.fingerprint(files, space, kconfig.CONSTRAINTS) != fp.fingerprint(files, narrowed, kconfig.CONSTRAINTS)


def test_a_params_documentation_does_not_count() -> None:
    files = [table.KERNELS_DIR / n for n in JIT_FILES]
    space = [(p.name, p.values) for p in kconfig.SPACE]
    # The constraints see SPACE (legal_values reads it); only names and values may count, never the docs.
    texts = dict(fp.constraint_sources(kconfig.CONSTRAINTS))
    assert not any("doc=" in text or "window" in text for text in texts.values())
    # The fingerprint covers the constraints and the spec's search rules (kernels/fwd_spec.py SEARCH_RULES).
    from gdn2_tune.kernels.fwd_spec import FWD

    assert FWD.fingerprinted_rules[: len(kconfig.CONSTRAINTS)] == kconfig.CONSTRAINTS
    assert fp.fingerprint(files, space, FWD.fingerprinted_rules, known_devices()) == table.kernel_source_hash()


def test_canonical_text_ignores_formatting_and_version_only_fields() -> None:
    a = fp._canonical(ast.parse("def f(x, y):\n    return (x +\n        y)  # sum\n"))
    b = fp._canonical(ast.parse("def f(x,y): return x+y"))
    assert a == b
    assert "type_params" not in a and "lineno" not in a


def test_shipped_h100_table_records_a_fingerprint_and_its_commit_is_optional() -> None:
    data = json.loads((table.PROFILES_DIR / "h100-80gb-hbm3.json").read_text())
    profile, problems = table.load_profile(table.PROFILES_DIR / "h100-80gb-hbm3.json")
    assert profile is not None and problems == []
    # Schema 1: the one fingerprint string is the forward's (the table's entries' op).
    assert data["schema_version"] == 1 and profile.kernel_hash == {"fwd": data["kernel_hash"]}
    assert profile.git_commit == data.get("git_commit", "")
