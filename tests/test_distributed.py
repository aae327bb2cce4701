"""Two CPU processes (gloo, through torchrun) behave as one process with the global batch."""

import json
import os
import signal
import time
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advcl_cli.models import create_model

WORKER = str(Path(__file__).with_name("dist_worker.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env1() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1"}


def torchrun(n: int, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env1())


def compare(one: dict, two: dict, atol=1e-5):
    assert set(one) == set(two)
    for k in one:
        torch.testing.assert_close(two[k].float(), one[k].float(), atol=atol, rtol=1e-4, msg=k)


def test_global_batch_primitives_match_one_process(tmp_path):
    single = subprocess.run([sys.executable, WORKER, "primitives", str(tmp_path / "one.st")],
                            capture_output=True, text=True, timeout=120, env=env1())
    assert single.returncode == 0, single.stderr
    dist = torchrun(2, WORKER, "primitives", str(tmp_path / "two.st"))
    assert dist.returncode == 0, dist.stderr[-3000:]
    one, two = load_file(tmp_path / "one.st"), load_file(tmp_path / "two.st")
    compare(one, two)
    # the BN running statistics were updated from the global batch, not one rank's half
    bn = "backbone.bn1.sets.pgd.running_var"
    assert not torch.allclose(one[bn], torch.ones_like(one[bn]))


def test_a_killed_rank_ends_the_job_with_an_error(tmp_path):
    out = tmp_path / "pid"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        WORKER, "collectives", str(out),
    ]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env1())
    try:
        deadline = time.time() + 60
        while not Path(f"{out}.1").exists() or not Path(f"{out}.1").read_text():
            assert job.poll() is None and time.time() < deadline, "the job did not start"
            time.sleep(0.2)
        os.kill(int(Path(f"{out}.1").read_text()), signal.SIGKILL)
        code = job.wait(timeout=90)  # ends instead of hanging in the next collective
    finally:
        if job.poll() is None:
            job.kill()
    assert code != 0
    assert "SIGKILL" in job.stderr.read() or code < 0


def run_pretrain(tmp_path, name, procs, pgd_steps):
    args = [
        "pretrain", "--dataset", "digits", "--limit", "32", "--arch", "resnet18-tiny", "--epochs", "1",
        "--batch-size", "32", "--pgd-steps", str(pgd_steps), "--lr", "0.1", "--device", "cpu",
        "--pseudo-labels", str(tmp_path / "labels.safetensors"), "--out", str(tmp_path / name),
    ]
    env = {**env1(), "ADVCL_MIN_LR_RATIO": "1"}  # a constant rate: the one step moves the weights
    if procs == 1:
        cmd = [sys.executable, "-m", "advcl_cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "advcl_cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / name / "metrics.jsonl").read_text())
    return done.stdout, metrics, load_file(tmp_path / name / "encoder.safetensors")


def test_pretrain_step_on_two_processes_matches_one(tmp_path):
    """One AdvCL step (views, attack starts, SupCon over the global batch, global BN,
    pseudo-label CE, SGD) through the real CLI: 2 gloo processes x 16 images == 1 x 32."""
    from advcl_cli.pseudolabels import save_labels

    g = torch.Generator().manual_seed(0)
    save_labels(tmp_path / "labels.safetensors", {k: torch.randint(0, k, (32,), generator=g) for k in (2, 10)},
                dataset="digits", split="train", encoder="test")
    _, m1, w1 = run_pretrain(tmp_path, "one", 1, pgd_steps=0)
    out2, m2, w2 = run_pretrain(tmp_path, "two", 2, pgd_steps=0)
    assert out2.strip().splitlines() == [str(tmp_path / "two" / "encoder.safetensors")]  # rank 0 alone prints
    for key in ("loss", "contrast", "pseudo_ce"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5), key
    # The weights after the step agree to a small fraction of the step itself. Not to 1e-6:
    # fp32 sums in another order flip a few ReLU gates whose input is ~0, and the gradient of
    # a small network at batch 32 is sensitive to that (one process with nn.BatchNorm2d versus
    # GlobalBatchNorm's formula differs as much). A missing gradient sync, all-gather or global
    # BN moves the weights by a large part of the step instead.
    torch.manual_seed(0)
    w0 = create_model("resnet18-tiny", bn_sets=("normal", "pgd", "pgd_ce"), proj_dim=128, pseudo_ks=(2, 10)).state_dict()
    trained = [k for k in w1 if k.endswith("weight") and "conv" in k]
    step = torch.cat([(w1[k] - w0[k]).flatten() for k in trained]).norm()
    gap = torch.cat([(w2[k] - w1[k]).flatten() for k in trained]).norm()
    assert step > 1e-2 and gap / step < 1e-2, (float(gap), float(step))
    # With PGD steps the sign of near-zero input gradients can flip under a different float
    # summation order, so the attacked step agrees closely rather than bit for bit.
    _, a1, _ = run_pretrain(tmp_path, "one-pgd", 1, pgd_steps=2)
    _, a2, _ = run_pretrain(tmp_path, "two-pgd", 2, pgd_steps=2)
    for key in ("loss", "contrast", "pseudo_ce"):
        assert a2[key] == pytest.approx(a1[key], rel=1e-2), key


def test_aff_on_two_processes_trains_batch_norm(tmp_path):
    """AFF trains the whole network under torchrun, the BN parameters included (the BN modules
    are swapped for global-batch ones before the optimizer is built)."""
    from advcl_cli.checkpoint import save_model

    torch.manual_seed(0)
    enc = create_model("resnet18-tiny", bn_sets=("normal", "pgd", "pgd_ce"), proj_dim=128)
    save_model(tmp_path / "enc.safetensors", enc, kind="encoder", method="advcl", dataset="digits", eps=8 / 255)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "advcl_cli", "finetune", str(tmp_path / "enc.safetensors"),
           "--scheme", "aff", "--epochs", "1", "--limit", "32", "--batch-size", "16", "--attack-steps", "1",
           "--eval-limit", "8", "--device", "cpu", "--out", str(tmp_path / "aff")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env1())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines() == [str(tmp_path / "aff" / "classifier.safetensors")]
    clf = load_file(tmp_path / "aff" / "classifier.safetensors")
    before = enc.state_dict()
    for name in ("bn1", "layers.0.0.bn1", "layers.3.1.bn2"):
        for p in ("weight", "bias"):
            key = f"backbone.{name}.sets.pgd.{p}"
            assert not torch.equal(clf[key], before[key]), key
