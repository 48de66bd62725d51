"""Where does the intra stage spend its time? Times source variants of kernels/intra.py with parts removed.

An experiment, not a product: each variant is the kernel's source with one section switched off by a text
substitution, written to a temporary module, and timed at the anchor shape.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kernels.config import FwdConfig, IntraConfig, Shape
from kernels.inputs import make_inputs

SRC = (ROOT / "kernels/intra.py").read_text()
T_LOOP = (
    ("        for i_k in range(tl.cdiv(K, BK)):\n            o_k = i_k * BK + tl.arange(0, BK)\n            m_k = o_k < K\n"
     "            m_ck"),
    ("        for i_k in range(0):\n            o_k = i_k * BK + tl.arange(0, BK)\n            m_k = o_k < K\n"
     "            m_ck"),
)
FALLBACK = ("            if span >= SAFE_SPAN:", "            if span >= SAFE_SPAN * 1e30 and False:")
DIAG = ("    for j in range(1, BC):", "    for j in range(1, 1):")
HORNER = ("    if NB > 1:\n        # (I + T)", "    if NB > 1000:\n        # (I + T)")
Y_LOOP = ("    # Y = A Ē, Q_γ, K_tail and γ_C, one K slice at a time.\n    for i_k in range(tl.cdiv(K, BK)):",
          "    # Y\n    for i_k in range(0):")
U_LOOP = ("    for i_v in range(tl.cdiv(V, BV)):", "    for i_v in range(0):")
VARIANTS = {
    "base": [],
    "no_fallback": [FALLBACK],
    "no_diag_inverse": [DIAG],
    "no_horner": [HORNER],
    "no_T_loop": [T_LOOP],
    "no_Y_loop": [Y_LOOP],
    "no_U_loop": [U_LOOP],
    "only_Y_U": [T_LOOP, DIAG, HORNER],
    "nothing": [T_LOOP, DIAG, HORNER, Y_LOOP, U_LOOP],
}


def load_variant(name: str, subs: list[tuple[str, str]]):
    src = SRC
    for old, new in subs:
        assert old in src, (name, old)
        src = src.replace(old, new)
    path = Path(f"/tmp/intra_{name}.py")
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"intra_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


shape = Shape(8, 4096, 16, 128, 128, "bf16")
inp = make_inputs(shape, "cuda", seed=0)
cfgs = [FwdConfig(32, IntraConfig(BC=16, BK=64, BV=64, num_warps=4, solve="tf32")),
        FwdConfig(64, IntraConfig(BC=16, BK=32, BV=64, num_warps=4, solve="tf32"))]
for name, subs in VARIANTS.items():
    mod = load_variant(name, subs)
    for cfg in cfgs:
        nchunks = shape.B * triton.cdiv(shape.T, cfg.chunk)

        def fn(mod=mod, cfg=cfg, nchunks=nchunks):
            return mod.intra_fwd(*inp.args(), scale=shape.K**-0.5, chunk=cfg.chunk, cfg=cfg.intra, cu_seqlens=None,
                                 chunk_indices=None, num_chunks=nchunks, use_qk_l2norm=False, out_dtype=inp.q.dtype)

        fn()
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        print(f"{name:16s} C{cfg.chunk} BK{cfg.intra.BK} w{cfg.intra.num_warps}: {ms:.3f} ms", flush=True)
