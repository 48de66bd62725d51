"""Issue 11: the gradients' error of every shipped bwd table entry against float64, next to the baseline's (GPU only).

    python benchmarks/bwd_entry_accuracy.py [--table profiles/h200.json] [--keys K256 ...]

A tuned entry passed the tuner's gate (8e-3 for bf16, every gradient at once); the issue's bar is the baseline's
error per gradient. For each ``bwd/...`` entry of the table: inputs with its K, V and dtype at a size float64
autograd through the token recurrence handles in seconds (B=2, T=2048, H=4; T=1024, H=2 at K or V above 128),
normal and strong decay (g down to -10 per step), random initial state and upstream gradients; the forward at the
built-in config for that shape's chunk, the backward at the entry's config (fitted as a run fits it), outputs
NaN-poisoned; fla's chunk_gdn2 on the same inputs. One JSON line per (entry, decay), with each gradient's relative
Frobenius error for ours and fla and the gradients where ours is the larger; with $OUT set also written to
$OUT/bwd_entry_accuracy.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_bwd import NAMES, fla_op, grads, leaves

from gdn2_tune.kernels.buffers import poisoned
from gdn2_tune.kernels.chunk_bwd import chunk_gdn2_autograd
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.reference import rel_err
from gdn2_tune.kernels.reference_grad import reference_grads
from gdn2_tune.profiles import table
from gdn2_tune.profiles.dispatch import select_config


def small_shape(shape: Shape) -> Shape:
    wide = max(shape.K, shape.V) > 128
    return Shape(2, 1024 if wide else 2048, 2 if wide else 4, shape.K, shape.V, shape.dtype)


def ours_with(bwd_config):
    def op(q, k, v, g, b, w, *, initial_state, output_final_state, cu_seqlens):
        shape = Shape(q.shape[0], q.shape[1], q.shape[2], q.shape[3], v.shape[3],
                      {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[q.dtype])
        return chunk_gdn2_autograd(q, k, v, g, b, w, scale=shape.K**-0.5, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                   use_qk_l2norm_in_kernel=False, config=select_config(shape), num_seqs=shape.B,
                                   bwd_config=bwd_config)
    return op


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=Path(__file__).resolve().parents[1] / "profiles" / "h200.json")
    parser.add_argument("--keys", nargs="+", default=None,
                        help="only the entries whose key contains one of these (e.g. K256); default: every bwd entry")
    args = parser.parse_args()
    profile, problems = table.load_profile(args.table)
    assert profile is not None, problems
    baseline = fla_op(untuned=True)  # its errors barely depend on the tiling (bench_bwd.fla_op)
    out = Path(os.environ["OUT"]) / "bwd_entry_accuracy.jsonl" if os.environ.get("OUT") else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    for entry in profile.entries:
        if entry.stage != "bwd" or (args.keys and not any(k in entry.key for k in args.keys)):
            continue
        shape = small_shape(entry.shape)
        for strong in (False, True):
            inp = make_inputs(shape, "cuda", seed=1, strong_decay=strong)
            gen = torch.Generator(device="cuda").manual_seed(2)
            do = torch.randn(inp.v.shape, generator=gen, device="cuda").to(inp.q.dtype)
            dht = torch.randn(inp.initial_state.shape, generator=gen, device="cuda")
            ref = dict(reference_grads(*inp.args(), do, dht, initial_state=inp.initial_state, device="cuda").items())
            with poisoned():
                ours = grads(ours_with(entry.config), leaves(inp), None, do, dht)
            row = {"entry": entry.key, "config": entry.config.label(), "shape": shape.label(), "strong_decay": strong,
                   "ours": {n: rel_err(x, ref[n]) for n, x in zip(NAMES, ours)}}
            if baseline is not None:
                fla = grads(baseline, leaves(inp), None, do, dht)
                row["fla"] = {n: rel_err(x, ref[n]) for n, x in zip(NAMES, fla)}
                row["ours_larger"] = [n for n in NAMES if row["ours"][n] > row["fla"][n]]
            line = json.dumps(row)
            print(line, flush=True)
            if out is not None:
                with open(out, "a") as f:
                    f.write(line + "\n")
            del ref, inp
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
