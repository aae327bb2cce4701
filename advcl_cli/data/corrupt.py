"""The 15 common corruptions of CIFAR-10-C as batched tensor code: OUR OWN APPROXIMATIONS.

These are not the published CIFAR-10-C code (Hendrycks & Dietterich, ICLR 2019, which uses
ImageMagick, scikit-image, frost photographs and plasma fractals). They follow the same
recipes in spirit with parameters that grow with the severity (1-5), so that ``digits-c``
(the digits test split corrupted here) gives an offline stand-in for CA. Numbers measured on
them are not comparable with CIFAR-10-C numbers.

``corrupt(x, name, severity, gen)`` takes float images (N, 3, H, W) in [0, 1] and returns
corrupted float images in [0, 1]. Every random draw comes from ``gen``, so the result is a
function of the images, the corruption, the severity and the generator's seed. JPEG goes
through Pillow's encoder (a real JPEG at the given quality); everything else is torch.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# per corruption, one parameter (or tuple) per severity 1..5, growing in strength
PARAMS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std
    "shot_noise": (500, 250, 100, 75, 50),  # Poisson photons per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of salt-and-pepper values
    "defocus_blur": (0.75, 1.0, 1.25, 1.5, 2.0),  # disk radius (pixels)
    "glass_blur": ((0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 2), (0.8, 2, 3), (1.0, 3, 3)),  # (sigma, max shift, rounds)
    "motion_blur": (2, 3, 4, 6, 8),  # streak length (pixels), random angle per image
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),  # largest of 7 centre zooms averaged
    "snow": ((0.02, 0.9, 2), (0.04, 0.8, 3), (0.06, 0.7, 4), (0.08, 0.65, 5), (0.10, 0.6, 6)),  # (flakes, keep, streak)
    "frost": ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.45), (0.75, 0.5)),  # (image weight, frost weight)
    "fog": (0.2, 0.5, 0.75, 1.0, 1.5),  # fog strength
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards the per-channel mean
    "elastic_transform": (0.5, 1.0, 1.5, 2.0, 2.5),  # largest displacement (pixels), smooth field
    "pixelate": (0.7, 0.6, 0.45, 0.4, 0.3),  # resolution factor
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
}


def _conv(x: Tensor, kernel: Tensor) -> Tensor:
    """Depthwise 2-D convolution with one (k, k) kernel, edges replicated."""
    k = kernel.shape[-1]
    w = kernel.to(x)[None, None].expand(x.shape[1], 1, k, k)
    return F.conv2d(F.pad(x, (k // 2,) * 4, mode="replicate"), w, groups=x.shape[1])


def _gaussian(x: Tensor, sigma: float) -> Tensor:
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return _conv(x, torch.outer(g, g) / g.sum() ** 2)


def _warp(x: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """Sample ``x`` at (col + dx, row + dy) (pixels; (N, H, W) fields), bilinear, edges replicated."""
    n, _, h, w = x.shape
    rows, cols = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    gx = (cols + dx + 0.5) / w * 2 - 1
    gy = (rows + dy + 0.5) / h * 2 - 1
    return F.grid_sample(x, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border", align_corners=False)


def _streak(x: Tensor, length: int, gen: torch.Generator) -> Tensor:
    """Average of ``length`` + 1 copies shifted along a random direction per image (motion)."""
    angle = (torch.rand(x.shape[0], generator=gen) * 2 - 1) * math.pi / 4
    out = torch.zeros_like(x)
    for t in range(length + 1):
        shift = torch.zeros(x.shape[0], x.shape[2], x.shape[3])
        out += _warp(x, shift + t * torch.cos(angle)[:, None, None], shift + t * torch.sin(angle)[:, None, None])
    return out / (length + 1)


def _smooth_noise(shape, scale: int, gen: torch.Generator) -> Tensor:
    """Uniform noise drawn at 1/``scale`` of the resolution, upsampled bicubically."""
    n, c, h, w = shape
    low = torch.rand(n, c, max(1, h // scale), max(1, w // scale), generator=gen)
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)


def _zoom(x: Tensor, factor: float) -> Tensor:
    """Centre zoom by ``factor`` (the middle 1/factor of the image enlarged to full size)."""
    theta = torch.tensor([[1 / factor, 0, 0], [0, 1 / factor, 0]], dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _jpeg(x: Tensor, quality: int) -> Tensor:
    from PIL import Image

    out = []
    for img in (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as im:
            out.append(np.asarray(im.convert("RGB")).copy())
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def _defocus_blur(x: Tensor, p: float) -> Tensor:
    """A soft-edged disk of radius ``p`` as the blur kernel."""
    r = math.ceil(p)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    disk = (p + 0.5 - torch.sqrt(t[:, None] ** 2 + t[None, :] ** 2)).clamp(0, 1)
    return _conv(x, disk / disk.sum())


def _glass_blur(x: Tensor, p: tuple, gen: torch.Generator) -> Tensor:
    """Gaussian blur, ``rounds`` of every pixel taking a random neighbour's value, blur again."""
    sigma, shift, rounds = p
    y = _gaussian(x, sigma)
    n, _, h, w = x.shape
    for _ in range(rounds):
        d = torch.randint(-shift, shift + 1, (2, n, h, w), generator=gen).float()
        y = _warp(y, d[0], d[1])
    return _gaussian(y, sigma)


def _snow(x: Tensor, p: tuple, gen: torch.Generator) -> Tensor:
    """A brightened image under streaks of random flakes."""
    density, keep, length = p
    gray = x.mean(1, keepdim=True)
    base = keep * x + (1 - keep) * torch.maximum(x, gray * 1.5 + 0.5)
    flakes = (torch.rand(x.shape[0], 1, *x.shape[2:], generator=gen) < density).float()
    return base + 2 * _streak(flakes, length, gen)


def _frost(x: Tensor, p: tuple, gen: torch.Generator) -> Tensor:
    """The image blended with a bluish texture of smooth and pixel noise."""
    a, b = p
    texture = 0.6 * _smooth_noise(x.shape[:1] + (1,) + x.shape[2:], 4, gen) + 0.4 * torch.rand(
        x.shape[0], 1, *x.shape[2:], generator=gen)
    tint = torch.tensor([0.85, 0.9, 1.0]).view(1, 3, 1, 1)
    return a * x + b * texture.clamp(0, 1) * tint


def _fog(x: Tensor, p: float, gen: torch.Generator) -> Tensor:
    """Multi-scale smooth noise added with weight ``p``, rescaled to the image's maximum."""
    shape = x.shape[:1] + (1,) + x.shape[2:]
    fog = sum(0.5**k * _smooth_noise(shape, 2 ** (4 - k), gen) for k in range(4))
    fog = (fog - fog.amin((2, 3), keepdim=True)) / (fog.amax((2, 3), keepdim=True) - fog.amin((2, 3), keepdim=True) + 1e-8)
    top = x.amax((1, 2, 3), keepdim=True)
    return (x + p * fog) * top / (top + p)


def _elastic(x: Tensor, p: float, gen: torch.Generator) -> Tensor:
    """A smooth random displacement field of at most ``p`` pixels."""
    n, _, h, w = x.shape
    field = _gaussian(torch.rand(n, 2, h, w, generator=gen) * 2 - 1, 3.0)
    field = field / field.abs().amax((1, 2, 3), keepdim=True).clamp_min(1e-8) * p
    return _warp(x, field[:, 0], field[:, 1])


def corrupt(x: Tensor, name: str, severity: int, gen: torch.Generator) -> Tensor:
    """``x`` (N, 3, H, W) float in [0, 1], corrupted with ``name`` at ``severity`` (1-5)."""
    p = PARAMS[name][severity - 1]
    x = x.float()
    if name == "gaussian_noise":
        y = x + p * torch.randn(x.shape, generator=gen)
    elif name == "shot_noise":
        y = torch.poisson(x * p, generator=gen) / p
    elif name == "impulse_noise":
        u = torch.rand(x.shape, generator=gen)
        y = torch.where(u < p / 2, 1.0, torch.where(u < p, 0.0, x))
    elif name == "defocus_blur":
        y = _defocus_blur(x, p)
    elif name == "glass_blur":
        y = _glass_blur(x, p, gen)
    elif name == "motion_blur":
        y = _streak(x, p, gen)
    elif name == "zoom_blur":
        factors = np.linspace(1.0, p, 7)
        y = sum(_zoom(x, float(f)) for f in factors) / len(factors)
    elif name == "snow":
        y = _snow(x, p, gen)
    elif name == "frost":
        y = _frost(x, p, gen)
    elif name == "fog":
        y = _fog(x, p, gen)
    elif name == "brightness":  # HSV: value + p, hue and saturation kept
        v = x.amax(1, keepdim=True)
        v_new = (v + p).clamp(max=1)
        y = torch.where(v > 0, x * v_new / v.clamp_min(1e-8), v_new.expand_as(x))
    elif name == "contrast":
        mean = x.mean((2, 3), keepdim=True)
        y = (x - mean) * p + mean
    elif name == "elastic_transform":
        y = _elastic(x, p, gen)
    elif name == "pixelate":
        h, w = x.shape[-2:]
        small = F.interpolate(x, size=(max(1, round(h * p)), max(1, round(w * p))), mode="area")
        y = F.interpolate(small, size=(h, w), mode="nearest")
    elif name == "jpeg_compression":
        y = _jpeg(x, p)
    else:
        raise KeyError(name)
    return y.clamp(0, 1)
