"""Two CPU processes (gloo, through torchrun) behave as one process with the global batch."""

import os
import signal
import time
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

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
