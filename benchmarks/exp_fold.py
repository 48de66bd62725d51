"""Experiment (GPU, not a test): the folded state-stage inputs against the unfolded ones, and the state tiles at
K = V = 256. One run, one card.

    python benchmarks/exp_fold.py --out DIR        # writes DIR/fold.json

Folding: the intra stage hands over Q' = Q_γ − A_qk Y and U_a = A_qk U instead of Q_γ and A_qk, so the state pass
forms O = Q' S0 + U_a and drops the A_qk R product (and the split variant no longer stores R). Both variants
run the shipped table's config for each suite shape. Medians of triton.testing.do_bench (L2 flushed between
repetitions), warm-up excluded.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import functools
import json
import multiprocessing as mp
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_fwd import environment, ours
from exp_split import shipped_config

import kernels.chunk
from kernels.config import FwdConfig, Shape, infeasibility
from kernels.inputs import make_inputs
from kernels.intra import intra_fwd
from kernels.state import state_fwd
from tuner.suite import SUITE

K256 = SUITE[6]


def use_fold(fold: bool) -> None:
    kernels.chunk.intra_fwd = functools.partial(intra_fwd, fold=fold)


def _compile(job: tuple[dict, dict, bool]) -> str | None:
    cfg_d, shape_d, fold = job
    use_fold(fold)
    try:
        shape = Shape(**shape_d)
        ours(make_inputs(shape, "cuda", seed=0), FwdConfig.from_dict(cfg_d), shape)()
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001 - a failed compile is a result here
        return repr(exc)[:300]


def precompile(jobs: list[tuple[FwdConfig, Shape, bool]]) -> None:
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=12, mp_context=ctx) as pool:
        args = [(c.to_dict(), dataclasses.asdict(s), f) for c, s, f in jobs]
        for (c, s, f), err in zip(jobs, pool.map(_compile, args)):
            if err:
                print(f"compile failed: {s.label()} {c.label()} fold={f}: {err}", flush=True)


def stage_times(inp, cfg: FwdConfig, shape: Shape, fold: bool) -> dict[str, float]:
    B, T = inp.q.shape[:2]
    nchunks = B * triton.cdiv(T, cfg.chunk)

    def run_intra():
        return intra_fwd(*inp.args(), scale=shape.K**-0.5, chunk=cfg.chunk, cfg=cfg.intra, cu_seqlens=None,
                         chunk_indices=None, num_chunks=nchunks, use_qk_l2norm=False, out_dtype=inp.q.dtype,
                         fold=fold)

    inter = run_intra()

    def run_state():
        return state_fwd(inter, out_dtype=inp.q.dtype, v_shape=inp.v.shape, chunk=cfg.chunk, cfg=cfg.state,
                         initial_state=inp.initial_state, output_final_state=True, cu_seqlens=None,
                         chunk_offsets=None, chunk_indices=None, num_seqs=B)

    return {
        "intra_ms": triton.testing.do_bench(run_intra, warmup=25, rep=100, return_mode="median"),
        "state_ms": triton.testing.do_bench(run_state, warmup=25, rep=100, return_mode="median"),
    }


def k256_state_variants() -> list[FwdConfig]:
    base = shipped_config(K256)
    out = []
    for output, bv, warps, stages in [
        *[("fused", bv, w, s) for bv in (16, 32, 64) for w in (4, 8) for s in (1, 2, 3)],
        ("split", 32, 4, 2), ("split", 64, 4, 2), ("split", 64, 8, 2),
    ]:
        cfg = dataclasses.replace(base, state=dataclasses.replace(
            base.state, output=output, BV=bv, num_warps=warps, num_stages=stages))
        if infeasibility(cfg, K256) is None:
            out.append(cfg)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"env": environment(), "rows": [], "k256_state": []}

    def save() -> None:
        (args.out / "fold.json").write_text(json.dumps(result, indent=1))

    variants = k256_state_variants()
    precompile([(shipped_config(s), s, f) for s in SUITE for f in (False, True)]
               + [(c, K256, True) for c in variants])
    for shape in SUITE:
        inp = make_inputs(shape, "cuda", seed=0)
        cfg = shipped_config(shape)
        outs = {}
        for fold in (False, True):
            use_fold(fold)
            fn = ours(inp, cfg, shape)
            outs[fold] = fn()[0].float()
            row = {"shape": shape.label(), "config": cfg.label(), "fold": fold,
                   "ms": triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")}
            if shape.num_seqs is None:
                row.update(stage_times(inp, cfg, shape, fold))
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        diff = float((outs[True] - outs[False]).norm() / outs[False].norm())
        result["rows"][-1]["rel_diff_vs_unfolded"] = diff
        print(f"{shape.label()}: fold vs unfolded rel diff {diff:.2e}", flush=True)
        save()
        del inp, outs
        torch.cuda.empty_cache()

    inp = make_inputs(K256, "cuda", seed=0)
    for cfg in variants:
        row = {"config": cfg.label(), **stage_times(inp, cfg, K256, True)}
        result["k256_state"].append(row)
        print(json.dumps(row), flush=True)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
