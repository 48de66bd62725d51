"""Per-op specifications (kernels/spec.py, issue 10 §1): the generic code never names an op's config type, a toy op
registered through a spec runs through `tune --interpret`, `show`, `report` and the dispatcher, and the forward's
move onto a spec changed nothing a shipped table serves."""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import os
import re
import warnings
from pathlib import Path

import pytest

from gdn2_tune.kernels.config import LATER_FIELDS, SPACE, FwdConfig, Shape
from gdn2_tune.kernels.spec import SM90, DeviceLimits, device_limits, get_spec, registered
from gdn2_tune.profiles import dispatch, table
from gdn2_tune.tuner import cli

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
GENERIC = ("tuner", "profiles", "reports")
OP_NAMES = re.compile(r"\b(FwdConfig|IntraConfig|StateConfig)\b")
SPACE_IMPORT = re.compile(r"from\s+gdn2_tune\.kernels\.config\s+import\s+\(?[^)]*?\bSPACE\b", re.DOTALL)


# ---------------------------------------------------------------------------------------------------------------
# The generic code takes a spec


@pytest.mark.parametrize("package", GENERIC)
def test_generic_code_never_names_an_ops_config_type_or_space(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no modules under {package}/"
    offenders = []
    for path in files:
        text = path.read_text()
        offenders += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in OP_NAMES.finditer(text)]
        offenders += [f"{path.relative_to(REPO)}: imports kernels.config.SPACE" for _ in SPACE_IMPORT.finditer(text)]
        if re.search(r"kernels\.config\.SPACE|config\.SPACE\b", text):
            offenders.append(f"{path.relative_to(REPO)}: kernels.config.SPACE")
    assert not offenders, offenders


def test_the_grep_sees_what_it_forbids(tmp_path: Path) -> None:
    # Guard the guard: the patterns above match the forms the generic code used before specs.
    assert OP_NAMES.search("config=FwdConfig.from_flat(p)")
    assert SPACE_IMPORT.search("from gdn2_tune.kernels.config import (\n    CONSTRAINTS,\n    SPACE,\n)")
    assert not SPACE_IMPORT.search("from gdn2_tune.kernels.config import Param, Shape")


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function (a lazy import counts too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


# Data flows one way (issue 10 §2): the folder on the left never imports the packages on the right.
FORBIDDEN_IMPORTS = {
    "kernels": ("gdn2_tune.profiles", "gdn2_tune.tuner", "gdn2_tune.reports"),
    "reports": ("gdn2_tune.tuner",),
}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN_IMPORTS))
def test_data_flows_one_way(folder: str) -> None:
    offenders = []
    for path in sorted((REPO / folder).glob("*.py")):
        for module in sorted(_imported_modules(path)):
            bad = [p for p in FORBIDDEN_IMPORTS[folder] if module == p or module.startswith(p + ".")]
            offenders += [f"{folder}/{path.name} imports {module}" for _ in bad]
    assert not offenders, offenders


def test_the_import_scan_sees_lazy_and_from_imports(tmp_path: Path) -> None:
    # Guard the guard: the form kernels/chunk.py used before (a lazy import inside the op) is caught.
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from gdn2_tune.profiles.dispatch import select_config\n    import gdn2_tune.tuner\n")
    assert {"gdn2_tune.profiles.dispatch", "gdn2_tune.tuner"} <= _imported_modules(path)


def test_the_forward_is_registered_first() -> None:
    fwd = registered()[0]
    assert fwd.name == "fwd" and fwd.config_type is FwdConfig and fwd.space == SPACE
    assert fwd.stages == ("intra", "state")
    assert get_spec("fwd") is fwd


def test_an_unknown_op_names_the_argument_and_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"op: expected one of \[.*'fwd'.*\], received 'nope'"):
        get_spec("nope")


def test_device_limits_of_an_unknown_family_keep_sm90s_figures_under_its_own_name() -> None:
    assert device_limits(None) == SM90 and device_limits("sm90") == SM90
    other = device_limits("sm100")
    assert other == DeviceLimits("sm100", SM90.shared_memory_per_block)


def test_the_shared_memory_limit_comes_from_the_device() -> None:
    fwd = get_spec("fwd")
    shape = Shape(1, 64, 1, 128, 128, "bf16")
    cfg = FwdConfig()  # its state stage stages ~99 KiB per block at K=128
    assert fwd.infeasibility(cfg, shape, SM90) is None
    small = DeviceLimits("sm90", 64 * 1024)
    assert "shared memory" in (fwd.infeasibility(cfg, shape, small) or "")


# ---------------------------------------------------------------------------------------------------------------
# Compatibility: what the forward served before it moved onto a spec


def _served_before() -> dict:
    return json.loads((DATA / "dispatch_before_spec.json").read_text())


# The H100 table is the file the spec refactor had to keep serving unchanged; the H200 table has been re-tuned since
# (tests/test_dispatch.py checks that it serves its own forward entries).
@pytest.mark.parametrize("name", ["h100-80gb-hbm3.json"])
def test_shipped_tables_load_as_before_and_serve_the_same_config_at_every_key(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _served_before()["tables"][name]
    path = REPO / "profiles" / name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        profile, problems = table.load_profile(path)
    assert profile is not None
    assert problems == before["problems"] and [str(w.message) for w in caught] == before["warnings"]
    assert sorted(e.key for e in profile.entries) == sorted(before["served"])

    monkeypatch.setenv(dispatch.ENV_PROFILE, str(path))
    monkeypatch.delenv(dispatch.ENV_CONFIG, raising=False)
    monkeypatch.setattr(dispatch, "_running_device", lambda: None)
    dispatch.clear_cache()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for entry in profile.entries:
                choice = dispatch.explain(entry.shape)
                want = before["served"][entry.key]
                assert choice.config.to_dict() == want["config"], entry.key
                assert (choice.source, choice.key) == (want["source"], want["key"]), entry.key
        # The one stale warning of today, with today's fingerprint in it (the old one is in the fixture).
        messages = sorted({str(w.message) for w in caught})
        assert len(messages) == len(before["dispatch_warnings"]) == 1, messages
        assert "stale" in messages[0]
    finally:
        dispatch.clear_cache()


# The parameters no constraint reads except legal_values take two fixed combinations (the fixture's "free"), so
# that the product of the others can be enumerated here in seconds per shape.
FEASIBLE_SHAPES = ["B1-T40-H1-K32-V32-fp32", "B16-T2048-H8-K256-V256-bf16", "B2-T100-H3-K48-V80-fp16"]


@pytest.mark.parametrize("label", FEASIBLE_SHAPES)
def test_sm90_admits_exactly_the_feasible_set_of_before_the_device_took_part(label: str) -> None:
    fixture = json.loads((DATA / "fwd_feasible_before_spec.json").read_text())
    record = next(r for r in fixture["shapes"] if Shape(**r["shape"]).label() == label)
    shape = Shape(**record["shape"])
    fwd = get_spec("fwd")
    free = set(fixture["free"][0])
    # Parameters added after the fixture was recorded stay at the value every config of that time ran.
    later = {f"{stage}.{name}": value for stage, fields in LATER_FIELDS.items() for name, value in fields.items()}
    grid = [p for p in fwd.space if p.name not in free and p.name not in later]
    feasible = []
    for variant in fixture["free"]:
        for values in itertools.product(*(p.values for p in grid)):
            cfg = fwd.from_flat(dict(zip((p.name for p in grid), values)) | variant | later)
            if fwd.infeasibility(cfg, shape, SM90) is None:
                feasible.append(cfg.label())
    feasible.sort()
    assert len(feasible) == record["count"]
    assert hashlib.sha256("\n".join(feasible).encode()).hexdigest() == record["sha256"]


# ---------------------------------------------------------------------------------------------------------------
# A toy op through the whole toolkit, with no change to tuner/, profiles/ or reports/


def test_a_toy_op_tunes_shows_reports_and_dispatches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import toy_op  # registers "toy" in this process; the workers import it by name (KernelSpec.module)

    spec = get_spec("toy")
    assert spec is toy_op.TOY and spec.module == "toy_op"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv(dispatch.ENV_PROFILE, raising=False)
    monkeypatch.delenv(dispatch.ENV_CONFIG, raising=False)
    out = tmp_path / "toy.json"

    code = cli.main(["tune", "--op", "toy", "--interpret", "--no-progress", "--trials", "4",
                     "--run-dir", str(tmp_path / "run"), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    profile, problems = table.load_profile(out)
    assert profile is not None and not problems, problems
    (entry,) = profile.entries
    assert entry.key == table.entry_key("toy", toy_op.TOY_SHAPE) and entry.key.startswith("toy/")
    assert isinstance(entry.config, toy_op.ToyConfig) and set(entry.stage_ms) == {"copy"}
    assert entry.trials == 4 and entry.speedup > 0
    assert spec.infeasibility(entry.config, entry.shape) is None
    # Recorded against the toy's own fingerprint, so the table is fresh but for nothing.
    assert profile.kernel_hash == {"toy": spec.fingerprint()} and not table.staleness(profile)
    # The constraint pruned something: BLOCK=32 with 2 or 4 warps is never compiled.
    assert all(not (t.params.get("BLOCK") == 32 and t.params.get("num_warps", 1) > 1)
               for t in profile.trials if t.state == "COMPLETE")

    assert cli.main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert entry.key in shown and entry.config.label() in shown and "suite coverage: 1/1" in shown

    assert cli.main(["report", "--profile", str(out), "--view", "shape", "--shape", entry.key, "--width", "120"]) == 0
    reported = capsys.readouterr().out
    assert "copy" in reported and entry.config.label() in reported

    monkeypatch.setenv(dispatch.ENV_PROFILE, str(out))
    dispatch.clear_cache()
    try:
        choice = dispatch.explain(toy_op.TOY_SHAPE, "toy")
        assert (choice.config, choice.source, choice.key) == (entry.config, "user", entry.key)
        assert dispatch.select_config(toy_op.TOY_SHAPE, "toy") == entry.config
        # The forward's lookup is not served a toy entry: no forward entry there, so the default.
        assert dispatch.explain(toy_op.TOY_SHAPE).source == "default"
    finally:
        dispatch.clear_cache()
