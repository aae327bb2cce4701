"""Device and precision choices shared by every engine."""

from __future__ import annotations

import contextlib

import torch

from .errors import UsageError


def resolve_device(pref: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a usage error."""
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu or auto")
    if pref not in ("cpu", "cuda"):
        raise UsageError(f"unknown device '{pref}'", "use auto, cpu or cuda")
    return torch.device(pref)


def resolve_precision(pref: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA, fp32 on CPU."""
    if pref == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return pref


def autocast(precision: str, device: torch.device):
    """A context that runs the forward pass in ``precision`` (bf16 autocast or plain fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32: half precisions (bf16 autocast) are upcast for losses and
    statistics, float32 and float64 are kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
