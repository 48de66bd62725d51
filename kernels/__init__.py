"""Triton kernels for the Gated DeltaNet-2 chunk algorithm and the public op ``chunk_gdn2``."""

from gdn2_tune.kernels.chunk import chunk_gdn2
from gdn2_tune.kernels.config import DEFAULT_CONFIG, FwdConfig, IntraConfig, Shape, StateConfig
from gdn2_tune.kernels.reference import gdn2_reference

__all__ = ["DEFAULT_CONFIG", "FwdConfig", "IntraConfig", "Shape", "StateConfig", "chunk_gdn2", "gdn2_reference"]
