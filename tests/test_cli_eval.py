"""`advcl finetune`, `advcl eval` and `advcl attack` from the command line."""

import builtins
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

from advcl_cli.checkpoint import save_model, sha256_file
from advcl_cli.models import create_model
from test_attacks import train_tiny_classifier


@pytest.fixture
def encoder(tmp_path):
    torch.manual_seed(0)
    enc = create_model("resnet18-tiny", bn_sets=("normal", "pgd", "pgd_ce"), proj_dim=8, pseudo_ks=(2, 10))
    return save_model(tmp_path / "enc.safetensors", enc, kind="encoder", method="advcl", dataset="digits", eps=8 / 255)


@pytest.fixture
def classifier(tmp_path):
    torch.manual_seed(0)
    clf = create_model("resnet18-tiny", bn_sets=("pgd",), num_classes=10)
    return save_model(tmp_path / "clf.safetensors", clf, kind="classifier", method="advcl", dataset="digits",
                      config={"image_size": 16})


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_encoder_through_finetune_then_eval_json(run_cli, encoder):
    code, out, err = run_cli("finetune", encoder, "--scheme", "slf", "--epochs", "1", "--limit", "64",
                             "--batch-size", "32", "--eval-limit", "8", "--image-size", "16", "--out", "ft", "--json")
    assert code == 0, err
    finetuned = out
    path = json.loads(finetuned)["path"]
    assert path.endswith("classifier.safetensors") and "test (8 images)" in err

    code, out, err = run_cli("eval", path, "--attack", "pgd5", "--attack", "fgsm", "--limit", "12", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"] == path and doc["sha256"] == sha256_file(path)
    assert (doc["dataset"], doc["split"], doc["n"]) == ("digits", "test", 12)
    assert doc["eps"] == [pytest.approx(8 / 255)]
    assert [r["attack"] for r in doc["robust"]] == ["pgd5", "fgsm"]
    for r in doc["robust"]:
        assert 0 <= r["robust_acc"] <= doc["clean_acc"] <= 1 and r["seconds"] > 0
    assert "PGD (L-inf): 5 signed-gradient steps" in err  # the attack's settings go to stderr

    code, out2, err = run_cli("eval", "--limit", "12", "--json", stdin=path + "\n")  # the path on stdin
    assert code == 0, err
    assert json.loads(out2)["clean_acc"] == doc["clean_acc"]
    code, out2, err = run_cli("eval", "--limit", "12", "--json", stdin=finetuned)  # finetune --json on stdin: its path
    assert code == 0, err
    assert json.loads(out2)["model"] == path and json.loads(out2)["clean_acc"] == doc["clean_acc"]
    code, out2, err = run_cli("eval", "--limit", "12", stdin=out)  # eval's JSON names no file to read
    assert code == 2 and out2 == "" and "JSON document without a 'path'" in one_error_line(err)


def test_eval_table_eps_list_and_plot(run_cli, classifier, tmp_path):
    code, out, err = run_cli("eval", classifier, "-a", "fgsm", "--eps", "2/255,0.05", "--limit", "8",
                             "--plot", tmp_path / "plots" / "new" / "curve.png")  # missing folders: created, as --help says
    assert code == 0, err
    assert "clean" in out and "2/255" in out and "0.05" in out and "fgsm" in out
    assert (tmp_path / "plots" / "new" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_with_several_attacks_adds_the_worst_case(run_cli, classifier):
    code, out, err = run_cli("eval", classifier, "-a", "fgsm", "-a", "pgd2", "--limit", "8")
    assert code == 0, err
    assert "worst case" in out
    code, out, err = run_cli("eval", classifier, "-a", "fgsm", "-a", "pgd2", "--limit", "8", "--json", "--per-image")
    assert code == 0, err
    doc = json.loads(out)
    (worst,) = doc["worst_case"]
    assert worst["attacks"] == ["fgsm", "pgd2"] and worst["eps_label"] == "8/255"
    assert worst["robust_acc"] <= min(r["robust_acc"] for r in doc["robust"])
    flags = doc["per_image"]
    assert set(flags) == {"clean", "fgsm@8/255", "pgd2@8/255", "worst@8/255"}
    both = "".join("1" if a == b == "1" else "0" for a, b in zip(flags["fgsm@8/255"], flags["pgd2@8/255"]))
    assert flags["worst@8/255"] == both and both.count("1") == round(8 * worst["robust_acc"])


@pytest.fixture(scope="module")
def trained_classifier(tmp_path_factory):
    model = train_tiny_classifier(image_size=16)
    return save_model(tmp_path_factory.mktemp("trained") / "clf.safetensors", model, kind="classifier",
                      method="advcl", dataset="digits", config={"image_size": 16})


def test_eval_autoattack_from_the_cli(run_cli, trained_classifier):
    # eps large enough that APGD-CE breaks every image: the standard ensemble's later attacks
    # (FAB-T, Square with 5000 queries) cost about a second per surviving image on a CPU
    code, out, err = run_cli("eval", trained_classifier, "-a", "autoattack", "--eps", "64/255", "--limit", "6",
                             "--batch-size", "3", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["clean_acc"] > 0.5
    assert doc["robust"][0]["attack"] == "autoattack" and doc["robust"][0]["robust_acc"] < doc["clean_acc"]
    assert "pyautoattack" in doc["attacks"]["autoattack"] and "pyautoattack" in err
    # progress while it runs: a line per finished attack of each block (3 images) and one per block
    lines = err.splitlines()
    after_attack = [i for i, line in enumerate(lines) if line.startswith("autoattack: apgd-ce done, ") and "/3 images still robust" in line]
    first_block = [i for i, line in enumerate(lines) if line.startswith("autoattack eps=64/255: 3/6 images, ") and "robust so far" in line
                   and "elapsed, about " in line and line.endswith(" left")]
    last_block = [i for i, line in enumerate(lines) if line.startswith("autoattack eps=64/255: 6/6 images, ")]
    result = [i for i, line in enumerate(lines) if "autoattack eps=64/255: robust accuracy" in line]
    assert len(after_attack) == 2 and len(first_block) == len(last_block) == len(result) == 1, err
    assert after_attack[0] < first_block[0] < after_attack[1] < last_block[0] < result[0], err


def test_plot_without_matplotlib_says_how_to_install_it(run_cli, classifier, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, out, err = run_cli("eval", classifier, "-a", "fgsm", "--plot", "c.png")
    assert code == 2 and out == ""
    assert "pip install 'advcl[plot]'" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "missing.safetensors"], "no such checkpoint file"),
        (["eval", "notes.txt"], "not a safetensors file"),
        (["eval", "{encoder}"], "is an encoder checkpoint; finetune it first"),
        (["eval", "{classifier}", "--attack", "deepfool"], "unknown attack 'deepfool'"),
        (["eval", "{classifier}", "--eps", "0"], "eps must be in (0, 1]"),
        (["eval", "{classifier}", "--eps", "2"], "eps must be in (0, 1]"),
        (["eval", "{classifier}", "--eps", "8/255,abc"], "not a number"),
        (["eval", "{classifier}", "--eps", ","], "bad value for --eps: give at least one eps"),
        (["eval", "{classifier}", "--dataset", "cifar100"], "has 100 classes"),
        (["attack", "{classifier}", "--attack", "pgd"], "unknown attack 'pgd'"),
        (["attack", "{encoder}"], "finetune it first"),
        (["attack", "{classifier}", "--eps", "-1/255"], "eps must be in (0, 1]"),
        (["finetune", "notes.txt"], "not a safetensors file"),
        (["finetune", "{encoder}", "--scheme", "xyz"], "scheme"),
        (["finetune", "{encoder}", "--dataset", "nope"], "unknown dataset"),
    ],
)
def test_bad_input_exits_2_with_one_line(run_cli, encoder, classifier, tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("these are not weights, just some notes\n" * 20)
    args = [a.format(encoder=encoder, classifier=classifier) for a in args]
    code, out, err = run_cli(*args)
    assert code == 2, err
    assert out == ""
    assert message in one_error_line(err)


def test_attack_saves_tensors_metadata_and_a_grid(run_cli, classifier, tmp_path):
    code, out, err = run_cli("attack", classifier, "--attack", "pgd3", "--n", "6", "--eps", "16/255",
                             "--out", tmp_path / "adv.safetensors", "--grid", tmp_path / "grids" / "adv.png")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "adv.safetensors")
    with safe_open(out.strip(), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["advcl_attack"])
    assert set(t) == {"clean", "adversarial", "labels", "clean_pred", "adv_pred"}
    assert t["clean"].shape == t["adversarial"].shape == (6, 3, 16, 16)
    assert (t["adversarial"] - t["clean"]).abs().max() <= 16 / 255 + 1e-6
    assert 0 <= t["adversarial"].min() and t["adversarial"].max() <= 1
    assert (meta["attack"], meta["n"], meta["dataset"]) == ("pgd3", 6, "digits")
    assert meta["sha256"] == sha256_file(classifier) and meta["eps"] == pytest.approx(16 / 255)
    assert (tmp_path / "grids" / "adv.png").read_bytes()[:4] == b"\x89PNG"  # its missing folder created


def test_malformed_header_and_model_description_exit_2(run_cli, classifier, tmp_path):
    data = classifier.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["advcl"])
    meta["model"]["num_classes"] = "ten"
    for name, change in [("no-offsets", lambda h: h[next(k for k in h if k != "__metadata__")].pop("data_offsets")),
                         ("list-meta", lambda h: h.update(__metadata__=["advcl"])),
                         ("bad-model", lambda h: h["__metadata__"].update(advcl=json.dumps(meta)))]:
        edited = json.loads(json.dumps(header))
        change(edited)
        raw = json.dumps(edited).encode()
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
        code, out, err = run_cli("eval", path)
        assert code == 2 and out == "", err
        assert ("bad header" if name != "bad-model" else "bad model field 'num_classes'") in one_error_line(err)


def test_attack_never_overwrites_the_model_and_existing_files_only_with_force(run_cli, classifier, tmp_path):
    before = classifier.read_bytes()
    for extra in ([], ["--force"]):
        code, out, err = run_cli("attack", classifier, "--n", "2", "--out", classifier, *extra)
        assert code == 2 and out == "" and "is the model being attacked" in one_error_line(err)
    code, _, err = run_cli("attack", classifier, "--n", "2", "--grid", classifier, "--out", tmp_path / "a.safetensors")
    assert code == 2 and "--grid" in one_error_line(err)
    assert classifier.read_bytes() == before

    old = tmp_path / "old.safetensors"
    old.write_bytes(b"precious results " * 20)
    code, out, err = run_cli("attack", classifier, "--n", "2", "--attack", "fgsm", "--out", old)
    assert code == 2 and out == "" and "already exists" in one_error_line(err) and "--force" in err
    assert old.read_bytes() == b"precious results " * 20
    mask = os.umask(0o022)  # the rule is "0666 less the umask": a known umask, whatever the machine's
    try:
        code, out, err = run_cli("attack", classifier, "--n", "2", "--attack", "fgsm", "--out", old, "--force")
    finally:
        os.umask(mask)
    assert code == 0 and out.strip() == str(old), err
    assert old.stat().st_mode & 0o777 == 0o644  # readable by others, not 0600

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, out, err = run_cli("attack", classifier, "--n", "2", "--attack", "fgsm", "--out", blocker / "adv.safetensors")
    assert code == 2 and out == "" and "not a writable folder" in one_error_line(err)
    assert "fgsm" not in err  # refused before the attack ran


def test_attack_counts_robust_images_as_eval_does(run_cli, classifier, monkeypatch, tmp_path):
    """An image is robust only if both its clean and adversarial predictions are right."""
    from advcl_cli.checkpoint import Checkpoint
    from advcl_cli.data.registry import load_dataset
    from test_eval import wrong_on_clean_images

    model = wrong_on_clean_images(load_dataset("digits", "test", limit=6, image_size=16).labels)
    monkeypatch.setattr(Checkpoint, "build", lambda self, device="cpu": model)
    code, out, err = run_cli("attack", classifier, "--attack", "pgd1", "--n", "6", "--out", tmp_path / "adv.safetensors", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["clean_acc"] == 0.0 and doc["adv_acc"] == 0.0  # every adversarial prediction is right


@pytest.mark.parametrize("verb", ["eval", "attack", "finetune"])
def test_help_has_a_worked_example(run_cli, verb):
    code, out, _ = run_cli(verb, "--help")
    assert code == 0
    assert "Example" in out and f"advcl {verb}" in out


def test_autoattack_versions_components_and_l2_from_the_cli(run_cli, trained_classifier, monkeypatch):
    """Every AutoAttack version and component through `advcl eval`, the settings the command built
    recorded (they are compared with the package's own versions in test_autoattack.py)."""
    from advcl_cli.attacks import autoattack as aa_module

    built, real = [], aa_module.build

    def spy(model, x, eps, **kw):
        adversary = real(model, x, eps, **kw)
        built.append({"name": kw["version"], "norm": adversary.norm, "eps": adversary.epsilon,
                      "runs": list(adversary.attacks_to_run), "eot": adversary.apgd.eot_iter,
                      "restarts": (adversary.apgd.n_restarts, adversary.fab.n_restarts),
                      "queries": adversary.square.n_queries, "fab_iters": adversary.fab.n_iter})
        # the CPU test's shortcuts, after recording: rand's 20 EOT iterations x 2 losses x 100 steps,
        # and FAB-T / Square (5000 queries) on images that survive L2 APGD, cost minutes here
        adversary.apgd.eot_iter = min(adversary.apgd.eot_iter, 2)
        adversary.fab.n_iter, adversary.square.n_queries = 5, 20
        return adversary

    monkeypatch.setattr(aa_module, "build", spy)
    names = ["autoattack-plus", "autoattack-rand", "apgd-ce", "apgd-t", "fab-t", "square"]
    code, out, err = run_cli("eval", trained_classifier, "-a", ",".join(names), "--eps", "64/255", "--limit", "3", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [r["attack"] for r in doc["robust"]] == names and doc["norm"] == "linf"
    assert all(r["robust_acc"] < doc["clean_acc"] for r in doc["robust"])
    by_name = {b["name"]: b for b in built}
    assert by_name["autoattack-plus"]["runs"] == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert by_name["autoattack-plus"]["restarts"] == (5, 5) and by_name["autoattack-rand"]["eot"] == 20
    assert by_name["autoattack-rand"]["runs"] == ["apgd-ce", "apgd-dlr"]
    for name in names[2:]:
        assert by_name[name]["runs"] == [name] and by_name[name]["restarts"] == (1, 1) and by_name[name]["eot"] == 1
    assert all(b["norm"] == "Linf" and b["eps"] == pytest.approx(64 / 255) and b["queries"] == 5000
               and b["fab_iters"] == 100 for b in built)
    assert "EOT 20" in doc["attacks"]["autoattack-rand"] and "pyautoattack" in doc["attacks"]["square"]

    built.clear()
    code, out, err = run_cli("eval", trained_classifier, "-a", "autoattack", "--norm", "l2", "--limit", "2", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["norm"] == "l2" and doc["eps"] == [0.5] and doc["robust"][0]["norm"] == "l2"  # L2's default budget
    (b,) = built
    assert (b["norm"], b["eps"], b["runs"]) == ("L2", 0.5, ["apgd-ce", "apgd-t", "fab-t", "square"])
    assert (b["queries"], b["fab_iters"], b["eot"], b["restarts"]) == (5000, 100, 1, (1, 1))
    assert "L2" in doc["attacks"]["autoattack"] and isinstance(doc["flags"], list)


def test_l2_sweep_with_its_plot_and_flags(run_cli, classifier, tmp_path):
    code, out, err = run_cli("eval", classifier, "--norm", "L2", "-a", "pgd3", "--eps", "0.25,0.5,1", "--limit", "8",
                             "--pgd-check", "2", "--json", "--plot", tmp_path / "curve.png")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["norm"] == "l2" and [r["eps_label"] for r in doc["robust"]] == ["0.25", "0.5", "1"]
    assert all(r["norm"] == "l2" for r in doc["robust"]) and "PGD (L2)" in doc["attacks"]["pgd3"]
    assert isinstance(doc["flags"], list) and [(r["eps"], r["n"]) for r in doc["pgd_check"]] == [(0.25, 2), (0.5, 2), (1, 2)]
    assert "PGD-100 x 5 restarts (l2) on 2 images" in err
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pretraining_refuses_l2_in_one_line(run_cli):
    code, out, err = run_cli("pretrain", "-d", "digits", "--arch", "resnet18-tiny", "--method", "acl", "--norm", "l2")
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert "--norm" in line and "acl" in line and "L-inf" in line


@pytest.mark.parametrize("scheme", ["alf", "aff"])
def test_finetuning_attacks_take_the_l2_norm(run_cli, encoder, monkeypatch, scheme):
    from advcl_cli.checkpoint import load_checkpoint
    from advcl_cli.engine import finetune as ft

    seen = []
    for name in ("pgd", "trades_adversary"):
        real = getattr(ft, name)

        def spy(*args, _real=real, **kw):
            x_adv = _real(*args, **kw)
            seen.append((kw.get("norm"), (x_adv - args[1]).flatten(1).norm(dim=1).max().item()))
            return x_adv

        monkeypatch.setattr(ft, name, spy)
    code, out, err = run_cli("finetune", encoder, "--scheme", scheme, "--norm", "l2", "--epochs", "1", "--limit", "32",
                             "--batch-size", "16", "--eval-limit", "4", "--image-size", "16", "--out", f"ft-{scheme}")
    assert code == 0, err
    assert seen and all(norm == "l2" and size <= 0.5 + 1e-5 for norm, size in seen)
    ckpt = load_checkpoint(out.strip())
    assert ckpt.meta.metrics["norm"] == "l2" and ckpt.meta.metrics["eps"] == 0.5
    assert ckpt.meta.config["attack_step_size"] == 0.125 and isinstance(ckpt.meta.metrics["flags"], list)


def test_attack_l2_stays_in_the_l2_ball_and_names_its_norm(run_cli, classifier, tmp_path):
    code, out, err = run_cli("attack", classifier, "--attack", "pgd3", "--norm", "l2", "--n", "4",
                             "--out", tmp_path / "adv.safetensors")
    assert code == 0, err
    with safe_open(out.strip(), "pt") as f:
        delta = f.get_tensor("adversarial") - f.get_tensor("clean")
        meta = json.loads(f.metadata()["advcl_attack"])
    assert (meta["norm"], meta["eps"]) == ("l2", 0.5) and "PGD (L2)" in meta["attack_settings"]
    assert delta.flatten(1).norm(dim=1).max() <= 0.5 + 1e-5 and delta.abs().max() > 8 / 255
