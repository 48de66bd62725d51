"""Forward benchmark and accuracy check against flash-linear-attention's chunk_gdn2 (GPU only, not a test).

    python benchmarks/bench_fwd.py accuracy --out DIR        # errors vs the float64 recurrence, ours and fla's
    python benchmarks/bench_fwd.py sweep --out DIR           # per-stage config sweep at the anchor shape
    python benchmarks/bench_fwd.py suite --out DIR [--config-json FILE] [--shapes S ... | --set awkward|all]   # ours vs fla, same run

Every figure is a median of triton.testing.do_bench (which flushes L2 between repetitions), warm-up excluded,
with the baseline timed in the same process on the same card. Results go to DIR/*.json,
ready for `python tune.py report --benchmark DIR/suite.json` (the suite view with the fla column); BENCHMARKS.md
quotes them.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn2_tune import chunk_gdn2
from gdn2_tune.kernels.buffers import poisoned
from gdn2_tune.kernels.chunk import forward_launch
from gdn2_tune.kernels.config import FwdConfig, IntraConfig, Shape, StateConfig, default_config, infeasibility
from gdn2_tune.kernels.cost import minimum_bytes
from gdn2_tune.kernels.inputs import Inputs, make_inputs
from gdn2_tune.kernels.reference import gdn2_reference, rel_err
from gdn2_tune.tuner.suite import SUITE, parse_shape

ANCHOR = SUITE[0]
# Issue 14's shapes outside the suite, each of a kind where the forward lost to the baseline (about 0.9×, H200,
# 2026-11-30): K and V that are not powers of two, a single long sequence with few heads (B·H ≤ 8), and fp32
# inputs at the anchor. `suite --set awkward` (or `--set all`) times them against the baseline in the same run.
AWKWARD: tuple[Shape, ...] = tuple(parse_shape(text) for text in (
    "8x4096x16x96x96", "8x4096x16x100x60", "4x4096x16x192x160",
    "1x65536x4x128x128", "1x32768x8x128x128", "1x65536x8x64x64",
    "8x4096x16x128x128:fp32",
))
SETS = {"suite": SUITE, "awkward": AWKWARD, "all": SUITE + AWKWARD}
QUANTILES = [0.2, 0.5, 0.8]


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        import fla

        fla_version = getattr(fla, "__version__", "?")
    except ImportError:
        fla_version = None
    return {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": fla_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def ours(inp: Inputs, cfg: FwdConfig, shape: Shape):
    """The public op as a user calls it, argument checks included (for a packed batch, cu_seqlens is read back on
    the first call with the tensor only, kernels/varlen.memo)."""
    return lambda: chunk_gdn2(
        *inp.args(), scale=shape.K**-0.5, initial_state=inp.initial_state, output_final_state=True,
        cu_seqlens=inp.cu_seqlens, config=cfg,
    )


def baseline(inp: Inputs):
    from fla.ops.gdn2 import chunk_gdn2 as fla_chunk_gdn2

    return lambda: fla_chunk_gdn2(
        *inp.args(), initial_state=inp.initial_state, output_final_state=True, cu_seqlens=inp.cu_seqlens
    )


def bench(fn) -> list[float]:
    return list(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=QUANTILES))


# --- accuracy ---------------------------------------------------------------------------------------------------


def accuracy(out: Path, cfg_for) -> None:
    rows = []
    cases = [(Shape(2, 2048, 4, 128, 128, dt), strong) for dt in ("fp32", "bf16") for strong in (False, True)]
    cases.append((Shape(1, 32768, 2, 128, 128, "bf16"), False))
    for shape, strong in cases:
        inp = make_inputs(shape, "cuda", seed=1, strong_decay=strong)
        t0 = time.time()
        ref_o, ref_s = gdn2_reference(*inp.args(), initial_state=inp.initial_state, device="cuda")
        cfg = cfg_for(shape)
        with poisoned():  # an element left unwritten shows as NaN, i.e. an infinite error
            o, s = ours(inp, cfg, shape)()
        row = {"shape": shape.label(), "strong_decay": strong, "config": cfg.label(),
               "ours_o": rel_err(o, ref_o), "ours_state": rel_err(s, ref_s)}
        try:
            fo, fs = baseline(inp)()
            row.update(fla_o=rel_err(fo, ref_o), fla_state=rel_err(fs, ref_s))
        except Exception as exc:  # noqa: BLE001 - the baseline is optional; record why it is missing
            row.update(fla_error=repr(exc)[:200])
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    (out / "accuracy.json").write_text(json.dumps({"env": environment(), "rows": rows}, indent=1))


# --- sweep ------------------------------------------------------------------------------------------------------


def _compile_one(args: tuple[dict, dict]) -> str | None:
    cfg_d, shape_d = args
    cfg, shape = FwdConfig.from_dict(cfg_d), Shape(**shape_d)
    try:
        inp = make_inputs(shape, "cuda", seed=0)
        ours(inp, cfg, shape)()
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001 - a failed compile is a result here
        return repr(exc)[:300]


def precompile(configs: list[FwdConfig], shape: Shape, workers: int = 12) -> dict[str, str]:
    """Compile every config in parallel subprocesses (the Triton cache is shared); returns failures by label."""
    ctx = mp.get_context("spawn")
    jobs = [(c.to_dict(), dataclasses.asdict(shape)) for c in configs]
    failed = {}
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for cfg, err in zip(configs, pool.map(_compile_one, jobs)):
            if err:
                failed[cfg.label()] = err
    return failed


def stage_fns(inp: Inputs, cfg: FwdConfig, shape: Shape):
    """Separate launches of the two stages (the op's own, kernels.chunk.forward_launch), so each can be timed on
    its own; the state stage reads one precomputed intra output."""
    launch = forward_launch(
        *inp.args(), scale=shape.K**-0.5, initial_state=inp.initial_state, output_final_state=True,
        cu_seqlens=inp.cu_seqlens, use_qk_l2norm_in_kernel=False, config=cfg, num_seqs=shape.num_seqs or shape.B,
    )
    inter = launch.intra()
    return launch.intra, lambda: launch.state(inter)


def sweep(out: Path, shape: Shape) -> None:
    intra_space = [
        IntraConfig(BC=bc, BK=bk, BV=bv, num_warps=nw, num_stages=ns, precision=sv)
        for bc in (16, 32) for bk in (16, 32, 64) for bv in (32, 64) for nw in (4, 8) for ns in (1,) for sv in ("tf32",)
    ]
    state_space = [
        StateConfig(BV=bv, num_warps=nw, num_stages=ns, precision="input")
        for bv in (16, 32, 64) for nw in (4, 8) for ns in (1, 2, 3)
    ]
    base = default_config(shape)
    configs: list[FwdConfig] = []
    for chunk in (32, 64, 128):
        for ic in intra_space:
            configs.append(dataclasses.replace(base, chunk=chunk, intra=ic))
        for sc in state_space:
            configs.append(dataclasses.replace(base, chunk=chunk, state=sc))
    configs = [c for c in dict.fromkeys(configs) if infeasibility(c, shape) is None]
    t0 = time.time()
    failed = precompile(configs, shape)
    print(f"precompiled {len(configs)} configs in {time.time() - t0:.0f}s, {len(failed)} failed", flush=True)
    inp = make_inputs(shape, "cuda", seed=0)
    rows = []
    for cfg in configs:
        if cfg.label() in failed:
            rows.append({"config": cfg.to_dict(), "label": cfg.label(), "error": failed[cfg.label()]})
            continue
        run_intra, run_state = stage_fns(inp, cfg, shape)
        rows.append({"config": cfg.to_dict(), "label": cfg.label(), "intra": bench(run_intra),
                     "state": bench(run_state), "total": bench(ours(inp, cfg, shape))})
    # Best stage configs per chunk, combined, then re-timed whole.
    best = {}
    for chunk in (32, 64, 128):
        ok = [r for r in rows if "error" not in r and r["config"]["chunk"] == chunk]
        if not ok:
            continue
        bi = min(ok, key=lambda r: r["intra"][1])["config"]["intra"]
        bs = min(ok, key=lambda r: r["state"][1])["config"]["state"]
        cfg = FwdConfig.from_dict({"chunk": chunk, "intra": bi, "state": bs})
        best[chunk] = {"config": cfg.to_dict(), "label": cfg.label(), "total": bench(ours(inp, cfg, shape))}
        print(f"best C{chunk}: {best[chunk]['total'][1]:.3f} ms  {cfg.label()}", flush=True)
    fla_ms = bench(baseline(inp))
    print(f"fla: {fla_ms[1]:.3f} ms", flush=True)
    (out / f"sweep-{shape.label()}.json").write_text(
        json.dumps({"env": environment(), "shape": dataclasses.asdict(shape), "rows": rows, "best": best,
                    "fla": fla_ms, "failed": failed}, indent=1)
    )


# --- suite ------------------------------------------------------------------------------------------------------


def copy_bandwidth_gbps(nbytes: int = 512 * 2**20) -> float:
    """A device-to-device copy, counting bytes read plus written."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def suite(out: Path, cfg_for, shapes: Sequence[Shape] = SUITE) -> None:
    """Tuned (cfg_for), built-in default and fla per shape, in this order, same inputs, same process."""
    bw = copy_bandwidth_gbps()
    rows = []
    for shape in shapes:
        inp = make_inputs(shape, "cuda", seed=0)
        cfg, default = cfg_for(shape), default_config(shape)
        row = {"shape": shape.label(), "config": cfg.label(), "default_config": default.label(),
               "tuned": bench(ours(inp, cfg, shape)), "default": bench(ours(inp, default, shape)),
               "bytes_min": minimum_bytes(shape)}
        t0 = time.time()
        try:
            row["fla"] = bench(baseline(inp))
            row["fla_speedup"] = row["fla"][1] / row["tuned"][1]
        except Exception as exc:  # noqa: BLE001 - the baseline is optional; record why it is missing
            row["fla_error"] = repr(exc)[:200]
        row["fla_first_call_s"] = round(time.time() - t0, 1)
        print(json.dumps({k: v for k, v in row.items() if "config" not in k}), flush=True)
        rows.append(row)
        (out / "suite.json").write_text(json.dumps({"env": environment(), "copy_gbps": bw, "rows": rows}, indent=1))
        del inp
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["accuracy", "sweep", "suite"])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--config-json", type=Path, help="JSON {shape label: FwdConfig dict} to use per shape")
    parser.add_argument("--use-dispatcher", action="store_true", help="configs from profiles.dispatch")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="SHAPE",
                        help="suite: only these (BxTxHxKxV[:dtype][:varlenN], as tune.py takes them)")
    parser.add_argument("--set", choices=sorted(SETS), default="suite",
                        help="suite: the shapes to time when --shapes is not given (default the tuner's suite)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = json.loads(args.config_json.read_text()) if args.config_json else {}

    def cfg_for(shape: Shape) -> FwdConfig:
        if shape.label() in table:
            return FwdConfig.from_dict(table[shape.label()])
        if args.use_dispatcher:
            from gdn2_tune.profiles.dispatch import select_config

            return select_config(shape)
        return default_config(shape)

    with torch.no_grad():
        if args.what == "accuracy":
            accuracy(args.out, cfg_for)
        elif args.what == "sweep":
            sweep(args.out, ANCHOR)
        else:
            suite(args.out, cfg_for, args.shapes or SETS[args.set])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
