"""Backward variants side by side at one shape, one run, one card (GPU only, not a test).

    python benchmarks/exp_bwd_variants.py [SHAPE] [--variants NAME=JSON ...]

Each variant is a BwdConfig override (JSON of its fields) on top of the built-in default; every variant's
gradients are compared with the first variant's (relative Frobenius error, so a variant that is fast but wrong
shows), then forward + backward is timed (median of triton.testing.do_bench, warm-up excluded, variants
alternated over 3 rounds so that clock drift hits all). With ``--accuracy``, each variant's gradients are also
compared with float64 autograd through the token recurrence at bench_bwd's accuracy shape (B=2, T=2048, H=4,
K=V=128, the timed shape's dtype, strong decay). Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn2_tune.kernels.chunk_bwd import chunk_gdn2_autograd, default_bwd_config
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.reference import rel_err
from gdn2_tune.kernels.reference_grad import reference_grads
from gdn2_tune.profiles.dispatch import select_config
from gdn2_tune.tuner.suite import parse_shape

DEFAULT_VARIANTS = ['fused={}', 'torch={"value_side": "torch"}']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs="?", type=parse_shape, default=Shape(8, 4096, 16, 128, 128, "bf16"))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--accuracy", action="store_true")
    args = parser.parse_args()
    shape: Shape = args.shape
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
        print(json.dumps(row), flush=True)
    if args.accuracy:
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
            print(json.dumps(acc_row), flush=True)


if __name__ == "__main__":
    main()
