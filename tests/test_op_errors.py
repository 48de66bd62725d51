"""Bad input raises TypeError/ValueError naming the argument, what was expected and what was received."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from gdn2_tune.kernels import chunk_gdn2
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.inputs import make_inputs


def good(**over):
    inp = make_inputs(Shape(1, 20, 2, 32, 16, "fp32"), DEVICE, seed=0)
    args = {"q": inp.q, "k": inp.k, "v": inp.v, "g": inp.g, "b": inp.b, "w": inp.w}
    args.update(over)
    return args


def call(args: dict, **kw):
    return chunk_gdn2(args["q"], args["k"], args["v"], args["g"], args["b"], args["w"], **kw)


def t(*shape, dtype=torch.float32):
    return torch.rand(*shape, dtype=dtype, device=DEVICE)


CASES = [
    pytest.param({"k": t(1, 20, 2, 16)}, {}, ValueError, r"k: expected shape \(1, 20, 2, 32\)", id="k-shape"),
    pytest.param({"g": t(1, 20, 2)}, {}, ValueError, r"g: expected 4 dims", id="g-dims"),
    pytest.param({"w": t(1, 20, 2, 8)}, {}, ValueError, r"w: expected shape \(1, 20, 2, 16\)", id="w-shape"),
    pytest.param({"v": t(2, 20, 2, 16)}, {}, ValueError, r"v: expected shape", id="v-batch"),
    pytest.param({"b": t(1, 20, 2, 32, dtype=torch.float64)}, {}, TypeError, r"b: expected dtype bf16, fp16 or fp32",
                 id="b-dtype-float64"),
    pytest.param({"v": t(1, 20, 2, 16, dtype=torch.bfloat16)}, {}, TypeError, r"v: expected dtype torch.float32",
                 id="mixed-dtypes"),
    pytest.param({"q": [1, 2]}, {}, TypeError, r"q: expected a torch.Tensor, received list", id="q-not-a-tensor"),
    pytest.param({"q": t(1, 20, 2, 320), "k": t(1, 20, 2, 320), "g": t(1, 20, 2, 320), "b": t(1, 20, 2, 320)}, {}, ValueError,
                 r"expected K and V <= 256, received K=320", id="K-over-256"),
    pytest.param({"q": t(1, 0, 2, 32), "k": t(1, 0, 2, 32), "g": t(1, 0, 2, 32), "b": t(1, 0, 2, 32), "v": t(1, 0, 2, 16),
                      "w": t(1, 0, 2, 16)}, {}, ValueError, r"q: expected T >= 1, received T=0", id="T-zero"),
    pytest.param({}, {"initial_state": t(1, 2, 16, 32)}, ValueError,
                 r"initial_state: expected shape \(1, 2, 32, 16\)", id="state-transposed"),
    pytest.param({}, {"initial_state": t(1, 2, 32, 16, dtype=torch.bfloat16)}, TypeError,
                 r"initial_state: expected dtype torch.float32, received torch.bfloat16", id="state-bf16"),
    pytest.param({}, {"initial_state": "zeros"}, TypeError, r"initial_state: expected a torch.Tensor", id="state-str"),
    pytest.param({}, {"cu_seqlens": torch.tensor([0, 5, 20], dtype=torch.float32)}, TypeError,
                 r"cu_seqlens: expected dtype int32 or int64", id="cu-float"),
    pytest.param({}, {"cu_seqlens": torch.tensor([1, 5, 20])}, ValueError, r"cu_seqlens: expected to start at 0",
                 id="cu-not-at-0"),
    pytest.param({}, {"cu_seqlens": torch.tensor([0, 12, 5, 20])}, ValueError,
                 r"cu_seqlens: expected non-decreasing", id="cu-decreasing"),
    pytest.param({}, {"cu_seqlens": torch.tensor([0, 5, 19])}, ValueError,
                 r"cu_seqlens: expected to end at T=20, received 19", id="cu-short"),
    pytest.param({}, {"cu_seqlens": torch.tensor([[0, 20]])}, ValueError, r"cu_seqlens: expected shape \[N\+1\]",
                 id="cu-2d"),
]


@pytest.mark.parametrize(("over", "kw", "exc", "match"), CASES)
def test_bad_input_names_the_argument(over: dict, kw: dict, exc: type, match: str) -> None:
    if "cu_seqlens" in kw and isinstance(kw["cu_seqlens"], torch.Tensor):
        kw = dict(kw, cu_seqlens=kw["cu_seqlens"].to(DEVICE))
    with pytest.raises(exc, match=match):
        call(good(**over), **kw)


def test_packed_batch_needs_b_equal_1() -> None:
    inp = make_inputs(Shape(2, 20, 2, 32, 16, "fp32"), DEVICE, seed=0)
    cu = torch.tensor([0, 5, 20], device=DEVICE)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected B == 1 for a packed batch, received B=2"):
        chunk_gdn2(*inp.args(), cu_seqlens=cu)




def test_initial_state_counts_sequences_when_packed() -> None:
    args = good()
    cu = torch.tensor([0, 5, 20], device=DEVICE)
    with pytest.raises(ValueError, match=r"initial_state: expected shape \(2, 2, 32, 16\)"):
        call(args, cu_seqlens=cu, initial_state=t(1, 2, 32, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mixed_devices() -> None:
    args = good(v=t(1, 20, 2, 16).to("cpu" if DEVICE == "cuda" else "cuda"))
    with pytest.raises(ValueError, match=r"v: expected device"):
        call(args)


def test_mixed_devices_on_the_cpu_with_a_meta_tensor() -> None:
    # No second real device on a CPU machine: a meta tensor is still "another device" to the check.
    args = good(w=torch.empty(1, 20, 2, 16, device="meta"))
    with pytest.raises(ValueError, match=r"w: expected device .*received meta"):
        call(args)


def test_backward_is_refused_clearly() -> None:
    args = good(q=t(1, 20, 2, 32).requires_grad_())
    with pytest.raises(NotImplementedError, match="backward pass is not implemented"):
        call(args)


def test_outputs_are_poisoned_only_when_checking() -> None:
    from gdn2_tune.kernels.buffers import is_poisoned, output_buffer, poisoned

    assert is_poisoned()  # the autouse fixture of conftest.py: every test checks NaN-poisoned outputs
    assert torch.isnan(output_buffer((3, 4), torch.bfloat16, "cpu")).all()
    import threading

    seen: list[bool] = []
    worker = threading.Thread(target=lambda: seen.append(is_poisoned()))  # a serving thread pays no fill
    worker.start()
    worker.join()
    assert seen == [False]
    with poisoned():
        assert is_poisoned()
    assert is_poisoned()
