"""Issue 11: the backward's two per-sequence passes with the state in one or two row parts (GPU only, not a test).

    python benchmarks/exp_bwd_parts.py [SHAPE ...] [--rounds N] [--no-accuracy]

Variants are BwdConfig overrides on the built-in default at each shape: ``k_parts`` (the [K, BV] tiles of the
entering states and the reverse pass as one padded tile or two row parts, kernels/chunk_bwd.py), the passes' V tile,
warps and stages, and the sequence split (WIDE_VARIANTS, ANCHOR_VARIANTS). Each is fitted as a run fits it (fit_bwd: at K = V = 256 the passes' shared memory leaves one stage), and
its fitted label is printed. Offline sm_90 compiles (benchmarks/compile_bwd_parts.py, triton 3.6) at K = V = 256,
C = 32, fp32 operands, bf16 S0 / dS_C, one stage: stack bytes (entering states / reverse) one part BV 64 w4 (the
default) 1184 / 1328, BV 32 w8 0 / 8, BV 64 w8 0 / 576; two parts BV 32 w4 40 / 16, BV 32 w8 0 / 0, BV 64 w8 0 / 80,
BV 128 w8 680 / 720.

For each shape (default: 16x2048x8x256x256 bf16, then the anchor 8x4096x16x128x128 bf16 with fewer variants):
every variant's gradients against the default's (relative Frobenius error, dq dk dv dg db dw dh0); forward +
backward timed (triton.testing.do_bench, variants alternated over the rounds so that clock drift hits all); then
the two passes alone ("states": the entering states, "reverse": the reverse state pass; kernels/bwd_spec.py's
BwdRun.stage_fns), alternated the same way. One JSON line per measurement as it is taken, then one per variant and
what with the median over the rounds, flushed; with $OUT set also appended to $OUT/exp_bwd_parts.jsonl. Last,
unless --no-accuracy, every K = 256 variant against float64 autograd through the token recurrence at
2x1024x2x256x256 bf16 with g down to -10 per step.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn2_tune.kernels.bwd_spec import BwdRun, bwd_costs
from gdn2_tune.kernels.chunk_bwd import _fit, chunk_gdn2_autograd, default_bwd_config
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.reference import rel_err
from gdn2_tune.kernels.reference_grad import reference_grads
from gdn2_tune.profiles.dispatch import select_config
from gdn2_tune.tuner.suite import parse_shape

WIDE = Shape(16, 2048, 8, 256, 256, "bf16")
ANCHOR = Shape(8, 4096, 16, 128, 128, "bf16")
# name: BwdConfig overrides of the passes on the built-in default (session 10: at K = V = 256 the entering states
# BV 64 w8 in two parts with two stages, the reverse pass BV 128 w8 in two parts with one, each pass fitting its own
# stages; session 9 ran both at one). The sequence split cuts each sequence's 64 chunks into segments walked in
# parallel: 2 or 4 times the programs of the unsplit passes (256 at BV 64 against the H200's 132 SMs).
WIDE_VARIANTS: dict[str, dict] = {
    "default": {},
    "states-s1": {"num_stages": 1},
    "states-BV32-s3": {"BV": 32, "num_stages": 3},
    "rev-BV64": {"reverse_BV": 64},
    "rev-BV64-w4": {"reverse_BV": 64, "reverse_warps": 4},
    "seg32": {"segment_chunks": 32},
    "seg16": {"segment_chunks": 16},
}
ANCHOR_VARIANTS: dict[str, dict] = {
    "default": {},
    "seg64": {"segment_chunks": 64},
    "seg32": {"segment_chunks": 32},
}
GRAD_NAMES = ("dq", "dk", "dv", "dg", "db", "dw", "dh0")
PASSES = ("states", "reverse")


def emit(row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "exp_bwd_parts.jsonl"), "a") as f:
            f.write(line + "\n")


def environment() -> dict:
    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "torch": torch.__version__, "triton": triton.__version__,
            "commit": os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip()}


def run_shape(shape: Shape, variants: dict[str, dict], rounds: int) -> None:
    inp = make_inputs(shape, "cuda", seed=0)
    fcfg = select_config(shape)
    base = default_bwd_config(shape)
    cfgs = {name: dataclasses.replace(base, **over) for name, over in variants.items()}
    xs = [x.detach().clone().requires_grad_(True) for x in (*inp.args(), inp.initial_state)]
    gen = torch.Generator(device="cuda").manual_seed(3)
    do = torch.randn(inp.v.shape, generator=gen, device="cuda").to(inp.q.dtype)
    dht = torch.randn(inp.initial_state.shape, generator=gen, device="cuda")

    def step(bcfg):
        o, s = chunk_gdn2_autograd(*xs[:6], scale=shape.K**-0.5, initial_state=xs[6], output_final_state=True,
                                   cu_seqlens=None, use_qk_l2norm_in_kernel=False, config=fcfg,
                                   num_seqs=shape.B, bwd_config=bcfg)
        return torch.autograd.grad((o, s), xs, (do, dht))

    label = shape.label()
    fitted = {name: _fit(cfg, shape, fcfg.chunk)[0] for name, cfg in cfgs.items()}
    rows: dict[tuple[str, str], dict] = {}
    fns: dict[tuple[str, str], object] = {}
    first = None
    for name, cfg in cfgs.items():
        cost = bwd_costs(shape, fitted[name])
        row = {"what": "fwd+bwd", "variant": name, "shape": label, "config": fitted[name].label(),
               "passes_bytes_min_gb": round((cost["states"].bytes_min + cost["reverse"].bytes_min) / 1e9, 3),
               "passes_bytes_moved_gb": round((cost["states"].bytes_moved + cost["reverse"].bytes_moved) / 1e9, 3)}
        try:
            t0 = time.perf_counter()
            got = step(cfg)
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - t0, 2)
            first = got if first is None else first
            row["vs_default"] = {n: rel_err(x, y) for n, x, y in zip(GRAD_NAMES, got, first)}
            del got
            fns[name, "fwd+bwd"] = lambda cfg=cfg: step(cfg)
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a recorded outcome
            row["error"] = repr(exc)[:400]
        emit(row)
        rows[name, "fwd+bwd"] = {k: row[k] for k in ("what", "variant", "shape", "config")} | {"ms": []}

    bwd_run = BwdRun(shape, "cuda")
    for name, cfg in cfgs.items():
        if (name, "fwd+bwd") not in fns:
            continue
        try:
            stages = bwd_run.stage_fns(cfg)
            for stage in PASSES:
                fns[name, stage] = stages[stage]
                rows[name, stage] = {"what": "stage", "stage": stage, "variant": name, "shape": label,
                                     "config": fitted[name].label(), "ms": []}
        except Exception as exc:  # noqa: BLE001
            emit({"what": "stage", "variant": name, "shape": label, "error": repr(exc)[:400]})
    for r in range(rounds):
        for key, fn in fns.items():
            ms = triton.testing.do_bench(fn, warmup=10, rep=60 if key[1] == "fwd+bwd" else 40)
            rows[key]["ms"].append(ms)
            emit({"what": "measurement", "round": r, "variant": key[0], "stage": key[1], "shape": label,
                  "ms": round(ms, 4)})
    for row in rows.values():
        if row["ms"]:
            row["median_ms"] = round(statistics.median(row["ms"]), 4)
            emit(row)
    del fns, bwd_run
    torch.cuda.empty_cache()


def accuracy(variants: dict[str, dict]) -> None:
    small = Shape(2, 1024, 2, 256, 256, "bf16")
    acc = make_inputs(small, "cuda", seed=1, strong_decay=True)
    gen = torch.Generator(device="cuda").manual_seed(2)
    a_do = torch.randn(acc.v.shape, generator=gen, device="cuda").to(acc.q.dtype)
    a_dht = torch.randn(acc.initial_state.shape, generator=gen, device="cuda")
    ref = [x for _, x in reference_grads(*acc.args(), a_do, a_dht, initial_state=acc.initial_state,
                                         device="cuda").items()]
    base = default_bwd_config(small)
    for name, over in variants.items():
        cfg = dataclasses.replace(base, **over)
        a_xs = [x.detach().clone().requires_grad_(True) for x in (*acc.args(), acc.initial_state)]
        try:
            o, s = chunk_gdn2_autograd(*a_xs[:6], scale=small.K**-0.5, initial_state=a_xs[6], output_final_state=True,
                                       cu_seqlens=None, use_qk_l2norm_in_kernel=False, config=select_config(small),
                                       num_seqs=small.B, bwd_config=cfg)
            got = torch.autograd.grad((o, s), a_xs, (a_do, a_dht))
            emit({"what": "vs_fp64", "variant": name, "shape": small.label(), "strong_decay": True,
                  "err": {n: rel_err(x, r) for n, x, r in zip(GRAD_NAMES, got, ref)}})
        except Exception as exc:  # noqa: BLE001
            emit({"what": "vs_fp64", "variant": name, "error": repr(exc)[:400]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", type=parse_shape, default=[WIDE, ANCHOR])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-accuracy", action="store_true")
    args = parser.parse_args()
    emit({"what": "environment", **environment()})
    for shape in args.shapes:
        run_shape(shape, WIDE_VARIANTS if shape.K > 128 else ANCHOR_VARIANTS, args.rounds)
    if not args.no_accuracy:
        accuracy(WIDE_VARIANTS)


if __name__ == "__main__":
    main()
