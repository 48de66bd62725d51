"""Two tables (or a table and the dispatcher's fallback), optionally fla, timed in one run on one card (GPU only).

    python benchmarks/compare_tables.py --new profiles/h200.json --old profiles/h100-80gb-hbm3.json --out DIR [--fla]

For each suite shape: the config the dispatcher serves with ``GDN2_PROFILE`` set to each table (the old one is
what a GPU without its own table is served through the family fallback), both timed through the public op on the
same inputs, alternating old/new for several rounds so that clock drift hits both; with ``--fla``, the baseline
too (its first call autotunes, about a minute per shape). Writes DIR/compare.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_fwd import baseline, bench, environment, ours

from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.profiles import dispatch
from gdn2_tune.tuner.suite import SUITE, parse_shape

ROUNDS = 3


def served(table: Path, shape) -> object:
    os.environ[dispatch.ENV_PROFILE] = str(table)
    dispatch.clear_cache()
    return dispatch.select_config(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=Path, required=True)
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--fla", action="store_true", help="time fla's chunk_gdn2 too")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=SUITE, metavar="SHAPE")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes:
        new_cfg, old_cfg = served(args.new, shape), served(args.old, shape)
        inp = make_inputs(shape, "cuda", seed=0)
        times: dict[str, list[float]] = {"new": [], "old": []}
        for _ in range(ROUNDS):
            times["old"].append(bench(ours(inp, old_cfg, shape))[1])
            times["new"].append(bench(ours(inp, new_cfg, shape))[1])
        row = {"shape": shape.label(), "new_config": new_cfg.label(), "old_config": old_cfg.label(),
               "new_ms": sorted(times["new"])[ROUNDS // 2], "old_ms": sorted(times["old"])[ROUNDS // 2],
               "rounds": times}
        if args.fla:
            try:
                row["fla_ms"] = bench(baseline(inp))[1]
            except Exception as exc:  # noqa: BLE001 - the baseline is optional; record why it is missing
                row["fla_error"] = repr(exc)[:200]
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "compare.json").write_text(json.dumps({"env": environment(), "new": str(args.new),
                                                           "old": str(args.old), "rows": rows}, indent=1))
        del inp
        torch.cuda.empty_cache()
    print(f"\n{'shape':40s} {'new ms':>8s} {'old ms':>8s} {'new/old':>8s} {'fla ms':>8s} {'fla/new':>8s}")
    for r in rows:
        fla = r.get("fla_ms")
        print(f"{r['shape']:40s} {r['new_ms']:8.3f} {r['old_ms']:8.3f} {r['new_ms'] / r['old_ms']:8.3f} "
              + (f"{fla:8.3f} {fla / r['new_ms']:8.2f}" if fla else ""))


if __name__ == "__main__":
    main()
