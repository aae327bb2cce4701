"""The path every real safetensors push takes: Git LFS upload, a pointer in git, sha256 etags on download."""

import pytest

from advcl_cli.checkpoint import sha256_file
from advcl_cli.zoo.hub import fetch
from advcl_cli.zoo.publish import push
from hubserver import LFS_POINTER_RE, lfs_object_path, requests_seen
from hubtools import git, hf_cli, hub, make_classifier, repo_name, token  # noqa: F401 (fixtures)

pytestmark = pytest.mark.hub


def test_a_45mb_resnet18_goes_through_lfs_and_comes_back_byte_identical(tmp_path, hub, token):
    url, root = hub
    ckpt = make_classifier(tmp_path / "r18.safetensors", arch="resnet18", dataset="cifar10")
    digest = sha256_file(ckpt)
    assert ckpt.stat().st_size > 40e6  # the real thing, well over the Hub's 10 MB LFS threshold
    repo = repo_name()
    before = len(requests_seen(root))
    result = push(ckpt, repo, endpoint=url, manifest=tmp_path / "zoo.toml", zoo_entry="r18")

    sent = [(m, p) for m, p, status in requests_seen(root)[before:] if status == 200]
    assert ("POST", f"/{repo}.git/info/lfs/objects/batch") in sent
    assert ("PUT", f"/_lfs/{repo}/{digest}") in sent and ("POST", f"/_lfs/{repo}/{digest}/verify") in sent
    pointer = LFS_POINTER_RE.match(git(root, repo, "cat-file", "blob", f"{result.commit}:model.safetensors"))
    assert pointer is not None and pointer.groups() == (digest, str(ckpt.stat().st_size))  # git holds a pointer
    assert sha256_file(lfs_object_path(root / "mirrors" / "models" / repo, digest)) == digest
    config = git(root, repo, "cat-file", "blob", f"{result.commit}:config.json")
    assert LFS_POINTER_RE.match(config) is None and '"arch": "resnet18"' in config  # small files stay regular

    pulled = fetch("r18", endpoint=url, manifest=tmp_path / "zoo.toml")  # advcl: pinned revision, sha256 checked
    assert pulled.verified and pulled.path.read_bytes() == ckpt.read_bytes()
    assert pulled.path.resolve().name == digest  # the cache names the blob by the sha256 etag, as for the Hub

    cache = tmp_path / "hf-cli"
    other = hf_cli("download", repo, "model.safetensors", "--revision", result.commit, "--cache-dir", cache,
                   endpoint=url, home=tmp_path / "hf-cli-home")
    assert other.returncode == 0, other.stderr
    path = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / result.commit / "model.safetensors"
    assert str(path) in other.stdout  # where huggingface_hub's own CLI says it put the file
    assert path.read_bytes() == ckpt.read_bytes() and path.resolve().name == digest
