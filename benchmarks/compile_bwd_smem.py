"""Compiled shared memory of the backward's two per-sequence passes against their budget (no GPU needed).

    /tmp/v36/bin/python benchmarks/compile_bwd_smem.py 256 > rows.jsonl     # K = V = 256; also 128

For every recompute store, V tiles 64 and 128 and 1-3 stages (both passes at that tile, two row parts, 8 warps,
C = 32, bf16 inputs), compiles the entering states and the reverse pass for sm_90 as benchmarks/compile_cost.py
does and prints the compiled shared memory next to kernels/chunk_bwd.py's budget (``budget_ok``) and whether the
budget accepts a config that does not fit (``unsafe``). Its rows are tests/data/bwd_pass_shared_memory.json, which
tests/test_chunk_bwd.py holds the budget to. Needs Triton >= 3.4 with its NVIDIA backend, TRITON_INTERPRET unset.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton
from compile_bwd_parts import pass_step
from compile_cost import StandInDriver, compile_one, record

LIMIT = 232448  # sm_90's shared memory per block
STORES = ("fp32", "u", "uy", "ukt", "uykt")


def main() -> int:
    triton.runtime.driver.set_active(StandInDriver())
    from gdn2_tune.kernels import chunk_bwd as cb
    from gdn2_tune.kernels.config import Shape

    K = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    C = 32
    shape = Shape(16, 2048, 8, K, K, "bf16")
    operand_bytes = cb.pass_operand_bytes(shape, C)
    for store in STORES:
        for bv in (64, 128):
            for stages in (1, 2, 3):
                cfg = dataclasses.replace(
                    cb.default_bwd_config(shape).resolved(), recompute_store=store, BV=bv, num_stages=stages,
                    reverse_BV=bv, reverse_stages=stages, k_parts=2, reverse_k_parts=2, num_warps=8, reverse_warps=8)
                for fn, spec in record(pass_step(cfg, shape, C)):
                    row = compile_one(fn, spec)
                    which = "reverse pass" if "state_bwd" in row["kernel"] else "entering states"
                    tile = cfg.reverse_pass() if which == "reverse pass" else cfg
                    ok = cb._pass_infeasibility(which, tile, shape, C, operand_bytes, LIMIT) is None
                    print(json.dumps({"K": K, "store": store, "BV": bv, "stages": stages, "pass": which,
                                      "smem": row["shared_bytes"], "budget_ok": ok,
                                      "unsafe": ok and row["shared_bytes"] > LIMIT}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
