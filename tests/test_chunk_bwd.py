"""chunk_gdn2's backward against float64 autograd through the token recurrence (kernels/reference_grad.py).

Every test draws fresh random inputs and a random upstream gradient for o and the final state, and every launcher
output starts as NaN (conftest.py), so an unwritten element fails the comparison. On the CPU the kernels run in the
Triton interpreter and the local-gradient step in torch.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import DEVICE, INTERPRETED

from gdn2_tune.kernels import chunk_gdn2
from gdn2_tune.kernels.chunk_bwd import BwdConfig, bwd_infeasibility, fit_bwd
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


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().to("cpu", torch.float64)
    assert torch.isfinite(x).all(), "non-finite values (an unwritten NaN-poisoned element, or an overflow)"
    ref = ref.to("cpu")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def with_chunk(shape: Shape, chunk: int | None) -> FwdConfig:
    cfg = default_config(shape)
    if chunk is not None:
        # The default's tiles are too big for long chunks (as in test_kernels.py's test_every_chunk_length).
        intra = {64: {"BK": 32}, 128: {"BC": 32, "BK": 16, "num_warps": 8}}.get(chunk, {})
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
    tol = TOL[shape.dtype]
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
    tol = TOL[dtype]
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
    pairs = chunk_gdn2_bwd(*inp.args(), do, dht, bwd_config=BwdConfig(group_elements=1), **common)
    auto = chunk_gdn2_bwd(*inp.args(), do, dht, bwd_config=BwdConfig(local="autograd"), **common)
    triton_side = chunk_gdn2_bwd(*inp.args(), do, dht, bwd_config=BwdConfig(key_side="triton"), **common)
    for name, a, b, c in zip(["q", "k", "v", "g", "b", "w", "h0"], pairs, auto, triton_side):
        assert rel_err(a, b.double()) < 1e-5, name
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
