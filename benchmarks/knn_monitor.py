"""The cost of one call of the kNN monitor (``advcl pretrain --monitor-every``), beside an epoch.

Times ``engine.monitor.Monitor`` (the training split as the bank, the test split attacked with
its 3-step feature-space PGD) on a fresh network, ``--calls`` times after one untimed warm-up
call, and one epoch of SimCLR pretraining on the same split (``epoch seconds`` in its
metrics.jsonl), and prints the fastest and median call with the load average. Unless
``--no-record`` the table goes to benchmarks/RESULTS.md.

Usage:

    python benchmarks/knn_monitor.py --dataset digits --arch resnet18-tiny --calls 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import device_name, record  # noqa: E402

HEADING = "## The kNN monitor's cost per call (benchmarks/knn_monitor.py)"


def main(argv=None):
    from advcl_cli.settings.layering import resolve
    from advcl_cli.data.registry import load_dataset
    from advcl_cli.engine.monitor import Monitor
    from advcl_cli.engine.pretrain import pretrain
    from advcl_cli.models import create_model
    from advcl_cli.settings import PretrainSettings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--arch", default="resnet18-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--calls", type=int, default=2, help="timed calls (after one untimed warm-up)")
    p.add_argument("--batch-size", type=int, default=64, help="batch of the SimCLR epoch")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    train, test = (load_dataset(args.dataset, split).to(device) for split in ("train", "test"))
    model = create_model(args.arch, bn_sets=("normal", "pgd")).to(device)
    monitor = Monitor(train, test, every=1, epochs=1, eps=8 / 255, seed=0)
    load = os.getloadavg()[0]
    times = []
    for i in range(args.calls + 1):
        t = time.perf_counter()
        monitor(model, 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as out:
        settings = resolve(PretrainSettings, dict(dataset=args.dataset, arch=args.arch, method="simclr", epochs=1,
                                                  batch_size=args.batch_size, device=args.device, out=out))
        epoch = pretrain(settings).metrics["seconds"]
    row = (f"| {args.dataset} | {args.arch} | {len(train)} / {len(test)} | {min(times):.1f} | "
           f"{statistics.median(times):.1f} | {epoch:.1f} (batch {args.batch_size}) |")
    text = "\n".join([
        f"{date.today()}, {device_name(device)}, load average {load:.1f} before the calls; torch {torch.__version__}",
        "",
        "| dataset | arch | bank / queries | call s (fastest) | call s (median) | SimCLR epoch s |",
        "|---|---|---|---|---|---|",
        row,
    ])
    print(text)
    if not args.no_record:
        record(HEADING, text)


if __name__ == "__main__":
    main()
