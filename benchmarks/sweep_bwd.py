"""Backward-only time of a few BwdConfig points at one shape (GPU), to pick the built-in default.

    python benchmarks/sweep_bwd.py [SHAPE]
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn2_tune.kernels.chunk_bwd import BwdConfig, chunk_gdn2_bwd
from gdn2_tune.kernels.config import default_config
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.tuner.suite import parse_shape

POINTS = [
    {},
    {"precision": "tf32"},
    {"precision": "tf32", "BV": 64, "num_stages": 3},
    {"precision": "tf32", "BV": 64, "num_stages": 2, "num_warps": 8},
    {"precision": "tf32", "BV": 16},
    {"pair_precision": "tf32"},
    {"pair_BK": 16},
    {"pair_BK": 16, "pair_warps": 2},
    {"pair_BK": 64, "pair_warps": 8},
    {"group_elements": 1 << 26},
]


def main() -> int:
    shape = parse_shape(sys.argv[1] if len(sys.argv) > 1 else "8x4096x16x128x128")
    inp = make_inputs(shape, "cuda", seed=0)
    cfg = default_config(shape)
    do = torch.randn_like(inp.v)
    dht = torch.randn_like(inp.initial_state)
    for point in POINTS:
        bcfg = dataclasses.replace(BwdConfig(), **point)
        def run(bcfg: BwdConfig = bcfg) -> None:
            chunk_gdn2_bwd(*inp.args(), do, dht, scale=shape.K**-0.5, initial_state=inp.initial_state,
                           cu_seqlens=None, use_qk_l2norm_in_kernel=False, config=cfg, bwd_config=bcfg,
                           num_seqs=shape.B)
        try:
            ms = triton.testing.do_bench(run, warmup=5, rep=60, quantiles=[0.2, 0.5, 0.8])
            print(json.dumps({"point": point, "ms": ms}), flush=True)
        except Exception as exc:  # noqa: BLE001 - record and go on
            print(json.dumps({"point": point, "error": repr(exc)[:200]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
