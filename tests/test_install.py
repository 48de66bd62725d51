"""`pip install .` adds one import name, gdn2_tune, and no generic top-level package (issue 10 §4): `kernels` is
the Hugging Face hub-kernel loader's name, and `tuner`, `profiles`, `reports` are as generic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    # --no-build-isolation: the test runs offline, with the setuptools of the test environment.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(out),
         str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    return out


def test_install_adds_only_the_gdn2_tune_package(target: Path) -> None:
    names = {p.name for p in target.iterdir() if p.name != "bin"}
    assert "gdn2_tune" in names
    assert names - {"gdn2_tune"} == {n for n in names if n.startswith("gdn2_tune-") and n.endswith(".dist-info")}
    for generic in ("kernels", "tuner", "profiles", "reports", "tune.py"):
        assert not (target / generic).exists()


def test_installed_package_carries_its_tables_and_imports_from_the_target(target: Path) -> None:
    assert (target / "gdn2_tune" / "profiles" / "h100-80gb-hbm3.json").is_file()
    code = ("import gdn2_tune, gdn2_tune.kernels.chunk as c, gdn2_tune.profiles.dispatch as d; "
            "print(c.__file__); print(d.__file__); print(gdn2_tune.chunk_gdn2.__name__)")
    env = dict(os.environ, PYTHONPATH=str(target), TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], cwd=target.parent, env=env, capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    chunk_file, dispatch_file, name = run.stdout.split()
    assert Path(chunk_file).is_relative_to(target) and Path(dispatch_file).is_relative_to(target)
    assert name == "chunk_gdn2"
