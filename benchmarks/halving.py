"""Does `tune.py tune --gpus 0,1` do one H200's tune in half the wall time? (issue 12 §3; GPU only, not a test)

    python benchmarks/halving.py [--op fwd] [--trials 6] [--shapes ...] [--runs ii,i,iii] [--cores 16]

The same tune, with a fixed number of trials per study and no time limit that could bind (so every run does the
same work and ends when each study has its trials), each into a throwaway run dir and table, three ways:

    (i)   --gpus 0   pinned to --cores logical CPUs (the one-H200 machine has 16; the two-H200 machine 32), taken
          as whole physical cores with their hyperthreads (--first-cores: the first --cores CPUs, as session 9's
          first run did): the issue's "one H200", whose gate workers are counted from the cores it may use
          (tuner.run.available_cores)
    (ii)  --gpus 0,1 on every core of this host
    (iii) --gpus 0   on every core of this host: the same-machine comparison

Each run gets its own empty Triton cache (TRITON_CACHE_DIR), so no run reuses another's compiles and the order does
not matter. The default: 4 forward suite shapes (more studies than GPUs, so that studies run in parallel), 6 trials
each, so that the three runs fit ~4.5 minutes on the two-H200 host (expected: ~100 s for (i) and (iii), ~60 s for
(ii)); with 6 trials no run has more trials per study than gate workers, so compiles take one wave in each. Give
--trials 16 to see (i)'s 14 gate workers take two waves where (iii)'s 30 take one. --limit caps each run (killed,
reported timed_out).

With --gpu-minutes X the runs are time-boxed as `tune.py tune` is by default instead: each gets X GPU-minutes of
budget (the wall time X on one GPU, X / 2 with --gpus 0,1) and --trials as its per-study cap, so the question is
whether two GPUs give each study as many timed trials and as good a best time in half the wall time (session 9
measured only the fixed-work comparison, 0.78x; a time-boxed run cannot be held up by one long study).

For each run one JSON line (also appended to $OUT/halving.jsonl when $OUT is set): the wall time, the run's own
"wall time by phase" (setup, search, finalize, roofs), the search time of each study (per search process with
--gpus 0,1), the gate workers, the timed trials, and per study the best time of the search and the final entry's
(re-timed) median. The run's log is copied to $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHAPES = ["8x4096x16x128x128:bf16", "16x2048x8x256x256:bf16", "4x4096x32x64x64:bf16",
                  "2x8192x16x128x256:bf16"]
RUNS = {"i": ("0", True), "ii": ("0,1", False), "iii": ("0", False)}  # name: (--gpus, pinned to --cores)
PHASES = re.compile(r"wall time by phase: (.*?) \(setup")
SEARCH_DONE = re.compile(r"^(\S+): search (?:taken by this process |joined by this process )?done in (\d+) s")
TRIAL_LINE = re.compile(r"^(\S+) #\d+: ")  # one per trial a process told (tuner.study.TrialEvent.line)


def emit(row: dict, out: Path | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        with open(out / "halving.jsonl", "a") as f:
            f.write(line + "\n")


def searches(text: str) -> list[list]:
    """[key, seconds] of every "search done" line of a log."""
    return [[m.group(1), int(m.group(2))] for line in text.splitlines() if (m := SEARCH_DONE.match(line.strip()))]


def physical_cores(cpus: list[int]) -> list[list[int]]:
    """``cpus`` grouped by physical core (the hyperthreads of one core together, as the kernel's topology lists
    them), in the order of each core's first logical CPU; one group per CPU where the topology is not readable."""
    groups: dict[tuple[str, str], list[int]] = {}
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            key = ((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip())
        except OSError:
            key = ("cpu", str(c))
        groups.setdefault(key, []).append(c)
    return list(groups.values())


def pinned_cpus(cpus: list[int], n: int) -> list[int]:
    """``n`` logical CPUs of ``cpus`` made of whole physical cores: a machine sold as n cores with hyperthreading
    is n / 2 physical cores and their siblings, so taking the first n logical CPUs of a host whose siblings are
    numbered apart (0-15 and 16-31) would give run (i) n physical cores, twice a one-H200 machine's."""
    use: list[int] = []
    for group in physical_cores(cpus):
        if len(use) + len(group) > n:
            break
        use += group
    return use or cpus[:n]


def run(name: str, args: argparse.Namespace, out: Path | None) -> None:
    gpus, pinned = RUNS[name]
    tag = f"{args.op}-{name}-{os.getpid()}"
    base = Path(f"/tmp/halving-{tag}")
    shutil.rmtree(base, ignore_errors=True)
    run_dir, table, cache, log_path = base / "run", base / "table.json", base / "triton-cache", base / "tune.log"
    cache.mkdir(parents=True)
    if args.gpu_minutes is None:  # fixed work: no time limit binds
        limits = ["--timeout", "3000", "--budget-minutes", "100"]
    else:  # time-boxed: the budget is GPU time, so two GPUs get half the wall time; --timeout stays its default
        limits = ["--budget-minutes", f"{args.gpu_minutes / len(gpus.split(',')):g}"]
    cmd = [sys.executable, str(ROOT / "tune.py"), "tune", "--op", args.op, "--gpus", gpus, "--trials", str(args.trials),
           *limits, "--no-progress", "--run-dir", str(run_dir), "--output", str(table), "--shapes", *args.shapes]
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache)}
    cores = sorted(os.sched_getaffinity(0))
    use = (cores[: args.cores] if args.first_cores else pinned_cpus(cores, args.cores)) if pinned else cores
    t0 = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log:
        # The tune and every process it starts inherit the affinity this process has when it starts the tune.
        os.sched_setaffinity(0, use)
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                    start_new_session=True)
        finally:
            os.sched_setaffinity(0, cores)
        try:
            rc = proc.wait(timeout=args.limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)
            rc = proc.wait()
    wall = time.monotonic() - t0
    text = log_path.read_text(errors="replace")
    row: dict = {"run": name, "op": args.op, "gpus": gpus, "cores": len(use), "cpus": use,
                 "physical_cores": len(physical_cores(use)), "rc": rc, "timed_out": timed_out,
                 "wall_s": round(wall, 1), "trials_per_study": args.trials, "gpu_minutes": args.gpu_minutes,
                 "shapes": args.shapes}
    m = PHASES.search(text)
    if m:
        row["phases_s"] = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", m.group(1))}
    row["study_search_s"] = searches(text)
    for child in sorted((run_dir / "logs").glob("search-gpu*.log")):
        child_text = child.read_text(errors="replace")
        row[f"study_search_s_{child.stem}"] = searches(child_text)
        # Trials each search process told per study: a study both GPUs took trials of was shared (issue 12).
        told: dict[str, int] = {}
        for line in child_text.splitlines():
            if m := TRIAL_LINE.match(line.strip()):
                told[m.group(1)] = told.get(m.group(1), 0) + 1
        row[f"trials_told_{child.stem}"] = told
    if table.exists():
        data = json.loads(table.read_text())
        trials = data.get("trials", [])
        row["gate_workers"] = data.get("budget", {}).get("gate_workers")
        row["timed_trials"] = sum(1 for t in trials if t.get("state") == "COMPLETE" and t.get("value_ms") is not None)
        best: dict[str, float] = {}
        timed: dict[str, int] = {}
        for t in trials:
            if t.get("value_ms") is not None:
                best[t["key"]] = min(best.get(t["key"], float("inf")), t["value_ms"])
                timed[t["key"]] = timed.get(t["key"], 0) + (t.get("state") == "COMPLETE")
        row["timed_trials_per_study"] = timed
        row["search_best_ms"] = best
        row["entry_p50_ms"] = {e.get("key", "?"): e.get("timing", {}).get("p50_ms") for e in data.get("entries", [])}
        row["table_wall_s"] = data.get("budget", {}).get("wall_s")
    emit(row, out)
    if out is not None:
        shutil.copy(log_path, out / f"halving-{name}.log")
    shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", default="fwd")
    ap.add_argument("--trials", type=int, default=6, help="evaluated trials per study (default 6)")
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="default: 4 forward suite shapes")
    ap.add_argument("--runs", default="ii,i,iii", help="which of i, ii, iii to run, in this order (default ii,i,iii)")
    ap.add_argument("--cores", type=int, default=16, help="cores of run (i), the one-H200 machine's (default 16)")
    ap.add_argument("--limit", type=float, default=150.0, help="seconds before a run is killed (default 150)")
    ap.add_argument("--gpu-minutes", type=float, default=None,
                    help="time-boxed runs: this many GPU-minutes each (wall time X on one GPU, X/2 on two) instead "
                         "of fixed work; raise --limit to cover it")
    ap.add_argument("--first-cores", action="store_true",
                    help="pin run (i) to the first --cores logical CPUs, whatever physical cores they are (session "
                         "9's first measurement); default: --cores logical CPUs made of whole physical cores")
    args = ap.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        ap.error(f"--runs: expected names of {list(RUNS)}, received {unknown}")
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for name in runs:
        run(name, args, out)


if __name__ == "__main__":
    main()
