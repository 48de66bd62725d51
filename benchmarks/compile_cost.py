"""What a first training step at the anchor compiles, and what each compile costs (no GPU needed).

    python benchmarks/compile_cost.py [--threads N]

Records every Triton specialization that a forward + backward at the anchor (B=8, T=4096, H=16, K=V=128, bf16, the
H200 table's forward config, the built-in backward config) would compile, by running the launchers on CPU tensors
with a stand-in sm90 driver and Triton's jit_cache_hook skipping every compile; then compiles each for sm90 in a
fresh TRITON_CACHE_DIR, timing the front end and each lowering stage (Triton's compilation listener) and reading
registers and stack (spills) from the cubin. With --threads N it instead times kernels/compile_ahead.py's dry run
(all compiles in N threads). Needs Triton >= 3.4 with its NVIDIA backend (ptxas ships in the wheel) and TRITON_INTERPRET
unset. One JSON line per kernel, then the total.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="gdn2-compile-cost-"))

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget

TARGET = GPUTarget("cuda", 90, 32)


class StandInDriver:
    """Enough of a driver for the JIT to bind arguments and pick the sm90 target (nothing is launched)."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return TARGET


def anchor_step() -> tuple:
    from gdn2_tune.kernels.chunk import forward_launch
    from gdn2_tune.kernels.chunk_bwd import backward_launch, default_bwd_config
    from gdn2_tune.kernels.config import FwdConfig, IntraConfig, Shape, StateConfig

    B, T, H, K, V = 8, 4096, 16, 128, 128
    # profiles/h200.json, fwd/K128-V128-bf16/T4096-BH128 (2026-11-30).
    cfg = FwdConfig(32, IntraConfig(16, 64, 128, 2, 1, "tf32"), StateConfig(64, 4, 3, "input", "fused"))
    bcfg = default_bwd_config(Shape(B, T, H, K, V, "bf16"))
    q, k, g, b = (torch.zeros(B, T, H, K, dtype=torch.bfloat16) for _ in range(4))
    v, w = (torch.zeros(B, T, H, V, dtype=torch.bfloat16) for _ in range(2))
    h0 = torch.zeros(B, H, K, V)

    def step() -> None:
        _, ht = forward_launch(q, k, v, g, b, w, scale=K**-0.5, initial_state=h0, output_final_state=True,
                               cu_seqlens=None, use_qk_l2norm_in_kernel=False, config=cfg, num_seqs=B)()
        backward_launch(q, k, v, g, b, w, torch.empty_like(v), ht, scale=K**-0.5, initial_state=h0, cu_seqlens=None,
                        use_qk_l2norm_in_kernel=False, config=cfg, bwd_config=bcfg, num_seqs=B)()

    return step


def record(step) -> list[tuple]:
    """(JITFunction, specialization data) of every distinct compile ``step`` asks for (none is compiled)."""
    seen: dict[str, tuple] = {}

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        seen.setdefault(compile["specialization_data"], (fn.jit_function, compile["specialization_data"]))
        return True

    knobs.runtime.jit_cache_hook = hook
    try:
        step()
    finally:
        knobs.runtime.jit_cache_hook = None
    return list(seen.values())


def compile_one(fn, spec: str) -> dict:
    import triton.language as tl
    from triton.compiler import ASTSource

    d = json.loads(spec)
    constexprs = {
        tuple(k): tl.dtype(v) if tl.dtype.is_dtype(v) else tl.constexpr(v["constexpr"])
        if isinstance(v, dict) and "constexpr" in v else v
        for k, v in zip(d["constant_keys"], d["constant_vals"])
    }
    attrs = dict(zip(map(tuple, d["attrs_keys"]), d["attrs_vals"]))
    signature = {k: tuple(v) if isinstance(v, list) else v for k, v in d["signature"].items()}
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in d["options"].items()}
    times: dict = {}

    def listener(*, src, metadata, metadata_group, times: knobs.CompileTimes, cache_hit) -> None:
        out = {"front_ms": times.ir_initialization / 1e3}
        out |= {f"{name}_ms": t / 1e3 for name, t in times.lowering_stages}
        globals()["_times"] = out

    knobs.compilation.listener = listener
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options)
    wall = time.perf_counter() - t0
    knobs.compilation.listener = None
    times = globals().get("_times", {})
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=False).stdout
    fields = dict(x.split(":") for x in next((ln for ln in usage.splitlines() if "REG:" in ln), "").split()[-9:]
                  if ":" in x)
    return {"kernel": fn.fn.__name__, "num_warps": options["num_warps"], "num_stages": options["num_stages"],
            "wall_s": round(wall, 3), **{k: round(v) for k, v in times.items()},
            "regs": int(fields.get("REG", -1)), "stack_bytes": int(fields.get("STACK", -1)),
            "shared_bytes": kernel.metadata.shared}


def relaunch(kernels) -> tuple[float, int]:
    """Build again, one after another as the first launches would (``launcher_cls(src, metadata)``), the launcher of
    every kernel the JIT functions ``kernels`` hold compiled: (seconds, builds that raised). Without a GPU a
    stand-in libcuda must be on LD_LIBRARY_PATH for a launcher to load; one that cannot load raises after being
    built again, as Triton rebuilds a cached launcher it cannot load."""
    launcher = triton.runtime.driver.active.launcher_cls
    compiled = []
    for fn in kernels:
        for cache in getattr(fn, "device_caches", {}).values():
            for kernel in cache[0].values():
                kernel = kernel.result(True) if hasattr(kernel, "result") else kernel
                if kernel is not None:
                    compiled.append(kernel)
    raised = 0
    t0 = time.perf_counter()
    for kernel in compiled:
        try:
            launcher(kernel.src, kernel.metadata)
        except Exception:  # noqa: BLE001 (counted: see the docstring)
            raised += 1
    return time.perf_counter() - t0, raised


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="time the compile-ahead dry run in N threads instead")
    parser.add_argument("--launchers", action="store_true",
                        help="with --threads: the dry run also builds the kernels' launchers (Triton's CUDA launcher "
                             "class; needs libcuda: without a GPU a stand-in one on TRITON_LIBCUDA_PATH and LD_LIBRARY_PATH), then times "
                             "building them again, as the first launches would, from the cache")
    args = parser.parse_args()
    driver = StandInDriver()
    if args.launchers:
        from triton.backends.nvidia.driver import CudaLauncher

        driver.launcher_cls = CudaLauncher  # type: ignore[attr-defined]
    triton.runtime.driver.set_active(driver)
    step = anchor_step()
    if args.threads:
        from gdn2_tune.kernels import compile_ahead

        cache = Path(os.environ["TRITON_CACHE_DIR"])
        t0 = time.perf_counter()
        compile_ahead.compile_in_threads(step, compile_ahead.package_kernels(), workers=args.threads)
        row = {"compile_ahead_threads": args.threads, "wall_s": round(time.perf_counter() - t0, 2)}
        if args.launchers:
            row["launchers_in_cache"] = len(list(cache.rglob("__triton_launcher*.so")))
            seconds, raised = relaunch(compile_ahead.package_kernels())
            row["first_launches_s"], row["first_launches_raised"] = round(seconds, 2), raised
        print(json.dumps(row))
        return 0
    total = 0.0
    for fn, spec in record(step):
        row = compile_one(fn, spec)
        total += row["wall_s"]
        print(json.dumps(row), flush=True)
    print(json.dumps({"total_s": round(total, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
