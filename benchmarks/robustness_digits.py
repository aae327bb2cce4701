"""Does each method produce robustness? The method family on the offline digits data.

Pretrains one encoder per method (SimCLR, AdvCL, A-InfoNCE: AdvCL with ``--a-infonce iphn``,
ACL, DynACL, ACL-AIR, DeACL, RoCL, and RCS: ACL on a coreset of 0.2) with the same architecture, epochs, batch and seed; each method keeps
its own loss, attack, optimiser and learning rate, and the schedules the authors give in epochs
(warm-up, DynACL's strength blocks, RCS's first selection and selection interval, A-InfoNCE's
measuring epochs) are scaled to
the shorter run. The ``autolora`` row finetunes the ACL encoder with AutoLoRa (``--scheme
autolora``, ``--autolora-epochs``, its own learning-rate rule) instead of SLF; its "SLF" minutes
are AutoLoRa's. AdvCL and A-InfoNCE get ClusterFit pseudo labels clustered from the SimCLR
encoder (``advcl pseudo-labels``) and DeACL distils that same SimCLR encoder, so the SimCLR run
is their common start (``--simclr CKPT`` reuses one: no SimCLR row then). Each encoder is finetuned with SLF (frozen encoder, linear head on clean
images, the same head settings for all) and evaluated on the digits test split at 8/255: clean
accuracy (SA) and PGD-20 on all 360 test images, the standard AutoAttack on the first 120
(``--aa-limit``: on two CPU cores it costs minutes per hundred robust images). Everything goes
through the CLI (``python -m advcl_cli ...``) as a user would run it. Prints a
table and writes a bar chart PNG; unless ``--no-record`` it appends the table to
benchmarks/RESULTS.md and copies the chart beside it (benchmarks/robustness-digits.png).

Usage (about an hour on 2 CPU cores):

    python benchmarks/robustness_digits.py --out runs/robustness-digits
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from _common import RESULTS, device_name, record

HEADING = "## Robustness on digits: the method family (benchmarks/robustness_digits.py)"
METHODS = ("simclr", "advcl", "a-infonce", "acl", "dynacl", "air", "deacl", "rocl", "rcs", "autolora")
# the authors' run lengths, for scaling the schedules they give in epochs
FULL_EPOCHS = {"acl": 1000, "dynacl": 1000, "air": 1000, "deacl": 100, "rocl": 1000, "rcs": 1000,
               "a-infonce": 400}
PRETRAIN = {"rcs": "acl", "a-infonce": "advcl"}  # rows whose pretraining method has another name
FINETUNED = {"autolora": "acl"}  # rows that finetune another row's encoder with their own scheme


def advcl(*args, env) -> str:
    """Run ``advcl ARGS``; stderr streams to ours, stdout (the data) is returned."""
    cmd = [sys.executable, "-m", "advcl_cli", *map(str, args)]
    print("$ advcl " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"advcl {args[0]} failed with exit code {done.returncode}")
    return done.stdout.strip()


def scaled(epochs: int, method: str, authors: int) -> int:
    """An ``authors``-epoch part of ``method``'s schedule, scaled from its full run to ``epochs``."""
    return round(authors * epochs / FULL_EPOCHS[method])


def method_flags(method: str, epochs: int, teacher: str, labels: str) -> list:
    """What each method needs beyond the common budget."""
    if method == "advcl":
        return ["--pseudo-labels", labels]
    if method == "a-infonce":  # AdvCL's loss made asymmetric; the authors measure for 30 of 400 epochs
        return ["--pseudo-labels", labels, "--a-infonce", "iphn",
                "--stpg-adaptive-epochs", max(1, scaled(epochs, method, 30))]
    if method == "deacl":
        return ["--teacher", teacher, "--warmup-epochs", scaled(epochs, method, 10)]
    if method in ("acl", "air", "rocl"):
        return ["--warmup-epochs", scaled(epochs, method, 10)]
    if method == "rcs":  # the authors' --warmup 100 --fre 20 --fraction 0.2, on ACL's schedule
        return ["--warmup-epochs", scaled(epochs, method, 10), "--coreset", 0.2,
                "--coreset-warmup", max(1, scaled(epochs, method, 100)),
                "--coreset-every", max(1, scaled(epochs, method, 20))]
    if method == "dynacl":
        return ["--warmup-epochs", scaled(epochs, method, 10), "--strength-block", max(1, scaled(epochs, method, 50))]
    return []


def pseudo_labels(simclr: str, common: list, out: Path, env) -> str:
    """AdvCL's and A-InfoNCE's pseudo labels, clustered from the SimCLR encoder."""
    return advcl("pseudo-labels", "--encoder", simclr, *common, "--out", out / "pseudo-labels.safetensors", "--force",
                 env=env)


def chart(results: dict, path: Path, title: str) -> Path:
    """SA, PGD-20 and AutoAttack accuracy (%) per method, one group of bars per method."""
    from advcl_cli.plots import require_matplotlib, save_figure

    plt = require_matplotlib()
    columns = ("SA", "PGD-20", "AutoAttack")
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(columns)
    for j, column in enumerate(columns):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(results))]
        ax.bar(xs, [100 * row[column] for row in results.values()], width, label=column, color=f"C{j}")
    ax.set_xticks(range(len(results)), list(results))
    ax.set_ylabel("accuracy (%), eps 8/255")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/robustness-digits"))
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated; simclr always runs (the others' start) unless --simclr")
    p.add_argument("--simclr", type=Path, help="reuse this SimCLR encoder as the others' start (no SimCLR row)")
    p.add_argument("--arch", default="resnet18-tiny")
    p.add_argument("--epochs", type=int, default=15, help="pretraining epochs, every method")
    p.add_argument("--batch-size", type=int, default=128, help="pretraining batch, every method")
    p.add_argument("--slf-epochs", type=int, default=25)
    p.add_argument("--slf-batch-size", type=int, default=128)
    p.add_argument("--slf-lr", type=float, default=0.1)
    p.add_argument("--autolora-epochs", type=int, default=3,
                   help="the autolora row's finetuning epochs (the authors' 50 cost minutes each on 2 CPU cores)")
    p.add_argument("--aa-limit", type=int, default=120,
                   help="AutoAttack on the first N test images (0: all 360; SA and PGD-20 always use all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda, for every step")
    p.add_argument("--threads", type=int, default=0, help="OMP threads for every step (default: torch's choice)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    methods = {"simclr", *filter(None, args.methods.split(","))}
    unknown = sorted(methods - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    for row, source in FINETUNED.items():
        if row in methods and source not in methods:
            p.error(f"{row} finetunes the {source} encoder: add {source} to --methods")
    methods = [m for m in METHODS if m in methods and not (m == "simclr" and args.simclr)]  # sources first

    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    out = args.out
    common = ["-d", "digits", "--seed", args.seed, "--device", args.device]
    budget = [*common, "--arch", args.arch, "--epochs", args.epochs, "--batch-size", args.batch_size, "--force"]
    aa_limit = ["--limit", args.aa_limit] if args.aa_limit else []
    t0 = time.perf_counter()
    enc, labels, results = {}, "", {}
    if args.simclr:
        enc["simclr"] = str(args.simclr)
        labels = pseudo_labels(enc["simclr"], common, out, env)

    for method in methods:
        t = time.perf_counter()
        if method in FINETUNED:
            enc[method], scheme = enc[FINETUNED[method]], method
        else:
            flags = method_flags(method, args.epochs, enc.get("simclr", ""), labels)
            enc[method], scheme = advcl("pretrain", *budget, "--method", PRETRAIN.get(method, method), *flags,
                                        "--out", out / method, env=env), "slf"
        pretrain = time.perf_counter() - t
        if method == "simclr":
            t = time.perf_counter()
            labels = pseudo_labels(enc["simclr"], common, out, env)
            pretrain += time.perf_counter() - t  # AdvCL's labels are part of the SimCLR run's cost
        t = time.perf_counter()
        head = ["--epochs", args.slf_epochs, "--lr", args.slf_lr] if scheme == "slf" else ["--epochs", args.autolora_epochs]
        # finetuning ends with SA and PGD-20 (eps 8/255, 20 steps of 2/255) on the whole test split
        tuned = json.loads(advcl("finetune", enc[method], "--scheme", scheme, *common, *head,
                                 "--batch-size", args.slf_batch_size,
                                 "--out", out / (f"{method}-slf" if scheme == "slf" else method), "--force", "--json", env=env))
        slf = time.perf_counter() - t
        t = time.perf_counter()
        aa = json.loads(advcl("eval", tuned["path"], "--attack", "autoattack", *aa_limit, "--eps", "8/255",
                              "--seed", args.seed, "--device", args.device, "--json", env=env))
        m = tuned["metrics"]
        results[method] = {"SA": m["clean_acc"], "PGD-20": m["pgd20_acc"], "AutoAttack": aa["robust"][0]["robust_acc"],
                           "AA SA": aa["clean_acc"], "n": m["n_eval"], "aa_n": aa["n"], "pretrain_s": pretrain,
                           "slf_s": slf, "eval_s": time.perf_counter() - t}
        print(f"{method}: {json.dumps(results[method])}", file=sys.stderr, flush=True)
    total = time.perf_counter() - t0

    import torch

    png = chart(results, out / "robustness-digits.png",
                f"SLF on digits ({args.arch}, {args.epochs} pretraining epochs, batch {args.batch_size})")
    n, aa_n = next(iter(results.values()))["n"], next(iter(results.values()))["aa_n"]
    lines = [
        f"{date.today().isoformat()}, {device_name(torch.device(args.device))}"
        f"{f' (OMP_NUM_THREADS={args.threads})' if args.threads else ''}; {args.arch}, pretraining {args.epochs} "
        f"epochs at batch {args.batch_size} for every method (each with its own optimiser and lr); SLF "
        f"{args.slf_epochs} epochs, batch {args.slf_batch_size}, lr {args.slf_lr}"
        f"{f' (autolora: AutoLoRa in place of SLF, {args.autolora_epochs} epochs)' if 'autolora' in results else ''}; digits test split, n={n} "
        f"(AutoAttack: the first {aa_n}); eps 8/255; total {total / 60:.1f} min"
        f"{f'; the SimCLR encoder (pseudo labels, teacher): {args.simclr}' if args.simclr else ''}",
        "",
        f"| method | SA | PGD-20 | AutoAttack (n={aa_n}) | SA (n={aa_n}) | pretraining min | SLF + PGD-20 min | AutoAttack min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, row in results.items():
        pretrain = f"({FINETUNED[method]}'s)" if method in FINETUNED else f"{row['pretrain_s'] / 60:.1f}"
        lines.append(f"| {method} | {100 * row['SA']:.2f} | {100 * row['PGD-20']:.2f} | {100 * row['AutoAttack']:.2f} "
                     f"| {100 * row['AA SA']:.2f} | {pretrain} | {row['slf_s'] / 60:.1f} | {row['eval_s'] / 60:.1f} |")
    text = "\n".join(lines)
    print(text)
    print(f"chart: {png}", file=sys.stderr)
    if not args.no_record:
        shutil.copyfile(png, RESULTS.with_name(png.name))
        record(HEADING, f"{text}\n\n![SA, PGD-20 and AutoAttack per method]({png.name})")
        print(f"appended to {RESULTS}, chart copied beside it", file=sys.stderr)


if __name__ == "__main__":
    main()
