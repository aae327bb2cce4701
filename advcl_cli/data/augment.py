"""Batched image augmentation as tensor code: per-sample parameters are drawn, then applied.

Images are float tensors in [0, 1], shape (B, C, H, W), on any device and in any float dtype
(uint8 batches are converted by the views). Every view is two steps:

- ``draw_*(gen, b, ...)`` draws the random parameters of all ``b`` samples from ``gen`` (a
  ``torch.Generator`` on the images' device): crop boxes, flip flags, whether the colour jitter
  applies, its factors and the order of its four operations, grayscale flags. The draws are
  float32 whatever the images' dtype, so the random stream does not depend on the precision;
- the apply functions (``resized_crop``, ``hflip``, ``color_jitter``, ``grayscale``,
  ``apply_simclr``, ``apply_crop_flip``) turn images and parameters into pixels.

``simclr_view(x, gen, spec)`` and ``crop_flip_view(x, gen)`` compose the two; with
``return_params=True`` they also return what they drew, so a test can redo every image with
torchvision's own functional transforms. The semantics are torchvision's (``transforms.v2`` on
float tensors, the defaults the AdvCL/ACL code relies on):

- RandomResizedCrop: 10 tries of an area fraction U(scale) and a log-uniform aspect ratio,
  else the central crop with the ratio clamped into ``ratio``; the crop is resized to the
  output size as torchvision does with ``antialias=True`` (its default, the same weights as
  PIL): separable bilinear (triangle) or bicubic (a = -0.5) weights over the crop's pixels
  only, normalised per output pixel. Here that is one matrix product per axis,
  ``Wy[b] @ x[b] @ Wx[b]^T``, exact for both modes. The bicubic result is clamped to [0, 1],
  as it is for uint8 images (PIL, torchvision on uint8);
- RandomHorizontalFlip; ColorJitter applied with probability ``jitter_p``, brightness /
  contrast / saturation factors U(max(0, 1 - s), 1 + s), hue shift U(-h, h), the four
  operations in a random order (drawn per sample here, per call in torchvision);
  RandomGrayscale (torchvision's luma weights 0.2989, 0.587, 0.114);
- RandomCrop(H x W, padding with zeros) + flip for the "x_org" view of AdvCL.

``ViewSpec`` describes a SimCLR-style view; ``ADVCL_VIEW`` is AdvCL's, ``ViewSpec.acl()`` ACL's
and ``ViewSpec.dynacl(s)`` DynACL's view at augmentation strength ``s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass(frozen=True)
class ViewSpec:
    """RandomResizedCrop(scale, ratio, interpolation) -> flip(flip_p) ->
    ColorJitter(*jitter) with probability jitter_p -> RandomGrayscale(gray_p)."""

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    flip_p: float = 0.5

    @classmethod
    def acl(cls) -> "ViewSpec":
        """ACL's view: crop scale (0.1, 1), bicubic; the rest as AdvCL's."""
        return cls(scale=(0.1, 1.0), interpolation="bicubic")

    @classmethod
    def dynacl(cls, strength: float) -> "ViewSpec":
        """DynACL's view at strength s: crop scale (1 - 0.9 s, 1), jitter (0.4s, 0.4s, 0.4s, 0.1s)
        with p 0.8 s, grayscale p 0.2 s; the flip is not annealed; bilinear (the authors'
        ``reload`` keeps RandomResizedCrop's default interpolation)."""
        s = float(strength)
        return cls(scale=(1 - 0.9 * s, 1.0), jitter=(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s), jitter_p=0.8 * s, gray_p=0.2 * s)


ADVCL_VIEW = ViewSpec()


@dataclass(frozen=True)
class CropBox:
    """Per-sample crop boxes in pixels, (B,) int64 each."""

    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor


@dataclass(frozen=True)
class JitterParams:
    """Per-sample colour jitter: ``apply`` (B,) bool; ``brightness``, ``contrast``, ``saturation``
    (B,) factors; ``hue`` (B,) shift; ``order`` (B, 4) the operations' indices in the order applied
    (0 brightness, 1 contrast, 2 saturation, 3 hue)."""

    apply: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    order: Tensor


@dataclass(frozen=True)
class SimclrParams:
    crop: CropBox
    flip: Tensor  # (B,) bool
    jitter: JitterParams
    gray: Tensor  # (B,) bool


@dataclass(frozen=True)
class CropFlipParams:
    top: Tensor  # (B,) int64: the crop's offset in the zero-padded image
    left: Tensor
    flip: Tensor  # (B,) bool
    padding: int


def to_float(x_uint8: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return x_uint8.to(dtype) / 255.0


def _as_float(x: Tensor) -> Tensor:
    return to_float(x) if x.dtype == torch.uint8 else x


def _uniform(gen: torch.Generator, shape, lo: float, hi: float, device) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen, device=device)


def draw_chance(gen: torch.Generator, b: int, p: float, device=None) -> Tensor:
    """(B,) bool, True with probability p per sample."""
    return torch.rand(b, generator=gen, device=device) < p


# --- RandomResizedCrop ----------------------------------------------------------------------


def draw_resized_crop(gen: torch.Generator, b: int, h: int, w: int, *, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                      device=None) -> CropBox:
    """torchvision's RandomResizedCrop parameters for ``b`` images of ``h`` x ``w``."""
    area = _uniform(gen, (b, 10), scale[0], scale[1], device).double() * (h * w)
    aspect = torch.exp(_uniform(gen, (b, 10), math.log(ratio[0]), math.log(ratio[1]), device).double())
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.argmax(ok.to(torch.uint8), dim=1, keepdim=True)  # the first valid try (0 if none)
    found = ok.any(dim=1)
    cw, ch = cw.gather(1, first).squeeze(1).long(), ch.gather(1, first).squeeze(1).long()
    # no valid try: the central crop with the aspect ratio clamped into `ratio`
    in_ratio = w / h
    if in_ratio < min(ratio):
        fw, fh = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(h * max(ratio))), h
    else:
        fw, fh = w, h
    cw = torch.where(found, cw, torch.full_like(cw, fw))
    ch = torch.where(found, ch, torch.full_like(ch, fh))
    u = torch.rand((2, b), generator=gen, device=device)
    top = torch.where(found, torch.floor(u[0] * (h - ch + 1)).long(), torch.full_like(ch, (h - fh) // 2))
    left = torch.where(found, torch.floor(u[1] * (w - cw + 1)).long(), torch.full_like(cw, (w - fw) // 2))
    return CropBox(top, left, ch, cw)


def _triangle(t: Tensor) -> Tensor:
    return (1 - t.abs()).clamp(min=0)


def _cubic(t: Tensor, a: float = -0.5) -> Tensor:
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _resize_weights(start: Tensor, length: Tensor, n_in: int, n_out: int, interpolation: str) -> Tensor:
    """(B, n_out, n_in) float64: output pixel i of each sample as a weighted sum of the input
    pixels of the crop [start, start + length) along one axis (PIL's / torch's antialiased
    resampling: the filter widens by in/out when shrinking)."""
    kernel = _triangle if interpolation == "bilinear" else _cubic
    scale = length.double() / n_out  # input pixels per output pixel
    widen = scale.clamp(min=1.0)
    centre = (torch.arange(n_out, device=start.device, dtype=torch.float64) + 0.5)[None, :] * scale[:, None]
    pos = torch.arange(n_in, device=start.device, dtype=torch.float64)[None, :] - start.double()[:, None]  # crop coords
    weights = kernel((pos[:, None, :] + 0.5 - centre[:, :, None]) / widen[:, None, None])
    inside = (pos >= 0) & (pos < length.double()[:, None])
    weights = weights * inside[:, None, :]
    return weights / weights.sum(-1, keepdim=True)


def resized_crop(x: Tensor, box: CropBox, size=None, interpolation: str = "bilinear") -> Tensor:
    """Crop every image to its box and resize it to ``size`` (default: the input's size)."""
    if interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
    _, _, h, w = x.shape
    out_h, out_w = (h, w) if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    wy = _resize_weights(box.top, box.height, h, out_h, interpolation).to(x.dtype)
    wx = _resize_weights(box.left, box.width, w, out_w, interpolation).to(x.dtype)
    out = wy[:, None] @ x @ wx.transpose(1, 2)[:, None]
    return out.clamp(0, 1) if interpolation == "bicubic" else out


# --- flip, colour jitter, grayscale ------------------------------------------------------------


def _per_sample(flags: Tensor) -> Tensor:
    return flags.view(-1, 1, 1, 1)


def hflip(x: Tensor, flags: Tensor) -> Tensor:
    """Flip the images whose flag is True."""
    return torch.where(_per_sample(flags), x.flip(-1), x)


def _luma(x: Tensor) -> Tensor:
    """(B, 1, H, W) with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    factor = _per_sample(factor).to(x.dtype)
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    grey = maxc == minc
    spread = torch.where(grey, torch.ones_like(maxc), maxc - minc)
    s = (maxc - minc) / torch.where(grey, torch.ones_like(maxc), maxc)
    # distances of each channel below the maximum, in units of the spread
    rc, gc, bc = (maxc - r) / spread, (maxc - g) / spread, (maxc - b) / spread
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h * (1.0 / 6.0) + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    sector = torch.floor(h * 6)
    f = h * 6 - sector
    sector = torch.remainder(sector, 6)
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (s * f + (1 - s))).clamp(0, 1)
    # (r, g, b) in each of the six sectors of the hue circle
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = [torch.zeros_like(v) for _ in range(3)]
    for k, rgb in enumerate(table):
        here = sector == k
        out = [torch.where(here, c, o) for c, o in zip(rgb, out)]
    return torch.stack(out, dim=1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of each image by its shift (a fraction of the circle); 0 leaves it alone."""
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + shift.view(-1, 1, 1).to(x.dtype), 1.0)
    return torch.where(_per_sample(shift != 0), _hsv_to_rgb(h, s, v), x)


def draw_jitter(gen: torch.Generator, b: int, strength=(0.4, 0.4, 0.4, 0.1), p: float = 0.8,
                device=None) -> JitterParams:
    """ColorJitter(*strength) applied with probability p: factors, hue shift and op order."""
    apply = draw_chance(gen, b, p, device)
    factors = [_uniform(gen, b, max(0.0, 1 - s), 1 + s, device) for s in strength[:3]]
    hue = _uniform(gen, b, -strength[3], strength[3], device)
    order = torch.argsort(torch.rand((b, 4), generator=gen, device=device), dim=1)  # a permutation per sample
    return JitterParams(apply, *factors, hue, order)


def color_jitter(x: Tensor, params: JitterParams) -> Tensor:
    """torchvision's adjust_brightness/contrast/saturation/hue in each sample's order, for the
    samples whose ``apply`` flag is set.

    Brightness, contrast and saturation are blends with black, the mean luma and the luma; the
    samples' blends before their hue step run first, then the hue of every image once, then the
    blends after it (the same result as the four steps in order, one HSV round trip instead of
    four)."""
    factors = torch.stack([params.brightness, params.contrast, params.saturation, params.hue], dim=1)
    hue_step = torch.argmax((params.order == 3).to(torch.uint8), dim=1)

    def blends(y: Tensor, active) -> Tensor:
        for step in range(4):
            which = params.order[:, step]
            luma = _luma(y)
            other = torch.where(_per_sample(which == 0), torch.zeros_like(luma),
                                torch.where(_per_sample(which == 1), luma.mean(dim=(1, 2, 3), keepdim=True), luma))
            blended = _blend(y, other, factors.gather(1, which[:, None]).squeeze(1))
            y = torch.where(_per_sample(active(step) & (which != 3)), blended, y)
        return y

    y = blends(x, lambda step: step < hue_step)
    y = adjust_hue(y, params.hue)
    y = blends(y, lambda step: step > hue_step)
    return torch.where(_per_sample(params.apply), y, x)


def grayscale(x: Tensor, flags: Tensor) -> Tensor:
    """The luma in all three channels for the images whose flag is True."""
    return torch.where(_per_sample(flags), _luma(x).expand_as(x), x)


# --- the views ----------------------------------------------------------------------------------


def draw_simclr(gen: torch.Generator, b: int, h: int, w: int, spec: ViewSpec = ADVCL_VIEW, device=None) -> SimclrParams:
    crop = draw_resized_crop(gen, b, h, w, scale=spec.scale, ratio=spec.ratio, device=device)
    flip = draw_chance(gen, b, spec.flip_p, device)
    jitter = draw_jitter(gen, b, spec.jitter, spec.jitter_p, device)
    return SimclrParams(crop, flip, jitter, draw_chance(gen, b, spec.gray_p, device))


def apply_simclr(x: Tensor, params: SimclrParams, interpolation: str = "bilinear") -> Tensor:
    x = hflip(resized_crop(x, params.crop, interpolation=interpolation), params.flip)
    return grayscale(color_jitter(x, params.jitter), params.gray)


def simclr_view(x: Tensor, gen: torch.Generator, spec: ViewSpec = ADVCL_VIEW, *, return_params: bool = False):
    """A SimCLR-style view of every image (``spec``, default AdvCL's); same size as the input,
    in [0, 1]. With ``return_params`` also the ``SimclrParams`` drawn."""
    x = _as_float(x)
    params = draw_simclr(gen, x.shape[0], x.shape[2], x.shape[3], spec, x.device)
    out = apply_simclr(x, params, spec.interpolation)
    return (out, params) if return_params else out


def draw_crop_flip(gen: torch.Generator, b: int, padding: int = 4, flip_p: float = 0.5, device=None) -> CropFlipParams:
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=gen, device=device)
    return CropFlipParams(offsets[0], offsets[1], draw_chance(gen, b, flip_p, device), padding)


def apply_crop_flip(x: Tensor, params: CropFlipParams) -> Tensor:
    b, c, h, w = x.shape
    pad, dev = params.padding, x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (params.top.view(b, 1) + torch.arange(h, device=dev)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
    cols = (params.left.view(b, 1) + torch.arange(w, device=dev)).view(b, 1, 1, w).expand(b, c, h, w)
    return hflip(padded.gather(2, rows).gather(3, cols), params.flip)


def crop_flip_view(x: Tensor, gen: torch.Generator, padding: int = 4, *, return_params: bool = False):
    """RandomCrop(H x W, zero padding) then a horizontal flip: the AdvCL "x_org" view."""
    x = _as_float(x)
    params = draw_crop_flip(gen, x.shape[0], padding, device=x.device)
    out = apply_crop_flip(x, params)
    return (out, params) if return_params else out


def high_frequency(x: Tensor, radius: float) -> Tensor:
    """The high-frequency component: per channel fft2, fftshift, zero the frequencies at distance
    < radius from the centre (H//2, W//2), inverse shift, ifft2, real part. Not clamped."""
    h, w = x.shape[-2:]
    i = torch.arange(h, device=x.device, dtype=torch.float64).view(h, 1) - h // 2
    j = torch.arange(w, device=x.device, dtype=torch.float64).view(1, w) - w // 2
    keep = torch.sqrt(i * i + j * j) >= radius
    spec = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    spec = torch.where(keep, spec, torch.zeros_like(spec))
    return torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).real.to(x.dtype)
