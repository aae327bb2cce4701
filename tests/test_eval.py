"""The batched evaluation engine: accuracies, conventions, reproducibility and input checks."""

import dataclasses

import pytest
import torch

from advcl_cli.attacks import Attack
from advcl_cli.checkpoint import load_checkpoint, save_model
from advcl_cli.data.registry import ImageData, load_dataset
from advcl_cli.distributed import DistContext
from advcl_cli.engine.evaluate import (
    decode_flags,
    encode_flags,
    evaluate,
    flag_key,
    load_test_data,
    predictions,
    shard,
    worst_case,
)
from advcl_cli.report import RecordingReporter
from advcl_cli.errors import CheckpointError, DataError
from advcl_cli.models import AdvclNet, ModelConfig, create_model
from test_attacks import train_tiny_classifier


@pytest.fixture(scope="module")
def trained():
    return train_tiny_classifier()


@pytest.fixture(scope="module")
def test_data():
    return load_dataset("digits", "test", limit=48, image_size=16)


def test_accuracies_follow_the_attacks_strength(trained, test_data):
    rec = RecordingReporter()
    res = evaluate(trained, test_data, ["fgsm", "pgd10"], [4 / 255, 16 / 255], batch_size=20, reporter=rec)
    assert res["n"] == 48
    pred = predictions(trained, test_data.images, 48)
    assert res["clean_acc"] == pytest.approx((pred == test_data.labels).float().mean().item())
    acc = {(r["attack"], r["eps_label"]): r["robust_acc"] for r in res["robust"]}
    assert list(acc) == [("fgsm", "4/255"), ("fgsm", "16/255"), ("pgd10", "4/255"), ("pgd10", "16/255")]
    assert acc["pgd10", "16/255"] <= acc["fgsm", "16/255"] <= res["clean_acc"]
    assert acc["pgd10", "16/255"] <= acc["pgd10", "4/255"] <= res["clean_acc"]
    assert acc["pgd10", "16/255"] < res["clean_acc"]
    assert all(r["seconds"] > 0 and r["images_per_s"] > 0 for r in res["robust"])
    assert set(res["attacks"]) == {"fgsm", "pgd10"} and "random start" in res["attacks"]["pgd10"]
    # progress: one task per (attack, eps), advanced batch by batch up to n
    starts = [e for e in rec.events if e[0] == "start"]
    assert [s[2] for s in starts] == [48] * 4
    advances = [e[1] for e in rec.events if e[0] == "advance"]
    assert advances[:3] == [20, 20, 8]


def test_seeded_and_order_independent(trained, test_data):
    a = evaluate(trained, test_data, ["pgd5"], [16 / 255], batch_size=16, seed=1)
    b = evaluate(trained, test_data, ["fgsm", "pgd5"], [16 / 255], batch_size=16, seed=1)
    assert a["robust"][0]["robust_acc"] == b["robust"][1]["robust_acc"]


def wrong_on_clean_images(labels: torch.Tensor) -> AdvclNet:
    """A 10-class model wrong on every unperturbed (uint8-grid) image of a batch with these
    labels and right on every perturbed one."""

    class WrongOnCleanImages(AdvclNet):
        def forward(self, x, bn=None):
            on_grid = ((x * 255 - (x * 255).round()).abs() < 1e-4).flatten(1).all(1)  # unperturbed uint8 image
            guess = torch.where(on_grid, (labels + 1) % 10, labels)
            return torch.nn.functional.one_hot(guess, 10).float() + 0 * x.sum()

    return WrongOnCleanImages(ModelConfig("resnet18-tiny", num_classes=10))


def test_robust_counts_need_a_right_clean_prediction(test_data):
    """A model wrong on every clean image but right on every perturbed one scores 0 robust
    (the worst case over clean and adversarial, as AutoAttack counts)."""
    labels = test_data.labels
    model = wrong_on_clean_images(labels)
    res = evaluate(model, test_data, ["pgd1"], [8 / 255], batch_size=len(labels))
    assert res["clean_acc"] == 0.0
    assert res["robust"][0]["robust_acc"] == 0.0  # its adversarial predictions are all right


def test_model_without_a_head_is_refused(test_data):
    enc = create_model("resnet18-tiny", bn_sets=("normal", "pgd"))
    with pytest.raises(CheckpointError, match="no classifier head; finetune it first"):
        evaluate(enc, test_data, ["fgsm"], [8 / 255])


def test_class_count_mismatch_is_refused(test_data):
    model = create_model("resnet18-tiny", num_classes=7)
    with pytest.raises(DataError, match="7 classes"):
        evaluate(model, test_data, [], [8 / 255])


def test_load_classifier_and_its_test_data(tmp_path):
    clf = create_model("resnet18-tiny", bn_sets=("pgd",), num_classes=10)
    path = save_model(tmp_path / "c.safetensors", clf, kind="classifier", method="advcl", dataset="digits",
                      config={"image_size": 16})
    ckpt = load_checkpoint(path, kind="classifier")
    data = load_test_data(ckpt, limit=5)
    assert data.name == "digits" and len(data) == 5 and data.images.shape[-1] == 16  # size from its config
    assert load_test_data(ckpt, limit=2, image_size=24).images.shape[-1] == 24
    with pytest.raises(DataError, match="100 classes"):
        load_test_data(ckpt, "cifar100")

    enc = create_model("resnet18-tiny", bn_sets=("normal", "pgd"), proj_dim=8)
    enc_path = save_model(tmp_path / "e.safetensors", enc, kind="encoder", method="advcl", dataset="digits")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(enc_path, kind="classifier")
    assert "encoder checkpoint; finetune it first" in e.value.message
    assert e.value.hint == f"advcl finetune {enc_path} --scheme slf"
    assert load_checkpoint(path).meta.kind == "classifier"


class LabelInPixel(AdvclNet):
    """Reads each image's label from its pixel (1, 0, 0) and answers it, unless pixel (0, 0, 0)
    holds the mark (2.0, outside [0, 1]) that ``Marks`` sets: then it answers label + 1."""

    def forward(self, x, bn=None):
        label = (x[:, 1, 0, 0] * 255).round().long() % 10
        guess = torch.where(x[:, 0, 0, 0] > 1.5, (label + 1) % 10, label)
        return torch.nn.functional.one_hot(guess, 10).float() + 0 * x.sum()


@dataclasses.dataclass(frozen=True)
class Marks(Attack):
    """An attack that fools ``LabelInPixel`` exactly on the images whose label is in ``fooled``."""

    fooled: tuple = ()

    def __call__(self, model, x, y, eps, **kwargs):
        x = x.clone()
        x[torch.isin(y, torch.tensor(self.fooled, device=y.device)), 0, 0, 0] = 2.0
        return x


def label_data(n=50):
    labels = torch.arange(n) % 10
    images = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    images[:, 1, 0, 0] = labels.to(torch.uint8)
    return ImageData(images, labels, 10, [str(i) for i in range(10)], "labels-in-pixels")


def test_worst_case_counts_an_image_only_if_every_attack_failed():
    data, model = label_data(), LabelInPixel(ModelConfig("resnet18-tiny", num_classes=10))
    even, low = Marks("even", "pgd", 1, fooled=(0, 2, 4, 6, 8)), Marks("low", "pgd", 1, fooled=(0, 1, 2, 3, 4))
    res = evaluate(model, data, [even, low], [8 / 255, 16 / 255], batch_size=7)
    y = data.labels
    assert res["clean_acc"] == 1.0 and res["per_image"]["clean"].all()
    assert torch.equal(res["per_image"]["even@8/255"], y % 2 == 1)
    assert torch.equal(res["per_image"]["low@16/255"], y >= 5)
    assert [r["robust_acc"] for r in res["robust"]] == [0.5, 0.5, 0.5, 0.5]
    # robust under both only for the odd labels from 5 up: 5, 7, 9
    assert [(w["eps_label"], w["attacks"], w["robust_acc"]) for w in res["worst_case"]] == [
        ("8/255", ["even", "low"], 0.3), ("16/255", ["even", "low"], 0.3)]
    assert torch.equal(res["per_image"]["worst@8/255"], (y % 2 == 1) & (y >= 5))
    assert evaluate(model, data, [even], [8 / 255])["worst_case"] == []  # one attack: no worst-case row

    # flags stored by an earlier run combine with a later attack's without rerunning the first
    stored = encode_flags(evaluate(model, data, [even], [8 / 255])["per_image"]["even@8/255"])
    assert stored == "01" * 25
    later = evaluate(model, data, [low], [8 / 255])["per_image"][flag_key("low", 8 / 255)]
    assert torch.equal(worst_case(stored, later), res["per_image"]["worst@8/255"])
    assert torch.equal(decode_flags(stored), y % 2 == 1)
    with pytest.raises(DataError, match="different numbers of images"):
        worst_case(stored, later[:-1])


def test_robust_flags_need_the_clean_prediction_right_too():
    """Images showing a 3 but labelled 4: wrong when clean, right once marked (the model then
    answers 3 + 1). They must not count as robust."""
    data = label_data(20)
    pixel = data.labels.clone()
    data = dataclasses.replace(data, labels=torch.where(pixel == 3, 4, pixel))
    model = LabelInPixel(ModelConfig("resnet18-tiny", num_classes=10))
    res = evaluate(model, data, [Marks("fours", "pgd", 1, fooled=(4,))], [8 / 255], batch_size=6)
    assert res["clean_acc"] == 0.9
    assert torch.equal(res["per_image"]["fours@8/255"], (pixel != 3) & (pixel != 4))
    assert res["robust"][0]["robust_acc"] == 0.8


def test_each_block_gets_its_own_seed_and_random_starts_whatever_the_rank():
    """AutoAttack's seed and the random starts of block k are seed * 1_000_003 + k (the images it
    holds, not the rank or the call count): what lets N processes give one process's flags."""
    calls = []

    @dataclasses.dataclass(frozen=True)
    class Spy(Attack):
        def __call__(self, model, x, y, eps, *, gen=None, seed=0, log=None, progress=None):
            calls.append((x[:, 1, 0, 0].mul(255).round().long().tolist(), seed, torch.rand(1, generator=gen).item()))
            return x

    data, model = label_data(23), LabelInPixel(ModelConfig("resnet18-tiny", num_classes=10))
    evaluate(model, data, [Spy("spy", "pgd")], [8 / 255], batch_size=5, seed=7)
    labels = data.labels.tolist()
    assert [c[0] for c in calls] == [labels[k * 5:(k + 1) * 5] for k in range(5)]  # five blocks, the last of 3
    assert [c[1] for c in calls] == [7 * 1_000_003 + k for k in range(5)]
    assert [c[2] for c in calls] == [torch.rand(1, generator=torch.Generator().manual_seed(7 * 1_000_003 + k)).item()
                                     for k in range(5)]


@pytest.mark.parametrize("n, block, world", [(37, 8, 2), (40, 8, 2), (10, 8, 3), (117, 14, 2), (5, 2, 4)])
def test_shards_are_whole_blocks_in_rank_order(n, block, world):
    parts = [shard(n, block, DistContext(rank=r, world_size=world)) for r in range(world)]
    blocks = [b for p in parts for b in p.blocks]
    assert [k for k, _, _ in blocks] == list(range(-(-n // block)))  # every block once, in rank order
    assert all(a == k * block and b == min(a + block, n) for k, a, b in blocks)
    assert [p.sizes for p in parts] == [parts[0].sizes] * world and sum(parts[0].sizes) == n
    for r, p in enumerate(parts):
        assert p.stop - p.start == p.sizes[r] and p.steps == max(len(q.blocks) for q in parts)
        assert (p.start, p.stop) == ((p.blocks[0][1], p.blocks[-1][2]) if p.blocks else (p.start, p.start))
    assert [len(p.blocks) for p in parts] == sorted((len(p.blocks) for p in parts), reverse=True)  # rank 0 has most
