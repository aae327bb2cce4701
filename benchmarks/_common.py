"""What the benchmark scripts share: the device's name, its peak, and recording to RESULTS.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).with_name("RESULTS.md")

# dense peak TFLOP/s of the tensor cores, by device-name fragment and precision (vendor sheets)
PEAK_TFLOPS = {
    ("H100 80GB HBM3", "bf16"): 989.4, ("H100 SXM", "bf16"): 989.4, ("H100 PCIe", "bf16"): 756.5,
    ("H100 NVL", "bf16"): 835.5, ("H200", "bf16"): 989.4, ("A100", "bf16"): 312.0,
    ("H100 80GB HBM3", "fp32"): 494.7, ("H100 SXM", "fp32"): 494.7, ("H100 PCIe", "fp32"): 378.0,
    ("H200", "fp32"): 494.7, ("A100", "fp32"): 156.0,  # TF32 tensor cores for fp32 matmuls/convs
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def peak_tflops(name: str, precision: str) -> float | None:
    """The device's dense peak for ``precision``, if known (None for CPUs and unknown GPUs)."""
    for (fragment, prec), value in PEAK_TFLOPS.items():
        if fragment in name and prec == precision:
            return value
    return None


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of matmuls and convolutions (forward and backward) with torch's own
    formulas (torch.utils.flop_counter), without its module tracking, whose hooks do not allow
    ``torch.autograd.grad`` on leaf inputs as the PGD attack uses."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.registry = FlopCounterMode(display=False).flop_registry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def record(heading: str, text: str, results: Path = RESULTS) -> None:
    """Add ``text`` at the end of the section ``heading`` of ``results`` (made when missing)."""
    old = results.read_text() if results.exists() else "# Benchmark results\n"
    if heading not in old:
        results.write_text(old.rstrip("\n") + f"\n\n{heading}\n\n{text}\n")
        return
    start = old.index(heading) + len(heading)
    end = old.find("\n## ", start)
    end = len(old) if end < 0 else end + 1
    results.write_text(old[:end].rstrip("\n") + f"\n\n{text}\n" + ("\n" + old[end:] if end < len(old) else ""))
