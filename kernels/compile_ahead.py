"""Compile-ahead: the first call of a new (config, shape class) compiles all its Triton kernels at once, in threads.

Without it a first training step compiles its nine kernel specializations one after another, each at its first
launch: 14.7 s at the anchor shape (B=8, T=4096, H=16, K=V=128, bf16), compiled for sm90 with triton 3.6 on one
CPU core (2026-11-30, benchmarks/compile_cost.py), of which 8.5 s are the intra kernel's two specializations (the
forward's and the backward's recompute, which writes fp32). Triton releases the GIL in its MLIR/LLVM passes and
runs ptxas as a subprocess, so the compiles overlap in threads; its Python front end (under 0.2 s per kernel) does
not. With enough cores the step's compile time falls to about that of its slowest kernel.

How: :func:`prepare`, called by ``kernels.chunk.checked_forward`` before it launches, runs the forward (and, when
an input requires grad, the backward) once as a *dry run*: every launch of this package's kernels becomes
``warmup=True`` (compile, never launch) while Triton's ``AsyncCompileMode`` hands each compile to a thread pool,
and the dry run waits for all of them; then the pool builds the kernels' launchers (:func:`build_launchers`: the
small C extension Triton otherwise builds with gcc at each kernel's first launch, one after another). The real call
then finds every kernel in Triton's in-memory cache and every launcher in its file cache. The dry
run does the calls' torch work on uninitialised buffers (no kernel writes them) and allocates what one forward +
backward allocates; its results are dropped. The packed-index kernel of a packed batch (kernels/varlen.py) runs
for real, so that the dry run's torch gathers see a well-formed index.

Once per key: the configs, K, V, dtype and the flags that select a kernel variant, not B or T. A later T whose
integer arguments specialise differently (Triton specialises ints on divisibility by 16 and on == 1) compiles at
its launches as before. Off (a no-op) under the interpreter, off the GPU, during CUDA-graph capture or
``torch.compile`` tracing, with a Triton that lacks ``AsyncCompileMode`` (before 3.4), and with
``GDN2_COMPILE_AHEAD=0``. A failure inside the dry run is never raised from it: the real call follows and raises
whatever it raises.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import threading
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from typing import Any

import torch
import triton

from gdn2_tune.kernels.checks import DTYPE_NAMES
from gdn2_tune.kernels.config import Shape

ENV = "GDN2_COMPILE_AHEAD"
# One compile thread per kernel of a training step at most (nine at the anchor), and no more than the CPUs.
MAX_WORKERS = 12

_DRY_RUN = contextvars.ContextVar("gdn2_compile_ahead_dry_run", default=False)
_LOCK = threading.Lock()
_DONE: set[Hashable] = set()


def available() -> bool:
    """Whether this Triton can compile asynchronously (``triton.AsyncCompileMode``, 3.4 and later)."""
    return hasattr(triton, "AsyncCompileMode")


def enabled(device: torch.device) -> bool:
    """Whether :func:`prepare` does anything for a call on ``device``."""
    if os.environ.get(ENV, "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if device.type != "cuda" or not available() or torch.cuda.is_current_stream_capturing():
        return False
    compiler = getattr(torch, "compiler", None)
    return not (compiler is not None and compiler.is_compiling())


def _workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus))


def package_kernels() -> list[Any]:
    """The JIT kernels a chunk_gdn2 call may launch, whose launches a dry run defers (kernels/varlen.py's are left
    to launch: a packed batch's index must be real)."""
    from gdn2_tune.kernels import bwd_local, chunk_bwd, intra, pairwise, state

    jit = triton.runtime.JITFunction
    return [x for m in (intra, state, chunk_bwd, bwd_local, pairwise) for x in vars(m).values() if isinstance(x, jit)]


@contextlib.contextmanager
def deferred_launches(kernels: Sequence[Any]) -> Iterator[None]:
    """In this context (this thread, this contextvars context only) a launch ``kernel[grid](...)`` of any of
    ``kernels`` compiles without launching (``warmup=True``); launches from other threads are untouched.

    Each kernel gets an instance attribute ``run`` shadowing ``JITFunction.run`` for the duration, removed after.
    """
    patched = []
    token = _DRY_RUN.set(True)
    try:
        for kernel in kernels:
            if "run" in vars(kernel):  # someone else's override: leave it alone
                continue
            real = kernel.run

            def run(*args: Any, grid: Any, warmup: bool, _real: Callable = real, **kwargs: Any) -> Any:
                return _real(*args, grid=grid, warmup=warmup or _DRY_RUN.get(), **kwargs)

            kernel.run = run
            patched.append(kernel)
        yield
    finally:
        for kernel in patched:
            del kernel.run
        _DRY_RUN.reset(token)


def compile_in_threads(dry_run: Callable[[], object], kernels: Sequence[Any], workers: int | None = None) -> None:
    """Run ``dry_run`` with the launches of ``kernels`` deferred, their compiles spread over a thread pool, then
    build the compiled kernels' launchers in the same pool (:func:`build_launchers`); return once all are done
    (failures are left for the real launch to raise)."""
    with ThreadPoolExecutor(workers or _workers(), thread_name_prefix="gdn2-compile") as pool:
        mode = triton.AsyncCompileMode(pool, ignore_errors=True)
        with mode, deferred_launches(kernels), torch.no_grad():
            dry_run()
        # Leaving the mode finalized every compile; a failed one is None here.
        compiled = [k for k in (f.result(True) for f in getattr(mode, "future_kernels", {}).values()) if k is not None]
        launcher = _launcher_cls() if compiled else None
        if launcher is not None:
            build_launchers(pool, launcher, compiled)


def _launcher_cls() -> Callable[[Any, Any], object] | None:
    """The active driver's launcher class (``launcher(src, metadata)``), or None where this Triton has none."""
    try:
        return getattr(triton.runtime.driver.active, "launcher_cls", None)
    except Exception:  # noqa: BLE001 (no driver: nothing to build)
        return None


def build_launchers(pool: Executor, launcher: Callable[[Any, Any], object], compiled: Sequence[Any]) -> int:
    """Build the host-side launcher of each compiled kernel not yet loaded, one per distinct signature, in ``pool``
    and wait for them; returns how many were built.

    Triton builds a kernel's launcher, a small C extension, with the host's C compiler at the kernel's first launch
    (``CompiledKernel._init_handles``, ``launcher(src, metadata)``) unless its cache holds one for the same source,
    which depends only on the signature: 0.3-0.6 s each on this repo's CPU (triton 3.6, gcc; 2.7 s for the anchor
    step's 10 kernels one after another, benchmarks/compile_cost.py --launchers). A first training step's
    kernels would build theirs one after another as each first launches; here they are built at once, and the first
    launches find them in the cache. Only the launcher is built (a shared object in TRITON_CACHE_DIR; no CUDA
    context is needed): loading the kernel's binary stays with its first launch, on the caller's device. A build
    that fails is dropped: the first launch builds it again and raises what it raises."""
    jobs = {}
    for kernel in compiled:
        src = getattr(kernel, "src", None)
        if src is None or getattr(kernel, "module", None) is not None:
            continue  # failed to compile, or already loaded (its launcher exists)
        key = (repr(getattr(src, "signature", None)), repr(getattr(src, "constants", None)))
        jobs.setdefault(key, (src, kernel.metadata))
    futures = [pool.submit(launcher, src, metadata) for src, metadata in jobs.values()]
    wait(futures)
    return len(futures)


def prepare_once(key: Hashable, dry_run: Callable[[], object], kernels: Sequence[Any] | None = None) -> bool:
    """Compile ahead through ``dry_run`` the first time ``key`` is seen in this process; returns whether it ran.
    A dry run that raises is reported with one warning and not retried."""
    with _LOCK:
        if key in _DONE:
            return False
        _DONE.add(key)
        try:
            compile_in_threads(dry_run, package_kernels() if kernels is None else kernels)
        except Exception as e:  # noqa: BLE001 (the real call follows and raises what it raises)
            warnings.warn(f"gdn2 compile-ahead: the dry run failed ({type(e).__name__}: {e}); kernels compile at "
                          f"their first launch instead (set {ENV}=0 to skip the dry run)", stacklevel=3)
        return True


def prepare(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    use_qk_l2norm_in_kernel: bool,
    config: Any,
    num_seqs: int,
    bwd_config: Any | None,
    needs_grad: bool,
) -> bool:
    """What kernels.chunk.checked_forward calls on checked, contiguous inputs before it launches (the arguments of
    ``chunk_gdn2_fwd``; ``bwd_config``: the backward's, None for the built-in default; ``needs_grad``: whether the
    backward's kernels are compiled too). Returns whether a dry run ran."""
    if not enabled(q.device):
        return False
    B, T, H, K = q.shape
    V = v.shape[-1]
    flags = (initial_state is not None, output_final_state, cu_seqlens is not None, use_qk_l2norm_in_kernel)
    # bwd_config None is the built-in default, a function of the dtype (in the key).
    key = (q.device, q.dtype, g.dtype, K, V, flags, config, needs_grad, bwd_config if needs_grad else None)
    if key in _DONE:  # every call after the first: a set lookup
        return False

    def dry_run() -> None:
        from gdn2_tune.kernels.chunk import forward_launch
        from gdn2_tune.kernels.chunk_bwd import backward_launch, default_bwd_config

        fwd = forward_launch(
            q, k, v, g, b, w, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, config=config,
            num_seqs=num_seqs,
        )
        _, ht = fwd()
        if not needs_grad:
            return
        bwd = backward_launch(
            q, k, v, g, b, w, torch.empty_like(v), ht,
            scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, config=config,
            bwd_config=bwd_config or default_bwd_config(Shape(B, T, H, K, V, DTYPE_NAMES[q.dtype])), num_seqs=num_seqs,
        )
        bwd()
        if ht is not None:
            # Whether the final state's gradient reaches the backward (a constexpr of the reverse pass) is known
            # only then: compile the reverse pass for both.
            bwd_no_dht = dataclasses.replace(bwd, dht=None)
            bwd_no_dht.reverse(bwd_no_dht.recompute())

    return prepare_once(key, dry_run)
