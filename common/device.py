"""Devices, seeds and mixed precision."""

from __future__ import annotations

import contextlib
import os
import platform
import random

import numpy as np
import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; any other name is checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from common.errors import ConfigError

        raise ConfigError("--device cuda, but no CUDA GPU is visible; use --device auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        from common.errors import ConfigError

        raise ConfigError("--device mps, but MPS is not available; use --device auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch so CPU runs repeat exactly; returns a torch generator
    (on the CPU) for code that wants its own stream of random numbers."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype worth using on this device, or None for full fp32.

    bf16 keeps fp32's exponent range, so it needs no loss scaling; fp16 (older GPUs) does.
    On the CPU autocast rarely pays off for these small models, so we stay in fp32.
    """
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products in hardware (AVX512-BF16 or AMX), as
    oneDNN reports it. Without that, CPU bf16 is emulated and slower than float32; with it,
    bf16 autocast roughly halves the time of a training step for the labs' small nets."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, enabled: bool = True, cpu_bf16: bool = False):
    """A context manager for the forward pass: autocast on CUDA; on the CPU only when
    ``cpu_bf16`` asks for it (worth it where ``cpu_has_native_bf16()``); else a no-op."""
    if enabled and cpu_bf16 and device.type == "cpu":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    dtype = amp_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class CpuBFloat16(torch.nn.Module):
    """Runs the wrapped model under bfloat16 autocast on the CPU (``common.train`` autocasts on
    CUDA only). Weights stay float32; convolutions and matmuls compute in bfloat16, which has
    float32's range (no loss scaling needed) but only ~3 significant digits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, cpu_bf16=True):
            return self.model(x).float()


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 autocast (bf16 and fp32 need none)."""
    active = enabled and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=active)


def describe(device: torch.device) -> dict:
    """What ran the job: saved with every run so that figures can be compared honestly."""
    info = {
        "device": str(device),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    return info


def prepare_model(model: torch.nn.Module, device: torch.device, channels_last: bool = True,
                  compile: bool = False) -> torch.nn.Module:
    """Move ``model`` to ``device``; on CUDA store conv weights channels_last (NHWC), which
    tensor cores prefer; optionally ``torch.compile`` it (worth it for long GPU runs only:
    compiling costs tens of seconds up front)."""
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    return model
