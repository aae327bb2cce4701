"""Batched image augmentation as tensor code, with per-sample random parameters.

Inputs are float images in [0, 1], shape (B, C, H, W), on any device; every random parameter is
drawn per sample from ``gen``, a ``torch.Generator`` on the same device as the images, so the
same generator state gives the same output. The semantics follow torchvision's transforms as the
AdvCL reference uses them (RandomResizedCrop, RandomHorizontalFlip, ColorJitter with p=0.8,
RandomGrayscale, RandomCrop with padding); the colour jitter applies its four operations in a
random order drawn per sample (torchvision draws one order per call).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_GRAY = (0.299, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def to_float(x_uint8: Tensor) -> Tensor:
    return x_uint8.to(torch.float32) / 255.0


def _uniform(gen: torch.Generator, shape, lo: float, hi: float, device) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen, device=device)


def _chance(gen: torch.Generator, b: int, p: float, device) -> Tensor:
    """A (B, 1, 1, 1) boolean mask, True with probability p per sample."""
    return (torch.rand(b, generator=gen, device=device) < p).view(b, 1, 1, 1)


def random_resized_crop(x: Tensor, gen: torch.Generator, *, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), size=None) -> Tensor:
    """torchvision's RandomResizedCrop per sample: 10 tries of area U(scale) and log-uniform
    aspect ratio, else a central crop; the crops are resized bilinearly (align_corners=False)."""
    b, _, h, w = x.shape
    out_h, out_w = (h, w) if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    dev = x.device
    area = _uniform(gen, (b, 10), scale[0], scale[1], dev) * (h * w)
    log_r = _uniform(gen, (b, 10), math.log(ratio[0]), math.log(ratio[1]), dev)
    aspect = torch.exp(log_r)
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.argmax(ok.to(torch.uint8), dim=1, keepdim=True)  # first valid try (0 if none)
    found = ok.any(dim=1)
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
    # fallback: the central crop with the aspect ratio clamped into `ratio`
    in_ratio = w / h
    if in_ratio < min(ratio):
        fw, fh = w, round(w / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(h * max(ratio)), h
    else:
        fw, fh = w, h
    cw = torch.where(found, cw, torch.full_like(cw, fw))
    ch = torch.where(found, ch, torch.full_like(ch, fh))
    u = torch.rand((2, b), generator=gen, device=dev)
    top = torch.where(found, torch.floor(u[0] * (h - ch + 1)), torch.full_like(ch, (h - fh) // 2))
    left = torch.where(found, torch.floor(u[1] * (w - cw + 1)), torch.full_like(cw, (w - fw) // 2))
    # affine map from output coordinates in [-1, 1] to the crop box in input coordinates
    theta = torch.zeros((b, 2, 3), device=dev, dtype=x.dtype)
    theta[:, 0, 0] = cw / w
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(theta, [b, x.shape[1], out_h, out_w], align_corners=False)
    # like resizing the cropped image: sample no further out than the crop's edge pixel centres
    lo = torch.stack([(2 * left + 1) / w - 1, (2 * top + 1) / h - 1], dim=1).view(b, 1, 1, 2).to(x.dtype)
    hi = torch.stack([(2 * (left + cw) - 1) / w - 1, (2 * (top + ch) - 1) / h - 1], dim=1).view(b, 1, 1, 2).to(x.dtype)
    grid = torch.minimum(torch.maximum(grid, lo), hi)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_hflip(x: Tensor, gen: torch.Generator, p: float = 0.5) -> Tensor:
    return torch.where(_chance(gen, x.shape[0], p, x.device), x.flip(-1), x)


def _grayscale(x: Tensor) -> Tensor:
    """(B, 1, H, W) luma with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(delta > 0, torch.remainder(h / 6, 1.0), torch.zeros_like(h))
    return h, s, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    chans = []
    for n in (5, 3, 1):  # R, G, B
        k = torch.remainder(n + 6 * h, 6)
        chans.append(v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(chans, dim=1)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(h, s, v).clamp(0, 1)


def color_jitter(
    x: Tensor, gen: torch.Generator, *, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8
) -> Tensor:
    """torchvision's ColorJitter applied with probability p, its four ops in a per-sample order."""
    b, dev = x.shape[0], x.device
    apply = _chance(gen, b, p, dev)
    factors = [_uniform(gen, b, max(0.0, 1 - a), 1 + a, dev).view(b, 1, 1, 1) for a in (brightness, contrast, saturation)]
    shift = _uniform(gen, b, -hue, hue, dev)
    order = torch.argsort(torch.rand((b, 4), generator=gen, device=dev), dim=1)  # a permutation per sample
    ops = [
        lambda y: _blend(y, torch.zeros_like(y), factors[0]),
        lambda y: _blend(y, _grayscale(y).mean(dim=(1, 2, 3), keepdim=True), factors[1]),
        lambda y: _blend(y, _grayscale(y), factors[2]),
        lambda y: _adjust_hue(y, shift),
    ]
    y = x
    for step in range(4):
        which = order[:, step].view(b, 1, 1, 1)
        new = y
        for k, op in enumerate(ops):
            new = torch.where(which == k, op(y), new)
        y = new
    return torch.where(apply, y, x)


def random_grayscale(x: Tensor, gen: torch.Generator, p: float = 0.2) -> Tensor:
    return torch.where(_chance(gen, x.shape[0], p, x.device), _grayscale(x).expand_as(x), x)


def simclr_view(x: Tensor, gen: torch.Generator) -> Tensor:
    """RandomResizedCrop(scale 0.2-1) -> flip -> ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8) ->
    RandomGrayscale(p=0.2); output in [0, 1], same size as the input."""
    if x.dtype == torch.uint8:
        x = to_float(x)
    x = random_resized_crop(x, gen, scale=(0.2, 1.0))
    x = random_hflip(x, gen)
    x = color_jitter(x, gen, p=0.8)
    return random_grayscale(x, gen, p=0.2)


def crop_flip_view(x: Tensor, gen: torch.Generator, padding: int = 4) -> Tensor:
    """RandomCrop(H x W, padding with zeros) then a horizontal flip: the AdvCL "x_org" view."""
    if x.dtype == torch.uint8:
        x = to_float(x)
    b, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding))
    offs = torch.randint(0, 2 * padding + 1, (2, b), generator=gen, device=dev)
    rows = (offs[0].view(b, 1) + torch.arange(h, device=dev)).view(b, 1, h, 1).expand(b, c, h, w + 2 * padding)
    x = padded.gather(2, rows)
    cols = (offs[1].view(b, 1) + torch.arange(w, device=dev)).view(b, 1, 1, w).expand(b, c, h, w)
    x = x.gather(3, cols)
    return random_hflip(x, gen)


def high_frequency(x: Tensor, radius: float) -> Tensor:
    """The high-frequency component: per channel fft2, fftshift, zero the frequencies at distance
    < radius from the centre (H//2, W//2), inverse shift, ifft2, real part. Not clamped."""
    h, w = x.shape[-2:]
    i = torch.arange(h, device=x.device, dtype=torch.float32).view(h, 1) - h // 2
    j = torch.arange(w, device=x.device, dtype=torch.float32).view(1, w) - w // 2
    keep = torch.sqrt(i * i + j * j) >= radius
    spec = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    spec = torch.where(keep, spec, torch.zeros_like(spec))
    return torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).real.to(x.dtype)
