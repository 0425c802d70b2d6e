"""How a model runs on its device: autocast precision, memory format, compilation, copies.

One ``Execution`` per process, resolved from the config's ``perf`` section and the
device, so scoring, adaptation and evaluation make the same choices. On a CPU the
``auto`` defaults keep fp32, NCHW and plain copies: the fast path there is the plain one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from sfda_ray.config import PerfConfig


def resolve_device(device: str) -> torch.device:
    """``auto``: the first GPU when there is one, else the CPU; ``cuda`` without a GPU is an
    error rather than a silent fall-back."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:  # torch lists every device type it knows, dozens
        expected = "use auto, cpu, cuda or cuda:N"
        raise ValueError(f"device {device!r}: not a device; {expected}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is visible here; use cpu or auto")
    n = torch.cuda.device_count() if resolved.type == "cuda" else 0
    if resolved.type == "cuda" and (resolved.index or 0) >= n:
        raise ValueError(f"device {device!r}: {n} CUDA GPU(s) visible here, cuda:0 to cuda:{n - 1}")
    return resolved


def _fast_bf16(device: torch.device) -> bool:
    """Whether the GPU has bf16 tensor cores (Ampere, compute capability 8.0, and later):
    before them (V100, T4) bf16 is emulated, slower than fp32."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


@dataclass(frozen=True)
class Execution:
    device: torch.device
    autocast_dtype: torch.dtype | None = None  # None: fp32
    channels_last: bool = False
    compile_backend: str | None = None  # None: eager
    pin_memory: bool = False
    loader_workers: int = 0

    @classmethod
    def resolve(cls, perf: PerfConfig | None, device: torch.device | str) -> Execution:
        device = torch.device(device)
        perf = perf or PerfConfig()
        gpu = device.type == "cuda"
        bf16 = perf.precision == "bf16" or (perf.precision == "auto" and gpu and _fast_bf16(device))
        nhwc = gpu if perf.channels_last is None else perf.channels_last
        workers = perf.loader_workers if perf.loader_workers is not None else (4 if gpu else 0)
        return cls(
            device=device,
            autocast_dtype=torch.bfloat16 if bf16 else None,
            channels_last=nhwc,
            compile_backend=perf.compile_backend if perf.compile else None,
            pin_memory=perf.pin_memory and gpu,
            loader_workers=workers,
        )

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Forward passes under this; run ``backward`` outside it."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device (in place) in the chosen memory format."""
        if self.channels_last:
            return model.to(self.device, memory_format=torch.channels_last)
        return model.to(self.device)

    def compiled(self, model: nn.Module) -> nn.Module:
        """A compiled view of ``model`` sharing its parameters (state-dict keys unchanged
        on ``model``); ``model`` itself when compilation is off."""
        if self.compile_backend is None:
            return model
        return torch.compile(model, backend=self.compile_backend)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch to the device, non-blocking from pinned memory. (A channels-last model
        converts its NCHW input in the first convolution.)"""
        return x.to(self.device, non_blocking=self.pin_memory)
