"""Runs that live on a cluster: stopped between two steps (SIGTERM, SIGUSR1, Slurm's requeue,
--save-every-minutes), resumed with --resume auto, they end bit-identical to an uninterrupted run.

The stops come from the test hook ADVCL_FAULT_AT_STEP (engine/stop.py), never from timing: the
runs have 3 steps per epoch and stop after step 5, the second step of epoch 2.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advcl_cli.checkpoint import load_state
from advcl_cli.settings.layering import resolve
from advcl_cli.engine import stop
from advcl_cli.engine.pretrain import pretrain
from advcl_cli.engine.run import RunDir
from advcl_cli.settings import PretrainSettings
from waiting import HANG_S

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dataset="digits", arch="resnet18-tiny", limit=48, batch_size=16, epochs=2, device="cpu")
STOP_AT = 5  # epoch 2, step 2 of 3
METHODS = ("advcl", "acl", "dynacl")


def flags(method: str = "advcl") -> list[str]:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    return [*args, f"--method={method}", "--pgd-steps=1"]


def settings(method: str, out, **kw):
    return resolve(PretrainSettings, dict(TINY, method=method, pgd_steps=1, out=str(out), **kw))


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, reference: Path) -> None:
    """The same encoder and resume state tensors (weights, optimizer, the method's own, such as
    DynACL's momentum encoder), bit for bit, and the same logged losses."""
    for name in ("encoder.safetensors", "state.safetensors"):
        got, want = load_file(run / name), load_file(reference / name)
        assert got.keys() == want.keys(), name
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)
    assert losses(run) == losses(reference)
    assert load_state(run / "state.safetensors")["finished"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of each method (one process, in this one)."""
    root = tmp_path_factory.mktemp("reference")
    return {m: pretrain(settings(m, root / m)).run_dir for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_a_run_stopped_mid_epoch_resumes_bit_identical(method, reference, tmp_path, monkeypatch):
    """SIGUSR1 outside Slurm: the mid-epoch state is saved and the run stops as Ctrl-C would
    (exit 130 on the command line); --resume auto takes the next step."""
    monkeypatch.setenv(stop.FAULT_ENV, f"{STOP_AT}:USR1")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(KeyboardInterrupt):
        pretrain(settings(method, tmp_path / "run"))
    state = load_state(tmp_path / "run" / "state.safetensors")
    assert (state["epoch"], state["extra"]["position"]["step"], state["finished"]) == (1, 2, False)
    assert len(losses(tmp_path / "run")) == 1
    monkeypatch.delenv(stop.FAULT_ENV)
    pretrain(settings(method, tmp_path / "run", resume="auto"))
    assert_same_run(tmp_path / "run", reference[method])


def test_save_every_minutes_saves_mid_epoch_and_goes_on(reference, tmp_path, monkeypatch):
    """With --save-every-minutes a mid-epoch state is saved whenever the time has come (a clock
    that moves a minute per look here) and the run goes on, unchanged."""
    clock = iter(range(0, 10**6, 60))
    monkeypatch.setattr(stop.time, "monotonic", lambda: float(next(clock)))
    seen, real = [], RunDir.save_state

    def save_state(self, *args, extra=None, **kwargs):
        seen.append((kwargs["epoch"], (extra or {}).get("position", {}).get("step")))
        return real(self, *args, extra=extra, **kwargs)

    monkeypatch.setattr(RunDir, "save_state", save_state)
    pretrain(settings("acl", tmp_path / "run", save_every_minutes=1))
    assert [s for s in seen if s[1] is not None] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert_same_run(tmp_path / "run", reference["acl"])


def fake_scontrol(tmp_path) -> dict:
    """An environment with a fake ``scontrol`` first on PATH that records its arguments (and
    answers ``show hostnames`` with localhost), and a Slurm job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$1" = show ] && echo localhost\nexit 0\n')
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "SLURM_JOB_ID": "4242", "OMP_NUM_THREADS": "1",
            "SCONTROL_LOG": str(log)}


def requeues(env: dict) -> list[str]:
    log = Path(env["SCONTROL_LOG"])
    return [line for line in log.read_text().splitlines() if line.startswith("requeue")] if log.exists() else []


def test_one_command_line_three_times_is_one_run(reference, tmp_path):
    """The done-when of the cluster issue: the same command line, interrupted by SIGUSR1 in the
    middle of an epoch in a Slurm job (it saves, requeues the job once and exits 0), rerun (it
    continues), rerun once finished (it prints the path and exits 0 without training), gives the
    uninterrupted run bit for bit."""
    env = fake_scontrol(tmp_path)
    cmd = [sys.executable, "-m", "advcl_cli", "pretrain", *flags(), "--out", "run", "--resume", "auto"]

    def run(**extra):
        return subprocess.run(cmd, env={**env, **extra}, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S)

    first = run(**{stop.FAULT_ENV: str(STOP_AT)})
    assert first.returncode == 0 and first.stdout == "", first.stderr
    assert "requeued Slurm job 4242" in first.stderr and "Traceback" not in first.stderr
    assert requeues(env) == ["requeue 4242"]
    second = run(**{stop.FAULT_ENV: str(STOP_AT)})  # the hook's step is behind it now
    assert second.returncode == 0, second.stderr
    assert "resuming after epoch 1 and 2 steps" in second.stderr
    third = run()
    assert third.returncode == 0 and "already finished" in third.stderr, third.stderr
    assert first.stdout + second.stdout + third.stdout == "run/encoder.safetensors\n" * 2
    assert requeues(env) == ["requeue 4242"]
    assert_same_run(tmp_path / "run", reference["advcl"])
    # other settings are refused by name, even with auto
    other = subprocess.run([*cmd, "--epochs", "3"], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=HANG_S)
    assert other.returncode == 2 and "epochs is 3 from --epochs but 2 in the run" in other.stderr, other.stderr


def test_resume_auto_from_the_environment_starts_an_empty_folder(run_cli, monkeypatch):
    """ADVCL_RESUME=auto on a folder without a run starts it; a bare --resume still needs one."""
    code, _, err = run_cli("pretrain", *flags(), "--out", "new", "--resume")
    assert code == 2 and "nothing to resume" in err
    monkeypatch.setenv("ADVCL_RESUME", "auto")
    monkeypatch.setenv("ADVCL_EPOCHS", "1")
    monkeypatch.setenv("ADVCL_LIMIT", "32")
    code, out, err = run_cli("pretrain", *[f for f in flags() if not f.startswith(("--epochs", "--limit"))], "--out", "new")
    assert code == 0 and out == "new/encoder.safetensors\n", err
    assert "training: advcl on digits" in err


# --- torchrun: 2 gloo processes -------------------------------------------------------------


def sbatch_script(name: str, tmp_path: Path) -> Path:
    """examples/slurm/NAME as a test runs it: srun dropped (torchrun runs here), the run made a
    tiny digits one in ``tmp_path``."""
    text = (ROOT / "examples" / "slurm" / name).read_text()
    assert "--resume auto" in text and "-m advcl_cli pretrain" in text
    text = re.sub(r"-m advcl_cli pretrain .*", "-m advcl_cli pretrain " + " ".join(flags()) + " --out run --resume auto",
                  text)
    text = re.sub(r"^srun ", "", text, flags=re.M)
    script = tmp_path / name
    script.write_text(text)
    return script


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The uninterrupted run on 2 gloo processes."""
    root = tmp_path_factory.mktemp("two")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "advcl_cli", "pretrain", *flags(), "--out", "run"], cwd=root, capture_output=True,
                          text=True, timeout=HANG_S, env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


def slurm_env(tmp_path) -> dict:
    env = fake_scontrol(tmp_path)
    return {**env, "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_NODELIST": "localhost",
            "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_multi_node_sbatch_requeues_once_from_rank_0_and_continues(two_processes, tmp_path):
    """The multi-node example's command line (srun torchrun, c10d rendezvous) on 2 gloo
    processes: SIGUSR1 reaching rank 1 mid-epoch stops both ranks together, rank 0 saves and
    requeues the job once, every rank exits 0; the rerun continues, bit-identical to the
    uninterrupted 2-process run."""
    script, env = sbatch_script("multi-node.sbatch", tmp_path), slurm_env(tmp_path)

    def run(**extra):
        return subprocess.run(["bash", str(script)], env={**env, "MASTER_PORT": free_port(), **extra}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=HANG_S)

    first = run(**{stop.FAULT_ENV: f"{STOP_AT}:USR1:1"})
    assert first.returncode == 0 and first.stdout == "", first.stderr[-3000:]
    assert requeues(env) == ["requeue 4242"]  # rank 0 alone, once
    state = load_state(tmp_path / "run" / "state.safetensors")
    assert (state["epoch"], state["extra"]["position"]["step"]) == (1, 2)
    second = run()
    assert second.returncode == 0 and second.stdout == "run/encoder.safetensors\n", second.stderr[-3000:]
    assert requeues(env) == ["requeue 4242"]
    assert_same_run(tmp_path / "run", two_processes)


def test_one_node_sbatch_restarts_a_killed_worker_and_continues(two_processes, tmp_path):
    """The one-node example's command line (torchrun --max-restarts 2 ... --resume auto) on 2
    gloo processes, rank 1 killed (SIGKILL) mid-epoch: torchrun relaunches both workers, which
    continue from the last saved state; the result is the uninterrupted 2-process run."""
    script, env = sbatch_script("one-node.sbatch", tmp_path), slurm_env(tmp_path)
    done = subprocess.run(["bash", str(script)], env={**env, stop.FAULT_ENV: f"{STOP_AT}:KILL:1"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0 and done.stdout == "run/encoder.safetensors\n", done.stderr[-3000:]
    assert "exitcode: -9" in done.stderr and "resuming after epoch 1: advcl" in done.stderr, done.stderr[-3000:]
    assert requeues(env) == []
    assert_same_run(tmp_path / "run", two_processes)
