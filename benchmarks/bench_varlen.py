"""Packed batches (cu_seqlens) on the GPU: per-call cost, and memory safety whatever the offsets hold (not a test).

    python benchmarks/bench_varlen.py --out DIR                  # timing, then the safety and gate checks
    python benchmarks/bench_varlen.py --out DIR --only timing    # or --only safety

Timing, at B=1, T=32768, H=16, K=V=128, bf16 split into N uneven sequences (N=12 is the suite's packed shape,
kernels.inputs.packed_lengths), with the built-in default config (the same at every commit; ``--use-dispatcher`` for the shipped table's):

- ``op_do_bench``: the public op as a user calls it, triton.testing.do_bench (L2 flushed before each call), the
  way BENCHMARKS.md's suite figures are taken (2.672 ms with a host sync per call, then 1.761 ms with the
  per-tensor memo, H100, 2026-11-26);
- ``op_stream``: the public op called back to back (no flush), GPU time per call, and the host's enqueue time
  per call: the host-bound check (the GPU idles when the host is slower);
- ``op_graph``: the public op captured in a CUDA graph and replayed (triton.testing.do_bench_cudagraph);
- ``kernels_graph``: the intra and state launches alone, on an index built beforehand (what the memo achieved);
- ``index_graph``/``index_eager``: building the sanitised offsets and chunk index alone (and as torch ops,
  ``index_torch_*``, where kernels.varlen has them).

The index builder falls back to ``chunk_index`` at commits before the rebuild-every-call design (no
``packed_index`` there); the launches go through kernels.chunk.forward_launch, so to time such a commit, run its
own copy of this script.

Safety (T=4096, H=4, K=V=128, bf16, 5 sequences, in a child process so that a crash is a recorded outcome):
offsets rewritten in place without a version bump (``cu.data[i] = x``) must give the reference result for the
new offsets; offsets past T, negative, decreasing or huge must give the reference result on the sanitised offsets
(kernels.varlen.sanitize_offsets, the documented safe result) with no fault; GDN2_CHECK_INPUTS=1 must raise;
g = -inf (and finite g far below the exp range) must match the reference at every chunk length in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE_T, SHAPE_H, SHAPE_D = 32768, 16, 128
NUM_SEQS = (8, 12, 64)
QUANTILES = [0.2, 0.5, 0.8]


def environment() -> dict:
    import torch
    import triton

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "commit": commit or None,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def _index_fn():
    """The chunk-index builder of this checkout: packed_index (rebuilt every call) or the older chunk_index."""
    from gdn2_tune.kernels import varlen

    if hasattr(varlen, "packed_index"):
        def build(cu, chunk, T):
            idx = varlen.packed_index(cu, chunk, T)
            return idx.offsets, idx.pairs, idx.first, idx.num_chunks
    else:
        def build(cu, chunk, T):
            pairs, first, num_chunks = varlen.chunk_index(cu, chunk, T)
            return cu, pairs, first, num_chunks
    return build


def stream_ms(fn: Callable[[], object], calls: int = 20, rounds: int = 7) -> dict:
    """Back-to-back calls: GPU ms per call (events around ``calls`` calls) and host enqueue ms per call."""
    import torch

    for _ in range(3):
        fn()
    gpu, host = [], []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        host.append((time.perf_counter() - t0) * 1e3 / calls)
        end.synchronize()
        gpu.append(start.elapsed_time(end) / calls)
    gpu.sort()
    host.sort()
    return {"gpu_ms_p50": gpu[len(gpu) // 2], "gpu_ms_min": gpu[0], "host_ms_p50": host[len(host) // 2]}


def timing(use_dispatcher: bool) -> list[dict]:
    import torch
    import triton

    from gdn2_tune import chunk_gdn2
    from gdn2_tune.kernels.chunk import forward_launch
    from gdn2_tune.kernels.config import Shape, default_config
    from gdn2_tune.kernels.inputs import make_inputs
    from gdn2_tune.profiles.dispatch import select_config

    build = _index_fn()
    rows = []
    for n in NUM_SEQS:
        shape = Shape(1, SHAPE_T, SHAPE_H, SHAPE_D, SHAPE_D, "bf16", num_seqs=n)
        inp = make_inputs(shape, "cuda", seed=0)
        cfg = select_config(shape) if use_dispatcher else default_config(shape)
        cu = inp.cu_seqlens

        def op(inp=inp, cfg=cfg, cu=cu):
            return chunk_gdn2(*inp.args(), initial_state=inp.initial_state, output_final_state=True,
                              cu_seqlens=cu, config=cfg)

        # The two launches bound once, on an index built beforehand: calling it runs the stages alone.
        kernels = forward_launch(*inp.args(), scale=SHAPE_D**-0.5, initial_state=inp.initial_state,
                                 output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=False, config=cfg,
                                 num_seqs=n)

        def index(cu=cu, cfg=cfg):
            return build(cu, cfg.chunk, SHAPE_T)

        with torch.inference_mode():
            row = {"shape": shape.label(), "config": cfg.label()}
            row["op_do_bench"] = list(triton.testing.do_bench(op, warmup=25, rep=200, quantiles=QUANTILES))
            row["op_stream"] = stream_ms(op)
            row["op_graph"] = triton.testing.do_bench_cudagraph(op, rep=200, return_mode="median")
            row["kernels_graph"] = triton.testing.do_bench_cudagraph(kernels, rep=200, return_mode="median")
            row["index_graph"] = triton.testing.do_bench_cudagraph(index, rep=50, return_mode="median")
            row["index_eager"] = stream_ms(index, calls=50)
            from gdn2_tune.kernels import varlen

            if hasattr(varlen, "packed_index_torch"):  # the same index as ~15 torch ops, for comparison

                def index_torch(cu=cu, cfg=cfg):
                    return varlen.packed_index_torch(cu, cfg.chunk, SHAPE_T)

                row["index_torch_graph"] = triton.testing.do_bench_cudagraph(index_torch, rep=50,
                                                                             return_mode="median")
                row["index_torch_eager"] = stream_ms(index_torch, calls=50)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del inp
        torch.cuda.empty_cache()
    return rows


# --- safety (runs in a child process: a fault there is a recorded outcome, not the end of the benchmark) ------


def _rel(x, ref) -> float:
    import torch

    x = x.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).norm() / ref.norm())


def safety_child() -> None:
    """One JSON line per case on stdout, each printed before and after (a crash leaves the 'start' line last)."""
    import torch

    from gdn2_tune.kernels.buffers import poisoned
    from gdn2_tune.kernels.chunk import chunk_gdn2
    from gdn2_tune.kernels.config import FwdConfig, IntraConfig, Shape, StateConfig, default_config
    from gdn2_tune.kernels.inputs import make_inputs
    from gdn2_tune.kernels.reference import gdn2_reference

    try:
        from gdn2_tune.kernels.varlen import sanitize_offsets
    except ImportError:  # the commit before
        sanitize_offsets = None
    SANITISES = sanitize_offsets is not None

    T = 4096
    shape = Shape(1, T, 4, 128, 128, "bf16", num_seqs=5)
    inp = make_inputs(shape, "cuda", seed=3)
    budget = 1e-2  # bf16, compiled (tests/test_kernels.py TOL)

    def run_case(name: str, cu, mutate=None, expect_error: bool = False, args=None, cfg=None, tol=budget) -> None:
        print(json.dumps({"case": name, "status": "start"}), flush=True)
        args = args if args is not None else inp.args()
        row = {"case": name}
        try:
            with torch.inference_mode(), poisoned():
                o, s = chunk_gdn2(*args, initial_state=inp.initial_state, output_final_state=True, cu_seqlens=cu,
                                  config=cfg)
                if mutate is not None:  # written after a first call, as a data loader refilling its buffer does
                    mutate(cu)
                    o, s = chunk_gdn2(*args, initial_state=inp.initial_state, output_final_state=True,
                                      cu_seqlens=cu, config=cfg)
                torch.cuda.synchronize()
            if expect_error:
                row.update(status="FAIL", why="no error raised")
            elif not SANITISES:
                # The commit before: no documented result for invalid offsets; finishing without a fault is all.
                row.update(offsets=cu.tolist()[:8], status="ok" if bool(torch.isfinite(o).all()) else "FAIL",
                           note="no reference: this commit defines no result for invalid offsets")
            else:
                safe = sanitize_offsets(cu, args[0].shape[1]).cpu()
                ref_o, ref_s = gdn2_reference(*args, initial_state=inp.initial_state, cu_seqlens=safe,
                                              device="cuda")
                row.update(offsets=cu.tolist()[:8], used=safe.tolist()[:8], err_o=_rel(o, ref_o),
                           err_s=_rel(s, ref_s))
                row["status"] = "ok" if row["err_o"] < tol and row["err_s"] < tol else "FAIL"
        except ValueError as exc:
            row.update(status="ok" if expect_error else "FAIL", error=str(exc)[:200])
        print(json.dumps(row), flush=True)

    base = inp.cu_seqlens.clone()

    def write(i: int, value: int):
        def mutate(cu):
            cu.data[i] = value  # .data: no version bump, invisible to a cache keyed on _version
        return mutate

    run_case("rewrite-valid-no-version-bump", base.clone(), write(2, int(base[2]) + 517))
    run_case("rewrite-int32-no-version-bump", base.clone().to(torch.int32), write(1, 3))
    run_case("rewrite-past-T", base.clone(), write(2, T + 1000))
    run_case("rewrite-negative", base.clone(), write(3, -50))
    run_case("rewrite-huge", base.clone(), write(1, 2**40))
    run_case("rewrite-last-short", base.clone(), write(5, T - 100))
    run_case("decreasing", torch.tensor([0, 900, 300, 2000, 1500, T], device="cuda"))
    os.environ["GDN2_CHECK_INPUTS"] = "1"
    run_case("checked-mode-past-T", torch.tensor([0, 900, T + 5, 2000, 3000, T], device="cuda"), expect_error=True)
    os.environ.pop("GDN2_CHECK_INPUTS")

    # Gates: -inf and finite values below the exp range, mixed with strong decay, at every chunk length.
    gen = torch.Generator().manual_seed(9)
    for dtype in ("fp32", "bf16"):
        gshape = Shape(2, 1000, 4, 64, 64, dtype)
        ginp = make_inputs(gshape, "cuda", seed=5, strong_decay=True)
        huge = torch.tensor([-float("inf"), -3.0e38, -1.0e4, -200.0, -104.0])
        pick = huge[torch.randint(len(huge), ginp.g.shape, generator=gen)].cuda()
        g = torch.where(torch.rand(ginp.g.shape, generator=gen).cuda() < 0.05, pick, ginp.g)
        args = (ginp.q, ginp.k, ginp.v, g, ginp.b, ginp.w)
        base_cfg = default_config(gshape)
        configs = {
            32: base_cfg,
            64: FwdConfig(64, IntraConfig(BC=16, BK=32, BV=64, precision=base_cfg.intra.precision),
                          StateConfig(BV=32, num_stages=2, precision=base_cfg.state.precision)),
            128: FwdConfig(128, IntraConfig(BC=32, BK=16, BV=64, num_warps=8, precision=base_cfg.intra.precision),
                           StateConfig(BV=32, num_stages=1 if dtype == "fp32" else 2,
                                       precision=base_cfg.state.precision)),
        }
        for chunk, cfg in configs.items():
            name = f"g-minus-inf-{dtype}-C{chunk}"
            print(json.dumps({"case": name, "status": "start"}), flush=True)
            row = {"case": name}
            try:
                with torch.inference_mode(), poisoned():
                    o, s = chunk_gdn2(*args, initial_state=ginp.initial_state, output_final_state=True, config=cfg)
                ref_o, ref_s = gdn2_reference(*args, initial_state=ginp.initial_state, device="cuda")
                tol = 2e-3 if dtype == "fp32" else 1e-2
                row.update(err_o=_rel(o, ref_o), err_s=_rel(s, ref_s))
                row["status"] = "ok" if row["err_o"] < tol and row["err_s"] < tol else "FAIL"
            except Exception as exc:  # noqa: BLE001 - an error is this case's outcome
                row.update(status="FAIL", error=repr(exc)[:300])
            print(json.dumps(row), flush=True)


def safety() -> list[dict]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("GDN2_CHECK_INPUTS", None)
    proc = subprocess.run([sys.executable, __file__, "--safety-child"], capture_output=True, text=True, env=env,
                          check=False, timeout=900)
    rows: dict[str, dict] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows[row["case"]] = row
    for row in rows.values():
        if row.get("status") == "start":
            row.update(status="CRASH", returncode=proc.returncode, stderr=proc.stderr[-1500:])
    if proc.returncode != 0 and all(r.get("status") != "CRASH" for r in rows.values()):
        rows["child"] = {"case": "child", "status": "CRASH", "returncode": proc.returncode,
                         "stderr": proc.stderr[-1500:]}
    return list(rows.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--only", choices=["timing", "safety"], help="run one part (default both)")
    parser.add_argument("--use-dispatcher", action="store_true",
                        help="time the dispatcher's config (default: the built-in default, the same at every commit)")
    parser.add_argument("--safety-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.safety_child:
        safety_child()
        return 0
    if not torch.cuda.is_available():
        print("bench_varlen: needs a CUDA GPU (nothing to time in the interpreter)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"env": environment()}
    if args.only in (None, "timing"):
        result["timing"] = timing(args.use_dispatcher)
        (args.out / "varlen.json").write_text(json.dumps(result, indent=1))
    if args.only in (None, "safety"):
        result["safety"] = safety()
        (args.out / "varlen.json").write_text(json.dumps(result, indent=1))

    print(f"\n{result['env']['gpu']}  commit {result['env']['commit']}  (ms per call)")
    if "timing" in result:
        print(f"{'N':>4} {'do_bench p50':>13} {'stream gpu':>11} {'stream host':>12} {'graph':>8} {'kernels':>8} "
              f"{'index graph':>12} {'index eager':>12}")
        for row in result["timing"]:
            n = row["shape"].rsplit("-N", 1)[-1]
            print(f"{n:>4} {row['op_do_bench'][1]:13.3f} {row['op_stream']['gpu_ms_p50']:11.3f} "
                  f"{row['op_stream']['host_ms_p50']:12.3f} {row['op_graph']:8.3f} {row['kernels_graph']:8.3f} "
                  f"{row['index_graph']:12.4f} {row['index_eager']['gpu_ms_p50']:12.4f}")
    if "safety" in result:
        for row in result["safety"]:
            errs = f"o {row['err_o']:.1e} state {row['err_s']:.1e}" if "err_o" in row else row.get("error", "")
            print(f"{row['status']:>5}  {row['case']:<32} {errs}")
    failed = [r for r in result.get("safety", []) if r.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
