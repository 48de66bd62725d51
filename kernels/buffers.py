"""Output buffers of the launchers: uninitialised when serving, NaN-filled when checking.

Filling every output with NaN before a launch makes a row the kernel forgets to write impossible to pass for
data, but it costs a full extra write of every buffer (about 0.7 GB, a tenth of the forward's time, at the
anchor shape). So the launchers allocate with :func:`output_buffer`, which poisons only inside
:func:`poisoned`: the tests and the tuner's correctness gate check under it; ``chunk_gdn2`` never pays for it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

_state = threading.local()


@contextmanager
def poisoned() -> Iterator[None]:
    """Within this block every launcher output starts as NaN (nestable, per thread)."""
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth


def is_poisoned() -> bool:
    return getattr(_state, "depth", 0) > 0


def output_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A buffer a kernel overwrites entirely: NaN under :func:`poisoned`, else uninitialised."""
    if is_poisoned():
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)
