"""Hostile files and names (issue 24), through the real CLI: each case exits 2 with one `error:`
line naming the file (or name) and the problem, no "internal error", no traceback, and leaves
nothing behind. ``refused`` and ``tree`` are test_bad_input's."""

import json
import os
import pickle
import signal
import struct
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from advcl_cli.checkpoint import META_KEY
from advcl_cli.data.registry import load_dataset
from advcl_cli.models import create_model
from advcl_cli.pseudolabels import META_KEY as LABELS_KEY
from fakedata import write_imagefolder
from test_bad_input import ADVCL, labels_file, make_classifier, refused, tree
from test_cli_zoo import cli_subprocess
from test_import import KS, SETS, original_layout, randomise, save_original

DEEP = "[" * 200_000 + "]" * 200_000  # JSON nested 200,000 deep
NO_HUB = ["--endpoint", "http://127.0.0.1:1"]  # a name checked before the Hub is asked fails nothing here


@pytest.fixture
def classifier(tmp_path):
    return make_classifier(tmp_path / "clf.safetensors")


def rewritten(src, dst, *, tensors=None, model=None):
    """A copy of checkpoint ``src`` at ``dst`` with some tensors replaced, or its model description."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    if model is not None:
        doc = json.loads(meta[META_KEY])
        doc["model"].update(model)
        meta = {META_KEY: json.dumps(doc)}
    save_file({**load_file(src), **(tensors or {})}, str(dst), metadata=meta)
    return dst


@contextmanager
def hang_guard(seconds: int = 300):
    """A test that would hang (reading a FIFO) fails after minutes instead."""
    def stop(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- 5: documents nested too deeply for Python's parsers -------------------------------------


def test_a_safetensors_header_nested_200000_deep(run_cli, tmp_path):
    header = ('{"a":' + DEEP + "}").encode()
    (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    refused(run_cli("eval", "deep.safetensors"), 2, "deep.safetensors is not a safetensors file", "nested too deeply")
    assert tree(tmp_path) == {"deep.safetensors"}


def test_advcl_metadata_nested_200000_deep(run_cli, tmp_path):
    save_file({"w": torch.zeros(64)}, str(tmp_path / "deep.safetensors"), metadata={META_KEY: DEEP})
    refused(run_cli("eval", "deep.safetensors"), 2, "deep.safetensors: the advcl metadata is not valid JSON",
            "nested too deeply")
    assert tree(tmp_path) == {"deep.safetensors"}


def test_a_labels_file_whose_metadata_is_nested_200000_deep(run_cli, tmp_path):
    labels_file(tmp_path / "labels.safetensors", {2: [0, 1] * 32}, meta=DEEP)
    refused(run_cli("pretrain", *ADVCL, "--pseudo-labels", "labels.safetensors"), 2,
            "labels.safetensors: the 'advcl_pseudo_labels' metadata is not a JSON object", "nested too deeply")
    assert tree(tmp_path) == {"labels.safetensors"}


@pytest.mark.parametrize("how", ["advcl.toml", "--config", "--manifest"])
def test_a_toml_file_nested_5000_deep(run_cli, tmp_path, classifier, how):
    (tmp_path / "deep.toml").write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    if how == "advcl.toml":
        (tmp_path / "deep.toml").rename(tmp_path / "advcl.toml")
        refused(run_cli("eval", classifier), 2, "config file advcl.toml is not valid TOML: nested too deeply")
    elif how == "--config":
        refused(run_cli("eval", classifier, "--config", "deep.toml"), 2, "config file deep.toml is not valid TOML: nested too deeply")
    else:
        refused(run_cli("pull", "x", "--manifest", "deep.toml", *NO_HUB), 2, "manifest deep.toml is not valid TOML: nested too deeply")
    assert tree(tmp_path) == {"clf.safetensors", how if how == "advcl.toml" else "deep.toml"}


# --- 6: model descriptions and weights that are no model ---------------------------------------


@pytest.mark.parametrize("sets", [[""], ["a.b"], ["training"], ["pgd", "pgd"]], ids=["empty", "dot", "attribute", "twice"])
def test_bn_set_names_a_network_cannot_have(run_cli, tmp_path, classifier, sets):
    rewritten(classifier, tmp_path / "bad.safetensors", model={"bn_sets": sets})
    refused(run_cli("eval", "bad.safetensors"), 2, "bad.safetensors: bad model field 'bn_sets'")
    assert tree(tmp_path) == {"clf.safetensors", "bad.safetensors"}


WEIGHT = "backbone.layers.1.0.conv2.weight"


@pytest.mark.parametrize("dtype, name", [(torch.int8, "I8"), (torch.bool, "BOOL"), (torch.float8_e4m3fn, "F8_E4M3"),
                                         (torch.complex64, "C64")])
def test_weights_that_are_not_floats_are_refused(run_cli, tmp_path, classifier, dtype, name):
    weight = load_file(classifier)[WEIGHT]
    rewritten(classifier, tmp_path / "bad.safetensors", tensors={WEIGHT: weight.to(dtype)})
    _, err = refused(run_cli("eval", "bad.safetensors"), 2, "bad.safetensors does not match architecture",
                     f"wrong type: {WEIGHT} {name}")
    assert "F16, BF16, F32 or F64" in err and tree(tmp_path) == {"clf.safetensors", "bad.safetensors"}


def test_a_bn_step_counter_stored_as_a_float_is_refused(run_cli, tmp_path, classifier):
    key = "backbone.bn1.sets.pgd.num_batches_tracked"
    rewritten(classifier, tmp_path / "bad.safetensors", tensors={key: torch.zeros(())})
    refused(run_cli("eval", "bad.safetensors"), 2, f"wrong type: {key} F32")


def test_import_refuses_authors_weights_stored_as_int8(run_cli, tmp_path):
    state = original_layout(randomise(create_model("resnet18-tiny", bn_sets=SETS, proj_dim=128, pseudo_ks=KS)))
    state["module.conv1.weight"] = state["module.conv1.weight"].to(torch.int8)
    save_original(tmp_path / "epoch_400.ckpt", state)
    refused(run_cli("import", "epoch_400.ckpt"), 2, "epoch_400.ckpt does not map", "wrong type: conv1.weight int8")
    assert tree(tmp_path) == {"epoch_400.ckpt"}


# --- 7: a cluster count far beyond the labels ------------------------------------------------


@pytest.mark.parametrize("k", [10**12, 10**20])
def test_a_labels_file_whose_k_exceeds_its_labels_is_refused_before_any_work(run_cli, tmp_path, monkeypatch, k):
    labels_file(tmp_path / "labels.safetensors", {k: [0, 1] * 32})
    monkeypatch.setenv("ADVCL_DOWNLOAD", "0")  # loading cifar10 would fail: it is not there
    _, err = refused(run_cli("pretrain", *ADVCL, "-d", "cifar10", "--data-dir", "nodata", "--pseudo-labels", "labels.safetensors"),
                     2, f"labels.safetensors: 'k{k}' has {k} clusters for 64 images")
    assert "training:" not in err and tree(tmp_path) == {"labels.safetensors"}


def test_a_labels_file_whose_k_has_thousands_of_digits(run_cli, tmp_path):
    name = "k" + "1" * 5000  # more digits than Python turns into an int
    save_file({name: torch.zeros(64, dtype=torch.int64)}, str(tmp_path / "labels.safetensors"),
              metadata={LABELS_KEY: json.dumps({"dataset": "digits", "split": "train", "n": 64})})
    refused(run_cli("pretrain", *ADVCL, "--pseudo-labels", "labels.safetensors"), 2, "is not a k<K> vector of integer labels")
    assert tree(tmp_path) == {"labels.safetensors"}


@pytest.mark.parametrize("field, value", [("num_classes", 10**20), ("pseudo_ks", [2, 10**20]), ("proj_dim", 2**31)])
def test_a_model_size_beyond_what_torch_takes(run_cli, tmp_path, classifier, field, value):
    rewritten(classifier, tmp_path / "bad.safetensors", model={field: value})
    refused(run_cli("eval", "bad.safetensors"), 2, f"bad.safetensors: bad model field '{field}'", "below 2^31")
    assert tree(tmp_path) == {"clf.safetensors", "bad.safetensors"}


# --- 8: image folders ---------------------------------------------------------------------------


def png_of_size(width: int, height: int) -> bytes:
    """A PNG header claiming width x height pixels (PIL checks the size when it opens one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_decompression_bomb_in_an_image_folder(run_cli, tmp_path, classifier):
    root = write_imagefolder(tmp_path / "imgs", classes=("cat", "dog"), n_train=6, n_test=4, size=16)
    bomb = next((root / "test" / "dog").glob("*.png"))
    bomb.write_bytes(png_of_size(20000, 20000))
    before = tree(tmp_path)
    refused(run_cli("eval", classifier, "-d", f"imagefolder:{root}", "--device", "cpu"), 2,
            f"cannot read image {bomb}", "decompression bomb")
    assert tree(tmp_path) == before


def test_a_fifo_named_png_in_an_image_folder_is_named_not_read(run_cli, tmp_path, classifier):
    root = write_imagefolder(tmp_path / "imgs", classes=("cat", "dog"), n_train=6, n_test=4, size=16)
    os.mkfifo(root / "test" / "cat" / "fifo.png")
    before = tree(tmp_path)
    with hang_guard():
        refused(run_cli("eval", classifier, "-d", f"imagefolder:{root}", "--device", "cpu"), 2,
                f"{root / 'test' / 'cat' / 'fifo.png'} is not a regular file")
    assert tree(tmp_path) == before


TEN = tuple(f"c{i}" for i in range(10))  # the classifier's classes


def test_a_symlink_loop_in_an_image_folder_counts_each_image_once(run_cli, tmp_path, classifier):
    root = write_imagefolder(tmp_path / "imgs", classes=TEN, n_train=10, n_test=10, size=16)
    plain = load_dataset(f"imagefolder:{root}", "test", image_size=16)
    (root / "test" / "c0" / "loop").symlink_to(root / "test" / "c0")  # c0/loop/loop/... is c0 again
    (root / "test" / "c1" / "c0").symlink_to(root / "test" / "c0")  # a folder read already: not again
    looped = load_dataset(f"imagefolder:{root}", "test", image_size=16)
    assert looped.labels.tolist() == plain.labels.tolist() and torch.equal(looped.images, plain.images)
    code, out, err = run_cli("eval", classifier, "-d", f"imagefolder:{root}", "--device", "cpu", "--json", "-a", "fgsm")
    assert code == 0 and json.loads(out)["n"] == len(plain.labels) == 10, err


# --- 9: zoo names ---------------------------------------------------------------------------------

ENTRY = """[evil]
repo = "{repo}"
revision = "0123456789abcdef0123456789abcdef01234567"
sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
filename = "{filename}"
kind = "classifier"
arch = "resnet18"
method = "advcl"
dataset = "cifar10"
scheme = "slf"
"""


@pytest.mark.parametrize("repo, filename, phrase", [
    ("lab/m", "../../outside.safetensors", "field 'filename': '../../outside.safetensors': a file in the repository"),
    ("lab/m", "/etc/passwd", "field 'filename': '/etc/passwd': a file in the repository"),
    ("lab/..", "model.safetensors", "field 'repo': 'lab/..': Repo id must use alphanumeric chars"),
    ("lab/a..b", "model.safetensors", "field 'repo': 'lab/a..b': Cannot have -- or .. in repo_id"),
])
def test_a_manifest_entry_with_a_name_outside_its_repository(run_cli, tmp_path, repo, filename, phrase):
    (tmp_path / "zoo.toml").write_text(ENTRY.format(repo=repo, filename=filename))
    for args in (["pull", "evil", "--manifest", "zoo.toml", *NO_HUB], ["zoo", "info", "evil", "--manifest", "zoo.toml"]):
        refused(run_cli(*args), 2, "manifest zoo.toml: entry 'evil'", phrase)
    assert tree(tmp_path) == {"zoo.toml"}  # no hf_home: nothing was downloaded


@pytest.mark.parametrize("name, phrase", [
    ("hf:lab/..", "Repo id must use alphanumeric chars"),
    ("hf:../m", "not a repository id ORG/NAME"),
    ("hf:lab/m:../x.safetensors", "a file in the repository is a relative path"),
    ("hf:lab/m@main:/etc/passwd", "a file in the repository is a relative path"),
])
def test_pull_of_an_hf_name_outside_a_repository(run_cli, tmp_path, name, phrase):
    refused(run_cli("pull", name, *NO_HUB), 2, f"bad Hub name '{name}'", phrase)
    assert tree(tmp_path) == set()


def test_push_dry_run_to_a_repo_the_hub_cannot_have(run_cli, tmp_path, classifier):
    refused(run_cli("push", classifier, "--repo", "lab/..", "--dry-run", *NO_HUB), 2, "bad repository name 'lab/..'")
    assert tree(tmp_path) == {"clf.safetensors"}


# --- 10: paths that are not files, and names that are not printable ----------------------------


def test_a_model_path_that_is_a_fifo_a_device_or_a_link_loop_says_what_it_is(run_cli, tmp_path):
    os.mkfifo(tmp_path / "fifo.safetensors")
    os.symlink("loop-b", tmp_path / "loop-a")
    os.symlink("loop-a", tmp_path / "loop-b")
    with hang_guard():
        refused(run_cli("eval", "fifo.safetensors"), 2, "fifo.safetensors is a named pipe (FIFO), not a checkpoint file")
        refused(run_cli("eval", "/dev/zero"), 2, "/dev/zero is a character device, not a checkpoint file")
        for name in ("loop-a", "./loop-a"):  # a bare name too: a path that exists is never a zoo name
            refused(run_cli("eval", name), 2, f"{name.removeprefix('./')} is a loop of symbolic links, not a checkpoint file")
        refused(run_cli("eval", "m.safetensors", "--config", "loop-a"), 2, "loop-a is a loop of symbolic links, not a config file")
    assert tree(tmp_path) == {"fifo.safetensors", "loop-a", "loop-b"}


def test_a_config_from_a_pipe_is_read(run_cli, tmp_path, classifier):
    read, write = os.pipe()
    os.write(write, b"bogus_setting = 1\n")
    os.close(write)
    try:  # read: its unknown key is named
        refused(run_cli("eval", classifier, "--config", f"/dev/fd/{read}"), 2, f"unknown key 'bogus_setting' in the top level of /dev/fd/{read}")
    finally:
        os.close(read)
    done = cli_subprocess("eval", classifier, env_extra={"ADVCL_CONFIG": "/dev/stdin"}, stdin="bogus_setting = 2\n")
    assert done.returncode == 2 and "unknown key 'bogus_setting' in the top level of /dev/stdin" in done.stderr, done.stderr
    assert tree(tmp_path) == {"clf.safetensors"}


def test_a_path_with_a_newline_or_a_terminal_code_is_printed_escaped(run_cli, tmp_path):
    _, err = refused(run_cli("eval", "a\nb\x1b[2J.safetensors"), 2, "no such checkpoint file: a\\nb\\x1b[2J.safetensors")
    assert "\x1b" not in err and tree(tmp_path) == set()


# --- 11: pickles -----------------------------------------------------------------------------------


class Shell:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_import_of_a_zip_pickle_naming_a_blocked_global_names_it(run_cli, tmp_path):
    torch.save({"model": {"conv1.weight": torch.zeros(1)}, "x": Shell()}, tmp_path / "x.ckpt")
    _, err = refused(run_cli("import", "x.ckpt"), 2, "x.ckpt holds objects other than tensors (posix.system)")
    assert "pwned" not in err and tree(tmp_path) == {"x.ckpt"}


def test_import_shows_no_warning_of_torch(tmp_path):
    with open(tmp_path / "p4.ckpt", "wb") as f:  # protocol 4: torch warns about it, with a line of its source
        pickle.dump({"conv1.weight": np.zeros((2, 3), dtype=np.float32)}, f, protocol=4)
    done = cli_subprocess("import", "p4.ckpt", env_extra={})  # a process of its own: pytest captures warnings
    refused((done.returncode, done.stdout, done.stderr), 2, "p4.ckpt")
    assert "Warning" not in done.stderr and tree(tmp_path) == {"p4.ckpt"}


def test_authors_labels_pickled_with_protocol_2_import(run_cli, tmp_path):
    labels = np.array([0, 1, 1, 0] * 16, dtype=np.int64)
    with open(tmp_path / "labels.pkl", "wb") as f:  # protocol 2 writes the array's bytes through _codecs.encode
        pickle.dump({"pseudo_train_2": labels}, f, protocol=2)
    code, out, err = run_cli("pseudo-labels", "import", "labels.pkl", "--out", "l.safetensors")
    assert code == 0, err
    assert load_file(out.strip())["k2"].tolist() == labels.tolist()


class OtherCodec:
    def __reduce__(self):
        import _codecs
        return _codecs.encode, ("x", "rot13")


def test_authors_labels_pickle_with_another_codec_is_refused(run_cli, tmp_path):
    with open(tmp_path / "labels.pkl", "wb") as f:
        pickle.dump({"pseudo_train_2": OtherCodec()}, f, protocol=2)
    refused(run_cli("pseudo-labels", "import", "labels.pkl", "--out", "l.safetensors"), 2,
            "labels.pkl is not a readable pickle", "only latin1 is allowed")
    assert tree(tmp_path) == {"labels.pkl"}


# --- 12: push: metadata keys are made public too ------------------------------------------------


def test_push_makes_metadata_keys_public(run_cli, tmp_path):
    path = make_classifier(tmp_path / "clf.safetensors", config={os.path.expanduser("~/keyname"): 1, "plain": 2})
    code, out, err = run_cli("push", path, "--repo", "lab/m", "--dry-run", "--json", *NO_HUB)
    assert code == 0, err
    assert json.loads(out)["public_fields"] == ["config.keyname"]
    assert os.path.expanduser("~") not in out and tree(tmp_path) == {"clf.safetensors"}
