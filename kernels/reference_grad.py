"""Float64 gradients of the Gated Delta Rule-2 by autograd through the token recurrence: the ground truth for the
backward's tests and benchmark.

The recurrence is that of :func:`kernels.reference.gdn2_reference` (../shared/GDN2.md), written here without its
``detach`` so that autograd sees it; the l2 norm and the scale are inside, so their backward is too. It loops
over time in Python (exact and slow: small T on the CPU, a few thousand steps on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gdn2_tune.kernels.reference import l2norm


@dataclass(frozen=True)
class Grads:
    """Gradients of one call, in the inputs' layout; ``h0`` is None without an initial state."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    b: torch.Tensor
    w: torch.Tensor
    h0: torch.Tensor | None

    def items(self) -> list[tuple[str, torch.Tensor]]:
        out = [("q", self.q), ("k", self.k), ("v", self.v), ("g", self.g), ("b", self.b), ("w", self.w)]
        return out + ([("h0", self.h0)] if self.h0 is not None else [])


def gdn2_recurrence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: list[int] | None,
    use_qk_l2norm_in_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, final_state) in the inputs' dtype, differentiable in every tensor argument."""
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    B, T, H, K = q.shape
    V = v.shape[-1]
    bounds = [(i, 0, T) for i in range(B)] if cu_seqlens is None else [
        (0, cu_seqlens[n], cu_seqlens[n + 1]) for n in range(len(cu_seqlens) - 1)
    ]
    rows: list[list[torch.Tensor | None]] = [[None] * T for _ in range(B)]
    finals = []
    decay = torch.exp(g)
    bk = b * k
    z = w * v
    qs = scale * q
    for n, (i_b, bos, eos) in enumerate(bounds):
        if initial_state is not None:
            S = initial_state[n]
        else:
            S = q.new_zeros(H, K, V)
        for t in range(bos, eos):
            S = S * decay[i_b, t][:, :, None]
            r = torch.einsum("hkv,hk->hv", S, bk[i_b, t])
            S = S + k[i_b, t][:, :, None] * (z[i_b, t] - r)[:, None, :]
            rows[i_b][t] = torch.einsum("hkv,hk->hv", S, qs[i_b, t])
        finals.append(S)
    o = torch.stack([torch.stack(r) for r in rows])  # type: ignore[arg-type]
    return o, torch.stack(finals)


def reference_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    do: torch.Tensor, dht: torch.Tensor | None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    device: str | torch.device = "cpu",
) -> Grads:
    """Float64 gradients of ⟨o, do⟩ + ⟨final_state, dht⟩ on ``device``."""
    xs = [x.detach().to(device, torch.float64).requires_grad_(True) for x in (q, k, v, g, b, w)]
    h0 = None if initial_state is None else initial_state.detach().to(device, torch.float64).requires_grad_(True)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cu = None if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    with torch.enable_grad():
        o, s = gdn2_recurrence(*xs, scale=scale, initial_state=h0, cu_seqlens=cu,
                               use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
        outs, ups = [o], [do.detach().to(device, torch.float64)]
        if dht is not None:
            outs.append(s)
            ups.append(dht.detach().to(device, torch.float64))
        wrt = xs + ([h0] if h0 is not None else [])
        got = torch.autograd.grad(outs, wrt, ups, allow_unused=True)
    got = [torch.zeros_like(x) if d is None else d for x, d in zip(wrt, got)]
    return Grads(*got[:6], got[6] if h0 is not None else None)
