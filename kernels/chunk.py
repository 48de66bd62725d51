"""The kernels-level op ``chunk_gdn2``: argument checks, then the two-stage forward (intra stage, state stage).

    inputs ─► intra_fwd (kernels/intra.py) ─► IntraOutputs (Y, U, Q_γ, K_tail, A_qk, γ_C)
           ─► state_fwd (kernels/state.py) ─► o, S_T

:func:`forward_launch` binds the two launches to their arguments; it is the one orchestration path: the op
(:func:`chunk_gdn2_fwd`), the backward's recompute, the tuner (kernels/fwd_spec.py's ``FwdRun``) and the
benchmarks all launch the stages through it.

The launch configuration is the caller's ``config``, else the built-in default for the GPU's family
(kernels/config.py). This module never consults the tuned tables: the user-facing ``gdn2_tune.chunk_gdn2``
(gdn2_tune/ops.py) asks the dispatcher and passes its answer in through :func:`checked_forward`.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton

from gdn2_tune.kernels import compile_ahead
from gdn2_tune.kernels.checks import DTYPE_NAMES, check_token_inputs
from gdn2_tune.kernels.config import FwdConfig, Shape, default_config, field_type_error, infeasibility
from gdn2_tune.kernels.intra import INTERPRETED, IntraOutputs, intra_fwd
from gdn2_tune.kernels.spec import DeviceLimits, device_limits, family_from_capability
from gdn2_tune.kernels.state import state_fwd
from gdn2_tune.kernels.varlen import packed_index

if TYPE_CHECKING:
    from gdn2_tune.kernels.chunk_bwd import BwdConfig

# What picks a config when the caller gives none: the problem's shape in, a config admissible on the running GPU
# out. The dispatcher's tables (gdn2_tune/ops.py); None: the built-in default for the running GPU's family.
ConfigChooser = Callable[[Shape], FwdConfig]

# Set to 1 for the checked mode: the values of cu_seqlens and g are read back (one host sync per call) and
# invalid ones raise ValueError. Off by default: a sync per call stalls the GPU (see kernels/varlen.py).
CHECK_ENV = "GDN2_CHECK_INPUTS"


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> int:
    """Raise ``TypeError``/``ValueError`` naming the argument for anything the kernels cannot take.

    Returns the number of sequences N.
    """
    B, T, H, K, V = check_token_inputs(q, k, v, g, b, w)

    if cu_seqlens is None:
        n = B
    else:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens: expected a torch.Tensor, received {type(cu_seqlens).__name__}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens: expected dtype int32 or int64, received {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens: expected shape [N+1] with N >= 1, received {tuple(cu_seqlens.shape)}")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens: expected device {q.device} (that of q), received {cu_seqlens.device}")
        if B != 1:
            raise ValueError(f"cu_seqlens: expected B == 1 for a packed batch, received B={B}")
        n = cu_seqlens.numel() - 1
        # The values are checked where reading them is free (a CPU tensor) or asked for (the checked mode: one
        # host sync). Otherwise the kernels run on a sanitised copy (kernels/varlen.py), never out of bounds.
        if cu_seqlens.device.type == "cpu" or checked_mode(cu_seqlens):
            _check_offsets(cu_seqlens.tolist(), T)

    if checked_mode(g):
        bad = (g > 0) | torch.isnan(g)
        if bool(bad.any()):
            raise ValueError(f"g: expected log-decays <= 0 (natural log; -inf forgets a channel), received "
                             f"{int(bad.sum())} values > 0 or NaN, the first {g[bad][0].item()!r}")

    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise TypeError(f"initial_state: expected a torch.Tensor, received {type(initial_state).__name__}")
        if tuple(initial_state.shape) != (n, H, K, V):
            raise ValueError(f"initial_state: expected shape {(n, H, K, V)} [N, H, K, V], "
                             f"received {tuple(initial_state.shape)}")
        if initial_state.dtype != torch.float32:
            raise TypeError(f"initial_state: expected dtype torch.float32, received {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state: expected device {q.device} (that of q), received {initial_state.device}")
    return n


def checked_mode(x: torch.Tensor) -> bool:
    """Whether to read ``x``'s values back for checks: GDN2_CHECK_INPUTS=1, except while a CUDA graph is being
    captured (no value is known then; the capture records the unchecked, sanitised call)."""
    if os.environ.get(CHECK_ENV, "0") != "1":
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_offsets(cu: list[int], T: int) -> None:
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens: expected to start at 0, received {cu[0]}")
    if any(b_ < a_ for a_, b_ in itertools.pairwise(cu)):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets, received {cu}")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens: expected to end at T={T}, received {cu[-1]}")


def _check_options(scale: object, output_final_state: object, use_qk_l2norm_in_kernel: object) -> None:
    for name, flag in (("output_final_state", output_final_state), ("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, received {type(flag).__name__} {flag!r}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale: expected a real number or None, received {type(scale).__name__} {scale!r}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale: expected a finite number, received {scale!r}")


def shape_of(q: torch.Tensor, v: torch.Tensor, num_seqs: int | None = None) -> Shape:
    B, T, H, K = q.shape
    return Shape(B, T, H, K, v.shape[-1], DTYPE_NAMES[q.dtype], num_seqs)


def running_limits(device: torch.device) -> DeviceLimits:
    """The limits the constraints check a config against on ``device``: its GPU family's, sm90's without a GPU."""
    if device.type != "cuda":
        return device_limits(None)
    return device_limits(family_from_capability(torch.cuda.get_device_capability(device)))


@dataclass(frozen=True)
class ForwardLaunch:
    """The forward's two launches bound to checked, contiguous inputs and an admissible config.

    ``cu_seqlens`` is the sanitised copy of the caller's offsets (kernels/varlen.py) and ``chunk_indices``,
    ``chunk_offsets``, ``num_chunks`` the packed index built from it; all None / the dense count otherwise.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    b: torch.Tensor
    w: torch.Tensor
    scale: float
    initial_state: torch.Tensor | None
    output_final_state: bool
    cu_seqlens: torch.Tensor | None
    chunk_indices: torch.Tensor | None
    chunk_offsets: torch.Tensor | None
    num_chunks: int
    use_qk_l2norm: bool
    config: FwdConfig
    num_seqs: int

    def intra(self) -> IntraOutputs:
        """The intra stage's launch alone."""
        return intra_fwd(
            self.q, self.k, self.v, self.g, self.b, self.w,
            scale=self.scale, chunk=self.config.chunk, cfg=self.config.intra,
            cu_seqlens=self.cu_seqlens, chunk_indices=self.chunk_indices, num_chunks=self.num_chunks,
            use_qk_l2norm=self.use_qk_l2norm, out_dtype=self.q.dtype,
        )

    def state(self, inter: IntraOutputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The state stage's launch(es) on the intra stage's outputs: ``(o, final_state or None)``."""
        return state_fwd(
            inter,
            out_dtype=self.q.dtype, v_shape=self.v.shape, chunk=self.config.chunk, cfg=self.config.state,
            initial_state=self.initial_state, output_final_state=self.output_final_state,
            cu_seqlens=self.cu_seqlens, chunk_offsets=self.chunk_offsets, chunk_indices=self.chunk_indices,
            num_seqs=self.num_seqs,
        )

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.state(self.intra())


def forward_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    use_qk_l2norm_in_kernel: bool,
    config: FwdConfig,
    num_seqs: int,
) -> ForwardLaunch:
    """Bind the forward's launches to their arguments; for a packed batch, build its index (one launch)."""
    B, T = q.shape[:2]
    if cu_seqlens is not None:
        # Rebuilt on the device every call (no host sync, no cache to go stale); the kernels read the sanitised
        # offsets, never the caller's tensor.
        index = packed_index(cu_seqlens, config.chunk, T)
        cu_seqlens, chunk_indices, chunk_offsets, num_chunks = index.offsets, index.pairs, index.first, index.num_chunks
    else:
        chunk_indices, chunk_offsets, num_chunks = None, None, B * triton.cdiv(T, config.chunk)
    return ForwardLaunch(
        q, k, v, g, b, w,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_offsets=chunk_offsets, num_chunks=num_chunks,
        use_qk_l2norm=use_qk_l2norm_in_kernel, config=config, num_seqs=num_seqs,
    )


def chunk_gdn2_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    use_qk_l2norm_in_kernel: bool,
    config: FwdConfig,
    num_seqs: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The two launches on checked, contiguous inputs with an admissible ``config``."""
    return forward_launch(
        q, k, v, g, b, w,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, config=config, num_seqs=num_seqs,
    )()


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
    """Gated Delta Rule-2 over whole sequences, chunkwise, with an explicit or the built-in config.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys; ``v``: ``[B, T, H, V]`` values.
        g: ``[B, T, H, K]`` natural-log decay (≤ 0), read in fp32 whatever its dtype. ``-inf`` (or any value
            below -110, where exp underflows in fp32) forgets that channel of the state exactly. ``g > 0`` or NaN
            is outside the range: not checked by default (the result is undefined), rejected with
            GDN2_CHECK_INPUTS=1.
        b: ``[B, T, H, K]`` erase gate; w: ``[B, T, H, V]`` write gate.
        scale: a finite real number multiplying q; defaults to ``K ** -0.5``.
        initial_state: fp32 ``[N, H, K, V]``; N is B, or the number of sequences in ``cu_seqlens``.
        output_final_state: return the fp32 final state ``[N, H, K, V]`` instead of None.
        cu_seqlens: int32/int64 ``[N+1]`` offsets of a packed batch (B must be 1); the state resets at each start.
            Checked (ValueError) when on the CPU or with GDN2_CHECK_INPUTS=1; otherwise invalid offsets run as
            their sanitised copy (kernels.varlen.sanitize_offsets), never outside the buffers.
        use_qk_l2norm_in_kernel: L2-normalise q and k per head before the recurrence.
        config: an explicit :class:`~kernels.config.FwdConfig`; None takes the built-in default for this GPU's
            family (kernels.config.default_config). ``gdn2_tune.chunk_gdn2`` serves the tuned tables instead.

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in q's dtype; final_state or None.
    """
    return checked_forward(
        q, k, v, g, b, w,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, config=config, choose=None,
    )


def checked_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    *,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    use_qk_l2norm_in_kernel: bool,
    config: FwdConfig | None,
    choose: ConfigChooser | None,
    choose_bwd: Callable[[Shape], BwdConfig] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What every public ``chunk_gdn2`` runs (see :func:`chunk_gdn2` for the arguments): check the arguments,
    take ``config`` (checked against the running GPU's limits) or, when None, ``choose(shape)`` (trusted: the
    dispatcher validates what it serves) or the built-in default, then launch the forward, through autograd when
    an input requires grad; its backward runs ``choose_bwd(shape)`` (a BwdConfig), or the built-in default."""
    n = _check_inputs(q, k, v, g, b, w, initial_state, cu_seqlens)
    _check_options(scale, output_final_state, use_qk_l2norm_in_kernel)
    if q.device.type == "cpu" and not INTERPRETED:
        raise ValueError(
            "q: CPU tensors need the Triton interpreter, which was off when gdn2_tune was imported: set "
            "TRITON_INTERPRET=1 in the environment before importing it, or pass CUDA tensors"
        )
    # Inputs that require grad go through the autograd function of kernels/chunk_bwd.py (same forward launches).
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, b, w, initial_state)
    )
    shape = shape_of(q, v, n if cu_seqlens is not None else None)
    limits = running_limits(q.device)
    if config is None:
        config = default_config(shape, limits) if choose is None else choose(shape)
    else:
        wrong_type = field_type_error(config)
        if wrong_type is not None:
            raise TypeError(wrong_type)
        reason = infeasibility(config, shape, limits)
        if reason is not None:
            raise ValueError(f"config: {config.label()} is not supported at {shape.label()}: {reason}")
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    run, backward = chunk_gdn2_fwd, {}
    if needs_grad:
        from gdn2_tune.kernels.chunk_bwd import chunk_gdn2_autograd as run

        backward = {"bwd_config": None if choose_bwd is None else choose_bwd(shape)}
    # The first call of a new config compiles every kernel it (and its backward) will launch at once, in threads.
    compile_ahead.prepare(
        q, k, v, g, b, w,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, config=config, num_seqs=n,
        bwd_config=backward.get("bwd_config"), needs_grad=needs_grad,
    )
    return run(
        q, k, v, g, b, w,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        config=config, num_seqs=n, **backward,
    )

