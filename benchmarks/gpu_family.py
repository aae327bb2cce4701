"""The whole family on one device, in one run: what a 1000-epoch run and a benchmark cell cost.

For every pretraining method: the step at ``--batch-size`` in ``--precision`` (bf16 on a GPU),
eager and compiled, through advcl's engine path (``pretrain_step.measure``: data as uint8 on
the device, batched augmentation, the method's step, backward, SGD), and for AdvCL and ACL the
reference-style step beside it (per-image host transforms, the clean views recomputed; the
other methods' reference steps in tests/reference take other inputs and are not timed here).
Each row: images/s, peak memory, GFLOP per image (torch's FLOP formulas), the fraction of the
device's dense bf16 peak, and the estimated hours of a 1000-epoch CIFAR-10 run (50,000 images
an epoch at the compiled step's rate, or the eager one's without ``--compile``).

Then evaluation over ``--n`` CIFAR-sized images: PGD-20 and AutoAttack (standard) through
``advcl_cli.engine.evaluate`` on a resnet18 classifier whose BN statistics are set from the
images (an untrained network: AutoAttack stops on an image once it is broken, so a robust
model costs more; the row says how many images survived), and the AFF finetuning step (TRADES,
10 steps) at batch 128. One benchmark cell is estimated as 25 AFF epochs of 50,000 images plus
PGD-20 and AutoAttack on 10,000 test images at the measured rates.

The table goes to stdout and to ``--results`` (default benchmarks/RESULTS.md, section
"GPU family"). ``--dry-run`` is the same code at toy sizes on the CPU (resnet18-tiny, batch 8,
32 images, 1 timed step, only SimCLR compiled), written to a temporary file unless ``--results`` says otherwise:
CI runs it so the script cannot rot. Usage (benchmarks/gpu.sh runs it):

    python benchmarks/gpu_family.py                     # on a GPU: batch 512, bf16, compiled
    python benchmarks/gpu_family.py --dry-run           # on the CPU, minutes
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from argparse import Namespace
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, device_name, peak_tflops, record  # noqa: E402
from pretrain_step import measure  # noqa: E402

HEADING = "## GPU family (benchmarks/gpu_family.py)"
METHODS = ["advcl", "a-infonce", "acl", "dynacl", "air", "dynacl-air", "deacl", "rocl", "simclr"]  # a-infonce: AdvCL + --a-infonce iphn
REFERENCE = {"advcl", "acl"}  # methods whose reference-style step pretrain_step.py times
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pretraining_rows(args) -> list[dict]:
    rows = []
    for method in args.methods:
        compiled = args.compile and method in args.compile_methods
        variants = [("ours", False)] + [("ours", True)] * compiled + [("reference", False)] * (method in REFERENCE)
        for variant, compiled in variants:
            ns = Namespace(method=method, arch=args.arch, batch_size=args.batch_size, steps=args.steps,
                           warmup=args.warmup + (1 if compiled else 0), compile=compiled, device=args.device,
                           precision=args.precision, threads=0)
            r = measure(variant, ns)
            r["method"] = method
            rows.append(r)
            print(f"{method} {variant}{' compiled' if compiled else ''}: {r['images_per_s']:.1f} img/s", file=sys.stderr)
    return rows


def calibrated_classifier(arch: str, images: torch.Tensor, device):
    """An untrained classifier whose BN statistics are the images' (its predictions vary)."""
    from advcl_cli.models import create_model

    torch.manual_seed(0)
    net = create_model(arch, bn_sets=("normal",), num_classes=10)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    net.to(device).train()
    with torch.no_grad():
        for chunk in images[:1024].split(256):
            net(chunk.to(device).float() / 255)
    return net.eval()


def evaluation_rows(args, device) -> list[dict]:
    from advcl_cli.data.registry import ImageData
    from advcl_cli.engine.evaluate import evaluate

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, generator=g)
    model = calibrated_classifier(args.arch, images, device)
    with torch.no_grad():  # labels: the clean predictions, so every image gives the attacks work
        labels = torch.cat([model(c.to(device).float() / 255).argmax(1).cpu() for c in images.split(256)])
    data = ImageData(images, labels, 10, [str(i) for i in range(10)], "bench").to(device)
    rows = []
    for attack, n in (("pgd20", args.n), ("autoattack", args.n_autoattack)):
        part = ImageData(data.images[:n], data.labels[:n], 10, data.classes, "bench")
        _sync(device)
        t0 = time.perf_counter()
        res = evaluate(model, part, [attack], [8 / 255], batch_size=args.eval_batch_size, device=device,
                       precision="fp32")
        _sync(device)
        seconds = time.perf_counter() - t0
        rows.append({"attack": attack, "n": n, "seconds": seconds, "images_per_s": n / seconds,
                     "robust_acc": res["robust"][0]["robust_acc"]})
        print(f"{attack}: {n / seconds:.1f} img/s", file=sys.stderr)
    return rows


def aff_rate(args, device) -> float:
    """Images/s of the AFF finetuning step (TRADES, 10 attack steps), the benchmark's costliest."""
    from advcl_cli.device import Runtime, resolve_channels_last
    from advcl_cli.engine.finetune import trades_step
    from advcl_cli.models import create_model

    runtime = Runtime(device, args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32"),
                      resolve_channels_last("auto", device), False)
    torch.manual_seed(0)
    model = runtime.place(create_model(args.arch, bn_sets=("normal",), num_classes=10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    b = args.aff_batch_size
    x = torch.rand(b, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (b,), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    s = Namespace(eps=8 / 255, attack_steps=10, attack_step_size=2 / 255, trades_beta=6.0)

    def step():
        loss, _ = trades_step(model, x, y, gen, runtime.precision, device, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(args.warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    return b * args.steps / (time.perf_counter() - t0)


def table(args, device, pre: list[dict], ev: list[dict], aff: float) -> str:
    name = device_name(device)
    lines = [f"{date.today().isoformat()}, {name}; {args.arch}, batch {args.batch_size}, torch {torch.__version__}"
             + (" (dry run: toy sizes, the figures say nothing of a GPU)" if args.dry_run else ""), "",
             "| method | step | precision | images/s | peak MB | GFLOP/image | of peak | 1000 epochs (h) |",
             "|---|---|---|---|---|---|---|---|"]
    for method in args.methods:
        mine = [r for r in pre if r["method"] == method]
        best = max((r for r in mine if r["variant"] == "ours"), key=lambda r: r["images_per_s"])
        for r in mine:
            label = r["variant"] + (" compiled" if r["compiled"] else "")
            peak = peak_tflops(r["device"], r["precision"])
            share = f"{r['tflops'] / peak:.1%}" if peak else "n/a"
            hours = CIFAR_TRAIN * 1000 / r["images_per_s"] / 3600
            mark = " (fastest)" if r is best else ""
            lines.append(f"| {method} | {label}{mark} | {r['precision']} | {r['images_per_s']:.1f} | "
                         f"{r['peak_memory_mb']:.0f} | {r['gflop_per_image']:.1f} | {share} | {hours:.1f} |")
    lines += ["", "| evaluation (fp32) | images | images/s | robust acc | 10,000 images (min) |", "|---|---|---|---|---|"]
    for r in ev:
        lines.append(f"| {r['attack']} | {r['n']} | {r['images_per_s']:.1f} | {r['robust_acc']:.3f} | "
                     f"{CIFAR_TEST / r['images_per_s'] / 60:.1f} |")
    rate = {r["attack"]: r["images_per_s"] for r in ev}
    cell = 25 * CIFAR_TRAIN / aff + CIFAR_TEST / rate["pgd20"] + CIFAR_TEST / rate["autoattack"]
    lines += ["", f"AFF step (TRADES, 10 steps, batch {args.aff_batch_size}): {aff:.1f} images/s; one benchmark "
              f"cell (25 AFF epochs + PGD-20 + AutoAttack on 10,000 test images): {cell / 3600:.2f} h estimated."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (what CI runs)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--arch", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--precision", default="auto")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-methods", default=None, help="methods timed compiled too (default: all; dry run: simclr)")
    p.add_argument("--n", type=int, default=None, help="images for PGD-20")
    p.add_argument("--n-autoattack", type=int, default=None, help="images for AutoAttack")
    p.add_argument("--results", type=Path, default=None, help="where the table goes (default RESULTS.md)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    dry = args.dry_run
    args.compile_methods = (args.compile_methods or ("simclr" if dry else ",".join(args.methods))).split(",")
    args.device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        sys.exit("gpu_family.py: no CUDA GPU is visible (use --dry-run on a CPU)")
    args.arch = args.arch or ("resnet18-tiny" if dry else "resnet18")
    args.batch_size = args.batch_size or (8 if dry else 512)
    args.n = args.n or (32 if dry else 10_000)
    args.n_autoattack = args.n_autoattack or (16 if dry else 1_000)
    args.eval_batch_size = 16 if dry else 1_000
    args.aff_batch_size = 8 if dry else 128
    args.steps, args.warmup = (1, 1) if dry else (5, 2)
    results = args.results or (Path(tempfile.mkdtemp()) / "RESULTS.md" if dry else RESULTS)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    text = table(args, device, pretraining_rows(args), evaluation_rows(args, device), aff_rate(args, device))
    text += f"\n\nThe whole run took {time.perf_counter() - t0:.0f} s."
    print(text)
    record(HEADING, text, results)
    print(f"appended to {results}", file=sys.stderr)


if __name__ == "__main__":
    main()
