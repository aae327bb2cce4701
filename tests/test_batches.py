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


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_together_equal_one_process(drop_last):
    data, world = tiny(), 4
    single = batches_of(Batches(data, 8, seed=7, drop_last=drop_last))
    ranks = [batches_of(Batches(data, 8, seed=7, drop_last=drop_last, rank=r, world_size=world)) for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)
    for k, (x, y, i) in enumerate(single):
        assert torch.equal(torch.cat([r[k][2] for r in ranks]), i)
        assert torch.equal(torch.cat([r[k][0] for r in ranks]), x)
        assert torch.equal(torch.cat([r[k][1] for r in ranks]), y)
    if drop_last:
        assert all(r[k][2].numel() == 2 for r in ranks for k in range(len(single)))


def test_no_drop_last_keeps_everything_in_order():
    data = tiny()
    b = Batches(data, 8, shuffle=False, drop_last=False)
    assert len(b) == 4
    idx = [i for _, _, i in b]
    assert [len(i) for i in idx] == [8, 8, 8, 2]
    assert torch.equal(torch.cat(idx), torch.arange(26))


def test_bad_batch_sizes():
    with pytest.raises(DataError, match="divide"):
        Batches(tiny(), 6, world_size=4)
    with pytest.raises(DataError) as e:
        Batches(tiny(), 64)
    assert "--batch-size" in e.value.hint
    assert len(Batches(tiny(), 64, drop_last=False)) == 1
