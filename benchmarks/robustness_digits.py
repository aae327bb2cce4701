"""Does the pipeline produce robustness? AdvCL against SimCLR on the offline digits data.

Pretrains a ``simclr`` and an ``advcl`` encoder with the same architecture and budget (epochs,
batch, lr), the AdvCL one with ClusterFit pseudo labels made from the SimCLR encoder (the
faithful recipe: ``advcl pseudo-labels``), finetunes each with SLF (frozen encoder, linear head
on clean images), and evaluates both on the whole digits test split (360 images): clean
accuracy (SA) and PGD-20 robust accuracy (RA) at several eps. Everything goes through the CLI
(``python -m advcl_cli ...``) as a user would run it. Prints a table, writes a
robustness-vs-eps PNG, and appends the table to benchmarks/RESULTS.md unless ``--no-record``.

Usage (about 12 minutes on 2 busy CPU cores with one thread):

    python benchmarks/robustness_digits.py --out runs/robustness-digits --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from _common import RESULTS, device_name, record

HEADING = "## Robustness on digits: AdvCL vs SimCLR (benchmarks/robustness_digits.py)"


def advcl(*args, env) -> str:
    """Run ``advcl ARGS``; stderr streams to ours, stdout (the data) is returned."""
    cmd = [sys.executable, "-m", "advcl_cli", *map(str, args)]
    print("$ advcl " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"advcl {args[0]} failed with exit code {done.returncode}")
    return done.stdout.strip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/robustness-digits"))
    p.add_argument("--arch", default="resnet18-tiny")
    p.add_argument("--epochs", type=int, default=15, help="pretraining epochs, both methods")
    p.add_argument("--batch-size", type=int, default=128, help="pretraining batch, both methods")
    p.add_argument("--lr", type=float, default=0.5, help="pretraining peak lr, both methods")
    p.add_argument("--slf-epochs", type=int, default=25)
    p.add_argument("--slf-batch-size", type=int, default=128)
    p.add_argument("--slf-lr", type=float, default=0.1)
    p.add_argument("--eps", default="2/255,4/255,8/255,16/255")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda, for every step")
    p.add_argument("--threads", type=int, default=0, help="OMP threads for every step (default: torch's choice)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    out = args.out
    common = ["-d", "digits", "--seed", args.seed, "--device", args.device]
    pre = [*common, "--arch", args.arch, "--epochs", args.epochs, "--batch-size", args.batch_size, "--lr", args.lr, "--force"]
    t0 = time.perf_counter()
    times = {}

    t = time.perf_counter()
    enc = {"simclr": advcl("pretrain", *pre, "--method", "simclr", "--out", out / "simclr", env=env)}
    times["simclr pretrain"] = time.perf_counter() - t
    t = time.perf_counter()
    labels = advcl("pseudo-labels", "--encoder", enc["simclr"], *common, "--out", out / "pseudo-labels.safetensors", "--force", env=env)
    times["pseudo labels"] = time.perf_counter() - t
    t = time.perf_counter()
    enc["advcl"] = advcl("pretrain", *pre, "--method", "advcl", "--pseudo-labels", labels, "--out", out / "advcl", env=env)
    times["advcl pretrain"] = time.perf_counter() - t

    results = {}
    for method in ("advcl", "simclr"):
        t = time.perf_counter()
        clf = advcl(
            "finetune", enc[method], "--scheme", "slf", *common, "--epochs", args.slf_epochs,
            "--batch-size", args.slf_batch_size, "--lr", args.slf_lr,
            "--out", out / f"{method}-slf", "--force", env=env,
        )
        times[f"{method} slf"] = time.perf_counter() - t
        t = time.perf_counter()
        doc = json.loads(advcl("eval", clf, "--attack", "pgd20", "--eps", args.eps, "--seed", args.seed, "--device", args.device, "--json", env=env))
        times[f"{method} eval"] = time.perf_counter() - t
        results[method] = doc
    total = time.perf_counter() - t0

    import torch

    from advcl_cli.plots import robustness_curve

    png = robustness_curve(results, out / "robustness-digits.png", title=f"SLF on digits ({args.arch}, {args.epochs} pretraining epochs)")

    eps_labels = [r["eps_label"] for r in results["advcl"]["robust"]]
    lines = [
        f"{date.today().isoformat()}, {device_name(torch.device(args.device))}{f' (OMP_NUM_THREADS={args.threads})' if args.threads else ''}; {args.arch}, pretraining {args.epochs} epochs, batch {args.batch_size}, lr {args.lr} "
        f"(both methods); SLF {args.slf_epochs} epochs, batch {args.slf_batch_size}, lr {args.slf_lr}; "
        f"digits test split, n={results['advcl']['n']}; total {total / 60:.1f} min",
        "",
        "| encoder | SA | " + " | ".join(f"PGD-20 RA @ {e}" for e in eps_labels) + " |",
        "|---|---|" + "---|" * len(eps_labels),
    ]
    for method, doc in results.items():
        ras = " | ".join(f"{100 * r['robust_acc']:.2f}" for r in doc["robust"])
        lines.append(f"| {method} + SLF | {100 * doc['clean_acc']:.2f} | {ras} |")
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())]
    text = "\n".join(lines)
    print(text)
    print(f"plot: {png}", file=sys.stderr)
    if not args.no_record:
        record(HEADING, text)
        print(f"appended to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
