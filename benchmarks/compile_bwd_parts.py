"""Registers and spills of the backward's two per-sequence passes, one or two row parts (no GPU needed).

    /tmp/v36/bin/python benchmarks/compile_bwd_parts.py [--K 256] [--V 256] [--chunk 32]

Records the specializations of ``_entering_states_kernel`` and ``_state_bwd_kernel`` that kernels/chunk_bwd.py's
launchers ask for at K x V (bf16 inputs as the built-in backward runs them: recomputed operands in fp32 where the
pass can stage them, bf16 S0 / dS_C, TF32 dots), for BwdConfig.k_parts 1 and 2, V tiles of 32 / 64 / 128 and 4 / 8
warps, then compiles each for sm90 as benchmarks/compile_cost.py does and prints registers and stack bytes (spills)
from the cubin. One JSON line per kernel. Needs Triton >= 3.4 with its NVIDIA backend, TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import torch
import triton
from compile_cost import StandInDriver, compile_one, record


def pass_step(cfg, shape, C: int):
    """A callable that launches both passes once at ``cfg`` on zero operands of ``shape``'s K and V and chunk ``C``
    (the recomputed operands in ``cfg``'s stored dtypes): what :func:`compile_cost.record` records. Small B, T, H
    (only the constexprs, dtypes and 16-divisibility of the ints decide the compile); none is 1, which Triton would
    specialise."""
    from gdn2_tune.kernels.chunk_bwd import entering_states, recompute_dtypes, state_bwd

    B, T, H, K, V = 2, 4 * C, 2, shape.K, shape.V
    dts = recompute_dtypes(cfg, shape, C)
    inter = {"y": torch.zeros(B, T, H, K, dtype=dts["y"]), "u": torch.zeros(B, T, H, V, dtype=dts["u"]),
             "kt": torch.zeros(B, T, H, K, dtype=dts["kt"]), "qg": torch.zeros(B, T, H, K, dtype=dts["qg"]),
             "aqk": torch.zeros(B, T, H, C), "gamma": torch.zeros(B * triton.cdiv(T, C), H, K)}
    do = torch.zeros(B, T, H, V, dtype=torch.bfloat16)
    h0, dht = torch.zeros(B, H, K, V), torch.zeros(B, H, K, V)
    common = {"chunk": C, "cu_seqlens": None, "chunk_offsets": None, "num_seqs": B}

    def step() -> None:
        entering_states(inter, initial_state=h0, cfg=cfg, **common)
        state_bwd(inter, do, dht, initial_grad=True, cfg=cfg, **common)

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--K", type=int, default=256)
    parser.add_argument("--V", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--stages", type=int, default=3,
                        help="num_stages asked for (the default's 3); fit_bwd lowers it to what fits, as a run does")
    parser.add_argument("--no-fit", action="store_true",
                        help="compile the asked tiles and stages as they are (the shared memory may not fit)")
    parser.add_argument("--defaults", action="store_true",
                        help="the built-in config's two passes only, each at its own tile (BwdConfig.reverse_*)")
    parser.add_argument("--reverse-stages", type=int, default=0,
                        help="with --defaults: the reverse pass's num_stages (0: the default's)")
    parser.add_argument("--store", default=None,
                        help="recompute_store (default: the built-in's); the recomputed operands take its dtypes")
    args = parser.parse_args()
    triton.runtime.driver.set_active(StandInDriver())
    from gdn2_tune.kernels.chunk_bwd import default_bwd_config, fit_bwd, pass_operand_bytes, recompute_dtypes
    from gdn2_tune.kernels.config import Shape

    K, V, C = args.K, args.V, args.chunk
    shape = Shape(16, 2048, 8, K, V, "bf16")
    base = default_bwd_config(shape).resolved()
    base = dataclasses.replace(base, num_stages=args.stages, reverse_stages=args.reverse_stages or base.reverse_stages,
                               recompute_store=args.store or base.recompute_store)
    dts = recompute_dtypes(base, shape, C)
    # With --defaults, the built-in config alone (each pass at its own tile, BwdConfig.reverse_*); else the sweep,
    # both passes at the swept tile.
    sweep = [(None, None, None)] if args.defaults else [(p, b, w) for p in (1, 2) for b in (32, 64, 128)
                                                         for w in (4, 8)]
    for parts, bv, warps in sweep:
        cfg = base if parts is None else dataclasses.replace(
            base, k_parts=parts, BV=bv, num_warps=warps, reverse_BV=0, reverse_warps=0, reverse_k_parts=0,
            reverse_stages=0)
        if not args.no_fit:
            cfg = fit_bwd(cfg, shape, C, pass_operand_bytes(shape, C))  # fewer stages or a narrower tile, as a run fits
        for fn, spec in record(pass_step(cfg, shape, C)):
            row = compile_one(fn, spec)
            tile = cfg.reverse_pass() if "state_bwd" in row["kernel"] else cfg
            print(json.dumps({"K": K, "V": V, "C": C, "k_parts": tile.k_parts, "BV": tile.BV,
                              "store": cfg.recompute_store, "operands": {k: str(v) for k, v in dts.items()},
                              "state_dtype": cfg.state_dtype, "precision": cfg.precision,
                              **{k: row[k] for k in ("kernel", "num_warps", "num_stages", "regs",
                                                     "stack_bytes", "shared_bytes", "wall_s")}}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
