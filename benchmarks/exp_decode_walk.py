"""Issue 13: which walk over the decode state reaches the copy's bandwidth? Memory-only probes (an experiment).

    python benchmarks/exp_decode_walk.py [--out DIR] [--rounds 5] [--reps 30] [--probes a,b] [--no-serving]

At K=V=128, B=128, H=16, T=1 the decode step reads and writes the fp32 state [N, H, K, V] once (268 MB). The
decode kernel (BV=32, 4 warps: one program per (sequence, head, V tile), tile [K, BV] = 128 rows of 128 B, 512 B
apart, the V tiles of a head neighbouring program ids) and a memory-only skeleton of it both take ~79 µs cold, a
torch copy of the same bytes 69 µs (BENCHMARKS.md, 2026-11-30). Each probe here is decode's memory structure
without its inputs: through a 1-D slot index (the first B of a permutation of a pool of at least 4x L2), load the
(slot, head) state in some tiling, make a value that depends on the whole loaded tile (``s - mean over K of s``,
per column: so every load completes before the first store, as decode's ``S^T k`` does; bounded under repeated
in-place replays) and store it back in place. Probes:

- ``kv-bvB-wW``: decode's walk, tile [K, BV=B] of the [K, V] state on W warps, grid (sequence, head, V tile) with
  the V tile fastest. B ∈ {32, 64, 128} x W ∈ {2, 4, 8} (not 128 on 2 warps: a 256-register tile). BV = V = 128 is
  the whole head (64 KB contiguous per program; the K reduction crosses warps through shared memory).
- ``kv-bv32-w4-vmajor``: decode's tiles with the V tile slowest: neighbouring programs take the same column strip of
  different (sequence, head) states instead of the neighbouring strips of one.
- ``vk-16k-wW``: the same bytes walked as the transposed layout [V, K] would be (K contiguous, what a K-major state
  layout would give decode): a program takes 32 V rows x 128 K = one contiguous 16 KB chunk, consecutive programs
  consecutive chunks, the reduction over K within each row. ``vk-4k-w1``: the same with 8 V rows (4 KB) on one
  warp (4x the programs, each a quarter of the work: a finer-grained grid, like torch's copy).
- ``skeleton-bv32-w4``: decode's tiles, no reduction (exp_decode_variants.py's skeleton: load, x 1.0, store).
- ``copylike-16k-w4``: contiguous 16 KB chunks through the slot index, no reduction (the upper bound of a kernel
  of this grid size with an index load).
- ``torch-copy``: torch's device copy of the same bytes (contiguous, no index), the 69 µs reference.

Timed as benchmarks/exp_decode_variants.py times its probes: each call captured in a CUDA graph and replayed, L2
flushed before each replay ("cold", the figure; "warm" without), alternating rounds (every probe once per round,
the order rotated), median over rounds; with serving mode (bench_decode.py's: S steps in one graph on distinct slot
sets of the pool, per step) in the same rounds unless --no-serving. The floor is the state read + written once at
the 2 GiB copy bandwidth measured here. Every probe is first checked once against torch on the GPU (touched slots
equal ``s - mean_K(s)`` to 1e-6 relative, untouched slots bitwise unchanged); a failing probe is reported and not
timed. One JSON line per check and measurement (also appended to DIR/exp_decode_walk.jsonl; DIR: --out, else $OUT
when set), a table last. About a minute on an H200.

Offline sm_90 compile (triton 3.6.0, ptxas from the wheel, K=V=128, H=16, pointers and stride 16-divisible as
at launch): every probe moves the state with 16-byte vectors (ld.global.v4.b32 / st.global.v4.b32), none spills
(stack 0). Registers per thread, shared bytes (the cross-warp K reduction), resident programs per SM (65536
registers, 2048 threads, 32 programs) and the state tile bytes those programs have loaded or are loading per SM:

    probe               regs  shared  programs/SM  tile   tile bytes/SM   programs
    kv-bv32-w2            80     256           12   16 KB      192 KB         8192
    kv-bv32-w4            48     512           10   16 KB      160 KB         8192   (decode's tiles and grid)
    kv-bv32-w8            32    1024            8   16 KB      128 KB         8192
    kv-bv64-w2           152     512            6   32 KB      192 KB         4096
    kv-bv64-w4            80    1024            6   32 KB      192 KB         4096
    kv-bv64-w8            48    2048            5   32 KB      160 KB         4096
    kv-bv128-w4          157    2048            3   64 KB      192 KB         2048
    kv-bv128-w8           94    4096            2   64 KB      128 KB         2048
    kv-bv32-w4-vmajor     48     512           10   16 KB      160 KB         8192
    vk-4k-w1              58       0           32    4 KB      128 KB        32768
    vk-16k-w4             32       0           16   16 KB      256 KB         8192
    vk-16k-w8             32       0            8   16 KB      128 KB         8192
    skeleton-bv32-w4      30       0           16   16 KB      256 KB         8192
    copylike-16k-w4       28       0           16   16 KB      256 KB         8192

Little's law at 4.2 TB/s and ~1 µs loaded latency wants ~4.2 MB in flight, ~32 KB per SM (132 SMs): every probe
offers 4-8x that, so occupancy alone should not separate them; the walk (how the bytes in flight map onto DRAM
pages and channels, and when the reads of a region turn into its writes) and the grid's granularity (the tail) may.
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

HEADS = 16
HEAD_DIM = 128
BATCH = 128
ROUNDS = 5
REPS = 30
# Touched slots against torch's s - mean_K(s) in fp32: one sum of 128 terms in a different order, ~1e-7 relative.
CHECK_TOL = 1e-6


@triton.jit
def _kv_walk_kernel(idx, pool, stride, N, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                    NV: tl.constexpr, REDUCE: tl.constexpr, V_MAJOR: tl.constexpr):
    """Decode's walk: tile [K, BV] of the [K, V] state of (slot, head); V tile fastest (or slowest, V_MAJOR)."""
    pid = tl.program_id(0)
    if V_MAJOR:
        i_v = pid // (N * H)
        i_n = pid % (N * H) // H
        i_h = pid % H
    else:
        i_v = pid % NV
        i_n = pid // NV // H
        i_h = pid // NV % H
    slot = tl.load(idx + i_n).to(tl.int64)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    p_s = pool + slot * stride + i_h * K * V + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(p_s)
    if REDUCE:
        b_s = b_s - tl.sum(b_s, axis=0)[None, :] * (1.0 / K)
    else:
        b_s = b_s * 1.0
    tl.store(p_s, b_s)


@triton.jit
def _vk_walk_kernel(idx, pool, stride, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                    NV: tl.constexpr, REDUCE: tl.constexpr):
    """The transposed walk: the (slot, head) block read as [V, K] (K contiguous), tile [BV, K] = BV * K * 4 contiguous
    bytes, consecutive programs consecutive tiles; the K reduction along each row."""
    pid = tl.program_id(0)
    i_v = pid % NV
    i_n = pid // NV // H
    i_h = pid // NV % H
    slot = tl.load(idx + i_n).to(tl.int64)
    o_v = i_v * BV + tl.arange(0, BV)
    o_k = tl.arange(0, K)
    p_s = pool + slot * stride + i_h * K * V + o_v[:, None] * K + o_k[None, :]
    b_s = tl.load(p_s)
    if REDUCE:
        b_s = b_s - tl.sum(b_s, axis=1)[:, None] * (1.0 / K)
    else:
        b_s = b_s * 1.0
    tl.store(p_s, b_s)


@dataclasses.dataclass(frozen=True)
class Walk:
    """One probe kernel: walk "kv" (decode's [K, BV] tiles) or "vk" (contiguous [BV, K] tiles)."""

    walk: str
    BV: int
    num_warps: int
    reduce: bool = True
    v_major: bool = False

    def launch(self, idx: torch.Tensor, pool: torch.Tensor) -> None:
        N, H, K, V = idx.shape[0], pool.shape[1], pool.shape[2], pool.shape[3]
        NV = V // self.BV
        grid = (N * H * NV,)
        if self.walk == "kv":
            _kv_walk_kernel[grid](idx, pool, pool.stride(0), N, H, K, V, self.BV, NV, self.reduce, self.v_major,
                                  num_warps=self.num_warps)
        else:
            _vk_walk_kernel[grid](idx, pool, pool.stride(0), H, K, V, self.BV, NV, self.reduce,
                                  num_warps=self.num_warps)

    def reference(self, s: torch.Tensor) -> torch.Tensor:
        """The probe's result on the touched slots' states s [N, H, K, V] (the "vk" walk sees each block as [V, K])."""
        if not self.reduce:
            return s.clone()
        if self.walk == "kv":
            return s - s.mean(dim=2, keepdim=True)
        t = s.reshape(*s.shape[:2], s.shape[3], s.shape[2])
        return (t - t.mean(dim=3, keepdim=True)).reshape(s.shape)


WALKS: dict[str, Walk] = {
    **{f"kv-bv{bv}-w{w}": Walk("kv", bv, w) for bv in (32, 64, 128) for w in (2, 4, 8) if bv * HEAD_DIM // (32 * w)
       <= 128},
    "kv-bv32-w4-vmajor": Walk("kv", 32, 4, v_major=True),
    "vk-4k-w1": Walk("vk", 8, 1),
    "vk-16k-w4": Walk("vk", 32, 4),
    "vk-16k-w8": Walk("vk", 32, 8),
    "skeleton-bv32-w4": Walk("kv", 32, 4, reduce=False),
    "copylike-16k-w4": Walk("vk", 32, 4, reduce=False),
}
PROBES = (*WALKS, "torch-copy")

_jsonl: Path | None = None


def emit(row: dict) -> None:
    """Print one JSON line (flushed) and append it to DIR/exp_decode_walk.jsonl when there is a DIR."""
    line = json.dumps(row)
    print(line, flush=True)
    if _jsonl is not None:
        with _jsonl.open("a") as f:
            f.write(line + "\n")


def check(walk: Walk, pool: torch.Tensor, idx: torch.Tensor) -> dict:
    """One launch on a copy of the pool against torch: touched slots to CHECK_TOL, the others bitwise unchanged."""
    before = pool.clone()
    work = pool.clone()
    try:
        walk.launch(idx, work)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a probe that does not compile or launch is a recorded outcome
        return {"ok": False, "error": repr(exc)[:300]}
    touched = idx.long()
    rest = torch.ones(pool.shape[0], dtype=torch.bool, device=pool.device)
    rest[touched] = False
    ref = walk.reference(before[touched].double())
    got = work[touched].double()
    err = float((got - ref).norm() / ref.norm()) if torch.isfinite(got).all() else float("inf")
    untouched = bool(torch.equal(work[rest].view(torch.int32), before[rest].view(torch.int32)))
    return {"ok": bool(err < CHECK_TOL and untouched), "err": err, "untouched_bitwise": untouched}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="timing rounds (alternating, order rotated)")
    ap.add_argument("--reps", type=int, default=REPS, help="graph replays per timing, cold and warm each")
    ap.add_argument("--probes", default=",".join(PROBES), help=f"comma-separated subset of {list(PROBES)}")
    ap.add_argument("--batch", type=int, default=BATCH, help="sequences per step (B)")
    ap.add_argument("--head-dim", type=int, default=HEAD_DIM, help="K = V (a power of two, >= 32)")
    ap.add_argument("--no-serving", action="store_true", help="leave out bench_decode.py's serving mode")
    args = ap.parse_args(argv)
    names = [n for n in args.probes.split(",") if n]
    unknown = sorted(set(names) - set(PROBES))
    if unknown:
        raise SystemExit(f"--probes: unknown {unknown}; expected names from {list(PROBES)}")
    if not torch.cuda.is_available():
        raise SystemExit("exp_decode_walk.py times GPU kernels: no CUDA device here")
    from bench_decode import (
        SERVING_REPS,
        SERVING_STEPS,
        copy_bandwidth,
        environment,
        graph_times,
        l2_bytes,
        serving_plan,
        serving_times,
    )

    global _jsonl
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        _jsonl = args.out / "exp_decode_walk.jsonl"
    t_start = time.time()
    emit({"kind": "env", **environment()})
    bw = copy_bandwidth()
    emit({"kind": "copy_roof", "bytes_per_s": bw})

    N, K = args.batch, args.head_dim
    step_bytes = N * HEADS * K * K * 4
    floor_us = 2 * step_bytes / bw * 1e6
    # R disjoint slot sets of N (a permutation of a pool of >= 4x L2): cold timing uses the first, serving mode
    # cycles through them so that a step's slots have left L2 before it comes back to them.
    sets, S = serving_plan(step_bytes, SERVING_STEPS, l2_bytes())
    gen = torch.Generator(device="cuda").manual_seed(0)
    pool = 0.1 * torch.randn(sets * N, HEADS, K, K, generator=gen, device="cuda")
    perm = torch.randperm(sets * N, generator=gen, device="cuda").view(sets, N)
    idx = perm[0]
    emit({"kind": "setup", "B": N, "H": HEADS, "K": K, "V": K, "pool_slots": sets * N, "pool_bytes": pool.numel() * 4,
          "state_bytes_each_way": step_bytes, "floor_us": round(floor_us, 2), "serving_steps": S})

    calls: dict[str, Callable[[], object]] = {}
    makers: dict[str, Callable[[torch.Tensor], Callable[[], object]]] = {}
    for name in names:
        if name == "torch-copy":
            src = torch.empty(step_bytes // 4, device="cuda")
            dst = torch.empty_like(src)
            calls[name] = lambda d=dst, s=src: d.copy_(s)
            continue
        walk = WALKS[name]
        row = check(walk, pool, idx)
        emit({"kind": "check", "probe": name, **dataclasses.asdict(walk), **row})
        if row["ok"]:
            calls[name] = lambda w=walk: w.launch(idx, pool)
            makers[name] = lambda i, w=walk: (lambda: w.launch(i, pool))

    serving = not args.no_serving
    times: dict[str, list[dict]] = {n: [] for n in calls}
    serving_us: dict[str, list[float]] = {n: [] for n in makers}
    order = [(n, "cold") for n in calls] + [(n, "serving") for n in makers if serving]
    for r in range(args.rounds):
        for name, mode in order[r % len(order):] + order[: r % len(order)]:
            try:
                if mode == "cold":
                    t = graph_times(calls[name], args.reps, eager=False)
                else:
                    t = serving_times([makers[name](perm[s % sets]) for s in range(S)], SERVING_REPS)
            except Exception as exc:  # noqa: BLE001 - recorded; the other probes still run
                emit({"kind": "error", "probe": name, "mode": mode, "error": repr(exc)[:300]})
                continue
            if mode == "cold":
                times[name].append(t)
                emit({"kind": "time", "round": r, "probe": name, "mode": "cold", "p50_us": round(t["p50"], 2),
                      "p20_us": round(t["p20"], 2), "p80_us": round(t["p80"], 2),
                      "warm_p50_us": round(t["warm_p50"], 2), "x_floor": round(t["p50"] / floor_us, 3)})
            else:
                serving_us[name].append(t["p50"])
                emit({"kind": "time", "round": r, "probe": name, "mode": "serving", "p50_us": round(t["p50"], 2),
                      "x_floor": round(t["p50"] / floor_us, 3)})

    summary: dict = {"kind": "summary", "B": N, "K": K, "floor_us": round(floor_us, 2), "probes": {}}
    for name, ts in times.items():
        if not ts:
            continue
        cold = statistics.median(t["p50"] for t in ts)
        entry = {"cold_us": round(cold, 2), "x_floor": round(cold / floor_us, 3),
                 "warm_us": round(statistics.median(t["warm_p50"] for t in ts), 2)}
        if serving_us.get(name):
            serve = statistics.median(serving_us[name])
            entry.update(serving_us=round(serve, 2), serving_x_floor=round(serve / floor_us, 3))
        summary["probes"][name] = entry
    summary["seconds"] = round(time.time() - t_start, 1)
    emit(summary)

    print(f"\nB={N}, H={HEADS}, K=V={K}, fp32 state in place through 1-D slot indices ({sets * N}-slot pool); "
          f"floor {floor_us:.1f} µs at {bw / 1e12:.2f} TB/s; median of {args.rounds} rounds")
    print(f"  {'probe':<20} {'cold µs':>8} {'x floor':>8} {'warm µs':>8} {'serving':>8} {'x floor':>8}")
    for name, e in summary["probes"].items():
        serve = f"{e['serving_us']:8.1f} {e['serving_x_floor']:8.3f}" if "serving_us" in e else f"{'-':>8} {'-':>8}"
        print(f"  {name:<20} {e['cold_us']:8.1f} {e['x_floor']:8.3f} {e['warm_us']:8.1f} {serve}")
    print(f"\n{summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
