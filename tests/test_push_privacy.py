"""Nothing private leaves the machine, and a repository's visibility is what the user meant."""

import json

import pytest
import torch

from advcl_cli.checkpoint import load_checkpoint, read_metadata, sha256_file
from advcl_cli.report import RecordingReporter
from advcl_cli.errors import UsageError
from advcl_cli.zoo import private as private_mod
from advcl_cli.zoo.hub import fetch
from advcl_cli.zoo.private import Identity
from advcl_cli.zoo.publish import push
from hubtools import PRIVATE_ORG, TOKEN, commits, git, hub, make_classifier, nothing_sent, repo_name, token  # noqa: F401

pytestmark = pytest.mark.hub

ALICE = Identity(home="/home/alice", user="alice", hosts=("gpu-node-07", "gpu-node-07.cluster.example.org"))


@pytest.fixture
def alice(monkeypatch):
    """Push as user alice on host gpu-node-07 (whatever this machine is called)."""
    monkeypatch.setattr(private_mod, "identity", lambda: ALICE)
    return ALICE


def uploaded(root, repo, commit) -> dict[str, bytes]:
    """Every file of ``repo`` at ``commit`` as the server stores it, LFS objects included."""
    from hubserver import LFS_POINTER_RE, lfs_object_path

    out = {}
    for path in git(root, repo, "ls-tree", "-r", "--name-only", commit).split():
        data = git(root, repo, "cat-file", "blob", f"{commit}:{path}")
        pointer = LFS_POINTER_RE.match(data)
        out[path] = lfs_object_path(root / "mirrors" / "models" / repo, pointer.group(1)).read_bytes() if pointer else data.encode()
    return out


def test_config_card_and_weights_on_the_hub_name_no_local_path_user_or_host(tmp_path, hub, token, alice):
    url, root = hub
    run = tmp_path / "runs" / "slf"
    config = {
        "scheme": "slf",
        "data_dir": str(tmp_path / "data"),  # absolute paths, as a real run records them
        "out": str(run),
        "pseudo_labels": "~/labels/c10.safetensors",
        "encoder": "/home/alice/runs/advcl/encoder.safetensors",
        "note": "trained by alice@gpu-node-07",
        "host": "gpu-node-07.cluster.example.org",
        "relative": "runs/advcl",  # relative names stay
        "epochs": 25,
        "/home/alice/runs/keyname": 3,  # keys are cleaned as values are
        "alice@gpu-node-07": 4,  # a key that stays private goes, with its value
    }
    ckpt = make_classifier(tmp_path / "clf.safetensors", dataset=f"imagefolder:{tmp_path}/pets", config=config)
    local_before = ckpt.read_bytes()
    rec = RecordingReporter()
    result = push(ckpt, repo_name(), endpoint=url, reporter=rec)

    files = {**uploaded(root, result.repo, result.commit), **uploaded(root, result.repo, result.card_commit)}
    assert set(files) == {".gitattributes", "model.safetensors", "config.json", "README.md"}
    for name, data in files.items():
        if name == "model.safetensors":  # its JSON header holds the metadata; the weights are random bytes
            data = data[8 : 8 + int.from_bytes(data[:8], "little")]
        for secret in (str(tmp_path), "/home/alice", "alice", "gpu-node-07", "/tmp/", "~/"):
            assert secret.encode() not in data, f"{secret} in the uploaded {name}"
    public = json.loads(files["config.json"])
    assert public["config"] == {
        "scheme": "slf", "data_dir": "data", "out": "slf", "pseudo_labels": "c10.safetensors", "encoder": "encoder.safetensors",
        "note": None, "host": None, "relative": "runs/advcl", "epochs": 25, "keyname": 3,
    }
    assert public["dataset"] == "imagefolder:pets" and "`imagefolder:pets`" in files["README.md"].decode()

    # the local file is untouched; the upload is a copy whose metadata differs and whose weights do not
    assert ckpt.read_bytes() == local_before and read_metadata(ckpt).config["out"] == str(run)
    assert result.sha256 != sha256_file(ckpt) and set(result.public_fields) >= {"config.data_dir", "config.note", "dataset"}
    assert any("is unchanged" in e[1] for e in rec.events if e[0] == "log")
    pulled = fetch(f"hf:{result.repo}@{result.commit}", endpoint=url)
    theirs, ours = load_checkpoint(pulled.path).tensors, load_checkpoint(ckpt).tensors
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert pulled.sha256 == result.sha256 and f"`{result.sha256}`" in files["README.md"].decode()


def test_a_recipe_line_naming_a_local_path_is_refused_before_anything_is_sent(tmp_path, alice, nothing_sent):
    ckpt = make_classifier(tmp_path / "clf.safetensors")
    for line, what in (("advcl finetune /home/alice/enc.safetensors --scheme slf", "home folder"),
                       ("advcl finetune /scratch/enc.safetensors", "absolute path /scratch/enc.safetensors"),
                       ("advcl pretrain --data-dir=/data/c10", "absolute path /data/c10"),
                       ("ssh gpu-node-07 advcl eval $clf", "host name gpu-node-07")):
        with pytest.raises(UsageError, match=f"recipe line 2 names the {what}") as e:
            push(ckpt, repo_name(), endpoint="http://127.0.0.1:9", recipe=["enc=$(advcl pull advcl-r18-cifar10)", line])
        assert "relative" in e.value.hint
    assert push(ckpt, repo_name(), dry_run=True, recipe=["advcl finetune runs/enc.safetensors --eps 8/255"]).dry_run


def visibility(url, repo):
    from huggingface_hub import HfApi

    return HfApi(endpoint=url, token=TOKEN).model_info(repo, revision="main").private


def test_without_a_flag_a_new_repo_gets_the_accounts_default_visibility(tmp_path, hub, token):
    url, _ = hub
    ckpt = make_classifier(tmp_path / "clf.safetensors")
    in_private_org = push(ckpt, repo_name(PRIVATE_ORG), endpoint=url)  # an organisation whose default is private
    in_public_org = push(ckpt, repo_name(), endpoint=url)
    assert visibility(url, in_private_org.repo) is True and in_private_org.private is True
    assert visibility(url, in_public_org.repo) is False and in_public_org.private is False
    assert visibility(url, push(ckpt, repo_name(PRIVATE_ORG), endpoint=url, private=False).repo) is False  # --public
    assert visibility(url, push(ckpt, repo_name(), endpoint=url, private=True).repo) is True  # --private


def test_private_on_an_existing_public_repo_is_refused_unless_make_private(tmp_path, hub, token, monkeypatch):
    url, root = hub
    first = make_classifier(tmp_path / "a.safetensors", seed=0)
    second = make_classifier(tmp_path / "b.safetensors", seed=1)
    repo = push(first, repo_name(), endpoint=url).repo
    history = commits(root, repo)
    with pytest.raises(UsageError, match="exists and is public; --private does not change") as e:
        push(second, repo, endpoint=url, private=True)
    assert "--make-private" in e.value.hint and e.value.exit_code == 2
    assert commits(root, repo) == history and visibility(url, repo) is False  # nothing was uploaded

    switched = push(second, repo, endpoint=url, make_private=True)
    assert visibility(url, repo) is True and switched.private is True and commits(root, repo)[1] == switched.commit
    monkeypatch.delenv("HF_TOKEN")  # private now: an anonymous pull is refused
    with pytest.raises(UsageError, match=f"repository {repo} not found"):
        fetch(f"hf:{repo}@{switched.commit}", endpoint=url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(UsageError, match="exists and is private; --public does not change"):
        push(first, repo, endpoint=url, private=False)


def test_push_cli_flags_for_visibility(run_cli, hub, token, monkeypatch, tmp_path):
    url, _ = hub
    monkeypatch.setenv("ADVCL_HF_ENDPOINT", url)
    ckpt = make_classifier(tmp_path / "clf.safetensors")
    code, out, _ = run_cli("push", ckpt, "--repo", (repo := repo_name()), "--json")
    assert code == 0 and json.loads(out)["private"] is False
    code, out, err = run_cli("push", ckpt, "--repo", repo, "--private")
    assert code == 2 and out == "" and "--make-private" in err and "Traceback" not in err
    code, out, _ = run_cli("push", ckpt, "--repo", repo, "--make-private", "--json")
    assert code == 0 and json.loads(out)["private"] is True
    code, _, err = run_cli("push", ckpt, "--repo", repo, "--make-private", "--public")
    assert code == 2 and "contradict" in err
