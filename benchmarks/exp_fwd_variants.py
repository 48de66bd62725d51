"""Forward variants at the shapes of issue 14 where we lose to the baseline, one run, one card (GPU only, not a test).

    python benchmarks/exp_fwd_variants.py [--shapes SHAPE ...] [--rounds 3]     # writes $OUT/fwd_variants.json

Per shape: the dispatched config (profiles.dispatch, the shipped table as served today), variants of it, and the
baseline ``fla.ops.gdn2.chunk_gdn2``, all on the same inputs. Every config is compiled first in parallel
subprocesses (bench_fwd.precompile's helper, one pool for all shapes); each variant's output and final state are
then compared with the dispatched config's on the GPU (relative Frobenius error: a fast but wrong variant shows),
and every entry is timed in alternating rounds (median of triton.testing.do_bench per round, L2 flushed, warm-up
excluded), so that clock drift hits all alike. The median over rounds is the figure. One JSON line per
measurement as it goes, and a summary line per shape with each entry's ratio to the baseline (fla ms / ours ms).

Variants:
- ``seg<n>[-bv<b>]``: the state pass's sequence split (StateConfig.segment_chunks = n chunks per segment), for
  few-head long sequences, where the plain pass has N·H·V/BV programs for 132 SMs;
- ``bv<b>-w<w>-s<s>``: state tiles the table did not take at K = 256 (its tuner ran 9 trials there);
- ``bk<b>``: intra K slices that pad K = 96 / 100 / 192 less than the table's BK=64.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_fwd import _compile_one, baseline, environment, ours

from gdn2_tune.kernels.config import FwdConfig, Shape, infeasibility
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.reference import rel_err
from gdn2_tune.profiles.dispatch import select_config
from gdn2_tune.tuner.suite import parse_shape

SHAPES = (
    "16x2048x8x256x256",  # K = V = 256: 0.99x on 2026-11-30
    "1x65536x4x128x128", "1x32768x8x128x128", "1x65536x8x64x64",  # few heads, long sequences: ~0.9x
    "1x32768x16x128x128",  # the suite's long sequence (64 state programs)
    "8x4096x16x96x96", "8x4096x16x100x60", "4x4096x16x192x160",  # K, V not powers of two
)


def _state(cfg: FwdConfig, **fields) -> FwdConfig:
    return dataclasses.replace(cfg, state=dataclasses.replace(cfg.state, **fields))


def variants(shape: Shape, base: FwdConfig) -> dict[str, FwdConfig]:
    """Named configs to time against ``base`` at ``shape`` (only those the constraints admit)."""
    out: dict[str, FwdConfig] = {"dispatched": base}
    bv = base.state.BV
    if shape.B * shape.H <= 16:  # few (sequence, head) pairs: the sequence split
        for seg in (64, 128, 256):
            out[f"seg{seg}"] = _state(base, segment_chunks=seg)
        for b in (16, 32, 64):
            if b != bv:
                out[f"seg128-bv{b}"] = _state(base, segment_chunks=128, BV=b)
        out["seg128-split"] = _state(base, segment_chunks=128, output="split")
    if shape.K == 256:
        for b, w, s in ((32, 4, 1), (64, 8, 1), (128, 8, 1), (32, 4, 2)):
            out[f"bv{b}-w{w}-s{s}"] = _state(base, BV=b, num_warps=w, num_stages=s)
        out["seg32"] = _state(base, segment_chunks=32)
    if shape.K % 64:
        for bk in (16, 32):
            if bk != base.intra.BK:
                out[f"bk{bk}"] = dataclasses.replace(base, intra=dataclasses.replace(base.intra, BK=bk))
    return {name: cfg for name, cfg in out.items() if infeasibility(cfg, shape) is None}


def precompile_all(jobs: list[tuple[Shape, FwdConfig]], workers: int) -> dict[tuple[str, str], str]:
    """Compile every (shape, config) in one pool of spawned processes (the Triton cache is shared on disk)."""
    ctx = mp.get_context("spawn")
    args = [(cfg.to_dict(), dataclasses.asdict(shape)) for shape, cfg in jobs]
    failed = {}
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for (shape, cfg), err in zip(jobs, pool.map(_compile_one, args)):
            if err:
                failed[(shape.label(), cfg.label())] = err
    return failed


def emit(row: dict, sink: list[dict]) -> None:
    print(json.dumps(row), flush=True)
    sink.append(row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), metavar="SHAPE")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rep", type=int, default=40, help="do_bench's rep (ms) per entry and round")
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--no-baseline", action="store_true",
                        help="leave fla out (its first call at a new shape autotunes for a minute or more)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shapes = [parse_shape(s) for s in args.shapes]
    plan = {shape: variants(shape, select_config(shape)) for shape in shapes}
    rows: list[dict] = []
    emit({"env": environment(), "plan": {s.label(): {n: c.label() for n, c in v.items()} for s, v in plan.items()}},
         rows)

    t0 = time.time()
    jobs = [(shape, cfg) for shape, named in plan.items() for cfg in dict.fromkeys(named.values())]
    failed = precompile_all(jobs, args.workers)
    emit({"precompiled": len(jobs), "failed": len(failed), "seconds": round(time.time() - t0, 1)}, rows)

    with torch.no_grad():
        for shape, named in plan.items():
            inp = make_inputs(shape, "cuda", seed=0)
            fns, refs = {}, None
            for name, cfg in named.items():
                row = {"shape": shape.label(), "variant": name, "config": cfg.label()}
                err = failed.get((shape.label(), cfg.label()))
                if err is None:
                    try:
                        fn = ours(inp, cfg, shape)
                        o, s = fn()
                        if refs is None:
                            refs = (o.double(), s.double())  # the dispatched config's, the first entry
                        row.update(vs_dispatched_o=rel_err(o, refs[0]), vs_dispatched_state=rel_err(s, refs[1]))
                        fns[name] = fn
                    except Exception as exc:  # noqa: BLE001 - a variant that fails is a recorded outcome
                        err = repr(exc)[:300]
                if err is not None:
                    row["error"] = err
                emit(row, rows)
            try:
                if args.no_baseline:
                    raise RuntimeError("left out (--no-baseline)")
                fla = baseline(inp)
                fla()
                fns["fla"] = fla
            except Exception as exc:  # noqa: BLE001 - the baseline is optional; record why it is missing
                emit({"shape": shape.label(), "variant": "fla", "error": repr(exc)[:300]}, rows)
            times: dict[str, list[float]] = {name: [] for name in fns}
            for rnd in range(args.rounds):
                for name, fn in fns.items():
                    ms = triton.testing.do_bench(fn, warmup=10, rep=args.rep, return_mode="median")
                    times[name].append(ms)
                    emit({"shape": shape.label(), "variant": name, "round": rnd, "ms": ms}, rows)
            med = {name: statistics.median(v) for name, v in times.items()}
            summary = {"shape": shape.label(), "median_ms": med}
            if "fla" in med:
                summary["fla_over_ours"] = {n: med["fla"] / m for n, m in med.items() if n != "fla"}
            ours_only = {n: m for n, m in med.items() if n != "fla"}
            summary["best"] = min(ours_only, key=ours_only.get) if ours_only else None
            emit(summary, rows)
            (args.out / "fwd_variants.json").write_text(json.dumps(rows, indent=1))
            del inp, fns
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
