"""The batched evaluation engine: accuracies, conventions, reproducibility and input checks."""

import pytest
import torch

from advcl_cli.checkpoint import load_checkpoint, save_model
from advcl_cli.data.registry import load_dataset
from advcl_cli.engine.evaluate import evaluate, load_test_data, predictions
from advcl_cli.engine.report import RecordingReporter
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
