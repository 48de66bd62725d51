"""Triton kernels for Gated DeltaNet-2 and the kernels-level ops ``chunk_gdn2`` (prefill: an explicit config or the
built-in default; ``gdn2_tune.chunk_gdn2`` adds the tuned tables) and ``fused_recurrent_gdn2`` (decode)."""

from gdn2_tune.kernels.chunk import chunk_gdn2
from gdn2_tune.kernels.config import DEFAULT_CONFIG, FwdConfig, IntraConfig, Shape, StateConfig
from gdn2_tune.kernels.decode import fused_recurrent_gdn2
from gdn2_tune.kernels.decode_config import DecodeConfig
from gdn2_tune.kernels.reference import gdn2_reference

__all__ = [
    "DEFAULT_CONFIG",
    "DecodeConfig",
    "FwdConfig",
    "IntraConfig",
    "Shape",
    "StateConfig",
    "chunk_gdn2",
    "fused_recurrent_gdn2",
    "gdn2_reference",
]
