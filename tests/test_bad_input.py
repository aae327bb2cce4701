"""What a new user hits, through the real CLI: each case asserts the exit code, one `error:`
line naming the problem (and at most a hint after it), no "internal error" and no traceback,
and which files are left behind.

Disk faults are injected at the ``os`` calls advcl writes through (``faults``): tests run as
root, whom permission bits do not stop, and a full disk cannot be made without filling one.
"""

import argparse
import json
import shlex
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from advcl_cli.checkpoint import load_checkpoint, load_state, read_metadata, save_model, save_state
from advcl_cli.models import create_model
from advcl_cli.pseudolabels import META_KEY as LABELS_KEY
from advcl_cli.pseudolabels import save_labels
from fakedata import write_imagefolder
from faults import disk_full, read_only

SMALL = ["--dataset", "digits", "--arch", "resnet18-tiny", "--limit", "64", "--batch-size", "32", "--device", "cpu"]
SIMCLR = [*SMALL, "--method", "simclr", "--epochs", "1"]
ADVCL = [*SMALL, "--pgd-steps", "1", "--epochs", "1"]
FT = ["--epochs", "1", "--limit", "32", "--batch-size", "32", "--eval-limit", "4", "--image-size", "16", "--device", "cpu"]
PNG = b"\x89PNG\r\n\x1a\n"


def refused(result, code: int, *phrases: str) -> tuple[str, str]:
    """The command failed with ``code`` and exactly one `error:` line holding every phrase,
    last on stderr but for at most one `hint:` line; no internal error, no traceback."""
    got, out, err = result
    assert got == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(errors) == 1, err
    tail = lines[errors[0] + 1:]
    assert len(tail) <= 1 and all(line.startswith("hint:") for line in tail), err
    assert "internal error" not in err and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in lines[errors[0]], (phrase, err)
    return out, err


def hint(err: str) -> str:
    return next((line for line in err.splitlines() if line.startswith("hint:")), "")


def tree(folder: Path) -> set[str]:
    """Every file and folder under ``folder``, relative to it."""
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*")}


@pytest.fixture(autouse=True)
def spare(tmp_path_factory, monkeypatch):
    """The temporary folder where a result that could not be written is rescued."""
    folder = tmp_path_factory.mktemp("spare")
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def encoder(tmp_path):
    torch.manual_seed(0)
    enc = create_model("resnet18-tiny", bn_sets=("normal", "pgd", "pgd_ce"), proj_dim=8, pseudo_ks=(2, 10))
    return save_model(tmp_path / "enc.safetensors", enc, kind="encoder", method="advcl", dataset="digits", eps=8 / 255)


def make_classifier(path, *, fill=None, config=None, dataset="digits"):
    torch.manual_seed(0)
    clf = create_model("resnet18-tiny", bn_sets=("pgd",), num_classes=10)
    if fill is not None:
        fill(clf)
    return save_model(path, clf, kind="classifier", method="advcl", dataset=dataset,
                      config={"image_size": 16, **(config or {})})


@pytest.fixture
def classifier(tmp_path):
    return make_classifier(tmp_path / "clf.safetensors")


def nan_weights(net):
    with torch.no_grad():
        net.backbone.layers[1][0].conv2.weight[0, 0, 0, 0] = float("nan")


def labels_file(path, labels: dict, meta=None):
    tensors = {f"k{k}": torch.as_tensor(v, dtype=torch.int64) for k, v in labels.items()}
    doc = meta if meta is not None else json.dumps({"dataset": "digits", "split": "train", "n": 64, "ks": list(labels)})
    save_file(tensors, str(path), metadata={LABELS_KEY: doc})
    return path


# --- pretrain ---------------------------------------------------------------------------------


def test_pretrain_unknown_dataset_leaves_no_run_folder(run_cli, tmp_path):
    refused(run_cli("pretrain", *ADVCL, "--dataset", "cifar11"), 2, "unknown dataset 'cifar11'")
    assert tree(tmp_path) == set()  # no runs/advcl-cifar11-resnet18-tiny
    refused(run_cli("pretrain", *ADVCL, "--batch-size", "128"), 2, "fewer than one batch")  # found after loading
    assert tree(tmp_path) == set()


def test_pretrain_pgd_steps_0_for_a_robust_method_is_said_and_recorded(run_cli, tmp_path):
    code, out, err = run_cli("pretrain", *ADVCL, "--pgd-steps", "0", "--out", "r")
    assert code == 0, err
    assert "warning: --pgd-steps 0: advcl trains without adversarial examples, so the encoder will not be robust" in err
    assert read_metadata(out.strip()).eps is None  # not "8/255": nothing was attacked
    code, out, err = run_cli("pretrain", *ADVCL, "--out", "r1")
    assert code == 0 and "--pgd-steps" not in err and read_metadata(out.strip()).eps == pytest.approx(8 / 255)


@pytest.mark.parametrize("labels, meta, phrase", [
    ({2: [0, 1, 5] + [0] * 61}, None, "outside [-1, 1]"),
    ({2: [0, -3] + [1] * 62}, None, "outside [-1, 1]"),
    ({2: [0] * 64, 10: [1] * 60}, None, "different lengths [60, 64]"),
    ({2: [0] * 64}, "not json", "metadata is not a JSON object"),
    ({2: [0] * 30}, None, "has 30 labels but the dataset has 64 images"),
    ({2: [-1] * 64}, None, "every label is -1"),
    ({1: [0] * 64}, None, "'k1' has 1 cluster, which labels nothing"),
], ids=["out-of-range", "negative", "unequal-lengths", "bad-metadata", "too-few", "all-unlabelled", "k1"])
def test_pretrain_refuses_broken_pseudo_labels_before_any_work(run_cli, tmp_path, labels, meta, phrase):
    path = labels_file(tmp_path / "labels.safetensors", labels, meta)
    _, err = refused(run_cli("pretrain", *ADVCL, "--pseudo-labels", path), 2, phrase)
    assert tree(tmp_path) == {"labels.safetensors"} and "training:" not in err


def test_pseudo_labels_are_checked_before_the_dataset_is_loaded(run_cli, tmp_path, monkeypatch):
    path = labels_file(tmp_path / "labels.safetensors", {2: [0, 7] + [0] * 62})
    monkeypatch.setenv("ADVCL_DOWNLOAD", "0")  # loading cifar10 would fail: it is not there
    refused(run_cli("pretrain", *ADVCL, "-d", "cifar10", "--data-dir", "nodata", "--pseudo-labels", path), 2,
            "outside [-1, 1]")


def test_pretrain_out_an_existing_file(run_cli, tmp_path):
    (tmp_path / "notes").write_text("mine")
    refused(run_cli("pretrain", *SIMCLR, "--out", "notes"), 2, "--out notes is a file, not a run folder")
    assert (tmp_path / "notes").read_text() == "mine" and tree(tmp_path) == {"notes"}
    refused(run_cli("pretrain", *SIMCLR, "--out", "notes/run"), 2, "notes is not a writable folder (it is a file)")
    assert tree(tmp_path) == {"notes"}


def test_pretrain_out_on_a_read_only_file_system(run_cli, tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()
    read_only(monkeypatch, tmp_path / "ro")
    _, err = refused(run_cli("pretrain", *SIMCLR, "--out", "ro/run"), 2, "cannot write --out ro/run", "Read-only file system")
    assert "read-only" in hint(err) and "training:" not in err  # refused before the data was loaded
    assert tree(tmp_path) == {"ro"}


def test_a_disk_full_in_epoch_1_leaves_a_folder_the_next_start_reuses(run_cli, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        disk_full(m, tmp_path / "r", names=["state.safetensors"])
        out, err = refused(run_cli("pretrain", *SIMCLR, "--epochs", "2", "--out", "r"), 1,
                           "cannot write r/state.safetensors: No space left on device")
    assert out == "" and "free some space" in hint(err) and "run the same command again" in hint(err)
    assert tree(tmp_path) == {"r", "r/.lock", "r/metrics.jsonl"}  # what the disk took before it filled up
    refused(run_cli("pretrain", *SIMCLR, "--epochs", "2", "--out", "r", "--resume"), 2, "nothing to resume")
    code, out, err = run_cli("pretrain", *SIMCLR, "--epochs", "2", "--out", "r")  # no --force needed: no run there
    assert code == 0, err
    assert [json.loads(line)["epoch"] for line in (tmp_path / "r/metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_the_final_encoder_is_rescued_when_its_disk_is_full(run_cli, tmp_path, monkeypatch, spare):
    disk_full(monkeypatch, tmp_path / "r", names=["encoder.safetensors"])
    out, err = refused(run_cli("pretrain", *SIMCLR, "--out", "r"), 1,
                       "cannot write r/encoder.safetensors: No space left on device; saved it as")
    (rescued,) = spare.glob("advcl-rescued-*-encoder.safetensors")
    assert str(rescued) in err and out == ""
    assert load_checkpoint(rescued).meta.kind == "encoder"
    assert "encoder.safetensors" not in tree(tmp_path / "r") and not list((tmp_path / "r").glob(".*.tmp"))


def test_a_failed_check_with_force_deletes_nothing(run_cli, tmp_path):
    code, out, err = run_cli("pretrain", *ADVCL, "--out", "r")
    assert code == 0, err
    before = {name: (tmp_path / "r" / name).read_bytes() for name in tree(tmp_path / "r")}
    labels = labels_file(tmp_path / "labels.safetensors", {2: [0, 5] + [0] * 62})
    refused(run_cli("pretrain", *ADVCL, "--out", "r", "--force", "--pseudo-labels", labels), 2, "outside [-1, 1]")
    refused(run_cli("pretrain", *ADVCL, "--out", "r", "--force", "--batch-size", "128"), 2, "fewer than one batch")
    assert {name: (tmp_path / "r" / name).read_bytes() for name in tree(tmp_path / "r")} == before


def test_a_folder_with_a_model_but_no_state_needs_force(run_cli, tmp_path, encoder):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "encoder.safetensors").write_bytes(encoder.read_bytes())
    _, err = refused(run_cli("pretrain", *SIMCLR, "--out", "r"), 2, "r already holds encoder.safetensors")
    assert "--force" in hint(err) and (tmp_path / "r" / "encoder.safetensors").read_bytes() == encoder.read_bytes()


def test_an_interrupted_run_says_the_exact_command_that_resumes_it(run_cli, tmp_path, monkeypatch):
    from advcl_cli.engine.run import RunDir

    real = RunDir.save_state

    def save_then_interrupt(self, *args, **kwargs):  # Ctrl-C right after epoch 1 was saved
        real(self, *args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(RunDir, "save_state", save_then_interrupt)
        out, err = refused(run_cli("pretrain", *SIMCLR, "--epochs", "2", "--out", "my run"), 130, "interrupted")
    assert out == ""
    command = hint(err).split(": ", 2)[-1]
    assert command == "advcl pretrain --out 'my run' --resume", err
    code, out, err = run_cli(*shlex.split(command)[1:])  # the hint, verbatim
    assert code == 0 and "resuming after epoch 1" in err, err
    assert out.strip() == "my run/encoder.safetensors"


def test_an_interrupt_before_the_first_epoch_says_to_start_again(run_cli, tmp_path, monkeypatch):
    from advcl_cli.engine.loop import Loop

    def interrupt(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(Loop, "run", interrupt)
    _, err = refused(run_cli("pretrain", *SIMCLR, "--out", "r"), 130, "interrupted")
    assert "no epoch was saved yet" in hint(err) and "--resume" not in err


def test_an_interrupt_of_a_verb_without_resume_has_no_resume_hint(run_cli, classifier, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("advcl_cli.engine.evaluate.evaluate", interrupt)
    _, err = refused(run_cli("eval", classifier, "-a", "fgsm", "--limit", "4"), 130, "interrupted")
    assert hint(err) == "" and "resume" not in err


# --- finetune ---------------------------------------------------------------------------------


def test_finetune_imagefolder_whose_test_split_has_an_unknown_class_stops_before_training(run_cli, tmp_path, encoder):
    root = write_imagefolder(tmp_path / "imgs", classes=("cat", "dog"), n_train=6, n_test=4, size=16)
    (root / "test" / "frog").mkdir()
    (root / "test" / "frog" / "x.png").write_bytes((root / "test" / "cat").glob("*.png").__next__().read_bytes())
    _, err = refused(run_cli("finetune", encoder, "-d", f"imagefolder:{root}", *FT), 2, "classes ['frog']", "not in")
    assert "finetuning:" not in err and not (tmp_path / "runs").exists()


def test_finetune_refuses_non_finite_weights(run_cli, tmp_path):
    torch.manual_seed(0)
    enc = create_model("resnet18-tiny", bn_sets=("normal", "pgd"))
    nan_weights(enc)
    path = save_model(tmp_path / "nan.safetensors", enc, kind="encoder", method="advcl", dataset="digits")
    refused(run_cli("finetune", path, *FT), 2, "NaN or inf weights", "backbone.layers.1.0.conv2.weight")
    assert tree(tmp_path) == {"nan.safetensors"}


def test_finetune_negative_trades_beta(run_cli, tmp_path, encoder):
    refused(run_cli("finetune", encoder, "--scheme", "aff", "--trades-beta", "-1", *FT), 2, "for --trades-beta")
    assert tree(tmp_path) == {"enc.safetensors"}


def test_finetune_out_an_existing_file(run_cli, tmp_path, encoder):
    (tmp_path / "notes").write_text("mine")
    refused(run_cli("finetune", encoder, *FT, "--out", "notes"), 2, "is a file, not a run folder")
    assert (tmp_path / "notes").read_text() == "mine"


def test_finetune_never_writes_over_its_own_input(run_cli, tmp_path, classifier):
    (tmp_path / "ft").mkdir()
    parent = tmp_path / "ft" / "classifier.safetensors"
    parent.write_bytes(classifier.read_bytes())
    refused(run_cli("finetune", parent, *FT, "--out", "ft", "--force"), 2, "the checkpoint it finetunes")
    assert parent.read_bytes() == classifier.read_bytes() and tree(tmp_path / "ft") == {"classifier.safetensors"}


def test_finetuning_a_classifier_notes_that_its_head_is_kept_and_records_the_classes(run_cli, tmp_path, classifier):
    code, out, err = run_cli("finetune", classifier, *FT, "--out", "ft")
    assert code == 0, err
    assert "is a classifier: finetuning continues from it, its head included" in err
    assert read_metadata(out.strip()).config["classes"] == [str(i) for i in range(10)]


def test_a_finetune_near_chance_says_a_short_run_is_expected_to(run_cli, encoder, monkeypatch):
    import advcl_cli.engine.finetune as ft

    real = ft.evaluate

    def at_chance(*args, **kwargs):  # the final test evaluation of a 1-epoch run, pinned at chance
        return {**real(*args, **kwargs), "clean_acc": 0.1}

    monkeypatch.setattr(ft, "evaluate", at_chance)
    code, out, err = run_cli("finetune", encoder, *FT, "--out", "ft")
    assert code == 0, err
    assert "near or below chance (10.0% for 10 classes)" in err and "expected of a short run" in err


def test_the_final_classifier_is_rescued_when_its_disk_is_full(run_cli, tmp_path, encoder, monkeypatch, spare):
    disk_full(monkeypatch, tmp_path / "ft", names=["classifier.safetensors"])
    _, err = refused(run_cli("finetune", encoder, *FT, "--out", "ft"), 1,
                     "cannot write ft/classifier.safetensors: No space left on device; saved it as")
    (rescued,) = spare.glob("advcl-rescued-*-classifier.safetensors")
    assert str(rescued) in err and "continue it from its last saved epoch: advcl finetune" in hint(err)
    assert {"clean_acc", "pgd20_acc"} <= read_metadata(rescued).metrics.keys()  # the measured numbers are kept


# --- eval -------------------------------------------------------------------------------------


def test_eval_plot_into_an_unwritable_place_is_refused_before_evaluating(run_cli, tmp_path, classifier, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    _, err = refused(run_cli("eval", classifier, "-a", "fgsm", "--limit", "4", "--plot", "a-file/c.png"), 2,
                     "--plot a-file/c.png", "not a writable folder")
    assert "clean accuracy" not in err
    (tmp_path / "ro").mkdir()
    read_only(monkeypatch, tmp_path / "ro")
    _, err = refused(run_cli("eval", classifier, "-a", "fgsm", "--limit", "4", "--plot", "ro/c.png"), 2,
                     "--plot ro/c.png", "Read-only file system")
    assert "clean accuracy" not in err and tree(tmp_path / "ro") == set()


def test_an_output_that_is_a_folder_is_refused_even_with_force(run_cli, tmp_path, classifier, original):
    (tmp_path / "out").mkdir()
    for args in (["eval", classifier, "-a", "fgsm", "--plot", "out"], ["attack", classifier, "--out", "out"],
                 ["import", original, "--out", "out"]):
        _, err = refused(run_cli(*args, "--force"), 2, "out: it is a folder")
        assert "--force" not in hint(err)
    assert tree(tmp_path / "out") == set()


def test_eval_plot_replaces_a_file_only_with_force_and_never_the_model(run_cli, tmp_path, classifier):
    (tmp_path / "c.png").write_bytes(b"my old picture")
    refused(run_cli("eval", classifier, "-a", "fgsm", "--limit", "4", "--plot", "c.png"), 2, "--plot c.png already exists")
    assert (tmp_path / "c.png").read_bytes() == b"my old picture"
    before = classifier.read_bytes()
    refused(run_cli("eval", classifier, "-a", "fgsm", "--limit", "4", "--plot", classifier, "--force"), 2,
            "is the model being evaluated")
    assert classifier.read_bytes() == before
    code, out, err = run_cli("eval", classifier, "-a", "fgsm", "--limit", "4", "--plot", "c.png", "--force")
    assert code == 0, err
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("json_output", [False, True], ids=["table", "json"])
def test_eval_prints_its_numbers_before_a_plot_write_fails(run_cli, tmp_path, classifier, monkeypatch, json_output):
    (tmp_path / "plots").mkdir()
    disk_full(monkeypatch, tmp_path / "plots")
    out, err = refused(run_cli("eval", classifier, "-a", "fgsm", "--limit", "4", "--plot", "plots/c.png",
                               *(["--json"] if json_output else [])),
                       1, "cannot write plots/c.png: No space left on device", "the results above are complete")
    if json_output:
        assert json.loads(out)["robust"][0]["attack"] == "fgsm"
    else:
        assert "fgsm" in out and "clean" in out
    assert tree(tmp_path / "plots") == set()


def test_eval_refuses_non_finite_weights(run_cli, tmp_path):
    path = make_classifier(tmp_path / "nan.safetensors", fill=nan_weights)
    refused(run_cli("eval", path, "-a", "fgsm"), 2, f"{path} holds NaN or inf weights",
            "tensor 'backbone.layers.1.0.conv2.weight': 1 of")


def test_eval_reports_non_finite_logits(run_cli, tmp_path):
    def overflow(net):  # finite weights whose logits overflow float32
        with torch.no_grad():
            net.fc.weight.fill_(3e38)
            net.fc.bias.fill_(3.4e38)  # float32's largest is 3.4028e38

    path = make_classifier(tmp_path / "big.safetensors", fill=overflow)
    code, out, err = run_cli("eval", path, "-a", "fgsm", "--limit", "6", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["nonfinite_logits"] == 6 and doc["robust"][0]["nonfinite_logits"] == 6
    assert "warning: the model's logits are NaN or inf for 6 of 6 clean images" in err


def test_eval_on_a_dataset_with_other_class_names_warns_naming_both(run_cli, tmp_path):
    path = make_classifier(tmp_path / "letters.safetensors", config={"classes": list("abcdefghij")}, dataset="letters")
    code, out, err = run_cli("eval", path, "-d", "digits", "--limit", "4")
    assert code == 0, err
    assert "trained on the classes a, b, c, d, e, ... (10 in all)" in err and "'digits' has the classes 0, 1, 2" in err


def test_eval_of_a_folder_or_an_unreadable_file(run_cli, tmp_path, classifier, monkeypatch):
    (tmp_path / "models").mkdir()
    refused(run_cli("eval", "models"), 2, "models is a folder, not a checkpoint file")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("advcl_cli.checkpoint.open", denied, raising=False)
    refused(run_cli("eval", classifier), 2, f"cannot read {classifier}: Permission denied")


def test_a_stray_os_error_names_its_path_instead_of_an_internal_error(run_cli, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/some/where")

    monkeypatch.setattr("advcl_cli.zoo.resolve", denied)
    refused(run_cli("eval", "x.safetensors"), 2, "cannot use /some/where: Permission denied")


# --- attack -----------------------------------------------------------------------------------


def test_attack_rescues_its_tensors_when_the_disk_is_full(run_cli, tmp_path, classifier, monkeypatch, spare):
    (tmp_path / "out").mkdir()
    disk_full(monkeypatch, tmp_path / "out")
    out, err = refused(run_cli("attack", classifier, "-a", "fgsm", "--n", "2", "--out", "out/adv.safetensors"), 1,
                       "cannot write out/adv.safetensors: No space left on device; saved it as")
    (rescued,) = spare.glob("advcl-rescued-*-adv.safetensors")
    assert str(rescued) in err and out == "" and tree(tmp_path / "out") == set()


def test_attack_grid_follows_the_overwrite_rule(run_cli, tmp_path, classifier):
    (tmp_path / "g.png").write_bytes(b"old")
    refused(run_cli("attack", classifier, "--n", "2", "--grid", "g.png"), 2, "--grid g.png already exists")
    refused(run_cli("attack", classifier, "--n", "2", "--out", "a.safetensors", "--grid", "a.safetensors", "--force"), 2,
            "--grid a.safetensors is also --out")
    assert (tmp_path / "g.png").read_bytes() == b"old" and not (tmp_path / "a.safetensors").exists()


def test_attack_refuses_non_finite_weights(run_cli, tmp_path):
    path = make_classifier(tmp_path / "nan.safetensors", fill=nan_weights)
    refused(run_cli("attack", path, "--n", "2"), 2, "NaN or inf weights")
    assert tree(tmp_path) == {"nan.safetensors"}


# --- import -----------------------------------------------------------------------------------


@pytest.fixture
def original(tmp_path):
    from test_import import KS, SETS, original_layout, randomise, save_original

    source = randomise(create_model("resnet18-tiny", bn_sets=SETS, proj_dim=128, pseudo_ks=KS)).eval()
    return save_original(tmp_path / "epoch_400.ckpt", original_layout(source))


def test_import_an_empty_ckpt(run_cli, tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    refused(run_cli("import", "empty.ckpt"), 2, "empty.ckpt is empty (0 bytes)")
    assert tree(tmp_path) == {"empty.ckpt"}


def test_import_refuses_a_pickle_without_torchs_advice(run_cli, tmp_path):
    torch.save({"model": {"conv1.weight": torch.zeros(1)}, "args": argparse.Namespace(lr=0.5)}, tmp_path / "x.ckpt")
    _, err = refused(run_cli("import", "x.ckpt"), 2, "holds objects other than tensors (argparse.Namespace)", "refused")
    assert "weights_only" not in err and tree(tmp_path) == {"x.ckpt"}


def test_import_unknown_dataset(run_cli, tmp_path, original):
    refused(run_cli("import", original, "-d", "nosuch"), 2, "unknown dataset 'nosuch'")
    assert tree(tmp_path) == {"epoch_400.ckpt"}


def test_import_never_writes_over_its_input(run_cli, tmp_path, original):
    before = original.read_bytes()
    refused(run_cli("import", original, "--out", original, "--force"), 2, "is the checkpoint being imported")
    assert original.read_bytes() == before and tree(tmp_path) == {"epoch_400.ckpt"}


def test_import_out_on_a_read_only_or_full_disk(run_cli, tmp_path, original, monkeypatch, spare):
    (tmp_path / "ro").mkdir()
    (tmp_path / "full").mkdir()
    with monkeypatch.context() as m:
        read_only(m, tmp_path / "ro")
        refused(run_cli("import", original, "--out", "ro/enc.safetensors"), 2, "Read-only file system")
    disk_full(monkeypatch, tmp_path / "full")
    refused(run_cli("import", original, "--out", "full/enc.safetensors"), 1,
            "cannot write full/enc.safetensors: No space left on device")
    assert tree(tmp_path / "ro") == set() and tree(tmp_path / "full") == set()  # nothing half-written


def test_import_refuses_non_finite_weights(run_cli, tmp_path, original):
    obj = torch.load(original, weights_only=True)
    obj["model"]["module.layer1.0.conv1.weight"][0, 0, 0, 0] = float("inf")
    torch.save(obj, tmp_path / "inf.ckpt")
    refused(run_cli("import", "inf.ckpt"), 2, "NaN or inf weights (tensor 'layer1.0.conv1.weight'")
    assert not (tmp_path / "inf.safetensors").exists()


# --- pseudo-labels ----------------------------------------------------------------------------


PL = ["-d", "digits", "--limit", "32", "--device", "cpu"]


def test_pseudo_labels_out_is_checked_before_k_means(run_cli, tmp_path, encoder, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    _, err = refused(run_cli("pseudo-labels", "-e", encoder, *PL, "--k", "2", "--out", "a-file/l.safetensors"), 2,
                     "not a writable folder")
    assert "features of" not in err
    (tmp_path / "ro").mkdir()
    read_only(monkeypatch, tmp_path / "ro")
    _, err = refused(run_cli("pseudo-labels", "-e", encoder, *PL, "--k", "2", "--out", "ro/l.safetensors"), 2,
                     "Read-only file system")
    assert "features of" not in err


@pytest.mark.parametrize("k, phrase", [("1", "--k 1 puts every image in one cluster"), ("0", "--k 0 is not a number")])
def test_pseudo_labels_k_below_2(run_cli, tmp_path, encoder, k, phrase):
    refused(run_cli("pseudo-labels", "-e", encoder, *PL, "--k", k), 2, phrase)
    assert tree(tmp_path) == {"enc.safetensors"}


def test_pseudo_labels_never_write_over_the_encoder(run_cli, encoder):
    before = encoder.read_bytes()
    refused(run_cli("pseudo-labels", "-e", encoder, *PL, "--k", "2", "--out", encoder, "--force"), 2, "is the encoder")
    assert encoder.read_bytes() == before


def test_pseudo_labels_from_a_classifier_note_that_its_head_is_ignored(run_cli, tmp_path, classifier):
    code, out, err = run_cli("pseudo-labels", "-e", classifier, *PL, "--k", "2", "--image-size", "16")
    assert code == 0, err
    assert "is a classifier: its head is ignored" in err and Path(out.strip()).is_file()


def test_pseudo_labels_are_rescued_when_the_disk_is_full(run_cli, tmp_path, encoder, monkeypatch, spare):
    (tmp_path / "full").mkdir()
    disk_full(monkeypatch, tmp_path / "full")
    refused(run_cli("pseudo-labels", "-e", encoder, *PL, "--k", "2", "--out", "full/l.safetensors"), 1,
            "No space left on device; saved it as")
    assert len(list(spare.glob("advcl-rescued-*-l.safetensors"))) == 1


def test_pseudo_labels_import_never_writes_over_its_input_and_checks_the_dataset(run_cli, tmp_path):
    save_labels(tmp_path / "l.safetensors", {2: torch.zeros(4)}, dataset="digits", split="train", encoder="x")
    before = (tmp_path / "l.safetensors").read_bytes()
    refused(run_cli("pseudo-labels", "import", "l.safetensors", "--force"), 2, "is the pickle being imported")
    refused(run_cli("pseudo-labels", "import", "l.safetensors", "--out", "o.safetensors", "-d", "nosuch"), 2,
            "unknown dataset 'nosuch'")
    assert (tmp_path / "l.safetensors").read_bytes() == before and tree(tmp_path) == {"l.safetensors"}


def test_pseudo_labels_unknown_dataset(run_cli, tmp_path, encoder):
    refused(run_cli("pseudo-labels", "-e", encoder, "-d", "cifar11", "--k", "2"), 2, "unknown dataset 'cifar11'")
    assert tree(tmp_path) == {"enc.safetensors"}


# --- datasets and config ----------------------------------------------------------------------


def test_a_corrupt_archive_in_the_data_folder_says_its_checksum_failed(run_cli, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "cifar-10-python.tar.gz").write_bytes(b"half a download" * 100)
    monkeypatch.setenv("ADVCL_DOWNLOAD", "0")
    _, err = refused(run_cli("pretrain", *SIMCLR, "-d", "cifar10", "--data-dir", data), 2,
                     "cifar-10-python.tar.gz is there but its checksum failed")
    assert "delete it" in hint(err)
    monkeypatch.delenv("ADVCL_DOWNLOAD")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", offline)
    refused(run_cli("pretrain", *SIMCLR, "-d", "cifar10", "--data-dir", data), 1,
            "checksum failed", "could not be downloaded", "network is unreachable")
    assert tree(tmp_path) == {"data", "data/cifar-10-python.tar.gz"}


def test_a_data_dir_that_is_a_file(run_cli, tmp_path):
    (tmp_path / "data").write_text("not a folder")
    refused(run_cli("pretrain", *SIMCLR, "-d", "cifar10", "--data-dir", "data"), 2, "the data folder data is a file")
    assert tree(tmp_path) == {"data"}


def test_an_empty_model_file(run_cli, tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"")
    for verb in (["eval"], ["attack"], ["finetune"], ["pseudo-labels", "-e"]):
        refused(run_cli(*verb, "m.safetensors"), 2, "m.safetensors is empty (0 bytes)")
    assert tree(tmp_path) == {"m.safetensors"}


def test_a_config_file_that_is_not_utf8(run_cli, tmp_path):
    (tmp_path / "advcl.toml").write_bytes("epochs = 2 # \xe9t\xe9\n".encode("latin-1"))
    refused(run_cli("pretrain", *SIMCLR), 2, "advcl.toml is not UTF-8")
    assert tree(tmp_path) == {"advcl.toml"}


@pytest.mark.parametrize("toml, phrase, closest", [
    ("[pretrain]\nepocs = 3\n", "unknown key 'epocs' in [pretrain] of advcl.toml", "did you mean 'epochs'?"),
    ("batch_sise = 8\n", "unknown key 'batch_sise' in the top level of advcl.toml", "did you mean 'batch_size'?"),
    ("[pretrian]\nepochs = 3\n", "unknown table [pretrian] in advcl.toml", "did you mean [pretrain]?"),
])
def test_a_typo_in_the_config_file_stops_before_any_work(run_cli, tmp_path, toml, phrase, closest):
    (tmp_path / "advcl.toml").write_text(toml)
    _, err = refused(run_cli("pretrain", *SIMCLR), 2, phrase)
    assert hint(err) == f"hint: {closest}"
    assert tree(tmp_path) == {"advcl.toml"}  # no run folder


def evaluated(result) -> list[tuple[str, str]]:
    """(attack, eps label) of every robust row of `advcl eval --json`."""
    code, out, err = result
    assert code == 0, err
    return [(row["attack"], row["eps_label"]) for row in json.loads(out)["robust"]]


def test_eval_settings_from_the_environment_and_the_config_file_are_used(run_cli, tmp_path, classifier, monkeypatch):
    args = ("eval", classifier, "--limit", "4", "--device", "cpu", "--json")
    # the variables are named after the flags, eps in the documented k/255 form, lists comma-separated
    monkeypatch.setenv("ADVCL_EPS", "2/255,4/255")
    monkeypatch.setenv("ADVCL_ATTACK", "fgsm")
    assert evaluated(run_cli(*args)) == [("fgsm", "2/255"), ("fgsm", "4/255")]
    monkeypatch.delenv("ADVCL_EPS")
    monkeypatch.delenv("ADVCL_ATTACK")
    (tmp_path / "advcl.toml").write_text('[eval]\nattack = ["fgsm", "FGSM"]\neps = "8/255"\n')
    assert evaluated(run_cli(*args)) == [("fgsm", "8/255")]  # a repeated attack runs once
    assert evaluated(run_cli(*args, "--eps", "1/255,1/255")) == [("fgsm", "1/255")]  # the flag wins; once
    # an unknown ADVCL_* variable is a warning naming the closest, and the run goes on
    monkeypatch.setenv("ADVCL_EPSS", "4/255")
    code, out, err = run_cli(*args)
    assert code == 0 and "warning: environment variable ADVCL_EPSS is not an advcl setting" in err
    assert "did you mean ADVCL_EPS?" in err and evaluated((code, out, err)) == [("fgsm", "8/255")]


def test_a_malformed_eps_from_the_environment_is_refused_in_one_line(run_cli, classifier, monkeypatch):
    monkeypatch.setenv("ADVCL_EPS", "8/0")
    refused(run_cli("eval", classifier, "--limit", "4", "--device", "cpu"), 2, "ADVCL_EPS", "8/0")


@pytest.mark.parametrize("flag, value, phrase", [
    ("--momentum", "inf", "Input should be a finite number"),
    ("--lr", "nan", "Input should be a finite number"),
    ("--lr", "1e300", "1e+300 is beyond float32"),
    ("--seed", "-1", "greater than or equal to 0"),
    ("--seed", str(2**64), "less than or equal to 4294967295"),
    ("--image-size", "40000", "less than or equal to 1024"),
    ("--out", "", "the path is empty"),
])
def test_numbers_that_cannot_train_and_empty_paths_are_refused_up_front(run_cli, tmp_path, flag, value, phrase):
    refused(run_cli("pretrain", *SIMCLR, flag, value), 2, f"bad value '{value}' for {flag}", phrase)
    assert tree(tmp_path) == set()  # nothing trained into the current folder


def test_weights_that_diverge_with_a_finite_loss_are_never_saved(run_cli, tmp_path, encoder, monkeypatch):
    """The loss of the last step is finite, the update after it is not: no classifier is saved."""
    real = torch.optim.SGD.step

    def diverge(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", diverge)
    _, err = refused(run_cli("finetune", encoder, *FT, "--out", "ft"), 1, "the weights became NaN or inf in epoch 1")
    assert "start again" in hint(err) and "--resume" not in hint(err)  # nothing was saved to resume from
    assert not (tmp_path / "ft" / "classifier.safetensors").exists() and not (tmp_path / "ft" / "state.safetensors").exists()


@pytest.fixture
def stopped_run(run_cli, tmp_path):
    """A 2-epoch run stopped after its first epoch (the state of epoch 1, as a kill leaves it)."""
    code, _, err = run_cli("pretrain", *SIMCLR, "--epochs", "1", "--out", "r")
    assert code == 0, err
    state = load_state(tmp_path / "r" / "state.safetensors")
    state.update(total_epochs=2, finished=False)
    state["config"]["epochs"] = 2
    return state


@pytest.mark.parametrize("damage, phrase", [
    (lambda s: s.update(epoch=-1), "epoch -1 of 2 is not a finished epoch count"),
    (lambda s: s.update(epoch=99), "epoch 99 of 2 is not a finished epoch count"),
    (lambda s: s.pop("config"), "it lacks config"),
    (lambda s: s.update(optimizer=[1, 2]), "is not a table"),
])
def test_a_damaged_resume_state_is_named_as_such(run_cli, tmp_path, stopped_run, damage, phrase):
    damage(stopped_run)
    save_state(tmp_path / "r" / "state.safetensors", stopped_run)
    before = (tmp_path / "r" / "encoder.safetensors").read_bytes()
    _, err = refused(run_cli("pretrain", *SIMCLR, "--epochs", "2", "--out", "r", "--resume"), 2,
                     "resume state r/state.safetensors is damaged", phrase)
    assert hint(err) == "hint: start over with --force"
    assert (tmp_path / "r" / "encoder.safetensors").read_bytes() == before


def test_a_state_missing_a_tensor_is_named_as_such(run_cli, tmp_path, stopped_run):
    path = tmp_path / "r" / "state.safetensors"
    save_state(path, stopped_run)
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if k != sorted(tensors)[0]}, path, metadata=header["__metadata__"])
    refused(run_cli("pretrain", *SIMCLR, "--epochs", "2", "--out", "r", "--resume"), 2, "is damaged: tensor", "is missing")


def test_resuming_with_another_method_or_unknown_settings_says_so(run_cli, tmp_path, stopped_run):
    save_state(tmp_path / "r" / "state.safetensors", stopped_run)
    _, err = refused(run_cli("pretrain", *SMALL, "--method", "advcl", "--epochs", "2", "--out", "r", "--resume"), 2,
                     "cannot resume with --method advcl: the run trains simclr")
    assert hint(err) == "hint: resume with --method simclr, or start over with --force"
    stopped_run["config"]["bogus_key"] = 1
    save_state(tmp_path / "r" / "state.safetensors", stopped_run)
    _, err = refused(run_cli("pretrain", *SIMCLR, "--epochs", "2", "--out", "r", "--resume"), 2,
                     "settings this advcl does not have (bogus_key)")
    stopped_run["config"].pop("bogus_key")
    save_state(tmp_path / "r" / "state.safetensors", stopped_run)
    code, _, err = run_cli("pretrain", *SIMCLR, "--epochs", "2", "--out", "r", "--resume")  # undamaged: it resumes
    assert code == 0 and "resuming after epoch 1" in err, err


def test_push_refuses_a_diverged_model_before_contacting_the_hub(run_cli, tmp_path):
    path = make_classifier(tmp_path / "nan.safetensors", fill=nan_weights)
    refused(run_cli("push", path, "--repo", "lab/m", "--dry-run", "--endpoint", "http://127.0.0.1:1"), 2,
            "holds NaN or inf weights", "backbone.layers.1.0.conv2.weight")
    assert tree(tmp_path) == {"nan.safetensors"}


@pytest.mark.parametrize("toml, flag", [("limit = true\n", "--limit"), ("[eval]\nbatch_size = false\n", "--batch-size")])
def test_toml_true_is_not_the_number_1(run_cli, tmp_path, classifier, toml, flag):
    """A flag or a variable refuses `true` for a number, so the file does too (pydantic would read 1)."""
    (tmp_path / "advcl.toml").write_text(toml)
    refused(run_cli("eval", classifier, "--device", "cpu"), 2, f"for {flag} (from advcl.toml", "only for on/off settings")


def test_a_folder_where_a_file_goes_is_called_a_folder(run_cli, tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    for args, what in [(("pretrain", *ADVCL, "--pseudo-labels", "d"), "pseudo-label file (--pseudo-labels)"),
                       (("pseudo-labels", "import", "d"), "file"),
                       (("pretrain", *SMALL, "--method", "deacl", "--teacher", "d"), "checkpoint file (--teacher)"),
                       (("import", "d"), "checkpoint file"), (("eval", "d"), "checkpoint file")]:
        _, err = refused(run_cli(*args), 2, f"d is a folder, not a {what}")
        assert hint(err) == "hint: name the file in it"
    monkeypatch.setenv("ADVCL_CONFIG", "d")
    refused(run_cli("eval", "m.safetensors"), 2, "d is a folder, not a config file")
    assert tree(tmp_path) == {"d"}


@pytest.mark.parametrize("args, phrases", [
    (["pull", "hf:lab/m", "--endpoint", "not a url"], ["bad value 'not a url' for --hf-endpoint", "not an http(s) URL"]),
    (["pull", "hf:lab/m", "--endpoint", ""], ["bad value '' for --hf-endpoint"]),
    (["finetune", "{clf}", "--milestones", "-3"], ["--milestones", "epoch -3 is not an epoch number"]),
    (["finetune", "{clf}", "--bn-set", ""], ["bad value '' for --bn-set: the value is empty"]),
    (["eval", "{clf}", "-d", ""], ["bad value '' for --dataset: the value is empty"]),
    (["eval", "{clf}", "-a", "fgsm", "--plot", "curve.jpg"], ["--plot curve.jpg: advcl writes a PNG file there"]),
    (["attack", "{clf}", "--grid", "grid"], ["--grid grid: advcl writes a PNG file there"]),
    (["import", "{clf}", "--out", "new.safetensors"], ["clf.safetensors is already an advcl checkpoint (a classifier of advcl)"]),
])
def test_more_arguments_that_cannot_be_meant(run_cli, tmp_path, classifier, args, phrases):
    before = tree(tmp_path)
    refused(run_cli(*[a.format(clf=classifier) for a in args]), 2, *phrases)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("toml, phrase, closest", [
    ("eval = 4\n", "'eval' in advcl.toml is a table of settings, not a value", "write [eval] with its settings under it"),
    ("[eval]\nbatch_size = { a = 1 }\n", "'batch_size' in [eval] of advcl.toml takes a value, not a table",
     "write batch_size = VALUE"),
    ("[pull]\nhf_endpoint = \"http://x\"\n", "unknown table [pull] in advcl.toml", "pull, push, zoo read their settings from [hub]"),
])
def test_a_misplaced_table_in_the_config_file_is_explained(run_cli, tmp_path, classifier, toml, phrase, closest):
    (tmp_path / "advcl.toml").write_text(toml)
    _, err = refused(run_cli("eval", classifier), 2, phrase)
    assert hint(err) == f"hint: {closest}"


def test_per_image_without_json_is_said(run_cli, classifier):
    code, out, err = run_cli("eval", classifier, "-a", "fgsm", "--limit", "4", "--device", "cpu", "--per-image")
    assert code == 0 and "warning: --per-image adds the flags to the --json document" in err
