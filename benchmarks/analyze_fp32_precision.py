"""fp32 forward numerics: which tensor-core dot drives the output error under TF32 (CPU model, no GPU needed).

    python benchmarks/analyze_fp32_precision.py [--out DIR] [--groups ...] [--search]
    python benchmarks/analyze_fp32_precision.py --probe-gpu      # on a GPU: how tl.dot(tf32) rounds its operands

A float32 torch model of the forward at its default tiling (C=32, BC=16, BK=64) that follows the kernels' own
factoring, so that operand rounding lands where the kernels round (kernels/intra.py, kernels/state.py), in the
symbols of ../shared/GDN2.md:

    intra  T_blk   = [b k exp(G_r − ref_I)]_r · [k exp(ref_I − G_s)]_sᵀ     row block I, K slices of BK  ("T")
           Aqk_blk = [scale q exp(G_r − ref_I)]_r · (same column factor)ᵀ                               ("Aqk")
           diagonal blocks of (I + T): (I − P)(I + P²)(I + P⁴)(I + P⁸), always ieee                       (fp32)
           N = D L                                                                                      ("N")
           A = D − N A   (NB − 1 times)                                                                 ("horner")
           Y = A Ē                                                                                      ("Y")
           U = A Z                                                                                      ("U")
    state  R = U − Y S0                                                                                 ("YS")
           O = Q_γ S0 + A_qk R                                                                    ("QS", "AR")
           S_C = Diag(γ_C) S0 + K_tailᵀ R                                                             ("KR")

Each dot runs in one of (see Arith): "fp32" (exact fp32 products, fp32 sums), "tf32" (both operands cut to TF32,
10 mantissa bits, by truncation as the tensor cores read raw fp32 operands; fp32 sums), "tf32rn" (operands rounded
to nearest in the kernel, then a TF32 dot) and "tf32x3" (Triton's split: hi = rna(x), lo = x − hi, three dots). The output error is
the relative Frobenius error against the float64 recurrence on the accuracy inputs of benchmarks/exp_fp32.py
(B=2, T=2048, H=4, K=V=128, seed 3, random initial state, normal and strong decay).

Prints one JSON line per measurement (flushed) and writes DIR/fp32_precision.json when --out or $OUT is set.
A run of the default groups takes a few minutes on a CPU, most of it the float64 reference (--ref-cache keeps it).

Findings (benchmarks/results/fp32-precision-model-cpu.jsonl; seed 5 gives the same to two digits):
- With truncating TF32 operands the model reproduces the H200's measured errors (benchmarks/exp_fp32.py) to two or
  three digits: all TF32 1.74e-3 / 1.13e-3 (normal / strong decay), 3xTF32 intra 8.1e-4 / 7.7e-4, 3xTF32 state
  1.03e-3 / 4.2e-4. Round-to-nearest operands would give 4.5e-4 / 3.6e-4 instead: the error is the truncation's
  bias (every operand shrunk by ~2^-11 relative, coherently), not TF32's precision.
- Only A_qk and U (intra), and A_qk R, Q_γ S0 and K_tailᵀ R (state) carry it. T, the assembly of A (N, Horner), Y
  and Y S0 change the output error by < 1% when made exact.
- Cheapest fix: round to nearest (cvt.rna.tf32.f32) the operands of those dots only: A_qk's two factors and Z in
  the intra stage, the loaded Q_γ, A_qk, K_tail tiles and R in the state pass (not S0): 4.8e-4 / 3.6e-4, no
  extra tensor-core pass. 3xTF32 on the A_qk and U dots alone matches today's default (8.1e-4 / 7.7e-4).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.reference import gdn2_reference, rel_err

ACCURACY = Shape(2, 2048, 4, 128, 128, "fp32")
SEED = 3  # benchmarks/exp_fp32.py's accuracy inputs
C, BC, BK = 32, 16, 64  # the default tiling (kernels/config.py DEFAULT_CONFIG)
NB = C // BC
SAFE_SPAN = 80.0  # kernels/intra.py
G_FLOOR = -110.0  # kernels/intra.py

INTRA_DOTS = ("T", "Aqk", "N", "horner", "Y", "U")
STATE_DOTS = ("YS", "QS", "AR", "KR")
DOTS = INTRA_DOTS + STATE_DOTS


def dot_flops(K: int = 128, V: int = 128) -> dict[str, int]:
    """Tensor-core FLOPs of each dot per (chunk, head) at the default tiling, as the kernels issue them."""
    return {
        "T": NB * (BC * C * K * 2),  # one [BC, K] x [K, C] product per row block (the full C columns, masked after)
        "Aqk": NB * (BC * C * K * 2),  # same shape as T
        "N": C * C * C * 2,  # [C, C] x [C, C]
        "horner": (NB - 1) * C * C * C * 2,  # NB - 1 products [C, C] x [C, C]
        "Y": C * C * K * 2,  # [C, C] x [C, K]
        "U": C * C * V * 2,  # [C, C] x [C, V]
        "YS": C * K * V * 2,  # [C, K] x [K, V]
        "QS": C * K * V * 2,  # [C, K] x [K, V]
        "AR": C * C * V * 2,  # [C, C] x [C, V]
        "KR": K * C * V * 2,  # [K, C] x [C, V]
    }


def dot_operand_elements(K: int = 128, V: int = 128) -> dict[str, int]:
    """fp32 operand elements each dot splits into hi/lo under 3xTF32, per (chunk, head), as the kernels load them
    (a state dot's [K, V] state operand counted once per chunk)."""
    return {
        "T": NB * (BC * K + K * C),
        "Aqk": NB * (BC * K + K * C),
        "N": 2 * C * C,
        "horner": (NB - 1) * 2 * C * C,
        "Y": (K // BK) * C * C + C * K,  # A is reloaded per K slice
        "U": C * C + C * V,
        "YS": C * K + K * V,
        "QS": C * K + K * V,
        "AR": C * C + C * V,
        "KR": K * C + C * V,
    }


# --- TF32 arithmetic ---------------------------------------------------------------------------------------------

_LOW13 = 0x1FFF
_KEEP = -0x2000  # 0xFFFFE000 as int32: sign, exponent and the 10 TF32 mantissa bits


def to_tf32(x: torch.Tensor, mode: str) -> torch.Tensor:
    """fp32 -> the nearest TF32 value (kept in fp32): "trunc" (toward zero), "rne" (ties to even) or "rna" (ties
    away, cvt.rna.tf32.f32). Finite inputs only; the carry into the exponent is the right rounding."""
    i = x.contiguous().view(torch.int32)
    if mode == "trunc":
        i = i & _KEEP
    elif mode == "rne":
        i = (i + 0xFFF + ((i >> 13) & 1)) & _KEEP
    elif mode == "rna":
        i = (i + 0x1000) & _KEEP
    else:
        raise ValueError(f"to_tf32: expected trunc, rne or rna, received {mode!r}")
    return i.view(torch.float32)


ROUNDED = {"tf32rn": (True, True), "tf32rn_a": (True, False), "tf32rn_b": (False, True)}


@dataclass(frozen=True)
class Arith:
    """How each named dot multiplies.

    "tf32": the tensor core reads raw fp32 operands, keeping their top 19 bits (truncation; the validation rows
    reproduce the H200's measured errors with this and not with round-to-nearest). "tf32rn": both operands rounded
    to nearest (cvt.rna.tf32.f32) in the kernel before a plain TF32 dot; "tf32rn_a" / "tf32rn_b" only the first /
    second operand. "tf32x3": Triton's F32DotTC split, hi = rna(x), lo = x − hi (read truncated), three dots.
    """

    modes: dict[str, str]

    def mm(self, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mode = self.modes[name]
        if mode == "fp32":
            return a @ b
        if mode == "tf32":
            return to_tf32(a, "trunc") @ to_tf32(b, "trunc")
        if mode in ROUNDED:
            ra, rb = ROUNDED[mode]
            return to_tf32(a, "rna" if ra else "trunc") @ to_tf32(b, "rna" if rb else "trunc")
        if mode == "tf32x3":
            a_hi, b_hi = to_tf32(a, "rna"), to_tf32(b, "rna")
            a_lo, b_lo = to_tf32(a - a_hi, "trunc"), to_tf32(b - b_hi, "trunc")
            return a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi
        raise ValueError(f"dot {name}: expected fp32, tf32, tf32rn[_a|_b] or tf32x3, received {mode!r}")


def modes(default: str, **override: str) -> dict[str, str]:
    return {d: override.get(d, default) for d in DOTS}


# --- the chunked forward, factored as the kernels factor it --------------------------------------------------------


def intra(q, k, v, g, b, w, scale: float, ar: Arith):
    """[N, C, *] chunks -> (Y, U, Q_γ, K_tail, A_qk, γ_C) as kernels/intra.py forms them (fp32)."""
    n, _, K = k.shape
    g = torch.clamp(g, min=G_FLOOR)
    G = torch.cumsum(g, 1)
    qs = q * scale
    kb = b * k
    cols = torch.arange(C)
    t_acc = torch.zeros(n, C, C)
    a_acc = torch.zeros(n, C, C)
    for blk in range(NB):
        n0 = blk * BC
        rows = slice(n0, n0 + BC)
        for k0 in range(0, K, BK):
            ks = slice(k0, k0 + BK)
            gs = g[:, :, ks]
            ref = gs[:, :n0].sum(1)  # G at the row before the block, [n, BK]
            gr = gs[:, rows]
            Gr = ref[:, None] + torch.cumsum(gr, 1)
            span = (-gr.sum(1)).amax(-1)  # [n]: the block's strongest decay over one channel of this slice
            safe = span < SAFE_SPAN
            e_row = torch.exp(Gr - ref[:, None])
            n_lim = n0 + torch.where(safe, BC, 0)  # [n]
            expo = ref[:, None] - G[:, :, ks]  # [n, C, BK]
            before = (cols < n0)[None, :, None]
            inside = cols[None, :, None] < n_lim[:, None, None]
            expo = torch.where(before, torch.clamp(expo, max=0.0), torch.where(inside, expo, 0.0))
            cf = (k[:, :, ks] * torch.exp(expo)).transpose(1, 2)  # [n, BK, C]
            keep = cols[None, None, :] < n_lim[:, None, None]
            t_acc[:, rows] += torch.where(keep, ar.mm("T", kb[:, rows, ks] * e_row, cf), 0.0)
            a_acc[:, rows] += torch.where(keep, ar.mm("Aqk", qs[:, rows, ks] * e_row, cf), 0.0)
            # Unsafe slices: the diagonal block pair by pair, exp(min(G_r − G_j, 0)), fp32 on the CUDA cores.
            e = torch.exp(torch.clamp(Gr[:, :, None] - Gr[:, None, :], max=0.0)) * k[:, None, rows, ks]
            exact_t = (kb[:, rows, ks][:, :, None] * e).sum(-1)  # [n, BC(r), BC(j)]
            exact_a = (qs[:, rows, ks][:, :, None] * e).sum(-1)
            unsafe = (~safe)[:, None, None]
            t_acc[:, rows, rows] += torch.where(unsafe, exact_t, 0.0)
            a_acc[:, rows, rows] += torch.where(unsafe, exact_a, 0.0)
    t_low = torch.tril(t_acc, -1)
    aqk = torch.tril(a_acc, 0)

    # Diagonal blocks: (I − P)(I + P²)(I + P⁴)…, ieee.
    eye = torch.eye(BC)
    p = torch.stack([t_low[:, i * BC:(i + 1) * BC, i * BC:(i + 1) * BC] for i in range(NB)], 1)
    ad = eye - p
    for _ in range(BC.bit_length() - 2):
        p = p @ p
        ad = ad @ (eye + p)
    d = torch.zeros(n, C, C)
    for i in range(NB):
        d[:, i * BC:(i + 1) * BC, i * BC:(i + 1) * BC] = ad[:, i]
    blk_r = (torch.arange(C) // BC)[:, None]
    blk_c = (torch.arange(C) // BC)[None, :]
    a_inv = d
    if NB > 1:
        n_mat = ar.mm("N", d, torch.where(blk_r > blk_c, t_low, 0.0))
        for _ in range(NB - 1):
            a_inv = d - ar.mm("horner", n_mat, a_inv)

    gamma = torch.exp(G)
    y = ar.mm("Y", a_inv, gamma * b * k)
    u = ar.mm("U", a_inv, w * v)
    qg = gamma * qs
    last = g.sum(1)  # G at the chunk's last row
    kt = torch.exp(last[:, None] - G) * k
    return y, u, qg, kt, aqk, torch.exp(last)


def forward(q, k, v, g, b, w, h0, ar: Arith) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 forward of the kernels' chunk pipeline: intra stage for every chunk, then the state pass."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    nt = T // C
    scale = K**-0.5

    def chunks(x):  # [B, T, H, D] -> [B*H*nt, C, D]
        return x.reshape(B, nt, C, H, -1).permute(0, 3, 1, 2, 4).reshape(B * H * nt, C, -1).float()

    y, u, qg, kt, aqk, gam = intra(*(chunks(x) for x in (q, k, v, g, b, w)), scale, ar)

    def per_step(x):  # [B*H*nt, ...] -> [nt, B*H, ...]
        return x.reshape(B * H, nt, *x.shape[1:]).transpose(0, 1)

    y, u, qg, kt, aqk, gam = (per_step(x) for x in (y, u, qg, kt, aqk, gam))
    s = h0.reshape(B * H, K, V).float().clone()
    out = torch.empty(nt, B * H, C, V)
    for i in range(nt):
        r = u[i] - ar.mm("YS", y[i], s)
        out[i] = ar.mm("QS", qg[i], s) + ar.mm("AR", aqk[i], r)
        s = s * gam[i][:, :, None] + ar.mm("KR", kt[i].transpose(1, 2), r)
    o = out.reshape(nt, B, H, C, V).permute(1, 0, 3, 2, 4).reshape(B, T, H, V)
    return o, s.reshape(B, H, K, V)


# --- experiments ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[torch.Tensor, ...]
    h0: torch.Tensor
    ref_o: torch.Tensor
    ref_s: torch.Tensor


def cases(seed: int = SEED, cache: Path | None = None) -> list[Case]:
    """The accuracy inputs and their float64 reference outputs (kept under ``cache`` when given: the reference is
    most of a run's CPU time)."""
    out = []
    for strong in (False, True):
        inp = make_inputs(ACCURACY, "cpu", seed=seed, strong_decay=strong)
        path = None if cache is None else cache / f"ref-{ACCURACY.label()}-seed{seed}-strong{int(strong)}.pt"
        if path is not None and path.exists():
            ref_o, ref_s = torch.load(path)
        else:
            ref_o, ref_s = gdn2_reference(*inp.args(), initial_state=inp.initial_state)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save((ref_o, ref_s), path)
        out.append(Case("strong" if strong else "normal", inp.args(), inp.initial_state, ref_o, ref_s))
    return out


def measure(all_cases: list[Case], ar: Arith) -> dict[str, float]:
    row = {}
    for case in all_cases:
        o, s = forward(*case.args, case.h0, ar)
        row[f"o_{case.name}"] = rel_err(o, case.ref_o)
        row[f"s_{case.name}"] = rel_err(s, case.ref_s)
    return row


def run_sets() -> dict[str, list[tuple[str, dict[str, str]]]]:
    """The named precision mixes, grouped: validation against the H200, attribution of the TF32 error to each dot,
    and the same with operands rounded to nearest before the dot ("tf32rn")."""
    intra_x3 = dict.fromkeys(INTRA_DOTS, "tf32x3")
    state_x3 = dict.fromkeys(STATE_DOTS, "tf32x3")
    rn_intra = dict.fromkeys(INTRA_DOTS, "tf32rn")
    rn_state = dict.fromkeys(STATE_DOTS, "tf32rn")
    validation = [
        ("all fp32", modes("fp32")),
        ("all tf32x3", modes("tf32x3")),
        ("all tf32", modes("tf32")),
        ("intra tf32x3 / state tf32 (current default)", modes("tf32", **intra_x3)),
        ("intra tf32 / state tf32x3", modes("tf32", **state_x3)),
    ]
    attribution = [
        ("intra tf32 / state fp32", modes("tf32", **dict.fromkeys(STATE_DOTS, "fp32"))),
        ("intra fp32 / state tf32", modes("tf32", **dict.fromkeys(INTRA_DOTS, "fp32"))),
    ]
    attribution += [(f"all tf32 but {d} fp32", modes("tf32", **{d: "fp32"})) for d in DOTS]
    attribution += [(f"only {d} tf32", modes("fp32", **{d: "tf32"})) for d in DOTS]
    rounded = [
        ("all tf32rn", modes("tf32rn")),
        ("intra tf32rn / state tf32", modes("tf32", **rn_intra)),
        ("intra tf32 / state tf32rn", modes("tf32", **rn_state)),
        ("intra tf32x3 / state tf32rn", modes("tf32rn", **intra_x3)),
        ("intra tf32rn / state tf32, Y and U tf32", modes("tf32", **{**rn_intra, "Y": "tf32", "U": "tf32"})),
        # The state dots' first operands (Y, Q_γ, A_qk, K_tail) come from memory: the intra stage could store them
        # already rounded. Their second operands (S0, R) live in the pass's registers.
        ("intra tf32rn / state loaded operands rounded", modes("tf32rn", **dict.fromkeys(STATE_DOTS, "tf32rn_a"))),
        ("intra tf32rn / state S0 and R rounded", modes("tf32rn", **dict.fromkeys(STATE_DOTS, "tf32rn_b"))),
        ("all tf32rn but YS, KR tf32", modes("tf32rn", YS="tf32", KR="tf32")),
        ("all tf32rn but QS, AR tf32", modes("tf32rn", QS="tf32", AR="tf32")),
    ]
    rounded += [(f"all tf32rn but {d} tf32", modes("tf32rn", **{d: "tf32"})) for d in DOTS]
    rounded += [(f"all tf32 but {d} tf32rn", modes("tf32", **{d: "tf32rn"})) for d in DOTS]
    # Candidate defaults: only the dots that matter changed (T, N, horner, Y and YS stay plain TF32).
    key = ("Aqk", "U", "QS", "AR", "KR")
    proposal = [
        ("tf32x3: Aqk, U", modes("tf32", Aqk="tf32x3", U="tf32x3")),
        ("tf32rn: Aqk, U, QS, AR, KR", modes("tf32", **dict.fromkeys(key, "tf32rn"))),
        ("tf32rn: Aqk, U, AR, KR", modes("tf32", **dict.fromkeys(("Aqk", "U", "AR", "KR"), "tf32rn"))),
        ("tf32rn: Aqk, U, AR", modes("tf32", **dict.fromkeys(("Aqk", "U", "AR"), "tf32rn"))),
        ("tf32rn: U, AR", modes("tf32", U="tf32rn", AR="tf32rn")),
        ("tf32rn: U, AR, KR", modes("tf32", U="tf32rn", AR="tf32rn", KR="tf32rn")),
        ("tf32rn: Aqk, U; state S0, R rounded", modes("tf32", Aqk="tf32rn", U="tf32rn",
                                                      **dict.fromkeys(STATE_DOTS, "tf32rn_b"))),
        ("tf32rn: Aqk, U; state R rounded", modes("tf32", Aqk="tf32rn", U="tf32rn", AR="tf32rn_b", KR="tf32rn_b")),
        ("tf32rn: Aqk, U; state Q_γ, A_qk, K_tail rounded",
         modes("tf32", Aqk="tf32rn", U="tf32rn", QS="tf32rn_a", AR="tf32rn_a", KR="tf32rn_a")),
        ("tf32rn: Aqk q side, U, QS, AR, KR", modes("tf32", **{**dict.fromkeys(key, "tf32rn"), "Aqk": "tf32rn_a"})),
        ("tf32rn: Aqk k side, U, QS, AR, KR", modes("tf32", **{**dict.fromkeys(key, "tf32rn"), "Aqk": "tf32rn_b"})),
        ("tf32rn: Aqk, U A side, QS, AR, KR", modes("tf32", **{**dict.fromkeys(key, "tf32rn"), "U": "tf32rn_a"})),
        ("tf32rn: Aqk, U Z side, QS, AR, KR", modes("tf32", **{**dict.fromkeys(key, "tf32rn"), "U": "tf32rn_b"})),
        # Rounding placed where it is cheapest: Z as formed, A_qk's two factors, the loaded Q_γ / A_qk / K_tail
        # tiles and R once per chunk; never the [K, BV] state tile S0 (the largest, on the recurrence's path).
        ("tf32rn: Aqk, Z; R", modes("tf32", Aqk="tf32rn", U="tf32rn_b", AR="tf32rn_b", KR="tf32rn_b")),
        ("tf32rn: Z; A_qk, K_tail, R", modes("tf32", U="tf32rn_b", AR="tf32rn", KR="tf32rn")),
        ("tf32rn: Aqk, Z; A_qk, K_tail, R", modes("tf32", Aqk="tf32rn", U="tf32rn_b", AR="tf32rn", KR="tf32rn")),
        ("tf32rn: Aqk, Z; Q_γ, A_qk, K_tail, R",
         modes("tf32", Aqk="tf32rn", U="tf32rn_b", QS="tf32rn_a", AR="tf32rn", KR="tf32rn")),
        ("tf32x3: Aqk, U; tf32rn: QS, AR, KR",
         modes("tf32", Aqk="tf32x3", U="tf32x3", QS="tf32rn", AR="tf32rn", KR="tf32rn")),
    ]
    return {"validation": validation, "attribution": attribution, "rounded": rounded, "proposal": proposal}


def search(all_cases: list[Case], bar: tuple[float, float], emit: Callable[[dict], None]) -> None:
    """Every set of intra dots moved to 3xTF32 (the rest TF32), cheapest first by FLOPs, and whether it meets
    ``bar`` (normal, strong)."""
    flops = dot_flops()
    subsets = [s for n in range(len(INTRA_DOTS) + 1) for s in itertools.combinations(INTRA_DOTS, n)]
    subsets.sort(key=lambda s: sum(flops[d] for d in s))
    for subset in subsets:
        row = {"group": "search", "run": "tf32x3: " + (", ".join(subset) or "none"),
               "extra_flops_per_chunk_head": 2 * sum(flops[d] for d in subset),
               **measure(all_cases, Arith(modes("tf32", **dict.fromkeys(subset, "tf32x3"))))}
        row["meets_bar"] = row["o_normal"] <= bar[0] and row["o_strong"] <= bar[1]
        emit(row)


def probe_gpu(emit: Callable[[dict], None]) -> None:
    """How tl.dot(input_precision="tf32") reads a raw fp32 operand on this GPU: A's column 0 holds probe values and
    B = e_0 e_0ᵀ, so C[:, 0] is the operand as the tensor core read it (times 1, plus exact zeros). Row counts 16
    (mma.sync) and 64 (wgmma on Hopper), as the kernels' dots use both. The "bits" and "asm" rows round A to
    nearest in the kernel first (integer ops, or cvt.rna.tf32.f32 as Triton's own 3xTF32 split does): the
    proposed fix, which must then match "rna". Meant for compiled Triton on a GPU; under TRITON_INTERPRET=1 on the
    CPU it only checks that the probe runs (the interpreter multiplies in fp32, and skips "asm")."""
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a_ptr, b_ptr, c_ptr, M: tl.constexpr, PRECISION: tl.constexpr, ROUND: tl.constexpr):
        o_m = tl.arange(0, M)
        o_n = tl.arange(0, 16)
        a = tl.load(a_ptr + o_m[:, None] * 16 + o_n[None, :])
        b = tl.load(b_ptr + o_n[:, None] * 16 + o_n[None, :])
        if ROUND == "bits":  # round half away from zero to 10 mantissa bits: add half a TF32 ulp, clear 13 bits
            a = ((a.to(tl.int32, bitcast=True) + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
        elif ROUND == "asm":
            a = tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [a], dtype=tl.float32, is_pure=True,
                                          pack=1)
        tl.store(c_ptr + o_m[:, None] * 16 + o_n[None, :], tl.dot(a, b, input_precision=PRECISION))

    ulp = 2.0**-10  # TF32 spacing in [1, 2)
    vals = torch.tensor([1 + 0.75 * ulp, 1 + 0.25 * ulp, 1 + 0.5 * ulp, 1 + 1.5 * ulp, -(1 + 0.75 * ulp),
                         1 + 0.999 * ulp, 3.0 + 1.2 * ulp, 1.0])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rounds = ("none", "bits") if os.environ.get("TRITON_INTERPRET") == "1" else ("none", "bits", "asm")
    bm = torch.zeros(16, 16, device=dev)
    bm[0, 0] = 1.0
    for m in (16, 64):
        a = torch.zeros(m, 16, device=dev)
        a[:, 0] = vals.repeat(m // len(vals)).to(dev)
        for precision, rnd in [("tf32", r) for r in rounds] + [("tf32x3", "none"), ("ieee", "none")]:
            c = torch.full((m, 16), float("nan"), device=dev)
            _dot[(1,)](a, bm, c, M=m, PRECISION=precision, ROUND=rnd, num_warps=4)
            got = c[:, 0].cpu()
            want = a[:, 0].cpu()
            row = {"group": "probe", "run": f"M{m}-{precision}-round_{rnd}", "inputs": vals.tolist(),
                   "outputs": got[: len(vals)].tolist()}
            for mode in ("trunc", "rne", "rna"):
                row[f"matches_{mode}"] = bool(torch.equal(got, to_tf32(want, mode)))
            row["matches_fp32"] = bool(torch.equal(got, want))
            emit(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    parser.add_argument("--groups", nargs="+", default=["validation", "attribution", "rounded", "proposal"],
                        choices=["validation", "attribution", "rounded", "proposal"])
    parser.add_argument("--seed", type=int, default=SEED, help="input seed (3: benchmarks/exp_fp32.py's inputs)")
    parser.add_argument("--ref-cache", type=Path, help="folder to keep the float64 reference outputs in")
    parser.add_argument("--runs", nargs="+", help="only the named runs of the chosen groups")
    parser.add_argument("--search", action="store_true", help="also try every set of intra dots in 3xTF32")
    parser.add_argument("--bar", type=float, nargs=2, default=(1.2e-3, 1.0e-3), metavar=("NORMAL", "STRONG"))
    parser.add_argument("--probe-gpu", action="store_true", help="only probe the GPU's tf32 operand rounding")
    args = parser.parse_args()
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.probe_gpu:
        probe_gpu(emit)
    else:
        t0 = time.perf_counter()
        all_cases = cases(args.seed, args.ref_cache)
        emit({"group": "setup", "run": "reference", "seconds": round(time.perf_counter() - t0, 1)})
        emit({"group": "setup", "run": "dot_flops_per_chunk_head", **dot_flops()})
        emit({"group": "setup", "run": "dot_operand_elements_per_chunk_head", **dot_operand_elements()})
        sets = run_sets()
        for group in args.groups:
            for label, mix in sets[group]:
                if args.runs and label not in args.runs:
                    continue
                emit({"group": group, "run": label, "seed": args.seed, **measure(all_cases, Arith(mix))})
        if args.search:
            search(all_cases, tuple(args.bar), emit)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        clean = [{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()} for r in rows]
        (args.out / "fp32_precision.json").write_text(json.dumps(clean, indent=1))


if __name__ == "__main__":
    main()
