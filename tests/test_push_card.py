"""The model card: an edited card is kept, its metadata is what the Hub accepts, branches and pull requests."""

import pytest

from advcl_cli.checkpoint import save_model, sha256_file
from advcl_cli.report import RecordingReporter
from advcl_cli.errors import UsageError
from advcl_cli.models import create_model
from advcl_cli.zoo.card import written_by_advcl
from advcl_cli.zoo.hub import fetch
from advcl_cli.zoo.hubspec import check_license, validate_card_data
from advcl_cli.zoo.publish import push
from hubtools import TOKEN, commits, git, hub, make_classifier, nothing_sent, repo_name, token  # noqa: F401 (fixtures)

pytestmark = pytest.mark.hub

EDITED = "---\nlicense: apache-2.0\nlibrary_name: advcl\n---\n\n# Our robust model\n\nWritten by hand on the Hub.\n"


def readme(root, repo, rev="main") -> str:
    return git(root, repo, "cat-file", "blob", f"{rev}:README.md")


def card_data(result):
    from huggingface_hub import ModelCard

    return ModelCard(result.card).data.to_dict()


def test_a_card_edited_on_the_hub_is_kept_unless_overwrite_card(tmp_path, hub, token):
    from huggingface_hub import HfApi

    url, root = hub
    first, second = (make_classifier(tmp_path / f"c{i}.safetensors", seed=i) for i in (0, 1))
    repo = push(first, repo_name(), endpoint=url).repo
    HfApi(endpoint=url, token=TOKEN).upload_file(path_or_fileobj=EDITED.encode(), path_in_repo="README.md", repo_id=repo)

    rec = RecordingReporter()
    kept = push(second, repo, endpoint=url, reporter=rec)
    assert kept.card_action == "kept" and kept.card_commit is None and readme(root, repo) == EDITED
    assert git(root, repo, "rev-parse", "main").strip() == kept.commit  # the new weights landed, the card did not move
    assert any("--overwrite-card" in e[1] for e in rec.events if e[0] == "log")

    replaced = push(second, repo, endpoint=url, overwrite_card=True)
    text = readme(root, repo)
    assert replaced.card_action == "write" and written_by_advcl(text) and sha256_file(second) in text
    assert f"hf:{repo}@{replaced.commit}" in text


def test_a_card_advcl_wrote_follows_the_new_weights(tmp_path, hub, token):
    url, root = hub
    first, second = (make_classifier(tmp_path / f"c{i}.safetensors", seed=i) for i in (0, 1))
    one = push(first, repo_name(), endpoint=url)
    assert written_by_advcl(readme(root, one.repo)) and sha256_file(first) in readme(root, one.repo)
    two = push(second, one.repo, endpoint=url)
    text = readme(root, one.repo)
    assert two.card_action == "write" and sha256_file(second) in text and sha256_file(first) not in text
    assert f"hf:{one.repo}@{two.commit}" in text and f"@{one.commit}" not in text
    again = push(second, one.repo, endpoint=url)  # nothing changed: no new commit at all
    assert again.commit == two.commit and again.card_action == "unchanged" and commits(root, one.repo)[0] == two.card_commit


def test_a_licence_the_hub_would_refuse_is_refused_before_anything_is_sent(tmp_path, run_cli, nothing_sent):
    ckpt = make_classifier(tmp_path / "clf.safetensors")
    code, out, err = run_cli("push", ckpt, "--repo", "advcl-test/x", "--license", "not a licence!", "--endpoint", "http://127.0.0.1:9")
    assert code == 2 and out == "" and "field 'license': 'not a licence!' is not a licence id the Hub accepts" in err
    assert "repositories-licenses" in err and "Traceback" not in err
    code, _, err = run_cli("push", ckpt, "--repo", "advcl-test/x", "--license", "apache2.0", "--dry-run")
    assert code == 2 and "did you mean apache-2.0" in err
    code, _, err = run_cli("push", ckpt, "--repo", "advcl-test/x", "--license", "other", "--dry-run")
    assert code == 2 and "edit the card on the Hub" in err
    code, _, _ = run_cli("push", ckpt, "--repo", "advcl-test/x", "--license", "CC-BY-4.0", "--dry-run")
    assert code == 0
    assert check_license("CC-BY-4.0") == "cc-by-4.0" and check_license("llama3.1") == "llama3.1"


def test_card_datasets_are_the_hubs_ids(tmp_path):
    cifar = push(make_classifier(tmp_path / "c10.safetensors", dataset="cifar10"), "advcl-test/c10", dry_run=True)
    data = card_data(cifar)
    assert data["datasets"] == ["uoft-cs/cifar10"] and "cifar10" in data["tags"]
    results = data["model-index"][0]["results"]
    assert {r["dataset"]["type"] for r in results} == {"uoft-cs/cifar10"} and {r["dataset"]["name"] for r in results} == {"CIFAR-10"}
    digits = card_data(push(make_classifier(tmp_path / "d.safetensors", dataset="digits"), "advcl-test/d", dry_run=True))
    assert "datasets" not in digits  # no Hub copy of scikit-learn's digits: no link to a wrong dataset
    assert {r["dataset"]["type"] for r in digits["model-index"][0]["results"]} == {"digits"}


@pytest.mark.parametrize("field, value, message", [
    ("license", "MIT License", "is not a licence id"),
    ("datasets", ["cifar10"], "'cifar10' is not one of the Hub dataset ids"),
    ("base_model", "resnet18", "is not a Hub model id"),
    ("base_model", "advcl-test/self", "the repository being pushed to"),
    ("base_model_relation", "derived", "needs a base_model and one of"),
    ("pipeline_tag", "text-generation", "is not one of"),
    ("tags", ["adversarial robustness"], "is not a tag"),
])
def test_card_metadata_fields_are_checked(field, value, message):
    good = {"license": "mit", "library_name": "advcl", "tags": ["advcl"], "pipeline_tag": "image-classification",
            "base_model": "advcl-test/encoder", "base_model_relation": "finetune"}
    validate_card_data(good, "advcl-test/self")
    with pytest.raises(UsageError, match=f"field '{field}(\\[0\\])?': .*{message}"):
        validate_card_data({**good, field: value}, "advcl-test/self")


def test_model_index_entries_are_checked(tmp_path):
    data = card_data(push(make_classifier(tmp_path / "c.safetensors", dataset="cifar10"), "advcl-test/c", dry_run=True))
    validate_card_data(data, "advcl-test/c")
    result = data["model-index"][0]["results"][0]
    for broken, message in (
        ({**result, "metrics": [{**result["metrics"][0], "value": 915}]}, r"metrics\[0\].value': 915 is not an accuracy"),
        ({**result, "task": {"type": "translation"}}, r"task.type': 'translation' is not one of"),
        ({**result, "dataset": {**result["dataset"], "type": "someone/cifar10"}}, "not a Hub dataset id advcl knows"),
        ({**result, "metrics": []}, "at least one metric"),
    ):
        index = [{**data["model-index"][0], "results": [broken]}]
        with pytest.raises(UsageError, match=message):
            validate_card_data({**data, "model-index": index}, "advcl-test/c")


def test_base_model_names_the_parent_when_it_came_from_the_hub(tmp_path, hub, token):
    url, _ = hub
    torch_seed_encoder = save_model(tmp_path / "enc.safetensors", create_model("resnet18-tiny"), kind="encoder", method="advcl",
                                    dataset="digits", eps=8 / 255)
    enc = push(torch_seed_encoder, repo_name(), endpoint=url)
    pulled = fetch(f"hf:{enc.repo}@{enc.commit}", endpoint=url)  # now in the cache, blob named by its sha256
    child = make_classifier(tmp_path / "child.safetensors", parent=pulled.sha256)
    data = card_data(push(child, "advcl-test/child", dry_run=True))
    assert data["base_model"] == enc.repo and data["base_model_relation"] == "finetune"
    assert f"finetuned from [{enc.repo}]" in push(child, "advcl-test/child", dry_run=True).card
    stranger = make_classifier(tmp_path / "stranger.safetensors", parent="cd" * 32)
    assert "base_model" not in card_data(push(stranger, "advcl-test/child", dry_run=True))


def test_revision_pushes_to_a_branch_and_create_pr_opens_a_pull_request(tmp_path, hub, token):
    url, root = hub
    first, second, third = (make_classifier(tmp_path / f"c{i}.safetensors", seed=i) for i in range(3))
    repo = push(first, repo_name(), endpoint=url).repo
    main_before = commits(root, repo)

    dev = push(second, repo, endpoint=url, revision="dev")
    assert commits(root, repo) == main_before  # main did not move
    assert commits(root, repo, "dev")[:2] == [dev.card_commit, dev.commit] and f"hf:{repo}@{dev.commit}" in readme(root, repo, "dev")
    assert fetch(f"hf:{repo}@dev", endpoint=url).path.read_bytes() == second.read_bytes()

    pr = push(third, repo, endpoint=url, create_pr=True)
    assert pr.pr_url == f"{url}/{repo}/discussions/1" and commits(root, repo) == main_before
    assert commits(root, repo, "refs/pr/1")[:2] == [pr.card_commit, pr.commit]
    assert fetch(f"hf:{repo}@{pr.commit}", endpoint=url).path.read_bytes() == third.read_bytes()
    with pytest.raises(UsageError, match="branch nope does not exist"):
        push(third, repo, endpoint=url, revision="nope", create_pr=True)
    with pytest.raises(UsageError, match="bad --revision"):
        push(third, repo, endpoint=url, revision="a" * 40)
