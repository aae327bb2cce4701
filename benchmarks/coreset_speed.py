"""What RCS's coreset saves: ACL with ``--coreset 0.2`` beside full ACL, in the same run.

Two pretraining runs through the engine, one after the other in this process, with the same
settings (ACL on the offline digits data, resnet18-tiny, batch 128, the method's 5-step attack,
``--image-size``): full ACL for ``--epochs`` E epochs, and ACL with ``--coreset 0.2`` for E + 1
epochs whose warm-up is scaled down (``--coreset-warmup E+1 --coreset-every E``: E epochs on
every image, then a selection and one epoch on the coreset). It reports the seconds of a
full-data epoch (both runs), of a coreset epoch and of one selection (the greedy, its attacks
and gradients); the measured cost of a coreset epoch with a selection beside a full epoch; and
the cost of the authors' schedule (1000 epochs, 100 of warm-up, a selection every 20) from the
measured pieces, against 1000 full epochs: the pretraining cost RCS claims to cut.

Usage (about 20 minutes on 2 loaded CPU cores at the defaults):

    python benchmarks/coreset_speed.py --out runs/coreset-speed [--epochs 2] [--image-size 16] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path

import torch

from _common import device_name, record

HEADING = "## RCS coreset: pretraining cost of ACL with --coreset 0.2 (benchmarks/coreset_speed.py)"


def run(out: Path, epochs: int, image_size: int, **extra) -> dict:
    from advcl_cli.settings.layering import resolve
    from advcl_cli.engine.pretrain import pretrain
    from advcl_cli.methods import rcs
    from advcl_cli.settings import PretrainSettings

    settings = resolve(PretrainSettings, {"method": "acl", "dataset": "digits", "arch": "resnet18-tiny",
                                          "batch_size": 128, "epochs": epochs, "warmup_epochs": 0, "device": "cpu",
                                          "image_size": image_size,
                                          "out": out, **extra})
    selections, real = [], rcs.select

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        found = real(*args, **kwargs)
        selections.append(time.perf_counter() - t0)
        return found

    rcs.select = timed
    try:
        t0 = time.perf_counter()
        pretrain(settings, force=True)
        total = time.perf_counter() - t0
    finally:
        rcs.select = real
    epochs_run = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"total": total, "epochs": [e["seconds"] for e in epochs_run], "selections": selections}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/coreset-speed"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    e = args.epochs
    full = run(args.out / "full", e, args.image_size)
    core = run(args.out / "coreset", e + 1, args.image_size, coreset=0.2, coreset_warmup=e + 1, coreset_every=e)
    t_full = sum(full["epochs"] + core["epochs"][:e]) / (2 * e)
    t_core = core["epochs"][e]
    t_sel = sum(core["selections"]) / len(core["selections"])
    # the authors' schedule: 100 full epochs, 900 on the coreset, selections before 1-based 101, 121, ..., 981
    authors = (100 * t_full + 900 * t_core + 45 * t_sel) / (1000 * t_full)
    load = os.getloadavg()
    rows = [
        "| | full ACL | ACL --coreset 0.2 |",
        "|---|---|---|",
        f"| epoch on every image (s) | {sum(full['epochs']) / e:.1f} | {sum(core['epochs'][:e]) / e:.1f} |",
        f"| epoch on the coreset (s) | | {t_core:.1f} |",
        f"| one selection (s) | | {t_sel:.1f} |",
        f"| whole run (s) | {full['total']:.0f} ({e} epochs) | {core['total']:.0f} ({e} + 1 epochs) |",
    ]
    text = "\n".join([
        f"{date.today()}, {device_name(torch.device('cpu'))}, fp32; load average {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} (1 / 5 / 15 min) at the end. ACL on digits (1437 images at {args.image_size}x{args.image_size}; "
        f"the coreset run holds out 15 to select on), resnet18-tiny, batch 128, PGD-5; the coreset run: `--coreset 0.2 "
        f"--coreset-warmup {e + 1} --coreset-every {e}` (2 batches of 128 chosen from 12 candidates).",
        "",
        *rows,
        "",
        f"A coreset epoch costs **{t_core / t_full:.2f}** of a full one, a selection {t_sel / t_full:.2f} full epochs "
        f"(a coreset epoch with a selection before it: {(t_core + t_sel) / t_full:.2f}). "
        f"With the authors' schedule (1000 epochs, 100 on every image, a selection every 20 epochs) these pieces "
        f"give **{authors:.2f}** of full ACL's pretraining cost (the paper: about 0.28 of DynACL's at fraction 0.2 "
        f"on CIFAR-10 with a GPU).",
    ])
    print(text)
    if not args.no_record:
        record(HEADING, text)


if __name__ == "__main__":
    main()
