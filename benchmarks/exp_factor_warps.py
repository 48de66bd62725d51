"""The backward's key factors launch at 4, 8 and 16 warps (GPU only, an experiment, not a test).

    python benchmarks/exp_factor_warps.py [SHAPE ...] [--rounds 3]

kernels/bwd_local.py's key factors hold several fp32 [C, K] tiles per program, and its warps come from
``factor_warps`` (4 up to [32, 128], then growing with the tile: 8 at K = 256). Offline sm_90 compiles (triton 3.6,
C = 32): K = 256 on 4 warps spills 656 bytes per thread, on 8 none (255 registers), on 16 none (128); K = 128 on 4
warps 255 registers, no spills. For each shape (default: 16x2048x8x256x256 and the anchor, bf16) the launch alone is
timed on the shape's chunk rows at 4, 8 and 16 warps, alternated over the rounds (triton.testing.do_bench, median
over rounds), each result checked bitwise against the 4-warp launch's (the factors are elementwise and a cumsum
within the chunk, so the warps must not change a bit). One JSON line per measurement and per summary, flushed;
appended to $OUT/exp_factor_warps.jsonl when $OUT is set.
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

from gdn2_tune.kernels.bwd_local import factor_warps, key_factors
from gdn2_tune.kernels.chunk_bwd import G_FLOOR, chunk_layout
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.profiles.dispatch import select_config
from gdn2_tune.tuner.suite import parse_shape

WARPS = (4, 8, 16)


def emit(row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "exp_factor_warps.jsonl"), "a") as f:
            f.write(line + "\n")


def run_shape(shape: Shape, rounds: int) -> None:
    inp = make_inputs(shape, "cuda", seed=0)
    chunk = select_config(shape).chunk
    rows = chunk_layout(shape.B, shape.T, chunk, None, inp.q.device).token_rows(inp.q.device)

    def launch(warps: int) -> list[torch.Tensor | None]:
        f = key_factors(inp.q, inp.k, inp.g, inp.b, rows, scale=shape.K**-0.5, l2norm=False, g_floor=G_FLOOR,
                        eps=1e-6, num_warps=warps)
        return [getattr(f, field.name) for field in dataclasses.fields(f)]  # no copies (astuple deep-copies)

    first = launch(WARPS[0])
    for w in WARPS[1:]:
        got = launch(w)
        same = all(torch.equal(a, b) for a, b in zip(got, first) if a is not None)
        emit({"what": "check", "shape": shape.label(), "warps": w, "bitwise_equal_to_4_warps": same})
    ms: dict[int, list[float]] = {w: [] for w in WARPS}
    for r in range(rounds):
        for w in WARPS[r % len(WARPS):] + WARPS[: r % len(WARPS)]:
            t = triton.testing.do_bench(lambda w=w: launch(w), warmup=10, rep=60)
            ms[w].append(t)
            emit({"what": "measurement", "round": r, "shape": shape.label(), "warps": w, "ms": t})
    emit({"what": "summary", "shape": shape.label(), "chunk": chunk, "default_warps": factor_warps(chunk, shape.K),
          "median_ms": {w: statistics.median(v) for w, v in ms.items()}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", type=parse_shape,
                        default=[Shape(16, 2048, 8, 256, 256, "bf16"), Shape(8, 4096, 16, 128, 128, "bf16")])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for shape in args.shapes:
        run_shape(shape, args.rounds)


if __name__ == "__main__":
    main()
