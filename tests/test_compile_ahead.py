"""Compile-ahead (kernels/compile_ahead.py): deferred launches, once per key, off under the interpreter.

The interpreter compiles nothing, so on the CPU these test the machinery with stand-in kernels; the gpu test
checks that after the dry run a real forward + backward compiles nothing more.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import pytest
import torch
import triton
from conftest import DEVICE, INTERPRETED

from gdn2_tune.kernels import compile_ahead
from gdn2_tune.kernels.chunk import chunk_gdn2
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.inputs import make_inputs


class StandIn:
    """What a launch does to a Triton JITFunction: ``kernel[grid](*args)`` calls ``run(..., warmup=False)``."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        self.calls.append(warmup)

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)


def test_launches_deferred_in_the_context_only() -> None:
    a, b = StandIn(), StandIn()
    other: list[None] = []
    with compile_ahead.deferred_launches([a, b]):
        a[(1,)](0)
        b[(2,)](0, x=1)
        # Another thread's launch of the same kernel, during the dry run, is a real launch.
        t = threading.Thread(target=lambda: other.append(a[(1,)](0)))
        t.start()
        t.join()
    a[(1,)](0)
    assert a.calls == [True, False, False]
    assert b.calls == [True]
    assert "run" not in vars(a) and "run" not in vars(b)


def test_deferral_undone_after_an_error() -> None:
    a = StandIn()
    with pytest.raises(RuntimeError, match="boom"), compile_ahead.deferred_launches([a]):
        raise RuntimeError("boom")
    a[(1,)](0)
    assert a.calls == [False] and "run" not in vars(a)


@pytest.mark.skipif(not compile_ahead.available(), reason="this Triton has no AsyncCompileMode")
def test_once_per_key_and_failures_warn() -> None:
    a = StandIn()
    ran: list[int] = []

    def dry_run() -> None:
        a[(1,)](0)
        ran.append(1)

    key = ("test_once_per_key", os.getpid())
    assert compile_ahead.prepare_once(key, dry_run, [a])
    assert not compile_ahead.prepare_once(key, dry_run, [a])
    assert ran == [1] and a.calls == [True]

    def broken() -> None:
        raise ValueError("no kernel today")

    with pytest.warns(UserWarning, match="no kernel today"):
        assert compile_ahead.prepare_once(("test_broken", os.getpid()), broken, [a])


class Compiled:
    """A compiled kernel as build_launchers reads it: its source's signature and constants, its metadata, and
    ``module`` (None until Triton loads it at the first launch)."""

    def __init__(self, signature: dict, constants: dict, loaded: bool = False) -> None:
        self.src = type("Src", (), {"signature": signature, "constants": constants})()
        self.metadata = object()
        self.module = object() if loaded else None


def test_launchers_are_built_once_per_signature_of_the_kernels_not_yet_loaded() -> None:
    from concurrent.futures import ThreadPoolExecutor

    built: list[Any] = []
    lock = threading.Lock()

    def launcher(src: Any, metadata: Any) -> None:
        with lock:
            built.append(src)
        if src.constants.get("BROKEN"):
            raise RuntimeError("gcc: not today")  # dropped: the first launch builds it again and raises

    two = ({0: "*bf16", 1: "i32"}, {"C": 32})
    kernels = [Compiled(*two), Compiled(*two), Compiled({0: "*fp32", 1: "i32"}, {"C": 32}),
               Compiled({0: "*fp32"}, {"C": 64}, loaded=True), Compiled({0: "*fp32"}, {"BROKEN": 1})]
    with ThreadPoolExecutor(4) as pool:
        assert compile_ahead.build_launchers(pool, launcher, kernels) == 3
    assert len(built) == 3
    assert {(repr(s.signature), repr(s.constants)) for s in built} == {
        (repr(two[0]), repr(two[1])), (repr({0: "*fp32", 1: "i32"}), repr({"C": 32})),
        (repr({0: "*fp32"}), repr({"BROKEN": 1}))}


def test_off_under_the_interpreter_and_off_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not compile_ahead.enabled(torch.device("cpu"))
    monkeypatch.setenv(compile_ahead.ENV, "0")
    assert not compile_ahead.enabled(torch.device("cuda"))
    if INTERPRETED:
        monkeypatch.delenv(compile_ahead.ENV)
        assert not compile_ahead.enabled(torch.device("cuda"))
        # A call through the op runs no dry run (no warning, and the key is never recorded).
        inp = make_inputs(Shape(1, 5, 1, 16, 16, "fp32"), DEVICE, seed=0)
        xs = [x.detach().requires_grad_() for x in inp.args()]
        before = set(compile_ahead._DONE)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            o, _ = chunk_gdn2(*xs)
        o.sum().backward()
        assert compile_ahead._DONE == before
        assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)


@pytest.mark.gpu
def test_real_step_compiles_nothing_after_the_dry_run(monkeypatch: pytest.MonkeyPatch) -> None:
    if not compile_ahead.available():
        pytest.skip("this Triton has no AsyncCompileMode")
    # T, H and the flags of a key no other test uses, so that its kernels are not in memory yet.
    inp = make_inputs(Shape(2, 200, 3, 64, 32, "bf16"), DEVICE, seed=1)
    xs = [x.detach().requires_grad_() for x in inp.args()]
    h0 = inp.initial_state.detach().requires_grad_()
    compiled: list[str] = []

    def hook(*, key: Any, repr: str, fn: Any, compile: Any, is_manual_warmup: bool, already_compiled: bool) -> None:
        if not is_manual_warmup:
            compiled.append(repr)

    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", hook)
    o, ht = chunk_gdn2(*xs, initial_state=h0, output_final_state=True)
    torch.autograd.backward([o, ht], [torch.randn_like(o), torch.randn_like(ht)])
    torch.cuda.synchronize()
    assert compiled == []
