"""`advcl pull`, `advcl push`, `advcl zoo` from the command line, against a local Hub-compatible server."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from advcl_cli.checkpoint import save_model, sha256_file
from advcl_cli.models import create_model
from advcl_cli.zoo.manifest import SHIPPED, tomllib
from hubserver import dead_endpoint, running_server
from waiting import HANG_S

pytestmark = pytest.mark.hub

TOKEN = "hf_advcl_cli_test_token_not_a_secret"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("hub")) as url:
        yield url


@pytest.fixture
def env(monkeypatch, hub):
    """Token, endpoint and a team manifest for the CLI, as a user would set them."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("ADVCL_HF_ENDPOINT", hub)
    monkeypatch.setenv("ADVCL_ZOO_MANIFEST", str(Path("zoo.toml").resolve()))
    return hub


def classifier(path, seed=0):
    torch.manual_seed(seed)
    model = create_model("resnet18-tiny", num_classes=10)
    return save_model(path, model, kind="classifier", method="advcl", dataset="digits", eps=8 / 255, config={"scheme": "slf"}, metrics={"clean_acc": 0.88, "pgd20_acc": 0.305, "n_eval": 32})


def pushed(run_cli, name="tiny-slf"):
    ckpt = classifier(Path("clf.safetensors"))
    repo = f"advcl-cli/m-{uuid.uuid4().hex[:8]}"
    code, out, err = run_cli("push", ckpt, "--repo", repo, "--zoo-entry", name)
    assert code == 0, err
    return ckpt, repo, out.strip()


def cli_subprocess(*args, env_extra, stdin=None):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "advcl_cli", *map(str, args)], env=env, input=stdin, capture_output=True, text=True, timeout=HANG_S)


def test_help_of_each_command_has_an_example(run_cli):
    for cmd in (["pull"], ["push"], ["zoo", "list"], ["zoo", "info"]):
        code, out, _ = run_cli(*cmd, "--help")
        assert code == 0 and "Example" in out and f"advcl {' '.join(cmd)} " in out
    _, out, _ = run_cli("push", "--help")
    for flag in ("--private", "--public", "--make-private", "--revision", "--create-pr", "--overwrite-card", "--license"):
        assert flag in out
    _, out, _ = run_cli("pull", "--help")
    assert "--json" in out


def test_zoo_list_shows_the_paper_models(run_cli):
    code, out, _ = run_cli("zoo", "list")
    assert code == 0
    for name in ("advcl-r18-cifar10", "advcl-r18-cifar10-slf", "advcl-r18-cifar100-aff", "simclr-r18-cifar10"):
        assert name in out
    code, out, _ = run_cli("zoo", "list", "--json")
    doc = {e["name"]: e for e in json.loads(out)}
    assert len(doc) == 8 and not any(e["published"] for e in doc.values())
    shipped = tomllib.loads(SHIPPED.read_text())["advcl-r18-cifar10-slf"]["metrics"]["pgd20"]  # the file itself, not advcl's reader
    assert shipped["source"] == "advcl-paper"  # an id of the published numbers (benchmark/reported.toml)
    # the file holds the paper's percent; JSON carries fractions, as eval, finetune and benchmark do
    assert shipped["value"] == 50.45
    assert doc["advcl-r18-cifar10-slf"]["metrics"]["pgd20"] == {"value": 0.5045, "status": "reported", "source": shipped["source"], "command": None}


def test_zoo_list_warns_of_an_unknown_advcl_variable(run_cli, monkeypatch):
    monkeypatch.setenv("ADVCL_ZOO_MANIFST", "team.toml")
    code, out, err = run_cli("zoo", "list")
    assert code == 0 and "warning: environment variable ADVCL_ZOO_MANIFST is not an advcl setting" in err


def test_zoo_info_shows_provenance_and_recipe(run_cli):
    code, out, _ = run_cli("zoo", "info", "advcl-r18-cifar10-slf")
    assert code == 0
    assert "82.36" in out and "reported" in out and "robustssl (https://robustssl.github.io)" in out
    assert "https://arxiv.org/abs/2111.01124" in out
    assert "advcl finetune $enc --scheme slf" in out and "not published" in out
    code, out, _ = run_cli("zoo", "info", "advcl-r18-cifar10-slf", "--json")
    assert json.loads(out)["sources"]["advcl-paper"]["title"].startswith("Fan et al., When Does Contrastive")
    code, out, _ = run_cli("zoo", "info", "simclr-r18-cifar10", "--json")
    doc = json.loads(out)
    assert "ImageNet" in doc["notes"] and doc["cache"]["cached"] is False


def test_pull_of_an_unpublished_entry_prints_its_recipe(run_cli):
    code, out, err = run_cli("pull", "advcl-r18-cifar10-aff")
    assert code == 2 and out == ""
    assert "not published yet" in err and "advcl finetune $enc --scheme aff" in err and "Traceback" not in err


def test_pull_of_an_unknown_name_suggests_close_ones(run_cli):
    code, _, err = run_cli("pull", "advcl-r18-cifar10-sl")
    assert code == 2 and "unknown zoo model" in err and "advcl-r18-cifar10-slf" in err


def test_a_manifest_with_a_bad_field_names_entry_and_field(run_cli, monkeypatch):
    Path("bad.toml").write_text(
        '[mine]\nrepo = "lab/m"\nrevision = "main"\nsha256 = "' + "0" * 64 + '"\n'
        'kind = "classifier"\narch = "resnet18"\nmethod = "advcl"\ndataset = "cifar10"\neps = "8/255"\n'
    )
    code, _, err = run_cli("zoo", "list", "--manifest", "bad.toml")
    assert code == 2 and "entry 'mine', field 'revision'" in err and "40-hex" in err and "Traceback" not in err
    monkeypatch.setenv("ADVCL_ZOO_MANIFEST", "bad.toml")
    code, _, err = run_cli("pull", "mine")
    assert code == 2 and "entry 'mine', field 'revision'" in err


def test_a_manifest_that_is_not_utf8_exits_2(run_cli):
    Path("latin1.toml").write_bytes(b"# caf\xe9\n")
    code, out, err = run_cli("zoo", "list", "--manifest", "latin1.toml")
    assert code == 2 and out == "" and "not UTF-8" in err and "internal error" not in err


def test_push_prints_the_commit_and_never_the_token(run_cli, env):
    ckpt, repo, commit = pushed(run_cli)
    assert len(commit) == 40
    code, out, err = run_cli("push", ckpt, "--repo", repo, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["repo"] == repo and doc["sha256"] == sha256_file(ckpt)
    assert doc["commit"] == commit and doc["card"] == "write"  # same weights: no new files commit; the card lost its zoo name
    assert TOKEN not in out + err
    recipe = "advcl finetune enc.safetensors --scheme slf --dataset digits"
    code, out, err = run_cli("push", ckpt, "--repo", repo, "--dry-run", "--recipe", recipe)
    assert code == 0 and "model.safetensors" in out and "config.json" in out and "README.md" in out
    assert "model-index" in err and recipe in err and TOKEN not in out + err


def test_pushing_a_corrupt_checkpoint_is_a_usage_error(run_cli, env):
    Path("bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(200))
    code, out, err = run_cli("push", "bad.safetensors", "--repo", "advcl-cli/never")
    assert code == 2 and out == "" and "not a safetensors file" in err and "Traceback" not in err


def test_pull_by_name_and_zoo_info_of_a_cached_entry(run_cli, env):
    ckpt, repo, commit = pushed(run_cli)
    code, out, err = run_cli("pull", "tiny-slf")
    pulled = out.strip()
    assert code == 0 and Path(pulled).read_bytes() == ckpt.read_bytes() and "sha256 verified" in err
    code, out, _ = run_cli("zoo", "info", "tiny-slf", "--json")
    doc = json.loads(out)
    assert doc["repo"] == repo and doc["revision"] == commit and doc["cache"] == {"cached": True, "path": pulled, "sha256_ok": True}
    assert doc["metrics"]["sa"]["status"] == "measured" and doc["metrics"]["sa"]["value"] == 0.88  # the checkpoint's clean_acc, in its unit


def test_pull_json_describes_the_file(run_cli, env):
    ckpt, repo, commit = pushed(run_cli)
    code, out, err = run_cli("pull", "tiny-slf", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert Path(doc["path"]).read_bytes() == ckpt.read_bytes() and doc["sha256"] == sha256_file(ckpt)
    assert (doc["repo"], doc["revision"], doc["commit"], doc["filename"]) == (repo, commit, commit, "model.safetensors")
    assert doc["verified"] is True and json.loads(Path(doc["config"]).read_text())["kind"] == "classifier"
    code, out, err = run_cli("pull", f"hf:{repo}", "--json")  # main, no pinned sha256: computed, not verified
    doc = json.loads(out)
    assert code == 0 and doc["verified"] is False and doc["revision"] == "main" and doc["sha256"] == sha256_file(ckpt)
    assert doc["commit"] != commit and len(doc["commit"]) == 40  # main is now the card commit, on top of the files


def test_tampered_cache_exits_1_with_both_digests(run_cli, env):
    ckpt, _, _ = pushed(run_cli)
    code, out, _ = run_cli("pull", "tiny-slf")
    blob = Path(out.strip()).resolve()
    blob.write_bytes(b"x" * 300 + blob.read_bytes()[300:])
    code, out, err = run_cli("pull", "tiny-slf")
    assert code == 1 and out == "" and sha256_file(ckpt) in err and sha256_file(blob) in err
    assert "--force-download" in err and blob.exists()
    code, out, _ = run_cli("zoo", "info", "tiny-slf", "--json")
    assert json.loads(out)["cache"]["sha256_ok"] is False
    code, out, _ = run_cli("pull", "tiny-slf", "--force-download")
    assert code == 0 and sha256_file(out.strip()) == sha256_file(ckpt)


def test_unreachable_server_exits_1(run_cli):
    with dead_endpoint() as url:
        code, out, err = run_cli("pull", "hf:advcl-cli/anything", "--endpoint", url)
    assert code == 1 and out == "" and f"cannot reach {url}" in err and "Traceback" not in err


def test_unknown_repo_and_revision_exit_2(run_cli, env):
    _, repo, _ = pushed(run_cli)
    code, _, err = run_cli("pull", "hf:advcl-cli/does-not-exist")
    assert code == 2 and "repository advcl-cli/does-not-exist not found" in err
    code, _, err = run_cli("pull", f"hf:{repo}@{'f' * 40}")
    assert code == 2 and f"revision {'f' * 40} not found" in err


def test_hf_hub_offline_set_before_start_with_and_without_cache(run_cli, env, tmp_path):
    """HF_HUB_OFFLINE is read by huggingface_hub at import: check a fresh process."""
    _, repo, _ = pushed(run_cli)
    offline = {"HF_HUB_OFFLINE": "1"}
    res = cli_subprocess("pull", "tiny-slf", env_extra=offline)
    assert res.returncode == 1 and "not in the local cache and HF_HUB_OFFLINE=1 is set" in res.stderr
    assert "Traceback" not in res.stderr
    code, out, _ = run_cli("pull", "tiny-slf")
    res = cli_subprocess("pull", "tiny-slf", env_extra={**offline, "ADVCL_HF_ENDPOINT": "http://127.0.0.1:9"})
    assert res.returncode == 0 and res.stdout.strip() == out.strip()


def test_round_trip_push_pull_eval_gives_the_original_accuracies(run_cli, env):
    """Done-when: push with --zoo-entry, pull by name at the pin, `pull | eval` = eval of the original."""
    ckpt, repo, commit = pushed(run_cli)
    code, out, err = run_cli("pull", "tiny-slf")
    assert code == 0 and commit in out, err
    args = ("--attack", "pgd20", "--limit", "32", "--json")
    code, out, err = run_cli("eval", *args, stdin=out)  # advcl pull tiny-slf | advcl eval ...
    assert code == 0, err
    piped = json.loads(out)
    code, out, err = run_cli("eval", ckpt, *args)
    assert code == 0, err
    original = json.loads(out)
    code, out, err = run_cli("eval", "tiny-slf", *args)  # a zoo name as MODEL pulls too
    assert code == 0 and "sha256 verified" in err, err
    by_name = json.loads(out)

    def accuracies(doc):
        return doc["n"], doc["clean_acc"], [(r["attack"], r["eps"], r["robust_acc"]) for r in doc["robust"]]

    assert piped["sha256"] == original["sha256"] == by_name["sha256"] == sha256_file(ckpt)
    assert accuracies(piped) == accuracies(original) == accuracies(by_name)
    assert original["n"] == 32 and original["robust"][0]["attack"] == "pgd20"
