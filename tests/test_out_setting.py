"""--out is one setting: ADVCL_OUT and the TOML file's ``out`` reach every verb that writes a file,
below the flag."""

from pathlib import Path

import torch
from test_import import original_layout, save_original, source  # noqa: F401 (fixture)
from test_pseudo_labels import authors_pickle

from advcl_cli.checkpoint import load_checkpoint, save_model
from advcl_cli.models import create_model
from advcl_cli.pseudolabels import load_labels


def written(result, expected):
    code, out, err = result
    assert code == 0, err
    assert Path(out.strip()) == Path(expected) and Path(expected).is_file(), (out, expected)


def test_attack_and_pseudo_labels_take_out_from_the_environment(run_cli, tmp_path, monkeypatch):
    torch.manual_seed(0)
    clf = save_model(tmp_path / "clf.safetensors", create_model("resnet18-tiny", bn_sets=("pgd",), num_classes=10),
                     kind="classifier", method="advcl", dataset="digits", config={"image_size": 16})
    enc = save_model(tmp_path / "enc.safetensors", create_model("resnet18-tiny", bn_sets=("normal", "pgd")),
                     kind="encoder", method="simclr", dataset="digits")
    monkeypatch.setenv("ADVCL_OUT", "from-env.safetensors")
    written(run_cli("attack", clf, "--attack", "fgsm", "--n", "4"), "from-env.safetensors")
    written(run_cli("attack", clf, "--attack", "fgsm", "--n", "4", "--out", "flag.safetensors"), "flag.safetensors")
    written(run_cli("pseudo-labels", "--encoder", enc, "-d", "digits", "--limit", "32", "--k", "2",
                    "--out", "labels.safetensors"), "labels.safetensors")
    monkeypatch.setenv("ADVCL_OUT", "env-labels.safetensors")
    written(run_cli("pseudo-labels", "--encoder", enc, "-d", "digits", "--limit", "32", "--k", "2"), "env-labels.safetensors")
    assert load_labels("env-labels.safetensors").ks == (2,)


def test_both_imports_take_out_from_the_config_file(run_cli, tmp_path, source):  # noqa: F811
    ckpt = save_original(tmp_path / "epoch_400.ckpt", original_layout(source))
    pickle = tmp_path / "labels.pkl"
    authors_pickle(pickle)
    Path("advcl.toml").write_text('out = "top.safetensors"\n')
    written(run_cli("import", ckpt), "top.safetensors")
    assert load_checkpoint("top.safetensors").meta.kind == "encoder"
    Path("advcl.toml").write_text('out = "top.safetensors"\n[import]\nout = "table.safetensors"\n')
    written(run_cli("pseudo-labels", "import", pickle), "table.safetensors")  # the verb's table beats the top level
    written(run_cli("import", ckpt, "--out", "flag.safetensors"), "flag.safetensors")
