"""Experiment (GPU, not a test): two versions of the intra stage side by side, the default forward over the
suite, and the fp32 precision choices, in one run on one card.

    git show b475ebd:kernels/intra.py > /tmp/old_intra.py
    python benchmarks/exp_intra_rewrite.py --old /tmp/old_intra.py --out DIR

"new" is kernels/intra.py as checked out, "old" the file given. The recorded run
(benchmarks/results/intra-onepass-vs-rowblock-h100-2026-11-26.json) had the one-pass kernel of commit ab7aa6b as
"new" and the row-block kernel of b475ebd (the one kept) as "old". Every timing is a median of
triton.testing.do_bench (L2 flushed between repetitions), warm-up excluded. Writes DIR/intra_rewrite.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_fwd import environment, ours, rel_err

from gdn2_tune.kernels import intra as new_intra
from gdn2_tune.kernels.buffers import poisoned
from gdn2_tune.kernels.config import FwdConfig, IntraConfig, Shape, StateConfig, default_config
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.reference import gdn2_reference
from gdn2_tune.tuner.suite import SUITE


def load(path: Path):
    spec = importlib.util.spec_from_file_location("old_intra", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def save(out: Path, result: dict) -> None:
    """After every row, so that a run cut short keeps what it measured."""
    (out / "intra_rewrite.json").write_text(json.dumps(result, indent=1))


def compiled_resources(kernel) -> list[dict]:
    """Registers and spills of every compiled specialization of a jit function (best effort across versions)."""
    out = []
    for cache in getattr(kernel, "device_caches", {}).values():
        for ck in cache[0].values():
            out.append({"regs": getattr(ck, "n_regs", None), "spills": getattr(ck, "n_spills", None)})
    return out


def time_intra(mod, shape: Shape, inp, cfg: FwdConfig) -> float:
    nchunks = shape.B * triton.cdiv(shape.T, cfg.chunk)

    def fn():
        return mod.intra_fwd(*inp.args(), scale=shape.K**-0.5, chunk=cfg.chunk, cfg=cfg.intra, cu_seqlens=None,
                             chunk_indices=None, num_chunks=nchunks, use_qk_l2norm=False, out_dtype=inp.q.dtype)

    fn()
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    old = load(args.old)
    result: dict = {"env": environment(), "intra": [], "forward_default": [], "fp32": []}

    configs = [
        FwdConfig(32, IntraConfig(BC=16, BK=64, BV=64, num_warps=4)),
        FwdConfig(32, IntraConfig(BC=16, BK=32, BV=64, num_warps=4)),
        FwdConfig(32, IntraConfig(BC=16, BK=64, BV=128, num_warps=4)),
        FwdConfig(32, IntraConfig(BC=32, BK=32, BV=64, num_warps=4)),
        FwdConfig(32, IntraConfig(BC=16, BK=64, BV=64, num_warps=8)),
        FwdConfig(64, IntraConfig(BC=16, BK=32, BV=64, num_warps=4), StateConfig(num_stages=3)),
        FwdConfig(64, IntraConfig(BC=32, BK=32, BV=64, num_warps=8), StateConfig(num_stages=3)),
        FwdConfig(64, IntraConfig(BC=16, BK=16, BV=64, num_warps=4), StateConfig(num_stages=3)),
    ]
    for shape in (SUITE[0], SUITE[6]):
        inp = make_inputs(shape, "cuda", seed=0)
        for cfg in configs:
            cfg = dataclasses.replace(cfg, intra=dataclasses.replace(
                cfg.intra, BK=min(cfg.intra.BK, shape.K), BV=min(cfg.intra.BV, shape.V)))
            row = {"shape": shape.label(), "config": cfg.label()}
            for name, mod in (("old", old), ("new", new_intra)):
                try:
                    row[f"{name}_ms"] = time_intra(mod, shape, inp, cfg)
                except Exception as exc:  # noqa: BLE001 - an experiment: record and go on
                    row[f"{name}_error"] = repr(exc)[:300]
            print(json.dumps(row), flush=True)
            result["intra"].append(row)
            save(args.out, result)
        del inp
        torch.cuda.empty_cache()
    result["resources"] = {"old": compiled_resources(old._intra_kernel),
                           "new": compiled_resources(new_intra._intra_kernel)}

    for shape in SUITE:
        inp = make_inputs(shape, "cuda", seed=0)
        cfg = default_config(shape)
        fn = ours(inp, cfg, shape)
        fn()
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        row = {"shape": shape.label(), "config": cfg.label(), "ms": ms}
        print(json.dumps(row), flush=True)
        result["forward_default"].append(row)
        save(args.out, result)
        del inp
        torch.cuda.empty_cache()

    base = default_config(Shape(2, 2048, 4, 128, 128, "fp32"))
    for strong in (False, True):
        shape = Shape(2, 2048, 4, 128, 128, "fp32")
        inp = make_inputs(shape, "cuda", seed=1, strong_decay=strong)
        ref_o, ref_s = gdn2_reference(*inp.args(), initial_state=inp.initial_state, device="cuda")
        for ip in ("tf32", "tf32x3", "ieee"):
            for sp in ("input", "tf32x3"):
                cfg = dataclasses.replace(base, intra=dataclasses.replace(base.intra, precision=ip),
                                          state=dataclasses.replace(base.state, precision=sp))
                with poisoned():
                    o, s = ours(inp, cfg, shape)()
                row = {"strong_decay": strong, "config": cfg.label(), "o": rel_err(o, ref_o),
                       "state": rel_err(s, ref_s), "is_default": cfg == base}
                print(json.dumps(row), flush=True)
                result["fp32"].append(row)
    save(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
