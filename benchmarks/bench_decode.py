"""Decode benchmark for ``fused_recurrent_gdn2`` on one GPU (not a test): correctness at real sizes, CUDA-graph
timings against the baseline, and a sweep of the DecodeConfig space per batch size.

    python benchmarks/bench_decode.py [--out DIR] [--quick] [--parts correctness,sweep,timing,serving]

(a) correctness: ≥ 1000 chained decode steps (T=1 per call) at H=16, K=V=128 over a state pool with a padding row
    and an out-of-pool index, fp32 and bf16 state, against the float64 recurrence (kernels/decode_reference.py);
    outputs NaN-poisoned before every call; pool slots no index names compared bitwise; plus speculative
    verification (2-D indices, num_accepted_tokens, T=4) against the per-token float64 states.
(b) timing: T=1, H=16, K=V ∈ {128, 256}, B ∈ {1, 8, 32, 128, 512}, fp32 state updated in place through 1-D
    indices, bf16 inputs, ``out`` given. Each call is captured in a CUDA graph and replayed; the figure is the
    median over replays (warm-up excluded) with L2 flushed before each replay ("cold": a serving step finds a
    layer's state evicted by the other layers) and without ("warm"). The baseline, flash-linear-attention's
    ``fla.ops.gdn2.fused_recurrent.fused_recurrent_gdn2_fwd``, is timed the same way in the same run when it
    imports. The floor is the fp32 state read + written once at the device-to-device copy bandwidth measured here.
(c) sweep: every admissible DecodeConfig at T=1 per (K, B) (num_stages only matters with several tokens, so it is
    swept at T=4 on one batch size), printing the best per batch size.
(d) serving: the config the public op serves (the dispatcher's, from the tables) against the baseline at (b)'s
    points in two modes, timed in alternating rounds (every callable once per round, the order rotated; medians
    over rounds):
    - "cold", (b)'s measurement: one call per graph replay, L2 flushed before each. It isolates the kernel with
      its state in DRAM, but each replay also pays the launch of a graph and two timing events, ~4.6 µs for an
      empty kernel on an H200 (benchmarks/results/decode-variants-h200-2026-11-30-s7.json), more than the state
      traffic itself up to B=8 at K=V=128 (a 0.5 µs floor at B=1): at small batches it measures that overhead.
      It stays because every earlier result (and the tuner's trials) was timed this way, so it compares across
      runs, and because it times the kernel alone, with nothing before it to overlap its start.
    - "serving": what a served model sees, where a layer's decode kernel is one node among many in a graph. One
      graph holds S consecutive decode steps, each on its own set of N slots of a pool of at least
      SERVING_POOL_BYTES (several times L2), cycled so that a step's slots were last touched by the step that
      many steps back (at least L2's worth of other state in between): the state is in DRAM, as after the other
      layers' kernels, while the step's inputs and indices are as hot as a preceding projection leaves them. The
      replays run back to back; the figure is the replay's time / S, so the launch overhead is what a graph's
      node-to-node gap costs, amortised as in serving. An empty kernel is timed both ways at B=1.
    Before timing, one step of each from the same pool is compared (outputs and touched slots).

Writes DIR/decode.json (DIR: --out, else $OUT) and DIR/bench_decode.jsonl (each JSON line as it is printed), and
prints a short table last. About 2 minutes on an H200 for (a)-(c); (d) alone (``--parts serving``) under 1.5.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn2_tune.kernels.buffers import poisoned
from gdn2_tune.kernels.decode import fused_recurrent_gdn2
from gdn2_tune.kernels.decode_config import (
    DecodeConfig,
    DecodeShape,
    decode_space,
    default_decode_config,
    served_by_tables,
    table_shape,
)
from gdn2_tune.kernels.decode_reference import recurrence
from gdn2_tune.kernels.reference import rel_err

BATCHES = (1, 8, 32, 128, 512)
HEADS = 16
HEAD_DIMS = (128, 256)
STEPS = 1000
# Relative Frobenius error budgets of (a). fp32 state: every operation is one fp32 rounding (2^-24) and the
# recurrence is contractive (decay ≤ 1, erase gate in [0, 1], unit keys), so errors stay near 1e-6 over any number
# of steps; 1e-4 is two orders above. The bf16 output is rounded once more: 2^-9 relative per element, budget 2^-8.
# bf16 state: the kernel must cost no more than bf16 storage itself, i.e. stay
# within 1.5x the error of the float64 recurrence rounded to bf16 after every step (plus one bf16 half-ulp, 2^-9,
# for differences in which way single roundings go).
FP32_STATE_BUDGET = 1e-4
BF16_OUTPUT_BUDGET = 2.0**-8
BF16_RATIO_BUDGET = 1.5
BF16_SLACK = 2.0**-9
FLUSH_BYTES = 256 << 20  # larger than the H200's 60 MB L2
COPY_BYTES = 2 << 30
# (d) serving: decode steps per graph (more where a step's state is small, so that the steps cycle through at least
# the pool below), and the state the steps of one graph cycle through: at least 4x L2 (the H200's is 50 MB; the
# device's own size is used when larger), so that a step's slots have left L2 before it comes back to them.
SERVING_STEPS = 32
SERVING_POOL_BYTES = 256 << 20
SERVING_REPS = 10  # graph replays per round: each holds >= 32 steps
ROUNDS = 3
PARTS = ("correctness", "sweep", "timing", "serving")  # (a), (c), (b), (d); --parts picks


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit,
    }


def time_major_inputs(T: int, N: int, H: int, K: int, V: int, seed: int) -> dict[str, torch.Tensor]:
    """``[T, N, 1, H, D]`` bf16 inputs (g fp32) so that step t is the contiguous ``x[t]`` of shape [N, 1, H, D]."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def r(*size: int, dist: str = "n") -> torch.Tensor:
        fn = torch.randn if dist == "n" else torch.rand
        return fn(T, N, 1, H, *size, generator=gen, device="cuda")

    k = r(K)
    return {
        "q": r(K).bfloat16(), "k": (k / k.norm(dim=-1, keepdim=True)).bfloat16(), "v": r(V).bfloat16(),
        "g": r(K, dist="u") * -0.5, "b": r(K, dist="u").bfloat16(), "w": r(V, dist="u").bfloat16(),
    }


def dense(x: torch.Tensor) -> torch.Tensor:
    """[T, N, 1, H, D] → [N, T, H, D] (a view) for the reference."""
    return x.squeeze(2).transpose(0, 1)


NAMES = ("q", "k", "v", "g", "b", "w")


# --- (a) correctness -------------------------------------------------------------------------------------------


def chained(state_dtype: torch.dtype, steps: int, N: int = 16, K: int = 128) -> dict:
    """``steps`` single-token calls on a pool; one padding row and one out-of-pool row ride along."""
    H, V = HEADS, K
    rows = N + 2
    inp = time_major_inputs(steps, rows, H, K, V, seed=11)
    pool_size = 2 * N + 5
    gen = torch.Generator(device="cuda").manual_seed(12)
    pool = torch.randn(pool_size, H, K, V, generator=gen, device="cuda").to(state_dtype)
    slots = torch.randperm(pool_size, generator=gen, device="cuda")[:N]
    idx = torch.cat([slots, torch.tensor([-1, pool_size + 7], device="cuda")])  # padding, out of the pool
    before = pool.clone()
    outs = []
    t0 = time.time()
    with poisoned():
        for t in range(steps):
            o, _ = fused_recurrent_gdn2(*(inp[n][t] for n in NAMES), initial_state=pool, inplace_final_state=True,
                                        ssm_state_indices=idx)
            outs.append(o)
    torch.cuda.synchronize()
    kernel_s = time.time() - t0
    o = torch.cat(outs, 1)  # [rows, steps, H, V]
    start = before[slots].to(torch.float64)
    args = [dense(inp[n])[:N] for n in NAMES]
    ref_o, ref_states = recurrence(*args, start)
    ref_s = ref_states[:, -1]
    named = torch.zeros(pool_size, dtype=torch.bool, device="cuda")
    named[slots] = True
    row = {
        "state": str(state_dtype).removeprefix("torch."), "steps": steps, "N": N, "H": H, "K": K, "V": V,
        "err_o": rel_err(o[:N], ref_o), "err_state": rel_err(pool[slots], ref_s),
        "padding_row_zero": bool((o[N] == 0).all()),
        "out_of_pool_row_nan": bool(o[N + 1].isnan().all()),
        "untouched_slots_bitwise": bool(torch.equal(pool[~named].view(torch.int16 if state_dtype == torch.bfloat16
                                                                      else torch.int32),
                                                    before[~named].view(torch.int16 if state_dtype == torch.bfloat16
                                                                        else torch.int32))),
        "kernel_seconds": round(kernel_s, 2),
    }
    if state_dtype == torch.bfloat16:
        emu_o, emu_states = recurrence(*args, start, rounding="bf16")
        row["bf16_storage_err_o"] = rel_err(emu_o, ref_o)
        row["bf16_storage_err_state"] = rel_err(emu_states[:, -1], ref_s)
        ok = (row["err_state"] <= BF16_RATIO_BUDGET * row["bf16_storage_err_state"] + BF16_SLACK
              and row["err_o"] <= BF16_RATIO_BUDGET * row["bf16_storage_err_o"] + BF16_SLACK)
    else:
        ok = row["err_o"] < BF16_OUTPUT_BUDGET and row["err_state"] < FP32_STATE_BUDGET
    row["pass"] = bool(ok and row["padding_row_zero"] and row["out_of_pool_row_nan"] and row["untouched_slots_bitwise"])
    return row


def speculative(N: int = 32, T: int = 4, K: int = 128) -> dict:
    """2-D indices [N, T] and num_accepted_tokens: start from slot [n, a-1], the state after token t in slot [n, t]."""
    H, V = HEADS, K
    inp = time_major_inputs(T, N, H, K, V, seed=21)
    gen = torch.Generator(device="cuda").manual_seed(22)
    pool_size = N * T + 3
    pool = torch.randn(pool_size, H, K, V, generator=gen, device="cuda")
    idx = torch.randperm(pool_size, generator=gen, device="cuda")[: N * T].view(N, T)
    accepted = torch.randint(1, T + 1, (N,), generator=gen, device="cuda")
    before = pool.clone()
    args = [torch.cat([inp[n][t] for t in range(T)], 1) for n in NAMES]  # [N, T, H, D]
    with poisoned():
        o, _ = fused_recurrent_gdn2(*args, initial_state=pool, inplace_final_state=True, ssm_state_indices=idx,
                                    num_accepted_tokens=accepted)
    start = before[idx[torch.arange(N, device="cuda"), accepted - 1]]
    ref_o, ref_states = recurrence(*args, start)
    named = torch.zeros(pool_size, dtype=torch.bool, device="cuda")
    named[idx.flatten()] = True
    row = {
        "N": N, "T": T, "H": H, "K": K, "V": V,
        "err_o": rel_err(o, ref_o), "err_states": rel_err(pool[idx], ref_states),
        "untouched_slots_bitwise": bool(torch.equal(pool[~named], before[~named])),
    }
    row["pass"] = bool(row["err_o"] < BF16_OUTPUT_BUDGET and row["err_states"] < FP32_STATE_BUDGET
                       and row["untouched_slots_bitwise"])
    return row


# --- timing ----------------------------------------------------------------------------------------------------


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write."""
    src = torch.empty(COPY_BYTES // 4, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    return 2 * COPY_BYTES / statistics.median(times)


_flush = None


def graph_times(fn: Callable[[], object], reps: int, eager: bool = True) -> dict[str, float]:
    """Median/p20/p80 µs of CUDA-graph replays of ``fn`` with L2 flushed before each (cold), median without (warm),
    and (``eager``) the eager per-call wall time, host-bound at small batches."""
    global _flush
    if _flush is None:
        _flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(10):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(2 * reps)]
    for i, (start, end) in enumerate(events):
        if i < reps:
            _flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    us = [s.elapsed_time(e) * 1e3 for s, e in events]
    cold, warm = sorted(us[:reps]), sorted(us[reps:])
    q = statistics.quantiles(cold, n=10)
    row = {"p20": q[1], "p50": statistics.median(cold), "p80": q[7], "warm_p50": statistics.median(warm)}
    if eager:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        row["eager_us"] = (time.perf_counter() - t0) / reps * 1e6
    return row


class Problem:
    """Decode-step buffers of one shape: T tokens per sequence, a pool of N slots in a shuffled order, ``out``.

    With ``ranges`` > 1 the pool holds that many times the slots, shuffled and split into disjoint index sets
    ``sets[r]`` of one step each ((d)'s serving steps); ``idx`` is the first.
    """

    def __init__(self, N: int, K: int, T: int = 1, seed: int = 0, two_d: bool = False, ranges: int = 1) -> None:
        H, V = HEADS, K
        gen = torch.Generator(device="cuda").manual_seed(seed)
        inp = time_major_inputs(T, N, H, K, V, seed)
        self.args = [torch.cat([inp[n][t] for t in range(T)], 1) for n in NAMES]
        self.scale = K**-0.5
        slots = N * T if two_d else N
        # Starting states as a layer leaves them: bounded, so that repeated in-place replays stay finite.
        self.pool = 0.1 * torch.randn(ranges * slots, H, K, V, generator=gen, device="cuda")
        perm = torch.randperm(ranges * slots, generator=gen, device="cuda")
        self.sets = perm.view(ranges, N, T) if two_d else perm.view(ranges, N)
        self.idx = self.sets[0]
        self.accepted = torch.randint(1, T + 1, (N,), generator=gen, device="cuda") if two_d else None
        self.out = torch.empty_like(self.args[2])
        self.state_bytes = N * H * K * V * 4

    def ours(self, cfg: DecodeConfig | None, idx: torch.Tensor | None = None) -> Callable[[], object]:
        """One step of ``cfg`` (None: the op's own choice) on the slots ``idx`` (None: ``self.idx`` at call time)."""
        return lambda: fused_recurrent_gdn2(
            *self.args, scale=self.scale, initial_state=self.pool, inplace_final_state=True,
            ssm_state_indices=self.idx if idx is None else idx, num_accepted_tokens=self.accepted, out=self.out,
            config=cfg,
        )


def served_config(shape: DecodeShape) -> DecodeConfig:
    """What ``gdn2_tune.fused_recurrent_gdn2`` runs at ``shape`` without a config: the dispatcher's choice from the
    tables (this GPU's, its family's, ``GDN2_PROFILE``), else the built-in default."""
    from gdn2_tune.kernels.decode_spec import DECODE_OP
    from gdn2_tune.profiles.dispatch import select_config

    return select_config(table_shape(shape), DECODE_OP) if served_by_tables(shape) else default_decode_config(shape)


def load_baseline() -> tuple[Callable | None, str]:
    try:
        from fla.ops.gdn2.fused_recurrent import fused_recurrent_gdn2_fwd
    except Exception as exc:  # noqa: BLE001 - the baseline is optional; say why it is missing
        return None, f"not available: {exc!r}"[:300]
    return fused_recurrent_gdn2_fwd, f"fused_recurrent_gdn2_fwd{inspect.signature(fused_recurrent_gdn2_fwd)}"


def baseline_call(fn: Callable, p: Problem, idx: torch.Tensor | None = None) -> Callable[[], object]:
    """One step of the baseline on the slots ``idx`` (None: ``p.idx``)."""
    params = inspect.signature(fn).parameters
    q, k, v, g, b, w = p.args
    wanted = {"initial_state": p.pool, "scale": p.scale, "output_final_state": False, "inplace_final_state": True,
              "ssm_state_indices": p.idx if idx is None else idx, "out": p.out}
    kwargs = {name: value for name, value in wanted.items() if name in params}
    missing = sorted(set(wanted) - set(kwargs))
    if {"initial_state", "inplace_final_state", "ssm_state_indices"} & set(missing):
        raise TypeError(f"the baseline takes none of {missing}: not the serving signature this script expects")
    return lambda: fn(q, k, v, g, b, w, **kwargs)


def timing(bw: float, baseline: Callable | None, best: dict[tuple[int, int], DecodeConfig], reps: int) -> list[dict]:
    rows = []
    for K in HEAD_DIMS:
        for N in BATCHES:
            p = Problem(N, K)
            floor_us = 2 * p.state_bytes / bw * 1e6
            shape = DecodeShape(N, 1, HEADS, K, K, "bf16", "fp32")
            row: dict = {"B": N, "T": 1, "H": HEADS, "K": K, "V": K, "floor_us": floor_us,
                         "default_config": default_decode_config(shape).label()}
            row["ours_default"] = graph_times(p.ours(None), reps)
            cfg = best.get((K, N))
            if cfg is not None:
                row["best_config"] = cfg.label()
                row["ours_best"] = graph_times(p.ours(cfg), reps)
            if baseline is not None:
                try:
                    row["baseline"] = graph_times(baseline_call(baseline, p), reps)
                except Exception as exc:  # noqa: BLE001 - a baseline failure is a result, not the end of the run
                    row["baseline_error"] = repr(exc)[:300]
            for key in ("ours_default", "ours_best", "baseline"):
                if key in row:
                    row[key]["pct_of_floor"] = 100 * floor_us / row[key]["p50"]
            emit({"kind": "timing", **row})
            rows.append(row)
            del p
            torch.cuda.empty_cache()
    return rows


def sweep(reps: int) -> tuple[list[dict], dict[tuple[int, int], DecodeConfig]]:
    rows, best = [], {}
    cases = [(K, N, 1) for K in HEAD_DIMS for N in BATCHES] + [(128, 32, 4)]
    for K, N, T in cases:
        shape = DecodeShape(N, T, HEADS, K, K, "bf16", "fp32")
        # num_stages pipelines the token loop, so it is swept only with several tokens. To stay within the time
        # budget, what lost clearly in the first H200 run (benchmarks/results/decode-h200-2026-11-30.json) is left
        # out: the cache policy at T=4 and with the one-pass output; BV=8, 8 warps and 3 stages at T=4 (≥ 7% behind
        # the best, or within noise of 2 stages: that run's loop carried no num_stages, so depths were one program).
        # The structural knobs (compiled-in dims, a register cap, a pipelined single token, batched input loads) are
        # compared on the default tile by benchmarks/exp_decode_variants.py instead: crossed with every tile they
        # would multiply this sweep sixteenfold.
        space = [c for c in decode_space(shape)
                 if not c.static_dims and not c.max_registers and not c.batch_inputs
                 and (c.num_stages == 1 and not (c.stream_state and c.one_pass) if T == 1
                      else not c.stream_state and c.BV >= 16 and c.num_warps <= 4 and c.num_stages <= 2)]
        p = Problem(N, K, T=T, two_d=T > 1)
        results = []
        for cfg in space:
            try:
                t = graph_times(p.ours(cfg), reps, eager=False)
                results.append({"config": cfg.to_dict(), "label": cfg.label(), "status": "ok", **t})
            except Exception as exc:  # noqa: BLE001 - a config that fails is a recorded outcome
                results.append({"config": cfg.to_dict(), "label": cfg.label(), "status": "error",
                                "error": repr(exc)[:300]})
        ok = [r for r in results if r["status"] == "ok"]
        top = min(ok, key=lambda r: r["p50"]) if ok else None
        default = default_decode_config(shape).label()
        default_us = next((r["p50"] for r in ok if r["label"] == default), None)
        if top is not None and T == 1:
            best[(K, N)] = DecodeConfig(**top["config"])
        row = {"B": N, "T": T, "K": K, "V": K, "configs": len(space), "best": top and top["label"],
               "best_us": top and top["p50"], "default": default, "default_us": default_us, "results": results}
        emit({"kind": "sweep", **{k: v for k, v in row.items() if k != "results"}})
        rows.append(row)
        del p
        torch.cuda.empty_cache()
    return rows, best


# --- (d) serving -----------------------------------------------------------------------------------------------


@triton.jit
def _empty_kernel(x):
    """One program, one 4-byte store: what a launch costs in either mode."""
    tl.store(x, 0)


def l2_bytes() -> int:
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)) or 50 << 20


def serving_plan(step_bytes: int, steps: int, l2: int) -> tuple[int, int]:
    """(R, S): R disjoint slot sets of one step each, holding at least max(SERVING_POOL_BYTES, 4·L2) together (at
    least 2), and S ≥ ``steps`` steps per graph, a multiple of R so that every replay starts where the last left
    off: step s runs on set s mod R, whose slots were last touched R steps before, R − 1 steps of state ago."""
    sets = max(2, -(-max(SERVING_POOL_BYTES, 4 * l2) // step_bytes))
    return sets, sets * -(-steps // sets)


def serving_times(steps: list[Callable[[], object]], reps: int) -> dict[str, float]:
    """Per-step µs (p20/p50/p80 over replays) of one CUDA graph holding ``steps`` in order, replayed back to back
    without flushing L2 (the steps' slot sets keep the state out of it; see serving_plan): the replay's time / S."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for fn in steps:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in steps:
            fn()
    for _ in range(3):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    us = sorted(s.elapsed_time(e) * 1e3 / len(steps) for s, e in events)
    q = statistics.quantiles(us, n=10)
    del graph
    return {"p20": q[1], "p50": statistics.median(us), "p80": q[7]}


def step_check(p: Problem, calls: dict[str, Callable[[], object]]) -> dict:
    """One step of each callable from the same slots: each one's output and touched slots against the first's."""
    idx = p.idx.long()
    start = p.pool[idx].clone()
    got = {}
    for name, fn in calls.items():
        p.pool[idx] = start
        p.out.fill_(float("nan"))
        fn()
        torch.cuda.synchronize()
        got[name] = (p.out.double(), p.pool[idx].double())
    p.pool[idx] = start
    ref_name, (ref_o, ref_s) = next(iter(got.items()))
    row: dict = {"kind": "check", "reference": ref_name}
    for name, (o, s) in list(got.items())[1:]:
        fin = bool(torch.isfinite(o).all() and torch.isfinite(s).all())
        err_o = float((o - ref_o).norm() / ref_o.norm()) if fin else float("inf")
        err_s = float((s - ref_s).norm() / ref_s.norm()) if fin else float("inf")
        row[name] = {"err_o": err_o, "err_state": err_s,
                     "ok": bool(err_o < BF16_OUTPUT_BUDGET and err_s < FP32_STATE_BUDGET)}
    del got, start
    return row


def serving(bw: float, baseline: Callable | None, rounds: int, reps: int, serving_reps: int, steps: int,
            head_dims: tuple[int, ...] = HEAD_DIMS, batches: tuple[int, ...] = BATCHES) -> list[dict]:
    """(d): the served config (:func:`served_config`) and the baseline, cold (one call per replay, L2 flushed) and
    serving (S steps per graph over a pool larger than L2), in alternating rounds; one JSON line per timing and a
    summary per point."""
    l2 = l2_bytes()
    rows = []
    for K in head_dims:
        for N in batches:
            step_bytes = N * HEADS * K * K * 4
            sets, S = serving_plan(step_bytes, steps, l2)
            p = Problem(N, K, ranges=sets)
            shape = DecodeShape(N, 1, HEADS, K, K, "bf16", "fp32")
            cfg = served_config(shape)
            point = {"K": K, "B": N, "steps_per_graph": S, "slot_sets": sets,
                     "pool_bytes": sets * step_bytes, "l2_bytes": l2,
                     "default_config": default_decode_config(shape).label()}
            makers: dict[str, Callable[[torch.Tensor], Callable[[], object]]] = {
                "ours": lambda idx, p=p, cfg=cfg: p.ours(cfg, idx)}
            labels = {"ours": cfg.label()}
            if baseline is not None:
                try:
                    baseline_call(baseline, p)
                    makers["fla"] = lambda idx, p=p: baseline_call(baseline, p, idx)
                    labels["fla"] = "fused_recurrent_gdn2_fwd"
                except Exception as exc:  # noqa: BLE001 - a baseline that cannot be called is a result
                    emit({"kind": "skip", **point, "impl": "fla", "why": repr(exc)[:300]})
            check = step_check(p, {name: make(p.idx) for name, make in makers.items()})
            emit({**check, **point})
            if N == 1:
                makers["empty"] = lambda idx, p=p: lambda: _empty_kernel[(1,)](p.out)
                labels["empty"] = "1 program, one store"
            calls = [(name, mode) for name in makers for mode in ("cold", "serving")]
            # Captured once per round: the rotation puts each callable after a different one.
            times: dict[tuple[str, str], list[dict]] = {c: [] for c in calls}
            for r in range(rounds):
                for name, mode in calls[r % len(calls):] + calls[: r % len(calls)]:
                    try:
                        if mode == "cold":
                            t = graph_times(makers[name](p.idx), reps, eager=False)
                        else:
                            t = serving_times([makers[name](p.sets[s % sets]) for s in range(S)], serving_reps)
                    except Exception as exc:  # noqa: BLE001 - recorded; the other callables still run
                        emit({"kind": "error", **point, "impl": name, "mode": mode, "error": repr(exc)[:300]})
                        continue
                    times[(name, mode)].append(t)
                    emit({"kind": "time", **point, "round": r, "impl": name, "config": labels[name], "mode": mode,
                          **{f"{q}_us": round(t[q], 3) for q in ("p20", "p50", "p80")},
                          **({"warm_p50_us": round(t["warm_p50"], 3)} if "warm_p50" in t else {})})
            floor_us = 2 * step_bytes / bw * 1e6
            summary: dict = {"kind": "summary", **point, "floor_us": round(floor_us, 3), "impls": {}}
            for name in makers:
                entry: dict = {"config": labels[name]}
                for mode in ("cold", "serving"):
                    ts = times[(name, mode)]
                    if ts:
                        entry[f"{mode}_us"] = round(statistics.median(t["p50"] for t in ts), 3)
                        entry[f"{mode}_x_floor"] = round(entry[f"{mode}_us"] / floor_us, 3)
                if times[(name, "cold")]:
                    entry["warm_us"] = round(statistics.median(t["warm_p50"] for t in times[(name, "cold")]), 3)
                summary["impls"][name] = entry
            fla = summary["impls"].get("fla", {})
            for mode in ("cold", "serving"):
                ours_us, fla_us = summary["impls"]["ours"].get(f"{mode}_us"), fla.get(f"{mode}_us")
                summary[f"{mode}_ours_vs_fla"] = round(ours_us / fla_us, 3) if ours_us and fla_us else None
            emit(summary)
            rows.append(summary)
            del p
            torch.cuda.empty_cache()
    return rows


def print_serving(rows: list[dict], bw: float) -> None:
    print(f"\n(d) T=1, H={HEADS}, fp32 state in place, served config vs fla; µs per step (median of rounds' p50), "
          f"×floor at {bw / 1e12:.2f} TB/s in brackets. cold: one call per graph replay, L2 flushed. serving: S "
          f"steps per graph over a pool of ≥ 4×L2, per step")
    print(f"  {'K=V':>4} {'B':>4} {'S':>4} {'floor':>7} {'ours cold':>16} {'fla cold':>16} {'ours serving':>16} "
          f"{'fla serving':>16} {'empty c/s':>11}  config")
    for s in rows:
        im = s["impls"]

        def cell(name: str, mode: str, im: dict = im) -> str:
            e = im.get(name, {})
            return f"{e[f'{mode}_us']:8.1f} ({e[f'{mode}_x_floor']:.2f})" if f"{mode}_us" in e else "-"

        empty = im.get("empty", {})
        e_cells = "/".join(f"{empty[f'{m}_us']:.1f}" if f"{m}_us" in empty else "-" for m in ("cold", "serving"))
        print(f"  {s['K']:>4} {s['B']:>4} {s['steps_per_graph']:>4} {s['floor_us']:7.1f} {cell('ours', 'cold'):>16} "
              f"{cell('fla', 'cold'):>16} {cell('ours', 'serving'):>16} {cell('fla', 'serving'):>16} "
              f"{e_cells if empty else '':>11}  {im['ours']['config']}")


_jsonl: Path | None = None


def emit(row: dict) -> None:
    """Print one JSON line (flushed) and append it to the run's .jsonl file when there is one."""
    line = json.dumps(row)
    print(line, flush=True)
    if _jsonl is not None:
        with _jsonl.open("a") as f:
            f.write(line + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="directory for decode.json and bench_decode.jsonl (default: $OUT)")
    ap.add_argument("--quick", action="store_true", help="fewer replays per timing (a smoke run)")
    ap.add_argument("--steps", type=int, default=STEPS, help="chained decode steps of the correctness check")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {list(PARTS)}")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="(d): alternating timing rounds")
    ap.add_argument("--serving-steps", type=int, default=SERVING_STEPS, help="(d): decode steps per graph (at least)")
    args = ap.parse_args(argv)
    if args.out is None:
        ap.error("--out: expected a directory (or $OUT set), received neither")
    parts = [x for x in args.parts.split(",") if x]
    if not parts or set(parts) - set(PARTS):
        ap.error(f"--parts: expected a comma-separated subset of {list(PARTS)}, received {args.parts!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    global _jsonl
    _jsonl = args.out / "bench_decode.jsonl"
    reps = 30 if args.quick else 100
    t_start = time.time()
    env = environment()
    emit({"kind": "env", **env})
    baseline, signature = load_baseline()
    emit({"kind": "baseline", "signature": signature})

    correctness = []
    if "correctness" in parts:
        correctness = [chained(torch.float32, args.steps), chained(torch.bfloat16, args.steps), speculative()]
        for row in correctness:
            emit({"kind": "correctness", **row})
    bw = copy_bandwidth()
    emit({"kind": "copy_roof", "bytes_per_s": bw})
    sweep_rows, best = sweep(max(20, reps // 2)) if "sweep" in parts else ([], {})
    timing_rows = timing(bw, baseline, best, reps) if "timing" in parts else []
    serving_rows = (serving(bw, baseline, args.rounds, 30, 5 if args.quick else SERVING_REPS, args.serving_steps)
                    if "serving" in parts else [])
    result = {"env": env, "baseline_signature": signature, "copy_bytes_per_s": bw, "parts": parts,
              "correctness": correctness, "timing": timing_rows, "sweep": sweep_rows, "serving": serving_rows,
              "seconds": round(time.time() - t_start, 1)}
    (args.out / "decode.json").write_text(json.dumps(result, indent=1))

    if serving_rows:
        print_serving(serving_rows, bw)
    if correctness:
        print(f"\ncorrectness ({args.steps} chained steps, H={HEADS}, K=V=128; spec: T=4, 2-D indices):")
    for row in correctness:
        what = f"state {row['state']}" if "state" in row else f"speculative T={row['T']}"
        print(f"  {what:<16} err_o {row['err_o']:.2e}  err_state {row.get('err_state', row.get('err_states')):.2e}"
              + (f"  (bf16 storage alone: {row['bf16_storage_err_state']:.2e})" if "bf16_storage_err_state" in row
                 else "") + f"  {'PASS' if row['pass'] else 'FAIL'}")
    if timing_rows:
        print(f"\nT=1, H={HEADS}, fp32 state in place, CUDA-graph replay, L2 flushed; µs (p50) and % of the "
              f"state-traffic floor at {bw / 1e12:.2f} TB/s; warm: L2 not flushed (ours default / baseline)")
        print(f"  {'K=V':>4} {'B':>4} {'floor':>7} {'default':>16} {'best':>16} {'baseline':>16}  {'warm d/b':>13}"
              f"  best config")
    for row in timing_rows:
        keys = ("ours_default", "ours_best", "baseline")
        cells = [f"{row[key]['p50']:7.1f} ({row[key]['pct_of_floor']:4.0f}%)" if key in row else "-" for key in keys]
        warm = "/".join(f"{row[key]['warm_p50']:.1f}" if key in row else "-" for key in ("ours_default", "baseline"))
        print(f"  {row['K']:>4} {row['B']:>4} {row['floor_us']:7.1f} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}"
              f"  {warm:>13}  {row.get('best_config', '-')}")
    spec = [r for r in sweep_rows if r["T"] > 1]
    for r in spec:
        print(f"  T={r['T']} B={r['B']} K=V={r['K']} (2-D indices): best {r['best']} {r['best_us']:.1f} µs, "
              f"default {r['default']} {r['default_us'] or float('nan'):.1f} µs")
    print(f"\n{args.out / 'decode.json'} written in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
