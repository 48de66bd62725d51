"""The report views and CLI rendered from the H100 profile fixture (tests/data/h100_profile.json: made-up times,
see tests/data/README.md), no GPU."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from gdn2_tune.profiles.table import DeviceInfo, Roofs, TrialRecord, load_profile, save_profile
from gdn2_tune.reports import cli, render
from gdn2_tune.reports.roofline import Report, build_report

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "h100_profile.json"
LABELS = (
    "B8-T4096-H16-K128-V128-bf16",
    "B1-T32768-H16-K128-V128-bf16",
    "B4-T4096-H32-K64-V64-bf16",
    "B2-T8192-H16-K128-V256-bf16",
    "B1-T2048-H16-K128-V128-bf16",
)


def args(*argv: str) -> argparse.Namespace:
    return cli.add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def render_cli(*argv: str, width: int = 140) -> tuple[int, str]:
    console = Console(file=io.StringIO(), width=width, color_system=None, record=True)
    code = cli.run(args(*argv), console=console)
    return code, console.file.getvalue()  # type: ignore[attr-defined]


def write_profile(tmp_path: Path, **changes: object) -> Path:
    profile, _ = load_profile(FIXTURE)
    assert profile is not None
    path = tmp_path / "profile.json"
    save_profile(dataclasses.replace(profile, **changes), path)
    return path


def test_suite_view_shows_every_shape_with_its_speedups_and_roof() -> None:
    code, out = render_cli("--profile", str(FIXTURE))
    assert code == 0
    for label in LABELS:
        assert label in out
    anchor = next(line for line in out.splitlines() if "B8-T4096-H16-K128-V128-bf16" in line)
    # tuned 1.12 ms, default 1.49, fla 2.28: 1.33× and 2.04×; 68% of the measured memory roof
    for cell in ("1.120", "1.490", "2.280", "1.33×", "2.04×", "68%", "memory"):
        assert cell in anchor, cell
    small = next(line for line in out.splitlines() if "B1-T2048-H16-K128-V128-bf16" in line)
    assert "1.36×" in small and "—" in small  # no fla time recorded for this shape
    assert "3,020 GB/s" in out and "694 TFLOP/s" in out  # measured roofs
    assert "989" not in out and "1,071 TFLOP/s" in out  # theoretical at the recorded 1980 MHz
    assert "T tuned total" in out and "B fla baseline" in out  # the chart's legend


def test_shape_view_breaks_the_call_into_stages() -> None:
    code, out = render_cli("--profile", str(FIXTURE), "--view", "shape", "--shape", "fwd/K128-V128-bf16/T4096-BH128")
    assert code == 0
    lines = out.splitlines()
    intra = next(line for line in lines if line.lstrip().startswith("tuned") and "intra" in line)
    # tuned intra (C64, BC16, BK = BV = 64), per (chunk, head) program: T + A_qk 4·64·64·128, diagonal blocks
    # 6·2·4·16³, assembly 4·2·64³, Y + U 4·64·64·128 = 6,488,064 FLOP × 8192 programs = 53.2 GFLOP over 1.55 GB:
    # 34.3 FLOP/B; 0.710 ms, 63% of the call, memory-bound at 72% of the measured roof
    for cell in ("0.710", "63%", "1.55", "53.2", "34.3", "memory", "72%"):
        assert cell in intra, cell
    assert any(line.lstrip().startswith("fla") for line in lines)
    assert "I tuned intra" in out and "s default state" in out


def test_shape_view_names_compute_roofs_when_they_bind(tmp_path: Path) -> None:
    # Roofs low enough that the state stage (80 FLOP/B, bf16 dots) and the intra stage (34 FLOP/B, mostly tf32 dots)
    # both sit right of their ridge points.
    path = write_profile(tmp_path, roofs=Roofs(3000.0, 20.0, 10.0, 5.0))
    code, out = render_cli("--profile", str(path), "--view", "shape", "--shape", "B8-T4096-H16-K128-V128-bf16")
    assert code == 0
    state = next(line for line in out.splitlines() if line.lstrip().startswith("state") or " state " in line)
    assert "bf16 TC" in state
    intra = next(line for line in out.splitlines() if "tuned" in line and "intra" in line)
    assert "tf32 TC" in intra


def test_unknown_gpu_renders_unknown_architecture(tmp_path: Path) -> None:
    t4 = DeviceInfo("tesla-t4", "Tesla T4", "sm75", (7, 5), 40, 1590, 5001, 256, None)
    path = write_profile(tmp_path, device=t4, roofs=None)
    code, out = render_cli("--profile", str(path))
    assert code == 0
    assert "no per-SM rates for sm75" in out
    anchor = next(line for line in out.splitlines() if "B8-T4096-H16-K128-V128-bf16" in line)
    assert "unknown architecture" in anchor
    assert "%" not in anchor  # no percentage made up
    assert "1.33×" in anchor  # the measured speedups still show


def test_json_round_trips(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.run(args("--profile", str(FIXTURE), "--json"))
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    profile, _ = load_profile(FIXTURE)
    assert profile is not None
    assert Report.from_dict(doc["report"]) == build_report(profile)
    assert doc["view"] == "suite"


def test_json_convergence_lists_each_study(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(args("--profile", str(FIXTURE), "--json", "--view", "convergence")) == 0
    doc = json.loads(capsys.readouterr().out)
    studies = {c["key"]: c for c in doc["convergence"]}
    assert len(studies) == 5
    anchor = studies["fwd/K128-V128-bf16/T4096-BH128"]
    assert anchor["best"] == 1.12 and len(anchor["numbers"]) == 24


def test_convergence_by_hand() -> None:
    trials = [
        TrialRecord("k", 0, "COMPLETE", 2.0, {}, None),
        TrialRecord("k", 1, "FAIL", None, {}, "out of resources"),
        TrialRecord("k", 2, "COMPLETE", 1.04, {}, None),
        TrialRecord("k", 3, "PRUNED", None, {}, "register budget"),
        TrialRecord("k", 4, "COMPLETE", 1.0, {}, None),
        TrialRecord("other", 0, "COMPLETE", 0.1, {}, None),
    ]
    c = render.convergence(trials, "k")
    assert c.numbers == (0, 1, 2, 3, 4)
    assert c.best_ms == (2.0, 2.0, 1.04, 1.04, 1.0)
    assert (c.best, c.best_at, c.within_5pct_at) == (1.0, 4, 2)
    assert (c.failed, c.pruned) == ((1,), (3,))
    assert render.outcome_strip(trials, "k").plain == "▼x▼p▼"


def test_convergence_and_coverage_views() -> None:
    code, out = render_cli("--profile", str(FIXTURE), "--view", "convergence",
                           "--shape", "B8-T4096-H16-K128-V128-bf16")
    assert code == 0
    assert "fwd/K128-V128-bf16/T4096-BH128" in out and "best ms against trial number" in out
    assert "pruned: intra stage holds" in out  # where pruned trials came from
    code, out = render_cli("--profile", str(FIXTURE), "--view", "coverage")
    assert code == 0
    assert "5 keys" in out and "2026-11-27" in out and "state:BV32-w4-s3-input" in out


@pytest.mark.parametrize("kind", ["html", "svg"])
def test_export(tmp_path: Path, kind: str) -> None:
    out = tmp_path / f"report.{kind}"
    code = cli.run(args("--profile", str(FIXTURE), "--export", kind, str(out), "--width", "120"),
                   console=Console(file=io.StringIO(), record=True, width=120))
    assert code == 0
    text = out.read_text(encoding="utf-8")
    assert "B8-T4096-H16-K128-V128-bf16".replace("-", "") in text.replace("-", "").replace("&#8209;", "")


def test_cli_errors_are_explained(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(args("--profile", str(FIXTURE), "--view", "shape")) == 2
    assert "needs --shape" in capsys.readouterr().err
    assert cli.run(args("--profile", str(FIXTURE), "--view", "shape", "--shape", "B1-T1")) == 2
    assert "fwd/K128-V128-bf16/T4096-BH128" in capsys.readouterr().err
    assert cli.run(args("--profile", "/nonexistent/table.json")) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_measure_is_a_tuner_command_now(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(args("--profile", str(FIXTURE), "--measure")) == 2
    err = capsys.readouterr().err
    assert "tune.py measure" in err and err.count("\n") == 1


def test_default_profile_falls_back_to_the_shipped_h100_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gdn2_tune.profiles import dispatch

    monkeypatch.setattr(dispatch, "SHIPPED_DIR", tmp_path)
    monkeypatch.setattr(dispatch, "_running_device", lambda: None)  # no GPU
    monkeypatch.delenv(dispatch.ENV_PROFILE, raising=False)
    dispatch.clear_cache()
    assert cli.default_profile(tmp_path).path is None
    shutil.copy(FIXTURE, tmp_path / "h100-80gb-hbm3.json")
    serving = cli.default_profile(tmp_path)
    assert serving.path == tmp_path / "h100-80gb-hbm3.json" and "H100" in serving.why
    assert serving.source == "fallback" and serving.advice is None  # no GPU: nothing to tune
    dispatch.clear_cache()


def test_python_dash_m_reports_runs() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "gdn2_tune.reports", "--profile", str(FIXTURE), "--no-chart", "--width", "140"],
        cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": ""}, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "B8-T4096-H16-K128-V128-bf16" in proc.stdout
