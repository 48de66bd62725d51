"""The public ops as a user calls them: ``chunk_gdn2`` serves the tuned tables, ``fused_recurrent_gdn2`` decodes.

This is the layer that consults the dispatcher (profiles/dispatch.py): kernels/ never imports profiles/, so the
kernels-level ``gdn2_tune.kernels.chunk.chunk_gdn2`` runs an explicit config or the built-in default, and this
``chunk_gdn2`` passes it the dispatcher's lookup for calls without a config. Both run the same argument checks
and the same launches (kernels.chunk.checked_forward).
"""

from __future__ import annotations

import torch

from gdn2_tune.kernels.bwd_spec import BWD_OP
from gdn2_tune.kernels.chunk import checked_forward
from gdn2_tune.kernels.chunk_bwd import BwdConfig
from gdn2_tune.kernels.config import FwdConfig, Shape
from gdn2_tune.kernels.decode import checked_decode
from gdn2_tune.kernels.decode_config import DecodeConfig
from gdn2_tune.kernels.decode_spec import ALGORITHM_OP, DECODE_OP, AlgorithmConfig, choose_algorithm
from gdn2_tune.profiles.dispatch import select_config

__all__ = ["auto_gdn2", "chunk_gdn2", "fused_recurrent_gdn2"]


def chunk_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    config: FwdConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated Delta Rule-2 over whole sequences, chunkwise; differentiable.

    The arguments and results are those of :func:`gdn2_tune.kernels.chunk.chunk_gdn2`, except that
    ``config=None`` asks the dispatcher (``profiles.dispatch.select_config``): ``GDN2_CONFIG``, ``GDN2_PROFILE``,
    this GPU's shipped table, a table of its family, then the built-in default. It never tunes at run time.
    Inputs that require grad get the backward config the dispatcher serves for op ``"bwd"`` at the same shape
    (kernels/bwd_spec.py), fitted to the forward's chunk length.
    """
    return checked_forward(
        q, k, v, g, b, w,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, config=config, choose=select_config,
        choose_bwd=_bwd_config,
    )


def _bwd_config(shape: Shape) -> BwdConfig:
    return select_config(shape, BWD_OP)


def _decode_config(shape: Shape) -> DecodeConfig:
    return select_config(shape, DECODE_OP)


def _algorithm(shape: Shape) -> AlgorithmConfig:
    return select_config(shape, ALGORITHM_OP)


def fused_recurrent_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    inplace_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    ssm_state_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated Delta Rule-2 token by token over a state pool, for decoding.

    The arguments and results are those of :func:`gdn2_tune.kernels.decode.fused_recurrent_gdn2`, except that
    ``config=None`` asks the dispatcher for op ``"decode"`` at the call's batch and T bucket
    (kernels/decode_spec.py), as ``chunk_gdn2`` does for the forward. Memoised per shape: one dict lookup a step.
    """
    return checked_decode(
        q, k, v, g, b, w,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        inplace_final_state=inplace_final_state, cu_seqlens=cu_seqlens, ssm_state_indices=ssm_state_indices,
        num_accepted_tokens=num_accepted_tokens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, out=out,
        config=config, choose=_decode_config,
    )


def auto_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    algorithm: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's call over T new tokens per sequence from ``initial_state`` [N, H, K, V]: ``fused_recurrent_gdn2``
    or ``chunk_gdn2``, whichever the table says is faster at this batch and T bucket (op ``"algorithm"``; without
    a table the recurrent kernel below ``kernels.decode_spec.DEFAULT_CROSSOVER_T`` tokens per sequence).

    Arguments and results as ``chunk_gdn2``'s; ``algorithm`` forces ``"recurrent"`` or ``"chunk"``. Inputs that
    require grad take the chunked op (the recurrent kernel is inference only).
    """
    chosen = choose_algorithm(q, k, v, g, b, w, initial_state=initial_state, cu_seqlens=cu_seqlens,
                              algorithm=algorithm, choose=_algorithm)
    run = fused_recurrent_gdn2 if chosen == "recurrent" else chunk_gdn2
    return run(q, k, v, g, b, w, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
               cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
