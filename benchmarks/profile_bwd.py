"""Where the backward's time goes: torch.profiler over forward + backward of the public op at one shape (GPU).

    python benchmarks/profile_bwd.py [SHAPE]      # default the anchor, 8x4096x16x128x128 (bf16)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn2_tune import chunk_gdn2
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.tuner.suite import parse_shape


def main() -> int:
    shape = parse_shape(sys.argv[1] if len(sys.argv) > 1 else "8x4096x16x128x128")
    inp = make_inputs(shape, "cuda", seed=0)
    xs = [x.detach().clone().requires_grad_(True) for x in inp.args()]
    h0 = inp.initial_state.clone().requires_grad_(True)
    do = torch.randn_like(inp.v)

    def step() -> None:
        o, s = chunk_gdn2(*xs, initial_state=h0, output_final_state=True)
        torch.autograd.backward((o, s), (do, torch.ones_like(s)))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
