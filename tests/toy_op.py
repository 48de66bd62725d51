"""A toy op registered through the spec, for the design test of issue 10 (tests/test_spec.py): a scaled copy
y = SCALE · x over a [B·T·H, K] tensor, with two tunables (the block of elements a program copies and its warps),
its own Triton kernel, float64 reference, cost, suite shape and one constraint that takes the device.

Nothing in tuner/, profiles/ or reports/ knows it: it is its own file plus the one register() call at the bottom.
A worker process imports it by name (KernelSpec.module), so it lives in a module of its own on the test path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

from gdn2_tune.kernels.config import Param, Shape
from gdn2_tune.kernels.cost import Cost, element_size
from gdn2_tune.kernels.spec import DeviceLimits, KernelSpec, register

NAME = "toy"
SCALE = 2.0
THREADS_PER_WARP = 32


@triton.jit
def scaled_copy_kernel(x, y, n, scale, BLOCK: tl.constexpr):
    i_b = tl.program_id(0)
    o_x = i_b * BLOCK + tl.arange(0, BLOCK)
    m_x = o_x < n
    b_x = tl.load(x + o_x, mask=m_x, other=0.0)
    tl.store(y + o_x, (b_x * scale).to(y.dtype.element_ty), mask=m_x)


@dataclass(frozen=True)
class ToyConfig:
    BLOCK: int = 64
    num_warps: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToyConfig:
        if not isinstance(data, dict):
            raise TypeError(f"config: expected a dict, received {type(data).__name__}")
        if set(data) != {"BLOCK", "num_warps"}:
            raise ValueError(f"config: expected keys ['BLOCK', 'num_warps'], received {sorted(data)}")
        return cls(**data)

    def flat(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_flat(cls, params: dict[str, Any]) -> ToyConfig:
        return cls.from_dict(dict(params))

    def label(self) -> str:
        return f"B{self.BLOCK}-w{self.num_warps}"


SPACE = (
    Param("BLOCK", (32, 64, 128), "elements one program copies"),
    Param("num_warps", (1, 2, 4), "warps of a program"),
)


def legal_values(cfg: ToyConfig, shape: Shape, device: DeviceLimits) -> str | None:
    for p in SPACE:
        value = getattr(cfg, p.name)
        if type(value) is not int or value not in p.values:
            return f"{p.name}={value!r} is not one of {list(p.values)}"
    return None


def a_thread_per_element(cfg: ToyConfig, shape: Shape, device: DeviceLimits) -> str | None:
    # More threads than elements would leave warps idle; the device is taken as every constraint takes it.
    if cfg.num_warps * THREADS_PER_WARP > cfg.BLOCK:
        return f"num_warps={cfg.num_warps} gives more threads than BLOCK={cfg.BLOCK} elements on {device.family}"
    return None


def scaled_copy(x: torch.Tensor, cfg: ToyConfig) -> torch.Tensor:
    """The launcher the tuner, the tests and a caller share."""
    y = torch.empty_like(x)
    n = x.numel()
    scaled_copy_kernel[(triton.cdiv(n, cfg.BLOCK),)](x, y, n, SCALE, BLOCK=cfg.BLOCK, num_warps=cfg.num_warps)
    return y


class ToyRun:
    def __init__(self, shape: Shape, device: str, *, seed: int = 0, strong_decay: bool = False) -> None:
        generator = torch.Generator().manual_seed(seed)
        rows = shape.B * shape.T * shape.H
        self.x = torch.randn(rows, shape.K, generator=generator, dtype=torch.float32).to(device, shape.torch_dtype)

    def forward(self, cfg: ToyConfig) -> tuple[torch.Tensor, ...]:
        return (scaled_copy(self.x, cfg),)

    def stage_fns(self, cfg: ToyConfig) -> dict[str, Callable[[], object]]:
        return {"copy": lambda: scaled_copy(self.x, cfg)}

    def reference(self) -> tuple[torch.Tensor, ...]:
        return (SCALE * self.x.to("cpu", torch.float64),)


def minimum_bytes(shape: Shape) -> float:
    # x read once and y written once.
    return float(2 * shape.B * shape.T * shape.H * shape.K * element_size(shape.dtype))


def cost(shape: Shape, cfg: ToyConfig) -> dict[str, Cost]:
    n = shape.B * shape.T * shape.H * shape.K
    copy = Cost(flops_tc=0.0, flops_cuda=float(n), bytes_min=minimum_bytes(shape), bytes_moved=minimum_bytes(shape))
    return {"copy": copy, "total": copy}


TOY_SHAPE = Shape(1, 64, 1, 32, 32, "fp32")

TOY = register(KernelSpec(
    name=NAME,
    config_type=ToyConfig,
    space=SPACE,
    constraints=(legal_values, a_thread_per_element),
    default=lambda shape, device: ToyConfig(),
    stages=("copy",),
    prepare=ToyRun,
    cost=cost,
    minimum_bytes=minimum_bytes,
    gate_tolerance={"fp32": 1e-6, "bf16": 1e-2, "fp16": 1e-3},
    suite=(TOY_SHAPE,),
    interpret_shape=TOY_SHAPE,
    jit_files=(Path(__file__).resolve(),),
    output_names=("y",),
), replace=True)
