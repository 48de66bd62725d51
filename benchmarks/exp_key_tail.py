"""Issue 11: the backward's key side and recompute storage, variant against default, one run, one card (GPU only).

    python benchmarks/exp_key_tail.py [SHAPE ...] [--rounds N]

Variants (each a BwdConfig override on the built-in default at the shape, and the fused key tail's register cap,
kernels/chunk_bwd.py's KEY_TAIL_MAX_REGISTERS):

- ``default``: the built-in backward;
- ``fused``: ``key_side="fused"`` (one launch for the pair backward and the key-side tail, factors re-formed from
  the token layout; the key factors store 3 fp32 tiles per chunk instead of 8), at the shipped cap of 168
  registers; ``fused-r128`` and ``fused-r0`` at a cap of 128 and at ptxas's choice (255 at the anchor);
- ``rs-input``: ``recompute_store="input"`` (the recomputed Y, U, Q_γ, K_tail in bf16 for the passes);
- ``fused+rs-input``: both.

For each shape (default: the anchor 8x4096x16x128x128 and 32x1024x16x128x128, bf16): every variant's gradients
against the default's (relative Frobenius error, dq dk dv dg db dw dh0), forward + backward timed (median of
triton.testing.do_bench per round, variants alternated over the rounds so that clock drift hits all), the peak
memory of one forward + backward, then each stage alone (kernels/bwd_spec.py's BwdRun.stage_fns: recompute, states,
reverse, local) alternated the same way. Then every variant against float64 autograd through the token recurrence
at 2x2048x4x128x128 bf16 with g down to -10 per step. One JSON line per measurement, flushed; with $OUT set also
appended to $OUT/exp_key_tail.jsonl.
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

from gdn2_tune.kernels import chunk_bwd
from gdn2_tune.kernels.bwd_spec import BwdRun
from gdn2_tune.kernels.chunk_bwd import chunk_gdn2_autograd, default_bwd_config
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.reference import rel_err
from gdn2_tune.kernels.reference_grad import reference_grads
from gdn2_tune.profiles.dispatch import select_config
from gdn2_tune.tuner.suite import parse_shape

SHIPPED_CAP = chunk_bwd.KEY_TAIL_MAX_REGISTERS
# name: (BwdConfig overrides, the fused key tail's register cap)
VARIANTS: dict[str, tuple[dict, int]] = {
    "default": ({}, SHIPPED_CAP),
    "fused": ({"key_side": "fused"}, SHIPPED_CAP),
    "fused-r128": ({"key_side": "fused"}, 128),
    "fused-r0": ({"key_side": "fused"}, 0),
    "rs-input": ({"recompute_store": "input"}, SHIPPED_CAP),
    "fused+rs-input": ({"key_side": "fused", "recompute_store": "input"}, SHIPPED_CAP),
}
GRAD_NAMES = ("dq", "dk", "dv", "dg", "db", "dw", "dh0")


def emit(row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "exp_key_tail.jsonl"), "a") as f:
            f.write(line + "\n")


def with_cap(cap: int, fn):
    """``fn`` run with the fused key tail's register cap at ``cap`` (the launcher reads it at each launch)."""

    def run():
        chunk_bwd.KEY_TAIL_MAX_REGISTERS = cap
        try:
            return fn()
        finally:
            chunk_bwd.KEY_TAIL_MAX_REGISTERS = SHIPPED_CAP

    return run


def environment() -> dict:
    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "torch": torch.__version__, "triton": triton.__version__,
            "commit": os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip()}


def run_shape(shape: Shape, rounds: int) -> None:
    inp = make_inputs(shape, "cuda", seed=0)
    fcfg = select_config(shape)
    base = default_bwd_config(shape)
    cfgs = {name: (dataclasses.replace(base, **over), cap) for name, (over, cap) in VARIANTS.items()}
    xs = [x.detach().clone().requires_grad_(True) for x in (*inp.args(), inp.initial_state)]
    gen = torch.Generator(device="cuda").manual_seed(3)
    do = torch.randn(inp.v.shape, generator=gen, device="cuda").to(inp.q.dtype)
    dht = torch.randn(inp.initial_state.shape, generator=gen, device="cuda")

    def step(bcfg):
        o, s = chunk_gdn2_autograd(*xs[:6], scale=shape.K**-0.5, initial_state=xs[6], output_final_state=True,
                                   cu_seqlens=None, use_qk_l2norm_in_kernel=False, config=fcfg,
                                   num_seqs=shape.B, bwd_config=bcfg)
        return torch.autograd.grad((o, s), xs, (do, dht))

    fns, rows, first = {}, {}, None
    for name, (cfg, cap) in cfgs.items():
        row = rows[name] = {"what": "fwd+bwd", "variant": name, "shape": shape.label(), "config": cfg.label(),
                            "key_tail_maxnreg": cap, "ms": []}
        fn = fns[name] = with_cap(cap, lambda cfg=cfg: step(cfg))
        try:
            t0 = time.perf_counter()
            got = fn()
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - t0, 2)
            first = got if first is None else first
            row["vs_default"] = {n: rel_err(x, y) for n, x, y in zip(GRAD_NAMES, got, first)}
            del got
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a recorded outcome
            row["error"] = repr(exc)[:400]
    for _ in range(rounds):
        for name, fn in fns.items():
            if "error" not in rows[name]:
                rows[name]["ms"].append(triton.testing.do_bench(fn, warmup=10, rep=80))
    for row in rows.values():
        if row["ms"]:
            row["median_ms"] = statistics.median(row["ms"])
        emit(row)

    # Each stage alone, on the outputs of the stages before it.
    bwd_run = BwdRun(shape, "cuda")
    stage_rows, stage_fns = {}, {}
    for name, (cfg, cap) in cfgs.items():
        if "error" in rows[name]:
            continue
        try:
            for stage, fn in with_cap(cap, lambda cfg=cfg: bwd_run.stage_fns(cfg))().items():
                stage_fns[name, stage] = with_cap(cap, fn)
                stage_rows[name, stage] = {"what": "stage", "stage": stage, "variant": name, "shape": shape.label(),
                                           "ms": []}
        except Exception as exc:  # noqa: BLE001
            emit({"what": "stage", "variant": name, "shape": shape.label(), "error": repr(exc)[:400]})
    for _ in range(rounds):
        for key, fn in stage_fns.items():
            stage_rows[key]["ms"].append(triton.testing.do_bench(fn, warmup=5, rep=40))
    for row in stage_rows.values():
        row["median_ms"] = statistics.median(row["ms"])
        emit(row)


def accuracy(dtype: str) -> None:
    small = Shape(2, 2048, 4, 128, 128, dtype)
    acc = make_inputs(small, "cuda", seed=1, strong_decay=True)
    gen = torch.Generator(device="cuda").manual_seed(2)
    a_do = torch.randn(acc.v.shape, generator=gen, device="cuda").to(acc.q.dtype)
    a_dht = torch.randn(acc.initial_state.shape, generator=gen, device="cuda")
    ref = [x for _, x in reference_grads(*acc.args(), a_do, a_dht, initial_state=acc.initial_state,
                                         device="cuda").items()]
    base = default_bwd_config(small)
    for name, (over, cap) in VARIANTS.items():
        cfg = dataclasses.replace(base, **over)
        a_xs = [x.detach().clone().requires_grad_(True) for x in (*acc.args(), acc.initial_state)]

        def grads(cfg=cfg, a_xs=a_xs):
            o, s = chunk_gdn2_autograd(*a_xs[:6], scale=small.K**-0.5, initial_state=a_xs[6], output_final_state=True,
                                       cu_seqlens=None, use_qk_l2norm_in_kernel=False, config=select_config(small),
                                       num_seqs=small.B, bwd_config=cfg)
            return torch.autograd.grad((o, s), a_xs, (a_do, a_dht))

        try:
            got = with_cap(cap, grads)()
            emit({"what": "vs_fp64", "variant": name, "shape": small.label(), "strong_decay": True,
                  "err": {n: rel_err(x, r) for n, x, r in zip(GRAD_NAMES, got, ref)}})
        except Exception as exc:  # noqa: BLE001
            emit({"what": "vs_fp64", "variant": name, "error": repr(exc)[:400]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", type=parse_shape,
                        default=[Shape(8, 4096, 16, 128, 128, "bf16"), Shape(32, 1024, 16, 128, 128, "bf16")])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    emit({"what": "environment", **environment()})
    for shape in args.shapes:
        run_shape(shape, args.rounds)
        torch.cuda.empty_cache()
    accuracy(args.shapes[0].dtype)


if __name__ == "__main__":
    main()
