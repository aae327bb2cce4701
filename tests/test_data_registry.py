import urllib.error

import numpy as np
import pytest
import torch

from advcl_cli.data import ImageData, dataset_names, default_data_dir, load_dataset, num_classes_of
from advcl_cli.errors import DataError, DownloadError
from fakedata import allow_fake_archives, fake_split, write_cifar10, write_cifar100, write_imagefolder, write_stl10


def test_digits_split_is_fixed_and_disjoint():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape == (1437, 3, 32, 32) and test.images.shape == (360, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.images.is_contiguous() and len(train) == 1437
    assert train.num_classes == 10 and train.classes == [str(i) for i in range(10)] and train.name == "digits"
    assert set(train.labels.tolist()) == set(range(10)) and set(test.labels.tolist()) == set(range(10))
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey replicated to RGB
    assert int(train.images.max()) > 200 and int(train.images.min()) == 0
    again = load_dataset("digits", "train", data_dir="/nonexistent")  # ignores data_dir
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    # the documented split: permutation of default_rng(0), first 1437 train, last 360 test
    from sklearn.datasets import load_digits

    perm = np.random.default_rng(0).permutation(1797)
    target = load_digits().target
    assert np.array_equal(train.labels.numpy(), target[perm[:1437]])
    assert np.array_equal(test.labels.numpy(), target[perm[1437:]])
    assert len(set(perm[:1437]) | set(perm[1437:])) == 1797


def test_digits_limit_and_image_size():
    d = load_dataset("digits", "test", limit=7, image_size=16)
    assert d.images.shape == (7, 3, 16, 16) and d.labels.shape == (7,)
    full = load_dataset("digits", "test")
    assert torch.equal(d.labels, full.labels[:7])
    assert len(load_dataset("digits", "test", limit=10_000)) == 360
    with pytest.raises(DataError):
        load_dataset("digits", limit=0)
    with pytest.raises(DataError):
        load_dataset("digits", "validation")


def test_names_and_unknown_dataset():
    assert dataset_names() == ["cifar10", "cifar100", "stl10", "digits", "imagefolder:PATH"]
    assert num_classes_of("cifar100") == 100 and num_classes_of("digits") == 10
    assert num_classes_of("imagefolder:/x") is None
    with pytest.raises(DataError) as e:
        load_dataset("cifar11")
    assert e.value.exit_code == 2 and "\n" not in e.value.message
    assert e.value.message == "unknown dataset 'cifar11'"
    assert "cifar10" in e.value.hint and "digits" in e.value.hint
    with pytest.raises(DataError) as e:
        num_classes_of("nosuch")
    assert "nosuch" in e.value.message


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ADVCL_DATA_DIR", str(tmp_path / "d"))
    assert default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("ADVCL_DATA_DIR")
    assert default_data_dir().parts[-3:] == (".cache", "advcl", "data")


@pytest.mark.parametrize("split,seed", [("train", 0), ("test", 1)])
def test_cifar10_reads_the_written_files(monkeypatch, tmp_path, capsys, split, seed):
    allow_fake_archives(monkeypatch)
    write_cifar10(tmp_path, n_train=23, n_test=7)
    d = load_dataset("cifar10", split, data_dir=tmp_path)
    images, labels = fake_split(23 if split == "train" else 7, 10, 32, seed)
    assert d.images.dtype == torch.uint8 and d.images.is_contiguous()
    assert np.array_equal(d.images.numpy(), images) and np.array_equal(d.labels.numpy(), labels)
    assert d.num_classes == 10 and d.classes[1] == "automobile"
    assert capsys.readouterr().out == ""


def test_cifar100_and_image_size(monkeypatch, tmp_path):
    allow_fake_archives(monkeypatch)
    write_cifar100(tmp_path, n_train=12, n_test=5)
    d = load_dataset("cifar100", "test", data_dir=tmp_path)
    images, labels = fake_split(5, 100, 32, 1)
    assert np.array_equal(d.images.numpy(), images) and np.array_equal(d.labels.numpy(), labels)
    assert d.num_classes == 100 and d.classes[3] == "fine_03"
    small = load_dataset("cifar100", "train", data_dir=tmp_path, image_size=8, limit=4)
    assert small.images.shape == (4, 3, 8, 8) and small.images.dtype == torch.uint8


def test_stl10_reads_the_written_files(monkeypatch, tmp_path):
    allow_fake_archives(monkeypatch)
    write_stl10(tmp_path, n_train=4, n_test=3)
    for split, n, seed in (("train", 4, 0), ("test", 3, 1)):
        d = load_dataset("stl10", split, data_dir=tmp_path)
        images, labels = fake_split(n, 10, 96, seed)
        assert d.images.shape == (n, 3, 96, 96) and d.images.is_contiguous()
        assert np.array_equal(d.images.numpy(), images) and np.array_equal(d.labels.numpy(), labels)
    assert d.classes[-1] == "truck"
    assert load_dataset("stl10", "test", data_dir=tmp_path, image_size=32).images.shape == (3, 3, 32, 32)


def test_download_failure_names_url_and_folder(monkeypatch, tmp_path):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(DownloadError) as e:
        load_dataset("cifar10", data_dir=tmp_path / "data")
    assert e.value.exit_code == 1 and "\n" not in e.value.message
    assert cifar.CIFAR10.url in e.value.message and str(tmp_path / "data" / "cifar-10-batches-py") in e.value.message
    assert "--dataset digits" in e.value.hint and "cifar-10-python.tar.gz" in e.value.hint


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("stl10", data_dir=tmp_path, download=False)
    assert e.value.exit_code == 2 and str(tmp_path / "stl10_binary") in e.value.message


def test_corrupted_files_are_not_trusted(tmp_path):
    write_cifar10(tmp_path, n_train=5, n_test=5)  # md5 differs from the real archive's
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "corrupted" in e.value.message


def test_imagefolder(tmp_path):
    write_imagefolder(tmp_path / "pets", n_train=7, n_test=4)
    spec = f"imagefolder:{tmp_path / 'pets'}"
    d = load_dataset(spec, "train")
    assert isinstance(d, ImageData) and d.name == spec
    assert d.classes == ["cat", "dog", "frog"] and d.num_classes == 3
    images, labels = fake_split(7, 3, 32, 0)
    order = np.argsort(labels, kind="stable")
    assert np.array_equal(d.images.numpy(), images[order]) and np.array_equal(d.labels.numpy(), labels[order])
    assert load_dataset(spec, "test", image_size=20).images.shape == (4, 3, 20, 20)


def test_imagefolder_resizes_and_converts_to_rgb(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / split / "only").mkdir(parents=True)
        Image.new("L", (50, 40), color=128).save(tmp_path / split / "only" / "a.png")
    d = load_dataset(f"imagefolder:{tmp_path}", "test")
    assert d.images.shape == (1, 3, 32, 32) and bool((d.images == 128).all())


def test_imagefolder_errors(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="train/ and test/"):
        load_dataset(f"imagefolder:{tmp_path}")
    write_imagefolder(tmp_path / "ok", classes=("a", "b"), n_train=2, n_test=2)
    (tmp_path / "ok" / "test" / "c").mkdir()
    with pytest.raises(DataError, match="not in"):
        load_dataset(f"imagefolder:{tmp_path / 'ok'}", "test")
    with pytest.raises(DataError):
        load_dataset("imagefolder:")
