"""The backward's value side (kernels/bwd_local.py) in each of its tilings against float64 autograd through the
token recurrence (kernels/reference_grad.py), with NaN-poisoned outputs and scratch (conftest.py).

value_tile="split" (two launches, no tile that grows with K or V) is the one that fits at K = V = 256, where the
single-launch tilings fall back to torch: it is checked there too, at a size the interpreter runs in seconds.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import DEVICE

from gdn2_tune.kernels.chunk_bwd import BwdConfig, chunk_gdn2_bwd, fit_bwd
from gdn2_tune.kernels.config import Shape, default_config
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.reference_grad import reference_grads
from gdn2_tune.kernels.varlen import packed_index

# Budgets as in tests/test_chunk_bwd.py (from the arithmetic): fp32 products and accumulators give ~1e-6, so 1e-4;
# 16-bit gradients are rounded once (2^-9 relative for bf16, rms a third of it), so 4e-3.
TOL = {"fp32": 1e-4, "bf16": 4e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().to("cpu", torch.float64)
    assert torch.isfinite(x).all(), "non-finite values (an unwritten NaN-poisoned element, or an overflow)"
    return float((x - ref.cpu()).norm() / ref.cpu().norm().clamp_min(1e-300))


def check(shape: Shape, bcfg: BwdConfig, *, seed: int, strong_decay: bool, lengths: list[int] | None = None,
          tol: float | None = None) -> None:
    inp = make_inputs(shape if lengths is None else dataclasses.replace(shape, num_seqs=len(lengths)), DEVICE, seed,
                      strong_decay=strong_decay)
    if lengths is not None:
        assert sum(lengths) == shape.T
        cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(DEVICE)
        inp = dataclasses.replace(inp, cu_seqlens=cu)
    cfg = default_config(shape)
    gen = torch.Generator().manual_seed(seed + 1000)
    do = torch.randn(inp.v.shape, generator=gen).to(DEVICE, inp.v.dtype)
    dht = torch.randn(inp.initial_state.shape, generator=gen).to(DEVICE)
    num_seqs = shape.B if lengths is None else len(lengths)
    cu = inp.cu_seqlens
    index = None if cu is None else packed_index(cu, cfg.chunk, shape.T)
    got = chunk_gdn2_bwd(*inp.args(), do, dht, scale=shape.K**-0.5, initial_state=inp.initial_state,
                         cu_seqlens=None if index is None else index.offsets, use_qk_l2norm_in_kernel=False,
                         config=cfg, bwd_config=bcfg, num_seqs=num_seqs, index=index)
    ref = reference_grads(*inp.args(), do, dht, scale=shape.K**-0.5, initial_state=inp.initial_state,
                          cu_seqlens=cu)
    errs = {name: rel_err(x, r) for x, (name, r) in zip(got, ref.items())}
    tol = TOL[shape.dtype] if tol is None else tol
    bad = {n: f"{e:.2e}" for n, e in errs.items() if not e < tol}
    assert not bad, f"gradient errors over the budget {tol:.0e}: {bad} (all: {errs})"


@pytest.mark.parametrize(("shape", "bcfg", "strong"), [
    # K = 48 in three tiles of 16 (the last partial), V = 40 in three tiles of 16; groups of one chunk.
    pytest.param(Shape(1, 70, 1, 48, 40, "fp32"), BwdConfig(value_tile="split", value_BK=16, value_BV=16,
                                                            group_elements=1), True,
                 id="split-B1-T70-H1-K48-V40-BK16-BV16-groups-fp32-strong-decay"),
    pytest.param(Shape(1, 45, 1, 24, 80, "fp32"), BwdConfig(value_tile="split", value_BK=16, value_BV=32), False,
                 id="split-B1-T45-H1-K24-V80-BK16-BV32-fp32"),
    pytest.param(Shape(1, 40, 1, 96, 40, "bf16"), BwdConfig(value_tile="split", value_BK=32, value_BV=64), True,
                 id="split-B1-T40-H1-K96-V40-BK32-BV64-bf16-strong-decay"),
])
def test_split_value_side_matches_float64_autograd(shape: Shape, bcfg: BwdConfig, strong: bool) -> None:
    check(shape, bcfg, seed=7, strong_decay=strong)


def test_split_value_side_on_a_packed_batch() -> None:
    """Sequences shorter than a chunk, one ending inside a chunk, and the packed index's phantom chunk slots (their
    per-chunk buffers never written: read as zeros, never reaching a gradient)."""
    check(Shape(1, 60, 1, 32, 48, "fp32"), BwdConfig(value_tile="split", value_BK=16, value_BV=32), seed=3,
          strong_decay=True, lengths=[5, 33, 1, 21])


def test_split_value_side_fits_and_runs_at_k_v_256() -> None:
    """At K = V = 256 (chunk 32) the "v" and "k" tilings do not fit and are fitted to the "kv" tiling; "stack"
    (160 KiB of shared memory compiled for sm90, 192 at BK 64, 384 at BK 128) is kept up to BK 64, not at chunk 64;
    "split" is kept as asked; its gradients (BK = BV = 64: four tiles each way) and the stack's (BK 64) match float64
    autograd."""
    shape = Shape(1, 20, 1, 256, 256, "bf16")
    for tile, chunk, BK in (("v", 32, 32), ("k", 32, 32), ("stack", 32, 128), ("stack", 64, 32)):
        # bf16 operands for the reverse pass: at chunk 64 it cannot stage fp32 ones (recompute_dtype).
        fitted = fit_bwd(BwdConfig(value_tile=tile, value_BK=BK), shape, chunk, 2)
        assert (fitted.value_side, fitted.value_tile) == ("triton", "kv"), (tile, chunk, BK)
    for BK in (16, 32, 64):
        fitted = fit_bwd(BwdConfig(value_tile="stack", value_BK=BK), shape, 32, 4)
        assert (fitted.value_side, fitted.value_tile, fitted.value_BK) == ("triton", "stack", BK)
    split = BwdConfig(value_tile="split", value_BK=64, value_BV=64)
    fitted = fit_bwd(split, shape, 32, 4)
    assert (fitted.value_side, fitted.value_tile, fitted.value_BK, fitted.value_BV) == ("triton", "split", 64, 64)
    check(shape, split, seed=11, strong_decay=True)
    check(shape, BwdConfig(value_tile="stack", value_BK=64), seed=12, strong_decay=True)


@pytest.mark.parametrize(("shape", "bcfg", "strong", "lengths"), [
    # K = 48 in three tiles of 16 (the last partial), V = 40 padded to 64; groups of one chunk.
    pytest.param(Shape(1, 70, 1, 48, 40, "fp32"), BwdConfig(value_tile="stack", value_BK=16, group_elements=1), True,
                 None, id="stack-B1-T70-H1-K48-V40-BK16-groups-fp32-strong-decay"),
    # K = 24 below one tile of 32, V = 80 not a power of two.
    pytest.param(Shape(1, 45, 1, 24, 80, "fp32"), BwdConfig(value_tile="stack", value_BK=32), False, None,
                 id="stack-B1-T45-H1-K24-V80-BK32-fp32"),
    pytest.param(Shape(2, 40, 2, 96, 40, "bf16"), BwdConfig(value_tile="stack", value_BK=32), True, None,
                 id="stack-B2-T40-H2-K96-V40-BK32-bf16-strong-decay"),
    # A packed batch: sequences shorter than a chunk, one ending inside a chunk, the index's phantom chunk slots.
    pytest.param(Shape(1, 60, 1, 32, 48, "fp32"), BwdConfig(value_tile="stack", value_BK=16), True, [5, 33, 1, 21],
                 id="stack-packed-5-33-1-21-K32-V48-fp32-strong-decay"),
])
def test_stacked_value_side_matches_float64_autograd(shape: Shape, bcfg: BwdConfig, strong: bool,
                                                     lengths: list[int] | None) -> None:
    """value_tile="stack" (2C-row block products, Y never formed) on awkward sizes, padding rows and packing."""
    check(shape, bcfg, seed=5, strong_decay=strong, lengths=lengths)


def test_stacked_value_side_reads_bf16_states() -> None:
    """S0 and dS_C stored in bf16 (state_dtype="bf16"): the stacked kernel loads either dtype. The budget is that of
    tests/test_chunk_bwd.py's bf16 states (one more bf16 rounding of the states: twice the bf16 budget)."""
    check(Shape(1, 70, 2, 48, 40, "bf16"), BwdConfig(value_tile="stack", value_BK=16, state_dtype="bf16",
                                                     precision="tf32"), seed=9, strong_decay=True,
          tol=2 * TOL["bf16"])


@pytest.mark.parametrize(("shape", "bcfg", "strong", "lengths"), [
    # K = 48 in three tiles of 16 (a grid axis of the second launch), V = 40 in three of 16 (the last partial).
    pytest.param(Shape(1, 70, 1, 48, 40, "fp32"), BwdConfig(value_tile="kv", value_BK=16, value_BV=16,
                                                            group_elements=1), True, None,
                 id="kv-B1-T70-H1-K48-V40-BK16-BV16-groups-fp32-strong-decay"),
    # K = 24 below one tile of 32, V = 80 in three tiles of 32.
    pytest.param(Shape(1, 45, 1, 24, 80, "fp32"), BwdConfig(value_tile="kv", value_BK=32, value_BV=32), False, None,
                 id="kv-B1-T45-H1-K24-V80-BK32-BV32-fp32"),
    pytest.param(Shape(1, 40, 1, 96, 40, "bf16"), BwdConfig(value_tile="kv", value_BK=64, value_BV=32), True, None,
                 id="kv-B1-T40-H1-K96-V40-BK64-BV32-bf16-strong-decay"),
    # A packed batch: sequences shorter than a chunk, one ending inside a chunk, the index's phantom chunk slots.
    pytest.param(Shape(1, 60, 1, 32, 48, "fp32"), BwdConfig(value_tile="kv", value_BK=16, value_BV=16), True,
                 [5, 33, 1, 21], id="kv-packed-5-33-1-21-K32-V48-fp32-strong-decay"),
])
def test_kv_value_side_matches_float64_autograd(shape: Shape, bcfg: BwdConfig, strong: bool,
                                                lengths: list[int] | None) -> None:
    """value_tile="kv" (a launch per V tile, then one per K tile; Y never formed) on awkward sizes, padding rows
    and packing. With fp32 states it is also what "kv16" runs (the states' dtype is fp32)."""
    check(shape, bcfg, seed=5, strong_decay=strong, lengths=lengths)


@pytest.mark.parametrize("tile", ["kv", "kv16"])
def test_kv_value_side_reads_bf16_states(tile: str) -> None:
    """S0 and dS_C stored in bf16. "kv" widens them for fp32 dots (its dO S0ᵀ is a bf16 dot: both operands are bf16
    already, so the products are exact): the bf16 states' budget of tests/test_chunk_bwd.py, twice the bf16 one.
    "kv16" also rounds the other operand of each state product (Ē, K_tail, R, dZ) to bf16, one more rounding of
    the same size as the states': three times the bf16 budget."""
    check(Shape(1, 70, 1, 48, 40, "bf16"), BwdConfig(value_tile=tile, value_BK=16, value_BV=16, state_dtype="bf16",
                                                     precision="tf32"), seed=9, strong_decay=True,
          tol=(2 if tile == "kv" else 3) * TOL["bf16"])


def test_kv_value_side_fits_and_runs_at_k_v_256() -> None:
    """At K = V = 256 (chunk 32) "kv" and "kv16" are kept as asked (their tiles do not grow with K or V, as the
    split's), not at BK = BV = 128 at chunk 64 (over the split's measured footprint: fitted to SPLIT_FALLBACK's
    tiles); "kv16" with bf16 states (BK
    32, BV 64: eight K tiles, four V tiles) matches float64 autograd."""
    shape = Shape(1, 20, 1, 256, 256, "bf16")
    for tile in ("kv", "kv16"):
        asked = BwdConfig(value_tile=tile, value_BK=32, value_BV=64)
        fitted = fit_bwd(asked, shape, 32, 4)
        assert (fitted.value_side, fitted.value_tile, fitted.value_BK, fitted.value_BV) == ("triton", tile, 32, 64)
        wide = fit_bwd(BwdConfig(value_tile=tile, value_BK=128, value_BV=128), shape, 64, 2)
        assert (wide.value_side, wide.value_tile, wide.value_BK, wide.value_BV) == ("triton", "kv", 64, 64), tile
    check(shape, BwdConfig(value_tile="kv16", value_BK=32, value_BV=64, state_dtype="bf16", precision="tf32"),
          seed=13, strong_decay=True, tol=3 * TOL["bf16"])
