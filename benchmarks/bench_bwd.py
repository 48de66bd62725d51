"""Backward benchmark: gradient errors, determinism, forward + backward time and memory, ours against
flash-linear-attention's chunk_gdn2 in the same run (GPU only, not a test).

    python benchmarks/bench_bwd.py --out DIR                       # everything, the issue's 4 shapes
    python benchmarks/bench_bwd.py --out DIR --shapes 8x4096x16x128x128 16x2048x8x256x256
    python benchmarks/bench_bwd.py --out DIR --no-baseline         # ours only (fla autotunes for minutes per shape)
    python benchmarks/bench_bwd.py --out DIR --skip-accuracy       # timing and memory only

Writes DIR/bwd.json (environment, accuracy rows, timing rows) and prints one JSON line per row as it goes.

- Accuracy: B=2, T=2048, H=4, K=V=128, random initial state, random upstream gradients for o and the final state;
  bf16 and fp32 inputs (g fp32), normal decay and strong decay (g uniform in [-10, 0]). Every gradient (q, k, v,
  g, b, w, h0) against float64 autograd through the token recurrence on the GPU (kernels/reference_grad.py), as a
  relative Frobenius error; ours under NaN-poisoned buffers, the baseline as it is.
- Determinism: two backward passes on the same inputs, bitwise (ours and the baseline's).
- Time: forward alone and forward + backward of the public op (median and p20/p80 of triton.testing.do_bench,
  warm-up excluded, the baseline's first call (autotuning) timed separately).
- Memory: bytes the autograd graph holds after the forward beyond its inputs and outputs ("saved"), and the peak
  of torch.cuda.max_memory_allocated during the backward above what was allocated before it ("bwd_peak").
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn2_tune import chunk_gdn2
from gdn2_tune.kernels.buffers import poisoned
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.inputs import Inputs, make_inputs
from gdn2_tune.kernels.reference import rel_err
from gdn2_tune.kernels.reference_grad import reference_grads
from gdn2_tune.tuner.suite import parse_shape

# The shapes with baseline forward + backward figures (../shared/BASELINE.md).
SHAPES = [Shape(8, 4096, 16, 128, 128), Shape(1, 32768, 16, 128, 128), Shape(32, 1024, 16, 128, 128),
          Shape(16, 2048, 8, 256, 256)]
QUANTILES = [0.2, 0.5, 0.8]
NAMES = ("q", "k", "v", "g", "b", "w", "h0")


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    fla_version = fla_signature = None
    try:
        import fla
        from fla.ops.gdn2 import chunk_gdn2 as fla_op

        fla_version = getattr(fla, "__version__", "?")
        fla_signature = str(inspect.signature(fla_op))
    except ImportError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except OSError:
        commit = None
    return {
        "gpu": props.name, "sms": props.multi_processor_count,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "fla": fla_version, "fla_signature": fla_signature, "commit": commit,
    }


def fla_op(untuned: bool = False) -> Callable | None:
    """fla's chunk_gdn2; with ``untuned``, every autotuned kernel of fla keeps only the first config of its list, so
    that no call autotunes (minutes per shape). Its gradients' errors barely depend on the tiling, its speed does:
    use it for the accuracy rows only, and say so where its figures are quoted."""
    try:
        from fla.ops.gdn2 import chunk_gdn2 as op
    except ImportError:
        return None
    if untuned:
        # fla decorates its kernels when its modules import (importing any of fla imports them all), so the
        # autotuners already exist: trim each one's list in place.
        from triton.runtime.autotuner import Autotuner

        for name, module in list(sys.modules.items()):
            if name.startswith("fla.") and module is not None:
                for obj in list(vars(module).values()):
                    if isinstance(obj, Autotuner) and len(obj.configs) > 1:
                        obj.configs = obj.configs[:1]
    return op


def leaves(inp: Inputs) -> list[torch.Tensor]:
    xs = [x.detach().clone().requires_grad_(True) for x in inp.args()]
    return xs + [inp.initial_state.detach().clone().requires_grad_(True)]


def call(op: Callable, xs: list[torch.Tensor], cu: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    # Both ops take (q, k, v, g, b, w) positionally and these keywords (the baseline's signature is recorded).
    return op(*xs[:6], initial_state=xs[6], output_final_state=True, cu_seqlens=cu)


def grads(op: Callable, xs: list[torch.Tensor], cu: torch.Tensor | None, do: torch.Tensor,
          dht: torch.Tensor) -> list[torch.Tensor]:
    o, s = call(op, xs, cu)
    return list(torch.autograd.grad((o, s), xs, (do, dht)))


def accuracy(baseline: Callable | None) -> list[dict]:
    rows = []
    for dtype in ("bf16", "fp32"):
        for strong in (False, True):
            shape = Shape(2, 2048, 4, 128, 128, dtype)
            inp = make_inputs(shape, "cuda", seed=1, strong_decay=strong)
            gen = torch.Generator(device="cuda").manual_seed(2)
            do = torch.randn(inp.v.shape, generator=gen, device="cuda").to(inp.q.dtype)
            dht = torch.randn(inp.initial_state.shape, generator=gen, device="cuda")
            t0 = time.time()
            ref = dict(reference_grads(*inp.args(), do, dht, initial_state=inp.initial_state, device="cuda").items())
            row: dict = {"shape": shape.label(), "strong_decay": strong, "reference_s": round(time.time() - t0, 1)}
            with poisoned():  # an element left unwritten shows as NaN, i.e. an infinite error
                a = grads(chunk_gdn2, leaves(inp), None, do, dht)
                b = grads(chunk_gdn2, leaves(inp), None, do, dht)
            row["ours"] = {n: rel_err(x, ref[n]) for n, x in zip(NAMES, a)}
            row["ours_deterministic"] = all(torch.equal(x, y) for x, y in zip(a, b))
            if baseline is not None:
                try:
                    fa = grads(baseline, leaves(inp), None, do, dht)
                    fb = grads(baseline, leaves(inp), None, do, dht)
                    row["fla"] = {n: rel_err(x, ref[n]) for n, x in zip(NAMES, fa)}
                    row["fla_deterministic"] = all(torch.equal(x, y) for x, y in zip(fa, fb))
                except Exception as exc:  # noqa: BLE001 - the baseline is optional; record why it is missing
                    row["fla_error"] = repr(exc)[:300]
            print(json.dumps(row), flush=True)
            rows.append(row)
            del ref, inp
            torch.cuda.empty_cache()
    return rows


def bench(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> list[float]:
    return list(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=QUANTILES, grad_to_none=grad_to_none))


def measure(op: Callable, inp: Inputs) -> dict:
    """Forward time, forward + backward time, saved bytes and backward peak of one op at one shape."""
    xs = leaves(inp)
    gen = torch.Generator(device="cuda").manual_seed(3)
    do = torch.randn(inp.v.shape, generator=gen, device="cuda").to(inp.q.dtype)
    dht = torch.randn(inp.initial_state.shape, generator=gen, device="cuda")

    def fwd_bwd() -> None:
        o, s = call(op, xs, None)
        torch.autograd.backward((o, s), (do, dht))

    t0 = time.time()
    fwd_bwd()  # the first call compiles (and, for the baseline, autotunes)
    torch.cuda.synchronize()
    row: dict = {"first_call_s": round(time.time() - t0, 1)}

    # Memory: what the graph holds besides inputs and outputs, and the backward's transient peak.
    for x in xs:
        x.grad = None
    torch.cuda.synchronize()
    with torch.no_grad():
        base = torch.cuda.memory_allocated()
        o, s = call(op, xs, None)
        no_graph = torch.cuda.memory_allocated() - base
        del o, s
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    o, s = call(op, xs, None)
    torch.cuda.synchronize()
    row["saved_bytes"] = torch.cuda.memory_allocated() - base - no_graph
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.autograd.backward((o, s), (do, dht))
    torch.cuda.synchronize()
    row["bwd_peak_bytes"] = torch.cuda.max_memory_allocated() - before
    del o, s
    for x in xs:
        x.grad = None

    with torch.no_grad():
        row["fwd_ms"] = bench(lambda: call(op, xs, None))
    row["fwd_bwd_ms"] = bench(fwd_bwd, grad_to_none=xs)
    return row


def timing(shapes: list[Shape], baseline: Callable | None) -> list[dict]:
    rows = []
    for shape in shapes:
        inp = make_inputs(shape, "cuda", seed=0)
        row: dict = {"shape": shape.label(), "ours": measure(chunk_gdn2, inp)}
        if baseline is not None:
            try:
                row["fla"] = measure(baseline, inp)
                row["speedup_fwd_bwd"] = row["fla"]["fwd_bwd_ms"][1] / row["ours"]["fwd_bwd_ms"][1]
            except Exception as exc:  # noqa: BLE001 - the baseline is optional; record why it is missing
                row["fla_error"] = repr(exc)[:300]
        print(json.dumps(row), flush=True)
        rows.append(row)
        del inp
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=SHAPES, metavar="SHAPE",
                        help="BxTxHxKxV[:dtype] (default: the issue's four, bf16)")
    parser.add_argument("--no-baseline", action="store_true", help="skip fla (its first call autotunes for minutes)")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--baseline-untuned", action="store_true",
                        help="fla with the first config of each autotune list (no autotuning): accuracy only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_bwd: needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.baseline_untuned and not args.skip_timing:
        parser.error("--baseline-untuned times an untuned baseline; pass --skip-timing with it")
    baseline = None if args.no_baseline else fla_op(untuned=args.baseline_untuned)
    if baseline is None and not args.no_baseline:
        print("bench_bwd: fla.ops.gdn2 is not importable; running ours only", file=sys.stderr)
    result: dict = {"env": environment(), "baseline_untuned": args.baseline_untuned}
    path = args.out / "bwd.json"
    if not args.skip_accuracy:
        result["accuracy"] = accuracy(baseline)
        path.write_text(json.dumps(result, indent=1))
    if not args.skip_timing:
        result["timing"] = timing(args.shapes, baseline)
        path.write_text(json.dumps(result, indent=1))
    path.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
