import pytest
import torch

from advcl_cli.data import Batches, ImageData
from advcl_cli.errors import DataError


def tiny(n=26):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return ImageData(images, torch.arange(n) % 5, 5, list("abcde"), "tiny")


def batches_of(b):
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in b]


def test_batches_match_indices_and_len():
    data = tiny()
    b = Batches(data, 8, seed=3)
    assert len(b) == 3
    out = batches_of(b)
    assert len(out) == 3
    seen = torch.cat([i for _, _, i in out])
    assert len(set(seen.tolist())) == 24  # no repeats within an epoch
    for x, y, i in out:
        assert x.shape == (8, 3, 4, 4) and x.dtype == torch.uint8 and i.dtype == torch.int64
        assert torch.equal(x[:, 0, 0, 0].long(), i) and torch.equal(y, i % 5)


def test_order_is_a_function_of_seed_and_epoch():
    data = tiny()
    a, b = Batches(data, 8, seed=1), Batches(data, 8, seed=1)
    a.set_epoch(4)
    b.set_epoch(4)
    first = [i for _, _, i in a]
    assert all(torch.equal(p, q) for p, q in zip(first, [i for _, _, i in b]))
    assert all(torch.equal(p, q) for p, q in zip(first, [i for _, _, i in a]))  # no hidden state
    a.set_epoch(5)
    assert not torch.equal(torch.cat(first), torch.cat([i for _, _, i in a]))
    assert not torch.equal(torch.cat(first), torch.cat([i for _, _, i in Batches(data, 8, seed=2)]))
    g = torch.Generator().manual_seed(1 * 1_000_003 + 4)
    assert torch.equal(torch.cat(first), torch.randperm(26, generator=g)[:24])


def test_rank_slices_of_the_global_batch_join_to_it():
    from advcl_cli.distributed import DistContext, local_slice

    data, world = tiny(), 4
    for x, y, i in batches_of(Batches(data, 8, seed=7)):
        parts = [local_slice(i, DistContext(rank=r, world_size=world)) for r in range(world)]
        assert [p.numel() for p in parts] == [2, 2, 2, 2]
        assert torch.equal(torch.cat(parts), i)


def test_no_drop_last_keeps_everything_in_order():
    data = tiny()
    b = Batches(data, 8, shuffle=False, drop_last=False)
    assert len(b) == 4
    idx = [i for _, _, i in b]
    assert [len(i) for i in idx] == [8, 8, 8, 2]
    assert torch.equal(torch.cat(idx), torch.arange(26))


def test_bad_batch_sizes():
    with pytest.raises(DataError) as e:
        Batches(tiny(), 64)
    assert "--batch-size" in e.value.hint
    assert len(Batches(tiny(), 64, drop_last=False)) == 1


def test_the_last_partial_batch_is_kept_unless_too_small_or_not_divisible():
    data = tiny()  # 3 x 8 + 2
    sizes = lambda b: [len(i) for _, _, i in b]  # noqa: E731
    assert sizes(Batches(data, 8, drop_last=False, shuffle=False)) == [8, 8, 8, 2]
    assert sizes(Batches(data, 8, drop_last=False, ranks=2)) == [8, 8, 8, 2]  # 1 image per rank
    assert sizes(Batches(data, 8, drop_last=False, ranks=4)) == [8, 8, 8]  # 2 images do not divide among 4
    assert sizes(Batches(data, 8, drop_last=False, min_last=3)) == [8, 8, 8]  # too small (batch norm needs 2)
    assert sizes(Batches(data, 8, drop_last=True)) == [8, 8, 8]
    with pytest.raises(DataError, match="fewer than one batch"):
        Batches(data, 32, drop_last=False, require_full=True)
    with pytest.raises(DataError, match="no batch of at least 2"):
        Batches(tiny(1), 8, drop_last=False, min_last=2)
