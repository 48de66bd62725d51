"""Does `tune.py tune --gpus 0,1` do one GPU's search in half the wall time? (issue 12 §3; GPU only, not a test)

    python benchmarks/halving.py [--op decode] [--trials 24] [--shapes ...] [--order 0,1 0]

Runs the same tune twice, each into a throwaway run dir and table: on two GPUs (``--gpus 0,1``) and on one
(``--gpus 0``), with a fixed number of trials per study and no time limit that could bind, so both runs do the same
work and end when every study has its trials. By default the two-GPU run goes first, with a cold Triton cache: the
one-GPU run then reuses its compiles, which favours the one-GPU run, so a measured halving is not flattered.

For each run: the wall time, and per study the trials that were timed, the trials per minute of search, and the
best time found (from the run's table and journal). One JSON line each, also to $OUT/halving.jsonl when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def emit(row: dict, out: Path | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        with open(out / "halving.jsonl", "a") as f:
            f.write(line + "\n")


def run(gpus: str, args: argparse.Namespace, out: Path | None) -> None:
    tag = gpus.replace(",", "-")
    run_dir, table = Path(f"/tmp/halving-{args.op}-{tag}"), Path(f"/tmp/halving-{args.op}-{tag}.json")
    cmd = [sys.executable, str(ROOT / "tune.py"), "tune", "--op", args.op, "--gpus", gpus, "--trials", str(args.trials),
           "--timeout", "1000", "--budget-minutes", "60", "--no-progress", "--run-dir", str(run_dir),
           "--output", str(table)]
    if args.shapes:
        cmd += ["--shapes", *args.shapes]
    t0 = time.monotonic()
    with open(f"/tmp/halving-{args.op}-{tag}.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.monotonic() - t0
    row: dict = {"op": args.op, "gpus": gpus, "rc": rc, "wall_s": round(wall, 1), "trials_per_study": args.trials}
    if table.exists():
        data = json.loads(table.read_text())
        trials = data.get("trials", [])
        row["timed_trials"] = sum(1 for t in trials if t.get("state") == "COMPLETE" and t.get("value_ms") is not None)
        row["trial_records"] = len(trials)
        row["entries"] = {e.get("key", "?"): e.get("timing", {}).get("p50_ms") for e in data.get("entries", [])}
        row["table_wall_s"] = data.get("budget", {}).get("wall_s")
    emit(row, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", default="decode", help="the op to tune (decode: short compiles, so timing dominates)")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--shapes", nargs="*", default=None, help="default: the op's suite")
    ap.add_argument("--order", nargs="*", default=["0,1", "0"], help="--gpus values, run in this order")
    args = ap.parse_args()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    for gpus in args.order:
        run(gpus, args, out)


if __name__ == "__main__":
    main()
