"""Argument checks shared by the public ops (chunk_gdn2, fused_recurrent_gdn2): the six per-token tensors.

Only shapes, dtypes and devices are looked at; nothing here reads a device tensor's values (that would sync).
"""

from __future__ import annotations

import torch

from gdn2_tune.kernels.config import MAX_HEAD_DIM

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def check_tensor(name: str, x: object, device: torch.device | None) -> torch.Tensor:
    """``x`` as a tensor (on ``device`` when given), else a TypeError/ValueError naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, received {type(x).__name__}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected device {device} (that of q), received {x.device}")
    return x


def check_token_inputs(
    q: object, k: object, v: object, g: object, b: object, w: object
) -> tuple[int, int, int, int, int]:
    """q, k, g, b ``[B, T, H, K]`` and v, w ``[B, T, H, V]`` on one device, q k v b w of one float dtype, every
    dimension ≥ 1 and K, V ≤ MAX_HEAD_DIM; returns (B, T, H, K, V)."""
    named = {"q": q, "k": k, "v": v, "g": g, "b": b, "w": w}
    for name, x in named.items():
        x = check_tensor(name, x, None)
        if x.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims [B, T, H, D], received shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected dtype bf16, fp16 or fp32, received {x.dtype}")
    assert isinstance(q, torch.Tensor) and isinstance(v, torch.Tensor)
    for name, x in named.items():
        check_tensor(name, x, q.device)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T < 1:
        raise ValueError(f"q: expected T >= 1, received T={T}")
    for name, x in (("q", q), ("v", v)):
        if 0 in x.shape:
            raise ValueError(f"{name}: expected every dimension of [B, T, H, D] >= 1, received shape {tuple(x.shape)}")
    for name in ("k", "g", "b"):
        if tuple(named[name].shape) != (B, T, H, K):
            raise ValueError(f"{name}: expected shape {(B, T, H, K)} (that of q), received {tuple(named[name].shape)}")
    if tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v: expected shape {(B, T, H, 'V')} matching q's [B, T, H], received {tuple(v.shape)}")
    if tuple(w.shape) != tuple(v.shape):
        raise ValueError(f"w: expected shape {tuple(v.shape)} (that of v), received {tuple(w.shape)}")
    for name in ("k", "v", "b", "w"):
        if named[name].dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (that of q), received {named[name].dtype}")
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"q/v: expected K and V <= {MAX_HEAD_DIM}, received K={K}, V={V}")
    return B, T, H, K, V
