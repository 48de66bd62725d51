"""The public ops as a user calls them: ``chunk_gdn2`` serves the tuned tables, ``fused_recurrent_gdn2`` decodes.

This is the layer that consults the dispatcher (profiles/dispatch.py): kernels/ never imports profiles/, so the
kernels-level ``gdn2_tune.kernels.chunk.chunk_gdn2`` runs an explicit config or the built-in default, and this
``chunk_gdn2`` passes it the dispatcher's lookup for calls without a config. Both run the same argument checks
and the same launches (kernels.chunk.checked_forward).
"""

from __future__ import annotations

import torch

from gdn2_tune.kernels.chunk import checked_forward
from gdn2_tune.kernels.config import FwdConfig
from gdn2_tune.kernels.decode import fused_recurrent_gdn2
from gdn2_tune.profiles.dispatch import select_config

__all__ = ["chunk_gdn2", "fused_recurrent_gdn2"]


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
    """
    return checked_forward(
        q, k, v, g, b, w,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, config=config, choose=select_config,
    )
