"""Issue 14's forward candidates, ours only, in one process (GPU only, not a test).

    python benchmarks/exp_fwd_issue14.py [--rounds 3] [--rep 40] [--only k256,fp32,awkward] [--list]

Writes one JSON line per measurement to stdout and to $OUT/fwd_issue14.jsonl as it goes. Three groups:

- ``k256``: 16 × 2048 × 8, K = V = 256, bf16. The H200 table's config (profiles/h200.json at def7e6f: intra BK 64,
  BV 128 on 2 warps; state BV 64 on 4 warps, one stage), the previous best (state BV 128 on 8 warps, 2.051 ms), and
  the state tile in two row parts of 128 (StateConfig.k_parts = 2). Offline sm_90 compiles (triton 3.6,
  benchmarks/compile_cost.py's reader): every one-part state config at K = 256 spills (BV 64 on 4 warps: 568 bytes
  of stack, BV 128 on 8 warps: 528), and BV 64 on 8 warps in two parts is the one without spills (248 registers).
- ``fp32``: 8 × 4096 × 16, K = V = 128, fp32: the precision pairs on the built-in default's tiles and on the fp32
  study's (intra BV 128 on 2 warps, one state stage; plain TF32 ran 2.50 ms there against 3.51 on the default's
  tiles), each with its error against float64 at the accuracy shape (B=2, T=2048, H=4, K=V=128, random h0; g normal
  and strong, kernels/inputs.make_inputs), as benchmarks/exp_fp32.py measures it.
- ``awkward``: K, V not powers of two (8 × 4096 × 16 at K = V = 96 and K = 100, V = 60; 4 × 4096 × 16 at K = 192,
  V = 160): state tiles in two row parts (96 = 64 + 32, 192 = 128 + 64 rows instead of 128 and 256) and V tiles
  that divide V (32 at V = 96 and 160) in both stages.

Every config is compiled first in parallel subprocesses (exp_fwd_variants.precompile_all), then per shape each
entry's output is compared with the group's first entry (bf16) or float64 (fp32), and the entries are timed in
alternating rounds (median of triton.testing.do_bench per round, L2 flushed); the median over rounds is the figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn2_tune.kernels.config import (
    FwdConfig,
    IntraConfig,
    Shape,
    StateConfig,
    default_config,
    fit_to_shape,
    infeasibility,
)

K256 = Shape(16, 2048, 8, 256, 256, "bf16")
ANCHOR = Shape(8, 4096, 16, 128, 128, "bf16")
FP32 = Shape(8, 4096, 16, 128, 128, "fp32")
ACCURACY = Shape(2, 2048, 4, 128, 128, "fp32")
AWKWARD = (
    Shape(8, 4096, 16, 96, 96, "bf16"), Shape(8, 4096, 16, 100, 60, "bf16"), Shape(4, 4096, 16, 192, 160, "bf16"),
)

# profiles/h200.json at def7e6f: the K = V = 256 entry, and the anchor's (every K = V = 128 shape's) intra tiles.
TABLE_INTRA = IntraConfig(BC=16, BK=64, BV=128, num_warps=2, num_stages=1, precision="tf32")
TABLE_K256 = FwdConfig(32, TABLE_INTRA, StateConfig(BV=64, num_warps=4, num_stages=1))
TABLE_ANCHOR = FwdConfig(32, TABLE_INTRA, StateConfig(BV=64, num_warps=4, num_stages=3))


def _with(cfg: FwdConfig, chunk: int | None = None, intra: dict | None = None, **state) -> FwdConfig:
    cfg = dataclasses.replace(cfg, state=dataclasses.replace(cfg.state, **state))
    if intra:
        cfg = dataclasses.replace(cfg, intra=dataclasses.replace(cfg.intra, **intra))
    if chunk:
        cfg = dataclasses.replace(cfg, chunk=chunk)
    return cfg


def k256_plan() -> dict[str, FwdConfig]:
    t = TABLE_K256
    return {
        "table": t,
        "bv128-w8-s1 (previous best)": _with(t, BV=128, num_warps=8),
        "bv64-w8-s1-k2 (no spills)": _with(t, num_warps=8, k_parts=2),
        "bv64-w8-s2-k2": _with(t, num_warps=8, num_stages=2, k_parts=2),
        "bv64-w4-s1-k2": _with(t, k_parts=2),
        "bv128-w8-s1-k2": _with(t, BV=128, num_warps=8, k_parts=2),
        "bv32-w4-s1-k2": _with(t, BV=32, k_parts=2),
        "bv32-w8-s1-k2": _with(t, BV=32, num_warps=8, k_parts=2),
        "bv64-w8-s1-k2-split": _with(t, num_warps=8, k_parts=2, output="split"),
        "bv64-w8-s1-k2 intra-bk32": _with(t, num_warps=8, k_parts=2, intra={"BK": 32}),
        "bv64-w8-s1-k2 intra-w4": _with(t, num_warps=8, k_parts=2, intra={"num_warps": 4}),
        "bv64-w8-s1-k2 intra-bk128-w4": _with(t, num_warps=8, k_parts=2, intra={"BK": 128, "num_warps": 4}),
    }


def anchor_plan() -> dict[str, FwdConfig]:
    """The bf16 anchor's state pass spills too (BV 64 on 4 warps, 3 stages: 256 bytes; in two row parts 208)."""
    t = TABLE_ANCHOR
    return {
        "table": t,
        "k2": _with(t, k_parts=2),
        "bv64-w8-s1": _with(t, num_warps=8, num_stages=1),
        "bv64-w8-s1-k2": _with(t, num_warps=8, num_stages=1, k_parts=2),
        "bv32-w4-s3": _with(t, BV=32),
    }


def fp32_plan() -> dict[str, FwdConfig]:
    default = default_config(FP32)
    study = FwdConfig(32, dataclasses.replace(TABLE_INTRA, precision="tf32x3"),
                      StateConfig(BV=64, num_warps=4, num_stages=1, precision="tf32"))
    previous = FwdConfig(32, IntraConfig(precision="tf32x3"), StateConfig(precision="tf32"))  # 4.25 ms, 8.1e-4
    out = {"built-in default (intra BV 128 w4, state s1)": default, "previous default": previous}
    for name, ip, sp in (("tf32x3/tf32", "tf32x3", "tf32"), ("tf32/tf32", "tf32", "tf32"),
                         ("tf32rn/tf32rn", "tf32rn", "tf32rn"), ("tf32rn/tf32", "tf32rn", "tf32"),
                         ("tf32x3/tf32rn", "tf32x3", "tf32rn")):
        out[f"study tiles {name}"] = _with(study, precision=sp, intra={"precision": ip})
    out["study tiles tf32x3/tf32 state s3"] = _with(study, num_stages=3)
    out["study tiles tf32x3/tf32 intra w4"] = _with(study, intra={"num_warps": 4})
    out["study tiles tf32x3/tf32 state bv32"] = _with(study, BV=32)
    out["default state bv64-w8 (no spills)"] = _with(default, num_warps=8)
    out["default tf32rn/tf32rn"] = _with(default, precision="tf32rn", intra={"precision": "tf32rn"})
    return out


def awkward_plan(shape: Shape) -> dict[str, FwdConfig]:
    default = default_config(shape)
    table = fit_to_shape(TABLE_ANCHOR, shape)
    # The table's tiles with the default's K slices (32 at K = 96: 1.708 ms against 1.878 on 2026-11-30) and its
    # state tile (8 warps, V tiles of 128 at K = 192).
    base = fit_to_shape(dataclasses.replace(table, intra=dataclasses.replace(table.intra, BK=default.intra.BK),
                                            state=default.state), shape)
    out = {"built-in default": default, "table": table, "base": base, "base k2": _with(base, k_parts=2)}
    for bv, w, s in ((32, 4, 3), (32, 4, 1), (64, 4, 3), (64, 8, 1)):
        if (bv, w, s) != (base.state.BV, base.state.num_warps, base.state.num_stages) and bv < 2 * shape.V:
            out[f"base k2 state-bv{bv}-w{w}-s{s}"] = _with(base, k_parts=2, BV=bv, num_warps=w, num_stages=s)
    if shape.V % 64:  # V = 96, 160 (tiles of 32 divide them, 64 and 128 pad them) and 60
        out["base k2 state-bv32-w4-s3 intra-bv32"] = _with(base, k_parts=2, BV=32, num_warps=4, num_stages=3,
                                                            intra={"BV": 32})
        out["base state-bv32-w4-s3"] = _with(base, BV=32, num_warps=4, num_stages=3)
    return out


def plan(groups: set[str]) -> dict[Shape, dict[str, FwdConfig]]:
    out: dict[Shape, dict[str, FwdConfig]] = {}
    if "k256" in groups:
        out[K256] = k256_plan()
    if "fp32" in groups:
        out[FP32] = fp32_plan()
    if "anchor" in groups:
        out[ANCHOR] = anchor_plan()
    if "awkward" in groups:
        for shape in AWKWARD:
            out[shape] = awkward_plan(shape)
    for shape, named in out.items():
        seen: set[FwdConfig] = set()
        for name, cfg in list(named.items()):
            if cfg in seen:  # the same config under a second name (e.g. "base" = "table" at K = 100)
                del named[name]
                continue
            seen.add(cfg)
            reason = infeasibility(cfg, shape)
            assert reason is None, f"{shape.label()} {name}: {reason}"
            if shape.dtype == "fp32":
                assert infeasibility(cfg, ACCURACY) is None, f"{name} at the accuracy shape"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rep", type=int, default=40, help="do_bench's rep (ms) per entry and round")
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--only", default="k256,fp32,awkward,anchor")
    parser.add_argument("--list", action="store_true", help="print the plan and exit (no GPU)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()
    todo = plan(set(args.only.split(",")))
    if args.list:
        for shape, named in todo.items():
            for name, cfg in named.items():
                print(f"{shape.label():28s} {name:38s} {cfg.label()}")
        return 0

    from bench_fwd import environment, ours
    from exp_fwd_variants import precompile_all

    from gdn2_tune.kernels.buffers import poisoned
    from gdn2_tune.kernels.inputs import make_inputs
    from gdn2_tune.kernels.reference import gdn2_reference, rel_err

    args.out.mkdir(parents=True, exist_ok=True)
    sink = (args.out / "fwd_issue14.jsonl").open("w")

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        sink.write(line + "\n")
        sink.flush()

    emit({"env": environment(), "plan": {s.label(): {n: c.label() for n, c in v.items()} for s, v in todo.items()}})
    t0 = time.time()
    jobs = [(shape, cfg) for shape, named in todo.items() for cfg in dict.fromkeys(named.values())]
    if FP32 in todo:
        jobs += [(ACCURACY, cfg) for cfg in dict.fromkeys(todo[FP32].values())]
    failed = precompile_all(jobs, args.workers)
    emit({"precompiled": len(jobs), "failed": len(failed), "seconds": round(time.time() - t0, 1)})

    cases = {}
    if FP32 in todo:
        for strong in (False, True):
            inp = make_inputs(ACCURACY, "cuda", seed=3, strong_decay=strong)
            cases["strong" if strong else "normal"] = (inp, gdn2_reference(*inp.args(), initial_state=inp.initial_state,
                                                                            device="cuda"))
        emit({"accuracy_reference_s": round(time.time() - t0, 1)})

    with torch.no_grad():
        for shape, named in todo.items():
            inp = make_inputs(shape, "cuda", seed=0)
            fns, first = {}, None
            for name, cfg in named.items():
                row = {"shape": shape.label(), "variant": name, "config": cfg.label()}
                err = failed.get((shape.label(), cfg.label()))
                if err is None:
                    try:
                        fn = ours(inp, cfg, shape)
                        o, s = fn()
                        if first is None:
                            first = (o.double(), s.double())
                        row.update(vs_first_o=rel_err(o, first[0]), vs_first_state=rel_err(s, first[1]))
                        for tag, (ainp, (ref_o, ref_s)) in cases.items() if shape == FP32 else ():
                            with poisoned():
                                ao, as_ = ours(ainp, cfg, ACCURACY)()
                            row[f"err_o_{tag}"], row[f"err_s_{tag}"] = rel_err(ao, ref_o), rel_err(as_, ref_s)
                        fns[name] = fn
                    except Exception as exc:  # noqa: BLE001 - a variant that fails is a recorded outcome
                        err = repr(exc)[:300]
                if err is not None:
                    row["error"] = err
                emit(row)
            times: dict[str, list[float]] = {name: [] for name in fns}
            for rnd in range(args.rounds):
                for name, fn in fns.items():
                    ms = triton.testing.do_bench(fn, warmup=10, rep=args.rep, return_mode="median")
                    times[name].append(ms)
                    emit({"shape": shape.label(), "variant": name, "round": rnd, "ms": ms})
            med = {name: statistics.median(v) for name, v in times.items()}
            emit({"shape": shape.label(), "median_ms": med, "best": min(med, key=med.get) if med else None})
            del inp, fns, first
            torch.cuda.empty_cache()
    emit({"total_s": round(time.time() - t0, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
