"""Augmentation pinned to torchvision: every view exposes the per-sample parameters it drew;
torchvision's own functional transforms (v2) redo each image from them and must give the same
pixels, and the parameters' distributions are those of the AdvCL recipe (RandomResizedCrop(32,
scale (0.2, 1)), flip 0.5, ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2, and
RandomCrop(32, padding 4) + flip for x_org), compared with torchvision's own samplers."""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from advcl_cli.data import augment as A
from advcl_cli.settings.layering import resolve
from advcl_cli.engine.pretrain import make_method
from advcl_cli.settings import PretrainSettings

MODES = {"bilinear": TF.InterpolationMode.BILINEAR, "bicubic": TF.InterpolationMode.BICUBIC}
JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def uint8_images(b=16, h=32, w=32, seed=0):
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=gen(seed))


def advcl_method():
    return make_method(resolve(PretrainSettings, {"arch": "resnet18-tiny"}), 1)


# --- torchvision's way, one image at a time ------------------------------------------------------


def tv_simclr(img, p: A.SimclrParams, k: int, interpolation="bilinear"):
    c, j = p.crop, p.jitter
    y = TF.resized_crop(img, int(c.top[k]), int(c.left[k]), int(c.height[k]), int(c.width[k]), list(img.shape[-2:]),
                        interpolation=MODES[interpolation], antialias=True)
    if interpolation == "bicubic":
        y = y.clamp(0, 1)  # as on uint8 images (PIL, torchvision): our images come from uint8
    if p.flip[k]:
        y = TF.horizontal_flip(y)
    if j.apply[k]:
        factors = (j.brightness, j.contrast, j.saturation, j.hue)
        for op in j.order[k].tolist():
            y = JITTER_OPS[op](y, float(factors[op][k]))
    if p.gray[k]:
        y = TF.rgb_to_grayscale(y, num_output_channels=3)
    return y


def tv_crop_flip(img, p: A.CropFlipParams, k: int):
    h, w = img.shape[-2:]
    y = TF.crop(TF.pad(img, [p.padding] * 4, fill=0), int(p.top[k]), int(p.left[k]), h, w)
    return TF.horizontal_flip(y) if p.flip[k] else y


def hfc_numpy(img, r):
    h, w = img.shape[-2:]
    spec = np.fft.fftshift(np.fft.fft2(img), axes=(-2, -1))
    i, j = np.meshgrid(np.arange(h) - h / 2, np.arange(w) - w / 2, indexing="ij")
    spec[..., np.sqrt(i**2 + j**2) < r] = 0
    return np.real(np.fft.ifft2(np.fft.ifftshift(spec, axes=(-2, -1))))


def flags_of(p: A.SimclrParams):
    return {"flip": p.flip, "jitter": p.jitter.apply, "gray": p.gray}


# --- pixels ----------------------------------------------------------------------------------------


def test_advcl_views_are_torchvisions_transforms_with_the_drawn_parameters():
    images = uint8_images()
    (x1, x2, x_org, x_hfc), params = advcl_method().views(images, gen(3), return_params=True)
    x = images.float() / 255
    for name, view in (("x1", x1), ("x2", x2)):
        for flag, values in flags_of(params[name]).items():
            assert values.any() and not values.all(), (name, flag)  # both branches are exercised
        expected = torch.stack([tv_simclr(x[k], params[name], k) for k in range(len(x))])
        torch.testing.assert_close(view, expected, rtol=0, atol=2e-6, msg=name)
    expected_org = torch.stack([tv_crop_flip(x[k], params["x_org"], k) for k in range(len(x))])
    assert torch.equal(x_org, expected_org)
    assert np.allclose(x_hfc.double().numpy(), hfc_numpy(expected_org.double().numpy(), 8), atol=1e-5)
    assert not torch.allclose(x_hfc, x_org, atol=0.1)


def test_view_specs_hold_the_recipes():
    assert A.ADVCL_VIEW == A.ViewSpec() and (A.ADVCL_VIEW.scale, A.ADVCL_VIEW.interpolation) == ((0.2, 1.0), "bilinear")
    assert (A.ADVCL_VIEW.jitter, A.ADVCL_VIEW.jitter_p, A.ADVCL_VIEW.gray_p, A.ADVCL_VIEW.flip_p) == ((0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5)
    acl = A.ViewSpec.acl()
    assert (acl.scale, acl.interpolation, acl.jitter, acl.jitter_p, acl.gray_p) == ((0.1, 1.0), "bicubic", (0.4, 0.4, 0.4, 0.1), 0.8, 0.2)
    dyn = A.ViewSpec.dynacl(0.5)  # scale (1 - 0.9 s, 1), jitter x s, p 0.8 s and 0.2 s, flip not annealed
    assert dyn.scale == pytest.approx((0.55, 1.0)) and dyn.jitter == pytest.approx((0.2, 0.2, 0.2, 0.05))
    assert (dyn.jitter_p, dyn.gray_p, dyn.flip_p, dyn.interpolation) == (pytest.approx(0.4), pytest.approx(0.1), 0.5, "bilinear")
    assert A.ViewSpec.dynacl(1.0).scale == pytest.approx((0.1, 1.0))


@pytest.mark.parametrize("spec", [A.ViewSpec.acl(), A.ViewSpec.dynacl(0.35)], ids=["acl-bicubic", "dynacl-0.35"])
def test_other_view_specs_are_torchvisions_transforms(spec):
    x = uint8_images(12, seed=1).float() / 255
    view, params = A.simclr_view(x, gen(4), spec, return_params=True)
    expected = torch.stack([tv_simclr(x[k], params, k, spec.interpolation) for k in range(len(x))])
    torch.testing.assert_close(view, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(10, 10), (40, 36)], ids=["down", "up"])
def test_resized_crop_of_any_box_and_size_is_torchvisions(interpolation, size):
    x = torch.rand(6, 3, 20, 24, generator=gen(2), dtype=torch.float64)
    box = A.draw_resized_crop(gen(5), 6, 20, 24, scale=(0.05, 1.0), ratio=(0.5, 2.0))
    ours = A.resized_crop(x, box, size, interpolation)
    for k in range(6):
        theirs = TF.resized_crop(x[k], int(box.top[k]), int(box.left[k]), int(box.height[k]), int(box.width[k]),
                                 list(size), interpolation=MODES[interpolation], antialias=True)
        if interpolation == "bicubic":
            theirs = theirs.clamp(0, 1)
        torch.testing.assert_close(ours[k], theirs, rtol=0, atol=1e-12)


def test_whole_image_crop_is_the_identity_and_the_fallback_is_the_central_crop():
    x = torch.rand(4, 3, 12, 12, generator=gen(1))
    box = A.draw_resized_crop(gen(0), 4, 12, 12, scale=(1, 1), ratio=(1, 1))
    assert box.height.tolist() == [12] * 4 and box.top.tolist() == [0] * 4
    assert torch.equal(A.resized_crop(x, box), x)
    # no area fraction above 1 fits: all 10 tries fail, the central crop with its ratio clamped
    fallback = A.draw_resized_crop(gen(0), 2, 8, 16, scale=(2.0, 2.0), ratio=(1, 1))
    assert (fallback.top.tolist(), fallback.left.tolist(), fallback.height.tolist(), fallback.width.tolist()) == ([0, 0], [4, 4], [8, 8], [8, 8])


def test_jitter_with_zero_strength_and_p_zero_or_one():
    x = torch.rand(6, 3, 8, 8, generator=gen(0))
    assert torch.equal(A.color_jitter(x, A.draw_jitter(gen(), 6, (0, 0, 0, 0), p=1)), x)
    assert torch.equal(A.color_jitter(x, A.draw_jitter(gen(), 6, p=0)), x)
    assert not torch.isclose(A.color_jitter(x, A.draw_jitter(gen(), 6, p=1)), x).flatten(1).all(1).any()
    assert torch.equal(A.hflip(x, torch.ones(6, dtype=torch.bool)), x.flip(-1))


# --- distributions ---------------------------------------------------------------------------------


def ks(a, b) -> float:
    """The two-sample Kolmogorov-Smirnov distance."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


@pytest.fixture(scope="module")
def drawn():
    """The parameters AdvCL's views draw for 1024 images of 32 x 32."""
    _, params = advcl_method().views(uint8_images(1024, seed=7), gen(8), return_params=True)
    return params


def torchvision_crops(n=4096):
    rrc = T.RandomResizedCrop(32, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
    img = torch.zeros(3, 32, 32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return [rrc.make_params([img]) for _ in range(n)]


def test_probabilities_of_jitter_grayscale_and_flip(drawn):
    simclr = [drawn["x1"], drawn["x2"]]
    jitter = torch.cat([p.jitter.apply for p in simclr]).double().mean()
    gray = torch.cat([p.gray for p in simclr]).double().mean()
    flip = torch.cat([p.flip for p in simclr] + [drawn["x_org"].flip]).double().mean()
    # 2048 and 3072 draws: a standard error of ~0.009, the bounds are more than 4 of them
    assert abs(float(jitter) - 0.8) < 0.04
    assert abs(float(gray) - 0.2) < 0.04
    assert abs(float(flip) - 0.5) < 0.04


def test_jitter_factors_and_order(drawn):
    j = [drawn["x1"].jitter, drawn["x2"].jitter]
    for name, strength in (("brightness", 0.4), ("contrast", 0.4), ("saturation", 0.4), ("hue", 0.1)):
        values = torch.cat([getattr(p, name) for p in j]).double().numpy()
        centre = 0.0 if name == "hue" else 1.0
        uniform = np.random.default_rng(0).uniform(centre - strength, centre + strength, 20000)
        assert ks(values, uniform) < 0.05, name
    order = torch.cat([p.order for p in j])
    assert all(sorted(row) == [0, 1, 2, 3] for row in order.tolist())
    for step in range(4):
        share = torch.bincount(order[:, step], minlength=4).double() / len(order)
        assert (share - 0.25).abs().max() < 0.04, (step, share)


def test_crop_boxes_follow_torchvisions_sampler(drawn):
    ours = {k: torch.cat([getattr(drawn[v].crop, k) for v in ("x1", "x2")]).numpy() for k in ("top", "left", "height", "width")}
    theirs = {k: [p[k] for p in torchvision_crops()] for k in ("top", "left", "height", "width")}
    for k in ours:
        assert ks(ours[k], theirs[k]) < 0.06, k
    area = ours["height"] * ours["width"] / 1024
    assert area.min() >= 0.18 and area.max() == 1.0
    assert math.exp(np.log(ours["width"] / ours["height"]).min()) > 0.7


def test_x_org_offsets_are_uniform(drawn):
    p = drawn["x_org"]
    assert p.padding == 4
    for offsets in (p.top, p.left):
        share = torch.bincount(offsets, minlength=9).double() / len(offsets)
        assert len(share) == 9 and (share - 1 / 9).abs().max() < 0.04


# --- dtype, determinism, HFC ------------------------------------------------------------------------


@pytest.mark.parametrize("view", [A.simclr_view, A.crop_flip_view])
def test_views_are_deterministic_per_generator_and_keep_the_dtype(view):
    x = uint8_images(8)
    y = view(x, gen(1))
    assert y.shape == x.shape and y.dtype == torch.float32 and 0 <= float(y.min()) and float(y.max()) <= 1
    assert torch.equal(y, view(x, gen(1))) and not torch.equal(y, view(x, gen(2)))
    y64 = view(A.to_float(x, torch.float64), gen(1))  # the same draws whatever the precision
    assert y64.dtype == torch.float64 and torch.allclose(y64.float(), y, atol=1e-6)


def test_advcl_views_in_float64():
    views = advcl_method().views(uint8_images(4), gen(0), torch.float64)
    assert all(v.dtype == torch.float64 for v in views)


@pytest.mark.parametrize("r", [0, 1, 3.5, 8])
def test_high_frequency_matches_numpy(r):
    x = torch.rand((2, 3, 16, 16), generator=gen(0), dtype=torch.float64)
    y = A.high_frequency(x, r)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.allclose(y.numpy(), hfc_numpy(x.numpy(), r), atol=1e-12)
    if r == 0:
        assert torch.allclose(y, x, atol=1e-12)
    else:
        assert y.mean(dim=(-2, -1)).abs().max() < 1e-12  # the DC component is gone
        assert float(y.min()) < 0  # not clamped
