"""`tune.py report --benchmark`: times of one benchmark run (tuned, default, fla) replace the stored ones."""

from __future__ import annotations

import json
from pathlib import Path

from gdn2_tune.profiles.table import load_profile
from gdn2_tune.reports.cli import with_benchmark

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "h100-80gb-hbm3.json"
SUITE_RUN = ROOT / "benchmarks" / "results" / "suite-h100-2026-11-26-s3.json"  # the run BENCHMARKS.md quotes


def _suite(tmp_path: Path, edit=lambda data: None) -> Path:
    """A benchmark run in bench_fwd.py's format with one row per entry of the shipped table, at its config."""
    profile, _ = load_profile(PROFILE)
    rows = []
    for i, e in enumerate(profile.entries):
        # Near the tuner's own times, as a benchmark of the same configs gives (none of them host-bound).
        tuned = e.timing.p50_ms * (1.01 + i / 100)
        default, fla = e.default_timing.p50_ms * (1.01 + i / 100), tuned * 1.3
        rows.append({"shape": e.shape.label(), "config": e.config.label(), "default_config": "default",
                     "tuned": [tuned - 0.01, tuned, tuned + 0.01], "default": [default - 0.01, default, default],
                     "fla": [fla, fla, fla + 0.02]})
    data = {"env": {"gpu": profile.device.name}, "rows": rows}
    edit(data)
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(data))
    return path


def test_matching_rows_bring_the_baseline_and_their_own_times(tmp_path: Path) -> None:
    profile, warnings = load_profile(PROFILE)
    assert profile is not None and not warnings
    suite = _suite(tmp_path)
    merged, notes = with_benchmark(profile, suite)
    rows = {r["shape"]: r for r in json.loads(suite.read_text())["rows"]}
    assert not notes
    for e in merged.entries:
        row = rows[e.shape.label()]
        assert e.baseline_ms == row["fla"][1]
        assert e.timing.p50_ms == row["tuned"][1] and e.default_timing.p50_ms == row["default"][1]
        assert abs(e.speedup - row["default"][1] / row["tuned"][1]) < 1e-12


def test_a_row_for_another_config_gives_no_baseline(tmp_path: Path) -> None:
    profile, _ = load_profile(PROFILE)
    anchor = profile.entries[0].shape.label()

    def edit(data):
        for r in data["rows"]:
            if r["shape"] == anchor:
                r["config"] = "some/other/config"

    merged, notes = with_benchmark(profile, _suite(tmp_path, edit))
    by_label = {e.shape.label(): e for e in merged.entries}
    assert by_label[anchor].baseline_ms is None
    assert by_label[anchor].timing == profile.entries[0].timing
    assert any(profile.entries[0].key in n for n in notes)


def test_a_run_on_another_gpu_is_ignored(tmp_path: Path) -> None:
    profile, _ = load_profile(PROFILE)

    def edit(data):
        data["env"]["gpu"] = "NVIDIA A100-SXM4-80GB"

    merged, notes = with_benchmark(profile, _suite(tmp_path, edit))
    assert merged is profile and "not 'NVIDIA H100 80GB HBM3'" in notes[0]


def test_the_shipped_table_renders_with_the_fla_column() -> None:
    """README's main job on a machine with no GPU: the shipped H100 table, here with its benchmark run."""
    import argparse
    import io

    from rich.console import Console

    from gdn2_tune.reports import cli

    args = cli.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--profile", str(PROFILE), "--benchmark", str(SUITE_RUN), "--no-chart"]
    )
    console = Console(file=io.StringIO(), width=200, color_system=None)
    assert cli.run(args, console=console) == 0
    out = console.file.getvalue()
    assert "NVIDIA H100 80GB HBM3" in out
    # Entries re-tuned after that run keep their stored times; the others show the run's fla column.
    profile, _ = load_profile(PROFILE)
    configs = {e.shape.label(): e.config.label() for e in profile.entries}
    matching = [r for r in json.loads(SUITE_RUN.read_text())["rows"] if configs.get(r["shape"]) == r["config"]]
    assert matching
    for row in matching:
        assert f"{row['fla'][1]:.3f}" in out and f"{row['fla'][1] / row['tuned'][1]:.2f}×" in out


def test_benchmark_rows_far_slower_than_the_tuner_are_called_host_bound() -> None:
    from gdn2_tune.reports.cli import HOST_BOUND_RATIO, with_benchmark

    profile, _ = load_profile(PROFILE)
    _, notes = with_benchmark(profile, SUITE_RUN)
    flagged = {n.split(":")[0] for n in notes if "host-bound" in n}
    stored = {e.shape.label(): e for e in profile.entries}
    expected = {
        stored[r["shape"]].key
        for r in json.loads(SUITE_RUN.read_text())["rows"]
        if r["shape"] in stored and r["config"] == stored[r["shape"]].config.label()
        and r["tuned"][1] > HOST_BOUND_RATIO * stored[r["shape"]].timing.p50_ms
    }
    assert flagged == expected == {"fwd/K128-V128-bf16/T2048-BH16"}
