"""First light on a GPU: compile both stages, check against float64, time the anchor against fla."""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import chunk_gdn2, gdn2_reference  # noqa: E402
from kernels.config import Shape, default_config, fit_to_shape, infeasibility  # noqa: E402
from kernels.inputs import make_inputs  # noqa: E402


def err(x, r):
    x = x.double()
    return float((x - r).norm() / r.norm()) if torch.isfinite(x).all() else float("inf")


def for_chunk(shape, chunk):
    cfg = dataclasses.replace(default_config(shape), chunk=chunk)
    if chunk == 128:
        cfg = dataclasses.replace(cfg, intra=dataclasses.replace(cfg.intra, BC=32, num_warps=8),
                                  state=dataclasses.replace(cfg.state, num_stages=1))
    return cfg


torch.backends.cuda.matmul.allow_tf32 = False
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
with torch.no_grad():
    for shape, strong in [(Shape(2, 300, 3, 128, 128, "bf16"), False), (Shape(2, 300, 3, 96, 80, "fp32"), True),
                          (Shape(2, 2048, 4, 128, 128, "bf16"), False), (Shape(2, 2048, 4, 128, 128, "fp32"), False),
                          (Shape(2, 2048, 4, 128, 128, "bf16"), True)]:
        for chunk in (32, 64, 128):
            cfg = for_chunk(shape, chunk)
            if infeasibility(cfg, shape):
                cfg = fit_to_shape(cfg, shape)
            inp = make_inputs(shape, "cuda", seed=3, strong_decay=strong)
            t0 = time.time()
            o, s = chunk_gdn2(*inp.args(), initial_state=inp.initial_state, output_final_state=True, config=cfg)
            torch.cuda.synchronize()
            dt = time.time() - t0
            ro, rs = gdn2_reference(*inp.args(), initial_state=inp.initial_state, device="cuda")
            line = f"{shape.label()} strong={strong} C{chunk}: o {err(o, ro):.2e} state {err(s, rs):.2e} first call {dt:.1f}s"
            try:
                from fla.ops.gdn2 import chunk_gdn2 as fla_fn
                fo, fs = fla_fn(*inp.args(), initial_state=inp.initial_state, output_final_state=True)
                line += f" | fla o {err(fo, ro):.2e} state {err(fs, rs):.2e}"
            except Exception as exc:
                line += f" | fla failed {exc!r:.100}"
            print(line, flush=True)
    shape = Shape(8, 4096, 16, 128, 128, "bf16")
    inp = make_inputs(shape, "cuda", seed=0)
    for chunk in (32, 64, 128):
        cfg = for_chunk(shape, chunk)
        f = lambda: chunk_gdn2(*inp.args(), initial_state=inp.initial_state, output_final_state=True, config=cfg)  # noqa: E731
        t0 = time.time(); f(); torch.cuda.synchronize(); c = time.time() - t0
        ms = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
        print(f"anchor C{chunk}: {ms:.3f} ms (first call {c:.1f}s) {cfg.label()}", flush=True)
    from fla.ops.gdn2 import chunk_gdn2 as fla_fn
    f = lambda: fla_fn(*inp.args(), initial_state=inp.initial_state, output_final_state=True)  # noqa: E731
    t0 = time.time(); f(); torch.cuda.synchronize(); c = time.time() - t0
    print(f"fla anchor: {triton.testing.do_bench(f, warmup=25, rep=100, return_mode='median'):.3f} ms (first {c:.0f}s)")
