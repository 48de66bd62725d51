"""Backward variants side by side at one or more shapes, one run, one card (GPU only, not a test).

    python benchmarks/exp_bwd_variants.py [SHAPE ...] [--variants NAME=JSON ...] [--value-side] [--accuracy]

Each variant is a BwdConfig override (JSON of its fields) on top of the built-in default; every variant's
gradients are compared with the first variant's (relative Frobenius error, so a variant that is fast but wrong
shows), then forward + backward is timed (median of triton.testing.do_bench, warm-up excluded, variants
alternated over 3 rounds so that clock drift hits all). With ``--accuracy``, each variant's gradients are also
compared with float64 autograd through the token recurrence at bench_bwd's accuracy shape (B=2, T=2048, H=4,
K=V=128, the first timed shape's dtype, strong decay; once, after the first shape). With ``--value-side``, the
value side's launch (kernels/bwd_local.py local_v_side) is also timed alone, on random chunk-major inputs at the shape with the
forward's chunk, each variant's tiling as fitted at that shape (its label says which ran). Prints one JSON line per
variant and shape, each with the median over the rounds; with $OUT set, also appends them to
$OUT/exp_bwd_variants.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn2_tune.kernels.bwd_local import local_v_side
from gdn2_tune.kernels.chunk_bwd import chunk_gdn2_autograd, default_bwd_config, fit_bwd
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.reference import rel_err
from gdn2_tune.kernels.reference_grad import reference_grads
from gdn2_tune.profiles.dispatch import select_config
from gdn2_tune.tuner.suite import parse_shape

DEFAULT_VARIANTS = ['fused={}', 'torch={"value_side": "torch"}']


def emit(row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "exp_bwd_variants.jsonl"), "a") as f:
            f.write(line + "\n")


def time_value_side(shape: Shape, chunk: int, variants: dict, rounds: int = 3) -> None:
    """The value side's launch alone at ``shape`` (random fp32 chunk-major factors and states, 16-bit or fp32
    token tensors), every variant's fitted tiling, alternated over ``rounds``."""
    B, T, H, K, V = shape.B, shape.T, shape.H, shape.K, shape.V
    N, C = B * (-(-T // chunk)), chunk
    dt = shape.torch_dtype
    gen = torch.Generator(device="cuda").manual_seed(5)

    def rnd(*size, dtype=torch.float32, s=0.1):
        return (torch.randn(size, generator=gen, device="cuda") * s).to(dtype)

    a, e, kt, G = rnd(N, H, C, C), rnd(N, H, C, K), rnd(N, H, C, K), -rnd(N, H, C, K).abs()
    hc, dhc = rnd(N, H, K, V), rnd(N, H, K, V)
    aqk, v, w, do = rnd(B, T, H, C, dtype=dt), rnd(B, T, H, V, dtype=dt), rnd(B, T, H, V, dtype=dt), rnd(
        B, T, H, V, dtype=dt)
    rows = torch.arange(B * T, device="cuda").view(B, T)
    rows = torch.nn.functional.pad(rows, (0, N // B * C - T), value=-1).view(N, C)  # -1: a padding row
    fitted = {name: fit_bwd(cfg, shape, chunk, 4) for name, cfg in variants.items()}

    states = {"fp32": (hc, dhc)}
    if any(getattr(cfg, "state_dtype", "fp32") == "bf16" for cfg in fitted.values()):
        states["bf16"] = (hc.bfloat16(), dhc.bfloat16())

    def launch(cfg):
        s0, ds = states[getattr(cfg, "state_dtype", "fp32")]
        return local_v_side(a, aqk, e, kt, G, s0, ds, v, w, do, rows, tile=cfg.value_tile, BV=cfg.value_BV,
                            BK=cfg.value_BK, num_warps=cfg.value_warps, precision=cfg.precision)

    first, rows_out = None, {}
    for name, cfg in fitted.items():
        row = rows_out[name] = {"variant": name, "stage": "value_side", "shape": shape.label(), "chunk": chunk,
                                "config": cfg.label(), "ms": []}
        if cfg.value_side != "triton":
            row["error"] = "fitted to the torch value side"
            continue
        try:
            got = launch(cfg)
            first = got if first is None else first
            row["vs_first"] = [float((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30))
                               for x, y in zip(got, first)]
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a recorded outcome
            row["error"] = repr(exc)[:300]
    for _ in range(rounds):
        for name, cfg in fitted.items():
            if "error" not in rows_out[name]:
                rows_out[name]["ms"].append(triton.testing.do_bench(lambda cfg=cfg: launch(cfg), warmup=10, rep=60))
    for row in rows_out.values():
        if row["ms"]:
            row["median_ms"] = statistics.median(row["ms"])
        emit(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", type=parse_shape, default=[Shape(8, 4096, 16, 128, 128, "bf16")])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--value-side", action="store_true", help="also time the value side's launch alone")
    args = parser.parse_args()
    for i, shape in enumerate(args.shapes):
        # The accuracy check's shape is fixed (it does not follow the timed one): run it once, after the first.
        run_shape(shape, args, accuracy=args.accuracy and i == 0)


def run_shape(shape: Shape, args: argparse.Namespace, accuracy: bool) -> None:
    inp = make_inputs(shape, "cuda", seed=0)
    fcfg = select_config(shape)
    xs = [x.detach().clone().requires_grad_(True) for x in (*inp.args(), inp.initial_state)]
    gen = torch.Generator(device="cuda").manual_seed(3)
    do = torch.randn(inp.v.shape, generator=gen, device="cuda").to(inp.q.dtype)
    dht = torch.randn(inp.initial_state.shape, generator=gen, device="cuda")
    variants = {}
    for spec in args.variants:
        name, _, fields = spec.partition("=")
        variants[name] = dataclasses.replace(default_bwd_config(shape), **json.loads(fields))

    def step(bcfg):
        o, s = chunk_gdn2_autograd(*xs[:6], scale=shape.K**-0.5, initial_state=xs[6], output_final_state=True,
                                   cu_seqlens=None, use_qk_l2norm_in_kernel=False, config=fcfg,
                                   num_seqs=shape.B, bwd_config=bcfg)
        return torch.autograd.grad((o, s), xs, (do, dht))

    first = None
    rows = {name: {"variant": name, "config": cfg.label(), "ms": []} for name, cfg in variants.items()}
    for name, cfg in variants.items():
        try:
            g = step(cfg)
            if first is None:
                first = g
            rows[name]["vs_first"] = [float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
                                      for a, b in zip(g, first)]
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a recorded outcome
            rows[name]["error"] = repr(exc)[:300]
    for _ in range(3):
        for name, cfg in variants.items():
            if "error" not in rows[name]:
                rows[name]["ms"].append(triton.testing.do_bench(lambda cfg=cfg: step(cfg), warmup=10, rep=60))
    for row in rows.values():
        row["shape"] = shape.label()
        if row["ms"]:
            row["median_ms"] = statistics.median(row["ms"])
        emit(row)
    if args.value_side:
        time_value_side(shape, fcfg.chunk, variants)
    if accuracy:
        small = Shape(2, 2048, 4, 128, 128, shape.dtype)
        acc = make_inputs(small, "cuda", seed=1, strong_decay=True)
        gen = torch.Generator(device="cuda").manual_seed(2)
        a_do = torch.randn(acc.v.shape, generator=gen, device="cuda").to(acc.q.dtype)
        a_dht = torch.randn(acc.initial_state.shape, generator=gen, device="cuda")
        ref = [x for _, x in reference_grads(*acc.args(), a_do, a_dht, initial_state=acc.initial_state,
                                             device="cuda").items()]
        a_xs = [x.detach().clone().requires_grad_(True) for x in (*acc.args(), acc.initial_state)]
        for name, cfg in variants.items():
            try:
                o, s = chunk_gdn2_autograd(*a_xs[:6], scale=small.K**-0.5, initial_state=a_xs[6],
                                           output_final_state=True, cu_seqlens=None, use_qk_l2norm_in_kernel=False,
                                           config=select_config(small), num_seqs=small.B, bwd_config=cfg)
                got = torch.autograd.grad((o, s), a_xs, (a_do, a_dht))
                acc_row = {"variant": name, "shape": small.label(), "strong_decay": True,
                           "err_vs_fp64": [rel_err(x, r) for x, r in zip(got, ref)]}
            except Exception as exc:  # noqa: BLE001 - a variant that fails is a recorded outcome
                acc_row = {"variant": name, "accuracy_error": repr(exc)[:300]}
            emit(acc_row)


if __name__ == "__main__":
    main()
