"""The command line (tuner/cli.py, reports/cli.py) as a user meets it: one-line errors, arguments checked before
any work, Ctrl-C, safe exports, ``show`` at any width, strings from hostile tables, and the table a report serves.
No GPU: ``main()`` is called with argv, and two tests run ``tune.py`` in a child process."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gdn2_tune.kernels.config import Shape, default_config
from gdn2_tune.profiles import dispatch
from gdn2_tune.profiles.dispatch import Device
from gdn2_tune.profiles.table import Profile, TrialRecord, load_profile, save_profile, staleness
from gdn2_tune.reports import render
from gdn2_tune.reports.export import SIGNATURE
from gdn2_tune.reports.text import plain
from gdn2_tune.tuner import cli

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "data" / "h100_profile.json"
KEYS = [
    "fwd/K128-V128-bf16/T4096-BH128",
    "fwd/K128-V128-bf16/T32768-BH16",
    "fwd/K64-V64-bf16/T4096-BH128",
    "fwd/K128-V256-bf16/T8192-BH32",
    "fwd/K128-V128-bf16/T2048-BH16",
]


def fixture() -> Profile:
    profile, _ = load_profile(FIXTURE)
    assert profile is not None
    return profile


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse's own errors
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def no_tuning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any test using this fails if the command got as far as starting a tune."""
    import gdn2_tune.tuner.run as run_module

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tune started before the arguments were checked")

    monkeypatch.setattr(run_module, "tune", refuse)


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_no_gpu_is_one_line_that_suggests_interpret(capsys: pytest.CaptureFixture[str], no_gpu: None,
                                                    no_tuning: None, tmp_path: Path) -> None:
    code, _, err = run_main(capsys, "tune", "--run-dir", str(tmp_path / "run"))
    assert code == cli.EXIT_USER_ERROR
    assert "no CUDA GPU" in one_line(err) and "--interpret" in err


def test_debug_shows_the_traceback(no_gpu: None, no_tuning: None, tmp_path: Path) -> None:
    for argv in (["--debug", "tune"], ["tune", "--debug"]):
        with pytest.raises(cli.UsageError, match="--interpret"):
            cli.main([*argv, "--run-dir", str(tmp_path / "run")])


def test_an_internal_error_is_one_line_pointing_at_debug(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: object) -> int:
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(cli, "show_command", broken)
    code, _, err = run_main(capsys, "show", str(FIXTURE))
    assert code == cli.EXIT_INTERNAL_ERROR
    assert "RuntimeError: something inside broke" in one_line(err) and "--debug" in err
    with pytest.raises(RuntimeError):
        cli.main(["show", str(FIXTURE), "--debug"])


def test_argparse_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "tune", "--trials", "many")
    assert code == cli.EXIT_USER_ERROR
    assert "--trials" in one_line(err) and "--help" in err


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        pytest.param(["stream_state=true,false"], {"stream_state": [True, False]}, id="true-false"),
        pytest.param(["one_pass=1", "stream_state=0"], {"one_pass": [True], "stream_state": [False]}, id="one-zero"),
        pytest.param(["one_pass=TRUE"], {"one_pass": [True]}, id="any-case"),
        pytest.param(["num_warps=1, 2"], {"num_warps": [1, 2]}, id="ints-beside-bools"),
    ],
)
def test_param_parses_bools_as_bools(items: list[str], expected: dict[str, list[object]]) -> None:
    from gdn2_tune.tuner.space import parse_param_choices

    parsed = parse_param_choices(items, "decode")
    assert parsed == expected
    # True == 1 in Python; a constexpr flag must reach Triton as a bool, not as an int.
    assert all(type(v) is type(e) for name in expected for v, e in zip(parsed[name], expected[name], strict=True))


@pytest.mark.parametrize(
    ("param", "says"),
    [
        pytest.param("stream_state=yes", "--param stream_state: expected true, false, 1 or 0, received 'yes'",
                     id="bool-word"),
        pytest.param("one_pass=2", "--param one_pass: expected true, false, 1 or 0, received '2'", id="bool-number"),
        pytest.param("num_warps=two", "--param num_warps: expected an integer among", id="int"),
    ],
)
def test_a_bad_param_value_is_one_line_naming_parameter_expected_and_received(
    param: str, says: str, capsys: pytest.CaptureFixture[str], no_tuning: None, tmp_path: Path
) -> None:
    code, _, err = run_main(capsys, "tune", "--op", "decode", "--interpret", "--param", param,
                            "--run-dir", str(tmp_path / "run"))
    assert code == cli.EXIT_USER_ERROR
    assert says in one_line(err)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["show", "{bad}"], id="show"),
        pytest.param(["merge", "{bad}", "-o", "{tmp}/m.json"], id="merge"),
        pytest.param(["export", "{bad}", "{tmp}/e.json"], id="export"),
        pytest.param(["report", "--profile", "{bad}"], id="report"),
    ],
)
def test_an_unusable_table_is_one_error_line(argv: list[str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    code, _, err = run_main(capsys, *[a.replace("{bad}", str(bad)).replace("{tmp}", str(tmp_path)) for a in argv])
    assert code in (1, 2)
    assert "error: " in one_line(err) and "invalid JSON" in err and str(bad) in err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        pytest.param(["--output", "{tmp}"], "--output: ", id="output-is-a-directory"),
        pytest.param(["--output", "{tmp}/notes.txt"], "--force", id="output-is-not-a-table"),
        pytest.param(["--output", "{tmp}/notes.txt/t.json"], "not a directory", id="output-under-a-file"),
        pytest.param(["--run-dir", "{tmp}/notes.txt"], "--run-dir", id="run-dir-is-a-file"),
        pytest.param(["--shapes", "8x4096"], "--shapes", id="bad-shape"),
        pytest.param(["--param", "chunk=abc"], "--param", id="bad-param"),
        pytest.param(["--storage", "mysql-somewhere"], "--storage", id="bad-storage"),
        pytest.param(["--gpus", "0,1"], "--gpus", id="gpus-with-interpret"),
    ],
)
def test_tune_arguments_are_checked_before_any_work(argv: list[str], says: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str], no_tuning: None) -> None:
    (tmp_path / "notes.txt").write_text("my notes\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run_main(capsys, "tune", "--interpret", "--run-dir", str(tmp_path / "run"), *argv)
    assert code == cli.EXIT_USER_ERROR
    assert says in one_line(err)
    assert (tmp_path / "notes.txt").read_text() == "my notes\n"


def test_ctrl_c_says_where_the_run_is_kept_and_how_to_resume(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import gdn2_tune.tuner.run as run_module

    def interrupted(options: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "tune", interrupted)
    argv = ["tune", "--interpret", "--trials", "3", "--run-dir", str(tmp_path / "my run")]
    code, _, err = run_main(capsys, *argv)
    assert code == cli.EXIT_INTERRUPTED == 130
    one_line(err)
    assert str(tmp_path / "my run" / cli.JOURNAL_NAME) in err
    resume = err.split("resume with: ", 1)[1].strip()
    assert resume == "python tune.py tune --interpret --trials 3 --run-dir '" + str(tmp_path / "my run") + "'"


def test_journal_name_matches_the_tuner(tmp_path: Path) -> None:
    from gdn2_tune.tuner import study

    study.open_storage(None, tmp_path)
    assert (tmp_path / cli.JOURNAL_NAME).exists()


def test_ctrl_c_during_a_real_interpreter_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tune.py"), "tune", "--interpret", "--no-progress", "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    try:
        # Interrupt once the study exists, i.e. while workers compile and time configs.
        deadline = time.monotonic() + 120
        while not (run_dir / cli.JOURNAL_NAME).exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(2.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert str(run_dir / cli.JOURNAL_NAME) in err and "resume with: python tune.py tune --interpret" in err


# ---------------------------------------------------------------------------------------------------------------
# Exports and written tables


def report_argv(*extra: str) -> list[str]:
    return ["report", "--profile", str(FIXTURE), "--no-chart", "--width", "100", *extra]


@pytest.mark.parametrize("kind", ["html", "svg"])
def test_export_creates_missing_directories_and_marks_the_file(kind: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new" / "dir" / f"report.{kind}"
    code, _, err = run_main(capsys, *report_argv("--export", kind, str(out)))
    assert code == 0, err
    assert SIGNATURE in out.read_text(encoding="utf-8")[:4096]
    # An earlier export may be replaced without --force.
    assert run_main(capsys, *report_argv("--export", kind, str(out)))[0] == 0


def test_export_refuses_to_overwrite_other_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# my project\n")
    code, _, err = run_main(capsys, *report_argv("--export", "svg", str(readme)))
    assert code == 2 and "--force" in one_line(err)
    assert readme.read_text() == "# my project\n"
    code, _, err = run_main(capsys, *report_argv("--export", "svg", str(readme), "--force"))
    assert code == 0 and SIGNATURE in readme.read_text()
    code, _, err = run_main(capsys, *report_argv("--export", "pdf", str(tmp_path / "r.pdf")))
    assert code == 2 and "html or svg" in one_line(err)
    code, _, err = run_main(capsys, *report_argv("--export", "html", str(tmp_path)))
    assert code == 2 and "directory" in one_line(err)


def test_table_writers_refuse_to_overwrite_other_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    for argv in (["export", str(FIXTURE), str(notes)], ["merge", str(FIXTURE), "-o", str(notes)]):
        code, _, err = run_main(capsys, *argv)
        assert code == 2 and "--force" in one_line(err), argv
        assert notes.read_text() == '{"mine": true}\n'
    # A table may be replaced by a table.
    table = tmp_path / "out" / "table.json"
    assert run_main(capsys, "export", str(FIXTURE), str(table))[0] == 0
    assert run_main(capsys, "merge", str(FIXTURE), "-o", str(table))[0] == 0
    assert run_main(capsys, "export", str(FIXTURE), str(notes), "--force")[0] == 0
    assert load_profile(notes)[0] is not None


def test_measure_checks_its_output_then_needs_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    no_gpu: None) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    code, _, err = run_main(capsys, "measure", "--profile", str(FIXTURE), "--output", str(notes))
    assert code == 2 and "--force" in one_line(err)
    code, _, err = run_main(capsys, "measure", "--profile", str(FIXTURE), "--output", str(tmp_path / "m.json"))
    assert code == 2 and "no CUDA GPU" in one_line(err)


# ---------------------------------------------------------------------------------------------------------------
# show


@pytest.mark.parametrize("width", [80, 120])
def test_show_fits_the_width_and_never_cuts_a_key(width: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "show", str(FIXTURE), "--width", str(width))
    assert code == 0
    lines = out.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= width
    assert "…" not in out
    for key in KEYS:
        assert any(line.strip().startswith(key) for line in lines), key
    if width >= 120:  # one row per entry: the key and its numbers on one line
        anchor = next(line for line in lines if line.strip().startswith(KEYS[0]))
        assert "1.1200" in anchor and "1.4900" in anchor


def test_show_piped(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run([sys.executable, str(ROOT / "tune.py"), "show", str(FIXTURE)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout and "\x1b" not in proc.stdout
    for key in KEYS:
        assert key in proc.stdout


def test_show_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "show", str(FIXTURE), "--json")
    assert code == 0
    (doc,) = json.loads(out)
    assert [e["key"] for e in doc["table"]["entries"]] == KEYS
    assert doc["path"] == str(FIXTURE) and "trials" not in doc["table"]
    assert doc["stale"]  # the fixture's fingerprint is old on purpose
    assert set(doc["vs_before_tuning"]) == set(KEYS)


# ---------------------------------------------------------------------------------------------------------------
# Strings from a table


def test_plain_removes_escapes_and_truncates() -> None:
    assert plain("a\x1b[31mred\x1b[0m b") == "ared b"
    assert plain("x\x1b]0;title\x07y") == "xy"  # a terminal title change, removed whole
    assert plain("rtl\u202eevil") == "rtl\\u202eevil"
    assert plain("bell\x07 nl\n") == "bell\\x07 nl "
    long = plain("z" * 10_000)
    assert len(long) < 400 and long.endswith("(9700 more characters)")


def hostile_table(tmp_path: Path) -> Path:
    profile = fixture()
    evil = "\x1b[31mRED\x1b[0m\x1b]0;pwned\x07 [bold]not bold[/bold] [a-z0-9-]"
    profile = dataclasses.replace(
        profile,
        device=dataclasses.replace(profile.device, name="GPU " + evil, driver="d" * 2_000_000),
        sampler="tpe " + evil,
        created="2026" + evil,
        trials=tuple(dataclasses.replace(t, reason=evil + "r" * 100_000) if t.state != "COMPLETE" else t
                     for t in profile.trials),
    )
    path = tmp_path / "hostile.json"
    save_profile(profile, path)
    # One bad entry, so that a warning quotes markup-like text back.
    data = json.loads(path.read_text())
    data["entries"][0]["stage"] = "[a-z0-9-]"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["show", "{path}", "--width", "120"], id="show"),
        pytest.param(["report", "--profile", "{path}", "--no-chart", "--width", "120"], id="report-suite"),
        pytest.param(["report", "--profile", "{path}", "--view", "coverage", "--width", "120"], id="report-coverage"),
        pytest.param(["report", "--profile", "{path}", "--view", "convergence", "--width", "120",
                      "--shape", KEYS[2]], id="report-convergence"),
    ],
)
def test_strings_from_a_table_are_escaped_and_truncated(argv: list[str], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = hostile_table(tmp_path)
    code, out, err = run_main(capsys, *[a.replace("{path}", str(path)) for a in argv])
    assert code == 0, err
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert len(out) + len(err) < 60_000  # the 2 MB driver and 100 kB reasons were cut
    assert "[a-z0-9-]" in err  # the warning about entries[0].stage, not swallowed as markup
    if "show" in argv or "coverage" in argv:
        assert "[bold]not bold[/bold]" in out.replace("\n", "")


# ---------------------------------------------------------------------------------------------------------------
# Counts: show and convergence agree


def test_show_and_convergence_count_failures_alike(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The shipped H100 table's K64 study: two trials stopped at the study deadline (FAIL, re-queued for the next
    # run) made convergence say "fail 2" where the tuner (and show) said "failed 0". A duplicate is not a failure.
    profile = fixture()
    key = KEYS[2]
    records = [TrialRecord(key, n, "COMPLETE", 1.0 + n, {}, None) for n in range(3)]
    records += [TrialRecord(key, 3, "FAIL", None, {}, render.INTERRUPTED_REASONS[0]),
                TrialRecord(key, 4, "FAIL", None, {}, render.INTERRUPTED_REASONS[1]),
                TrialRecord(key, 5, "FAIL", None, {}, "duplicate of a point being measured"),
                TrialRecord(key, 6, "FAIL", None, {}, "no answer within 120 s (hang or very slow compile)"),
                TrialRecord(key, 7, "PRUNED", None, {}, "infeasible: chunk too large")]
    entries = tuple(dataclasses.replace(e, failed=1, pruned=1) if e.key == key else e for e in profile.entries)
    path = tmp_path / "t.json"
    save_profile(dataclasses.replace(profile, entries=entries, trials=tuple(records)), path)

    c = render.convergence(records, key)
    assert (len(c.failed), len(c.pruned), len(c.not_run)) == (1, 1, 3)
    _, out, _ = run_main(capsys, "report", "--profile", str(path), "--view", "convergence", "--shape", key,
                         "--no-chart", "--width", "120")
    row = next(line for line in out.splitlines() if line.strip().startswith(key)).split()
    assert row[-3:] == ["1", "1", "3"]  # failed, pruned, not run
    _, out, _ = run_main(capsys, "show", str(path), "--width", "120")
    row = next(line for line in out.splitlines() if line.strip().startswith(key)).split()
    assert row[-2:] == ["1", "1"]  # pruned, failed


def test_the_tuner_still_words_its_non_failures_as_the_report_expects() -> None:
    text = (ROOT / "tuner" / "study.py").read_text()
    for reason in render.INTERRUPTED_REASONS:
        assert f'"{reason}"' in text, reason
    assert f'"{render.DUPLICATE_REASON_PREFIX}' in text or f'f"{render.DUPLICATE_REASON_PREFIX}' in text


# ---------------------------------------------------------------------------------------------------------------
# reports/ never imports the tuner


def test_reports_sources_import_no_tuner_module() -> None:
    for path in sorted((ROOT / "reports").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n.startswith(("gdn2_tune.tuner", "tuner")) for n in names), (path.name, names)


def test_a_report_renders_with_the_tuner_unimportable(tmp_path: Path) -> None:
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "gdn2_tune.tuner" or name.startswith("gdn2_tune.tuner."):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from gdn2_tune.reports.cli import main
sys.exit(main(["--profile", {str(FIXTURE)!r}, "--width", "120"]))
"""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "B8-T4096-H16-K128-V128-bf16" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# Which table a report serves


H200 = Device("h200", "sm90")


@pytest.fixture
def h200_without_a_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A GPU with no table of its own whose family (sm90) has the H100 fixture shipped."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    save_profile(fixture(), shipped / "h100-80gb-hbm3.json")
    dispatch.clear_cache()
    monkeypatch.setattr(dispatch, "SHIPPED_DIR", shipped)
    monkeypatch.setattr(dispatch, "_running_device", lambda: H200)
    monkeypatch.delenv(dispatch.ENV_PROFILE, raising=False)
    monkeypatch.delenv(dispatch.ENV_CONFIG, raising=False)
    yield shipped / "h100-80gb-hbm3.json"
    dispatch.clear_cache()


@pytest.mark.filterwarnings("ignore::gdn2_tune.profiles.dispatch.TableWarning")  # no own table, stale fixture
def test_explain_names_the_family_table_and_the_nearest_bucket(h200_without_a_table: Path) -> None:
    exact = dispatch.explain(Shape(B=8, T=4096, H=16, K=128, V=128, dtype="bf16"))
    assert (exact.source, exact.path, exact.key, exact.exact) == ("family", h200_without_a_table, KEYS[0], True)
    near = dispatch.explain(Shape(B=8, T=8192, H=16, K=128, V=128, dtype="bf16"))
    assert near.source == "family" and not near.exact and near.key in KEYS
    assert "nearest bucket" in near.describe() and "family" in near.describe()
    assert near.config == dispatch.select_config(Shape(B=8, T=8192, H=16, K=128, V=128, dtype="bf16"))
    none = dispatch.explain(Shape(B=1, T=64, H=2, K=32, V=32, dtype="bf16"))
    assert none.source == "default" and none.path is None


def test_report_on_a_gpu_without_a_table_says_what_it_serves(h200_without_a_table: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "report", "--no-chart", "--width", "200")
    assert code == 0, err
    assert str(h200_without_a_table) in out and "family fallback" in out and "nearest bucket" in out
    assert "tune.py tune" in out
    code, out, _ = run_main(capsys, "report", "--json")
    serving = json.loads(out)["serving"]
    assert serving["source"] == "family" and serving["path"] == str(h200_without_a_table)
    assert "tune.py tune" in serving["advice"]


def test_report_on_a_gpu_with_its_own_table_gives_no_advice(h200_without_a_table: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    own = h200_without_a_table.parent / "h200.json"
    profile = fixture()
    save_profile(dataclasses.replace(profile, device=dataclasses.replace(profile.device, device_id="h200")), own)
    dispatch.clear_cache()
    code, out, _ = run_main(capsys, "report", "--json")
    serving = json.loads(out)["serving"]
    assert code == 0 and serving["source"] == "own" and serving["path"] == str(own) and serving["advice"] is None


# ---------------------------------------------------------------------------------------------------------------
# "vs before tuning" (profiles.table.Entry.incumbent)


def with_incumbents(tmp_path: Path) -> Path:
    """The fixture with what was served before tuning recorded: at the anchor the built-in default at 1.344 ms
    (the tuned 1.12 ms is 1.20× as fast), at the K64 key the incumbent itself, kept."""
    from gdn2_tune.profiles.table import Incumbent, ServedFrom, Timing

    profile = fixture()
    before = {
        KEYS[0]: lambda e: Incumbent(default_config(e.shape), Timing(1.3, 1.344, 1.4, 0.01), ServedFrom.FAMILY,
                                     "h100-80gb-hbm3.json", KEYS[0]),
        KEYS[2]: lambda e: Incumbent(e.config, e.timing, ServedFrom.DEFAULT, None, None),
    }
    entries = tuple(dataclasses.replace(e, incumbent=before[e.key](e)) if e.key in before else e
                    for e in profile.entries)
    path = tmp_path / "incumbents.json"
    save_profile(dataclasses.replace(profile, entries=entries), path)
    return path


def test_show_and_report_give_vs_before_tuning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = with_incumbents(tmp_path)
    _, out, _ = run_main(capsys, "show", str(path), "--width", "120")
    lines = out.splitlines()
    assert "vs before" in out
    assert "1.20×" in next(line for line in lines if line.strip().startswith(KEYS[0]))
    k64 = lines.index(next(line for line in lines if line.strip().startswith(KEYS[2])))
    assert "1.00×" in lines[k64] and "kept" in lines[k64 + 1]
    assert "—" in next(line for line in lines if line.strip().startswith(KEYS[1]))  # not recorded there
    _, out, _ = run_main(capsys, "show", str(path), "--width", "80")
    assert "served before tuning (h100-80gb-hbm3.json fwd/K128-V128-bf16/T4096-BH128 (family)); tuned is 1.20×" in \
        " ".join(out.split())
    assert "kept: nothing beat it" in out
    _, out, _ = run_main(capsys, "show", str(path), "--json")
    assert json.loads(out)[0]["vs_before_tuning"][KEYS[0]] == pytest.approx(1.2)
    _, out, _ = run_main(capsys, "report", "--profile", str(path), "--no-chart", "--width", "140")
    anchor = next(line for line in out.splitlines() if line.strip().startswith("B8-T4096-H16-K128-V128-bf16"))
    assert "1.20×" in anchor and "vs before" in out


# ---------------------------------------------------------------------------------------------------------------
# tune.py measure, with the GPU timing functions replaced (no GPU here)


def test_measure_stores_todays_times_as_a_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import gdn2_tune.tuner.device as device_module
    import gdn2_tune.tuner.measure as measure_module
    import gdn2_tune.tuner.roofs as roofs_module
    from gdn2_tune.profiles.table import Roofs

    profile = fixture()
    broken = profile.entries[1].shape  # this entry "no longer runs"

    class FakeBench:
        def __init__(self, shape: Shape, device: str, op: str = "fwd") -> None:
            if shape == broken:
                raise RuntimeError("out of resources")

    def timing(ms: float) -> dict[str, float]:
        return {"p20_ms": ms * 0.99, "p50_ms": ms, "p80_ms": ms * 1.01, "spread": 0.01}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(device_module, "detect_device", lambda: dataclasses.replace(profile.device, name="NVIDIA H200",
                                                                                    device_id="h200"))
    monkeypatch.setattr(measure_module, "Bench", FakeBench)
    monkeypatch.setattr(measure_module, "retime", lambda bench, cfgs, rounds: {"timings": [timing(1.0), timing(1.5)]})
    monkeypatch.setattr(measure_module, "stage_times",
                        lambda bench, cfgs: {"stages": [{"intra": 0.6, "state": 0.4}, {"intra": 0.9, "state": 0.6}]})
    monkeypatch.setattr(roofs_module, "measure_roofs", lambda device: Roofs(4300.0, 780.0, 390.0, 60.0))

    out = tmp_path / "measured.json"
    code, _, err = run_main(capsys, "measure", "--profile", str(FIXTURE), "--output", str(out))
    assert code == 0, err
    assert f"{profile.entries[1].key}: could not be re-measured (out of resources); left out" in err
    assert f"report --profile {out}" in err
    measured, warnings = load_profile(out)
    assert measured is not None and not warnings
    assert measured.device.device_id == "h200" and measured.roofs == Roofs(4300.0, 780.0, 390.0, 60.0)
    assert [e.key for e in measured.entries] == [e.key for e in profile.entries if e.shape != broken]
    for e in measured.entries:
        assert (e.timing.p50_ms, e.default_timing.p50_ms, e.speedup) == (1.0, 1.5, 1.5)
        assert e.stage_ms == {"intra": 0.6, "state": 0.4} and e.baseline_ms is None and e.incumbent is None
    assert not measured.trials and not staleness(measured)  # measured with today's kernels and Triton
    code, report_out, _ = run_main(capsys, "report", "--profile", str(out), "--no-chart", "--width", "140")
    assert code == 0 and "NVIDIA H200" in report_out
