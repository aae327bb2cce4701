"""A run folder belongs to one run (issue 20), through the real CLI: a lock, resume exactly as
started, crash-safe writes, nothing of the user's replaced without --force, damaged files named.
Every wait is for an event (``waiting.wait_for``), never for an amount of time."""

import json
import os
import random
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advcl_cli.checkpoint import load_state
from advcl_cli.cli.training import continue_hint, resume_command
from advcl_cli.settings.layering import resolve
from advcl_cli.engine.pretrain import pretrain
from advcl_cli.pseudolabels import save_labels
from advcl_cli.settings import PretrainSettings
from faults import disk_full
from waiting import HANG_S, wait_for

TESTS = Path(__file__).parent
SMALL = ["--dataset", "digits", "--arch", "resnet18-tiny", "--limit", "64", "--batch-size", "32", "--device", "cpu"]
TINY = [*SMALL, "--pgd-steps", "1"]
RUN_FILES = {".lock", "state.safetensors", "metrics.jsonl", "encoder.safetensors"}
# finetune and benchmark settings that stay short if a refusal below ever stops working
FT = ["--epochs", "1", "--limit", "64", "--eval-limit", "8", "--batch-size", "32", "--device", "cpu"]


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    e.pop("ADVCL_DEBUG", None)
    return e


def popen(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "advcl_cli", *args], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def epochs_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.is_file() else []


def state_epoch(run: Path) -> int:
    try:
        return load_state(run / "state.safetensors")["epoch"]
    except Exception:  # not written yet
        return 0


def holder(run: Path) -> int | None:
    """The pid that .lock names."""
    try:
        return json.loads((run / ".lock").read_text()).get("pid")
    except (OSError, ValueError):
        return None


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    """A finished pretraining run folder (SimCLR, 1 epoch)."""
    out = tmp_path_factory.mktemp("pre") / "runx"
    pretrain(resolve(PretrainSettings, dict(dataset="digits", arch="resnet18-tiny", limit=64, batch_size=32, epochs=1,
                                            method="simclr", device="cpu", out=out)))
    return out


# --- 1. a lock ------------------------------------------------------------------------------------
def test_a_second_start_resume_or_force_during_a_run_is_refused(run_cli, tmp_path):
    args = ["pretrain", *TINY, "--epochs", "50", "--save-every", "1", "--out", "one-folder"]  # stopped below
    first = popen(args, tmp_path)
    run = tmp_path / "one-folder"

    wait_for(lambda: state_epoch(run) >= 1, "the first run saved epoch 1", first)
    assert holder(run) == first.pid
    for extra in ([], ["--resume"], ["--force"]):
        before = snapshot(run)
        code, out, err = run_cli(*args, *extra)
        assert code == 2 and out == "", err
        assert f"error: {Path('one-folder')} is in use by another run (pid {first.pid} on " in err, err
        assert err.count("\n") == 2 and "Traceback" not in err
        # nothing of the first run was touched (it may have logged an epoch meanwhile, never replaced one)
        after = snapshot(run)
        assert after["metrics.jsonl"].startswith(before["metrics.jsonl"])
        assert holder(run) == first.pid
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=HANG_S)
    assert first.returncode == 130, stderr
    done = state_epoch(run)
    assert done >= 1 and epochs_logged(run) == list(range(1, done + 1))  # each epoch once, the first run's only
    assert {p.name for p in run.iterdir()} <= RUN_FILES and not list(run.glob(".*.tmp"))


def test_under_torchrun_rank_0_holds_the_lock_and_a_second_job_stops_on_every_rank(run_cli, tmp_path):
    args = ["pretrain", *TINY, "--epochs", "50", "--out", "one-folder"]  # stopped below
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "advcl_cli"]
    env2 = {k: v for k, v in env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    first = subprocess.Popen([*torchrun, *args], cwd=tmp_path, env=env2, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    run = tmp_path / "one-folder"
    wait_for(lambda: state_epoch(run) >= 1, "the first job saved epoch 1", first)
    rank0 = holder(run)
    assert rank0 not in (None, first.pid)  # a rank holds it, not the launcher
    code, out, err = run_cli(*args)
    assert code == 2 and f"is in use by another run (pid {rank0} on " in err
    second = subprocess.run([*torchrun, *args], cwd=tmp_path, env=env2, capture_output=True, text=True, timeout=HANG_S)
    assert second.returncode != 0 and second.stdout == ""
    assert f"error: one-folder is in use by another run (pid {rank0} on " in second.stderr  # rank 0
    assert f"error: rank 0 stopped: one-folder is in use by another run (pid {rank0} on " in second.stderr  # rank 1
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=HANG_S)
    done = state_epoch(run)
    assert done >= 1 and epochs_logged(run) == list(range(1, done + 1))
    assert {p.name for p in run.iterdir()} <= RUN_FILES


# --- 2. resume exactly as started -------------------------------------------------------------------
START = [*TINY, "--epochs", "3", "--save-every", "2", "--precision", "bf16", "--seed", "5"]


def test_the_printed_resume_command_continues_as_started(run_cli, tmp_path):
    code, full, err = run_cli("pretrain", *START, "--out", "full")
    assert code == 0, err
    first = popen(["pretrain", *START, "--out", "r"], tmp_path)
    wait_for(lambda: state_epoch(tmp_path / "r") >= 1, "the state of epoch 1 was saved", first)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=HANG_S)
    assert first.returncode == 130, stderr
    hint = stderr.splitlines()[-1]
    assert hint == "hint: continue it from its last saved epoch: advcl pretrain --out r --resume"
    code, out, err = run_cli(*shlex.split(hint.split(": ", 2)[2])[1:])  # the printed command, as printed
    assert code == 0, err
    a, b = load_file(tmp_path / out.strip()), load_file(tmp_path / full.strip())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    state = load_state(tmp_path / "r" / "state.safetensors")
    assert state["extra"]["runtime"]["precision"] == "bf16" and state["config"]["save_every"] == 2
    assert epochs_logged(tmp_path / "r") == [1, 2, 3]


@pytest.mark.parametrize("layer", ["flag", "environment", "config file"])
def test_a_changed_setting_is_refused_by_name_from_every_layer(run_cli, tmp_path, monkeypatch, pre, layer):
    shutil.copytree(pre, tmp_path / "r")
    before = snapshot(tmp_path / "r")
    args = ["pretrain", "--out", "r", "--resume"]
    if layer == "flag":
        args += ["--batch-size", "16"]
        source = "--batch-size"
    elif layer == "environment":
        monkeypatch.setenv("ADVCL_BATCH_SIZE", "16")
        source = "ADVCL_BATCH_SIZE"
    else:
        (tmp_path / "advcl.toml").write_text("[pretrain]\nbatch_size = 16\n")
        source = "advcl.toml [pretrain]"
    code, out, err = run_cli(*args)
    assert code == 2 and out == ""
    assert err.splitlines()[0] == f"error: cannot resume with different settings: batch-size is 16 from {source} but 32 in the run"
    assert snapshot(tmp_path / "r") == before


def test_a_changed_pseudo_label_file_is_refused_by_its_sha256(run_cli, tmp_path):
    def labels(seed):
        return {2: torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(seed))}

    save_labels(tmp_path / "pl.safetensors", labels(0), dataset="digits", split="train", encoder="0" * 64)
    code, out, err = run_cli("pretrain", *TINY, "--epochs", "1", "--pseudo-labels", "pl.safetensors", "--out", "r")
    assert code == 0, err
    before = snapshot(tmp_path / "r")
    save_labels(tmp_path / "pl.safetensors", labels(1), dataset="digits", split="train", encoder="0" * 64)  # same shape
    code, out, err = run_cli("pretrain", "--out", "r", "--resume")
    assert code == 2 and out == ""
    assert err.splitlines()[0].startswith("error: the --pseudo-labels file pl.safetensors is not the one this run started from")
    assert snapshot(tmp_path / "r") == before


# --- 3. crashes leave a resumable folder ------------------------------------------------------------
def test_kill_9_during_writes_then_the_hint_always_finishes_the_run(tmp_path):
    out = tmp_path / "r"
    args = ["pretrain", *TINY, "--epochs", "3", "--out", "r"]
    reference = pretrain(resolve(PretrainSettings, dict(dataset="digits", arch="resnet18-tiny", limit=64, batch_size=32,
                                                        pgd_steps=1, epochs=3, device="cpu", out=tmp_path / "full")))
    rng, leftovers, command = random.Random(3), [], args
    for attempt in range(6):  # a bounded loop: kills at 5 random writes, then no kill
        k = rng.randint(1, 6) if attempt < 5 else 0
        proc = subprocess.run([sys.executable, str(TESTS / "killer.py"), str(k), str(out), *command], cwd=tmp_path,
                              env=env(), capture_output=True, text=True, timeout=HANG_S)
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr  # never refused: the hint always works
        if proc.returncode == 0:
            break
        leftovers += [p.name for p in out.glob(".*.tmp")]
        hint = continue_hint(out, resume_command("pretrain", Path("r")))  # what an interrupted run prints
        command = shlex.split(hint.split(": ", 1)[1])[1:] if "--resume" in hint else args
    assert proc.returncode == 0 and proc.stdout.strip() == str(Path("r") / "encoder.safetensors")
    assert any(name.startswith(".state.safetensors.") for name in leftovers)  # a full temporary was left, then removed
    assert {p.name for p in out.iterdir()} == RUN_FILES  # no stray files
    assert epochs_logged(out) == [1, 2, 3]
    a, b = load_file(out / "encoder.safetensors"), load_file(reference.path)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_full_disk_at_the_encoder_write_gives_a_hint_that_works(run_cli, tmp_path, monkeypatch):
    args = ["pretrain", *TINY, "--epochs", "2", "--save-every", "1", "--out", "r"]
    with monkeypatch.context() as m:
        disk_full(m, tmp_path / "r", names=["encoder"])
        code, out, err = run_cli(*args)
    assert code == 1 and out == ""
    assert err.splitlines()[-1].endswith("then continue it from its last saved epoch: advcl pretrain --out r --resume")
    assert {p.name for p in (tmp_path / "r").iterdir()} == {".lock", "state.safetensors", "metrics.jsonl"}
    code, out, err = run_cli("pretrain", "--out", "r", "--resume")
    assert code == 0, err
    assert epochs_logged(tmp_path / "r") == [1, 2] and {p.name for p in (tmp_path / "r").iterdir()} == RUN_FILES


def test_a_damaged_state_says_start_over_with_force_and_that_works(run_cli, tmp_path, pre):
    shutil.copytree(pre, tmp_path / "r")
    (tmp_path / "r" / "state.safetensors").write_bytes(b"\0" * 100)
    args = ["pretrain", *SMALL, "--method", "simclr", "--epochs", "1", "--out", "r"]
    for extra in (["--resume"], []):
        code, out, err = run_cli(*args, *extra)
        assert code == 2 and out == "" and err.splitlines()[-1] == "hint: start over with --force"
        assert f"error: {Path('r') / 'state.safetensors'} is not a safetensors file (bad header)" in err
    code, out, err = run_cli(*args, "--force")  # the hint, as given
    assert code == 0, err
    assert {p.name for p in (tmp_path / "r").iterdir()} == RUN_FILES and epochs_logged(tmp_path / "r") == [1]


# --- 4. nothing of the user's replaced without --force ------------------------------------------------
def test_finetune_never_deletes_the_run_it_reads(run_cli, tmp_path, pre):
    shutil.copytree(pre, tmp_path / "runx")
    before = snapshot(tmp_path / "runx")
    code, out, err = run_cli("finetune", "runx/encoder.safetensors", "--out", "runx", "--force", *FT)
    assert code == 2 and out == ""
    assert err.splitlines()[0] == "error: runx holds an advcl pretrain run, not a finetune run"
    assert snapshot(tmp_path / "runx") == before


def test_finetune_replaces_a_metrics_log_it_did_not_write_only_with_force(run_cli, tmp_path, pre):
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "metrics.jsonl").write_text("my own notes\n")
    code, out, err = run_cli("finetune", str(pre / "encoder.safetensors"), "--out", "proj", *FT)
    assert code == 2 and out == ""
    assert err.splitlines()[0] == "error: proj already holds metrics.jsonl, which no advcl finetune run wrote"
    assert (tmp_path / "proj" / "metrics.jsonl").read_text() == "my own notes\n"
    assert {p.name for p in (tmp_path / "proj").iterdir()} == {"metrics.jsonl"}  # not even a lock left


def test_benchmark_replaces_results_it_did_not_write_only_with_force(run_cli, tmp_path, pre):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text('{"mine": 1}')
    (tmp_path / "b" / "leaderboard.md").write_text("# mine\n")
    code, out, err = run_cli("benchmark", str(pre / "encoder.safetensors"), "--out", "b", *FT, "--image-size", "16", "--eval-batch-size", "8",
                                 "--attack", "pgd5", "--schemes", "slf")
    assert code == 2 and out == ""
    assert err.splitlines()[0] == "error: --out b already holds results.json, which no advcl benchmark wrote"
    assert snapshot(tmp_path / "b") == {"results.json": b'{"mine": 1}', "leaderboard.md": b"# mine\n"}


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_force_never_replaces_what_is_not_a_regular_file(run_cli, tmp_path, pre, kind):
    (tmp_path / "notes.txt").write_text("mine")
    target, run_file = tmp_path / "adv.safetensors", tmp_path / "r" / "metrics.jsonl"
    (tmp_path / "r").mkdir()
    for path in (target, run_file):
        os.mkfifo(path) if kind == "fifo" else path.symlink_to(tmp_path / "notes.txt")
    code, out, err = run_cli("attack", str(pre / "encoder.safetensors"), "--out", "adv.safetensors", "--force")
    assert code == 2 and out == "" and err.splitlines()[0].startswith("error: cannot write --out adv.safetensors: it is a")
    code, out, err = run_cli("pretrain", *TINY, "--epochs", "1", "--out", "r", "--force")
    assert code == 2 and out == ""
    said = "a device or pipe" if kind == "fifo" else "a link"
    assert err.splitlines()[0] == f"error: cannot write {Path('r') / 'metrics.jsonl'}: it is {said}, not a regular file"
    for path in (target, run_file):
        assert stat.S_ISFIFO(os.lstat(path).st_mode) if kind == "fifo" else path.is_symlink()
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --- 6. damaged run files are named ----------------------------------------------------------------
def test_a_line_of_the_metrics_log_that_is_no_record_is_named(run_cli, tmp_path, pre):
    shutil.copytree(pre, tmp_path / "r")
    log = tmp_path / "r" / "metrics.jsonl"
    log.write_text("[1, 2]\n" + log.read_text())
    code, out, err = run_cli("pretrain", "--out", "r", "--resume")
    assert code == 2 and out == ""
    assert err.splitlines()[0] == f"error: {Path('r') / 'metrics.jsonl'} line 1 is not an epoch record: '[1, 2]'"
