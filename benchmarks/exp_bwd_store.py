"""Issue 11: which recomputed tensors the backward may store in bf16 and keep dh0 as accurate as the baseline's
(GPU only, not a test).

    python benchmarks/exp_bwd_store.py [--rounds N] [--variants fp32,u,...] [--baseline] [--no-timing]

``BwdConfig.recompute_store`` names the recomputed Y, U, Q_γ, K_tail kept in the input dtype
(kernels/chunk_bwd.py RECOMPUTE_STORE_TENSORS; the others fp32): "fp32" none, "input" all four, "u", "uqg", "uy",
"ukt", "uykt" the subsets. The entering states read Y, U, K_tail, the reverse pass Q_γ, K_tail, Y, and dh0 comes
out of the reverse pass: "u" cannot move dh0; session 8 measured "input" at dh0 1.60e-3 against float64 (fp32:
4.9e-4; the baseline 1.5e-3). Each variant is the built-in bf16 config at the shape with that store.

In this order, one JSON line per measurement, flushed (and appended to $OUT/exp_bwd_store.jsonl with $OUT set):
1. accuracy ("what": "vs_fp64"): every gradient (dq dk dv dg db dw dh0) of every variant against float64 autograd
   through the token recurrence (kernels/reference_grad.py), relative Frobenius error, at 2x2048x4 K = V = 128 bf16
   with g down to -10 per step (the inputs of bench_bwd.py's accuracy rows: seed 1, upstream gradients from a
   cuda generator at seed 2, where the baseline's dh0 measured 1.5e-3); with --baseline also fla's chunk_gdn2
   (first autotune config, as bench_bwd.py --baseline-untuned) on the same inputs, and per variant whether dh0
   stays under it;
2. timing at the anchor 8x4096x16x128x128 bf16: forward + backward (chunk_gdn2_autograd), then the recompute,
   the entering states and the reverse pass alone (kernels/bwd_spec.py BwdRun.stage_fns), triton.testing.do_bench
   with the variants alternated over the rounds; per variant the median over the rounds and the stages' minimum
   bytes from the cost model (kernels/bwd_spec.py);
3. accuracy at 2x2048x4 K = V = 128 with normal decay, then at 2x1024x2 K = V = 256 with strong decay;
4. timing at 16x2048x8x256x256 bf16.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_bwd import fla_op

from gdn2_tune.kernels.bwd_spec import BwdRun, bwd_costs
from gdn2_tune.kernels.chunk_bwd import RECOMPUTE_STORES, _fit, chunk_gdn2_autograd, default_bwd_config
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.reference import rel_err
from gdn2_tune.kernels.reference_grad import reference_grads
from gdn2_tune.profiles.dispatch import select_config

DEVICE = "cuda"
ANCHOR = Shape(8, 4096, 16, 128, 128, "bf16")
WIDE = Shape(16, 2048, 8, 256, 256, "bf16")
ACCURACY = ((Shape(2, 2048, 4, 128, 128, "bf16"), True), (Shape(2, 2048, 4, 128, 128, "bf16"), False),
            (Shape(2, 1024, 2, 256, 256, "bf16"), True))
GRAD_NAMES = ("dq", "dk", "dv", "dg", "db", "dw", "dh0")
STAGES = ("recompute", "states", "reverse")
T0 = time.perf_counter()


def emit(row: dict) -> None:
    row = {**row, "t_s": round(time.perf_counter() - T0, 1)}
    line = json.dumps(row)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "exp_bwd_store.jsonl"), "a") as f:
            f.write(line + "\n")


def environment() -> dict:
    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "torch": torch.__version__, "triton": triton.__version__,
            "commit": os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip()}


def with_store(shape: Shape, store: str):
    return dataclasses.replace(default_bwd_config(shape), recompute_store=store)


def accuracy(shape: Shape, strong: bool, variants: list[str], baseline) -> None:
    inp = make_inputs(shape, DEVICE, seed=1, strong_decay=strong)
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    do = torch.randn(inp.v.shape, generator=gen, device=DEVICE).to(inp.q.dtype)
    dht = torch.randn(inp.initial_state.shape, generator=gen, device=DEVICE)
    t0 = time.perf_counter()
    ref = [x for _, x in reference_grads(*inp.args(), do, dht, initial_state=inp.initial_state,
                                         device=DEVICE).items()]
    emit({"what": "reference", "shape": shape.label(), "strong_decay": strong,
          "s": round(time.perf_counter() - t0, 1)})
    fcfg = select_config(shape)

    def grads(op, **kw) -> tuple[torch.Tensor, ...]:
        xs = [x.detach().clone().requires_grad_(True) for x in (*inp.args(), inp.initial_state)]
        o, s = op(*xs[:6], initial_state=xs[6], output_final_state=True, cu_seqlens=None, **kw)
        return torch.autograd.grad((o, s), xs, (do, dht))

    rows = {}
    if baseline is not None:
        try:
            got = grads(baseline)
            rows["fla"] = {"config": "fla chunk_gdn2 (first autotune config)"}
            rows["fla"]["err"] = {n: rel_err(x, r) for n, x, r in zip(GRAD_NAMES, got, ref)}
        except Exception as exc:  # noqa: BLE001 - the baseline is optional: record why it is missing
            rows["fla"] = {"error": repr(exc)[:400]}
    for name in variants:
        cfg = with_store(shape, name)
        try:
            got = grads(chunk_gdn2_autograd, scale=shape.K**-0.5, use_qk_l2norm_in_kernel=False, config=fcfg,
                        num_seqs=shape.B, bwd_config=cfg)
            rows[name] = {"config": _fit(cfg, shape, fcfg.chunk)[0].label(),
                          "err": {n: rel_err(x, r) for n, x, r in zip(GRAD_NAMES, got, ref)}}
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a recorded outcome
            rows[name] = {"error": repr(exc)[:400]}
    bar = rows.get("fla", {}).get("err", {}).get("dh0")
    for name, row in rows.items():
        out = {"what": "vs_fp64", "variant": name, "shape": shape.label(), "strong_decay": strong, **row}
        if bar is not None and "err" in row and name != "fla":
            out["dh0_under_baseline"] = row["err"]["dh0"] < bar
        emit(out)
    del ref
    torch.cuda.empty_cache()


def timing(shape: Shape, variants: list[str], rounds: int) -> None:
    inp = make_inputs(shape, DEVICE, seed=0)
    fcfg = select_config(shape)
    xs = [x.detach().clone().requires_grad_(True) for x in (*inp.args(), inp.initial_state)]
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    do = torch.randn(inp.v.shape, generator=gen, device=DEVICE).to(inp.q.dtype)
    dht = torch.randn(inp.initial_state.shape, generator=gen, device=DEVICE)

    def step(bcfg):
        o, s = chunk_gdn2_autograd(*xs[:6], scale=shape.K**-0.5, initial_state=xs[6], output_final_state=True,
                                   cu_seqlens=None, use_qk_l2norm_in_kernel=False, config=fcfg,
                                   num_seqs=shape.B, bwd_config=bcfg)
        return torch.autograd.grad((o, s), xs, (do, dht))

    label = shape.label()
    bwd_run = BwdRun(shape, DEVICE)
    fns: dict[tuple[str, str], object] = {}
    rows: dict[tuple[str, str], dict] = {}
    for name in variants:
        cfg = with_store(shape, name)
        fitted = _fit(cfg, shape, fcfg.chunk)[0]
        cost = bwd_costs(shape, fitted)
        head = {"variant": name, "shape": label, "config": fitted.label()}
        try:
            t0 = time.perf_counter()
            step(cfg)
            stages = bwd_run.stage_fns(cfg)
            torch.cuda.synchronize()
            emit({"what": "compiled", **head, "first_call_s": round(time.perf_counter() - t0, 2),
                  "bytes_min_gb": {s: round(cost[s].bytes_min / 1e9, 3) for s in (*STAGES, "total")}})
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a recorded outcome
            emit({"what": "compiled", **head, "error": repr(exc)[:400]})
            continue
        fns[name, "fwd+bwd"] = lambda cfg=cfg: step(cfg)
        for stage in STAGES:
            fns[name, stage] = stages[stage]
        for key in [(name, "fwd+bwd"), *((name, s) for s in STAGES)]:
            rows[key] = {"what": "median", **head, "stage": key[1], "ms": []}
    for r in range(rounds):
        for key, fn in fns.items():
            ms = triton.testing.do_bench(fn, warmup=10, rep=60 if key[1] == "fwd+bwd" else 30)
            rows[key]["ms"].append(ms)
            emit({"what": "measurement", "round": r, "variant": key[0], "stage": key[1], "shape": label,
                  "ms": round(ms, 4)})
    for row in rows.values():
        if row["ms"]:
            row["median_ms"] = round(statistics.median(row["ms"]), 4)
            emit(row)
    del fns, bwd_run
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(RECOMPUTE_STORES),
                        help=f"comma-separated recompute_store values (default: all of {list(RECOMPUTE_STORES)})")
    parser.add_argument("--baseline", action="store_true",
                        help="fla's errors on the accuracy inputs too (its first calls compile for a while)")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(RECOMPUTE_STORES))
    if unknown:
        parser.error(f"--variants: {unknown} not among {list(RECOMPUTE_STORES)}")
    baseline = fla_op(untuned=True) if args.baseline else None
    emit({"what": "environment", **environment(), "baseline": baseline is not None})
    accuracy(*ACCURACY[0], variants, baseline)
    if not args.no_timing:
        timing(ANCHOR, variants, args.rounds)
    for shape, strong in ACCURACY[1:]:
        accuracy(shape, strong, variants, baseline)
    if not args.no_timing:
        timing(WIDE, variants, args.rounds)


if __name__ == "__main__":
    main()
