"""Float64 token-by-token Gated Delta Rule-2: the ground truth for tests and for the tuner's correctness gate.

Per head, with state S ∈ R^{K×V} (../shared/GDN2.md):

    S̄_t = Diag(exp(g_t)) S_{t-1}
    r_t = S̄_tᵀ (b_t ⊙ k_t)
    S_t = S̄_t + k_t (w_t ⊙ v_t − r_t)ᵀ
    o_t = S_tᵀ (scale · q_t)

It loops over time in Python, vectorised over batch and heads, so it is exact and slow: use small T.
"""

from __future__ import annotations

import math

import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ‖x − ref‖ / ‖ref‖ in float64 on the CPU: the one measure the tests, the tuner's
    correctness gate and the benchmarks compare against the reference with.

    inf when ``x`` holds a NaN or Inf (an element a poisoned launch left unwritten, or an overflow), so that any
    tolerance fails; a zero ``ref`` divides by 1 (the absolute error).
    """
    x = x.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        return math.inf
    ref = ref.detach().to("cpu", torch.float64)
    denom = ref.norm().item()
    return (x - ref).norm().item() / (denom if denom > 0 else 1.0)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(Σ x² + eps) over the last axis: what ``use_qk_l2norm_in_kernel`` applies to q and k."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gdn2_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(o, final_state)`` in float64 on ``device``; shapes as in ``chunk_gdn2``.

    A GPU runs the same float64 arithmetic much faster for long sequences (thousands of steps).
    """
    q, k, v, g, b, w = (x.detach().to(device, torch.float64) for x in (q, k, v, g, b, w))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if cu_seqlens is None:
        bounds = [(i, 0, T) for i in range(B)]
    else:
        cu = [int(x) for x in cu_seqlens.tolist()]
        bounds = [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]
    o = torch.zeros(B, T, H, V, dtype=torch.float64, device=device)
    final = torch.zeros(len(bounds), H, K, V, dtype=torch.float64, device=device)
    for n, (i_b, bos, eos) in enumerate(bounds):
        if initial_state is not None:
            S = initial_state[n].detach().to(device, torch.float64).clone()
        else:
            S = torch.zeros(H, K, V, dtype=torch.float64, device=device)
        for t in range(bos, eos):
            S = S * torch.exp(g[i_b, t])[:, :, None]
            r = torch.einsum("hkv,hk->hv", S, b[i_b, t] * k[i_b, t])
            S = S + k[i_b, t][:, :, None] * (w[i_b, t] * v[i_b, t] - r)[:, None, :]
            o[i_b, t] = torch.einsum("hkv,hk->hv", S, scale * q[i_b, t])
        final[n] = S
    return o, final
