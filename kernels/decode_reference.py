"""Float64 references for the decode op (kernels/decode.py): the recurrence of kernels/reference.py with the
state optionally rounded to a storage dtype after every token, and the pool semantics around it.

Rounding the float64 state to bf16 after each step is what a bf16 state pool does to the exact recurrence, so
the error of this reference against the unrounded one is the error bf16 storage costs by itself: the yardstick
for the kernel's bf16-state accuracy (tests/test_decode.py, benchmarks/bench_decode.py).
"""

from __future__ import annotations

import torch

from gdn2_tune.kernels.reference import l2norm


def round_bf16_toward_zero(x: torch.Tensor) -> torch.Tensor:
    """fp32 → bf16 by dropping the low 16 bits: what the Triton 3.9 CPU interpreter's cast does (a GPU rounds to
    nearest even, like ``x.to(torch.bfloat16)``)."""
    bits = x.to(torch.float32).contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32)


def recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    rounding: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [B, T, H, V], states [B, T, H, K, V])`` in float64 for dense ``[B, T, ...]`` inputs from ``state``
    ``[B, H, K, V]``; ``states[:, t]`` is the state after token t.

    ``rounding``: None keeps float64; ``"bf16"`` rounds the state to bf16 (nearest even) after every token,
    ``"bf16-trunc"`` toward zero (the CPU interpreter's cast).
    """
    dev = state.device
    q, k, v, g, b, w = (x.detach().to(dev, torch.float64) for x in (q, k, v, g, b, w))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    S = state.detach().to(torch.float64).clone()
    o = torch.empty(B, T, H, v.shape[-1], dtype=torch.float64, device=dev)
    states = torch.empty(B, T, H, K, v.shape[-1], dtype=torch.float64, device=dev)
    for t in range(T):
        S = S * torch.exp(g[:, t])[..., None]
        r = torch.einsum("bhkv,bhk->bhv", S, b[:, t] * k[:, t])
        S = S + k[:, t][..., None] * (w[:, t] * v[:, t] - r)[:, :, None, :]
        o[:, t] = torch.einsum("bhkv,bhk->bhv", S, scale * q[:, t])
        if rounding == "bf16":
            S = S.to(torch.float32).to(torch.bfloat16).to(torch.float64)
        elif rounding == "bf16-trunc":
            S = round_bf16_toward_zero(S.to(torch.float32)).to(torch.float64)
        elif rounding is not None:
            raise ValueError(f"rounding: expected None, 'bf16' or 'bf16-trunc', received {rounding!r}")
        states[:, t] = S
    return o, states
