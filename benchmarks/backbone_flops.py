"""GFLOP per image of every backbone in the model registry: one forward, one forward plus the
backward of a training step (weight gradients), and one attack step (a forward plus the
gradient of the loss with respect to the input, as each PGD step) of the classifier (backbone + a 10-class
linear head) on 32x32 images, counted with torch's FLOP formulas (``_common.FlopCount``:
matmuls and convolutions). Nothing is computed: the model and images live on the ``meta``
device, so the count needs no GPU and takes seconds. The table is printed and, unless
``--no-record``, added to RESULTS.md. Usage:

    python benchmarks/backbone_flops.py
"""

from __future__ import annotations

import argparse
from datetime import date

import torch
import torch.nn.functional as F

from _common import FlopCount, record

HEADING = "## GFLOP per image of each backbone (benchmarks/backbone_flops.py)"


def count(arch: str, batch: int = 2, size: int = 32) -> tuple[float, float, float, float]:
    """(parameters in millions, GFLOP per image of the forward, the forward + backward and the
    attack step)."""
    from advcl_cli.models import create_model

    with torch.device("meta"):
        net = create_model(arch, num_classes=10).train()
        x, y = torch.rand(batch, 3, size, size), torch.zeros(batch, dtype=torch.long)
    with FlopCount() as fwd:
        logits = net(x)
    with FlopCount() as bwd:
        F.cross_entropy(logits, y).backward()
    net.requires_grad_(False)
    x.requires_grad_(True)
    with FlopCount() as attack:
        torch.autograd.grad(F.cross_entropy(net(x), y), x)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    return params, *(n / batch / 1e9 for n in (fwd.total, fwd.total + bwd.total, attack.total))


def main() -> None:
    from advcl_cli.models import ARCHS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-record", action="store_true", help="print only; do not add to RESULTS.md")
    args = parser.parse_args()
    lines = [f"{date.today().isoformat()}, torch {torch.__version__}; classifier with 10 classes, 32x32 images, "
             "train mode, counted on the meta device (no device time); GFLOP per image", "",
             "| arch | parameters (M) | forward | forward + backward | attack step (forward + input gradient) |",
             "|---|---|---|---|---|"]
    for arch in ARCHS:
        params, *gflop = count(arch)
        lines.append(f"| {arch} | {params:.2f} | " + " | ".join(f"{g:.3f}" for g in gflop) + " |")
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        record(HEADING, text)


if __name__ == "__main__":
    main()
