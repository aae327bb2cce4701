"""PGD-20 evaluation images/s: advcl's evaluation engine beside a reference-style loop, same run.

Both evaluate the same randomly initialised classifier (``--arch``, 10 classes) on the same
``--n`` random 32x32 images labelled with its own clean predictions: clean accuracy plus PGD-20 (eps 8/255, step 2/255, random start).

- ``ours``: ``advcl_cli.engine.evaluate.evaluate``: the images are a uint8 tensor on the device,
  converted per batch there, the attack takes gradients with respect to the input only, the
  counts stay on the device until the end (channels_last on CUDA; ``ours-bf16`` adds bf16
  autocast there);
- ``reference``: the authors' style: a torchvision DataLoader over PIL images with ToTensor
  (num_workers 0), each batch moved to the device, fp32 eager, and an attack loop that calls
  ``loss.backward()`` on the model at every step (so the parameters' gradients are computed
  too), with a per-batch ``.item()``.

One warm-up batch runs before each timed loop. The table goes to stdout and, unless
``--no-record``, is appended to benchmarks/RESULTS.md with the device's name. Usage:

    python benchmarks/eval_speed.py --arch resnet18 --n 32 --batch-size 16 --device cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date

import torch
import torch.nn.functional as F

from _common import RESULTS, device_name, record

HEADING = "## PGD-20 evaluation speed (benchmarks/eval_speed.py)"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(model, images, labels, args, device, precision):
    from advcl_cli.data.registry import ImageData
    from advcl_cli.engine.evaluate import evaluate

    data = ImageData(images, labels, 10, [str(i) for i in range(10)], "bench").to(device)
    warm = ImageData(images[: args.batch_size], labels[: args.batch_size], 10, data.classes, "warm")
    evaluate(model, warm, ["pgd20"], [8 / 255], batch_size=args.batch_size, device=device, precision=precision)
    _sync(device)
    t0 = time.perf_counter()
    res = evaluate(model, data, ["pgd20"], [8 / 255], batch_size=args.batch_size, device=device, precision=precision)
    _sync(device)
    return time.perf_counter() - t0, res["clean_acc"], res["robust"][0]["robust_acc"]


def reference_pgd(model, x, y, eps=8 / 255, step=2 / 255, steps=20):
    """The reference's loop: random start, then per step a model forward, ``loss.backward()``
    (parameter gradients included), a signed step, projection and clamping."""
    x_adv = x.detach() + torch.zeros_like(x).uniform_(-eps, eps)
    for _ in range(steps):
        x_adv.requires_grad_()
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        model.zero_grad()
        loss.backward()
        x_adv = x_adv.detach() + step * torch.sign(x_adv.grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def run_reference(model, images, labels, args, device):
    import torchvision.transforms as T
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    class PILDataset(Dataset):
        def __init__(self, imgs, targets):
            self.imgs = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in imgs]
            self.targets = targets.tolist()
            self.tf = T.ToTensor()

        def __len__(self):
            return len(self.imgs)

        def __getitem__(self, i):
            return self.tf(self.imgs[i]), self.targets[i]

    model = model.to(device).eval()

    def loop(ds):
        correct = clean = 0
        for x, y in DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=0):
            x, y = x.to(device), y.to(device)
            x_adv = reference_pgd(model, x, y)
            with torch.no_grad():
                correct += (model(x_adv).argmax(1) == y).sum().item()
                clean += (model(x).argmax(1) == y).sum().item()
        return clean / len(ds), correct / len(ds)

    loop(PILDataset(images[: args.batch_size], labels[: args.batch_size]))  # warm-up
    ds = PILDataset(images, labels)
    _sync(device)
    t0 = time.perf_counter()
    clean, robust = loop(ds)
    _sync(device)
    return time.perf_counter() - t0, clean, robust


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--n", type=int, default=32, help="images to evaluate")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    from advcl_cli.device import resolve_device
    from advcl_cli.models import create_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, generator=g)
    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=10).eval()
    with torch.no_grad():  # labels = the model's clean predictions: clean accuracy 1, PGD has work to do
        labels = torch.cat([model(c.float() / 255).argmax(1) for c in images.split(args.batch_size)])

    rows = []
    t, clean, robust = run_reference(model, images, labels, args, device)
    rows.append(("reference (DataLoader+PIL, fp32, backward on the model)", t, clean, robust))
    t, clean, robust = run_ours(model, images, labels, args, device, "fp32")
    rows.append(("ours (uint8 on device, input grads, fp32)", t, clean, robust))
    if device.type == "cuda":
        t, clean, robust = run_ours(model, images, labels, args, device, "bf16")
        rows.append(("ours (bf16 autocast)", t, clean, robust))

    base = rows[0][1]
    name = device_name(device)
    lines = [
        f"{date.today().isoformat()}, {name}; {args.arch}, n={args.n}, batch {args.batch_size}, "
        f"torch {torch.__version__}",
        "",
        "| loop | seconds | images/s | speed-up | clean acc | PGD-20 acc |",
        "|---|---|---|---|---|---|",
    ]
    for label, t, clean, robust in rows:
        lines.append(f"| {label} | {t:.2f} | {args.n / t:.2f} | {base / t:.2f}x | {clean:.3f} | {robust:.3f} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        record(HEADING, text)
        print(f"appended to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
