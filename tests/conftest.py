"""Kernel tests run on the CPU through the Triton interpreter unless a GPU is present.

TRITON_INTERPRET must be set before kernels are imported (triton.jit reads it when a kernel is defined).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"

from gdn2_tune.kernels.buffers import poisoned  # after TRITON_INTERPRET: importing kernels defines the jits


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU with compiled (not interpreted) kernels")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if INTERPRETED:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (kernels run in the Triton interpreter here)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def poisoned_outputs() -> Iterator[None]:
    """Every launcher output starts as NaN in every test, so an element a kernel fails to write fails the test."""
    with poisoned():
        yield


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def no_tables(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No user table and no forced config of any op: the dispatcher sees only the shipped tables (none on the CPU)
    and the built-in defaults."""
    from gdn2_tune.kernels.spec import registered
    from gdn2_tune.profiles import dispatch

    monkeypatch.delenv(dispatch.ENV_PROFILE, raising=False)
    for spec in registered():
        monkeypatch.delenv(dispatch.env_config_name(spec.name), raising=False)
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()
