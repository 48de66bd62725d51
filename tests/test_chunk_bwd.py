"""chunk_gdn2's backward against float64 autograd through the token recurrence (kernels/reference_grad.py).

Every test draws fresh random inputs and a random upstream gradient for o and the final state, and every launcher
output starts as NaN (conftest.py), so an unwritten element fails the comparison. On the CPU the kernels run in the
Triton interpreter and the local-gradient step in torch. The last section holds the backward to the forward's memory
safety for packed batches: offsets rewritten between the passes, invalid offsets, and each launcher called directly
with raw offsets between guard bands.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DEVICE, INTERPRETED

from gdn2_tune.kernels import chunk_gdn2
from gdn2_tune.kernels.chunk_bwd import G_FLOOR, BwdConfig, bwd_infeasibility, fit_bwd
from gdn2_tune.kernels.config import FwdConfig, Shape, default_config, infeasibility
from gdn2_tune.kernels.inputs import Inputs, make_inputs
from gdn2_tune.kernels.reference_grad import reference_grads

# Relative Frobenius error budgets per gradient, from the arithmetic:
# - fp32 in the interpreter: every product is exact fp32 and every accumulator fp32, so errors are a few ulps
#   (6e-8) times the growth through the solve and the chunk-to-chunk pass: ~1e-6 is seen (2e-6 for dg and db under
#   g = -10 per step); 1e-4, the forward's fp32 budget (test_kernels.py), leaves fifty times that.
# - bf16/fp16: the gradients are computed in fp32 and rounded once to the input dtype (relative 2^-9 for bf16,
#   2^-12 for fp16, rms about a third of that); the recomputed per-chunk intermediates are fp32. 4e-3 for bf16 is
#   twice the bound of one rounding; fp16 gets 1e-3 for the same reason.
# - fp32 compiled: 3xTF32 dots in the Triton passes and fp32 torch matmuls (no tf32) elsewhere: 1e-4 as well.
TOL = {"fp32": 1e-4, "bf16": 4e-3, "fp16": 1e-3}
# Stored S0 and dS_C in bf16 add one bf16 rounding of each (2^-9 relative at most) to the products that read them,
# on top of the gradients' own rounding to bf16: twice TOL's one-rounding bound for bf16. It is the budget of the
# built-in bf16 backward, which stores them so (default_bwd_config). The interpreter truncates where a GPU rounds to
# nearest, so its errors run higher: 4.6e-3 to 6.0e-3 on this file's bf16 cases, where an H200 measured 1.8e-3 to
# 2.5e-3 at 2x2048x4 (benchmarks/results/bwd-state-h200-2026-11-30-s7.jsonl).
BF16_STATES_TOL = 2 * TOL["bf16"]


def budget(shape: Shape) -> float:
    """The error budget of the built-in backward at ``shape``: TOL's, or BF16_STATES_TOL where it stores bf16
    states."""
    from gdn2_tune.kernels.chunk_bwd import default_bwd_config

    return BF16_STATES_TOL if default_bwd_config(shape).state_dtype == "bf16" else TOL[shape.dtype]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().to("cpu", torch.float64)
    assert torch.isfinite(x).all(), "non-finite values (an unwritten NaN-poisoned element, or an overflow)"
    ref = ref.to("cpu")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def with_chunk(shape: Shape, chunk: int | None) -> FwdConfig:
    cfg = default_config(shape)
    if chunk is not None:
        # The default's tiles are too big for long chunks (as in test_kernels.py's test_every_chunk_length).
        intra = {64: {"BK": 32, "num_warps": 4}, 128: {"BC": 32, "BK": 16, "num_warps": 8}}.get(chunk, {})
        state = {128: {"BV": 32, "num_stages": 1 if shape.dtype == "fp32" else 2}}.get(chunk, {})
        cfg = dataclasses.replace(cfg, chunk=chunk, intra=dataclasses.replace(cfg.intra, BC=min(cfg.intra.BC, chunk)))
        cfg = dataclasses.replace(cfg, intra=dataclasses.replace(cfg.intra, **intra),
                                  state=dataclasses.replace(cfg.state, **state))
    reason = infeasibility(cfg, shape)
    assert reason is None, reason
    return cfg


def run(inp: Inputs, cfg: FwdConfig | None, *, seed: int, scale: float | None = None, l2norm: bool = False,
        final_grad: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our gradients and the reference's, for one random upstream gradient."""
    xs = [x.detach().clone().requires_grad_(True) for x in inp.args()]
    h0 = None if inp.initial_state is None else inp.initial_state.detach().clone().requires_grad_(True)
    o, s = chunk_gdn2(*xs, scale=scale, initial_state=h0, output_final_state=final_grad, cu_seqlens=inp.cu_seqlens,
                      use_qk_l2norm_in_kernel=l2norm, config=cfg)
    gen = torch.Generator().manual_seed(seed + 1000)
    do = torch.randn(o.shape, generator=gen).to(o.device, o.dtype)
    dht = torch.randn(s.shape, generator=gen).to(s.device) if final_grad else None
    wrt = xs + ([h0] if h0 is not None else [])
    got = torch.autograd.grad([o] + ([s] if final_grad else []), wrt, [do] + ([dht] if final_grad else []))
    names = ["q", "k", "v", "g", "b", "w", "h0"]
    ours = dict(zip(names, got))
    ref = reference_grads(*inp.args(), do, dht, scale=scale, initial_state=inp.initial_state,
                          cu_seqlens=inp.cu_seqlens, use_qk_l2norm_in_kernel=l2norm)
    for name, x in ours.items():
        src = h0 if name == "h0" else xs[names.index(name)]
        assert x.dtype == src.dtype and x.shape == src.shape, name
    return ours, dict(ref.items())


def check(shape: Shape, seed: int, cfg: FwdConfig | None = None, *, strong_decay: bool = False,
          initial_state: bool = True, **kw: object) -> None:
    inp = make_inputs(shape, DEVICE, seed, strong_decay=strong_decay, initial_state=initial_state)
    ours, ref = run(inp, cfg, seed=seed, **kw)  # type: ignore[arg-type]
    tol = budget(shape)
    errs = {name: rel_err(ours[name], ref[name]) for name in ref}
    bad = {n: f"{e:.2e}" for n, e in errs.items() if not e < tol}
    assert not bad, f"gradient errors over the budget {tol:.0e}: {bad} (all: {errs})"


@pytest.mark.parametrize(
    ("shape", "chunk", "strong"),
    [
        pytest.param(Shape(2, 70, 2, 32, 32, "fp32"), 32, False, id="B2-T70-H2-K32-V32-C32-fp32"),
        pytest.param(Shape(2, 70, 2, 32, 32, "fp32"), 32, True, id="B2-T70-H2-K32-V32-C32-fp32-strong-decay"),
        pytest.param(Shape(1, 100, 2, 32, 32, "fp32"), 64, False, id="B1-T100-H2-K32-V32-C64-fp32"),
        pytest.param(Shape(1, 100, 2, 32, 32, "fp32"), 64, True, id="B1-T100-H2-K32-V32-C64-fp32-strong-decay"),
        pytest.param(Shape(1, 150, 1, 32, 32, "fp32"), 128, False, id="B1-T150-H1-K32-V32-C128-fp32"),
        pytest.param(Shape(1, 150, 1, 32, 32, "fp32"), 128, True, id="B1-T150-H1-K32-V32-C128-fp32-strong-decay"),
    ],
)
def test_every_chunk_length_with_normal_and_strong_decay(shape: Shape, chunk: int, strong: bool) -> None:
    check(shape, seed=11 + chunk + strong, cfg=with_chunk(shape, chunk), strong_decay=strong)


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(Shape(1, 1, 2, 32, 32, "fp32"), id="T1-single-token"),
        pytest.param(Shape(3, 33, 1, 32, 32, "fp32"), id="T33-one-past-a-chunk"),
        pytest.param(Shape(1, 45, 2, 48, 80, "fp32"), id="K48-V80-not-powers-of-two"),
        pytest.param(Shape(1, 20, 1, 8, 24, "fp32"), id="K8-V24-below-the-smallest-tile"),
        pytest.param(Shape(1, 40, 2, 96, 40, "bf16"), id="K96-V40-bf16"),
        pytest.param(Shape(2, 40, 2, 64, 32, "fp16"), id="K64-V32-fp16"),
        pytest.param(Shape(1, 40, 1, 32, 32, "bf16"), id="K32-V32-bf16"),
    ],
)
def test_awkward_sizes_and_dtypes(shape: Shape) -> None:
    check(shape, seed=shape.T + shape.K)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_strong_decay_with_minus_infinity(dtype: str) -> None:
    """g uniform in [-10, 0] with some steps at -inf (the channel is forgotten): every gradient stays finite."""
    shape = Shape(1, 50, 2, 32, 32, dtype)
    inp = make_inputs(shape, DEVICE, 5, strong_decay=True)
    g = inp.g.clone()
    g[0, 7, 0, :5] = float("-inf")
    g[0, 40, 1, 3:9] = float("-inf")
    inp = dataclasses.replace(inp, g=g)
    ours, ref = run(inp, None, seed=5)
    tol = budget(shape)
    for name in ref:
        assert rel_err(ours[name], ref[name]) < tol, name
    assert (ours["g"][0, 7, 0, :5] == 0).all() and (ours["g"][0, 40, 1, 3:9] == 0).all()


def test_scale_l2norm_and_no_initial_state() -> None:
    check(Shape(2, 40, 2, 32, 16, "fp32"), seed=3, scale=0.3, l2norm=True, initial_state=False)


def test_without_final_state_gradient() -> None:
    check(Shape(1, 40, 2, 32, 32, "fp32"), seed=4, final_grad=False)


@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param([45, 11, 48, 6], id="uneven"),
        pytest.param([1, 33, 1, 64], id="single-tokens-and-exact-chunks"),
        pytest.param([20, 0, 30], id="an-empty-sequence"),
    ],
)
def test_packed_batches_with_initial_state_and_final_gradient(lengths: list[int]) -> None:
    total = sum(lengths)
    shape = Shape(1, total, 2, 32, 32, "fp32")
    inp = make_inputs(dataclasses.replace(shape, num_seqs=len(lengths)), DEVICE, seed=len(lengths) + total,
                      strong_decay=lengths[0] == 20)
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(DEVICE)
    inp = dataclasses.replace(inp, cu_seqlens=cu)
    ours, ref = run(inp, None, seed=total, l2norm=True)
    for name in ref:
        assert rel_err(ours[name], ref[name]) < TOL["fp32"], name


def test_packed_sequences_do_not_leak_gradients() -> None:
    """Changing the second sequence of a packed batch leaves every gradient of the first bitwise unchanged."""
    shape = Shape(1, 57, 1, 32, 32, "fp32")
    inp = make_inputs(dataclasses.replace(shape, num_seqs=2), DEVICE, seed=9)
    inp = dataclasses.replace(inp, cu_seqlens=torch.tensor([0, 37, 57], dtype=torch.int64, device=DEVICE))
    ours, _ = run(inp, None, seed=9)
    g2 = inp.g.clone()
    g2[:, 40:] -= 1.0
    ours2, _ = run(dataclasses.replace(inp, g=g2), None, seed=9)
    for name in ("q", "k", "v", "g", "b", "w"):
        assert torch.equal(ours[name][:, :37], ours2[name][:, :37]), name
    assert torch.equal(ours["h0"][0], ours2["h0"][0])


def test_two_backward_passes_are_bitwise_equal() -> None:
    shape = Shape(2, 70, 2, 32, 32, "bf16")
    inp = make_inputs(shape, DEVICE, 21, strong_decay=True)
    xs = [x.detach().clone().requires_grad_(True) for x in inp.args()]
    h0 = inp.initial_state.clone().requires_grad_(True)
    o, s = chunk_gdn2(*xs, initial_state=h0, output_final_state=True)
    do, dht = torch.randn_like(o), torch.randn_like(s)
    first = torch.autograd.grad((o, s), xs + [h0], (do, dht), retain_graph=True)
    second = torch.autograd.grad((o, s), xs + [h0], (do, dht))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_only_the_inputs_are_saved_for_backward() -> None:
    """The memory claim: the forward keeps its inputs (and h0) for the backward and nothing else."""
    shape = Shape(1, 40, 2, 32, 32, "fp32")
    inp = make_inputs(shape, DEVICE, 2)
    xs = [x.detach().clone().requires_grad_(True) for x in inp.args()]
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        chunk_gdn2(*xs, initial_state=inp.initial_state, output_final_state=True)
    inputs = {x.data_ptr() for x in xs} | {inp.initial_state.data_ptr()}
    assert {t.data_ptr() for t in saved} <= inputs
    assert len(saved) == 7


def test_initial_state_alone_requires_grad() -> None:
    shape = Shape(1, 40, 1, 32, 32, "fp32")
    inp = make_inputs(shape, DEVICE, 8)
    h0 = inp.initial_state.clone().requires_grad_(True)
    o, _ = chunk_gdn2(*inp.args(), initial_state=h0)
    (dh0,) = torch.autograd.grad(o.sum(), h0)
    ref = reference_grads(*inp.args(), torch.ones_like(o), None, initial_state=inp.initial_state)
    assert rel_err(dh0, ref.h0) < TOL["fp32"]


def test_backward_config_fits_every_forward_chunk_at_the_largest_heads() -> None:
    """The built-in backward config is admissible (after fitting) wherever the forward's default is."""
    for dtype, nbytes in (("bf16", 2), ("fp32", 4)):
        shape = Shape(2, 4096, 16, 256, 256, dtype)
        chunk = default_config(shape).chunk
        cfg = fit_bwd(BwdConfig(), shape, chunk, nbytes)
        assert bwd_infeasibility(cfg, shape, chunk, nbytes) is None


@pytest.mark.skipif(INTERPRETED, reason="sizes for a compiled run")
@pytest.mark.gpu
def test_gpu_gradients_at_a_real_size() -> None:
    check(Shape(2, 512, 4, 128, 128, "bf16"), seed=1, strong_decay=True)


def test_pair_kernels_agree_with_autograd_through_the_pair_tensor() -> None:
    """The written-out local gradients (Triton pair products, the key-side tail in Triton or torch) against torch
    autograd through the [C, C, K] pair tensor, on one strong-decay chunk batch, with groups smaller than the batch (the group loop is exercised)."""
    from gdn2_tune.kernels.chunk_bwd import chunk_gdn2_bwd

    shape = Shape(2, 70, 2, 32, 48, "fp32")
    inp = make_inputs(shape, DEVICE, 31, strong_decay=True)
    cfg = default_config(shape)
    do = torch.randn(inp.v.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    dht = torch.randn(inp.initial_state.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    common = {"scale": 0.2, "initial_state": inp.initial_state, "cu_seqlens": None, "use_qk_l2norm_in_kernel": True,
                  "config": cfg, "num_seqs": 2}
    torch_sides = BwdConfig(group_elements=1, key_side="torch", value_side="torch")
    pairs = chunk_gdn2_bwd(*inp.args(), do, dht, bwd_config=torch_sides, **common)
    auto = chunk_gdn2_bwd(*inp.args(), do, dht, bwd_config=BwdConfig(local="autograd"), **common)
    key_triton = chunk_gdn2_bwd(*inp.args(), do, dht, bwd_config=BwdConfig(value_side="torch"), **common)
    # The fused value side, in groups smaller than the batch (each group fills its own tokens of dv and dw).
    # Both tilings (V = 48 in three tiles of 16; K = 32 in two tiles of 16).
    fused_v = chunk_gdn2_bwd(*inp.args(), do, dht, bwd_config=BwdConfig(group_elements=1, value_tile="v",
                                                                        value_BV=16), **common)
    fused_k = chunk_gdn2_bwd(*inp.args(), do, dht, bwd_config=BwdConfig(group_elements=1, value_tile="k",
                                                                        value_BK=16), **common)
    for name, a, b, *others in zip(["q", "k", "v", "g", "b", "w", "h0"], pairs, auto, key_triton, fused_v,
                                   fused_k):
        assert rel_err(a, b.double()) < 1e-5, name
        for c in others:
            assert rel_err(c, b.double()) < 1e-5, name


def test_a_short_training_loop_matches_the_float64_reference_loop() -> None:
    """A tiny GDN-2 layer (projections, gates, l2 norm in the kernel), three SGD steps: the losses and the final
    weights match the same loop run with autograd through the float64 token recurrence."""
    from gdn2_tune.kernels.reference_grad import gdn2_recurrence

    D, H, K, V, B, T = 24, 2, 16, 16, 2, 37
    gen = torch.Generator().manual_seed(0)
    init = {name: torch.randn(D, H * n, generator=gen) * 0.3
            for name, n in (("q", K), ("k", K), ("v", V), ("g", K), ("b", K), ("w", V))}
    init["o"] = torch.randn(H * V, D, generator=gen) * 0.3
    x = torch.randn(B, T, D, generator=gen)
    target = torch.randn(B, T, D, generator=gen)

    def loop(dtype: torch.dtype, ours: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        params = {n: p.to(DEVICE, dtype).clone().requires_grad_(True) for n, p in init.items()}
        xs, ys = x.to(DEVICE, dtype), target.to(DEVICE, dtype)
        losses = []
        for _ in range(3):
            def proj(name: str, n: int) -> torch.Tensor:
                return (xs @ params[name]).view(B, T, H, n)
            q, k, v = proj("q", K), proj("k", K), proj("v", V)
            g = torch.nn.functional.logsigmoid(proj("g", K)) * 4.0  # down to about -10 per step
            b, w = torch.sigmoid(proj("b", K)), torch.sigmoid(proj("w", V))
            if ours:
                o, _ = chunk_gdn2(q, k, v, g, b, w, use_qk_l2norm_in_kernel=True)
            else:
                o, _ = gdn2_recurrence(q, k, v, g, b, w, scale=K**-0.5, initial_state=None, cu_seqlens=None,
                                       use_qk_l2norm_in_kernel=True)
            loss = ((o.reshape(B, T, H * V) @ params["o"] - ys) ** 2).mean()
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                for p, d in zip(params.values(), grads):
                    p -= 0.5 * d
            losses.append(float(loss.detach()))
        return losses, {n: p.detach() for n, p in params.items()}

    got_losses, got = loop(torch.float32, ours=True)
    ref_losses, ref = loop(torch.float64, ours=False)
    assert got_losses == pytest.approx(ref_losses, rel=1e-5)
    assert ref_losses[-1] < ref_losses[0]
    for name in ref:
        assert rel_err(got[name], ref[name]) < TOL["fp32"], name


# ---------------------------------------------------------------------------------------------------------------
# Packed batches: the backward is memory-safe whatever cu_seqlens holds, as the forward is (test_kernels.py).

GUARD = 4096  # elements of guard band on each side of every buffer: wider than any stray row or chunk slot here


def _banded(x: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
    """A view of ``x``'s values inside a buffer with ``fill`` on each side, so that a stray read finds NaN."""
    big = torch.full((x.numel() + 2 * GUARD,), fill, dtype=x.dtype, device=x.device)
    big[GUARD:GUARD + x.numel()] = x.flatten()
    return big[GUARD:GUARD + x.numel()].view(x.shape)


class _Guards:
    """An ``output_buffer`` whose every buffer sits between bands of the sentinel 7.0 that no write may change."""

    def __init__(self, interior: float) -> None:
        self.interior = interior
        self.bands: list[tuple[torch.Tensor, int]] = []

    def __call__(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        big = torch.full((n + 2 * GUARD,), 7.0, dtype=dtype, device=device)
        big[GUARD:GUARD + n] = self.interior
        self.bands.append((big, n))
        return big[GUARD:GUARD + n].view(tuple(shape))

    def check(self) -> None:
        assert self.bands
        for big, n in self.bands:
            assert bool((big[:GUARD] == 7.0).all()) and bool((big[GUARD + n:] == 7.0).all()), "a write left its buffer"


def _guard_launchers(monkeypatch: pytest.MonkeyPatch, interior: float) -> _Guards:
    from gdn2_tune.kernels import chunk_bwd, intra, pairwise, state

    guards = _Guards(interior)
    for module in (intra, state, chunk_bwd, pairwise):
        monkeypatch.setattr(module, "output_buffer", guards)
    return guards


REWRITES = [
    pytest.param("data", [0, 8, 40], id="valid-through-data"),
    pytest.param("numpy", [0, 55, 40], id="past-T-through-numpy"),
    pytest.param("numpy", [-9, 30, 40], id="negative-through-numpy"),
    pytest.param("data", [0, 35, 2], id="decreasing-through-data"),
    pytest.param("numpy", [2**62, -(2**62), 2**40], id="huge-through-numpy"),
    pytest.param("setitem", [0, 3, 40], id="with-a-version-bump"),
]


@pytest.mark.parametrize(("how", "new"), REWRITES)
def test_offsets_rewritten_between_forward_and_backward(how: str, new: list[int]) -> None:
    """A data loader refilling cu_seqlens in place after the forward (no version bump through ``.data`` or
    ``.numpy()``, or a bumped one): the backward differentiates the offsets the forward ran on."""
    shape = Shape(1, 40, 2, 32, 16, "fp32", num_seqs=2)
    inp = make_inputs(shape, DEVICE, seed=17)
    cu = torch.tensor([0, 25, 40], dtype=torch.int64, device=DEVICE)
    ran_on = cu.clone()
    xs = [x.detach().clone().requires_grad_(True) for x in inp.args()]
    h0 = inp.initial_state.clone().requires_grad_(True)
    o, s = chunk_gdn2(*xs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    if how == "data":
        cu.data.copy_(torch.tensor(new))
    elif how == "numpy":
        cu.numpy()[:] = new
    else:
        cu[1] = new[1]
    assert cu.tolist() == new
    gen = torch.Generator().manual_seed(3)
    do, dht = torch.randn(o.shape, generator=gen), torch.randn(s.shape, generator=gen)
    got = torch.autograd.grad((o, s), xs + [h0], (do, dht))
    ref = reference_grads(*inp.args(), do, dht, initial_state=inp.initial_state, cu_seqlens=ran_on)
    for (name, want), ours in zip(ref.items(), got):
        assert rel_err(ours, want) < TOL["fp32"], name


SANITISED_40 = [
    pytest.param([0, 55, 40], [0, 40, 40], id="offset-past-T"),
    pytest.param([0, 33, 5, 40], [0, 33, 33, 40], id="decreasing"),
    pytest.param([3, 10, 37], [0, 10, 40], id="not-from-0-to-T"),
    pytest.param([0, -7, 2**62, -(2**62)], [0, 0, 40, 40], id="huge-and-negative"),
]


@pytest.mark.parametrize(("cu", "expected"), SANITISED_40)
def test_invalid_offsets_give_the_gradients_of_the_sanitised_ones_inside_the_buffers(
    monkeypatch: pytest.MonkeyPatch, cu: list[int], expected: list[int]
) -> None:
    """What an unchecked CUDA cu_seqlens computes: the autograd path behind chunk_gdn2 on the raw offsets gives the
    float64 gradients of the sanitised ones, with every launcher's output between sentinel bands (the Triton
    key-side launch included) and every input between NaN bands."""
    from gdn2_tune.kernels.chunk_bwd import chunk_gdn2_autograd

    guards = _guard_launchers(monkeypatch, float("nan"))
    shape = Shape(1, 40, 2, 32, 16, "fp32", num_seqs=len(cu) - 1)
    inp = make_inputs(shape, DEVICE, seed=len(cu) + 40)
    xs = [_banded(x).requires_grad_(True) for x in inp.args()]
    h0 = _banded(inp.initial_state).requires_grad_(True)
    o, s = chunk_gdn2_autograd(
        *xs, scale=32**-0.5, initial_state=h0, output_final_state=True,
        cu_seqlens=_banded(torch.tensor(cu, device=DEVICE), fill=-(2**40)), use_qk_l2norm_in_kernel=False,
        config=default_config(shape), num_seqs=shape.num_seqs, bwd_config=BwdConfig(key_side="triton"),
    )
    gen = torch.Generator().manual_seed(4)
    do, dht = torch.randn(o.shape, generator=gen), torch.randn(s.shape, generator=gen)
    got = torch.autograd.grad((o, s), xs + [h0], (do, dht))
    guards.check()
    ref = reference_grads(*inp.args(), do, dht, initial_state=inp.initial_state, cu_seqlens=torch.tensor(expected))
    for (name, want), ours in zip(ref.items(), got):
        assert rel_err(ours, want) < TOL["fp32"], name


@pytest.mark.parametrize("index", ["other-offsets", "garbage"])
@pytest.mark.parametrize("cu", [[0, 12, 5, 20], [0, 25, 20], [-7, 3, 2**40], [2**62, 0, 20]],
                         ids=["decreasing", "past-T", "negative-and-huge", "huge-first"])
def test_backward_launchers_stay_inside_their_buffers_with_raw_offsets(
    monkeypatch: pytest.MonkeyPatch, cu: list[int], index: str
) -> None:
    """The two per-sequence passes of the backward launched directly with raw offsets, and a chunk index built from
    other offsets (or out of range: slots before the first and past the last): no write leaves its buffer (sentinel
    bands) and no read does either (every input sits between NaN bands, every output starts finite, so a stray read
    that reaches a store shows up as a non-finite value)."""
    from gdn2_tune.kernels.chunk_bwd import entering_states, state_bwd
    from gdn2_tune.kernels.varlen import chunk_index

    guards = _guard_launchers(monkeypatch, 0.0)
    T, H, K, V, C = 20, 2, 32, 16, 16
    n = len(cu) - 1
    raw = torch.tensor(cu, device=DEVICE)
    valid = torch.linspace(0, T, n + 1, device=DEVICE).round().long()
    _, first, num_chunks = chunk_index(valid, C, T)
    if index == "garbage":
        first = torch.tensor([num_chunks - 1, -1, num_chunks + 1][:n], device=DEVICE)
    gen = torch.Generator().manual_seed(n)

    def rand(*size: int, low: float = -1.0) -> torch.Tensor:
        return _banded((torch.rand(*size, generator=gen) * (1 - low) + low).to(DEVICE))

    inter = {"y": rand(1, T, H, K), "u": rand(1, T, H, V), "kt": rand(1, T, H, K), "qg": rand(1, T, H, K),
             "aqk": rand(1, T, H, C), "gamma": rand(num_chunks, H, K, low=0.5)}
    packed = {"chunk": C, "cfg": BwdConfig(BV=16), "cu_seqlens": raw, "chunk_offsets": first, "num_seqs": n}
    hc = entering_states(inter, initial_state=rand(n, H, K, V), **packed)
    dhc, dh0 = state_bwd(inter, rand(1, T, H, V), rand(n, H, K, V), initial_grad=True, **packed)
    guards.check()
    for name, x in (("hc", hc), ("dhc", dhc), ("dh0", dh0)):
        assert torch.isfinite(x).all(), f"{name}: a stray read reached a store"


def test_the_layout_of_an_index_built_from_other_offsets_stays_in_the_tokens() -> None:
    """The gathers and scatters of the local-gradient step, given raw offsets and an out-of-range index: every row
    is a token of [0, T) or the padding row T (torch would raise on the CPU, fault on a GPU otherwise)."""
    from gdn2_tune.kernels.chunk_bwd import chunk_layout
    from gdn2_tune.kernels.varlen import PackedIndex

    T, C = 20, 16
    offsets = torch.tensor([-7, 3, 2**40, 5])
    pairs = torch.tensor([[0, 0], [1, -3], [2, 1], [5, 0], [-4, 2], [1, 2**20]], dtype=torch.int32)
    layout = chunk_layout(1, T, C, PackedIndex(offsets, pairs, torch.tensor([0, 1, 9]), len(pairs)), torch.device("cpu"))
    assert layout.index is not None and layout.live is not None
    assert bool(((layout.index >= 0) & (layout.index <= T)).all())
    x = torch.randn(1, T, 2, 8)
    assert layout.from_chunks(layout.to_chunks(x)).shape == x.shape
    assert not bool(layout.live[[1, 5]].any())  # chunks before or past their sequence hold no row


def test_a_packed_call_saves_its_index_not_the_callers_offsets() -> None:
    """The packed memory claim: the inputs, and the sanitised offsets and chunk index (ints per sequence and per
    chunk), never the caller's cu_seqlens (which may be rewritten before the backward runs)."""
    shape = Shape(1, 40, 2, 32, 32, "fp32", num_seqs=3)
    inp = make_inputs(shape, DEVICE, 2)
    xs = [x.detach().clone().requires_grad_(True) for x in inp.args()]
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        chunk_gdn2(*xs, initial_state=inp.initial_state, cu_seqlens=inp.cu_seqlens)
    inputs = {x.data_ptr() for x in xs} | {inp.initial_state.data_ptr()}
    extra = [t for t in saved if t.data_ptr() not in inputs]
    assert len(saved) == 10 and inp.cu_seqlens.data_ptr() not in {t.data_ptr() for t in saved}
    chunks = 40 // default_config(shape).chunk + 3
    assert sorted(t.numel() for t in extra) == sorted([4, 3, 2 * chunks])
    assert all(not t.is_floating_point() for t in extra)


def test_backward_launchers_reject_buffers_they_would_overrun() -> None:
    """Shape checks without a sync: what the kernels address unmasked must have the shape they assume."""
    from gdn2_tune.kernels.chunk_bwd import state_bwd
    from gdn2_tune.kernels.pairwise import pairs_fwd

    T, H, K, V, C = 20, 1, 16, 16, 16
    inter = {"y": torch.zeros(1, T, H, K), "kt": torch.zeros(1, T, H, K), "qg": torch.zeros(1, T, H, K),
             "aqk": torch.zeros(1, T, H, C), "gamma": torch.zeros(3, H, K)}
    packed = {"initial_grad": False, "chunk": C, "cfg": BwdConfig(BV=16), "num_seqs": 2}
    with pytest.raises(ValueError, match="cu_seqlens"):
        state_bwd(inter, torch.zeros(1, T, H, V), None, cu_seqlens=torch.tensor([0, 20]),
                  chunk_offsets=torch.tensor([0, 1]), **packed)
    with pytest.raises(ValueError, match="do"):
        state_bwd(inter, torch.zeros(1, T - 1, H, V), None, cu_seqlens=torch.tensor([0, 5, 20]),
                  chunk_offsets=torch.tensor([0, 1]), **packed)
    with pytest.raises(ValueError, match="num_seqs"):
        state_bwd(inter, torch.zeros(1, T, H, V), None, cu_seqlens=None, chunk_offsets=None, **packed)
    x = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match="G"):
        pairs_fwd(x, x, x, x[:1], strict1=True, strict2=False, BC=16, BK=16, num_warps=2, precision="ieee")


@pytest.mark.parametrize(("K", "V", "chunk", "tile"), [
    pytest.param(128, 128, 32, "v", id="K128-V128-C32-v"),
    pytest.param(64, 64, 64, "v", id="K64-V64-C64-v"),
    pytest.param(256, 256, 32, "kv", id="K256-V256-C32-kv"),
    pytest.param(128, 128, 64, "kv", id="K128-V128-C64-kv"),
])
def test_the_fused_value_side_falls_back_to_the_kv_tiling_where_it_does_not_fit(K: int, V: int, chunk: int,
                                                                                   tile: str) -> None:
    from gdn2_tune.kernels.chunk_bwd import fit_bwd

    cfg = fit_bwd(BwdConfig(), Shape(2, 256, 4, K, V, "bf16"), chunk, 4)
    assert (cfg.value_side, cfg.value_tile) == ("triton", tile)


# ---------------------------------------------------------------------------------------------------------------
# The pair backward's two methods (kernels/pairwise.py) against float64 pair tensors, and pair="dot" end to end.


def _pairs_bwd_float64(dm1: torch.Tensor, dm2: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor,
                       G: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """DX1, DX2, DY of the module docstring through the [C, C, K] tensor exp(G_r − G_s), r ≥ s, in float64."""
    C = G.shape[-2]
    diff = G.double()[..., :, None, :] - G.double()[..., None, :, :]
    causal = torch.ones(C, C, dtype=torch.bool, device=G.device).tril()[:, :, None]
    e = torch.exp(torch.where(causal, diff, torch.full((), float("-inf"), dtype=torch.float64, device=G.device)))
    d1, d2, x1, x2, y = (t.double() for t in (dm1, dm2, x1, x2, y))
    dx1 = torch.einsum("nhrs,nhsc,nhrsc->nhrc", d1, y, e)
    dx2 = torch.einsum("nhrs,nhsc,nhrsc->nhrc", d2, y, e)
    dy = torch.einsum("nhrs,nhrc,nhrsc->nhsc", d1, x1, e) + torch.einsum("nhrs,nhrc,nhrsc->nhsc", d2, x2, e)
    return dx1, dx2, dy


def _decay(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Per-step log-decays [N, H, C, K] of one regime (the pair kernels take G, their prefix sum)."""
    u = torch.rand(shape, generator=gen)
    if kind == "normal":  # every sub-block's span a few units: the factored dots only
        return -0.5 * u
    if kind == "strong":  # g = -10 per step at most: every sub-block exact, pair by pair
        return -10.0 * u
    if kind == "mixed":  # the first 16 channels strong, the others normal: K slices of both kinds in one chunk
        return torch.where(torch.arange(shape[-1]) < 16, -10.0 * u, -0.5 * u)
    if kind == "at-the-threshold":  # every sub-block spans 39.9 in one channel: the largest factor the dots take
        g = -0.5 * u
        g[..., 5] = -39.9 / 16
        return g
    assert kind == "floor", kind  # steps at the decay floor (g = -inf raised to G_FLOOR) among normal ones
    g = -0.5 * u
    g[..., ::7, 3] = G_FLOOR
    return g


@pytest.mark.parametrize("kind", ["normal", "strong", "mixed", "at-the-threshold", "floor"])
@pytest.mark.parametrize("C", [32, 64, 128])
def test_dot_pair_backward_agrees_with_float64_pair_tensors(C: int, kind: str) -> None:
    """pair="dot" at every chunk length the op offers, in every decay regime (each of its paths: the factored dots,
    the exact per-column loop, both in one chunk, the largest factor the dots take, the floor), two K slices, the
    second partial: fp32 arithmetic throughout ("ieee" dots), so the error is a sum of at most C rounded terms,
    ~C·2^-24 at worst."""
    from gdn2_tune.kernels.pairwise import pairs_bwd

    gen = torch.Generator().manual_seed(C + len(kind))
    N, H, K = 1, 1, 40
    G = _decay(kind, (N, H, C, K), gen).cumsum(-2)
    x1, x2, y = (torch.randn(N, H, C, K, generator=gen) for _ in range(3))
    dm1 = torch.randn(N, H, C, C, generator=gen).tril(-1)
    dm2 = torch.randn(N, H, C, C, generator=gen).tril()
    args = [t.to(DEVICE).contiguous() for t in (dm1, dm2, x1, x2, y, G)]
    got = pairs_bwd(*args, BC=16, BK=32, num_warps=4, precision="ieee", method="dot")
    for name, x, ref in zip(("dx1", "dx2", "dy"), got, _pairs_bwd_float64(dm1, dm2, x1, x2, y, G)):
        assert rel_err(x, ref) < 1e-5, name


@pytest.mark.parametrize(("shape", "chunk", "strong"), [
    pytest.param(Shape(2, 70, 2, 32, 32, "fp32"), 32, False, id="B2-T70-H2-K32-V32-C32-fp32"),
    pytest.param(Shape(1, 100, 2, 32, 32, "fp32"), 64, True, id="B1-T100-H2-K32-V32-C64-fp32-strong-decay"),
])
def test_the_dot_pair_backward_end_to_end(shape: Shape, chunk: int, strong: bool) -> None:
    """pair="dot" through the whole backward (the fused value side, the token-layout key-side tail) against float64
    autograd through the recurrence (every chunk length and decay regime of the pair kernel alone is above)."""
    from gdn2_tune.kernels.chunk_bwd import chunk_gdn2_autograd

    inp = make_inputs(shape, DEVICE, 40 + chunk, strong_decay=strong)
    xs = [x.detach().clone().requires_grad_(True) for x in (*inp.args(), inp.initial_state)]
    o, s = chunk_gdn2_autograd(*xs[:6], scale=shape.K**-0.5, initial_state=xs[6], output_final_state=True,
                               cu_seqlens=None, use_qk_l2norm_in_kernel=False, config=with_chunk(shape, chunk),
                               num_seqs=shape.B, bwd_config=BwdConfig(pair="dot", pair_BK=32, pair_warps=4))
    gen = torch.Generator().manual_seed(chunk)
    do, dht = torch.randn(o.shape, generator=gen).to(DEVICE), torch.randn(s.shape, generator=gen).to(DEVICE)
    got = torch.autograd.grad((o, s), xs, (do, dht))
    ref = reference_grads(*inp.args(), do, dht, initial_state=inp.initial_state)
    for (name, want), ours in zip(ref.items(), got):
        assert rel_err(ours, want) < TOL["fp32"], name


# ---------------------------------------------------------------------------------------------------------------
# The two per-sequence passes' options: the sequence split (segment_chunks) and bf16 storage of S0 and dS_C.


def _grads_with(shape: Shape, bcfg: BwdConfig, *, seed: int, decay: str = "normal",
                lengths: Sequence[int] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Ours through chunk_gdn2_autograd with ``bcfg`` (fitted by the backward as any config is) and float64
    autograd's, for a dense batch or one packed from ``lengths``; decay "normal", "strong" (g down to -10 per step)
    or "minus-inf" (strong, and some steps at g = -inf)."""
    from gdn2_tune.kernels.chunk_bwd import chunk_gdn2_autograd

    packed = None if lengths is None else dataclasses.replace(shape, num_seqs=len(lengths))
    inp = make_inputs(packed or shape, DEVICE, seed, strong_decay=decay != "normal")
    if lengths is not None:
        inp = dataclasses.replace(inp, cu_seqlens=torch.tensor([0, *lengths]).cumsum(0).to(DEVICE))
    if decay == "minus-inf":
        g = inp.g.clone()
        g[0, 3, 0, :5] = float("-inf")
        g[-1, 70, -1, 2:9] = float("-inf")
        inp = dataclasses.replace(inp, g=g)
    xs = [x.detach().clone().requires_grad_(True) for x in (*inp.args(), inp.initial_state)]
    n = shape.B if lengths is None else len(lengths)
    o, s = chunk_gdn2_autograd(*xs[:6], scale=shape.K**-0.5, initial_state=xs[6], output_final_state=True,
                               cu_seqlens=inp.cu_seqlens, use_qk_l2norm_in_kernel=False,
                               config=default_config(packed or shape), num_seqs=n, bwd_config=bcfg)
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(o.shape, generator=gen).to(DEVICE, o.dtype)
    dht = torch.randn(s.shape, generator=gen).to(DEVICE)
    got = torch.autograd.grad((o, s), xs, (do, dht))
    ref = reference_grads(*inp.args(), do, dht, initial_state=inp.initial_state, cu_seqlens=inp.cu_seqlens)
    want = dict(ref.items())
    return dict(zip(want, got)), want


def _passes_reference(x: dict[str, torch.Tensor], do: torch.Tensor, h0: torch.Tensor, dht: torch.Tensor,
                      C: int) -> tuple[torch.Tensor, ...]:
    """Both passes in float64 torch, chunk by chunk (../shared/GDN2.md): S0 of every chunk, dS_C of every chunk,
    and dh0; [NC, H, K, V] with slot b·NT + t as the dense launchers store them."""
    B, T, H, K = x["y"].shape
    NT = -(-T // C)

    def chunks(t: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, H, NT, C, D], zero padding rows
        t = torch.cat([t, t.new_zeros(B, NT * C - T, *t.shape[2:])], 1).double()
        return t.view(B, NT, C, H, -1).permute(0, 3, 1, 2, 4)

    y, u, kt, qg, aqk = (chunks(x[n]) for n in ("y", "u", "kt", "qg", "aqk"))
    d_o = chunks(do)
    gam = x["gamma"].double().view(B, NT, H, K).transpose(1, 2)
    s, hc = h0.double(), []
    for t in range(NT):
        hc.append(s)
        s = gam[:, :, t, :, None] * s + kt[:, :, t].transpose(-1, -2) @ (u[:, :, t] - y[:, :, t] @ s)
    ds, dhc = dht.double(), [torch.empty(0)] * NT
    for t in reversed(range(NT)):
        dhc[t] = ds
        dr = aqk[:, :, t].transpose(-1, -2) @ d_o[:, :, t] + kt[:, :, t] @ ds
        ds = (gam[:, :, t, :, None] * ds + qg[:, :, t].transpose(-1, -2) @ d_o[:, :, t]
              - y[:, :, t].transpose(-1, -2) @ dr)
    return torch.stack(hc, 1).reshape(B * NT, H, K, -1), torch.stack(dhc, 1).reshape(B * NT, H, K, -1), ds


@pytest.mark.parametrize("decay", ["normal", "strong", "minus-inf"])
def test_the_sequence_split_of_both_passes_against_float64(decay: str) -> None:
    """entering_states and state_bwd with segments of 2 chunks (three segments over five chunks, the last ragged
    and its last chunk partial) and of 3, against both recurrences in float64 on random per-chunk operands: the
    passes are linear in them, so any Y, U, K_tail, Q_γ, A_qk and decay exercise them. Strong decay: γ_C =
    exp(-10·C·r) (zero in fp32 for most channels); at g = -inf some channels' γ_C are exactly 0 and others 1. Two
    sequences, K != V and two V tiles keep M [K, K] and E, F [K, V] apart and every index in play. bf16 storage
    stores the fp32 run's values rounded once (the recurrences carry fp32 either way)."""
    from gdn2_tune.kernels.chunk_bwd import entering_states, state_bwd

    B, T, H, K, V, C = 2, 150, 1, 16, 32, 32
    NT = -(-T // C)
    gen = torch.Generator().manual_seed(70 + len(decay))

    def rand(*shape: int, s: float = 0.3) -> torch.Tensor:
        return (s * torch.randn(*shape, generator=gen)).to(DEVICE)

    x = {"y": rand(B, T, H, K), "u": rand(B, T, H, V, s=1.0), "kt": rand(B, T, H, K), "qg": rand(B, T, H, K),
         "aqk": rand(B, T, H, C, s=0.1)}
    r = torch.rand(B * NT, H, K, generator=gen)
    rate = {"normal": 0.02, "strong": 10.0, "minus-inf": 0.02}[decay]
    gamma = torch.exp(-rate * C * r)
    if decay == "minus-inf":
        gamma[r < 0.3] = 0.0
        gamma[r > 0.9] = 1.0
    x["gamma"] = gamma.to(DEVICE)
    do, h0, dht = rand(B, T, H, V, s=1.0), rand(B, H, K, V, s=1.0), rand(B, H, K, V, s=1.0)
    want = _passes_reference(x, do, h0, dht, C)
    common = {"chunk": C, "cu_seqlens": None, "chunk_offsets": None, "num_seqs": B}
    cfgs = [BwdConfig(BV=16, segment_chunks=2)] + ([BwdConfig(BV=32, segment_chunks=3)] if decay == "normal" else [])
    for cfg in cfgs:
        hc = entering_states(x, initial_state=h0, cfg=cfg, **common)
        dhc, dh0 = state_bwd(x, do, dht, initial_grad=True, cfg=cfg, **common)
        for name, got, ref in zip(("S0", "dS_C", "dh0"), (hc, dhc, dh0), want):
            assert rel_err(got, ref) < TOL["fp32"], (cfg.label(), name, rel_err(got, ref))
        if decay != "normal":
            continue
        cfg16 = dataclasses.replace(cfg, state_dtype="bf16")
        hc16 = entering_states(x, initial_state=h0, cfg=cfg16, **common)
        dhc16, dh0_16 = state_bwd(x, do, dht, initial_grad=True, cfg=cfg16, **common)
        assert hc16.dtype == dhc16.dtype == torch.bfloat16 and dh0_16 is not None
        for got, full in ((hc16, hc), (dhc16, dhc)):
            # One conversion each: under 2^-7 relative, one bf16 ulp (Triton's interpreter truncates, GPUs round
            # to nearest for half that).
            assert ((got.float() - full).abs() <= 2**-7 * full.abs()).all()
        assert torch.equal(dh0_16, dh0)



@pytest.mark.parametrize(("shape", "lengths", "bcfg"), [
    # Five chunks of 32, the last partial: three segments of 2, the last ragged, under g down to -10 per step.
    pytest.param(Shape(1, 150, 1, 16, 32, "bf16"), None,
                 BwdConfig(BV=16, segment_chunks=2, state_dtype="bf16", precision="tf32"), id="dense-split-tile-v"),
    # A packed batch of uneven sequences runs unsplit whatever the config says (fit_bwd); the split value side
    # reads the bf16 states too.
    pytest.param(Shape(1, 75, 1, 16, 32, "bf16"), [40, 5, 30],
                 BwdConfig(BV=16, segment_chunks=2, state_dtype="bf16", value_tile="split", value_BK=16,
                           value_BV=16), id="packed-uneven-tile-split"),
])
def test_bf16_states_and_the_split_end_to_end(shape: Shape, lengths: list[int] | None, bcfg: BwdConfig) -> None:
    ours, ref = _grads_with(shape, bcfg, seed=62, decay="strong", lengths=lengths)
    errs = {name: rel_err(ours[name], ref[name]) for name in ref}
    assert all(e < BF16_STATES_TOL for e in errs.values()), errs


def test_the_split_and_bf16_states_are_chosen_and_fitted_by_shape() -> None:
    from gdn2_tune.kernels.chunk_bwd import BWD_SEGMENT_CHUNKS, default_bwd_config

    long_few = Shape(1, 32768, 16, 128, 128, "bf16")
    assert default_bwd_config(long_few).segment_chunks == BWD_SEGMENT_CHUNKS
    for shape in (Shape(8, 4096, 16, 128, 128, "bf16"), dataclasses.replace(long_few, num_seqs=1),
                  Shape(1, 8192, 16, 128, 128, "bf16")):
        assert default_bwd_config(shape).segment_chunks == 0, shape
    # bf16 states for bf16 inputs (the measured 15.05 -> 12.61 ms at the anchor); fp16's gradients round finer
    # than a bf16 state, fp32's far finer.
    for dtype, stored in (("bf16", "bf16"), ("fp16", "fp32"), ("fp32", "fp32")):
        for shape in (dataclasses.replace(long_few, dtype=dtype), Shape(16, 2048, 8, 256, 256, dtype)):
            assert default_bwd_config(shape).state_dtype == stored, shape
    split = BwdConfig(BV=32, segment_chunks=4, state_dtype="bf16")
    dense, packed = Shape(1, 200, 2, 32, 32, "bf16"), Shape(1, 200, 2, 32, 32, "bf16", num_seqs=3)
    assert bwd_infeasibility(split, dense, 32, 4) is None
    assert "dense" in str(bwd_infeasibility(split, packed, 32, 4))
    assert "one segment" in str(bwd_infeasibility(split, dense, 64, 4))  # 4 chunks of 64
    assert "16-bit" in str(bwd_infeasibility(split, dataclasses.replace(dense, dtype="fp32"), 32, 4))
    assert fit_bwd(split, packed, 32, 4).segment_chunks == 0
    assert fit_bwd(split, dense, 64, 4).segment_chunks == 0
    assert fit_bwd(split, dense, 32, 4) == split.resolved()
    assert fit_bwd(split, dataclasses.replace(dense, dtype="fp32"), 32, 4).state_dtype == "fp32"


# ---------------------------------------------------------------------------------------------------------------
# key_side="fused": the pair backward and the key-side tail in one launch on factors re-formed from the token layout.


@pytest.mark.parametrize(("shape", "chunk", "lengths", "l2norm", "bcfg"), [
    # g down to -10 per step: every 16-row block's span passes PAIR_SAFE_SPAN, so the exact diagonal loops run.
    pytest.param(Shape(2, 40, 1, 32, 16, "fp32"), 32, None, False, BwdConfig(key_side="fused", pair_BK=16),
                 id="B2-T40-H1-K32-V16-C32-fp32-strong-decay"),
    # Four row blocks (dg's carry over three of them), K = 48 across two slices of 32 (the second half masked),
    # the l2 norm (chunk-major outputs, the torch norm backward).
    pytest.param(Shape(1, 70, 1, 48, 16, "fp32"), 64, None, True, BwdConfig(key_side="fused", pair_BK=32),
                 id="B1-T70-H1-K48-V16-C64-fp32-strong-decay-l2norm"),
    # A packed batch of uneven sequences (padding rows, a single short sequence), bf16 with bf16 states.
    pytest.param(Shape(1, 75, 1, 16, 32, "bf16"), 32, [40, 5, 30], False,
                 BwdConfig(key_side="fused", pair_BK=16, BV=16, state_dtype="bf16", precision="tf32"),
                 id="packed-40-5-30-K16-V32-bf16-strong-decay"),
    # With the recomputed Y, U, Q_γ, K_tail stored in bf16 (recompute_store="input") for the passes.
    pytest.param(Shape(1, 75, 1, 16, 32, "bf16"), 32, None, False,
                 BwdConfig(key_side="fused", pair_BK=16, BV=16, state_dtype="bf16", precision="tf32",
                           recompute_store="input"), id="B1-T75-K16-V32-bf16-strong-decay-bf16-intermediates"),
])
def test_the_fused_key_tail_against_float64(shape: Shape, chunk: int, lengths: list[int] | None, l2norm: bool,
                                            bcfg: BwdConfig) -> None:
    from gdn2_tune.kernels.chunk_bwd import chunk_gdn2_autograd

    packed = None if lengths is None else dataclasses.replace(shape, num_seqs=len(lengths))
    inp = make_inputs(packed or shape, DEVICE, 70 + chunk, strong_decay=True)
    if lengths is not None:
        inp = dataclasses.replace(inp, cu_seqlens=torch.tensor([0, *lengths]).cumsum(0).to(DEVICE))
    xs = [x.detach().clone().requires_grad_(True) for x in (*inp.args(), inp.initial_state)]
    o, s = chunk_gdn2_autograd(*xs[:6], scale=shape.K**-0.5, initial_state=xs[6], output_final_state=True,
                               cu_seqlens=inp.cu_seqlens, use_qk_l2norm_in_kernel=l2norm,
                               config=with_chunk(packed or shape, chunk), num_seqs=len(lengths or [0] * shape.B),
                               bwd_config=bcfg)
    gen = torch.Generator().manual_seed(chunk)
    do = torch.randn(o.shape, generator=gen).to(DEVICE, o.dtype)
    dht = torch.randn(s.shape, generator=gen).to(DEVICE)
    got = torch.autograd.grad((o, s), xs, (do, dht))
    ref = reference_grads(*inp.args(), do, dht, initial_state=inp.initial_state, cu_seqlens=inp.cu_seqlens,
                          use_qk_l2norm_in_kernel=l2norm)
    tol = BF16_STATES_TOL if shape.dtype == "bf16" else TOL[shape.dtype]
    errs = {name: rel_err(ours, want) for (name, want), ours in zip(ref.items(), got)}
    assert all(e < tol for e in errs.values()), errs


def test_the_fused_key_tail_is_a_tunable_of_the_triton_value_side_only() -> None:
    from gdn2_tune.kernels.chunk_bwd import bwd_tiles_that_act

    shape = Shape(2, 256, 4, 64, 64, "bf16")
    assert bwd_infeasibility(BwdConfig(key_side="fused"), shape, 32, 4) is None
    assert "value_side" in str(bwd_infeasibility(BwdConfig(key_side="fused", value_side="torch"), shape, 32, 4))
    assert "key_side" in str(bwd_infeasibility(BwdConfig(key_side="other"), shape, 32, 4))
    device = None
    # Its pair backward is the dot one: pair="elementwise" beside it would time the same kernels twice.
    assert "pair" in str(bwd_tiles_that_act(BwdConfig(key_side="fused", pair="elementwise"), shape, device))
    assert bwd_tiles_that_act(BwdConfig(key_side="fused"), shape, device) is None


# ---------------------------------------------------------------------------------------------------------------
# The passes' [K, BV] tiles in two row parts (BwdConfig.k_parts = 2).


def _random_pass_operands(seed: int, decay: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor,
                                                          torch.Tensor, tuple[torch.Tensor, ...], dict[str, Any]]:
    """Random per-chunk operands of both passes at B = 2, T = 150, H = 1, K = 40, V = 32, C = 32 (five chunks, the
    last partial), γ_C = exp(-rate·C·r) with rate 0.02 ("normal") or 10 ("strong"): ``(x, do, h0, dht, the float64
    reference of both passes, the launchers' common arguments)``."""
    B, T, H, K, V, C = 2, 150, 1, 40, 32, 32
    NT = -(-T // C)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, s: float = 0.3) -> torch.Tensor:
        return (s * torch.randn(*shape, generator=gen)).to(DEVICE)

    x = {"y": rand(B, T, H, K, s=0.2), "u": rand(B, T, H, V, s=1.0), "kt": rand(B, T, H, K, s=0.2),
         "qg": rand(B, T, H, K), "aqk": rand(B, T, H, C, s=0.1)}
    rate = {"normal": 0.02, "strong": 10.0}[decay]
    x["gamma"] = torch.exp(-rate * C * torch.rand(B * NT, H, K, generator=gen)).to(DEVICE)
    do, h0, dht = rand(B, T, H, V, s=1.0), rand(B, H, K, V, s=1.0), rand(B, H, K, V, s=1.0)
    common = {"chunk": C, "cu_seqlens": None, "chunk_offsets": None, "num_seqs": B}
    return x, do, h0, dht, _passes_reference(x, do, h0, dht, C), common


@pytest.mark.parametrize(("decay", "segments"), [("normal", 0), ("strong", 0), ("strong", 2), ("normal", 3)])
def test_both_passes_in_two_row_parts_against_float64(decay: str, segments: int) -> None:
    """entering_states and state_bwd with S and dS as two row parts, against both recurrences in float64 on random
    per-chunk operands (as the split's test above): K = 40 is held as 32 + 16 rows, so the second part is partly
    padding and the first ends inside K; V = 32 in two V tiles of 16; five chunks of 32, the last partial; with
    and without the sequence split (segments of 2 and 3 chunks, the last ragged). Strong decay: γ_C = exp(-10·C·r).
    bf16 storage stores the fp32 run's values rounded once."""
    from gdn2_tune.kernels.chunk_bwd import entering_states, state_bwd

    x, do, h0, dht, want, common = _random_pass_operands(90 + segments + len(decay), decay)
    cfg = BwdConfig(BV=16, segment_chunks=segments, k_parts=2)
    hc = entering_states(x, initial_state=h0, cfg=cfg, **common)
    dhc, dh0 = state_bwd(x, do, dht, initial_grad=True, cfg=cfg, **common)
    for name, got, ref in zip(("S0", "dS_C", "dh0"), (hc, dhc, dh0), want):
        assert rel_err(got, ref) < TOL["fp32"], (cfg.label(), name, rel_err(got, ref))
    if segments:
        return
    cfg16 = dataclasses.replace(cfg, state_dtype="bf16")
    hc16 = entering_states(x, initial_state=h0, cfg=cfg16, **common)
    dhc16, dh0_16 = state_bwd(x, do, dht, initial_grad=True, cfg=cfg16, **common)
    assert hc16.dtype == dhc16.dtype == torch.bfloat16 and dh0_16 is not None
    for got, full in ((hc16, hc), (dhc16, dhc)):
        assert ((got.float() - full).abs() <= 2**-7 * full.abs()).all()  # one bf16 conversion (see above)
    assert torch.equal(dh0_16, dh0)


@pytest.mark.parametrize(("shape", "lengths", "bcfg"), [
    # K = 48 as 32 + 16 rows (no padding), V = 40 in V tiles of 16 (the last partial); three segments of 2 chunks
    # over five, under g down to -10 per step, fp32 states.
    pytest.param(Shape(1, 150, 1, 48, 40, "fp32"), None, BwdConfig(BV=16, segment_chunks=2, k_parts=2),
                 id="dense-fp32-split-K48"),
    # A packed batch of uneven sequences (one of 5 tokens), K = 40 as 32 + 16 rows (8 of padding), bf16 states.
    pytest.param(Shape(1, 75, 1, 40, 32, "bf16"), [40, 5, 30],
                 BwdConfig(BV=16, state_dtype="bf16", precision="tf32", k_parts=2), id="packed-bf16-K40"),
])
def test_two_row_parts_end_to_end(shape: Shape, lengths: list[int] | None, bcfg: BwdConfig) -> None:
    ours, ref = _grads_with(shape, bcfg, seed=64, decay="strong", lengths=lengths)
    errs = {name: rel_err(ours[name], ref[name]) for name in ref}
    tol = BF16_STATES_TOL if bcfg.state_dtype == "bf16" else TOL[shape.dtype]
    assert all(e < tol for e in errs.values()), errs


def test_two_row_parts_are_refused_where_they_cannot_apply_and_read_back_from_older_tables() -> None:
    from gdn2_tune.kernels.chunk_bwd import BWD_SPACE, DEFAULT_BWD_CONFIG

    two = BwdConfig(k_parts=2)
    small, wide = Shape(2, 256, 4, 16, 64, "bf16"), Shape(2, 256, 4, 256, 256, "bf16")
    assert "K > 16" in str(bwd_infeasibility(two, small, 32, 4))
    assert fit_bwd(two, small, 32, 4).k_parts == 1
    assert bwd_infeasibility(two, Shape(2, 256, 4, 24, 64, "bf16"), 32, 4) is None
    assert "k_parts" in str(bwd_infeasibility(BwdConfig(k_parts=3), wide, 32, 4))
    assert fit_bwd(two, wide, 32, 2).k_parts == 2 and "-k2" in two.label() and "-k" not in BwdConfig().label()
    # Entries and trials written before the field existed ran one part: they read back so, and a one-part
    # config writes what they hold.
    old = DEFAULT_BWD_CONFIG.to_dict()
    assert "k_parts" not in old and BwdConfig.from_dict(old) == DEFAULT_BWD_CONFIG
    assert BwdConfig.from_dict(two.to_dict()) == two
    flat = {k: v for k, v in DEFAULT_BWD_CONFIG.flat().items() if k != "state.k_parts"}
    assert BwdConfig.from_flat(flat) == DEFAULT_BWD_CONFIG.resolved()
    assert BwdConfig.from_flat(two.flat()) == two.resolved() and any(p.name == "state.k_parts" for p in BWD_SPACE)


# ---------------------------------------------------------------------------------------------------------------
# The reverse pass on a tile of its own (BwdConfig.reverse_BV, reverse_warps, reverse_k_parts, reverse_stages; 0:
# the entering states').


@pytest.mark.parametrize(("decay", "segments"), [("strong", 0), ("normal", 2)])
def test_the_reverse_pass_on_its_own_tile_against_float64(decay: str, segments: int) -> None:
    """As test_both_passes_in_two_row_parts_against_float64, with the entering states in two row parts over one V
    tile of 32 and the reverse pass in one part over two V tiles of 16 on 2 warps (K = 40, V = 32, five chunks of
    32, the last partial), unsplit and split in segments of 2 chunks (whose transitions and carries run at the
    entering states' tile)."""
    from gdn2_tune.kernels.chunk_bwd import entering_states, state_bwd

    x, do, h0, dht, want, common = _random_pass_operands(95 + segments + len(decay), decay)
    cfg = BwdConfig(BV=32, k_parts=2, segment_chunks=segments, reverse_BV=16, reverse_warps=2, reverse_k_parts=1)
    hc = entering_states(x, initial_state=h0, cfg=cfg, **common)
    dhc, dh0 = state_bwd(x, do, dht, initial_grad=True, cfg=cfg, **common)
    for name, got, ref in zip(("S0", "dS_C", "dh0"), (hc, dhc, dh0), want):
        assert rel_err(got, ref) < TOL["fp32"], (cfg.label(), name, rel_err(got, ref))


@pytest.mark.parametrize(("shape", "bcfg"), [
    # bf16 with bf16 states under g down to -10 per step: the entering states in two parts (K = 40 as 32 + 16),
    # the reverse in one over V tiles of 16 (V = 32).
    pytest.param(Shape(1, 75, 1, 40, 32, "bf16"),
                 BwdConfig(BV=32, k_parts=2, state_dtype="bf16", precision="tf32", reverse_BV=16, reverse_warps=2,
                           reverse_k_parts=1), id="B1-T75-K40-V32-bf16-rev-BV16-k1"),
    # Awkward sizes (K = 24, V = 20, T = 33: one row in the second chunk), fp32: the reverse in two parts, the
    # entering states in one; two heads.
    pytest.param(Shape(1, 33, 2, 24, 20, "fp32"), BwdConfig(BV=32, reverse_BV=16, reverse_k_parts=2),
                 id="B1-T33-H2-K24-V20-fp32-rev-BV16-k2"),
])
def test_the_reverse_pass_on_its_own_tile_end_to_end(shape: Shape, bcfg: BwdConfig) -> None:
    ours, ref = _grads_with(shape, bcfg, seed=66, decay="strong")
    errs = {name: rel_err(ours[name], ref[name]) for name in ref}
    tol = BF16_STATES_TOL if bcfg.state_dtype == "bf16" else TOL[shape.dtype]
    assert all(e < tol for e in errs.values()), errs


def test_the_reverse_tile_is_fitted_on_its_own_and_reads_back_from_older_tables() -> None:
    from gdn2_tune.kernels.chunk_bwd import BWD_SPACE, DEFAULT_BWD_CONFIG, default_bwd_config, recompute_dtype

    own = BwdConfig(BV=32, k_parts=2, reverse_BV=128, reverse_warps=8, reverse_k_parts=1)
    rev = own.reverse_pass()
    assert (rev.BV, rev.num_warps, rev.k_parts, rev.num_stages) == (128, 8, 1, 3) and not rev.reverse_BV
    assert "-revBV128w8k1s3" in own.label() and "-rev" not in BwdConfig().label()
    # Fitted, the tile is written out (0 fields become the entering states' values, as tables hold them) and
    # clipped to V.
    narrow = Shape(2, 256, 4, 64, 32, "bf16")
    fitted = fit_bwd(own, narrow, 32, 4)
    assert (fitted.BV, fitted.reverse_BV, fitted.reverse_warps, fitted.reverse_k_parts, fitted.reverse_stages) == (
        32, 32, 8, 1, 3)
    parts = fit_bwd(BwdConfig(k_parts=2, reverse_k_parts=2), Shape(2, 256, 4, 16, 64, "bf16"), 32, 4)
    assert (parts.k_parts, parts.reverse_k_parts) == (1, 1)
    # The recomputed operands stay fp32 where the config's row parts are fitted away only later (K = 16).
    k16 = Shape(2, 256, 4, 16, 64, "bf16")
    assert recompute_dtype(default_bwd_config(k16), k16, 32) == torch.float32 == recompute_dtype(own, k16, 32)
    # Where only the reverse pass's tile does not fit (one stage, a smaller shared memory), only it narrows.
    wide = Shape(2, 256, 4, 256, 256, "bf16")
    tight = BwdConfig(BV=32, num_stages=1, k_parts=2, reverse_BV=128, reverse_warps=8)
    # (fp32 operands at K = 256, one stage: the reverse pass asks for ~145 KiB at BV 128, ~135 at 64.)
    assert "reverse pass" in str(bwd_infeasibility(tight, wide, 32, 4, shared_memory=140 * 1024))
    small = fit_bwd(tight, wide, 32, 4, shared_memory=140 * 1024)
    assert (small.BV, small.reverse_BV) == (32, 64) and bwd_infeasibility(small, wide, 32, 4, 140 * 1024) is None
    # Each pass its own stages: the entering states keep two where the reverse pass drops to one.
    staged = fit_bwd(BwdConfig(BV=32, k_parts=2, reverse_BV=128, reverse_warps=8), wide, 32, 4)
    assert (staged.num_stages, staged.reverse_stages, staged.reverse_BV) == (2, 1, 128)
    assert "reverse_warps" in str(bwd_infeasibility(BwdConfig(reverse_warps=3), wide, 32, 4))
    assert "reverse_stages" in str(bwd_infeasibility(BwdConfig(reverse_stages=5), wide, 32, 4))
    # Entries written before the fields existed ran one shared tile: they read back so (0 is the entering value).
    old = {k: v for k, v in own.to_dict().items() if not k.startswith("reverse_")}
    assert BwdConfig.from_dict(old) == dataclasses.replace(own, reverse_BV=0, reverse_warps=0, reverse_k_parts=0)
    assert "reverse_BV" not in DEFAULT_BWD_CONFIG.to_dict() and BwdConfig.from_dict(own.to_dict()) == own
    # The space holds the tile written out: a config flattens to the launches it runs, and reads back so.
    assert BwdConfig.from_flat(DEFAULT_BWD_CONFIG.flat()) == DEFAULT_BWD_CONFIG.resolved()
    assert DEFAULT_BWD_CONFIG.resolved().reverse_pass() == DEFAULT_BWD_CONFIG.reverse_pass()
    assert BwdConfig.from_flat(own.flat()) == own.resolved() and {
        "reverse.BV", "reverse.num_warps", "reverse.k_parts", "reverse.num_stages"} <= {p.name for p in BWD_SPACE}
    # The built-in tiles (the measured per-pass bests for 16-bit inputs; fp32 keeps one shared tile).
    for shape in (Shape(8, 4096, 16, 128, 128, "bf16"), Shape(1, 32768, 16, 128, 128, "bf16")):
        d = default_bwd_config(shape).reverse_pass()
        assert (default_bwd_config(shape).k_parts, d.BV, d.num_warps, d.k_parts) == (2, 64, 8, 1), shape
    w = default_bwd_config(Shape(16, 2048, 8, 256, 256, "bf16"))
    assert (w.BV, w.num_warps, w.k_parts, w.reverse_pass().BV, w.reverse_pass().num_warps) == (64, 8, 2, 128, 8)
    assert default_bwd_config(Shape(8, 4096, 16, 128, 128, "fp32")).reverse_pass() == default_bwd_config(
        Shape(8, 4096, 16, 128, 128, "fp32"))


# ---------------------------------------------------------------------------------------------------------------
# Subsets of the recomputed Y, U, Q_γ, K_tail stored in the input dtype (BwdConfig.recompute_store).


@pytest.mark.parametrize("store", ["u", "uqg", "uy", "ukt", "uykt"])
def test_recompute_store_subsets_against_float64(store: str) -> None:
    """Each subset stores exactly its tensors in bf16 (the rest fp32), and the gradients stay within the budget of
    the all-bf16 store (test_the_fused_key_tail_against_float64's "input" case) under g down to -10 per step."""
    from gdn2_tune.kernels.bwd_spec import BwdRun
    from gdn2_tune.kernels.chunk_bwd import RECOMPUTE_STORE_TENSORS

    shape = Shape(1, 75, 1, 16, 32, "bf16")
    bcfg = BwdConfig(BV=16, state_dtype="bf16", precision="tf32", recompute_store=store)
    inter = BwdRun(Shape(1, 40, 1, 16, 16, "bf16"), DEVICE).launch(bcfg).recompute()
    for name in ("y", "u", "qg", "kt"):
        want = torch.bfloat16 if name in RECOMPUTE_STORE_TENSORS[store] else torch.float32
        assert getattr(inter, name).dtype == want, (store, name)
    ours, ref = _grads_with(shape, bcfg, seed=68, decay="strong")
    errs = {name: rel_err(ours[name], ref[name]) for name in ref}
    assert all(e < BF16_STATES_TOL for e in errs.values()), errs


def test_the_passes_budget_refuses_every_config_measured_over_the_shared_memory_limit() -> None:
    """tests/data/bwd_pass_shared_memory.json holds the compiled shared memory of both passes (sm_90, triton 3.6,
    benchmarks/compile_bwd_smem.py: every store, V tiles 64 and 128, 1-3 stages, K = V = 128 and 256). Every config
    over the limit is refused by the budget (one that is not fails to compile where it is launched), and the budget
    still accepts most of those that fit."""
    import json

    from gdn2_tune.kernels.chunk_bwd import _pass_infeasibility, default_bwd_config, pass_operand_bytes

    data = json.loads((Path(__file__).parent / "data" / "bwd_pass_shared_memory.json").read_text())
    limit, accepted_that_fit, fit = data["limit"], 0, 0
    for row in data["rows"]:
        shape = Shape(16, 2048, 8, row["K"], row["K"], "bf16")
        cfg = dataclasses.replace(
            default_bwd_config(shape).resolved(), recompute_store=row["store"], BV=row["BV"], num_stages=row["stages"],
            reverse_BV=row["BV"], reverse_stages=row["stages"], k_parts=2, reverse_k_parts=2, num_warps=8,
            reverse_warps=8)
        tile = cfg.reverse_pass() if row["pass"] == "reverse pass" else cfg
        ok = _pass_infeasibility(row["pass"], tile, shape, 32, pass_operand_bytes(shape, 32), limit) is None
        assert not (ok and row["smem"] > limit), row
        fit += row["smem"] <= limit
        accepted_that_fit += ok
    assert len(data["rows"]) == 120 and accepted_that_fit >= 0.85 * fit, (accepted_that_fit, fit)
