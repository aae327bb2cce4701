import atexit
import io
import os
import shutil
import sys
import tempfile

import pytest
import torch

from waiting import HANG_S

# Two cores and several test processes: keep each test single-threaded and deterministic.
torch.set_num_threads(1)
# Nothing outside the checkout: datasets (and anything written there) go to a folder of this
# session, whatever ADVCL_DATA_DIR the machine sets (subprocesses inherit it).
os.environ["ADVCL_DATA_DIR"] = tempfile.mkdtemp(prefix="advcl-test-data-")
atexit.register(shutil.rmtree, os.environ["ADVCL_DATA_DIR"], True)
# The help cache (advcl_cli/cli/helpcache.py) of this session, not the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="advcl-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No user config, no HF token or cache from the machine leaks into a test."""
    for key in list(os.environ):
        if key.startswith("ADVCL_") and key != "ADVCL_DATA_DIR":
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # The test Hub speaks plain Git LFS, no xet (tests/hubserver.py). huggingface_hub reads the
    # variable at import: set it for subprocesses and, once imported, in its constants.
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    # The test Hub answers within huggingface_hub's 10 s HTTP timeouts on an idle machine, not on a
    # saturated one: the timeouts become hang guards (tests/waiting.py), read at each call.
    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        monkeypatch.setenv(name, str(HANG_S))
    if "huggingface_hub.constants" in sys.modules:
        constants = sys.modules["huggingface_hub.constants"]
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", HANG_S)
        monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", HANG_S)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run ``advcl ARGS`` in-process: returns (exit code, stdout, stderr)."""
    from advcl_cli.cli.app import main

    def run(*args, stdin: str | None = None):
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
