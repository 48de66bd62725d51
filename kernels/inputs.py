"""Random inputs for a :class:`~kernels.config.Shape`: what tests, the tuner's gate and benchmarks feed the op.

Keys are L2-normalised (as GDN-2 layers do before the recurrence), gates uniform in [0, 1], the decay
g = log(sigmoid)-like in [-0.5, 0] by default or uniform in [-10, 0] with ``strong_decay``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gdn2_tune.kernels.config import Shape


@dataclass(frozen=True)
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    b: torch.Tensor
    w: torch.Tensor
    initial_state: torch.Tensor | None
    cu_seqlens: torch.Tensor | None

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.k, self.v, self.g, self.b, self.w


def packed_lengths(total: int, num_seqs: int, seed: int = 0) -> list[int]:
    """Uneven positive sequence lengths summing to ``total`` (deterministic for a seed)."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(num_seqs, generator=gen) + 0.1
    lens = (weights / weights.sum() * (total - num_seqs)).floor().long() + 1
    lens[-1] += total - int(lens.sum())
    return [int(x) for x in lens]


def make_inputs(
    shape: Shape,
    device: str | torch.device = "cpu",
    seed: int = 0,
    *,
    strong_decay: bool = False,
    initial_state: bool = True,
) -> Inputs:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, T, H, K, V = shape.B, shape.T, shape.H, shape.K, shape.V
    dt = shape.torch_dtype

    def rand(*size: int) -> torch.Tensor:
        return torch.rand(*size, generator=gen)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen)

    q = randn(B, T, H, K)
    k = randn(B, T, H, K)
    k = k / k.norm(dim=-1, keepdim=True)
    v = randn(B, T, H, V)
    g = rand(B, T, H, K) * (-10.0 if strong_decay else -0.5)
    b = rand(B, T, H, K)
    w = rand(B, T, H, V)
    n = shape.num_seqs or B
    h0 = randn(n, H, K, V) if initial_state else None
    cu = None
    if shape.num_seqs:
        lens = packed_lengths(T, shape.num_seqs, seed)
        cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(device)

    def put(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(device=device, dtype=dtype)

    return Inputs(
        put(q, dt), put(k, dt), put(v, dt), put(g, torch.float32), put(b, dt), put(w, dt),
        None if h0 is None else put(h0, torch.float32), cu,
    )
