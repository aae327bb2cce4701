import math

import pytest
import torch
import torch.nn.functional as F

from advcl_cli.methods.losses import pseudo_label_ce, supcon_loss


def _features(b=5, v=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, v, d, generator=g, dtype=torch.float64), dim=2)


def supcon_by_hand(features, temperature, base_temperature):
    """The SupCon formula written out anchor by anchor (unsupervised: positives = same image)."""
    b, v, _ = features.shape
    vectors = [(i, features[i, a]) for a in range(v) for i in range(b)]
    total = 0.0
    for p, (img_p, zp) in enumerate(vectors):
        denom = sum(math.exp(float(zp @ za) / temperature) for a, (_, za) in enumerate(vectors) if a != p)
        positives = [za for a, (img_a, za) in enumerate(vectors) if a != p and img_a == img_p]
        mean_log_prob = sum(float(zp @ za) / temperature - math.log(denom) for za in positives) / len(positives)
        total += -(temperature / base_temperature) * mean_log_prob
    return total / len(vectors)


@pytest.mark.parametrize("views", [2, 4])
def test_supcon_equals_the_formula(views):
    feats = _features(v=views)
    got = supcon_loss(feats, temperature=0.5, base_temperature=0.07)
    assert float(got) == pytest.approx(supcon_by_hand(feats, 0.5, 0.07), rel=1e-5)


def test_two_view_supcon_with_unit_scale_is_nt_xent():
    feats = _features(b=6, v=2)
    z = torch.cat([feats[:, 0], feats[:, 1]])
    logits = z @ z.T / 0.5
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(6) + 6, torch.arange(6)])
    expected = F.cross_entropy(logits, target)
    assert torch.allclose(supcon_loss(feats, 0.5, 0.5), expected, rtol=0, atol=1e-12)


def test_losses_compute_in_float64_and_upcast_only_half_precisions():
    feats = _features()
    logits, targets = [feats[:, 0, :2], feats[:, 1, :5]], [torch.tensor([0, 1, 1, 0, 1]), torch.tensor([4, 3, 0, 2, 1])]
    for dtype, expected in ((torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        assert supcon_loss(feats.to(dtype)).dtype == expected, dtype
        assert pseudo_label_ce([lg.to(dtype) for lg in logits], targets).dtype == expected, dtype
    # in float64 the loss is the formula to float64 precision, not float32's
    assert abs(float(supcon_loss(feats)) - supcon_by_hand(feats, 0.5, 0.07)) < 1e-12


def test_supcon_does_not_depend_on_image_order_and_rejects_bad_shapes():
    feats = _features()
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(supcon_loss(feats), supcon_loss(feats[perm]), atol=1e-5)
    with pytest.raises(ValueError):
        supcon_loss(feats[:, 0])


def test_aligned_views_give_a_lower_loss_than_random_ones():
    rand = _features(b=8)
    aligned = rand[:, :1].expand(-1, 4, -1)
    assert supcon_loss(aligned) < supcon_loss(rand)


def test_pseudo_label_ce_is_the_mean_over_heads_and_ignores_minus_one():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(6, 2, generator=g), torch.randn(6, 10, generator=g)]
    targets = [torch.tensor([0, 1, 1, 0, 1, -1]), torch.tensor([3, 9, 0, 2, -1, -1])]
    expected = (
        F.cross_entropy(logits[0][:5], targets[0][:5]) + F.cross_entropy(logits[1][:4], targets[1][:4])
    ) / 2
    assert torch.allclose(pseudo_label_ce(logits, targets), expected)
    summed = (
        F.cross_entropy(logits[0][:5], targets[0][:5], reduction="sum")
        + F.cross_entropy(logits[1][:4], targets[1][:4], reduction="sum")
    ) / 2
    assert torch.allclose(pseudo_label_ce(logits, targets, reduction="sum"), summed)
    with pytest.raises(ValueError):
        pseudo_label_ce(logits, targets[:1])
