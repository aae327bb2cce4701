import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from advcl_cli.data import augment as A


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(b=6, h=16, w=16, seed=0):
    return torch.rand((b, 3, h, w), generator=gen(seed))


def same_image(b=8, h=16, w=16):
    return images(1, h, w).expand(b, 3, h, w).contiguous()


def n_distinct(y):
    return len({tuple(v) for v in y.flatten(1).mul(1e4).round().tolist()})


def test_to_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    y = A.to_float(x)
    assert y.dtype == torch.float32 and torch.allclose(y, torch.tensor([0.0, 0.2, 1.0]))


@pytest.mark.parametrize("view", [A.simclr_view, A.crop_flip_view])
def test_views_shape_range_randomness_determinism(view):
    x = same_image()
    y = view(x, gen(1))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert torch.equal(y, view(x, gen(1)))
    assert not torch.equal(y, view(x, gen(2)))
    # 8 identical inputs; crop+flip has only 162 outcomes, so a repeat is possible there
    assert n_distinct(y) == 8 if view is A.simclr_view else n_distinct(y) >= 6


def test_views_accept_uint8():
    x = (same_image(2) * 255).round().to(torch.uint8)
    assert A.simclr_view(x, gen(0)).dtype == torch.float32
    assert torch.equal(A.crop_flip_view(x, gen(0)), A.crop_flip_view(A.to_float(x), gen(0)))


def test_crop_flip_view_is_a_shifted_padded_copy():
    x = same_image(8)
    y = A.crop_flip_view(x, gen(3))
    padded = torch.nn.functional.pad(x[0], (4, 4, 4, 4))
    for k in range(8):
        found = any(
            torch.equal(y[k], cand) or torch.equal(y[k], cand.flip(-1))
            for i in range(9) for j in range(9) for cand in [padded[:, i:i + 16, j:j + 16]]
        )
        assert found


def test_resized_crop_identity_and_torchvision_match():
    x = images(4, 12, 12)
    y = A.random_resized_crop(x, gen(0), scale=(1, 1), ratio=(1, 1))
    assert torch.allclose(y, x, atol=1e-5)
    # a 6x6 crop resized to 12x12 equals torchvision's crop + bilinear resize at some position
    y = A.random_resized_crop(x, gen(5), scale=(0.25, 0.25), ratio=(1, 1))
    for k in range(4):
        errs = [
            (y[k] - TF.resized_crop(x[k], i, j, 6, 6, [12, 12], antialias=False)).abs().max().item()
            for i in range(7) for j in range(7)
        ]
        assert min(errs) < 1e-5
    z = A.random_resized_crop(images(3, 20, 24), gen(0), size=10)
    assert z.shape == (3, 3, 10, 10)


def test_resized_crop_falls_back_to_central_crop():
    # no area fraction above 1 is possible, so all 10 tries fail: central crop with ratio clamped
    x = images(2, 8, 16)
    y = A.random_resized_crop(x, gen(0), scale=(2.0, 2.0), ratio=(1, 1))
    expected = TF.resized_crop(x, 0, 4, 8, 8, [8, 16], antialias=False)
    assert torch.allclose(y, expected, atol=1e-5)


def test_p_zero_is_identity_and_p_one_changes():
    x = images()
    assert torch.equal(A.random_hflip(x, gen(), p=0), x)
    assert torch.equal(A.random_hflip(x, gen(), p=1), x.flip(-1))
    assert torch.equal(A.color_jitter(x, gen(), p=0), x)
    assert torch.equal(A.random_grayscale(x, gen(), p=0), x)
    g = A.random_grayscale(x, gen(), p=1)
    assert torch.allclose(g[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    j = A.color_jitter(same_image(), gen(), p=1)
    assert n_distinct(j) == 8 and float(j.min()) >= 0 and float(j.max()) <= 1


def test_jitter_with_zero_strength_is_identity():
    x = images()
    y = A.color_jitter(x, gen(), brightness=0, contrast=0, saturation=0, hue=0, p=1)
    assert torch.allclose(y, x, atol=1e-5)


def test_jitter_ops_match_torchvision():
    x = images(5)
    shift = torch.tensor([-0.1, -0.03, 0.0, 0.05, 0.1])
    ours = A._adjust_hue(x, shift)
    theirs = torch.stack([TF.adjust_hue(x[k], float(shift[k])) for k in range(5)])
    assert torch.allclose(ours, theirs, atol=1e-5)
    f = torch.tensor([0.6, 0.8, 1.0, 1.2, 1.4]).view(5, 1, 1, 1)
    # torchvision's tensor grayscale weighs red 0.2989, PIL (the reference's path) and we 0.299
    assert torch.allclose(A._blend(x, A._grayscale(x), f), torch.stack([TF.adjust_saturation(x[k], float(f[k])) for k in range(5)]), atol=3e-4)
    mean = A._grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(A._blend(x, mean, f), torch.stack([TF.adjust_contrast(x[k], float(f[k])) for k in range(5)]), atol=3e-4)


def hfc_numpy(img, r):
    h, w = img.shape[-2:]
    spec = np.fft.fftshift(np.fft.fft2(img), axes=(-2, -1))
    i, j = np.meshgrid(np.arange(h) - h // 2, np.arange(w) - w // 2, indexing="ij")
    spec[..., np.sqrt(i**2 + j**2) < r] = 0
    return np.real(np.fft.ifft2(np.fft.ifftshift(spec, axes=(-2, -1))))


@pytest.mark.parametrize("r", [0, 1, 3.5, 8])
def test_high_frequency_matches_numpy(r):
    x = images(2, 16, 12)
    y = A.high_frequency(x, r)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.allclose(y.numpy(), hfc_numpy(x.double().numpy(), r), atol=1e-5)
    if r == 0:
        assert torch.allclose(y, x, atol=1e-5)
    else:
        assert y.mean(dim=(-2, -1)).abs().max() < 1e-5  # the DC component is gone
        assert float(y.min()) < 0  # not clamped
    assert torch.equal(y, A.high_frequency(x, r))
