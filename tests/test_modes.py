"""chunk_gdn2 in every mode a caller runs it: torch.inference_mode(), torch.no_grad(), plain, dense and packed,
and captured in a CUDA graph (GPU only). Each result is checked against the float64 reference."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from conftest import DEVICE, INTERPRETED

from gdn2_tune.kernels import chunk_gdn2, gdn2_reference
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.reference import rel_err

# fp32 budgets of tests/test_kernels.py for the default's "tf32rn" intra dots (interpreter: exact products of
# operands rounded to nearest TF32, TF32RN_TOL = 2^-10; GPU: TF32 truncation elsewhere too).
TOL = 2**-10 if INTERPRETED else 2e-3

MODES: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "inference_mode": torch.inference_mode,
    "no_grad": torch.no_grad,
    "grad-enabled": contextlib.nullcontext,
}

SHAPES = [
    pytest.param(Shape(2, 45, 2, 32, 24, "fp32"), id="dense-B2-T45-H2-K32-V24"),
    pytest.param(Shape(1, 77, 2, 32, 24, "fp32", num_seqs=3), id="packed-T77-N3-H2-K32-V24"),
]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", SHAPES)
def test_every_mode_matches_the_reference(mode: str, shape: Shape) -> None:
    # The inputs, cu_seqlens included, are made inside the mode: under inference_mode they are inference
    # tensors, which have no version counter (the old per-tensor memo failed on them).
    with MODES[mode]():
        inp = make_inputs(shape, DEVICE, seed=shape.T)
        o, s = chunk_gdn2(*inp.args(), initial_state=inp.initial_state, output_final_state=True,
                          cu_seqlens=inp.cu_seqlens)
        if mode == "inference_mode":
            assert inp.cu_seqlens is None or inp.cu_seqlens.is_inference()
            assert o.is_inference()
    ref_o, ref_s = gdn2_reference(*inp.args(), initial_state=inp.initial_state, cu_seqlens=inp.cu_seqlens)
    assert rel_err(o, ref_o) < TOL and rel_err(s, ref_s) < TOL


def test_inference_tensors_used_outside_inference_mode() -> None:
    # Serving code may build cu_seqlens once under inference_mode and call the op later without it.
    shape = Shape(1, 40, 1, 32, 32, "fp32", num_seqs=2)
    with torch.inference_mode():
        inp = make_inputs(shape, DEVICE, seed=3)
    o, s = chunk_gdn2(*inp.args(), initial_state=inp.initial_state, output_final_state=True,
                      cu_seqlens=inp.cu_seqlens)
    ref_o, ref_s = gdn2_reference(*inp.args(), initial_state=inp.initial_state, cu_seqlens=inp.cu_seqlens)
    assert rel_err(o, ref_o) < TOL and rel_err(s, ref_s) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [
    pytest.param(Shape(2, 300, 4, 64, 64, "bf16"), id="dense-B2-T300-H4-K64-V64-bf16"),
    pytest.param(Shape(1, 700, 4, 64, 64, "bf16", num_seqs=5), id="packed-T700-N5-H4-K64-V64-bf16"),
])
def test_cuda_graph_capture_and_replay(shape: Shape) -> None:
    """A captured call replays to the eager result, also after the inputs (cu_seqlens included) are refilled in
    place with new values: the chunk index is rebuilt inside the graph, from the new offsets."""
    inp = make_inputs(shape, "cuda", seed=1)
    args = [x.clone() for x in inp.args()]
    h0 = inp.initial_state.clone()
    cu = None if inp.cu_seqlens is None else inp.cu_seqlens.clone()
    with torch.inference_mode():

        def call() -> tuple[torch.Tensor, torch.Tensor]:
            return chunk_gdn2(*args, initial_state=h0, output_final_state=True, cu_seqlens=cu)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            call()  # compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o, s = call()
        for seed in (1, 2):
            new = make_inputs(shape, "cuda", seed=seed)
            for dst, src in zip(args, new.args(), strict=True):
                dst.copy_(src)
            h0.copy_(new.initial_state)
            if cu is not None:
                lengths = torch.tensor([0, 100, 1, 299, 0, 300], device="cuda").cumsum(0)
                cu.copy_(lengths if seed == 2 else new.cu_seqlens)
            graph.replay()
            torch.cuda.synchronize()
            ref_o, ref_s = gdn2_reference(*args, initial_state=h0, cu_seqlens=cu, device="cuda")
            # bf16 budget of tests/test_kernels.py (compiled).
            assert rel_err(o, ref_o) < 1e-2 and rel_err(s, ref_s) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [
    pytest.param(Shape(2, 300, 4, 64, 64, "bf16"), id="dense-B2-T300-H4-K64-V64-bf16"),
    pytest.param(Shape(1, 700, 4, 64, 64, "bf16", num_seqs=5), id="packed-T700-N5-H4-K64-V64-bf16"),
])
def test_forward_and_backward_capture_in_one_cuda_graph(shape: Shape) -> None:
    """A training step's GDN-2 part (forward + backward, torch.cuda.make_graphed_callables) replays to the eager
    gradients bitwise: no host sync, no allocation the graph cannot own, the same deterministic launches."""
    inp = make_inputs(shape, "cuda", seed=3)
    cu = inp.cu_seqlens

    def step(q, k, v, g, b, w, h0):
        return chunk_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True, cu_seqlens=cu)

    leaves = [x.detach().clone().requires_grad_(True) for x in (*inp.args(), inp.initial_state)]
    graphed = torch.cuda.make_graphed_callables(step, tuple(leaves))
    gen = torch.Generator(device="cuda").manual_seed(4)
    do = torch.randn(inp.v.shape, generator=gen, device="cuda").to(inp.v.dtype)
    dht = torch.randn(inp.initial_state.shape, generator=gen, device="cuda")
    eager = torch.autograd.grad(step(*leaves), leaves, (do, dht))
    replayed = torch.autograd.grad(graphed(*leaves), leaves, (do, dht))
    for name, a, b in zip(["q", "k", "v", "g", "b", "w", "h0"], eager, replayed, strict=True):
        assert torch.equal(a, b), name
