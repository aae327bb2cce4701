"""Fixtures and helpers shared by the tests that talk to the local Hub (tests/hubserver.py)."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from advcl_cli.checkpoint import save_model
from advcl_cli.models import create_model
from hubserver import running_server
from waiting import HANG_S

TOKEN = "hf_advcl_test_token_not_a_secret"
PRIVATE_ORG = "advcl-private"  # the test server creates this organisation's repos private by default
# `hf` (huggingface_hub >= 0.34) or `huggingface-cli` (older), from whichever huggingface_hub is imported
HF_CLI = (
    "import sys\n"
    "try:\n    from huggingface_hub.cli.hf import main\n"
    "except ImportError:\n    from huggingface_hub.commands.huggingface_cli import main\n"
    "sys.argv[0] = 'hf'\nsys.exit(main())\n"
)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(url, root) of a test Hub for the module."""
    root = tmp_path_factory.mktemp("hub")
    with running_server(root, private_orgs=(PRIVATE_ORG,)) as url:
        yield url, root


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)


@pytest.fixture
def nothing_sent(monkeypatch):
    """Fail the test if push talks to the Hub."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("push contacted the Hub")

    for method in ("create_repo", "create_commit", "model_info", "repo_info"):
        monkeypatch.setattr(huggingface_hub.HfApi, method, refuse)


def make_classifier(path, seed=0, metrics=None, *, arch="resnet18-tiny", dataset="digits", config=None, parent="ab" * 32):
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=10)
    return save_model(
        path, model, kind="classifier", method="advcl", dataset=dataset, eps=8 / 255,
        config=config if config is not None else {"scheme": "slf", "epochs": 2},
        metrics=metrics or {"clean_acc": 0.915, "pgd20_acc": 0.4225, "n_eval": 32, "eps": 8 / 255, "selection": "last epoch"},
        parent=parent,
    )


def repo_name(org="advcl-test"):
    return f"{org}/m-{uuid.uuid4().hex[:8]}"


def hf_cli(*args, endpoint: str, home: Path, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    """Run huggingface_hub's own command line, a second client with its own cache."""
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-c", HF_CLI, *map(str, args)], env=env, capture_output=True, text=True, timeout=HANG_S)


def git(root: Path, repo: str, *args: str) -> str:
    """git in the server's copy of ``repo``."""
    folder = Path(root) / "mirrors" / "models" / repo
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout


def commits(root: Path, repo: str, ref: str = "main") -> list[str]:
    """The commits of ``ref`` in the server's copy of ``repo``, newest first."""
    return git(root, repo, "rev-list", ref).split()
