"""Corruption sets: the published CIFAR-10-C layout read back exactly, clear errors for broken or
missing folders, digits-c made deterministically, and CA scored over the 15 x 5 splits."""

import tarfile

import numpy as np
import pytest
import torch

from advcl_cli.data.corruptions import CORRUPTIONS, PUBLISHED, SEVERITIES, Published, corruptions_for, load_corruptions
from advcl_cli.data.registry import load_dataset
from advcl_cli.engine.evaluate import corruption_accuracy
from advcl_cli.errors import DataError, DownloadError
from advcl_cli.models import AdvclNet, ModelConfig
from fakedata import write_cifar_c


def test_the_fifteen_corruptions_in_robustbench_order():
    assert len(CORRUPTIONS) == len(set(CORRUPTIONS)) == 15
    assert CORRUPTIONS[:4] == ("shot_noise", "motion_blur", "snow", "pixelate")
    assert CORRUPTIONS[-1] == "elastic_transform"
    assert (corruptions_for("cifar10"), corruptions_for("CIFAR100"), corruptions_for("digits")) == (
        "cifar10-c", "cifar100-c", "digits-c")
    assert corruptions_for("stl10") is None


@pytest.mark.parametrize("repeat_labels", [True, False])
def test_published_layout_is_read_back_exactly(tmp_path, repeat_labels):
    folder, arrays, labels = write_cifar_c(tmp_path, n=3, repeat_labels=repeat_labels)
    cs = load_corruptions("cifar10-c", folder=folder)
    assert (cs.n, cs.num_classes, len(cs)) == (3, 10, 75)
    seen = []
    for c, s, split in cs:
        want = torch.from_numpy(arrays[c][(s - 1) * 3 : s * 3]).permute(0, 3, 1, 2)
        assert split.images.dtype == torch.uint8 and split.images.shape == (3, 3, 32, 32)
        assert torch.equal(split.images, want), (c, s)
        assert split.labels.tolist() == labels.tolist()
        seen.append((c, s))
    assert seen == [(c, s) for c in CORRUPTIONS for s in SEVERITIES]
    # the parent folder works too, as does limit
    assert torch.equal(load_corruptions("cifar10-c", folder=tmp_path, limit=2).split("fog", 4).images,
                       torch.from_numpy(arrays["fog"][9:11]).permute(0, 3, 1, 2))


def test_the_data_folder_and_its_archive(tmp_path):
    folder, arrays, _ = write_cifar_c(tmp_path / "src", n=1, folder="CIFAR-100-C", num_classes=100)
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / "CIFAR-100-C.tar", "w") as tar:
        tar.add(folder, arcname="CIFAR-100-C")
    cs = load_corruptions("cifar100-c", data_dir=root, download=False)  # extracted from the archive in place
    assert (root / "CIFAR-100-C" / "labels.npy").is_file() and cs.num_classes == 100
    assert torch.equal(cs.split("snow", 5).images[0], torch.from_numpy(arrays["snow"][4]).permute(2, 0, 1))


def test_missing_folders_and_failed_downloads_say_where(tmp_path, monkeypatch):
    with pytest.raises(DataError) as e:
        load_corruptions("cifar10-c", folder=tmp_path / "nope")
    assert str(tmp_path / "nope") in e.value.message and PUBLISHED["cifar10-c"].url in e.value.hint

    with pytest.raises(DataError) as e:
        load_corruptions("cifar10-c", data_dir=tmp_path, download=False)
    assert str(tmp_path / "CIFAR-10-C") in e.value.message
    assert "CIFAR-10-C.tar" in e.value.hint and "zenodo.org" in e.value.hint and "--dataset digits" in e.value.hint

    url = "http://127.0.0.1:9/CIFAR-10-C.tar"  # nothing listens there
    monkeypatch.setitem(PUBLISHED, "cifar10-c", Published(url, "CIFAR-10-C", 10))
    with pytest.raises(DownloadError) as e:
        load_corruptions("cifar10-c", data_dir=tmp_path / "dl")
    assert e.value.exit_code == 1 and url in e.value.message and str(tmp_path / "dl") in e.value.message

    with pytest.raises(DataError, match="unknown corruption set 'mnist-c'"):
        load_corruptions("mnist-c")


def test_broken_folders_are_refused_with_the_reason(tmp_path):
    folder, _, _ = write_cifar_c(tmp_path, n=2)
    (folder / "fog.npy").unlink()
    with pytest.raises(DataError, match="lacks fog.npy"):
        load_corruptions("cifar10-c", folder=folder)

    folder, _, _ = write_cifar_c(tmp_path / "b", n=2)
    np.save(folder / "snow.npy", np.zeros((9, 32, 32, 3), np.uint8))  # not 5 severities
    with pytest.raises(DataError, match=r"snow.npy .* holds uint8 \(9, 32, 32, 3\)"):
        load_corruptions("cifar10-c", folder=folder)

    np.save(folder / "snow.npy", np.zeros((5, 32, 32, 3), np.uint8))  # 5 x 1 but the others 5 x 2
    with pytest.raises(DataError, match=r"snow.npy holds \(5, 32, 32, 3\) but shot_noise.npy \(10, 32, 32, 3\)"):
        load_corruptions("cifar10-c", folder=folder)

    folder, _, _ = write_cifar_c(tmp_path / "c", n=2)
    np.save(folder / "labels.npy", np.zeros(7, np.int64))
    with pytest.raises(DataError, match=r"labels.npy .* holds int64 \(7,\) but the images are 5 x 2"):
        load_corruptions("cifar10-c", folder=folder)

    np.save(folder / "labels.npy", np.full(10, 10, np.int64))
    with pytest.raises(DataError, match="outside 0..9"):
        load_corruptions("cifar10-c", folder=folder)


def test_digits_c_is_deterministic_in_range_and_grows_with_severity():
    clean = load_dataset("digits", "test", limit=48).images
    a = load_corruptions("digits-c", limit=48, seed=0)
    b = load_corruptions("digits-c", limit=48, seed=0)
    assert a.n == 48 and a.num_classes == 10
    for c in CORRUPTIONS:
        one, five = a.split(c, 1), a.split(c, 5)
        assert one.images.dtype == torch.uint8 and one.images.shape == clean.shape
        assert torch.equal(one.images, b.split(c, 1).images), c
        assert torch.equal(one.labels, load_dataset("digits", "test", limit=48).labels)
        d1 = (one.images.float() - clean.float()).abs().mean()
        d5 = (five.images.float() - clean.float()).abs().mean()
        assert d1 > 0.5, c  # a corruption, not the clean images
        assert d5 > 1.2 * d1, (c, float(d1), float(d5))
    assert not torch.equal(load_corruptions("digits-c", limit=48, seed=1).split("gaussian_noise", 3).images,
                           a.split("gaussian_noise", 3).images)


class PixelModulo(AdvclNet):
    """Predicts (the first pixel's red value) mod 10: right or wrong on images the test knows."""

    def forward(self, x, bn=None):
        guess = (x[:, 0, 0, 0] * 255).round().long() % 10
        return torch.nn.functional.one_hot(guess, 10).float() + 0 * x.sum()


def test_corruption_accuracy_of_a_published_folder(tmp_path):
    folder, arrays, labels = write_cifar_c(tmp_path, n=20)
    cs = load_corruptions("cifar10-c", folder=folder)
    res = corruption_accuracy(PixelModulo(ModelConfig("resnet18-tiny", num_classes=10)), cs, batch_size=8)
    want = {(c, s): float(np.mean(arrays[c][(s - 1) * 20 : s * 20, 0, 0, 0] % 10 == labels))
            for c in CORRUPTIONS for s in SEVERITIES}
    assert len(set(want.values())) > 3  # the splits differ, so a mix-up would show
    assert {(r["corruption"], r["severity"]): r["acc"] for r in res["splits"]} == pytest.approx(want)
    assert res["ca"] == pytest.approx(sum(want.values()) / 75)
    assert res["by_corruption"]["fog"] == pytest.approx(sum(want["fog", s] for s in SEVERITIES) / 5)
    assert (res["name"], res["n"]) == ("cifar10-c", 20)

    with pytest.raises(DataError, match="100 classes"):
        corruption_accuracy(PixelModulo(ModelConfig("resnet18-tiny", num_classes=100)), cs)
