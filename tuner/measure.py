"""What a worker process does with a config: gate it on correctness, then time it. Runs inside the worker.

Kept apart from the study logic so that a CUDA fault, which poisons the process it happens in, costs one worker
and never the study. Everything here takes and returns plain data that crosses a pipe as JSON.

Correctness gate: the forward at a small shape (``tuner.suite.gate_shape``: same K, V, dtype and layout, T not a
multiple of the chunk, strong decay, a random initial state) against the float64 reference, on outputs the
launchers pre-fill with NaN. Thresholds on the relative Frobenius error of ``o`` and of the final state:

- fp32 inputs: 2e-3. The dots run in tf32 (10-bit mantissa, unit roundoff 4.9e-4); the reference baseline
  measures 1.4e-3 for fp32 inputs, so 2e-3 passes a correct kernel and fails any indexing or masking bug, which
  shows up as O(1) error.
- bf16/fp16 inputs: 1e-2. The intermediates the intra stage hands to the state stage (Y, U, Q_γ, A_qk) are stored
  in the input dtype, each rounded at bf16's unit roundoff 3.9e-3; the baseline measures 3.8e-3, and 1e-2 leaves
  room for the chunk length's accumulation order while still failing a wrong answer.
- any NaN or Inf fails, whatever the error.

Timing: each repetition first overwrites a buffer larger than L2 (so no config is timed on inputs another left in
cache), then records CUDA events around a CUDA-graph replay of the launches (eager launches where a graph cannot
be captured; the trial records which); p20/p50/p80 over repetitions, ranked on the median.
Outputs are allocated uninitialised, as in a serving call; only the correctness gate fills them with NaN first.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gdn2_tune.kernels.buffers import poisoned
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.reference import rel_err
from gdn2_tune.kernels.spec import DEFAULT_OP, KernelSpec, OpRun, get_spec
from gdn2_tune.tuner.outcome import Outcome, Status, failed, ok

# L2 is 50 MB on H100 and 60 MB on H200; twice the reported size (256 MiB when unknown) leaves no line of the
# previous repetition resident.
FLUSH_MIN_BYTES = 256 * 1024 * 1024
# Repetitions: enough for stable quantiles of a ~1 ms kernel without spending the study's budget on one trial.
TARGET_MS_PER_TRIAL = 150.0
MIN_REPS = 10
MAX_REPS = 200
INTERPRET_REPS = 2


class Fault(RuntimeError):
    """An error after which the CUDA context of this process cannot be trusted; the worker must exit."""


@dataclass(frozen=True)
class Quantiles:
    p20_ms: float
    p50_ms: float
    p80_ms: float

    def to_dict(self) -> dict[str, float]:
        return {"p20_ms": self.p20_ms, "p50_ms": self.p50_ms, "p80_ms": self.p80_ms}


def quantiles(samples: Sequence[float]) -> Quantiles:
    """Linear-interpolated p20/p50/p80 (numpy's default method) of a non-empty sample."""
    xs = sorted(samples)
    assert xs, "quantiles of an empty sample"

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return Quantiles(q(0.2), q(0.5), q(0.8))


def classify(err: BaseException) -> tuple[Status, str]:
    """(status, reason) for an exception raised while compiling or running a config."""
    text = f"{type(err).__name__}: {err}".strip()
    first = text.splitlines()[0][:500] if text else type(err).__name__
    name = type(err).__name__
    if name == "OutOfResources" or "out of resource" in text.lower():
        return Status.OUT_OF_RESOURCES, first
    if name in ("CompilationError", "CompileTimeAssertionFailure") or "compil" in name.lower():
        return Status.COMPILE_ERROR, first
    lowered = text.lower()
    if "cuda error" in lowered or "illegal" in lowered or "misaligned" in lowered or "unspecified launch" in lowered:
        return Status.FAULT, first
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return Status.OUT_OF_MEMORY, first
    return Status.ERROR, first


class Bench:
    """One op's inputs and scratch at one shape on one device: built once, reused for every config of a study.

    What runs is the op's (``KernelSpec.prepare``); how it is timed (L2 flush, CUDA graphs, repetitions) is here.
    """

    def __init__(
        self, shape: Shape, device: str, *, op: str = DEFAULT_OP, seed: int = 0, strong_decay: bool = False,
        use_graphs: bool = True,
    ) -> None:
        self.shape = shape
        self.device = device
        self.spec: KernelSpec = get_spec(op)
        self.run: OpRun = self.spec.prepare(shape, device, seed=seed, strong_decay=strong_decay)
        self.cuda = device.startswith("cuda")
        self._flush_buffer: torch.Tensor | None = None  # allocated by the first timing: gate workers never need it
        self.use_graphs = use_graphs
        self._graphs: list[Any] = []

    def forward(self, cfg: Any) -> tuple[torch.Tensor, ...]:
        """The whole op at ``cfg``, as its public op launches it (KernelSpec.prepare's ``forward``)."""
        return self.run.forward(cfg)

    def stage_fns(self, cfg: Any) -> dict[str, Callable[[], object]]:
        """Each stage's launch alone, on the same inputs."""
        return self.run.stage_fns(cfg)

    def _flush(self) -> None:
        if not self.cuda:
            return
        if self._flush_buffer is None:
            l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or 0
            self._flush_buffer = torch.empty(max(FLUSH_MIN_BYTES, 2 * l2) // 4, dtype=torch.int32, device=self.device)
        self._flush_buffer.zero_()

    def timed_parts(self, cfg: Any) -> list[Callable[[], object]]:
        """What one timed sample at ``cfg`` runs: the op's forward, or, where the op's run splits it
        (``OpRun.timed_parts``: decode's launch per index dtype), each part, L2 flushed before each."""
        parts = getattr(self.run, "timed_parts", None)
        return list(parts(cfg)) if parts is not None else [lambda: self.forward(cfg)]

    def replayable_parts(self, cfg: Any) -> tuple[tuple[Callable[[], object], ...], str]:
        """:meth:`timed_parts` each made :meth:`replayable`; how the first one is launched."""
        replayed = [self.replayable(part) for part in self.timed_parts(cfg)]
        return tuple(fn for fn, _ in replayed), replayed[0][1]

    def sample(self, fn: Callable[[], object] | Sequence[Callable[[], object]], reps: int) -> list[float]:
        """``reps`` times (flush L2, run ``fn``), each timed alone; milliseconds. With several parts, each rep flushes
        and times each part alone and sums their times."""
        parts = tuple(fn) if isinstance(fn, Sequence) else (fn,)
        out: list[float] = []
        if self.cuda:
            events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in parts]
                      for _ in range(reps)]
            for rep in events:
                for part, (start, end) in zip(parts, rep):
                    self._flush()
                    start.record()
                    part()
                    end.record()
            torch.cuda.synchronize()
            out = [sum(s.elapsed_time(e) for s, e in rep) for rep in events]
        else:
            for _ in range(reps):
                total = 0.0
                for part in parts:
                    t0 = time.perf_counter()
                    part()
                    total += time.perf_counter() - t0
                out.append(total * 1e3)
        return out

    def replayable(self, fn: Callable[[], object]) -> tuple[Callable[[], object], str]:
        """``fn`` as a CUDA-graph replay when it can be captured, so that host work (argument handling, the
        allocations of the launchers, a CPU busy with compiles in the gate workers) cannot open gaps between the
        launches that the events would count. Returns ``(callable, "graph" | "eager (why)")``.

        Packed batches are captured too: their chunk index is built on the GPU without a host sync, once per
        offsets tensor (kernels/varlen.py), so the warm-up call below builds it and the graph replays only the two
        stages, as a call that reuses the tensor runs. A capture that fails falls back to eager launches.
        """
        if not self.cuda or not self.use_graphs:
            return fn, "eager"
        try:
            fn()  # compiles (module loads are not allowed inside a capture) and settles the allocator
            torch.cuda.synchronize()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            torch.cuda.synchronize()
        except Exception as err:
            if classify(err)[0] == Status.FAULT:
                raise Fault(str(err)) from err
            torch.cuda.synchronize()
            return fn, f"eager ({type(err).__name__}: {str(err)[:80]})"
        self._graphs.append(graph)
        return graph.replay, "graph"

    def release(self) -> None:
        """Free the captured graphs (each holds its own copy of the outputs: ~1 GB at the anchor)."""
        if self._graphs:
            self._graphs.clear()
            torch.cuda.empty_cache()

    def reps_for(self, fn: Callable[[], object] | Sequence[Callable[[], object]],
                 target_ms: float = TARGET_MS_PER_TRIAL) -> int:
        """Repetitions that fill ``target_ms``, from a short estimate (after one untimed call that compiles)."""
        if not self.cuda:
            return INTERPRET_REPS
        for part in fn if isinstance(fn, Sequence) else (fn,):
            part()
        torch.cuda.synchronize()
        est = statistics.median(self.sample(fn, 3))
        return max(MIN_REPS, min(MAX_REPS, int(target_ms / max(est, 1e-3))))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gate(bench: Bench, reference: tuple[torch.Tensor, ...], cfg: Any) -> Outcome:
    """Compare the op at the gate shape with its float64 reference: OK or WRONG_ANSWER, with the relative error
    of each output, named ``err_<output name>`` (KernelSpec.output_names), and the tolerance."""
    with poisoned():
        outs = bench.forward(cfg)
    synchronize(bench.device)
    names = bench.spec.output_names
    assert len(outs) == len(reference) == len(names), (len(outs), len(reference), names)
    errors = {name: rel_err(out, ref) for name, out, ref in zip(names, outs, reference)}
    tol = bench.spec.gate_tolerance[bench.shape.dtype]
    result: dict[str, Any] = {f"err_{name}": err for name, err in errors.items()}
    result["tolerance"] = tol
    if not all(err <= tol for err in errors.values()):
        what = "NaN/Inf in the output" if math.isinf(max(errors.values())) else "error above tolerance"
        listed = ", ".join(f"{name} {err:.3g}" for name, err in errors.items())
        reason = f"{what}: rel. error {listed} (tolerance {tol:g}) at {bench.shape.label()}"
        return failed(Status.WRONG_ANSWER, reason, **result)
    return ok(**result)


def warm(bench: Bench, cfg: Any) -> Outcome:
    """One run at the tuned shape: compiles the exact specialization the timing worker will load from Triton's
    cache, and checks that no element is left unwritten (NaN) where the gate shape could not tell."""
    with poisoned():
        outs = bench.forward(cfg)
    synchronize(bench.device)
    if not all(bool(torch.isfinite(out).all()) for out in outs):
        return failed(Status.WRONG_ANSWER, f"NaN/Inf in the output at {bench.shape.label()}")
    return ok()


def time_config(bench: Bench, cfg: Any) -> Outcome:
    try:
        fn, launch = bench.replayable_parts(cfg)
        reps = bench.reps_for(fn)
        q = quantiles(bench.sample(fn, reps))
    finally:
        bench.release()
    return ok(reps=reps, launch=launch, **q.to_dict())


def retime(bench: Bench, cfgs: Sequence[Any], rounds: int) -> Outcome:
    """Round robin over ``cfgs``: in each round every config gets a block of repetitions, so drifts in clocks or
    temperature hit all of them alike. Returns per config p20/p50/p80 over all samples, the spread
    (max - min) / median of its per-round medians, and those medians in round order (``round_p50_ms``: config i's
    and config j's r-th were timed in the same round, a pair)."""
    try:
        return _retime(bench, cfgs, rounds)
    finally:
        bench.release()


def _retime(bench: Bench, cfgs: Sequence[Any], rounds: int) -> Outcome:
    fns, launches = zip(*(bench.replayable_parts(c) for c in cfgs))
    reps = [max(1, bench.reps_for(fn) // max(1, rounds // 2)) for fn in fns]
    samples: list[list[float]] = [[] for _ in cfgs]
    medians: list[list[float]] = [[] for _ in cfgs]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            s = bench.sample(fn, reps[i])
            samples[i].extend(s)
            medians[i].append(statistics.median(s))
    out = []
    for s, m in zip(samples, medians):
        q = quantiles(s)
        mid = statistics.median(m)
        out.append({**q.to_dict(), "spread": (max(m) - min(m)) / mid if mid > 0 else 0.0, "reps": len(s),
                    "round_p50_ms": m})
    return ok(timings=out, launch=list(launches))


def stage_times(bench: Bench, cfgs: Sequence[Any], rounds: int = 3) -> Outcome:
    """Median ms of each stage's launch alone, per config, interleaved like :func:`retime`."""
    try:
        return _stage_times(bench, cfgs, rounds)
    finally:
        bench.release()


def _stage_times(bench: Bench, cfgs: Sequence[Any], rounds: int) -> Outcome:
    fns = [{name: bench.replayable(fn)[0] for name, fn in bench.stage_fns(c).items()} for c in cfgs]
    samples: list[dict[str, list[float]]] = [{name: [] for name in f} for f in fns]
    reps = [{name: bench.reps_for(fn) for name, fn in f.items()} for f in fns]
    for _ in range(rounds):
        for i, f in enumerate(fns):
            for name, fn in f.items():
                samples[i][name].extend(bench.sample(fn, max(1, reps[i][name] // rounds)))
    return ok(stages=[{name: statistics.median(s) for name, s in per.items()} for per in samples])
