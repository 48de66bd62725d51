"""Cold start: the first call in a fresh process with an empty Triton cache (GPU only, not a test).

    python benchmarks/cold_start.py [--baseline] [--step] [--compile-ahead {on,off,both}]

Without --step the call is a forward under no_grad; with --step it is a first training step: the forward with
every input requiring grad, then the backward of a random upstream gradient.

Each measurement runs in its own subprocess with TRITON_CACHE_DIR pointing at a new empty directory, so every
kernel is compiled from scratch: ours through the dispatcher (shipped table, no run-time tuning), and with
--baseline flash-linear-attention's chunk_gdn2, which compiles and autotunes its candidates on the first call
(82.5 s in BASELINE.md). ``--compile-ahead`` sets GDN2_COMPILE_AHEAD in our child (kernels/compile_ahead.py:
the first call compiles all its kernels at once in threads); "both" measures it off, then on. Prints one JSON line
per measurement, also appended to $OUT/cold_start.jsonl when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
sys.path.insert(0, ".")
import torch
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.inputs import make_inputs
shape = Shape(8, 4096, 16, 128, 128, "bf16")
inp = make_inputs(shape, "cuda", seed=0)
torch.cuda.synchronize()
if sys.argv[1] == "ours":
    from gdn2_tune import chunk_gdn2 as fn
else:
    from fla.ops.gdn2 import chunk_gdn2 as fn
step = sys.argv[2] == "step"
xs = [x.detach().requires_grad_(step) for x in inp.args()]
h0 = inp.initial_state.detach().requires_grad_(step)
def call():
    with torch.set_grad_enabled(step):
        o, ht = fn(*xs, initial_state=h0, output_final_state=True)
        if step:
            torch.autograd.backward([o, ht], [torch.randn_like(o), torch.randn_like(ht)])
t0 = time.perf_counter()
call()
torch.cuda.synchronize()
first = time.perf_counter() - t0
t0 = time.perf_counter()
call()
torch.cuda.synchronize()
import os
print(json.dumps({"impl": sys.argv[1], "mode": sys.argv[2], "shape": shape.label(), "first_call_s": round(first, 2),
                  "second_call_s": round(time.perf_counter() - t0, 4),
                  "compile_ahead": os.environ.get("GDN2_COMPILE_AHEAD", "1") != "0",
                  "cpus": len(os.sched_getaffinity(0)), "triton": __import__("triton").__version__}))
"""


def measure(impl: str, mode: str, compile_ahead: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        if compile_ahead is not None:
            env["GDN2_COMPILE_AHEAD"] = "1" if compile_ahead == "on" else "0"
        p = subprocess.run([sys.executable, "-c", CHILD, impl, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                           check=False)
    if p.returncode != 0:
        return {"impl": impl, "mode": mode, "error": p.stderr.strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", action="store_true", help="also time fla's first call (minutes)")
    parser.add_argument("--step", action="store_true", help="a first training step (forward + backward)")
    parser.add_argument("--compile-ahead", choices=("on", "off", "both"), default=None,
                        help="GDN2_COMPILE_AHEAD in our child (default: the environment's; 'both': off, then on)")
    args = parser.parse_args()
    mode = "step" if args.step else "fwd"
    runs = [("ours", c) for c in {"both": ["off", "on"], None: [None]}.get(args.compile_ahead, [args.compile_ahead])]
    runs += [("fla", None)] if args.baseline else []
    out = os.environ.get("OUT")
    for impl, compile_ahead in runs:
        line = json.dumps(measure(impl, mode, compile_ahead))
        print(line, flush=True)
        if out:
            with open(Path(out) / "cold_start.jsonl", "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
