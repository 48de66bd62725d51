"""Why the tuner and exp_decode_b8 rank decode configs differently at K=V=256, B=8 (an experiment, not a test).

    python benchmarks/exp_decode_protocol.py [--out DIR] [--rounds 7]

Session 12 (2026-12-01, H200): exp_decode_b8's paired rounds against the baseline put BV32-w4 without static dims
and with a 128-register cap (``masked-r128``) 1.3% ahead of the baseline and 2.5% ahead of the table config with
static dims, in 31 of 31 rounds; the tuner, on the same GPU, ranked the static configs ahead of the masked ones by
1-4% in its search and in its interleaved re-time. The two protocols differ in the pool, not in how a launch is
timed (both: flush L2 by zeroing a 256 MB buffer, then one CUDA-graph replay between two events):

- the tuner's ``DecodeRun``: a pool of exactly B slots, the step's indices a permutation of them (int32);
- exp_decode_b8 (bench_decode's ``Problem``): a pool of B · sets slots, the step's slots B of them at random
  (int64), and its own inputs.

The first run (benchmarks/results/decode-protocol-h200-2026-12-01-s12.json) showed the pool mattering; the second
adds each protocol's pool with the other's index dtype (``-i64``, ``-i32``).

This times four configs under four protocols in the same rounds (the order rotated every round): the tuner's
Bench as it is ("tuner-pool=B"), the tuner's Bench with a pool of 8·B slots and B of them at random
("tuner-pool=8B"), bench_decode's cold replay on its serving pool ("bench-pool=8B", what exp_decode_b8 times) and on
a pool of B slots ("bench-pool=B"). Per protocol and config: the median over rounds of each round's median, and the
median paired ratio to the table config (``static``) in the same round. One JSON line each, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import Problem, graph_times

from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.decode_config import DecodeConfig
from gdn2_tune.tuner.measure import Bench

N, K = 8, 256
POOL_FACTOR = 8
COLD_REPS = 30
BASE = DecodeConfig(BV=32, num_warps=4, one_pass=True, static_dims=True, batch_inputs=True)
CONFIGS = {
    "static": BASE,
    "static-r128": DecodeConfig(**{**BASE.to_dict(), "max_registers": 128}),
    "masked": DecodeConfig(**{**BASE.to_dict(), "static_dims": False}),
    "masked-r128": DecodeConfig(**{**BASE.to_dict(), "static_dims": False, "max_registers": 128}),
}


def tuner_bench(pool_factor: int, index_dtype: torch.dtype = torch.int32) -> Bench:
    bench = Bench(Shape(N, 1, 16, K, K, "bf16"), "cuda", op="decode")
    run = bench.run
    if pool_factor > 1:
        gen = torch.Generator().manual_seed(7)
        run.pool0 = torch.randn(pool_factor * N, 16, K, K, generator=gen).cuda()
        run.pool = run.pool0.clone()
        run.indices = torch.randperm(pool_factor * N, generator=gen)[:N].cuda()
    run.indices = run.indices.to(index_dtype)
    return bench


def bench_problem(pool_factor: int, index_dtype: torch.dtype = torch.int64) -> Problem:
    p = Problem(N, K, ranges=pool_factor)
    p.idx = p.idx.to(index_dtype)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    benches = {"tuner-pool=B": tuner_bench(1), "tuner-pool=8B": tuner_bench(POOL_FACTOR),
               "tuner-pool=8B-i64": tuner_bench(POOL_FACTOR, torch.int64)}
    problems = {"bench-pool=8B": bench_problem(POOL_FACTOR), "bench-pool=B": bench_problem(1),
                "bench-pool=8B-i32": bench_problem(POOL_FACTOR, torch.int32)}
    calls = {}
    for proto, bench in benches.items():
        for name, cfg in CONFIGS.items():
            fn, how = bench.replayable(lambda b=bench, c=cfg: b.forward(c))
            assert how == "graph", how
            calls[(proto, name)] = lambda b=bench, f=fn: statistics.median(b.sample(f, COLD_REPS)) * 1e3
    for proto, p in problems.items():
        for name, cfg in CONFIGS.items():
            calls[(proto, name)] = lambda p=p, c=cfg: graph_times(p.ours(c), COLD_REPS, eager=False)["p50"]
    keys = list(calls)
    times: dict = {k: [] for k in keys}
    for r in range(args.rounds):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            times[key].append(calls[key]())
    rows = []
    for proto in [*benches, *problems]:
        for name, cfg in CONFIGS.items():
            ts, ref = times[(proto, name)], times[(proto, "static")]
            row = {"protocol": proto, "config": name, "label": cfg.label(),
                   "us": round(statistics.median(ts), 3),
                   "vs_static": round(statistics.median(a / b for a, b in zip(ts, ref)), 4),
                   "rounds_faster_than_static": sum(a < b for a, b in zip(ts, ref))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nK=V={K}, B={N}, H=16, T=1: µs (median of {args.rounds} rounds), paired ratio to static [rounds faster]")
    for row in rows:
        print(f"  {row['protocol']:<15} {row['config']:<12} {row['us']:8.2f}  {row['vs_static']:.4f} "
              f"[{row['rounds_faster_than_static']}/{args.rounds}]")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "exp_decode_protocol.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
