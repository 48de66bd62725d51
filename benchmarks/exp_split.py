"""Experiment (GPU, not a test): the state stage's fused output against the split one, at the suite shapes where
the pass has few programs, with the shipped table's configs as the fused side. One run, one card.

    python benchmarks/exp_split.py --out DIR        # writes DIR/split.json

Medians of triton.testing.do_bench (L2 flushed between repetitions), warm-up excluded. The recorded run
(benchmarks/results/split-vs-fused-h100-2026-11-26.json) read the table shipped before this variant existed
(git show 281dc15:profiles/h100-80gb-hbm3.json); run today, the fused side is the current table's entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_fwd import environment, ours

from gdn2_tune.kernels.config import FwdConfig, default_config, infeasibility
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.profiles.table import entry_key
from gdn2_tune.tuner.suite import SUITE

SHIPPED = Path(__file__).resolve().parents[1] / "profiles" / "h100-80gb-hbm3.json"


def shipped_config(shape) -> FwdConfig:
    """The shipped table's entry as written, even when the table is stale for the current kernel source."""
    entries = {e["key"]: e for e in json.loads(SHIPPED.read_text())["entries"]}
    entry = entries.get(entry_key("fwd", shape))
    return FwdConfig.from_dict(entry["config"]) if entry else default_config(shape)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"env": environment(), "rows": []}
    for shape in (SUITE[1], SUITE[7], SUITE[6], SUITE[0]):
        inp = make_inputs(shape, "cuda", seed=0)
        base = shipped_config(shape)
        base = dataclasses.replace(base, state=dataclasses.replace(base.state, output="fused"))
        variants = [base]
        for bv in (16, 32, 64):
            for warps in (4, 8):
                variants.append(dataclasses.replace(base, state=dataclasses.replace(
                    base.state, output="split", BV=bv, num_warps=warps)))
        for cfg in variants:
            row = {"shape": shape.label(), "config": cfg.label()}
            reason = infeasibility(cfg, shape)
            if reason:
                row["infeasible"] = reason
            else:
                try:
                    fn = ours(inp, cfg, shape)
                    fn()
                    row["ms"] = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
                except Exception as exc:  # noqa: BLE001 - an experiment: record and go on
                    row["error"] = repr(exc)[:300]
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            (args.out / "split.json").write_text(json.dumps(result, indent=1))
        del inp
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
