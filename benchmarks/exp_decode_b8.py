"""Decode at B = 8: the table config against config-only candidates and the baseline (an experiment, not a test).

    python benchmarks/exp_decode_b8.py [--out DIR] [--rounds 7] [--guard-rounds 3] [--guard-candidates]
                                       [--candidates s12|s11]
    python benchmarks/exp_decode_b8.py --check-configs     # no GPU: each candidate's admissibility, then exit

Why: issue 13's bar "never slower than the baseline" failed only at B = 8 in session 10's run
(benchmarks/results/decode-serving-h200-2026-11-30-s10.jsonl, µs, ours / fla): K=V=128 cold 11.2 / 11.0, K=V=256
cold 24.3 / 23.9 and serving 21.4 / 21.2, by 1-2% (ours wins warm: 9.0 / 9.4 and 17.4 / 18.3). There both launches
are one or two waves, and the time is launch, the dependent memory round trips (slot index, then state) and the
ramp, not bandwidth. What the two launch at B = 8, H = 16 (registers read off ptxas for sm_90, triton 3.6):

    K=V   who     tile        warps stages programs regs  programs/SM  waves  state bytes/program
    128   fla     [128, 32]   4     2      512      96    5            0.78   16 KiB each way
    128   ours    [128, 16]   2     1      1024     64    16 (warps)   0.48    8 KiB
    256   fla     [256, 32]   4     2      1024     148   3            2.59   32 KiB
    256   ours    [256, 32]   4     1      1024     121   4            1.94   32 KiB

The baseline pipelines its token loop 2 deep (its T is not specialized, so at T = 1 the loop's prologue issues the
six input loads as cp.async together with the state's), keeps every load masked (no branch), and so lets ptxas
issue the input loads before the slot index arrives; ours (static dims) loads the state under a branch on the slot's
validity, after which come the inputs. The candidates (all existing DecodeConfig options; no kernel change):

- ``fla-grid`` (K=128): the baseline's tile and warps, BV=32 on 4 warps: half the programs, 128-byte rows (64
  registers; 96 pipelined). Every candidate compiles for sm_90 (triton 3.6) without spills.
- ``fla-grid-pipe`` (K=128) / ``pipe`` (K=256): that grid with the token loop pipelined 2 deep, the baseline's
  structure (K=256: 159 registers, 3 programs per SM as the baseline's 148).
- ``pipe`` (K=128): the table's tile, pipelined 2 deep (96 registers).
- ``masked``: the table config without static dims: no branch on the slot's validity, so the input loads may be
  issued before the slot index arrives, as in the baseline. Read off the sm_90 SASS at K=128, B=8: the table
  config issues the index load, branches, then the 8 LDG.128 of the state, then the inputs; ``masked`` issues the
  index load, then the inputs, then the state's predicated loads (the baseline: the index, its prologue's LDGSTS
  copies, then the state). 76 registers at K=128 (64 with static dims), 138 at K=256 (3 programs per SM).
- ``w4`` (K=128): the table's [128, 16] tile on 4 warps (48 registers): twice the loads in flight per program.
- ``w8`` (K=256): [256, 32] on 8 warps (64 registers, 4 programs per SM).
- ``narrow`` (K=256): [256, 16] on 2 warps (120 registers, 8 programs per SM, 2048 programs).
- ``stream``: the table config with evict_first on the state (serving mode: the inputs stay in L2).

Those were session 10's and 11's (``--candidates s11``; their figures are benchmarks/results/decode-b8-h200-*-s11*).
Session 12 first split each program's tile into two halves, both loaded up front (``halves``, a kernel change
in commit cd47bf8, reverted after this run: benchmarks/results/decode-halves-h200-2026-12-01-s12.jsonl): slower than
the table config at every point. Its config-only set (the default) caps the registers of ``masked`` (139 registers,
3 programs per SM at K=256) at 128 (4 per SM, no spills), also with the baseline's two-deep token pipeline and with
evict_first on the state, and the table config's at 96 (5 per SM, 24 bytes spilled); and, for the B = 1 guard,
``masked`` on the B = 1 table's [256, 16] tile (also with evict_first, and on 2 warps).

Timed as benchmarks/bench_decode.py's (d) times them, with its functions: "cold", one call per CUDA-graph replay with
L2 flushed (graph_times), and "serving", S steps per graph over a pool of at least 4x L2 (serving_times), in
alternating rounds (every callable once per round in both modes, the order rotated). Per point and callable the
summary gives the median over rounds of each round's p50 and the median of the per-round ratios to the baseline
timed in the same round (paired: drifts between rounds cancel), with the rounds it was faster than the baseline.
B = 8 takes --rounds; the guards B = 1 and B = 32 time the table config and the baseline (--guard-rounds), and the
candidates too with --guard-candidates (a B = 8 table entry serves neither: each has an entry of its own).

Before timing, each candidate is checked against the float64 recurrence (kernels/decode_reference.py) at B = 8 on
fresh random inputs: a pool with a padding row, an output buffer filled with NaN, the outputs and the stepped slots
within bench_decode's budgets, the padding row's outputs zero and the slots no index names bitwise unchanged. A
candidate that fails the check, is inadmissible or does not compile is reported and not timed.

One JSON line per check and measurement as it goes (appended to DIR/exp_decode_b8-INDEX.jsonl, INDEX the
--index-dtype), a summary per point, a
verdict per K (the candidates no slower than the baseline in both modes, fastest cold first), a table last, and
DIR/exp_decode_b8-INDEX.json (DIR: --out, else $OUT when set). About 2 minutes on an H200 with the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import (
    BF16_OUTPUT_BUDGET,
    FP32_STATE_BUDGET,
    HEADS,
    NAMES,
    SERVING_REPS,
    SERVING_STEPS,
    Problem,
    baseline_call,
    copy_bandwidth,
    dense,
    environment,
    graph_times,
    l2_bytes,
    load_baseline,
    serving_plan,
    serving_times,
    time_major_inputs,
)

from gdn2_tune.kernels.decode import fused_recurrent_gdn2
from gdn2_tune.kernels.decode_config import DecodeConfig, DecodeShape, decode_infeasibility, table_shape
from gdn2_tune.kernels.decode_reference import recurrence
from gdn2_tune.kernels.reference import rel_err

HEAD_DIMS = (128, 256)
TARGET_B = 8
GUARD_BATCHES = (1, 32)
ROUNDS = 7
GUARD_ROUNDS = 3
COLD_REPS = 30
MODES = ("cold", "serving")

# The table configs at B = 8 (profiles/h200.json, decode/K{K}-V{K}-bf16/T1-BH128, session 9's re-tune; also the
# built-in default there): the candidates are built from them, so that each differs from the table in what its name
# says. The run reports the config the dispatcher actually serves; a candidate equal to it is left out.
TABLE_B8 = {
    128: DecodeConfig(BV=32, num_warps=2, one_pass=True, batch_inputs=True),  # session 11's re-tune
    256: DecodeConfig(BV=32, num_warps=4, one_pass=True, static_dims=True, batch_inputs=True),
}
# Session 10's and 11's table config at K = 128, from which their candidates were built.
TABLE_B8_S11 = {**TABLE_B8, 128: DecodeConfig(BV=16, num_warps=2, one_pass=True, static_dims=True, batch_inputs=True)}
CANDIDATE_SETS = ("s12", "s11")


def candidates(K: int, which: str = "s12") -> dict[str, DecodeConfig]:
    """The candidates at K = V = ``K`` (see the module docstring for why each): session 12's register caps at
    K = 256 (registers read off ptxas for sm_90, triton 3.6; none at K = 128, whose table config beat the baseline
    in session 11), or session 10's and 11's set."""
    rep = dataclasses.replace
    if which == "s12":
        base = TABLE_B8[K]
        if K == 128:
            return {}
        masked = rep(base, static_dims=False)
        return {
            "masked": masked,  # session 11's near tie with the baseline; 139 registers, 3 programs per SM
            "masked-r128": rep(masked, max_registers=128),  # 128, no spills: 4 per SM
            "static-r128": rep(base, max_registers=128),  # the tuner's choice with int32 indices (123 registers)
            "masked-pipe-r128": rep(masked, num_stages=2, max_registers=128),  # the baseline's structure, 4 per SM
            "masked-stream-r128": rep(masked, stream_state=True, max_registers=128),  # 127
            "static-r96": rep(base, max_registers=96),  # 24 bytes of spills: 5 per SM
            # for the B = 1 guard, whose table config is [256, 16] on 4 warps with static dims (72 registers)
            "narrow-masked": rep(masked, BV=16),  # 80
            "narrow-masked-stream": rep(masked, BV=16, stream_state=True),
            "narrow-masked-w2": rep(masked, BV=16, num_warps=2),
        }
    base = TABLE_B8_S11[K]
    if K == 128:
        return {
            "fla-grid": rep(base, BV=32, num_warps=4),
            "fla-grid-pipe": rep(base, BV=32, num_warps=4, num_stages=2),
            "pipe": rep(base, num_stages=2),
            "masked": rep(base, static_dims=False),
            "w4": rep(base, num_warps=4),
            "stream": rep(base, stream_state=True),
            # session 11: the two best of session 10's run together, and 256-byte rows
            "fla-grid-masked": rep(base, BV=32, num_warps=4, static_dims=False),
            "wide": rep(base, BV=64, num_warps=4),
            "wide-masked": rep(base, BV=64, num_warps=4, static_dims=False),
        }
    return {
        "pipe": rep(base, num_stages=2),
        "masked": rep(base, static_dims=False),
        "w8": rep(base, num_warps=8),
        "narrow": rep(base, BV=16, num_warps=2),
        "stream": rep(base, stream_state=True),
        # session 11: masked with more warps, and the B = 32 entry's 256-byte rows
        "masked-w8": rep(base, num_warps=8, static_dims=False),
        "wide": rep(base, BV=64, num_warps=8),
        "wide-masked": rep(base, BV=64, num_warps=8, static_dims=False),
    }


_jsonl: Path | None = None
# The dtype of the slot indices passed to every callable (--index-dtype). Serving passes int32 (vLLM's state
# indices; the tuner's DecodeRun), torch's default is int64 (every run before session 12's used it). At K=V=256,
# B=8 the configs with static dims ran ~3% slower with int64 indices and the masked ones did not
# (benchmarks/exp_decode_protocol.py).
INDEX_DTYPES = {"int64": torch.int64, "int32": torch.int32}
_index_dtype = "int64"


def emit(row: dict) -> None:
    """Print one JSON line (flushed) and append it to the run's .jsonl file when there is one."""
    line = json.dumps(row)
    print(line, flush=True)
    if _jsonl is not None:
        with _jsonl.open("a") as f:
            f.write(line + "\n")


def shape_of(N: int, K: int) -> DecodeShape:
    return DecodeShape(N, 1, HEADS, K, K, "bf16", "fp32")


def table_config(N: int, K: int) -> tuple[DecodeConfig, str]:
    """The config the public op serves at (N, K) on this GPU, and where it came from (profiles/dispatch.py)."""
    from gdn2_tune.profiles.dispatch import explain

    choice = explain(table_shape(shape_of(N, K)), "decode")
    return choice.config, f"{choice.source}:{choice.key}" if choice.key else choice.source


def check_configs(which: str) -> list[dict]:
    """Each candidate's admissibility at B = 8 and at the guards (no GPU)."""
    rows = []
    for K in HEAD_DIMS:
        for name, cfg in {"table": TABLE_B8[K], **candidates(K, which)}.items():
            row = {"kind": "admissible", "K": K, "impl": name, "config": cfg.label()}
            for N in (TARGET_B, *GUARD_BATCHES):
                row[f"B{N}"] = decode_infeasibility(cfg, shape_of(N, K)) or "ok"
            rows.append(row)
            emit(row)
    return rows


def reference_check(K: int, name: str, cfg: DecodeConfig, seed: int) -> dict:
    """One T = 1 step of ``cfg`` at B = 8 on fresh random inputs against the float64 recurrence: a pool of 2N + 3
    slots, one padding row (index -1), ``out`` NaN-filled; outputs, stepped slots, padding row, untouched slots."""
    N, H, V = TARGET_B, HEADS, K
    rows = N + 1
    inp = time_major_inputs(1, rows, H, K, V, seed=seed)
    args = [inp[n][0] for n in NAMES]  # [rows, 1, H, D]
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    pool_size = 2 * N + 3
    pool = 0.1 * torch.randn(pool_size, H, K, V, generator=gen, device="cuda")
    slots = torch.randperm(pool_size, generator=gen, device="cuda")[:N]
    idx = torch.cat([slots, torch.tensor([-1], device="cuda")]).to(INDEX_DTYPES[_index_dtype])
    before = pool.clone()
    out = torch.full_like(args[2], float("nan"))
    row: dict = {"kind": "check", "K": K, "B": N, "impl": name, "config": cfg.label()}
    try:
        fused_recurrent_gdn2(*args, scale=K**-0.5, initial_state=pool, inplace_final_state=True,
                             ssm_state_indices=idx, out=out, config=cfg)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a candidate that fails to compile or launch is a result
        return {**row, "ok": False, "error": repr(exc)[:300]}
    ref_o, ref_states = recurrence(*(dense(inp[n])[:N] for n in NAMES), before[slots].double(), scale=K**-0.5)
    named = torch.zeros(pool_size, dtype=torch.bool, device="cuda")
    named[slots] = True
    row.update({
        "err_o": rel_err(out[:N], ref_o), "err_state": rel_err(pool[slots], ref_states[:, -1]),
        "padding_row_zero": bool((out[N] == 0).all()),
        "untouched_slots_bitwise": bool(torch.equal(pool[~named].view(torch.int32), before[~named].view(torch.int32))),
    })
    row["ok"] = bool(row["err_o"] < BF16_OUTPUT_BUDGET and row["err_state"] < FP32_STATE_BUDGET
                     and row["padding_row_zero"] and row["untouched_slots_bitwise"])
    return row


def time_point(K: int, N: int, impls: dict[str, DecodeConfig], baseline: Callable | None, rounds: int,
               bw: float, serving_steps: int, note: dict) -> dict:
    """bench_decode.py's (d) at one point for several configs and the baseline, in alternating rounds."""
    step_bytes = N * HEADS * K * K * 4
    sets, S = serving_plan(step_bytes, serving_steps, l2_bytes())
    p = Problem(N, K, ranges=sets)
    p.sets = p.sets.to(INDEX_DTYPES[_index_dtype])  # the baseline is passed the same index tensors
    p.idx = p.sets[0]
    point = {"K": K, "B": N, "steps_per_graph": S, "slot_sets": sets}
    makers: dict[str, Callable[[torch.Tensor], Callable[[], object]]] = {
        name: (lambda idx, cfg=cfg, p=p: p.ours(cfg, idx)) for name, cfg in impls.items()}
    labels = {name: cfg.label() for name, cfg in impls.items()}
    if baseline is not None:
        try:
            baseline_call(baseline, p)()
            makers["fla"] = lambda idx, p=p: baseline_call(baseline, p, idx)
            labels["fla"] = "fused_recurrent_gdn2_fwd"
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot be called is a result
            emit({"kind": "skip", **point, "impl": "fla", "why": repr(exc)[:300]})
    calls = [(name, mode) for name in makers for mode in MODES]
    times: dict[tuple[str, str], list[float | None]] = {c: [] for c in calls}
    for r in range(rounds):
        for name, mode in calls[r % len(calls):] + calls[: r % len(calls)]:
            try:
                if mode == "cold":
                    t = graph_times(makers[name](p.idx), COLD_REPS, eager=False)
                else:
                    t = serving_times([makers[name](p.sets[s % sets]) for s in range(S)], SERVING_REPS)
            except Exception as exc:  # noqa: BLE001 - recorded; the other callables still run
                emit({"kind": "error", **point, "round": r, "impl": name, "mode": mode, "error": repr(exc)[:300]})
                times[(name, mode)].append(None)
                continue
            times[(name, mode)].append(t["p50"])
            emit({"kind": "time", **point, "round": r, "impl": name, "config": labels[name], "mode": mode,
                  **{f"{q}_us": round(t[q], 3) for q in ("p20", "p50", "p80")},
                  **({"warm_p50_us": round(t["warm_p50"], 3)} if "warm_p50" in t else {})})
    floor_us = 2 * step_bytes / bw * 1e6
    summary: dict = {"kind": "summary", **point, **note, "rounds": rounds, "floor_us": round(floor_us, 3), "impls": {}}
    for name in makers:
        entry: dict = {"config": labels[name]}
        for mode in MODES:
            ts = [t for t in times[(name, mode)] if t is not None]
            if not ts:
                continue
            entry[f"{mode}_us"] = round(statistics.median(ts), 3)
            entry[f"{mode}_x_floor"] = round(entry[f"{mode}_us"] / floor_us, 3)
            if "fla" in makers and name != "fla":
                pairs = [a / b for a, b in zip(times[(name, mode)], times[("fla", mode)], strict=True)
                         if a is not None and b is not None]
                if pairs:
                    entry[f"{mode}_vs_fla"] = round(statistics.median(pairs), 4)
                    entry[f"{mode}_rounds_faster"] = f"{sum(x < 1 for x in pairs)}/{len(pairs)}"
        summary["impls"][name] = entry
    emit(summary)
    del p
    torch.cuda.empty_cache()
    return summary


def verdict(summary: dict) -> dict:
    """The callables no slower than the baseline in both modes (median paired ratio ≤ 1), fastest cold first."""
    im = summary["impls"]
    good = [(name, e) for name, e in im.items() if name != "fla"
            and all(e.get(f"{m}_vs_fla", float("inf")) <= 1.0 for m in MODES)]
    good.sort(key=lambda ne: (ne[1]["cold_vs_fla"], ne[1]["serving_vs_fla"]))
    return {"kind": "verdict", "K": summary["K"], "B": summary["B"],
            "table_ok": "table" in dict(good),
            "no_slower_than_fla": [{"impl": n, "config": e["config"], "cold_vs_fla": e["cold_vs_fla"],
                                    "serving_vs_fla": e["serving_vs_fla"]} for n, e in good]}


def print_table(summaries: list[dict]) -> None:
    print("\nT=1, H=16, fp32 state in place; µs per step (median over rounds of each round's p50) and the median "
          "paired ratio to fla in the same round [rounds faster]. cold: one call per replay, L2 flushed; serving: S "
          "steps per graph over a pool of >= 4x L2")
    print(f"  {'K=V':>4} {'B':>3} {'impl':<14} {'cold µs':>8} {'vs fla':>14} {'serving µs':>10} {'vs fla':>14}  config")
    for s in summaries:
        for name, e in s["impls"].items():
            def cell(mode: str, e: dict = e) -> str:
                r = e.get(f"{mode}_vs_fla")
                return f"{r:.3f} [{e[f'{mode}_rounds_faster']}]" if r is not None else "-"

            print(f"  {s['K']:>4} {s['B']:>3} {name:<14} {e.get('cold_us', float('nan')):8.2f} {cell('cold'):>14} "
                  f"{e.get('serving_us', float('nan')):10.2f} {cell('serving'):>14}  {e['config']}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="directory for exp_decode_b8-INDEX.json and .jsonl (default: $OUT; none: print only)")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="alternating rounds at B = 8")
    ap.add_argument("--guard-rounds", type=int, default=GUARD_ROUNDS, help="alternating rounds at B = 1 and 32")
    ap.add_argument("--guard-candidates", action="store_true", help="time the candidates at the guards too")
    ap.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)), help="comma-separated subset of 128,256")
    ap.add_argument("--serving-steps", type=int, default=SERVING_STEPS, help="decode steps per graph (at least)")
    ap.add_argument("--check-configs", action="store_true", help="print each candidate's admissibility and exit")
    ap.add_argument("--index-dtype", choices=tuple(INDEX_DTYPES), default="int64",
                    help="dtype of the slot indices every callable is passed (int32: as serving passes them)")
    ap.add_argument("--candidates", choices=CANDIDATE_SETS, default=CANDIDATE_SETS[0],
                    help="session 12's split tiles (default) or session 10's and 11's config-only set")
    args = ap.parse_args(argv)
    global _jsonl, _index_dtype
    _index_dtype = args.index_dtype
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        _jsonl = args.out / f"exp_decode_b8-{args.index_dtype}.jsonl"
    if args.check_configs:
        check_configs(args.candidates)
        return
    head_dims = tuple(int(x) for x in args.head_dims.split(",") if x)
    if not head_dims or set(head_dims) - set(HEAD_DIMS):
        ap.error(f"--head-dims: expected a comma-separated subset of {list(HEAD_DIMS)}, received {args.head_dims!r}")
    t_start = time.time()
    env = environment()
    emit({"kind": "env", **env, "index_dtype": _index_dtype})
    baseline, signature = load_baseline()
    emit({"kind": "baseline", "signature": signature})
    bw = copy_bandwidth()
    emit({"kind": "copy_roof", "bytes_per_s": bw})

    checks, summaries, verdicts = [], [], []
    for K in head_dims:
        served, source = table_config(TARGET_B, K)
        if served != TABLE_B8[K]:
            emit({"kind": "note", "K": K, "B": TARGET_B, "served": served.label(), "source": source,
                  "expected": TABLE_B8[K].label(), "why": "the dispatcher serves another config than this script's "
                  "table config; the candidates are built from the expected one and 'table' times the served one"})
        cands = {}
        for name, cfg in candidates(K, args.candidates).items():
            reason = decode_infeasibility(cfg, shape_of(TARGET_B, K))
            if cfg == served or reason is not None:
                emit({"kind": "skip", "K": K, "B": TARGET_B, "impl": name, "config": cfg.label(),
                      "why": reason or "the table's own config"})
                continue
            row = reference_check(K, name, cfg, seed=100 + K)
            checks.append(row)
            emit(row)
            if row["ok"]:
                cands[name] = cfg
        summary = time_point(K, TARGET_B, {"table": served, **cands}, baseline, args.rounds, bw, args.serving_steps,
                             {"table_source": source})
        summaries.append(summary)
        if "fla" in summary["impls"]:
            verdicts.append(verdict(summary))
            emit(verdicts[-1])
        for N in GUARD_BATCHES:
            g_served, g_source = table_config(N, K)
            impls = {"table": g_served}
            if args.guard_candidates:
                impls |= {name: cfg for name, cfg in cands.items()
                          if cfg != g_served and decode_infeasibility(cfg, shape_of(N, K)) is None}
            summaries.append(time_point(K, N, impls, baseline, args.guard_rounds, bw, args.serving_steps,
                                        {"table_source": g_source}))
    result = {"env": env, "baseline_signature": signature, "copy_bytes_per_s": bw, "checks": checks,
              "summaries": summaries, "verdicts": verdicts, "seconds": round(time.time() - t_start, 1)}
    print_table(summaries)
    for v in verdicts:
        best = ", ".join(f"{b['impl']} ({b['config']})" for b in v["no_slower_than_fla"]) or "none"
        print(f"\nK=V={v['K']}, B={v['B']}: table config no slower than fla in both modes: {v['table_ok']}; "
              f"no slower in both: {best}")
    if args.out is not None:
        path = args.out / f"exp_decode_b8-{args.index_dtype}.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"\n{path} written in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
