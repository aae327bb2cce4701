"""Images/s and peak memory of one pretraining step: ours beside a reference-style step.

``--method advcl`` (the default): both variants run the full AdvCL step (four contrastive
views, x_cl and x_ce attacked with 5 PGD steps, five pseudo-label heads with random labels,
backward, SGD step); ``--method acl``: the full ACL step (two views, both attacked with 5 PGD
steps in eval mode, the clean and adversarial NT-Xent, backward, SGD step). Both variants use
the same random CIFAR-sized images, each in its own subprocess so that peak memory is measured
apart:

- ``ours``: the images are a uint8 tensor on the device, augmented as whole batches there, and
  the clean views' forward passes are computed once per step (advcl_cli's engine path);
- ``reference``: the authors' way: per-image torchvision transforms on PIL images on the host
  (as their DataLoader does; here inline, as with num_workers=0), the batch moved to the
  device, and the step of ``tests/reference/advcl_step.py`` or ``tests/reference/acl_step.py``
  (the independent copies of the authors' steps the tests compare advcl with; AdvCL's
  recomputes every view at every PGD step and once more after the attack, ACL's attacks the
  interleaved pair), always fp32 and eager whatever ``--precision``/``--compile`` say.

The model FLOPs of one step are counted with torch's FLOP formulas during the warm-up step
(matmuls and convolutions, forward and backward); TFLOP/s is that count over the step's time,
and the fraction of the device's dense peak is given where the peak is known (benchmarks/
_common.py). The table is printed and, unless ``--no-record``, appended to RESULTS.md.

images/s is the batch over the fastest of ``--steps`` timed steps (after ``--warmup`` steps),
as other processes may share the CPU; the mean and the 1-minute load average are printed too.
Peak memory is the CUDA allocator's peak on a GPU and, on the CPU, the growth of the process's
peak resident set during the steps (above what it held after warm-up; the first peak includes
torch's own start-up). Usage:

    python benchmarks/pretrain_step.py --arch resnet18 --batch-size 32 --steps 2
    python benchmarks/pretrain_step.py --method acl --arch resnet18 --batch-size 32 --steps 2
    python benchmarks/pretrain_step.py --batch-size 512 --precision bf16 --compile   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from _common import RESULTS, peak_tflops, record

HEADING = "## Pretraining step (benchmarks/pretrain_step.py)"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# a table row that is a method with settings: its name -> its pretraining settings
VARIANTS = {"a-infonce": {"method": "advcl", "a_infonce": "iphn"}}


def measure(variant: str, args) -> dict:
    import numpy as np
    import torch

    from advcl_cli.config import resolve
    from advcl_cli.device import autocast, resolve_device, resolve_precision, runtime_of
    from advcl_cli.engine.pretrain import make_method
    from advcl_cli.models import create_model
    from advcl_cli.pseudolabels import DEFAULT_KS, save_labels
    from advcl_cli.settings import PretrainSettings

    from _common import FlopCount, device_name

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    reference = variant == "reference"
    precision = "fp32" if reference else resolve_precision(args.precision, device)
    b = args.batch_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = {k: torch.randint(0, k, (b,), generator=g) for k in DEFAULT_KS if k <= b}  # a k needs k images
    with tempfile.TemporaryDirectory() as tmp:
        path = save_labels(os.path.join(tmp, "pl.safetensors"), labels, dataset="bench", split="train", encoder="random")
        flags = dict(VARIANTS.get(args.method, {"method": args.method}), arch=args.arch, batch_size=b, device=device.type,
                     precision=precision, channels_last="auto" if not reference else "off")
        if flags["method"] == "advcl":
            flags["pseudo_labels"] = path
        if args.method == "deacl":  # a random SimCLR teacher of the same network
            from advcl_cli.checkpoint import save_model

            teacher = create_model(args.arch, bn_sets=("normal",), proj_dim=128)
            flags["teacher"] = str(save_model(os.path.join(tmp, "teacher.safetensors"), teacher, kind="encoder",
                                              method="simclr", dataset="bench"))
        settings = resolve(PretrainSettings, flags)
        method = make_method(settings, b, device)
    runtime = runtime_of(settings)
    torch.manual_seed(0)
    model = create_model(args.arch, **method.model_config(args.arch))
    model = (model.to(device) if reference else runtime.place(model)).train()
    method.init_model(model)
    if args.compile and not reference:
        runtime.compiled(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    indices = torch.arange(b, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    if variant == "ours":
        data = images.to(device)

        def step():
            with autocast(precision, device):
                return method.step(model, data, indices, gen)
    else:
        import torchvision.transforms as T
        from PIL import Image

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        pil = [Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy())) for img in images]

        def simclr(scale, interpolation):
            return T.Compose([
                T.RandomResizedCrop(32, scale=scale, interpolation=interpolation), T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2), T.ToTensor(),
            ])

        def batch(transform):
            return torch.stack([transform(im) for im in pil]).to(device)

        if args.method == "advcl":
            from reference.advcl_step import reference_step

            targets = [labels[int(name[1:])].to(device) for name in model.pseudo]  # heads "k2", "k10", ...
            view = simclr((0.2, 1.0), T.InterpolationMode.BILINEAR)
            crop_flip = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])

            def step():
                x1, x2, x_org = batch(view), batch(view), batch(crop_flip)
                uniform = torch.rand((2, *x_org.shape), generator=gen, device=device) * 2 - 1
                return reference_step(model, x1, x2, x_org, targets, uniform)["loss"], {}
        else:
            from reference.acl_step import reference_step as acl_step

            view = simclr((0.1, 1.0), T.InterpolationMode.BICUBIC)

            def step():
                x1, x2 = batch(view), batch(view)
                uniform = torch.rand((2, *x1.shape), generator=gen, device=device) * 2 - 1
                return acl_step(model, x1, x2, uniform)["loss"], {}

    def train_step():
        loss, _ = step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    with FlopCount() as counter:
        train_step()
    flops = counter.total
    for _ in range(args.warmup - 1):
        train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        train_step().item()  # .item() waits for the device
        times.append(time.perf_counter() - t0)
    seconds = min(times)  # the least disturbed step (the CPU may be shared)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_rss_mb() - base_rss
    return {
        "variant": variant,
        "images_per_s": b / seconds,
        "seconds_per_step": seconds,
        "mean_seconds_per_step": sum(times) / len(times),
        "load_average": os.getloadavg()[0],
        "peak_memory_mb": peak,
        "gflop_per_image": flops / b / 1e9,
        "tflops": flops / seconds / 1e12,
        "device": device_name(device),
        "precision": precision,
        "compiled": bool(args.compile and not reference),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="advcl", choices=["advcl", "acl"])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (the fastest is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1; the first counts FLOPs)")
    parser.add_argument("--compile", action="store_true", help="torch.compile ours (GPU)")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 or auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variant", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process: one variant, one JSON line
        print(json.dumps(measure(args.variant, args)))
        return
    results = {}
    for variant in ("reference", "ours"):
        cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{variant} failed:\n{proc.stderr}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref, ours = results["reference"], results["ours"]
    peak = peak_tflops(ours["device"], ours["precision"])
    lines = [
        f"{date.today().isoformat()}, {ours['device']}; {args.method} step, {args.arch}, batch {args.batch_size}, "
        f"torch {ours['torch']}, load average {ours['load_average']:.1f}",
        "",
        "| step | precision | images/s | s/step (best / mean) | peak MB | GFLOP/image | TFLOP/s | of peak | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (ref, ours):
        label = r["variant"] + (" (compiled)" if r["compiled"] else "")
        p = peak_tflops(r["device"], r["precision"])
        share = f"{r['tflops'] / p:.1%}" if p else "n/a"
        lines.append(
            f"| {label} | {r['precision']} | {r['images_per_s']:.2f} | {r['seconds_per_step']:.3f} / "
            f"{r['mean_seconds_per_step']:.3f} | {r['peak_memory_mb']:.0f} | {r['gflop_per_image']:.1f} | "
            f"{r['tflops']:.3g} | {share} | {r['images_per_s'] / ref['images_per_s']:.2f}x |"
        )
    text = "\n".join(lines)
    print(text)
    if peak is None:
        print("(no known peak for this device and precision: 'of peak' is n/a)", file=sys.stderr)
    if not args.no_record:
        record(HEADING, text)
        print(f"appended to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
