"""Devices and the speed switches every engine shares: precision, channels_last, compile.

One switch per feature, meaning the same on every device: ``precision`` (``auto`` = bf16 on
CUDA, fp32 on the CPU), ``channels_last`` (``auto`` = on for CUDA, off on the CPU) and
``compile`` (``torch.compile`` of the network, in place). ``resolve_runtime`` turns the
settings into a ``Runtime``, the one object the engines ask how to place a model, run a
forward pass and record what ran. The CUDA backend flags (TF32, cuDNN) are set here, once,
explicitly, and recorded with the rest.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UsageError

# fp32 means fp32: no TF32 tensor-core rounding in matmuls or convolutions (the authors'
# float32 training); bf16 autocast is the fast path. cuDNN picks its fastest convolution for
# the fixed input sizes (benchmark mode); results are not bit-deterministic across runs on a GPU.
CUDA_BACKEND = {"tf32_matmul": False, "tf32_cudnn": False, "cudnn_benchmark": True, "cudnn_deterministic": False}


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


def resolve_channels_last(pref: str | bool | None, device: torch.device) -> bool:
    """``auto`` (or None) -> on for CUDA, off on the CPU (where it measured slower); on/off as said."""
    if isinstance(pref, bool):
        return pref
    if pref in (None, "auto"):
        return device.type == "cuda"
    if pref not in ("on", "off"):
        raise UsageError(f"unknown --channels-last '{pref}'", "use auto, on or off")
    return pref == "on"


def configure_backends() -> dict:
    """Set the CUDA backend flags of ``CUDA_BACKEND`` (they are global to the process) and
    return them, for the record."""
    torch.backends.cuda.matmul.allow_tf32 = CUDA_BACKEND["tf32_matmul"]
    torch.backends.cudnn.allow_tf32 = CUDA_BACKEND["tf32_cudnn"]
    torch.backends.cudnn.benchmark = CUDA_BACKEND["cudnn_benchmark"]
    torch.backends.cudnn.deterministic = CUDA_BACKEND["cudnn_deterministic"]
    return dict(CUDA_BACKEND)


def autocast(precision: str, device: torch.device):
    """A context that runs the forward pass in ``precision`` (bf16 autocast or plain fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32: half precisions (bf16 autocast) are upcast for losses and
    statistics, float32 and float64 are kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def compile_in_place(model: nn.Module) -> nn.Module:
    """``torch.compile`` the network's heavy parts in place (``Module.compile``): the backbone
    and the projection head when there is one, else the whole module. The weights keep their
    names, so checkpoints and resume states are those of the eager model."""
    parts = [m for m in (getattr(model, "backbone", None), getattr(model, "proj", None)) if isinstance(m, nn.Module)]
    for part in parts or [model]:
        part.compile()
    return model


@dataclass(frozen=True)
class Runtime:
    """How a run computes: the device and the three speed switches, resolved."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def autocast(self):
        return autocast(self.precision, self.device)

    def place(self, model: nn.Module) -> nn.Module:
        """``model`` (in place) on the device, its 4-D weights channels_last when that is on and
        contiguous otherwise."""
        return model.to(self.device, memory_format=memory_format(self.channels_last))

    def compiled(self, model: nn.Module) -> nn.Module:
        """``model`` compiled in place when ``compile`` is on (after anything that swaps modules)."""
        return compile_in_place(model) if self.compile else model

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images in the memory format the model computes in."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def describe(self) -> str:
        """For the start banner: ``cpu fp32``, ``cuda bf16 channels_last compiled``."""
        return " ".join([self.device.type, self.precision] + ["channels_last"] * self.channels_last
                        + ["compiled"] * self.compile)

    def record(self) -> dict:
        """What ran, for checkpoints and ``--json``: device, the switches, the backend flags."""
        out = {"device": self.device.type, "precision": self.precision, "channels_last": self.channels_last,
               "compile": self.compile, "torch": torch.__version__}
        if self.device.type == "cuda":
            out.update(CUDA_BACKEND, gpu=torch.cuda.get_device_name(self.device))
        return out


def resolve_runtime(device: str = "auto", precision: str = "auto", channels_last: str | bool | None = "auto",
                    compile: bool = False) -> Runtime:
    """The ``Runtime`` of settings' ``device``, ``precision``, ``channels_last`` and ``compile``;
    on CUDA the backend flags are set (``configure_backends``)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        configure_backends()
    return Runtime(dev, resolve_precision(precision, dev), resolve_channels_last(channels_last, dev), bool(compile))


def runtime_of(settings) -> Runtime:
    """The ``Runtime`` a settings model asks for (fields it lacks take their defaults)."""
    return resolve_runtime(settings.device, getattr(settings, "precision", "auto"),
                           getattr(settings, "channels_last", "auto"), getattr(settings, "compile", False))
