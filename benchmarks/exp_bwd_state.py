"""The backward's two per-sequence passes: sequence split and bf16 state storage, one run, one card (GPU only).

    python benchmarks/exp_bwd_state.py [--rounds 3] [--no-accuracy]

At each of issue 11's shapes (8x4096x16 and 1x32768x16 at K=V=128, 16x2048x8 at K=V=256, bf16), forward + backward
of the built-in default against variants of its BwdConfig (``segment_chunks``: the sequence split of both passes;
``state_dtype="bf16"``: S0 and dS_C stored in bf16). Each variant's gradients are compared with the default's
(relative Frobenius error), then forward + backward is timed (median of triton.testing.do_bench, variants
alternated over the rounds so that clock drift hits all), and the backward's steps alone (bwd_spec's stage_fns:
the entering states with the split's transitions, the reverse pass, the local step). Then, at a small shape
(2x2048x4, K=V=128, bf16, strong decay), every option's gradient errors against float64 autograd through the
token recurrence. One JSON line per measurement; with $OUT set, the same lines in $OUT/exp_bwd_state.jsonl.
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

from gdn2_tune.kernels.bwd_spec import BwdRun
from gdn2_tune.kernels.chunk_bwd import BwdConfig, chunk_gdn2_autograd, default_bwd_config
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.reference import rel_err
from gdn2_tune.kernels.reference_grad import reference_grads
from gdn2_tune.profiles.dispatch import select_config

# Per shape: variant name -> BwdConfig fields over the built-in default at that shape.
PLAN: tuple[tuple[Shape, dict[str, dict]], ...] = (
    (Shape(8, 4096, 16, 128, 128, "bf16"),
     {"default": {}, "bf16_states": {"state_dtype": "bf16"}, "seg64": {"segment_chunks": 64},
      "seg32": {"segment_chunks": 32}}),
    (Shape(1, 32768, 16, 128, 128, "bf16"),
     {"default": {}, "no_split": {"segment_chunks": 0}, "seg128": {"segment_chunks": 128},
      "seg64": {"segment_chunks": 64}, "seg32": {"segment_chunks": 32}, "bf16_states": {"state_dtype": "bf16"},
      "seg64_bf16": {"segment_chunks": 64, "state_dtype": "bf16"}}),
    (Shape(16, 2048, 8, 256, 256, "bf16"),
     {"default": {}, "bf16_states": {"state_dtype": "bf16"}, "seg32": {"segment_chunks": 32}}),
)
ACCURACY_SHAPE = Shape(2, 2048, 4, 128, 128, "bf16")  # 64 chunks of 32 per sequence
ACCURACY_VARIANTS = {"fp32_states": {}, "seg16": {"segment_chunks": 16}, "bf16_states": {"state_dtype": "bf16"},
                     "seg16_bf16": {"segment_chunks": 16, "state_dtype": "bf16"}}
GRAD_NAMES = ("dq", "dk", "dv", "dg", "db", "dw", "dh0")


def emit(row: dict, sink: list[str]) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    sink.append(line)


def time_shape(shape: Shape, variants: dict[str, dict], rounds: int, sink: list[str]) -> None:
    inp = make_inputs(shape, "cuda", seed=0)
    fcfg = select_config(shape)
    xs = [x.detach().clone().requires_grad_(True) for x in (*inp.args(), inp.initial_state)]
    gen = torch.Generator(device="cuda").manual_seed(3)
    do = torch.randn(inp.v.shape, generator=gen, device="cuda").to(inp.q.dtype)
    dht = torch.randn(inp.initial_state.shape, generator=gen, device="cuda")
    cfgs = {name: dataclasses.replace(default_bwd_config(shape), **fields) for name, fields in variants.items()}

    def step(bcfg: BwdConfig) -> tuple[torch.Tensor, ...]:
        o, s = chunk_gdn2_autograd(*xs[:6], scale=shape.K**-0.5, initial_state=xs[6], output_final_state=True,
                                   cu_seqlens=None, use_qk_l2norm_in_kernel=False, config=fcfg,
                                   num_seqs=shape.B, bwd_config=bcfg)
        return torch.autograd.grad((o, s), xs, (do, dht))

    rows = {name: {"shape": shape.label(), "variant": name, "config": cfg.label(), "fwd_bwd_ms": []}
            for name, cfg in cfgs.items()}
    first = None
    for name, cfg in cfgs.items():
        try:
            g = step(cfg)
            if first is None:
                first = g
            rows[name]["vs_default"] = dict(zip(GRAD_NAMES, (float((a.double() - b.double()).norm()
                                                                   / b.double().norm().clamp_min(1e-30))
                                                             for a, b in zip(g, first))))
            del g
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a recorded outcome
            rows[name]["error"] = repr(exc)[:300]
    for _ in range(rounds):
        for name, cfg in cfgs.items():
            if "error" not in rows[name]:
                rows[name]["fwd_bwd_ms"].append(triton.testing.do_bench(lambda cfg=cfg: step(cfg), warmup=10, rep=60))
    run = BwdRun(shape, "cuda")
    for name, cfg in cfgs.items():
        row = rows[name]
        if "error" in row:
            emit(row, sink)
            continue
        row["median_ms"] = statistics.median(row["fwd_bwd_ms"])
        try:
            fns = run.stage_fns(cfg)
            row["stage_ms"] = {st: triton.testing.do_bench(fns[st], warmup=5, rep=30)
                               for st in ("states", "reverse", "local")}
            del fns
        except Exception as exc:  # noqa: BLE001
            row["stage_error"] = repr(exc)[:300]
        emit(row, sink)
    del run
    torch.cuda.empty_cache()


def accuracy(sink: list[str]) -> None:
    small = ACCURACY_SHAPE
    acc = make_inputs(small, "cuda", seed=1, strong_decay=True)
    gen = torch.Generator(device="cuda").manual_seed(2)
    a_do = torch.randn(acc.v.shape, generator=gen, device="cuda").to(acc.q.dtype)
    a_dht = torch.randn(acc.initial_state.shape, generator=gen, device="cuda")
    ref = [x for _, x in reference_grads(*acc.args(), a_do, a_dht, initial_state=acc.initial_state,
                                         device="cuda").items()]
    a_xs = [x.detach().clone().requires_grad_(True) for x in (*acc.args(), acc.initial_state)]
    for name, fields in ACCURACY_VARIANTS.items():
        cfg = dataclasses.replace(default_bwd_config(small), **fields)
        row: dict = {"shape": small.label(), "variant": name, "config": cfg.label(), "strong_decay": True}
        try:
            o, s = chunk_gdn2_autograd(*a_xs[:6], scale=small.K**-0.5, initial_state=a_xs[6],
                                       output_final_state=True, cu_seqlens=None, use_qk_l2norm_in_kernel=False,
                                       config=select_config(small), num_seqs=small.B, bwd_config=cfg)
            got = torch.autograd.grad((o, s), a_xs, (a_do, a_dht))
            row["err_vs_fp64"] = dict(zip(GRAD_NAMES, (rel_err(x, r) for x, r in zip(got, ref))))
        except Exception as exc:  # noqa: BLE001
            row["error"] = repr(exc)[:300]
        emit(row, sink)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-accuracy", action="store_true")
    args = parser.parse_args()
    sink: list[str] = []
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    emit({"env": env}, sink)
    try:
        if not args.no_accuracy:
            accuracy(sink)
        for shape, variants in PLAN:
            time_shape(shape, variants, args.rounds, sink)
    finally:
        out = os.environ.get("OUT")
        if out:
            Path(out, "exp_bwd_state.jsonl").write_text("\n".join(sink) + "\n")


if __name__ == "__main__":
    main()
