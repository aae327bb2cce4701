"""Pseudo labels: the file format, k-means, the safe importer of the authors' pickle, the CLI."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from advcl_cli.settings.layering import resolve
from advcl_cli.checkpoint import load_checkpoint, save_model, sha256_file
from advcl_cli.engine.pretrain import pretrain
from advcl_cli.errors import CheckpointError, DataError, UsageError
from advcl_cli.models import create_model
from advcl_cli.pseudolabels import (
    import_authors_pickle,
    kmeans_labels,
    load_labels,
    read_authors_pickle,
    save_labels,
)
from advcl_cli.settings import PretrainSettings

AUTHORS_KS = (2, 10, 50, 100, 500)


def authors_pickle(path: Path, n_train: int = 50_000, n_test: int = 10_000) -> dict[str, np.ndarray]:
    """A file in the format of the authors' imagenet_clPretrain_pseudo_labels.pkl: a pickled
    (protocol 3) dict of int32 arrays, pseudo_train_{k} then pseudo_test_{k} for each k, its
    arrays named as numpy 1.x pickles them (numpy.core.multiarray._reconstruct)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for k in AUTHORS_KS:
        arrays[f"pseudo_train_{k}"] = rng.integers(0, k, n_train).astype(np.int32)
        arrays[f"pseudo_test_{k}"] = rng.integers(0, k, n_test).astype(np.int32)
    data = pickle.dumps(arrays, protocol=3)
    new, old = b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n"
    path.write_bytes(data.replace(new, old))
    assert old in path.read_bytes() and new not in path.read_bytes()
    return arrays


def test_labels_file_round_trip_and_validation(tmp_path):
    labels = {10: torch.arange(20) % 10, 2: torch.arange(20) % 2}
    path = save_labels(tmp_path / "l.safetensors", labels, dataset="digits", split="train", encoder="abc")
    got = load_labels(path, 20)
    assert got.ks == (2, 10) and got.n == 20 and got.meta["encoder"] == "abc" and got.meta["ks"] == [2, 10]
    assert torch.equal(got.stacked(), torch.stack([labels[2], labels[10]]))
    with pytest.raises(DataError, match="20 labels but the dataset has 21 images"):
        load_labels(path, 21)
    assert load_labels(path, 8, allow_longer=True).n == 8  # --limit uses the first images
    with pytest.raises(DataError):
        load_labels(path, 8)
    bad = save_labels(tmp_path / "bad.safetensors", {2: torch.tensor([0, 1, 2])}, dataset="d", split="train", encoder="x")
    with pytest.raises(CheckpointError, match="outside"):
        load_labels(bad)
    with pytest.raises(UsageError, match="no such pseudo-label file"):
        load_labels(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError):
        load_labels(tmp_path / "junk.safetensors")


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1) * 10
    truth = torch.arange(60) % 3
    feats = centers[truth] + 0.05 * torch.randn(60, 16, generator=g)
    found = kmeans_labels(feats, 3, seed=0)
    assert found.dtype == torch.int64 and found.shape == (60,)
    # the same partition up to renaming
    pairs = {(int(a), int(b)) for a, b in zip(truth, found)}
    assert len(pairs) == 3 and len({b for _, b in pairs}) == 3
    with pytest.raises(DataError, match="cannot make 61 clusters"):
        kmeans_labels(feats, 61)


def test_authors_pickle_is_imported_safely(tmp_path):
    path = tmp_path / "imagenet_clPretrain_pseudo_labels.pkl"
    arrays = authors_pickle(path)
    read = read_authors_pickle(path)
    assert read.keys() == arrays.keys() and all(np.array_equal(read[k], arrays[k]) for k in arrays)
    out = import_authors_pickle(path, tmp_path / "cifar10.safetensors")
    labels = load_labels(out, 50_000)
    assert labels.ks == AUTHORS_KS
    assert labels.meta == {
        "dataset": "cifar10", "split": "train", "n": 50_000, "ks": list(AUTHORS_KS),
        "encoder": f"imported:{sha256_file(path)}",
    }
    for k in labels.ks:  # the training labels, not the test ones
        assert labels.labels[k].dtype == torch.int64
        assert np.array_equal(labels.labels[k].numpy(), arrays[f"pseudo_train_{k}"].astype(np.int64))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('pwned2').touch()",))


@pytest.mark.parametrize("payload,refused", [(_Evil(), "system"), (_EvalEvil(), "builtins.eval")])
def test_a_malicious_pickle_is_refused_without_running(tmp_path, payload, refused):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"pseudo_train_2": np.zeros(3, dtype=np.int32), "x": payload}))
    with pytest.raises(CheckpointError, match=refused):
        read_authors_pickle(path)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()


def test_pickles_of_other_shapes_are_refused(tmp_path):
    floats = tmp_path / "floats.pkl"
    floats.write_bytes(pickle.dumps({"pseudo_train_2": np.zeros(3, dtype=np.float32)}))
    with pytest.raises(CheckpointError, match="integer label arrays"):
        read_authors_pickle(floats)
    no_train = tmp_path / "test_only.pkl"
    no_train.write_bytes(pickle.dumps({"pseudo_test_2": np.zeros(3, dtype=np.int32)}))
    with pytest.raises(CheckpointError, match="no pseudo_train"):
        import_authors_pickle(no_train, tmp_path / "x.safetensors")
    authors_pickle(tmp_path / "full.pkl", 2000, 100)
    (tmp_path / "trunc.pkl").write_bytes((tmp_path / "full.pkl").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable pickle"):
        read_authors_pickle(tmp_path / "trunc.pkl")


@pytest.fixture
def encoder(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18-tiny", proj_dim=128)
    return save_model(tmp_path / "simclr.safetensors", model, kind="encoder", method="simclr", dataset="digits")


def test_cli_makes_labels_from_an_encoder(run_cli, tmp_path, encoder):
    code, out, err = run_cli("pseudo-labels", "--encoder", encoder, "-d", "digits", "--limit", "48", "--k", "2,5", "--device", "cpu")
    assert code == 0, err
    path = Path(out.strip())
    assert path.name == "pseudo-labels-digits.safetensors"
    labels = load_labels(path, 48)
    assert labels.ks == (2, 5) and labels.meta["encoder"] == sha256_file(encoder)
    assert labels.meta["dataset"] == "digits" and len(labels.labels[5].unique()) == 5
    code, _, err = run_cli("pseudo-labels", "--encoder", encoder, "-d", "digits", "--limit", "48", "--k", "2")
    assert code == 2 and "already exists" in err  # not overwritten without --force
    code, out, err = run_cli("pseudo-labels", "-e", "-", "-d", "digits", "--limit", "8", "--k", "9", "--force", stdin=f"{encoder}\n")
    assert code == 2 and "cannot make 9 clusters from 8 images" in err


def test_cli_imports_the_authors_pickle_and_refuses_evil_ones(run_cli, tmp_path):
    authors_pickle(tmp_path / "labels.pkl")
    code, out, err = run_cli("pseudo-labels", "import", tmp_path / "labels.pkl", "--out", "c10.safetensors", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["n"] == 50_000 and doc["ks"] == [2, 10, 50, 100, 500] and Path(doc["path"]).is_file()
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"x": _Evil()}))
    code, out, err = run_cli("pseudo-labels", "import", evil)
    assert code == 2 and out == "" and "refused" in err and "Traceback" not in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "evil.safetensors").exists()


def test_pretraining_uses_the_labels(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = {2: torch.randint(0, 2, (64,), generator=g), 10: torch.randint(0, 10, (64,), generator=g)}
    path = save_labels(tmp_path / "pl.safetensors", labels, dataset="digits", split="train", encoder="x")
    settings = resolve(PretrainSettings, dict(dataset="digits", arch="resnet18-tiny", limit=64, batch_size=32, epochs=1, pgd_steps=1,
        pseudo_labels=path, out="run", device="cpu",))
    result = pretrain(settings)
    assert result.metrics["pseudo_ce"] > 0
    assert result.metrics["loss"] == pytest.approx(result.metrics["contrast"] + 0.2 * result.metrics["pseudo_ce"], rel=1e-5)
    assert load_checkpoint(result.path).model_config.pseudo_ks == (2, 10)
    with pytest.raises(DataError, match="64 labels but the dataset has 96 images"):
        pretrain(settings.model_copy(update={"limit": 96, "out": Path("run2")}))
