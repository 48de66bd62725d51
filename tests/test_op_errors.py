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


def test_double_backward_is_refused_clearly() -> None:
    args = good(q=t(1, 20, 2, 32).requires_grad_())
    o, _ = call(args)
    with pytest.raises(RuntimeError, match="double backward is not implemented"):
        torch.autograd.grad(o.sum(), args["q"], create_graph=True)


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


def z(*shape):
    return torch.zeros(*shape, device=DEVICE)


EMPTY_DIMS = [
    pytest.param({"q": z(1, 20, 2, 0), "k": z(1, 20, 2, 0), "g": z(1, 20, 2, 0), "b": z(1, 20, 2, 0)}, r"q: expected every "
                 r"dimension of \[B, T, H, D\] >= 1, received shape \(1, 20, 2, 0\)", id="K-zero"),
    pytest.param({"v": z(1, 20, 2, 0), "w": z(1, 20, 2, 0)}, r"v: expected every dimension .* \(1, 20, 2, 0\)",
                 id="V-zero"),
    pytest.param({x: z(1, 20, 0, d) for x, d in (("q", 32), ("k", 32), ("g", 32), ("b", 32), ("v", 16), ("w", 16))},
                 r"q: expected every dimension .* \(1, 20, 0, 32\)", id="H-zero"),
    pytest.param({x: z(0, 20, 2, d) for x, d in (("q", 32), ("k", 32), ("g", 32), ("b", 32), ("v", 16), ("w", 16))},
                 r"q: expected every dimension .* \(0, 20, 2, 32\)", id="B-zero"),
]


@pytest.mark.parametrize(("over", "match"), EMPTY_DIMS)
def test_empty_dimensions_are_a_clean_value_error(over: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):  # K=0 was a ZeroDivisionError from K ** -0.5
        call(good(**over))


OPTIONS = [
    pytest.param({"output_final_state": "no"}, TypeError, r"output_final_state: expected a bool, received str 'no'",
                 id="output_final_state-str"),
    pytest.param({"output_final_state": 1}, TypeError, r"output_final_state: expected a bool, received int 1",
                 id="output_final_state-int"),
    pytest.param({"use_qk_l2norm_in_kernel": None}, TypeError,
                 r"use_qk_l2norm_in_kernel: expected a bool, received NoneType None", id="l2norm-None"),
    pytest.param({"scale": "abc"}, TypeError, r"scale: expected a real number or None, received str 'abc'",
                 id="scale-str"),
    pytest.param({"scale": True}, TypeError, r"scale: expected a real number or None, received bool True",
                 id="scale-bool"),
    pytest.param({"scale": torch.tensor(0.5)}, TypeError, r"scale: expected a real number or None, received Tensor",
                 id="scale-tensor"),
    pytest.param({"scale": float("nan")}, ValueError, r"scale: expected a finite number, received nan", id="scale-nan"),
    pytest.param({"scale": float("inf")}, ValueError, r"scale: expected a finite number, received inf", id="scale-inf"),
]


@pytest.mark.parametrize(("kw", "exc", "match"), OPTIONS)
def test_options_are_type_checked(kw: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        call(good(), **kw)


def _config(**changes):
    import dataclasses

    from gdn2_tune.kernels.config import default_config

    cfg = default_config(Shape(1, 20, 2, 32, 16, "fp32"))
    for key, value in changes.items():
        stage, _, field = key.rpartition(".")
        if stage:
            cfg = dataclasses.replace(cfg, **{stage: dataclasses.replace(getattr(cfg, stage), **{field: value})})
        else:
            cfg = dataclasses.replace(cfg, **{field: value})
    return cfg


CONFIG_TYPES = [
    pytest.param({"chunk": 32.0}, r"config.chunk: expected int, received float 32.0", id="chunk-float"),
    pytest.param({"chunk": True}, r"config.chunk: expected int, received bool True", id="chunk-bool"),
    pytest.param({"intra.BK": 32.0}, r"config.intra.BK: expected int, received float 32.0", id="BK-float"),
    pytest.param({"intra.BV": 32.0}, r"config.intra.BV: expected int, received float 32.0", id="intra-BV-float"),
    pytest.param({"state.BV": 32.0}, r"config.state.BV: expected int, received float 32.0", id="state-BV-float"),
    pytest.param({"intra.num_warps": 4.0}, r"config.intra.num_warps: expected int, received float 4.0",
                 id="num_warps-float"),
    pytest.param({"state.num_stages": True}, r"config.state.num_stages: expected int, received bool True",
                 id="num_stages-bool"),
    pytest.param({"intra.num_stages": True}, r"config.intra.num_stages: expected int, received bool True",
                 id="intra-num_stages-bool"),
    pytest.param({"state.precision": 1}, r"config.state.precision: expected str, received int 1", id="precision-int"),
    pytest.param({"state": {"BV": 32}}, r"config.state: expected a StateConfig, received dict", id="state-dict"),
]


@pytest.mark.parametrize(("changes", "match"), CONFIG_TYPES)
def test_explicit_config_fields_are_type_checked(changes: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        call(good(), config=_config(**changes))


def test_wrongly_typed_config_is_infeasible_for_the_tuner_too() -> None:
    from gdn2_tune.kernels.config import infeasibility

    reason = infeasibility(_config(**{"intra.BK": 32.0}), Shape(1, 20, 2, 32, 16, "fp32"))
    assert reason == "config.intra.BK: expected int, received float 32.0"


def test_cpu_without_the_interpreter_says_what_to_do() -> None:
    """Without TRITON_INTERPRET=1 at import, CPU tensors used to end in Triton's "0 active drivers"."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from gdn2_tune.kernels import chunk_gdn2\n"
        "x = torch.rand(1, 8, 1, 16)\n"
        "try:\n"
        "    chunk_gdn2(x, x, x, -x, x, x)\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert "ValueError: q: CPU tensors need the Triton interpreter" in out.stdout, out.stdout + out.stderr
    assert "set TRITON_INTERPRET=1 in the environment before importing it, or pass CUDA tensors" in out.stdout


# The values of a CUDA cu_seqlens are not read back by default (a host sync per call); a CPU one costs nothing to
# read, so it is checked on every call, whatever wrote it.
def _packed(lengths: list[int]):
    inp = make_inputs(Shape(1, sum(lengths), 2, 32, 16, "fp32", num_seqs=len(lengths)), DEVICE, seed=0)
    return inp, torch.tensor([0, *lengths]).cumsum(0)


def test_cpu_offsets_rewritten_without_a_version_bump_are_checked_again() -> None:
    if DEVICE != "cpu":
        pytest.skip("a CPU cu_seqlens needs CPU inputs")
    inp, cu = _packed([5, 15])
    chunk_gdn2(*inp.args(), cu_seqlens=cu)
    version = cu._version
    cu.numpy()[1] = 25  # past T=20, and invisible to the version counter
    assert cu._version == version
    with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing offsets, received \[0, 25, 20\]"):
        chunk_gdn2(*inp.args(), cu_seqlens=cu)
    cu.data[1] = 38
    with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing offsets, received \[0, 38, 20\]"):
        chunk_gdn2(*inp.args(), cu_seqlens=cu)


CHECKED = [
    pytest.param({"cu_seqlens": [0, 25, 20]}, r"cu_seqlens: expected non-decreasing offsets, received \[0, 25, 20\]",
                 id="offset-past-T"),
    pytest.param({"cu_seqlens": [0, 5, 21]}, r"cu_seqlens: expected to end at T=20, received 21", id="end-past-T"),
    pytest.param({"g_at": 0.5}, r"g: expected log-decays <= 0 \(natural log; -inf forgets a channel\), received 1 "
                 r"values > 0 or NaN, the first 0.5", id="g-positive"),
    pytest.param({"g_at": float("nan")}, r"g: expected log-decays <= 0 .* received 1 values > 0 or NaN, the first nan",
                 id="g-nan"),
    pytest.param({"g_at": float("inf")}, r"g: expected log-decays <= 0 .* the first inf", id="g-plus-inf"),
]


@pytest.mark.parametrize(("bad", "match"), CHECKED)
def test_checked_mode_rejects_values(monkeypatch: pytest.MonkeyPatch, bad: dict, match: str) -> None:
    inp, cu = _packed([5, 15])
    g = inp.g.clone()
    if "g_at" in bad:
        g[0, 7, 1, 3] = bad["g_at"]
    if "cu_seqlens" in bad:
        cu = torch.tensor(bad["cu_seqlens"])
    args = [inp.q, inp.k, inp.v, g, inp.b, inp.w]
    monkeypatch.setenv("GDN2_CHECK_INPUTS", "1")
    with pytest.raises(ValueError, match=match):
        chunk_gdn2(*args, cu_seqlens=cu.to(DEVICE))


def test_checked_mode_accepts_minus_inf(monkeypatch: pytest.MonkeyPatch) -> None:
    inp, cu = _packed([5, 15])
    g = inp.g.clone()
    g[0, 7, 1, 3] = -float("inf")
    monkeypatch.setenv("GDN2_CHECK_INPUTS", "1")
    o, _ = chunk_gdn2(inp.q, inp.k, inp.v, g, inp.b, inp.w, cu_seqlens=cu.to(DEVICE))
    assert torch.isfinite(o).all()
