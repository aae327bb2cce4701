"""An interrupted run, resumed, ends with the same weights as an uninterrupted one (CPU)."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from advcl_cli.settings.layering import resolve
from advcl_cli.checkpoint import load_state
from advcl_cli.engine.pretrain import pretrain
from advcl_cli.report import RecordingReporter
from advcl_cli.settings import PretrainSettings
from waiting import HANG_S, wait_for

ARGS = dict(dataset="digits", arch="resnet18-tiny", limit=64, batch_size=32, epochs=3, pgd_steps=1, save_every=1, device="cpu")


def cli_args(out):
    flags = []
    for key, value in ARGS.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return [sys.executable, "-m", "advcl_cli", "pretrain", *flags, "--out", str(out)]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    e.pop("ADVCL_DEBUG", None)
    return e


def start_and_interrupt(out, sig):
    """Start a run, wait until the state of epoch 1 is on disk, then send ``sig``."""
    proc = subprocess.Popen(cli_args(out), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for((out / "state.safetensors").exists, "the state of epoch 1 was saved", proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=HANG_S)
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    result = pretrain(resolve(PretrainSettings, dict(**ARGS, out=out)))
    return load_file(result.path)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_and_resumed_run_matches_the_uninterrupted_one(tmp_path, uninterrupted, sig):
    out = tmp_path / "run"
    code, stdout, stderr = start_and_interrupt(out, sig)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:  # handled: a clean exit 130 with the command that resumes it, no traceback
        assert code == 130 and "error: interrupted" in stderr and "Traceback" not in stderr
        assert f"hint: continue it from its last saved epoch: advcl pretrain --out {out} --resume" in stderr
    assert stdout == ""
    state = load_state(out / "state.safetensors")
    assert 1 <= state["epoch"] < 3 and not state["finished"]

    if sig == signal.SIGKILL:  # resume through the CLI, as a user would
        resumed = subprocess.run(cli_args(out) + ["--resume"], env=env(), capture_output=True, text=True, timeout=HANG_S)
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming after epoch {state['epoch']}" in resumed.stderr
        path = resumed.stdout.strip()
    else:  # in-process (one interpreter start less; the CLI path is covered above)
        rep = RecordingReporter()
        path = str(pretrain(resolve(PretrainSettings, dict(**ARGS, out=out)), rep, resume=True).path)
        assert any(e[0] == "log" and f"resuming after epoch {state['epoch']}" in e[1] for e in rep.events)
    assert path.endswith("encoder.safetensors")
    weights = load_file(path if os.path.isabs(path) else tmp_path / path)
    assert weights.keys() == uninterrupted.keys()
    for key in weights:
        assert torch.equal(weights[key], uninterrupted[key]), key
    epochs = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(epochs) == 3
