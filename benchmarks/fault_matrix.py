"""Run each config of a small matrix in its own subprocess (CUDA_LAUNCH_BLOCKING=1) and report which fault."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r'''
import sys, json, torch
sys.path.insert(0, ".")
from gdn2_tune.kernels.config import FwdConfig, Shape
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.chunk import chunk_gdn2
from gdn2_tune.kernels.reference import gdn2_reference
cfg = FwdConfig.from_dict(json.loads(sys.argv[1])); shape = Shape(**json.loads(sys.argv[2]))
inp = make_inputs(shape, "cuda", seed=0, strong_decay=len(sys.argv) > 3)
with torch.no_grad():
    o, s = chunk_gdn2(*inp.args(), initial_state=inp.initial_state, output_final_state=True, config=cfg)
    torch.cuda.synchronize()
    ro, rs = gdn2_reference(*inp.args(), initial_state=inp.initial_state, device="cuda")
e = lambda x, r: float((x.double() - r).norm() / r.norm())
print(json.dumps({"o": e(o, ro), "s": e(s, rs)}))
'''


def run(cfg: dict, shape: dict, strong: bool) -> dict:
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    argv = [sys.executable, "-c", CHILD, json.dumps(cfg), json.dumps(shape)] + (["strong"] if strong else [])
    try:
        p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "hang"}
    if p.returncode == 0:
        return {"status": "ok", **json.loads(p.stdout.strip().splitlines()[-1])}
    tail = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-3:]
    return {"status": "fail", "err": " | ".join(tail)[-400:]}


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from gdn2_tune.kernels.config import FwdConfig, IntraConfig, Shape, StateConfig, infeasibility

    jobs = []
    for shape in (Shape(2, 300, 3, 128, 128, "bf16"), Shape(2, 300, 3, 96, 80, "fp32")):
        for chunk in (32, 64, 128):
            for bc in (16, 32, 64):
                for nw in (4, 8):
                    for sbv, sst in ((32, 1), (64, 2)):
                        cfg = FwdConfig(chunk, IntraConfig(BC=bc, BK=32, BV=64, num_warps=nw, num_stages=1,
                                                           precision="tf32"), StateConfig(BV=sbv, num_stages=sst))
                        if infeasibility(cfg, shape) is None:
                            jobs.append((cfg, shape, shape.dtype == "fp32"))
    out = Path(os.environ.get("OUT", ".")) / "fault_matrix.jsonl"
    with cf.ThreadPoolExecutor(max_workers=10) as pool, out.open("w") as f:
        futs = {pool.submit(run, c.to_dict(), s.__dict__, st): (c, s, st) for c, s, st in jobs}
        for fut in cf.as_completed(futs):
            c, s, st = futs[fut]
            r = fut.result()
            line = {"shape": s.label(), "strong": st, "config": c.label(), **r}
            f.write(json.dumps(line) + "\n")
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
