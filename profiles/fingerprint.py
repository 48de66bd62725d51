"""Moved to :mod:`gdn2_tune.kernels.fingerprint` (an op's spec computes its own fingerprint, and kernels/ never
imports profiles/); kept so that existing imports keep working."""

from gdn2_tune.kernels.fingerprint import (  # noqa: F401
    FINGERPRINT_CHARS,
    constraint_sources,
    fingerprint,
    jit_sources,
)
