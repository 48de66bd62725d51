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
