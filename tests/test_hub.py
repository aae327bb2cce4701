"""Pull and push through the real huggingface_hub client against a local Hub-compatible server."""

import hashlib
import os
import re
from pathlib import Path

import pytest
import torch

from advcl_cli.checkpoint import save_model, sha256_file
from advcl_cli.report import RecordingReporter
from advcl_cli.errors import CheckpointError, DownloadError, UsageError
from advcl_cli.models import create_model
from advcl_cli.zoo import load_manifest, load_model, pull, resolve
from advcl_cli.zoo.hub import fetch
from advcl_cli.zoo.publish import push
from hubserver import requests_seen
from hubtools import hub, make_classifier, nothing_sent, repo_name, token  # noqa: F401 (fixtures)

pytestmark = pytest.mark.hub


def published(tmp_path, hub, seed=0, entry="tiny-slf"):
    """Push a fresh classifier with --zoo-entry into a new manifest; return (file, manifest, result)."""
    url, _ = hub
    ckpt = make_classifier(tmp_path / f"clf{seed}.safetensors", seed=seed)
    manifest = tmp_path / "zoo.toml"
    result = push(ckpt, repo_name(), endpoint=url, manifest=manifest, zoo_entry=entry)
    return ckpt, manifest, result


def test_push_then_pull_by_name_at_pinned_revision(tmp_path, hub, token):
    url, _ = hub
    ckpt, manifest, result = published(tmp_path, hub)
    assert re.fullmatch(r"[0-9a-f]{40}", result.commit)
    entry = load_manifest(manifest).get("tiny-slf")
    assert (entry.repo, entry.revision, entry.sha256) == (result.repo, result.commit, sha256_file(ckpt))
    assert (entry.kind, entry.arch, entry.dataset, entry.scheme) == ("classifier", "resnet18-tiny", "digits", "slf")
    assert entry.metrics["sa"].value == 91.5 and entry.metrics["sa"].status == "measured"

    reporter = RecordingReporter()
    path = pull("tiny-slf", endpoint=url, manifest=manifest, reporter=reporter)
    assert path.read_bytes() == ckpt.read_bytes()
    assert Path(os.environ["HF_HOME"]) in path.parents  # the standard Hugging Face cache
    assert result.commit in str(path)
    assert any("sha256 verified" in e[1] for e in reporter.events if e[0] == "log")


def test_pin_holds_when_the_branch_moves(tmp_path, hub, token):
    url, _ = hub
    first, manifest, result = published(tmp_path, hub, seed=0)
    second = make_classifier(tmp_path / "second.safetensors", seed=1)
    push(second, result.repo, endpoint=url)  # main moves on; the manifest keeps the old pin
    assert pull("tiny-slf", endpoint=url, manifest=manifest).read_bytes() == first.read_bytes()
    latest = fetch(f"hf:{result.repo}", endpoint=url, reporter=(rec := RecordingReporter()))
    assert latest.path.read_bytes() == second.read_bytes()
    warning = [e[1] for e in rec.events if e[0] == "warn"][0]
    assert "no sha256 pinned" in warning and sha256_file(second) in warning


def test_tampered_cache_is_reported_not_deleted_and_force_download_repairs(tmp_path, hub, token):
    url, _ = hub
    ckpt, manifest, _ = published(tmp_path, hub)
    path = pull("tiny-slf", endpoint=url, manifest=manifest)
    blob = path.resolve()
    blob.write_bytes(blob.read_bytes()[:-8] + b"tampered")
    with pytest.raises(DownloadError) as e:
        pull("tiny-slf", endpoint=url, manifest=manifest)
    assert sha256_file(ckpt) in e.value.message and sha256_file(blob) in e.value.message
    assert "--force-download" in e.value.hint
    assert blob.exists()  # nothing the user did not ask for is removed
    repaired = pull("tiny-slf", endpoint=url, manifest=manifest, force_download=True)
    assert sha256_file(repaired) == sha256_file(ckpt)


def test_unknown_repo_revision_and_file(tmp_path, hub, token):
    url, _ = hub
    _, _, result = published(tmp_path, hub)
    with pytest.raises(UsageError, match="repository advcl-test/nothing-here not found"):
        pull("hf:advcl-test/nothing-here", endpoint=url)
    with pytest.raises(UsageError, match="revision " + "0" * 40 + " not found"):
        pull(f"hf:{result.repo}@{'0' * 40}", endpoint=url)
    with pytest.raises(UsageError, match="file nope.safetensors not found"):
        pull(f"hf:{result.repo}:nope.safetensors", endpoint=url)
    with pytest.raises(UsageError, match="bad Hub name"):
        pull("hf:no-slash", endpoint=url)


def test_unreachable_server_fails_with_a_clear_message(tmp_path):
    from hubserver import dead_endpoint

    with dead_endpoint() as url, pytest.raises(DownloadError) as e:
        pull("hf:advcl-test/any", endpoint=url)
    assert e.value.message == f"cannot reach {url}"
    assert "--endpoint" in e.value.hint and "HF_HUB_OFFLINE" in e.value.hint


def test_offline_uses_the_cache_or_says_it_is_missing(tmp_path, hub, token, monkeypatch):
    url, _ = hub
    ckpt, manifest, _ = published(tmp_path, hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="not in the local cache and HF_HUB_OFFLINE=1 is set"):
        pull("tiny-slf", endpoint=url, manifest=manifest)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    pull("tiny-slf", endpoint=url, manifest=manifest)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dead = "http://127.0.0.1:9"  # offline: the endpoint is never contacted
    assert pull("tiny-slf", endpoint=dead, manifest=manifest).read_bytes() == ckpt.read_bytes()


def test_pushing_a_corrupt_checkpoint_sends_nothing(tmp_path, hub, token):
    url, root = hub
    bad = tmp_path / "bad.safetensors"
    good = make_classifier(tmp_path / "good.safetensors")
    bad.write_bytes(good.read_bytes()[:-100])  # truncated
    repo = repo_name()
    with pytest.raises(CheckpointError, match="truncated"):
        push(bad, repo, endpoint=url)
    assert not (root / "mirrors" / "models" / repo).exists()


def test_pushed_model_card_parses_back_with_the_metrics_and_pins_the_files_commit(tmp_path, hub, token):
    from huggingface_hub import ModelCard, hf_hub_download

    url, root = hub
    ckpt, _, result = published(tmp_path, hub)
    assert result.card_commit not in (None, result.commit)  # the card is a second commit, on top of the files
    card_path = hf_hub_download(result.repo, "README.md", revision=result.card_commit, endpoint=url, cache_dir=tmp_path / "c")
    card = ModelCard.load(card_path)
    assert card.data.license == "mit" and card.data.library_name == "advcl"
    assert {"adversarial-robustness", "advcl"} <= set(card.data.tags)
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values == {"sa": 91.5, "pgd20": 42.25}
    assert sha256_file(ckpt) in card.text and "ab" * 32 in card.text  # lineage: file and parent digests
    assert "first 32 test images" in card.text and "advcl pull tiny-slf" in card.text
    pinned = f"hf:{result.repo}@{result.commit}"
    assert f"advcl pull {pinned}" in card.text and f'load_model("{pinned}")' in card.text
    assert pull(pinned, endpoint=url).read_bytes() == ckpt.read_bytes()  # the snippet pulls this very file
    config = hf_hub_download(result.repo, "config.json", revision=result.commit, endpoint=url, cache_dir=tmp_path / "c")
    assert '"kind": "classifier"' in Path(config).read_text()


def test_pull_asks_for_config_json_at_the_same_revision(tmp_path, hub, token):
    """The Hub counts a library's downloads by its config.json requests (as for timm)."""
    url, root = hub
    ckpt, manifest, result = published(tmp_path, hub)
    before = len(requests_seen(root))
    pulled = fetch("tiny-slf", endpoint=url, manifest=manifest)
    asked = [(m, p) for m, p, status in requests_seen(root)[before:] if status == 200]
    assert ("GET", f"/{result.repo}/resolve/{result.commit}/config.json") in asked
    assert pulled.config is not None and '"kind": "classifier"' in pulled.config.read_text()
    assert pulled.verified and pulled.commit == result.commit


def test_a_repo_without_config_json_pulls_quietly(tmp_path, hub, token):
    from huggingface_hub import HfApi

    url, _ = hub
    ckpt = make_classifier(tmp_path / "clf.safetensors")
    repo = repo_name()
    api = HfApi(endpoint=url)
    api.create_repo(repo)
    api.upload_file(path_or_fileobj=str(ckpt), path_in_repo="model.safetensors", repo_id=repo)  # not pushed by advcl
    rec = RecordingReporter()
    pulled = fetch(f"hf:{repo}", endpoint=url, reporter=rec)
    assert pulled.path.read_bytes() == ckpt.read_bytes() and pulled.config is None
    assert [e[1] for e in rec.events if e[0] == "warn" and "config.json" in e[1]] == []


def test_dry_run_uploads_nothing(tmp_path, hub, token):
    url, root = hub
    ckpt = make_classifier(tmp_path / "clf.safetensors")
    repo = repo_name()
    result = push(ckpt, repo, endpoint=url, dry_run=True, zoo_entry="x", manifest=tmp_path / "zoo.toml")
    assert result.commit is None and [f["path"] for f in result.files] == ["model.safetensors", "config.json", "README.md"]
    assert not (root / "mirrors" / "models" / repo).exists() and not (tmp_path / "zoo.toml").exists()


def test_push_without_a_token_is_refused_cleanly(tmp_path, hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    url, _ = hub
    ckpt = make_classifier(tmp_path / "clf.safetensors")
    with pytest.raises(DownloadError, match="HTTP 401") as e:
        push(ckpt, repo_name(), endpoint=url)
    assert "HF_TOKEN" in e.value.hint


def test_load_model_pulls_and_returns_an_eval_mode_classifier(tmp_path, hub, token, monkeypatch):
    url, _ = hub
    ckpt, manifest, _ = published(tmp_path, hub)
    monkeypatch.setenv("ADVCL_HF_ENDPOINT", url)
    monkeypatch.setenv("ADVCL_ZOO_MANIFEST", str(manifest))
    import advcl_cli

    model = advcl_cli.load_model("tiny-slf")
    assert isinstance(model, torch.nn.Module) and not model.training
    x = torch.rand(4, 3, 32, 32)
    reference = load_model(ckpt)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert model(x).shape == (4, 10)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_model("runs/missing.safetensors")


def test_the_library_never_reads_advcl_toml(tmp_path, hub, token, monkeypatch):
    url, _ = hub
    ckpt, manifest, _ = published(tmp_path, hub)
    monkeypatch.setenv("ADVCL_HF_ENDPOINT", url)
    monkeypatch.setenv("ADVCL_ZOO_MANIFEST", str(manifest))
    # a typo'd table, and a [hub] table the CLI would use: the library reads neither
    Path("advcl.toml").write_text('[pretrian]\nepochs = 3\n[hub]\nzoo_manifest = "missing.toml"\n')
    import advcl_cli

    model = advcl_cli.load_model("tiny-slf")
    with torch.no_grad():
        x = torch.rand(2, 3, 32, 32)
        assert torch.equal(model(x), load_model(ckpt)(x))
    assert pull("tiny-slf") == pull("tiny-slf", endpoint=url, manifest=manifest)


def test_hf_endpoint_and_hf_hub_cache_are_read_at_call_time(tmp_path, hub, token, monkeypatch):
    url, _ = hub
    ckpt, manifest, _ = published(tmp_path, hub)
    monkeypatch.setenv("HF_ENDPOINT", url)  # huggingface_hub's own variable, set after it was imported
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "shared-cache"))
    path = pull("tiny-slf", manifest=manifest)
    assert tmp_path / "shared-cache" in path.parents and path.read_bytes() == ckpt.read_bytes()
    monkeypatch.setenv("ADVCL_HF_ENDPOINT", "http://127.0.0.1:9")  # advcl's variable wins over HF_ENDPOINT
    with pytest.raises(DownloadError, match="cannot reach http://127.0.0.1:9"):
        pull("tiny-slf", manifest=manifest, force_download=True)


def test_zoo_entry_problems_are_found_before_the_commit(tmp_path, nothing_sent):
    ckpt = make_classifier(tmp_path / "clf.safetensors")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UsageError, match="not a writable folder"):
        push(ckpt, repo_name(), endpoint="http://127.0.0.1:9", manifest=blocker / "zoo.toml", zoo_entry="tiny")

    torch.manual_seed(0)
    odd = save_model(tmp_path / "odd.safetensors", create_model("resnet18-tiny", num_classes=10), kind="classifier",
                     method="advcl", dataset="digits", eps=2.0)  # an eps no manifest accepts
    with pytest.raises(UsageError, match="entry 'tiny', field 'eps'"):
        push(odd, repo_name(), endpoint="http://127.0.0.1:9", manifest=tmp_path / "zoo.toml", zoo_entry="tiny")
    assert not (tmp_path / "zoo.toml").exists()


def test_resolve_takes_a_file_or_a_name(tmp_path):
    ckpt = make_classifier(tmp_path / "clf.safetensors")
    assert resolve(str(ckpt)) == ckpt
    with pytest.raises(CheckpointError, match="is a folder"):
        resolve(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        resolve("runs/missing.safetensors")
    with pytest.raises(UsageError, match="unknown zoo model 'no-such-model'"):
        resolve("no-such-model")


@pytest.mark.parametrize("replaced", ["the checkpoint", "the bytes hashed"])
def test_push_pins_exactly_what_the_hub_holds(run_cli, tmp_path, hub, token, monkeypatch, replaced):
    """A checkpoint replaced while push runs (right after it was hashed) is still pushed and pinned
    as one snapshot; bytes that change after hashing all the same are caught by the Hub's LFS oid
    before any manifest entry pins them."""
    import shutil

    from advcl_cli import checkpoint

    url, _ = hub
    monkeypatch.setenv("ADVCL_HF_ENDPOINT", url)
    monkeypatch.setenv("ADVCL_ZOO_MANIFEST", str(tmp_path / "zoo.toml"))
    ckpt = make_classifier(tmp_path / "clf.safetensors", seed=0)
    original = ckpt.read_bytes()
    other = make_classifier(tmp_path / "other.safetensors", seed=1)
    real, calls = checkpoint.sha256_file, []

    def hash_then_replace(path):
        digest = real(path)
        if not calls:  # the first hash is the upload's
            calls.append(path)
            target = ckpt if replaced == "the checkpoint" else Path(path)
            shutil.copyfile(other, tmp_path / "next.safetensors")
            os.replace(tmp_path / "next.safetensors", target)  # as a training run replaces its checkpoint
        return digest

    monkeypatch.setattr(checkpoint, "sha256_file", hash_then_replace)
    code, out, err = run_cli("push", ckpt, "--repo", repo_name(), "--zoo-entry", "e")
    monkeypatch.setattr(checkpoint, "sha256_file", real)
    assert calls
    if replaced == "the checkpoint":
        assert code == 0, err
        assert load_manifest(tmp_path / "zoo.toml").get("e").sha256 == hashlib.sha256(original).hexdigest()
        code, out, err = run_cli("pull", "e")
        assert code == 0, err
        assert Path(out.strip()).read_bytes() == original
    else:
        assert code == 1 and out == ""
        assert re.search(r"^error: \S+@[0-9a-f]{12} holds model.safetensors with sha256 [0-9a-f]{12}\.\.\., not the "
                         r"[0-9a-f]{12}\.\.\. that was uploaded; no manifest entry or model card pins it$", err, re.M), err
        assert not (tmp_path / "zoo.toml").exists()
