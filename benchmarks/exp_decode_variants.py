"""Decode kernel variants against the built-in default and the baseline on one GPU (an experiment, not a test).

    python benchmarks/exp_decode_variants.py [--out DIR] [--rounds 3] [--reps 30]

Issue 13's points (T=1, H=16, K=V ∈ {128, 256}, B ∈ {1, 8, 32, 128, 512}, fp32 state updated in place through 1-D
indices, bf16 inputs, ``out`` given), timed exactly as benchmarks/bench_decode.py times them (its Problem, its
CUDA-graph replay with L2 flushed before each replay, "cold", and without, "warm"). Each variant is the default
config at that point with the structural knobs of kernels/decode_config.py switched on:

- ``static``: H, K, V compiled in (one base register + immediate offsets per thread's rows; no per-row predicates).
- ``static-pipe``: and the token loop pipelined two deep (the input loads become cp.async copies read from shared
  memory straight into the state tile's row layout: fewer layout conversions and barriers, more registers). Since
  session 7 of 2026-11-30 this is a different program at T = 1 (the baseline's structure); before, the one-trip
  loop was folded away and it compiled to ``static`` itself.
- ``static-cap``: static with a register cap one occupancy step down (K=256, BV=32, 4 warps: 128 → 4 programs per
  SM instead of 3; K=128: 80 → 6 instead of 4-5).
- ``static-pipe-cap``: both.
- ``batch``: the input loads of a token all issued before the first is moved into the state tile's layout
  (``batch_inputs``); without it they arrive one memory round trip after another behind the state's.
- ``static-batch``, ``static-batch-cap``, ``static-batch-1pass`` (and the one-pass output): combinations.
- ``static-batch-narrow`` / ``static-batch-wide``: static-batch with half the V tile (twice the programs) / twice
  the V tile on twice the warps (half the programs, longer contiguous rows).
- ``static-batch-w1``: one warp per program (BV=16 at K=128, 8 at K=256): the K reductions without block barriers.
- ``persist``, ``persist-prefetch``, ``persist-prefetch-stream``, ``persist-items2``, ``persist-items3`` (issue 13):
  the default on a persistent grid of ``programs_per_sm`` programs per SM (as many as the register cap that fits
  them holds the state tiles), each looping over every G-th work item; plain, with the next item's state load
  issued before this item's work (two tiles in registers), that with evict_first on the state, and Triton's
  pipelined item loop 2 and 3 deep (cp.async of the state into shared memory).

The default list leaves out static-cap and static-pipe-cap (no measurable change in the first run); --variants
picks any. Two probes are timed in the same rounds (--no-probes leaves them out): ``skeleton``, a kernel with the
default config's grid and tiles that only reads the slot index, loads the state tile and stores it back (what this
structure costs without inputs or arithmetic), ``skeleton-persist``, the same on a persistent grid with the next
tile loaded before this one is stored, at B = 1 ``empty``, one program storing 4 bytes (the launch and
event overhead of a replay), and ``copy``, torch's device copy of the state's bytes (contiguous, no indices: what
moving this many bytes costs at this size, ramp and tail included).

With --serving each variant and the baseline are also timed in benchmarks/bench_decode.py's serving mode (S steps
in one CUDA graph, each on its own slot set of a pool of at least 4x L2; per step), in the same alternating rounds.

Before any timing, each variant is checked on the GPU against the default at every point (outputs and the whole
pool after one step) and on a pool with a padding row and an out-of-pool row (zero / NaN rows, slots no index names
bitwise untouched); a variant that fails or does not compile is reported and left out of the timing. The timing
alternates rounds (every callable once per round, the order rotated) and reports the median over rounds. The
baseline (flash-linear-attention's ``fused_recurrent_gdn2_fwd``) is timed in the same rounds when it imports.

Prints one JSON line per check and per measurement as it goes (also appended to DIR/exp_decode_variants.jsonl), a
table last, and writes DIR/exp_decode_variants.json (DIR: --out, else $OUT when set). About 2-3 minutes on an H200
with the default list; issue 13's command (--variants persist,persist-prefetch,persist-items2 --serving) about as
long.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_decode import (
    BATCHES,
    HEAD_DIMS,
    HEADS,
    SERVING_REPS,
    SERVING_STEPS,
    Problem,
    baseline_call,
    copy_bandwidth,
    environment,
    graph_times,
    l2_bytes,
    load_baseline,
    serving_plan,
    serving_times,
)

from gdn2_tune.kernels.decode_config import (
    DECODE_SPACE,
    DecodeConfig,
    DecodeShape,
    decode_infeasibility,
    default_decode_config,
    padded,
)

# Against the default's own result after one step: the same fp32 operations in the same order (the variants change
# addressing, masking, load paths and register allocation, not the arithmetic), so only FMA contraction choices may
# differ: a few fp32 roundings, ~1e-7 relative; 1e-5 is two orders above. The bf16 output rounds once more (2^-8);
# a flipped rounding of a few elements stays far below 2^-8 in the Frobenius norm.
STATE_TOL = 1e-5
OUT_TOL = 2.0**-8


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """kernels/reference.py's relative Frobenius error (inf for a non-finite x), in float64 on the GPU: a pool of
    2 GiB would take seconds through the host."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    denom = float(ref.norm())
    return float((x - ref).norm()) / (denom if denom > 0 else 1.0)


def register_cap(cfg: DecodeConfig, K: int) -> int:
    """One occupancy step below ptxas's own choice (read off ptxas for sm_90 with static dims): the state tile's
    registers per thread, 64 at K=256, BV=32, 4 warps, fit 128 without spills; 32 (K=128, BV=32) fit 80."""
    tile = padded(K) * cfg.BV // (cfg.num_warps * 32)
    return 128 if tile > 32 else 80


def narrow(c: DecodeConfig) -> DecodeConfig:
    """Half the V tile (twice the programs, half the state per program), at least 8 wide."""
    return dataclasses.replace(c, BV=max(8, c.BV // 2))


def wide(c: DecodeConfig) -> DecodeConfig:
    """Twice the V tile and twice the warps (the same state registers per thread, half the programs)."""
    return dataclasses.replace(c, BV=c.BV * 2, num_warps=min(8, c.num_warps * 2))


# Registers per thread a program needs besides its state tiles, for sizing a persistent grid: ptxas for sm_90 (triton
# 3.6, static dims, batched inputs, one pass) gives K=128, BV=32, 4 warps 72 registers (32 of them the tile) as one
# program per item, 120 with the next item's tile prefetched under the cap of 4 programs per SM (128), no spills.
PERSIST_BESIDES_TILES = 48


def _programs(c: DecodeConfig, tile: int, prefetch: bool) -> int:
    """The most programs per SM (of the space's values) whose register cap holds ``c``'s state tiles (two with
    ``prefetch``; ``tile`` registers per thread each) plus PERSIST_BESIDES_TILES: K=128, BV=32, 4 warps: 6 (80
    registers), 4 with prefetch (128); K=256, BV=32, 4 warps: 4 / 2; K=256, BV=64, 8 warps: 2 / 1."""
    need = tile * (2 if prefetch else 1) + PERSIST_BESIDES_TILES
    values = next(p.values for p in DECODE_SPACE if p.name == "programs_per_sm")
    fits = [p for p in values if p and min(255, 65536 // (p * c.num_warps * 32)) // 8 * 8 >= need
            and p * c.num_warps <= 64]
    return max(fits) if fits else 1


def persistent_at(prefetch: bool = False, item_stages: int = 1,
                  stream: bool = False) -> Callable[[DecodeConfig, int], DecodeConfig]:
    """The default on a persistent grid (see _programs), fetching the next item ahead through registers
    (``prefetch``) or Triton's pipelined item loop (``item_stages`` deep; as many registers as prefetch)."""
    def make(c: DecodeConfig, K: int) -> DecodeConfig:
        tile = padded(K) * c.BV // (c.num_warps * 32)
        return dataclasses.replace(c, programs_per_sm=_programs(c, tile, prefetch or item_stages > 1),
                                   prefetch=prefetch, item_stages=item_stages, stream_state=stream or c.stream_state)
    return make


VARIANTS: dict[str, Callable[[DecodeConfig, int], DecodeConfig]] = {
    "static": lambda c, K: dataclasses.replace(c, static_dims=True),
    "static-pipe": lambda c, K: dataclasses.replace(c, static_dims=True, num_stages=2),
    "static-cap": lambda c, K: dataclasses.replace(c, static_dims=True, max_registers=register_cap(c, K)),
    "static-pipe-cap": lambda c, K: dataclasses.replace(c, static_dims=True, num_stages=2,
                                                        max_registers=register_cap(c, K)),
    "batch": lambda c, K: dataclasses.replace(c, batch_inputs=True),
    "static-batch": lambda c, K: dataclasses.replace(c, static_dims=True, batch_inputs=True),
    "static-batch-cap": lambda c, K: dataclasses.replace(c, static_dims=True, batch_inputs=True,
                                                         max_registers=register_cap(c, K)),
    "static-batch-1pass": lambda c, K: dataclasses.replace(c, static_dims=True, batch_inputs=True, one_pass=True),
    "static-batch-narrow": lambda c, K: narrow(dataclasses.replace(c, static_dims=True, batch_inputs=True)),
    "static-batch-wide": lambda c, K: wide(dataclasses.replace(c, static_dims=True, batch_inputs=True)),
    # One warp per program: the K reductions stay inside the warp (shuffles, no block barriers), 64 state registers
    # per thread (BV=16 at K=128, BV=8 at K=256; ptxas for sm_90: 124 registers at K=128, no spills).
    "static-batch-w1": lambda c, K: dataclasses.replace(c, BV=16 if K <= 128 else 8, num_warps=1, static_dims=True,
                                                        batch_inputs=True, max_registers=0),
    # Issue 13: a persistent grid (programs_per_sm programs per SM, each looping over every G-th work item), plain,
    # with the next item's state load issued before this item's work, and with that and evict_first on the state.
    "persist": persistent_at(),
    "persist-prefetch": persistent_at(prefetch=True),
    "persist-prefetch-stream": persistent_at(prefetch=True, stream=True),
    # Triton's software pipelining of the item loop: the state copied by cp.async into shared memory 1 (2) items
    # ahead (read off the sm_90 compile at K=128, BV=32: LDGSTS.128 of the tiles, 18.5 / 35.6 KB shared).
    "persist-items2": persistent_at(item_stages=2),
    "persist-items3": persistent_at(item_stages=3),
    # Issue 13, session 9: the V tile of 64 at the same warps (exp_decode_walk.py's memory-only probes at K=128,
    # B=128: [K, 64] tiles 69.6 µs serving against 75.5-76.1 for [K, 32], at 2, 4 or 8 warps alike).
    # At K=256 a [256, 64] tile needs 8 warps (bv64-w4 is then the w8 tile); the first try (session 9, 15:32) kept the
    # default's warps, 2 at B=8, which no [K, 64] tile fits.
    "bv64-w4": lambda c, K: dataclasses.replace(c, BV=64, num_warps=4 if K <= 128 else 8),
    "bv64-w8": lambda c, K: dataclasses.replace(c, BV=64, num_warps=8),
}
# Timed unless --variants says otherwise: static-cap and static-pipe-cap changed nothing at T = 1 in the 2026-11-30
# run (benchmarks/results/decode-variants-h200-2026-11-30.json), and static-pipe was then the static program itself.
DEFAULT_VARIANTS = ("static", "static-pipe", "batch", "static-batch", "static-batch-cap", "static-batch-1pass",
                    "static-batch-narrow", "static-batch-wide", "static-batch-w1")


@triton.jit
def _skeleton_kernel(idx, pool, stride, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                     NV: tl.constexpr):
    """The decode kernel's memory traffic alone, on its grid and tiles: slot index, state tile in, state tile out."""
    pid = tl.program_id(0)
    i_v = pid % NV
    i_n = pid // NV // H
    i_h = pid // NV % H
    slot = tl.load(idx + i_n).to(tl.int64)
    p = pool + slot * stride + i_h * K * V + tl.arange(0, K)[:, None] * V + i_v * BV + tl.arange(0, BV)[None, :]
    tl.store(p, tl.load(p) * 1.0)


@triton.jit
def _skeleton_persistent_kernel(idx, pool, stride, N_ITEMS, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                BV: tl.constexpr, NV: tl.constexpr):
    """The skeleton on a persistent grid: each program loops over every G-th item and loads the next item's tile
    before it stores this one's (the memory side of ``programs_per_sm`` with ``prefetch``)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    o_s = tl.arange(0, K)[:, None] * V + tl.arange(0, BV)[None, :]
    p = pool + tl.load(idx + pid // NV // H).to(tl.int64) * stride + (pid // NV % H) * K * V + pid % NV * BV + o_s
    b_s = tl.load(p)
    for item in tl.range(pid, N_ITEMS, G):
        nxt = item + G
        live = nxt < N_ITEMS
        slot = tl.load(idx + nxt // NV // H, mask=live, other=0).to(tl.int64)
        p1 = pool + slot * stride + (nxt // NV % H) * K * V + nxt % NV * BV + o_s
        b_s1 = tl.load(p1, mask=(tl.arange(0, K) < tl.where(live, K, 0))[:, None], other=0.0)
        tl.store(p, b_s)
        p = p1
        b_s = b_s1


@triton.jit
def _empty_kernel(x):
    """One program, one 4-byte store: the launch and event overhead of a graph replay."""
    tl.store(x, 0)


def probes(p: Problem, cfg: DecodeConfig, K: int) -> dict[str, Callable[[], object]]:
    """Reference points for a shape, timed like the variants: ``skeleton`` (the default config's grid and tiles,
    memory only: the floor this structure reaches without inputs or arithmetic) and, at B = 1, ``empty``."""
    N = p.idx.shape[0]
    NV = K // cfg.BV
    # The persistent skeleton: as many programs per SM as hold two tiles (+ 48 registers) in 64K registers, under
    # the register cap that keeps them all resident.
    threads = cfg.num_warps * 32
    need = -(-(2 * K * cfg.BV // threads + 48) // 8) * 8
    per_sm = max(1, min(8, 65536 // (threads * need)))
    cap = min(255, 65536 // (threads * per_sm)) // 8 * 8
    grid = min(N * HEADS * NV, per_sm * torch.cuda.get_device_properties(p.pool.device).multi_processor_count)
    calls: dict[str, Callable[[], object]] = {
        "skeleton": lambda: _skeleton_kernel[(N * HEADS * NV,)](p.idx, p.pool, p.pool.stride(0), HEADS, K, K, cfg.BV,
                                                                 NV, num_warps=cfg.num_warps),
        "skeleton-persist": lambda: _skeleton_persistent_kernel[(grid,)](
            p.idx, p.pool, p.pool.stride(0), N * HEADS * NV, HEADS, K, K, cfg.BV, NV, num_warps=cfg.num_warps,
            maxnreg=cap),
    }
    if N == 1:
        calls["empty"] = lambda: _empty_kernel[(1,)](p.out)
    # The same bytes moved by the device's own copy (contiguous, no indices): what this many bytes cost at this
    # size, launch, ramp and tail included, against the roof measured on 2 GiB.
    src = torch.empty(p.state_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    calls["copy"] = lambda: dst.copy_(src)
    return calls


_jsonl: Path | None = None


PROBES = ("skeleton", "skeleton-persist", "copy", "empty")


def emit(row: dict) -> None:
    """Print one JSON line (flushed) and append it to DIR/exp_decode_variants.jsonl when there is a DIR."""
    line = json.dumps(row)
    print(line, flush=True)
    if _jsonl is not None:
        with _jsonl.open("a") as f:
            f.write(line + "\n")


def one_step(p: Problem, cfg: DecodeConfig | None, pool0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and pool after one step from ``pool0`` (``p.pool`` is restored to ``pool0`` for the next)."""
    p.pool.copy_(pool0)
    p.out.fill_(float("nan"))
    p.ours(cfg)()
    torch.cuda.synchronize()
    o, s = p.out.clone(), p.pool.clone()
    p.pool.copy_(pool0)
    return o, s


def check_against_default(p: Problem, name: str, cfg: DecodeConfig, ref: tuple[torch.Tensor, torch.Tensor],
                          pool0: torch.Tensor) -> dict:
    row: dict = {"kind": "check", "variant": name, "config": cfg.label()}
    try:
        o, s = one_step(p, cfg, pool0)
    except Exception as exc:  # noqa: BLE001 - a variant that fails to compile or launch is a recorded outcome
        row.update(ok=False, error=repr(exc)[:300])
        return row
    err_o, err_s = rel_err(o, ref[0]), rel_err(s, ref[1])
    row.update(err_o=err_o, err_state=err_s, ok=bool(err_o < OUT_TOL and err_s < STATE_TOL))
    return row


def check_padding(K: int, name: str, make: Callable[[DecodeConfig, int], DecodeConfig] | None) -> dict:
    """8 sequences, one a padding row (index -1) and one past the pool: zero and NaN outputs, the live rows equal to
    the default's, and the two slots no index names bitwise untouched."""
    N = 8
    p = Problem(N, K, seed=3)
    slots = p.idx.clone()
    p.idx = slots.clone()
    p.idx[1], p.idx[5] = -1, N + 7
    cfg = default_decode_config(DecodeShape(N, 1, HEADS, K, K, "bf16", "fp32"))
    variant = make(cfg, K) if make is not None else cfg
    pool0 = p.pool.clone()
    row: dict = {"kind": "padding_check", "K": K, "variant": name, "config": variant.label()}
    try:
        ref = one_step(p, cfg, pool0)
        o, s = one_step(p, variant, pool0)
    except Exception as exc:  # noqa: BLE001 - recorded, and the variant is left out
        row.update(ok=False, error=repr(exc)[:300])
        return row
    live = [n for n in range(N) if n not in (1, 5)]
    untouched = slots[[1, 5]]
    row["padding_row_zero"] = bool((o[1] == 0).all())
    row["out_of_pool_row_nan"] = bool(o[5].isnan().all())
    row["untouched_slots_bitwise"] = bool(torch.equal(s[untouched].view(torch.int32),
                                                      pool0[untouched].view(torch.int32)))
    row["err_live"] = rel_err(o[live], ref[0][live])
    row["ok"] = bool(row["padding_row_zero"] and row["out_of_pool_row_nan"] and row["untouched_slots_bitwise"]
                     and row["err_live"] < OUT_TOL)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (alternating, order rotated)")
    ap.add_argument("--reps", type=int, default=30, help="graph replays per timing, cold and warm each")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated subset of {list(VARIANTS)}")
    ap.add_argument("--no-probes", action="store_true", help="leave out the skeleton, empty-kernel and copy probes")
    ap.add_argument("--serving", action="store_true",
                    help="also time every variant and the baseline in bench_decode.py's serving mode (S steps in one "
                         "graph on distinct slot sets of a pool of at least 4x L2, per step)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated B values")
    ap.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)), help="comma-separated K=V values")
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected names from {list(VARIANTS)}")
    global _jsonl
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        _jsonl = args.out / "exp_decode_variants.jsonl"
    t_start = time.time()
    env = environment()
    emit({"kind": "env", **env})
    baseline, signature = load_baseline()
    emit({"kind": "baseline", "signature": signature})
    bw = copy_bandwidth()
    emit({"kind": "copy_roof", "bytes_per_s": bw})

    batches = tuple(int(x) for x in args.batches.split(",") if x)
    head_dims = tuple(int(x) for x in args.head_dims.split(",") if x)
    broken: dict[int, set[str]] = {K: set() for K in head_dims}
    checks = []
    for K in head_dims:
        for name in names:
            row = check_padding(K, name, VARIANTS[name])
            emit(row)
            checks.append(row)
            if not row["ok"]:
                broken[K].add(name)

    results = []
    l2 = l2_bytes()
    for K in head_dims:
        for N in batches:
            sets, S = serving_plan(N * HEADS * K * K * 4, SERVING_STEPS, l2) if args.serving else (1, 0)
            p = Problem(N, K, ranges=sets)
            shape = DecodeShape(N, 1, HEADS, K, K, "bf16", "fp32")
            default = default_decode_config(shape)
            floor_us = 2 * p.state_bytes / bw * 1e6
            pool0 = p.pool.clone()
            ref = one_step(p, default, pool0)
            calls: dict[str, Callable[[], object]] = {"default": p.ours(default)}
            # Serving mode's step on a given slot set, per callable that has one (not the probes).
            makers: dict[str, Callable[[torch.Tensor], Callable[[], object]]] = {
                "default": lambda idx, p=p, c=default: p.ours(c, idx)}
            labels = {"default": default.label()}
            configs = {"default": default}
            for name in names:
                cfg = VARIANTS[name](default, K)
                reason = decode_infeasibility(cfg, shape)
                same = next((n for n, c in configs.items() if c == cfg), None)
                if same is not None:  # e.g. "static" where the default compiles the dims in: timed once
                    emit({"kind": "skip", "K": K, "B": N, "variant": name, "config": cfg.label(),
                          "why": f"the same config as {same}"})
                    continue
                configs[name] = cfg
                if name in broken[K] or reason is not None:
                    emit({"kind": "skip", "K": K, "B": N, "variant": name, "config": cfg.label(),
                          "why": reason or "failed the padding check"})
                    continue
                row = check_against_default(p, name, cfg, ref, pool0)
                row.update(K=K, B=N)
                emit(row)
                checks.append(row)
                if row["ok"]:
                    calls[name] = p.ours(cfg)
                    makers[name] = lambda idx, p=p, c=cfg: p.ours(c, idx)
                    labels[name] = cfg.label()
            if baseline is not None:
                try:
                    calls["fla"] = baseline_call(baseline, p)
                    makers["fla"] = lambda idx, p=p: baseline_call(baseline, p, idx)
                    labels["fla"] = "fused_recurrent_gdn2_fwd"
                except Exception as exc:  # noqa: BLE001 - a baseline that cannot be called is a result
                    emit({"kind": "skip", "K": K, "B": N, "variant": "fla", "why": repr(exc)[:300]})
            if not args.no_probes:
                for name, fn in probes(p, default, K).items():
                    calls[name] = fn
                    labels[name] = {"skeleton": f"skeleton probe ({default.label()} grid)", "empty": "1 program",
                                    "skeleton-persist": f"persistent skeleton probe ({default.label()} tile)",
                                    "copy": "torch copy_ of the state's bytes"}[name]
            times: dict[str, list[dict]] = {name: [] for name in calls}
            serving_us: dict[str, list[float]] = {name: [] for name in makers}
            order = [(name, "cold") for name in calls] + [(name, "serving") for name in makers if args.serving]
            for r in range(args.rounds):
                for name, mode in order[r % len(order):] + order[: r % len(order)]:
                    try:
                        if mode == "cold":
                            t = graph_times(calls[name], args.reps, eager=False)
                        else:
                            t = serving_times([makers[name](p.sets[s % sets]) for s in range(S)], SERVING_REPS)
                    except Exception as exc:  # noqa: BLE001 - recorded; the other callables still run
                        emit({"kind": "error", "K": K, "B": N, "variant": name, "mode": mode, "error": repr(exc)[:300]})
                        continue
                    if mode == "cold":
                        times[name].append(t)
                        emit({"kind": "time", "K": K, "B": N, "round": r, "variant": name, "config": labels[name],
                              "mode": "cold", "p50_us": round(t["p50"], 2), "warm_p50_us": round(t["warm_p50"], 2)})
                    else:
                        serving_us[name].append(t["p50"])
                        emit({"kind": "time", "K": K, "B": N, "round": r, "variant": name, "config": labels[name],
                              "mode": "serving", "steps_per_graph": S, "slot_sets": sets,
                              "p50_us": round(t["p50"], 2)})
            summary: dict = {"kind": "summary", "K": K, "B": N, "floor_us": round(floor_us, 2), "variants": {}}
            fla_us = statistics.median(t["p50"] for t in times["fla"]) if times.get("fla") else None
            fla_serving = statistics.median(serving_us["fla"]) if serving_us.get("fla") else None
            for name, ts in times.items():
                if not ts:
                    continue
                cold = statistics.median(t["p50"] for t in ts)
                warm = statistics.median(t["warm_p50"] for t in ts)
                summary["variants"][name] = {
                    "config": labels[name], "cold_us": round(cold, 2), "warm_us": round(warm, 2),
                    "x_floor": round(cold / floor_us, 3), "vs_fla": round(cold / fla_us, 3) if fla_us else None,
                }
                if serving_us.get(name):
                    serve = statistics.median(serving_us[name])
                    summary["variants"][name].update(
                        serving_us=round(serve, 2), serving_x_floor=round(serve / floor_us, 3),
                        serving_vs_fla=round(serve / fla_serving, 3) if fla_serving else None)
            ours = {n: v for n, v in summary["variants"].items() if n not in ("fla", *PROBES)}
            if ours:
                best = min(ours, key=lambda n: ours[n]["cold_us"])
                summary.update(best=best, best_config=ours[best]["config"], best_us=ours[best]["cold_us"],
                               best_vs_fla=ours[best]["vs_fla"], best_x_floor=ours[best]["x_floor"])
            summary["state_bytes_each_way"] = p.state_bytes
            emit(summary)
            results.append(summary)
            del p, pool0, ref
            torch.cuda.empty_cache()

    seconds = round(time.time() - t_start, 1)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "exp_decode_variants.json").write_text(json.dumps(
            {"env": env, "baseline_signature": signature, "copy_bytes_per_s": bw, "variants": names,
             "checks": checks, "results": results, "seconds": seconds}, indent=1))
    cols = ["default", *names, "fla", *([] if args.no_probes else PROBES)]
    print(f"\nT=1, H={HEADS}, fp32 state in place, CUDA-graph replay; cold (L2 flushed) p50 µs, median of "
          f"{args.rounds} rounds; ×floor at {bw / 1e12:.2f} TB/s in brackets")
    print(f"  {'K=V':>4} {'B':>4} {'floor':>7} " + " ".join(f"{c:>16}" for c in cols))
    for s in results:
        cells = []
        for c in cols:
            v = s["variants"].get(c)
            cells.append(f"{v['cold_us']:8.1f} ({v['x_floor']:.2f})" if v else "-")
        print(f"  {s['K']:>4} {s['B']:>4} {s['floor_us']:7.1f} " + " ".join(f"{c:>16}" for c in cells))
    if args.serving:
        cols = ["default", *names, "fla"]
        print("\nserving mode (S steps per graph on distinct slot sets of a pool of >= 4x L2): µs per step, median of "
              "rounds")
        print(f"  {'K=V':>4} {'B':>4} {'floor':>7} " + " ".join(f"{c:>16}" for c in cols))
        for s in results:
            cells = []
            for c in cols:
                v = s["variants"].get(c, {})
                cells.append(f"{v['serving_us']:8.1f} ({v['serving_x_floor']:.2f})" if "serving_us" in v else "-")
            print(f"  {s['K']:>4} {s['B']:>4} {s['floor_us']:7.1f} " + " ".join(f"{c:>16}" for c in cells))
    print(f"\n{seconds:.0f} s")


if __name__ == "__main__":
    main()
